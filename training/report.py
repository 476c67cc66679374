"""Write a shipped model's REPORT.md from its run folders (nothing typed by hand).

    python -m training.report --best runs/best --reference runs/reference \\
        --data ../shared/data/dsb2018/stage1_train --out models/default \\
        --evaluations runs/eval --test ../shared/data/monuseg/test --sweep docs/scale_sweep.json

Reads each run's ``metrics.json``, ``model/metadata.json`` and ``evaluation/summary.json``, and the
compared models' evaluations (``--evaluations``), copies the figures next to the report, and draws
the overlay figures: the API's own ``format=overlay`` rendering for one validation image of each
modality, and truth beside prediction for three images of the external test set.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from service.encode import overlay_png
from service.model import METADATA_FILE, SegmentationModel
from service.pipeline import SegmentOptions, segment
from service.postprocess import RAY_GRID, PostprocessParams
from training.config import TrainConfig
from training.data import list_sample_dirs, load_sample
from training.evaluate import markdown_table
from training.figures import image_grid, outline_overlay
from training.split import MODALITIES, modality
from training.targets import SMALL_FRACTION


def load_run(run: Path) -> dict:
    return {
        "metrics": json.loads((run / "metrics.json").read_text()),
        "metadata": json.loads((run / "model" / "metadata.json").read_text()),
        "summary": json.loads((run / "evaluation" / "summary.json").read_text()),
    }


def model_metadata(folder: Path) -> dict:
    """The metadata of a run's model, or of an exported model folder itself (a reference taken from
    the repository's history, e.g. ``git archive``, has no run folder around it)."""
    own = folder / METADATA_FILE
    return json.loads((own if own.is_file() else folder / "model" / METADATA_FILE).read_text())


def overlay_figure(model_dir: Path, data_dir: Path, ids: list[str], path: Path) -> list[str]:
    """Image and API overlay for the first validation image of each modality; returns their ids."""
    model = SegmentationModel.load(model_dir)
    by_name = {d.name: d for d in list_sample_dirs(data_dir)}
    chosen, samples = [], []
    for wanted in MODALITIES:
        for sample_id in ids:
            sample = load_sample(by_name[sample_id])
            if modality(sample.image) == wanted and sample.labels.max() > 3:
                chosen.append(sample_id)
                samples.append(sample)
                break
    overlays = [np.asarray(Image.open(io.BytesIO(overlay_png(s.image, segment(s.image, model).labels))))
                for s in samples]
    image_grid([[s.image for s in samples], overlays], ["image", "overlay (format=overlay)"], path,
               col_titles=[modality(s.image) for s in samples])
    return chosen


def decoder_note(cfg: TrainConfig) -> str:
    """How many refine convolutions follow each skip join (none in a pix2pix-only decoder), and the full-resolution level."""
    convs = cfg.decoder_convs
    note = f", each skip join followed by {convs} 3x3 conv-BN-ReLU block{'s' if convs > 1 else ''}" if convs else ""
    if cfg.full_res_filters:
        note += (f", then a full-resolution level of {cfg.full_res_filters} filters joined to a 3x3 conv"
                 " of the input")
    return note


#: The quality issue's targets on the validation split: summary key -> (name, minimum).
TARGETS = {"dsb_score": ("DSB2018 score", 0.61)}


def target_note(summary: dict) -> str:
    """One sentence: are the validation targets met, measured against ``summary``."""
    missed = [f"{k} {summary[k]:.3f} < {v}" for k, (_, v) in TARGETS.items() if summary[k] < v]
    goal = f"The validation target ({', '.join(f'{name} >= {v:.2f}' for name, v in TARGETS.values())}) is"
    return f"{goal} NOT met: {', '.join(missed)}." if missed else f"{goal} met."


def extra_weight_note(cfg: TrainConfig) -> str:
    """The extra loss weights where nuclei touch and on small nuclei, where the recipe used them (empty otherwise)."""
    notes = [(cfg.contact_weight, "where two nuclei touch: their rims and the gap between them"),
             (cfg.small_weight, f"on nuclei under {SMALL_FRACTION} of their image's median area")]
    return "".join(f", times {weight} {where}" for weight, where in notes if weight != 1.0)


def core_note(cfg: TrainConfig) -> str:
    """The interior every nucleus keeps however small, where the recipe used it (empty otherwise)."""
    return f", every nucleus keeping at least its {cfg.core_pixels} deepest pixels as interior" if cfg.core_pixels else ""


