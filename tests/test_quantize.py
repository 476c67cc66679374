"""NNCF int8 quantization CLI on the tiny tile model: output contract, agreement, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from training.quantize import INT8_XML, calibration_crops
from training.quantize import main as quantize_main

CROPS = 8
SEED = 3


@pytest.fixture(scope="module")
def quantized_dir(tile_model_dir: Path, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "int8"
    assert quantize_main(["--model", str(tile_model_dir), "--data", str(dataset_dir), "--out", str(out),
                          "--crops", str(CROPS), "--seed", str(SEED)]) == 0
    return out


def argmax_classes(compiled: ov.CompiledModel, batch: np.ndarray, classes: int) -> np.ndarray:
    return np.argmax(compiled(batch)[0][..., :classes], axis=-1)


def test_output_is_a_copy_plus_int8_ir_that_agrees_with_float(quantized_dir: Path, tile_model_dir: Path,
                                                              dataset_dir: Path):
    for path in tile_model_dir.rglob("*"):  # a full copy of the model folder
        assert (quantized_dir / path.relative_to(tile_model_dir)).exists(), path
    assert (quantized_dir / "openvino" / "int8.xml").is_file() and (quantized_dir / "openvino" / "int8.bin").is_file()
    assert not [p for p in quantized_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    metadata = json.loads((quantized_dir / "metadata.json").read_text())
    classes = len(metadata["classes"])
    core = ov.Core()
    int8_model = core.read_model(str(quantized_dir / metadata["openvino"]["int8"]))
    shape = int8_model.input(0).get_partial_shape()
    assert [d.is_dynamic for d in shape] == [True, True, True, False] and shape[3].get_length() == 3
    assert any(op.get_type_name() == "FakeQuantize" for op in int8_model.get_ops())  # really quantized
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}  # as the service compiles both: else a bf16 CPU computes in bf16
    int8 = core.compile_model(int8_model, "CPU", f32)
    reference = core.compile_model(core.read_model(str(tile_model_dir)), "CPU", f32)
    crops = calibration_crops(tile_model_dir, dataset_dir, count=4, seed=SEED + 1).crops
    batch = np.concatenate(crops)
    agreement = float(np.mean(argmax_classes(int8, batch, classes) == argmax_classes(reference, batch, classes)))
    assert agreement >= 0.9, agreement
    other = np.zeros((1, 96, 64, 3), np.uint8)  # any multiple of 32, not only the calibration tile
    assert int8(other)[0].shape == (1, 96, 64, len(metadata["classes"]))


def test_metadata_records_precision_and_provenance(quantized_dir: Path, tile_model_dir: Path):
    source = json.loads((tile_model_dir / "metadata.json").read_text())
    metadata = json.loads((quantized_dir / "metadata.json").read_text())
    assert metadata["precision"] == "int8"
    assert metadata["openvino"] == {"int8": INT8_XML}
    q = metadata["quantization"]
    assert q["method"] == "nncf.quantize" and q["from_split"] == "train"
    assert q["calibration_crops"] == CROPS and 1 <= q["calibration_images"] <= CROPS
    assert q["seed"] == SEED and q["source_model"] == str(tile_model_dir)
    assert q["openvino_version"] == ov.__version__ and q["nncf_version"]
    assert q["overflow_fix"] == "first_layer_only"  # NNCF's default
    # everything else is the source model's, unchanged
    assert {k: v for k, v in metadata.items() if k not in ("precision", "openvino", "quantization")} == source


def test_calibration_crops_come_from_the_training_split_only(tile_model_dir: Path, dataset_dir: Path):
    metadata = json.loads((tile_model_dir / "metadata.json").read_text())
    validation = set(metadata["split"]["validation_ids"])
    all_ids = {p.name for p in dataset_dir.iterdir() if p.is_dir()}
    calibration = calibration_crops(tile_model_dir, dataset_dir, count=CROPS, seed=SEED)
    assert validation and not validation & set(calibration.ids)
    assert set(calibration.ids) <= all_ids - validation
    size = metadata["input_size"]
    assert all(c.shape == (1, size, size, 3) and c.dtype == np.uint8 for c in calibration.crops)
    again = calibration_crops(tile_model_dir, dataset_dir, count=CROPS, seed=SEED)  # seeded: reproducible
    assert again.ids == calibration.ids and all(np.array_equal(a, b) for a, b in zip(again.crops, calibration.crops))


def test_refuses_a_non_empty_out_and_changes_nothing(tile_model_dir: Path, dataset_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = quantize_main(["--model", str(tile_model_dir), "--data", str(dataset_dir), "--out", str(out),
                          "--crops", "2"])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary sibling either
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_refuses_a_folder_that_is_not_a_model(dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "out"
    code = quantize_main(["--model", str(dataset_dir), "--data", str(dataset_dir), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "not an exported model folder" in err and str(dataset_dir) in err
    assert not out.exists()


def test_refuses_data_without_training_images(tile_model_dir: Path, dataset_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture):
    metadata = json.loads((tile_model_dir / "metadata.json").read_text())
    only_validation = tmp_path / "data" / "validation_only"
    for sample_id in metadata["split"]["validation_ids"]:
        shutil.copytree(dataset_dir / sample_id, only_validation / sample_id)
    out = tmp_path / "out"
    code = quantize_main(["--model", str(tile_model_dir), "--data", str(only_validation), "--out", str(out)])
    assert code == 2
    assert "no training images" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_write_leaves_nothing(quantized_dir: Path, tile_model_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch):
    import training.quantize as quantize_module

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    model = ov.Core().read_model(str(quantized_dir / INT8_XML))
    monkeypatch.setattr(quantize_module.ov, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        quantize_module.write_quantized(tile_model_dir, model, tmp_path / "out",
                                        quantize_module.Calibration([], []), seed=0)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary sibling


def test_overflow_fix_for_cpus_without_vnni_is_applied_and_recorded(quantized_dir: Path, tile_model_dir: Path,
                                                                     dataset_dir: Path, tmp_path: Path):
    """--overflow-fix enable: every layer's weights in 7 bits (CPUs without VNNI would saturate), recorded."""
    out = tmp_path / "int8_7bit"
    assert quantize_main(["--model", str(tile_model_dir), "--data", str(dataset_dir), "--out", str(out),
                          "--crops", str(CROPS), "--seed", str(SEED), "--overflow-fix", "enable"]) == 0
    assert json.loads((out / "metadata.json").read_text())["quantization"]["overflow_fix"] == "enable"
    assert (out / "openvino" / "int8.bin").read_bytes() != (quantized_dir / "openvino" / "int8.bin").read_bytes()
    with pytest.raises(SystemExit):
        quantize_main(["--model", str(tile_model_dir), "--data", str(dataset_dir), "--out", str(tmp_path / "x"),
                       "--overflow-fix", "sometimes"])
