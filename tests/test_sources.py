"""Training data from several sources: the image + label-image layout, names, licences, fine-tuning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tifffile
from PIL import Image

from tests.conftest import tiny_config
from tests.synthetic import make_dataset, make_pairs_dataset
from training.data import DataError, layout_of, load_dataset, load_sources, parse_source
from training.train import base_config, parse_args, train


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pairs_dataset(tmp_path_factory.mktemp("mine") / "train")


def test_pairs_layout_loads_images_with_their_labels_renumbered(pairs_dir: Path):
    assert layout_of(pairs_dir) == "pairs"
    ds = load_dataset(pairs_dir)
    assert ds.ids == ["tissue_0", "tissue_1", "tissue_2", "tissue_3"]
    for sample in ds.samples:
        written = tifffile.imread(pairs_dir / "labels" / f"{sample.id}.tif")
        assert sample.image.shape == (*written.shape, 3) and sample.labels.dtype == np.int32
        ids = np.unique(sample.labels)
        assert ids.tolist() == list(range(len(ids)))  # 0, 1..N: the gaps of 10, 20, ... are gone
        np.testing.assert_array_equal(sample.labels > 0, written > 0)
        assert sample.source == ds.sources[0].name


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32])
def test_label_images_of_every_depth_and_format_load(tmp_path: Path, dtype):
    root = make_pairs_dataset(tmp_path / "d", count=1)
    labels = tifffile.imread(root / "labels" / "tissue_0.tif")
    (root / "labels" / "tissue_0.tif").unlink()
    if dtype in (np.uint8, np.uint16):
        Image.fromarray(labels.astype(dtype)).save(root / "labels" / "tissue_0.png")
    else:
        tifffile.imwrite(root / "labels" / "tissue_0.tiff", labels.astype(dtype))
    loaded = load_dataset(root).samples[0].labels
    assert loaded.max() == len(np.unique(labels)) - 1
    np.testing.assert_array_equal(loaded > 0, labels > 0)


@pytest.mark.parametrize("breakage, message", [
    ("unlabelled", "have no label image"),
    ("orphan", "have no image"),
    ("float_labels", "float"),
    ("rgb_labels", "shape"),
    ("wrong_size", "but its image is"),
])
def test_bad_pairs_are_refused_naming_the_problem(tmp_path: Path, breakage: str, message: str):
    root = make_pairs_dataset(tmp_path / "d", count=2)
    label = root / "labels" / "tissue_1.tif"
    if breakage == "unlabelled":
        label.unlink()
    elif breakage == "orphan":
        (root / "images" / "tissue_1.png").unlink()
    elif breakage == "float_labels":
        tifffile.imwrite(label, np.zeros((72, 88), np.float32))
    elif breakage == "rgb_labels":
        tifffile.imwrite(label, np.zeros((72, 88, 3), np.uint8), photometric="rgb")
    else:
        tifffile.imwrite(label, np.zeros((10, 10), np.uint16))
    with pytest.raises(DataError, match=message):
        load_dataset(root)


def test_sources_keep_names_and_licences_and_refuse_clashes(tmp_path: Path, pairs_dir: Path):
    kaggle = make_dataset(tmp_path / "dsb2018" / "stage1_train", count=2)
    assert parse_source(kaggle).licence.startswith("CC0")  # recognised by the folder name
    (pairs_dir.parent / "LICENSE").write_text("CC-BY-4.0 our lab\n\nfull text")
    mine = parse_source(f"lab={pairs_dir}")
    assert (mine.name, mine.layout, mine.licence) == ("lab", "pairs", "CC-BY-4.0 our lab")
    ds = load_sources([kaggle, mine])
    assert {s.source for s in ds.samples} == {"dsb2018/stage1_train", "lab"} and len(ds) == 6
    with pytest.raises(DataError, match="same name"):
        load_sources([f"a={kaggle}", f"a={pairs_dir}"])
    twin = tmp_path / "twin"
    shutil.copytree(kaggle, twin)
    with pytest.raises(DataError, match="occurs in both"):
        load_sources([kaggle, twin])
    with pytest.raises(DataError, match="not found"):
        parse_source(tmp_path / "absent")


def test_two_sources_train_record_licences_and_fine_tune_from_the_export(dataset_dir: Path, pairs_dir: Path,
                                                                         tmp_path: Path):
    from service.model import SegmentationModel

    run = tmp_path / "run"
    train(tiny_config("best"), [dataset_dir, pairs_dir], run, evaluate_after=False)
    meta = json.loads((run / "model" / "metadata.json").read_text())
    assert [s["layout"] for s in meta["data"]["sources"]] == ["kaggle", "pairs"]
    assert meta["data"]["images"] == 12 and meta["data"]["licences"]
    validation = set(meta["split"]["validation_ids"])
    assert any(i.startswith("tissue") for i in validation) and any(i.startswith("img") for i in validation)

    # --init takes the start model's recipe, and its weights arrive unchanged in the new network
    config, args = parse_args(["--init", str(run / "model"), "--data", str(pairs_dir), "--out", "o", "--epochs", "1"])
    assert config.decoder_filters == (16, 16, 16, 16) and config.epochs == 1 and config.encoder_weights == "none"
    from training.export import load_serving_weights
    from training.model import build_unet

    network = build_unet(config)
    load_serving_weights(network, run / "model")
    batch = np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    served = SegmentationModel.load(run / "model").predict(batch)
    mine = tf.nn.softmax(network(tf.cast(batch, tf.float32), training=False), -1).numpy()
    np.testing.assert_allclose(mine, served, atol=1e-4)

    tuned = tmp_path / "tuned"
    train(config, [pairs_dir], tuned, evaluate_after=False, init=args.init)
    tuned_meta = json.loads((tuned / "model" / "metadata.json").read_text())
    assert tuned_meta["init"]["model"] == str(run / "model")
    assert tuned_meta["init"]["training"] == meta["training"]  # the start model's own fit stays on record
    # it learnt from its start's sources too (kaggle + pairs), not only from this fit's (pairs): their licences count
    assert [s["name"] for s in tuned_meta["data"]["sources"]] == [s["name"] for s in meta["data"]["sources"]][::-1]
    assert tuned_meta["data"]["licences"] == meta["data"]["licences"]
    assert tuned_meta["classes"] == meta["classes"] and tuned_meta["input"] == meta["input"]  # the same contract
    assert SegmentationModel.load(tuned / "model").predict(batch).shape == served.shape


def test_init_refuses_a_preset_a_folder_without_a_model_and_another_architecture(tmp_path: Path, tile_model_dir: Path):
    with pytest.raises(ValueError, match="exclude"):
        base_config("best", tile_model_dir)
    with pytest.raises(ValueError, match="metadata"):
        base_config(None, tmp_path)
    from service.model import ModelLoadError
    from training.export import load_serving_weights
    from training.model import build_unet

    other = build_unet(tiny_config("best").override(decoder_filters=(8, 8, 8, 8)))
    before = [w.numpy().copy() for w in other.weights]
    with pytest.raises(ModelLoadError, match="another architecture"):
        load_serving_weights(other, tile_model_dir)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, other.weights))  # nothing changed


def test_evaluation_scores_an_external_pairs_folder_with_aji(tile_model_dir: Path, pairs_dir: Path, tmp_path: Path):
    from training.evaluate import evaluate_model, split_samples
    from service.model import SegmentationModel

    with pytest.raises(DataError, match="--split all"):  # none of its images is in the model's split
        split_samples(SegmentationModel.load(tile_model_dir), [pairs_dir], "validation")
    summary = evaluate_model(tile_model_dir, [pairs_dir], tmp_path / "ev", split="all")
    assert summary["images"] == 4 and 0.0 <= summary["aji"] <= 1.0
    assert list(summary["per_source"]) == [parse_source(pairs_dir).name]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "AJI" in report and parse_source(pairs_dir).name in report
    header = (tmp_path / "ev" / "per_image.csv").read_text().splitlines()[0]
    assert "aji" in header and "source" in header