def fine_tune_note(cfg: TrainConfig) -> str:
    """Which part of the encoder was trained, and how its BatchNorm layers behaved in training."""
    if not cfg.fine_tune:
        return "frozen (BatchNorm in inference mode)"
    part = f"fine-tuned from `{cfg.fine_tune_from}`" if cfg.fine_tune_from else "fine-tuned whole"
    if cfg.freeze_encoder_bn:
        return f"{part} (its BatchNorm layers fixed, in inference mode)"
    return f"{part} (its trainable BatchNorm layers normalising by each batch's statistics in training)"


def photometric_note(cfg: TrainConfig) -> str:
    """The optional photometric augmentations a run had, after the ones every preset run has."""
    return (", H&E stain (HED optical density) jitter" if cfg.stain else "") + (
        ", defocus blur, strong noise and JPEG compression" if cfg.artefacts else "")


def sampling_note(cfg: TrainConfig) -> str:
    """How crops were drawn across modalities."""
    if not cfg.balance_modalities:
        return "every training image equally likely to give a crop"
    if cfg.balance_power == 1.0:
        return "crops drawn equally from each modality (fluorescence, bright-field, stained tissue)"
    power = cfg.balance_power
    return (f"crops drawn per group of source and modality, a group getting crops ~ its size ** {1 - power:g} "
            f"(its size: its area in training crops), so rare modalities and large images are oversampled")


def distance_note(config: TrainConfig) -> str:
    """The distance output, where the model has one (it changes what seeds the watershed)."""
    if not config.distance_output:
        return ""
    head = (f", in a branch of its own of {config.distance_head} 3x3 conv-BN-ReLU" if config.distance_head
            else ", sharing the class logits' final layer")
    rays = "" if not config.rays else (
        f"; plus StarDist's distances from each nucleus pixel to its edge along {config.rays} rays (linear, "
        f"mean absolute error weighted by the distance target, loss weight {config.ray_weight})")
    return (f"; plus each nucleus' distance to its own edge, divided by its largest (sigmoid output{head}, loss "
            f"weight {config.distance_weight}){rays}")


def decoding_note(post: PostprocessParams, seed_map: str) -> str:
    """How the instances are decoded: a seeded watershed, or StarDist's polygons (alone or as markers)."""
    if post.instances == "watershed":
        edge = (f", and seedless foreground pieces of at least {post.border_min_size} px at the image's edge (nuclei "
                "whose middle lies outside it) are kept as nuclei" if post.border_min_size else "")
        return (f"a watershed seeded by {seed_map} > {post.seed_threshold} (smoothed with a Gaussian of "
                f"{post.seed_sigma} px) over foreground probability > {post.foreground_threshold} separates "
                f"touching nuclei{edge}")
    polygons = (f"star-convex polygons proposed where the distance output exceeds {post.candidate_threshold} (on a "
                f"{RAY_GRID}-px grid), with non-maximum suppression above IoU {post.nms_threshold},")
    if post.instances == "polygons":
        return f"{polygons} are the nuclei"
    return (f"{polygons} mark the nuclei, and a watershed gives each its pixels of the foreground "
            f"(probability > {post.foreground_threshold})")


#: The evaluation sets of the report's comparison table, as folders of ``--evaluations MODEL/SET``.
EVALUATION_SETS = {"dsb_val": "DSB2018 validation", "monuseg_val": "MoNuSeg validation",
                   "monuseg_test": "MoNuSeg test (external)"}
#: The models compared, as folders of ``--evaluations``, with their names in the table.
COMPARED = {"reference": "reference (128x128 resize, 2 classes, DSB2018)",
            "previous": "previous shipped (DSB2018 only)", "shipped": "shipped (this model)"}


def read_evaluations(folder: Path | None, best_run: Path, reference_run: Path) -> dict[str, dict[str, dict]]:
    """``{model: {set: summary}}`` from ``folder/MODEL/SET/summary.json``; without a folder, each run's
    own ``evaluation/`` as its validation score (a run scored on one data set)."""
    if folder is None:
        if not (reference_run / "evaluation" / "summary.json").is_file():
            raise ValueError(f"{reference_run} has no evaluation/summary.json (a bare model folder): "
                             "give --evaluations with its scores")
        return {"reference": {"dsb_val": load_run(reference_run)["summary"]},
                "shipped": {"dsb_val": load_run(best_run)["summary"]}}
    found: dict[str, dict[str, dict]] = {}
    for model in COMPARED:
        for name in EVALUATION_SETS:
            path = folder / model / name / "summary.json"
            if path.is_file():
                found.setdefault(model, {})[name] = json.loads(path.read_text())
    return found


