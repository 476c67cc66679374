"""Score an exported model with the DSB2018 metric and AJI through the service's own code path.

    python -m training.evaluate --model runs/best/model --data ../shared/data/dsb2018/stage1_train
    python -m training.evaluate --model runs/best/model --data ../shared/data/monuseg/test --split all

``--data`` takes either layout (Kaggle's, or images/ + labels/) and may be given several times.

Each image is read from its PNG bytes by the service decoder and segmented by
``service.pipeline.segment``, exactly what ``POST /segment`` does. Writes ``report.md``,
``per_image.csv`` and ``worst.png`` (image, truth outlines, prediction outlines).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

from service.model import ModelLoadError, SegmentationModel
from service.runtime import PRECISIONS, RUNTIMES, RuntimeOptions
from service.pipeline import SegmentOptions, segment
from service.postprocess import (INSTANCE_DECODERS, PostprocessParams, has_rays, instances_from_probabilities,
                                 nucleus_probability)
from training import figures
from training.data import DataError, NucleiDataset, Source, load_sources, parse_source, sample_ids
from training.export import update_metadata
from training.matching import matched_predictions, overlaps, pooled_ap50, score_image
from training.split import MODALITIES, modality

FOREGROUND_GRID = (0.45, 0.55, 0.6, 0.65, 0.7, 0.75)
SEED_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # P(interior), or the normalised distance output
SIGMA_GRID = (0.0, 1.0)
NMS_GRID = (0.3, 0.4, 0.5)  # StarDist's largest overlap (IoU) between two kept polygons
BORDER_GRID = (0, 20, 30, 50, 80)  # smallest seedless piece at the image's edge kept as a nucleus (0: none)
SPLITS = ("validation", "training", "all")  # training: the images the model trained on (see split_samples)


DataSpec = Path | str | Source


def as_sources(data: DataSpec | list[DataSpec]) -> list[DataSpec]:
    """One data folder or several, as a list (the functions here take either)."""
    return list(data) if isinstance(data, (list, tuple)) else [data]


def split_samples(model: SegmentationModel, data: DataSpec | list[DataSpec], split: str) -> NucleiDataset:
    """The images of ``split`` in the data folders: "validation" as the model's metadata records it
    (of the folders given, the images whose ids it lists), "training" (the images it was trained
    on, as recorded for a model trained on a share of them, else the rest of the folders: how well
    the model fits its own images), or "all" (an external test set)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} ({', '.join(SPLITS)})")
    sources = [parse_source(spec) for spec in as_sources(data)]
    if split == "all":
        return load_sources(sources)
    recorded = model.spec.metadata.get("split", {})
    ids = recorded.get("validation_ids")
    if not ids:
        raise ModelLoadError(f"model {model.model_dir} records no validation split; use --split all")
    present = {i for source in sources for i in sample_ids(source)}  # listed, not decoded
    names = ", ".join(s.name for s in sources)
    validation = [i for i in ids if i in present]
    if not validation:  # a folder the model never saw: its "complement" would be all of it
        raise DataError(f"none of the model's {len(ids)} validation ids is in {names}"
                        f" (e.g. {ids[0]}); for an external test set use --split all")
    if split == "validation":
        return load_sources(sources, ids=set(validation))
    trained = recorded.get("training_ids")
    if not trained:
        return load_sources(sources, ids=present - set(ids))
    kept = [i for i in trained if i in present]  # the recorded share may span sources not given here
    if not kept:
        raise DataError(f"none of the model's {len(trained)} training ids is in {names} (e.g. {trained[0]})")
    return load_sources(sources, ids=set(kept))


