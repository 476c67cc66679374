"""The precision gate: scores beside the reference, agreement, and the verdict that ``auto`` reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service.runtime import resolve_precision, verified_precisions
from training.parity import TOLERANCE, main


def test_f32_passes_against_tensorflow_and_the_verdict_is_recorded(tile_model_dir: Path, dataset_dir: Path,
                                                                   tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(tile_model_dir, model)
    out = tmp_path / "parity.json"
    main(["--model", str(model), "--data", str(dataset_dir), "--test", str(dataset_dir), "--precision", "f32",
          "--out", str(out), "--record"])
    report = json.loads(out.read_text())
    assert report["reference"]["runtime"] == "tensorflow" and report["tolerance"] == TOLERANCE
    verdict = report["precisions"]["f32"]
    assert verdict["validation"]["identical_images"] == 1.0 and verdict["validation"]["ap50_vs_reference"] == 1.0
    assert verdict["drops"] == {"dsb_validation": 0.0, "aji_test": 0.0} and verdict["passed"]
    assert "| openvino f32 |" in out.with_suffix(".md").read_text()
    metadata = json.loads((model / "metadata.json").read_text())
    assert verified_precisions(metadata) == ["f32"]
    assert resolve_precision("auto", ["FP32", "BF16"], metadata) == "f32"  # bf16 was never gated


def test_a_failed_or_missing_verdict_keeps_auto_at_f32():
    failed = {"runtime": {"parity": {"bf16": {"passed": False, "drops": {"dsb_validation": 0.02}}}}}
    assert verified_precisions(failed) == []
    assert resolve_precision("auto", ["BF16"], failed) == "f32"
