"""training.average: the mean of models of one architecture, exported with the first one's contract."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.model import ModelLoadError, SegmentationModel
from tests.conftest import tiny_config
from training.average import average, main, mean_weights
from training.config import TrainConfig
from training.export import export_model, stored_weights, update_metadata
from training.model import build_unet


def perturbed_copy(model_dir: Path, out: Path, seed: int, config: TrainConfig | None = None) -> Path:
    """``model_dir``'s network with noise on every weight (another architecture where ``config`` says so)."""
    metadata = json.loads((model_dir / "metadata.json").read_text())
    config = config or TrainConfig.from_dict(metadata["training_config"])
    network = build_unet(replace(config, encoder_weights="none"))
    rng = np.random.default_rng(seed)
    if config.decoder_filters == TrainConfig.from_dict(metadata["training_config"]).decoder_filters:
        network.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in stored_weights(model_dir)])
    return export_model(network, out, metadata, fixed_size=None, softmax_channels=config.num_classes,
                        sigmoid_channels=int(config.distance_output))


def test_the_average_holds_the_mean_of_every_weight(tile_model_dir: Path, tmp_path: Path):
    other = perturbed_copy(tile_model_dir, tmp_path / "other", seed=0)
    soup = average([tile_model_dir, other], tmp_path / "soup")
    for mean, a, b in zip(stored_weights(soup), stored_weights(tile_model_dir), stored_weights(other)):
        np.testing.assert_allclose(mean, (a + b) / 2, atol=1e-6)
    batch = np.random.default_rng(1).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    assert SegmentationModel.load(soup).predict(batch).shape == SegmentationModel.load(tile_model_dir).predict(batch).shape


def test_no_precision_verdict_carries_over_to_the_new_network(tile_model_dir: Path, tmp_path: Path):
    first = tmp_path / "first"
    perturbed_copy(tile_model_dir, first, seed=2)
    update_metadata(first, {"runtime": {"parity": {"bf16": {"passed": True}}}})
    update_metadata(first, {"precision": "int8", "openvino": {"int8": "openvino/int8.xml"},
                            "init": {"model": "somewhere"}})
    soup = average([first, tile_model_dir], tmp_path / "soup")
    metadata = json.loads((soup / "metadata.json").read_text())
    assert "runtime" not in metadata  # auto serves f32 until training.parity gates this network
    for key in ("precision", "openvino", "init", "training", "validation_metrics"):  # they describe the first alone
        assert key not in metadata, key
    assert [m["model"] for m in metadata["averaged_from"]] == [str(first), str(tile_model_dir)]
    assert metadata["training_config"] == json.loads((first / "metadata.json").read_text())["training_config"]


def test_models_of_another_architecture_are_refused_and_nothing_is_written(tile_model_dir: Path, tmp_path: Path):
    wider = replace(tiny_config("best"), decoder_filters=(8, 8, 8, 8))
    other = perturbed_copy(tile_model_dir, tmp_path / "other", seed=3, config=wider)
    with pytest.raises(ModelLoadError, match="architecture"):
        average([tile_model_dir, other], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    with pytest.raises(SystemExit, match="architecture"):
        main(["--model", str(tile_model_dir), "--model", str(other), "--out", str(tmp_path / "soup")])
    with pytest.raises(SystemExit, match="not an exported model"):
        main(["--model", str(tile_model_dir), "--model", str(tmp_path), "--out", str(tmp_path / "soup")])
    with pytest.raises(SystemExit, match="at least two"):
        main(["--model", str(tile_model_dir), "--out", str(tmp_path / "soup")])


def test_the_average_carries_every_input_s_sources_and_licences(tile_model_dir: Path, tmp_path: Path):
    other = perturbed_copy(tile_model_dir, tmp_path / "other", seed=4)
    data = json.loads((other / "metadata.json").read_text())["data"]
    extra = {"name": "monuseg/train", "path": "x", "layout": "pairs", "licence": "CC BY-NC-SA 4.0", "images": 13,
             "fingerprint": "f00"}
    update_metadata(other, {"data": {**data, "sources": data["sources"] + [extra]}})
    merged = json.loads((average([tile_model_dir, other], tmp_path / "soup") / "metadata.json").read_text())["data"]
    assert "CC BY-NC-SA 4.0" in merged["licences"]  # a non-commercial input makes the average non-commercial
    assert [s["name"] for s in merged["sources"]] == [s["name"] for s in data["sources"]] + ["monuseg/train"]


def test_another_input_handling_or_split_is_refused_though_the_shapes_agree(tile_model_dir: Path, tmp_path: Path):
    other = perturbed_copy(tile_model_dir, tmp_path / "other", seed=5)
    metadata = json.loads((other / "metadata.json").read_text())
    update_metadata(other, {"training_config": {**metadata["training_config"], "canonical_diameter": 31.0}})
    with pytest.raises(ModelLoadError, match="canonical_diameter"):
        average([tile_model_dir, other], tmp_path / "soup")
    update_metadata(other, {"training_config": metadata["training_config"],
                            "split": {**metadata["split"], "validation_ids": metadata["split"]["validation_ids"][1:]}})
    with pytest.raises(ModelLoadError, match="another split"):
        average([tile_model_dir, other], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_weights_of_another_count_are_refused():
    with pytest.raises(ModelLoadError, match="2 weights against 1"):
        mean_weights([[np.zeros(3)], [np.zeros(3), np.zeros(2)]], ["a", "b"])
    np.testing.assert_array_equal(mean_weights([[np.zeros(3)], [np.full(3, 2.0)]], ["a", "b"])[0], np.ones(3))