def evaluate_model(model_dir: Path, data: DataSpec | list[DataSpec], out_dir: Path, split: str = "validation",
                   options: SegmentOptions = SegmentOptions(), worst: int = 6,
                   runtime: RuntimeOptions = RuntimeOptions()) -> dict:
    """Segment every image of the split through ``runtime``, score it, write the report; return the summary."""
    model = SegmentationModel.load(model_dir, runtime)
    model.warm()
    dataset = split_samples(model, data, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, predictions, confidence = score_samples(dataset, model, options)
    summary = summarise(rows)
    summary["nucleus_probability_auc"] = ranking_auc(*confidence)
    summary.update({"model": str(model_dir), "split": split, "options": asdict(options), "runtime": model.serving()})
    write_csv(rows, out_dir / "per_image.csv")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    worst_figure(dataset, predictions, rows, out_dir / "worst.png", worst)
    (out_dir / "report.md").write_text(markdown_report(summary, rows))
    print(markdown_table([summary_row("model", summary)]))
    return summary


def score_samples(dataset: NucleiDataset, model: SegmentationModel, options: SegmentOptions = SegmentOptions(),
                  change: Callable[[np.ndarray, int], np.ndarray] | None = None
                  ) -> tuple[list[dict], dict, tuple[np.ndarray, np.ndarray]]:
    """Segment and score every image: (one row per image, predicted labels by id, and over all
    predicted nuclei their ``nucleus_probability`` and whether they match a true nucleus at IoU 0.5).

    ``change(image, index)`` alters each image before it is segmented (``training.robustness``);
    the truth, and the modality recorded for the row, are the original image's.
    """
    rows, predictions, probability, matched = [], {}, [], []
    for index, sample in enumerate(dataset.samples):
        image = sample.image if change is None else change(sample.image, index)
        start = time.perf_counter()
        result = segment(image, model, options)
        seconds = time.perf_counter() - start
        counts = overlaps(sample.labels, result.labels)
        score = score_image(sample.labels, result.labels, counts)
        predictions[sample.id] = result.labels
        probability.append(nucleus_probability(result.labels, result.probabilities))
        matched.append(matched_predictions(sample.labels, result.labels, iou=counts.iou))
        rows.append({"id": sample.id, "source": sample.source, "modality": modality(sample.image),
                     "height": sample.image.shape[0],
                     "width": sample.image.shape[1], "scale": round(result.scale, 3), "seconds": round(seconds, 3),
                     **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(score).items()}})
    return rows, predictions, (np.concatenate(probability), np.concatenate(matched))


def ranking_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """How often a positive outscores a negative (ties half): the ROC AUC, from the Mann-Whitney U.

    For the service's ``nucleus_probability``: 0.5 would make it useless for sorting out doubtful
    nuclei, 1 would tell every false prediction from every right one. NaN without both kinds.
    """
    positives, negatives = scores[positive], scores[~positive]
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    return float(mannwhitneyu(positives, negatives).statistic / (positives.size * negatives.size))


def summarise(rows: list[dict]) -> dict:
    """Means over images, overall, per modality and per source, plus speed."""
    def mean(key: str, subset: list[dict]) -> float:
        return float(np.mean([r[key] for r in subset])) if subset else float("nan")

    def pooled(subset: list[dict]) -> float:
        return pooled_ap50((r["tp50"], r["fp50"], r["fn50"]) for r in subset)

    megapixels = sum(r["height"] * r["width"] for r in rows) / 1e6
    summary = {
        "images": len(rows),
        "dsb_score": mean("score", rows),
        "ap50": mean("ap50", rows),
        "aji": mean("aji", rows),
        "pooled_ap50": pooled(rows),
        "pixel_iou": mean("pixel_iou", rows),
        "dice": mean("dice", rows),
        "true_nuclei": int(sum(r["n_true"] for r in rows)),
        "predicted_nuclei": int(sum(r["n_pred"] for r in rows)),
        "seconds_per_megapixel": float(sum(r["seconds"] for r in rows) / max(megapixels, 1e-9)),
        "per_modality": {},
        "per_source": {},
    }

    def part(subset: list[dict]) -> dict:
        return {"images": len(subset), "dsb_score": mean("score", subset), "ap50": mean("ap50", subset),
                "aji": mean("aji", subset), "pooled_ap50": pooled(subset)}

    for name in MODALITIES:
        subset = [r for r in rows if r["modality"] == name]
        if subset:
            summary["per_modality"][name] = part(subset)
    for name in sorted({r.get("source", "") for r in rows}):
        summary["per_source"][name] = part([r for r in rows if r.get("source", "") == name])
    return summary


