"""Evaluation CLI and threshold tuning on the tiny synthetic data set."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.model import SegmentationModel
from service.pipeline import segment
from training.config import preset
from training.data import DataError, load_dataset
from training.evaluate import main as evaluate_main
from training.evaluate import (BORDER_GRID, SEED_GRID, SIGMA_GRID, evaluate_model, ranking_auc, split_samples,
                               tune_thresholds)
from training.matching import score_image
from training.robustness import CHANGES
from training.robustness import main as robustness_main
from training.report import core_note, fine_tune_note, init_note, photometric_note, sampling_note, write_report


def test_evaluate_writes_report_and_scores_the_service_path(tile_model_dir: Path, dataset_dir: Path, tmp_path: Path):
    out = tmp_path / "eval"
    evaluate_main(["--model", str(tile_model_dir), "--data", str(dataset_dir), "--out", str(out)])
    for name in ("report.md", "per_image.csv", "worst.png", "summary.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    meta = json.loads((tile_model_dir / "metadata.json").read_text())
    assert [r["id"] for r in rows] == meta["split"]["validation_ids"]
    # the report's number is the score of what the service's segment() returns
    model = SegmentationModel.load(tile_model_dir)
    samples = {s.id: s for s in load_dataset(dataset_dir).samples}
    first = samples[rows[0]["id"]]
    expected = score_image(first.labels, segment(first.image, model).labels).score
    assert float(rows[0]["score"]) == round(expected, 4)
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["dsb_score"] <= 1.0 and summary["images"] == len(rows)
    tp, total = (sum(int(r[k]) for r in rows for k in keys) for keys in (["tp50"], ["tp50", "fp50", "fn50"]))
    assert summary["pooled_ap50"] == pytest.approx(tp / total)
    assert "Pooled AP@0.5" in (out / "report.md").read_text()
    auc = summary["nucleus_probability_auc"]
    assert np.isnan(auc) or 0.0 <= auc <= 1.0
    assert "nucleus_probability" in (out / "report.md").read_text()


def test_ranking_auc_is_how_often_a_positive_outscores_a_negative():
    positive = np.array([True, True, False, False])
    assert ranking_auc(np.array([0.9, 0.8, 0.2, 0.1]), positive) == 1.0
    assert ranking_auc(np.array([0.1, 0.2, 0.8, 0.9]), positive) == 0.0
    assert ranking_auc(np.array([0.9, 0.2, 0.5, 0.1]), positive) == 0.75  # 3 of the 4 pairs in order
    assert ranking_auc(np.full(4, 0.5), positive) == 0.5  # ties count half
    assert np.isnan(ranking_auc(np.array([0.9, 0.8]), np.array([True, True])))


def test_training_split_is_every_image_the_validation_split_leaves_out(tile_model_dir: Path, dataset_dir: Path):
    model = SegmentationModel.load(tile_model_dir)
    validation = {s.id for s in split_samples(model, dataset_dir, "validation").samples}
    training = {s.id for s in split_samples(model, dataset_dir, "training").samples}
    assert training and validation and not training & validation
    assert training | validation == {s.id for s in load_dataset(dataset_dir).samples}
    with pytest.raises(ValueError, match="unknown split"):
        split_samples(model, dataset_dir, "test")


def test_training_split_is_the_recorded_share_when_the_model_trained_on_part_of_it(
        tile_model_dir: Path, dataset_dir: Path, tmp_path: Path):
    model_dir = tmp_path / "model"
    shutil.copytree(tile_model_dir, model_dir)
    rest = sorted(s.id for s in split_samples(SegmentationModel.load(model_dir), dataset_dir, "training").samples)
    meta_path = model_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["split"]["training_ids"] = rest[: len(rest) // 2]  # as train() records a --train-fraction share
    meta_path.write_text(json.dumps(meta))
    model = SegmentationModel.load(model_dir)
    assert [s.id for s in split_samples(model, dataset_dir, "training").samples] == rest[: len(rest) // 2]
    meta["split"]["training_ids"] = ["not_in_the_data"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="none of the model's 1 training ids"):
        split_samples(SegmentationModel.load(model_dir), dataset_dir, "training")


def test_tune_thresholds_stores_them_in_metadata(tile_run: Path, dataset_dir: Path, tmp_path: Path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tile_run / "model", model_dir)
    chosen = tune_thresholds(model_dir, dataset_dir)
    printed = capsys.readouterr().out
    chosen_ap = [float(x) for x in re.findall(r"^best watershed: .*AP@0.5 ([0-9.]+)", printed, re.M)]
    highest_ap = [float(x) for x in re.findall(r"highest AP@0.5 in this grid: ([0-9.]+)", printed)]
    assert len(chosen_ap) == len(highest_ap) == 2  # thresholds, then edge pieces
    assert all(high >= ap for high, ap in zip(highest_ap, chosen_ap))
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["postprocess"]["foreground_threshold"] == chosen["foreground_threshold"]
    assert "tuned_on" in meta["postprocess"]
    served = SegmentationModel.load(model_dir).spec.postprocess
    assert (served.seed_threshold, served.seed_sigma) == (chosen["seed_threshold"], chosen["seed_sigma"])
    assert chosen["seed_threshold"] in SEED_GRID and chosen["seed_sigma"] in SIGMA_GRID
    assert chosen["border_min_size"] in BORDER_GRID and served.border_min_size == chosen["border_min_size"]
    assert meta["postprocess_by_modality"] == {}  # 8 tiny images: no modality has enough to be tuned alone


def test_a_modality_tuned_alone_is_served_its_own_decoding(tile_run: Path, dataset_dir: Path, tmp_path: Path,
                                                           monkeypatch):
    import training.evaluate as evaluate
    from service.modality import modality
    from service.pipeline import segment

    model_dir = tmp_path / "model"
    shutil.copytree(tile_run / "model", model_dir)
    monkeypatch.setattr(evaluate, "MIN_MODALITY_IMAGES", 1)
    monkeypatch.setattr(evaluate, "MIN_MODALITY_GAIN", -1.0)  # keep every modality's own choice
    tune_thresholds(model_dir, dataset_dir)
    meta = json.loads((model_dir / "metadata.json").read_text())
    kinds = {modality(s.image) for s in split_samples(SegmentationModel.load(model_dir), dataset_dir, "validation")
             .samples}
    assert set(meta["postprocess_by_modality"]) == kinds and all(
        "tuned_on" in v for v in meta["postprocess_by_modality"].values())
    # the service reads them, and segment() decodes an image of that modality with its own
    name = sorted(kinds)[0]
    meta["postprocess_by_modality"][name]["min_size"] = 10**6  # drops every nucleus: visibly this decoding
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    model = SegmentationModel.load(model_dir)
    image = next(s.image for s in load_dataset(dataset_dir).samples if modality(s.image) == name)
    assert model.spec.postprocess_for(image).min_size == 10**6 and segment(image, model).labels.max() == 0
    meta["postprocess_by_modality"] = {"confocal": meta["postprocess"]}
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="unknown modalities"):
        SegmentationModel.load(model_dir)


def test_report_is_built_from_the_runs(tile_run: Path, dataset_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tile_run, run)
    evaluate_model(run / "model", dataset_dir, run / "evaluation")
    out = tmp_path / "shipped"
    shutil.copytree(run / "model", out)
    report = write_report(run, run, dataset_dir, out).read_text()
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert f"{summary['dsb_score']:.3f}" in report and "share them" in report
    for name in ("overlay_examples.png", "curves.png", "worst.png", "predictions.png"):
        assert (out / name).is_file()


def test_report_compares_models_on_validation_and_the_external_test_set(tile_run: Path, dataset_dir: Path,
                                                                       tmp_path: Path):
    from tests.synthetic import make_pairs_dataset
    from training.scale_sweep import sweep, sweep_subset
    from service.model import SegmentationModel

    run = tmp_path / "run"
    shutil.copytree(tile_run, run)
    test = make_pairs_dataset(tmp_path / "external" / "test", count=3)
    evaluations = tmp_path / "eval"
    val = evaluate_model(run / "model", dataset_dir, evaluations / "shipped" / "dsb_val")
    shutil.copytree(evaluations / "shipped" / "dsb_val", run / "evaluation")
    tested = evaluate_model(run / "model", test, evaluations / "shipped" / "monuseg_test", split="all")
    evaluate_model(run / "model", test, evaluations / "previous" / "monuseg_test", split="all")
    model = SegmentationModel.load(run / "model")
    points = sweep(model, sweep_subset(split_samples(model, dataset_dir, "validation"), 2, 0), factors=(1.0, 2.0))
    (tmp_path / "sweep.json").write_text(json.dumps({"points": [p.__dict__ for p in points]}))
    (tmp_path / "commands.txt").write_text("python -m training.evaluate --model M --data D\n")
    out = tmp_path / "shipped"
    shutil.copytree(run / "model", out)
    reference = tmp_path / "reference_model"  # a bare model folder, as git archive gives an earlier one
    shutil.copytree(run / "model", reference)
    report = write_report(run, reference, dataset_dir, out, evaluations, test, tmp_path / "sweep.json",
                          tmp_path / "commands.txt").read_text()
    assert "share them" in report
    with pytest.raises(ValueError, match="give --evaluations"):  # a bare model folder holds no scores of its own
        write_report(run, reference, dataset_dir, out)
    table = [line for line in report.splitlines() if line.startswith("| shipped")][0]
    assert f"{val['dsb_score']:.3f}" in table and f"{tested['aji']:.3f}" in table
    assert [line for line in report.splitlines() if line.startswith("| previous")][0].count("| - ") >= 2
    assert "## Scale sweep" in report and "2x" in report and "python -m training.evaluate --model M" in report
    assert (out / "test_overlays.png").is_file() and "licence" in report


def test_report_recipe_names_the_encoder_training_and_the_modality_sampling():
    best = preset("best")
    assert fine_tune_note(best) == "fine-tuned whole (its BatchNorm layers fixed, in inference mode)"
    assert fine_tune_note(replace(best, fine_tune_from="block_3_expand", freeze_encoder_bn=False)).startswith(
        "fine-tuned from `block_3_expand` (its trainable BatchNorm")
    assert fine_tune_note(replace(best, fine_tune=False)) == "frozen (BatchNorm in inference mode)"
    assert "size ** 0.5" in sampling_note(best)
    assert "equally from each modality" in sampling_note(replace(best, balance_power=1.0))
    assert "equally likely" in sampling_note(replace(best, balance_modalities=False))


def test_cli_reports_bad_input_without_a_traceback(tile_model_dir: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="model folder not found"):
        evaluate_main(["--model", str(tmp_path / "absent"), "--data", str(tmp_path), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="no sample folders"):  # a data folder without images
        evaluate_main(["--model", str(tile_model_dir), "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_robustness_scores_each_change_through_the_service_path(tile_model_dir: Path, dataset_dir: Path,
                                                                tmp_path: Path):
    out = tmp_path / "robustness.md"
    robustness_main(["--model", str(tile_model_dir), "--data", str(dataset_dir), "--changes", "none", "invert",
                     "--out", str(out)])
    text = out.read_text()
    assert "`none`: the image as stored" in text and "`invert`: inverted" in text
    table = [line for line in text.splitlines() if line.startswith("| none") or line.startswith("| invert")]
    assert len(table) == 2
    # the unchanged row is the evaluation's own score of the same model
    summary = evaluate_model(tile_model_dir, dataset_dir, tmp_path / "eval")
    assert table[0].split(" | ")[2] == f"{summary['dsb_score']:.3f}"
    assert not list(tmp_path.glob("*.tmp"))


def test_robustness_changes_keep_the_image_format():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    for name, (_, change) in CHANGES.items():
        changed = change(image, np.random.default_rng(1))
        assert changed.shape == image.shape and changed.dtype == np.uint8, name
        assert (name == "none") == np.array_equal(changed, image), name
    noise = CHANGES["noise_8"][1]  # seeded per image: the same image gets the same noise in every run
    assert np.array_equal(noise(image, np.random.default_rng([0, 3])), noise(image, np.random.default_rng([0, 3])))


def test_robustness_reports_bad_input_without_a_traceback(tmp_path: Path):
    out = tmp_path / "r.md"
    with pytest.raises(SystemExit, match="model folder not found"):
        robustness_main(["--model", str(tmp_path / "absent"), "--data", str(tmp_path), "--out", str(out)])
    assert not out.exists()


def test_report_recipe_names_the_optional_photometric_augmentations():
    best = preset("best")
    assert photometric_note(best) == ", H&E stain (HED optical density) jitter"
    assert photometric_note(replace(best, artefacts=True)).endswith(", defocus blur, strong noise and JPEG compression")
    assert photometric_note(replace(best, stain=False)) == ""


def test_report_says_where_a_fine_tuned_model_started():
    assert init_note({}) == ""  # trained from the encoder's weights
    start = {"model": "models/default", "git_commit": "abc123", "precision": "mixed_bfloat16",
             "training": {"epochs": 23, "steps_per_epoch": 200, "fit_seconds": 5976.0}}
    assert init_note({"init": start}) == ("fine-tuned from `models/default` (commit abc123; that model: 23 epochs x "
                                          "200 steps, fit 99.6 min, mixed_bfloat16), then ")
    # a model fine-tuned before its start's fit was recorded still names its start
    assert init_note({"init": {"model": "m"}}) == "fine-tuned from `m` (commit unknown), then "


def test_report_recipe_names_the_kept_cores():
    assert core_note(preset("best")) == ""
    assert "its 9 deepest pixels" in core_note(replace(preset("best"), core_pixels=9))