def comparison_table(evaluations: dict[str, dict[str, dict]]) -> str:
    """One row per model: DSB2018 validation overall and per modality, beside MoNuSeg's AJI / DSB / AP@0.5."""
    rows = []
    for model, name in COMPARED.items():
        sets = evaluations.get(model, {})
        if not sets:
            continue
        row = {"model": name}
        val = sets.get("dsb_val")
        row["DSB2018 val score"] = f"{val['dsb_score']:.3f}" if val else "-"
        row["AP@0.5"] = f"{val['ap50']:.3f}" if val else "-"
        for modality_name in MODALITIES:
            part = (val or {}).get("per_modality", {}).get(modality_name)
            row[f"{modality_name}" + (f" (n={part['images']})" if part else "")] = f"{part['dsb_score']:.3f}" if part else "-"
        mval = sets.get("monuseg_val")
        row["MoNuSeg val AJI"] = f"{mval['aji']:.3f}" if mval else "-"
        test = sets.get("monuseg_test")
        for key, label in (("aji", "AJI"), ("dsb_score", "DSB"), ("ap50", "AP@0.5")):
            row[f"MoNuSeg test {label}"] = f"{test[key]:.3f}" if test else "-"
        rows.append(row)
    # column names carry the image counts of the first model that has them
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return markdown_table([{k: r.get(k, "-") for k in keys} for r in rows]) if rows else ""


def sources_note(metadata: dict) -> str:
    """Every training source with its licence (older models recorded one folder without one)."""
    data = metadata.get("data", {})
    sources = data.get("sources") or [{"name": data.get("path", "?"), "images": data.get("images"),
                                       "licence": "not recorded", "layout": "kaggle"}]
    return "\n".join(f"  - `{s['name']}` ({s['images']} images, {s['layout']} layout): licence {s['licence']}"
                     for s in sources)


def test_overlays(model_dir: Path, test_data: Path, path: Path, count: int = 3) -> list[str]:
    """Image, truth and prediction outlines for ``count`` external test images (evenly spread, by name)."""
    from training.data import load_dataset
    from training.matching import score_image

    model = SegmentationModel.load(model_dir)
    samples = load_dataset(test_data).samples
    picked = [samples[i] for i in np.linspace(0, len(samples) - 1, count).astype(int)]
    predictions = [segment(s.image, model).labels for s in picked]
    titles = [f"{s.id[:12]} AJI {score_image(s.labels, p).aji:.2f}" for s, p in zip(picked, predictions)]
    image_grid([[s.image for s in picked], [outline_overlay(s.image, s.labels, (0, 255, 0)) for s in picked],
                [outline_overlay(s.image, p, (255, 0, 255)) for s, p in zip(picked, predictions)]],
               ["image", "truth", "prediction"], path, col_titles=titles)
    return [s.id for s in picked]


def init_note(metadata: dict) -> str:
    """Where a fine-tuned model started (``train.init_record``), so its fit time reads as the second
    stage it is, not the whole recipe; empty for a model trained from the encoder's weights."""
    init = metadata.get("init")
    if not init:
        return ""
    start = init.get("training") or {}
    own = (f"; that model: {start['epochs']} epochs x {start['steps_per_epoch']} steps, fit "
           f"{start['fit_seconds'] / 60:.1f} min{', ' + init['precision'] if init.get('precision') else ''}"
           if {"epochs", "steps_per_epoch", "fit_seconds"} <= set(start) else "")
    return f"fine-tuned from `{init['model']}` (commit {init.get('git_commit') or 'unknown'}{own}), then "


def modality_decodings_note(metadata: dict, seed_map: str) -> str:
    """The decodings tuned for one modality alone (``postprocess_by_modality``), where there are any."""
    own = metadata.get("postprocess_by_modality") or {}
    return "".join(f"\n  For {name} images: {decoding_note(PostprocessParams.from_dict(params), seed_map)}; nuclei under "
                   f"{params.get('min_size')} px are dropped ({params.get('tuned_on', '')})."
                   for name, params in own.items())