def summary_row(name: str, s: dict) -> dict:
    per = s["per_modality"]
    return {"model": name, "DSB2018 score": f"{s['dsb_score']:.3f}", "AP@0.5": f"{s['ap50']:.3f}",
            "AJI": f"{s['aji']:.3f}",
            **{f"{m} (n={per[m]['images']})": f"{per[m]['dsb_score']:.3f}" for m in MODALITIES if m in per},
            "pixel IoU": f"{s['pixel_iou']:.3f}", "nuclei true/pred": f"{s['true_nuclei']}/{s['predicted_nuclei']}",
            "s per MP": f"{s['seconds_per_megapixel']:.2f}"}


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(summary: dict, rows: list[dict]) -> str:
    worst = sorted(rows, key=lambda r: r["score"])[:10]
    return "\n\n".join([
        f"# Evaluation of `{summary['model']}` on the {summary['split']} split ({summary['images']} images)",
        markdown_table([summary_row("model", summary)]),
        source_table(summary),
        "DSB2018 score: mean over images of the mean over IoU thresholds 0.50..0.95 of TP/(TP+FP+FN); "
        "AP@0.5 is that ratio at IoU 0.5; AJI the aggregated Jaccard index (MoNuSeg's metric), mean over "
        "images. Seconds per megapixel include decoding-free segmentation only.",
        pooled_note(summary),
        f"Per-nucleus confidence: a predicted nucleus that matches a true one (IoU > 0.5) has a higher "
        f"`nucleus_probability` (its mean P(nucleus), in the service's JSON) than a false one in "
        f"{summary['nucleus_probability_auc']:.3f} of such pairs (ROC AUC).",
        "## Worst images",
        markdown_table([{k: r[k] for k in ("id", "modality", "score", "ap50", "n_true", "n_pred", "scale")}
                        for r in worst]),
        "![worst images](worst.png)",
    ]) + "\n"


def source_table(summary: dict) -> str:
    """Scores per data source (where images came from several), so no source hides behind another."""
    return markdown_table([{"source": name, "images": v["images"], "DSB2018 score": f"{v['dsb_score']:.3f}",
                            "AP@0.5": f"{v['ap50']:.3f}", "AJI": f"{v['aji']:.3f}"}
                           for name, v in summary["per_source"].items()])


def pooled_note(summary: dict) -> str:
    """The pooled AP@0.5 sentence of the report: the number published DSB2018 results quote."""
    per = ", ".join(f"{name} {values['pooled_ap50']:.3f}" for name, values in summary["per_modality"].items())
    return (f"Pooled AP@0.5 (TP, FP and FN summed over all images before the ratio, every nucleus weighing "
            f"alike, as StarDist's paper counts): {summary['pooled_ap50']:.3f} ({per}).")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def worst_figure(dataset: NucleiDataset, predictions: dict, rows: list[dict], path: Path, count: int) -> None:
    by_id = {s.id: s for s in dataset.samples}
    worst = sorted(rows, key=lambda r: r["score"])[:count]
    images = [by_id[r["id"]].image for r in worst]
    figures.image_grid(
        [images,
         [figures.outline_overlay(img, by_id[r["id"]].labels, (0, 255, 0)) for img, r in zip(images, worst)],
         [figures.outline_overlay(img, predictions[r["id"]], (255, 0, 255)) for img, r in zip(images, worst)]],
        ["image", "truth", "prediction"], path,
        col_titles=[f"{r['modality']} {r['score']:.2f}" for r in worst],
    )


#: A modality gets a decoding of its own only with at least this many validation images ...
MIN_MODALITY_IMAGES = 20
#: ... and when that decoding beats the overall one on them by at least this much DSB2018 score.
MIN_MODALITY_GAIN = 0.005

Cached = list[tuple[np.ndarray, np.ndarray]]  # (truth labels, probabilities) per validation image


def tune_thresholds(model_dir: Path, data: DataSpec | list[DataSpec], limit: int | None = None,
                    runtime: RuntimeOptions = RuntimeOptions()) -> dict:
    """Pick the decoding maximising the DSB2018 score on validation and store it in the model metadata.

    Probabilities are computed once per image (the scale chosen with the current thresholds).
    First every foreground/seed threshold pair and seed smoothing of the watershed is decoded and
    scored, then, with the best of them, the smallest seedless piece at the image's edge kept as
    a nucleus (``BORDER_GRID``; a second stage, so the grid stays small). A model with StarDist
    rays then also tries polygon decoding (candidate threshold x NMS overlap, alone or inside that
    foreground), and the best of all wins.

    Then each modality with at least ``MIN_MODALITY_IMAGES`` validation images is tuned on its own
    images from the same first-stage scores: where its own decoding beats the overall one there by
    ``MIN_MODALITY_GAIN``, it is stored under ``postprocess_by_modality`` and the service uses it
    for images of that modality (dense, touching H&E nuclei want other thresholds than sparse
    fluorescence; a decoding is a few thresholds, so 20 images are enough to choose it).

    The probabilities come from ``runtime``: tune through the precision that will serve.
    """
    model = SegmentationModel.load(model_dir, runtime)
    dataset = split_samples(model, data, "validation")
    samples = dataset.samples[:limit] if limit else dataset.samples
    cached = [(s.labels, segment(s.image, model).probabilities) for s in samples]
    kinds = np.array([modality(s.image) for s in samples])
    base = replace(model.spec.postprocess, instances="watershed")
    grid = [replace(base, foreground_threshold=fg, seed_threshold=seed, seed_sigma=sigma)
            for fg, seed, sigma in itertools.product(FOREGROUND_GRID, SEED_GRID, SIGMA_GRID)]
    first_stage = score_matrix(cached, grid)
    score, best = choose_decoding(cached, grid, first_stage)
    chosen = {**asdict(best), "tuned_on": f"validation split ({len(samples)} images), DSB2018 score {score:.4f}"}
    by_modality = {}
    for name in MODALITIES:
        members = np.flatnonzero(kinds == name)
        if members.size < MIN_MODALITY_IMAGES:
            continue
        subset = [cached[k] for k in members]
        overall = float(score_matrix(subset, [best])[0, :, 0].mean())
        own_score, own = choose_decoding(subset, grid, first_stage[:, members])
        print(f"{name} ({members.size} images): own decoding {own_score:.4f} vs overall {overall:.4f}")
        if own_score >= overall + MIN_MODALITY_GAIN:
            by_modality[name] = {**asdict(own), "tuned_on": (
                f"{members.size} {name} validation images, DSB2018 score {own_score:.4f} (overall decoding "
                f"{overall:.4f})")}
    update_metadata(model_dir, {"postprocess": chosen, "postprocess_by_modality": by_modality})
    print(f"decoding: {best} -> validation DSB2018 score {score:.4f}; own decodings for {sorted(by_modality) or 'none'}")
    return chosen


def choose_decoding(cached: Cached, grid: list[PostprocessParams],
                    first_stage: np.ndarray) -> tuple[float, PostprocessParams]:
    """The best decoding on ``cached``: the best of ``grid`` (whose scores ``first_stage`` holds), then its
    edge-piece size, then, for a model with rays, polygon decodings that beat it."""
    score, best = pick(grid, first_stage)
    border = [replace(best, border_min_size=size) for size in BORDER_GRID]
    score, best = pick(border, score_matrix(cached, border))
    if has_rays(cached[0][1]):
        for kind in INSTANCE_DECODERS[1:]:
            candidates = [replace(best, instances=kind, candidate_threshold=candidate, nms_threshold=nms)
                          for candidate, nms in itertools.product(SEED_GRID, NMS_GRID)]
            polygon_score, polygons = pick(candidates, score_matrix(cached, candidates))
            if polygon_score > score:
                score, best = polygon_score, polygons
    return score, best