def write_report(best_run: Path, reference_run: Path, data: Path | list[Path], out: Path,
                 evaluations: Path | None = None, test_data: Path | None = None, sweep: Path | None = None,
                 commands: Path | None = None) -> Path:
    """REPORT.md of the model in ``out`` from its run, the compared models' evaluations, the
    scale sweep and the commands that produced them (a text file copied in verbatim)."""
    best = load_run(best_run)
    if (out / "metadata.json").is_file():  # the shipped copy holds the tuned thresholds
        best["metadata"] = json.loads((out / "metadata.json").read_text())
    for name in ("curves.png", "predictions.png"):
        shutil.copy(best_run / name, out / name)
    shutil.copy(best_run / "evaluation" / "worst.png", out / "worst.png")
    val_ids = best["metadata"]["split"]["validation_ids"]
    dsb = data[0] if isinstance(data, (list, tuple)) else data
    chosen = overlay_figure(out, dsb, val_ids, out / "overlay_examples.png")
    tested = test_overlays(out, test_data, out / "test_overlays.png") if test_data else []
    # through the typed objects: fields an older model's metadata lacks take their defaults there
    cfg = TrainConfig.from_dict(best["metadata"]["training_config"])
    post = PostprocessParams.from_dict(best["metadata"]["postprocess"])
    tuned_on = best["metadata"]["postprocess"].get("tuned_on", "")
    m = best["metrics"]
    scores = read_evaluations(evaluations, best_run, reference_run)
    table = comparison_table(scores)
    same_split = set(model_metadata(reference_run)["split"]["validation_ids"]) <= set(val_ids)
    shipped_val = scores.get("shipped", {}).get("dsb_val", best["summary"])
    seed_map = "the distance output" if cfg.distance_output else "interior probability"
    outputs = "3 classes" + (" + distance" if cfg.distance_output else "") + (f" + {cfg.rays} rays" if cfg.rays else "")
    licences = best["metadata"].get("data", {}).get("licences", [])
    non_commercial = any("NC" in licence for licence in licences)
    sweep_text = ""
    if sweep is not None:
        from training.scale_sweep import SweepPoint, sweep_table

        record = json.loads(sweep.read_text())
        points = [SweepPoint(**p) for p in record["points"]]
        sweep_text = f"""## Scale sweep

{len({p.id for p in points})} validation images of at most 0.3 MP (seeded, stratified by modality), and their
labels, resized by each factor as if taken with another objective, then segmented with the automatic
size estimate and with `diameter` given (the true median nucleus diameter at that factor):

{sweep_table(points)}
"""
    commands_text = f"\n## Commands\n\n```bash\n{commands.read_text().strip()}\n```\n" if commands else ""
    text = f"""# Shipped model: U-Net, MobileNetV2 encoder, {outputs}, native-resolution tiles

## Scores

DSB2018 validation: {shipped_val['images']} images, the fixed split stored in `metadata.json` (seed
{cfg.seed}, stratified by source and modality; never used for training; used only to tune the
post-processing thresholds), the same DSB2018 images for every model here
({'the reference and this model share them' if same_split else 'the reference used a DIFFERENT split'}).
MoNuSeg validation: the MoNuSeg training images this model held out. MoNuSeg test: the challenge's
14 official test images, an external test set that no model trained or was tuned on. Scores come
from `python -m training.evaluate`, which runs the service's own decode -> normalise -> size ->
model -> post-process path.

{table}

DSB2018 score: per image, the mean over IoU thresholds 0.50..0.95 of TP/(TP+FP+FN), averaged over
images; per modality columns are DSB2018 validation images only. AP@0.5: that ratio at IoU 0.5.
AJI: MoNuSeg's aggregated Jaccard index, averaged over images.

{sweep_text}
## Data, licences and training

- Sources:
{sources_note(best['metadata'])}
- {'This model was trained on CC BY-NC-SA 4.0 data (MoNuSeg): it is for non-commercial use, and models derived from it share that licence. ' if non_commercial else ''}Retrain on CC0 data only: `python -m training.train --preset best --data ../shared/data/dsb2018/stage1_train --out runs/cc0`.
- {m['train_images']} training images.
- Training: {init_note(best['metadata'])}{m['epochs']} epochs x {m['steps_per_epoch']} steps of {cfg.batch_size} random
  {cfg.image_size}x{cfg.image_size} crops; fit {m['fit_seconds'] / 60:.1f} min
  ({m['train_images_per_second']} crops/s) on the 2-core CPU; {m['parameters']['trainable']:,} trainable of
  {m['parameters']['total']:,} parameters.
- Recipe: every image rescaled so its median nucleus is {cfg.canonical_diameter} px across;
  targets background / interior / boundary ({cfg.boundary_width} px rims{core_note(cfg)}, boundary loss weight
  {cfg.boundary_weight}{extra_weight_note(cfg)}){distance_note(cfg)}; ImageNet MobileNetV2 encoder {fine_tune_note(cfg)};
  decoder of pix2pix upsample blocks of
  {cfg.decoder_filters} filters{decoder_note(cfg)}; Adam {cfg.learning_rate} with cosine decay; augmentation:
  rotation, log-uniform zoom x/÷{1 + cfg.zoom}, flips, inversion, grayscale, channel shuffle, hue,
  saturation, contrast, gamma, noise{photometric_note(cfg)};
  {sampling_note(cfg)}; per-image
  percentile intensity stretch shared by training and serving. Precision:
  {cfg.precision} during training; the exported network computes in float32.
- Inference (`service.size`, `service.pipeline`): the image is stretched; with `diameter` given it is
  rescaled once so its nuclei are {cfg.canonical_diameter} px; otherwise their size is read off looks at
  half and then quarter scale (the coarsest where the nuclei are still at least 3/4 of the canonical
  size, i.e. large, decides), else off the native pass, and the image is run once more at the chosen scale where that is off by
  more than the 0.8-1.25 tolerance (the rescaled pass is kept only if it keeps at least half the
  foreground). Tiles are sized to the image (sides at most {SegmentOptions.max_tile_size} px,
  `NUCLEI_MAX_TILE_SIZE`; training saw {cfg.image_size}x{cfg.image_size} crops) with cosine blending;
  {decoding_note(post, seed_map)}; nuclei under {post.min_size} px are dropped. ({tuned_on}){modality_decodings_note(best['metadata'], seed_map)}

## Notes

- {target_note(shipped_val)}
- Fit time is wall time on the 2-core machine; `docs/training.md` says what else ran meanwhile.
- The tuning score in brackets above differs from the table's because tuning scores every
  threshold pair on probabilities computed once with the previous thresholds (which also chose
  each image's scale); the table re-runs everything with the tuned ones.
- Speed of a 1-megapixel image through the server: `docs/performance.md`
  (`python -m benchmarks.serve_bench`).
{commands_text}
## Figures

{'MoNuSeg test images (' + ', '.join(tested) + '), truth green, prediction magenta:' if tested else ''}

{'![MoNuSeg test overlays](test_overlays.png)' if tested else ''}

DSB2018 validation overlays (ids {', '.join(i[:12] for i in chosen)}), drawn by the API's `format=overlay`:

![overlays](overlay_examples.png)

Training curves (loss and pixel accuracy on 256x256 validation centre crops):

![curves](curves.png)

Validation crops, classes 0 background / 1 interior / 2 boundary:

![predictions](predictions.png)

Worst validation images (truth green, prediction magenta):

![worst](worst.png)
"""
    (out / "REPORT.md").write_text(text)
    return out / "REPORT.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--best", type=Path, required=True, help="run folder of the shipped model")
    parser.add_argument("--reference", type=Path, required=True,
                        help="run folder of the reference model, or the model folder itself (then with --evaluations)")
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="the training data; the first (DSB2018) gives the validation overlays")
    parser.add_argument("--out", type=Path, required=True, help="the shipped model folder (models/default)")
    parser.add_argument("--evaluations", type=Path,
                        help="folder of MODEL/SET/summary.json (MODEL: reference, previous, shipped; SET: dsb_val, "
                             "monuseg_val, monuseg_test) for the comparison table")
    parser.add_argument("--test", type=Path, help="external test set (images/ + labels/) for the overlay figure")
    parser.add_argument("--sweep", type=Path, help="training.scale_sweep's JSON")
    parser.add_argument("--commands", type=Path, help="text file of the commands that produced the numbers")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.best, args.reference, args.data, args.out, args.evaluations, args.test, args.sweep,
                           args.commands))
    except ValueError as error:  # a bare reference model folder without the scores the table needs
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