def score_matrix(cached: Cached, candidates: list[PostprocessParams]) -> np.ndarray:
    """``(candidates, images, 2)``: the DSB2018 score and AP@0.5 of every candidate decoding on every image."""
    return np.array([[(s.score, s.ap50) for s in (score_image(t, instances_from_probabilities(p, params))
                                                  for t, p in cached)] for params in candidates]).reshape(
        len(candidates), len(cached), 2)


def pick(candidates: list[PostprocessParams], scores: np.ndarray) -> tuple[float, PostprocessParams]:
    """(mean DSB2018 score, parameters) of the candidate whose ``score_matrix`` rows score best on average."""
    means = scores.mean(axis=1)
    k, top = int(np.argmax(means[:, 0])), int(np.argmax(means[:, 1]))
    print(f"best {candidates[k].instances}: DSB2018 score {means[k, 0]:.4f}, AP@0.5 {means[k, 1]:.4f} ({candidates[k]})")
    # The choice maximises the DSB2018 score; whoever weighs AP@0.5 sees what the grid could give it.
    print(f"  highest AP@0.5 in this grid: {means[top, 1]:.4f} (DSB2018 score {means[top, 0]:.4f}; {candidates[top]})")
    return float(means[k, 0]), candidates[k]


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--runtime / --precision / --threads, as the service's NUCLEI_RUNTIME / NUCLEI_PRECISION / NUCLEI_THREADS."""
    defaults = RuntimeOptions()
    parser.add_argument("--runtime", choices=RUNTIMES, default=defaults.runtime,
                        help=f"network runtime, as NUCLEI_RUNTIME (default {defaults.runtime})")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help=f"network precision, as NUCLEI_PRECISION (default {defaults.precision})")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="network threads (default 0: the CPUs this process may use)")


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """The :class:`RuntimeOptions` of :func:`add_runtime_arguments`' flags."""
    return RuntimeOptions(args.runtime, args.precision, args.threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model folder")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="a folder in Kaggle's DSB2018 layout or images/ + labels/; repeat for several sources")
    parser.add_argument("--split", default="validation", choices=SPLITS,
                        help="validation (default), training (the images the model trained on: does it fit them?) "
                             "or all")
    parser.add_argument("--out", type=Path, help="report folder (default: MODEL/../evaluation)")
    parser.add_argument("--tiling", action=argparse.BooleanOptionalAction, default=None,
                        help="native-resolution tiles (default: the model's mode); --no-tiling resizes")
    parser.add_argument("--tta", action="store_true", help="test-time flips")
    parser.add_argument("--no-auto-scale", action="store_true", help="skip rescaling to the canonical nucleus size")
    parser.add_argument("--tune", action="store_true", help="tune thresholds on validation first")
    parser.add_argument("--max-tile-size", type=int, default=SegmentOptions.max_tile_size,
                        help=f"largest tile side, as the service's NUCLEI_MAX_TILE_SIZE (default "
                             f"{SegmentOptions.max_tile_size})")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    out = args.out or args.model.parent / "evaluation"
    try:
        options = SegmentOptions(tiling=args.tiling, tta=args.tta, auto_scale=not args.no_auto_scale,
                                 max_tile_size=args.max_tile_size)
        runtime = runtime_options(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        if args.tune:
            tune_thresholds(args.model, args.data, runtime=runtime)
        evaluate_model(args.model, args.data, out, args.split, options, runtime=runtime)
    except (DataError, ModelLoadError) as error:  # the user's input, not a bug: a message, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
