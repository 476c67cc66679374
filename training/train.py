"""Train the U-Net on annotated images and export a served-ready model.

    python -m training.train --data ../shared/data/dsb2018/stage1_train --out runs/reference
    python -m training.train --preset best --data ../shared/data/dsb2018/stage1_train \
        --data ../shared/data/monuseg/train --out runs/best
    python -m training.train --init models/default --data MY_DATA --out runs/mine   # fine-tune

``--data`` takes a folder in Kaggle's DSB2018 layout or in the image + label-image layout
(``images/`` + ``labels/``), as often as there are sources; ``NAME=PATH`` names a source.

The run reads top to bottom: load -> split -> prepare targets -> augment -> build -> fit ->
export -> evaluate. RUN_DIR receives TensorBoard logs, curves, the architecture, a predictions
figure, ``metrics.json`` and the exported model in ``RUN_DIR/model``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import get_args, get_type_hints

import keras
import numpy as np

from service.model import METADATA_FILE
from service.normalise import normalise
from training import augment, figures
from training.config import PRESETS, TrainConfig, preset
from training.data import DataError, NucleiDataset, Source, load_sources, parse_source, resize_image
from training.export import build_metadata, export_model, load_serving_weights
from training.losses import pixel_accuracy, segmentation_loss
from training.model import (build_unet, encoder_layer_names, float32_copy, fine_tune_start, precision,
                            resolved_precision)
from training.split import group_of, sampling_probabilities, split_by_source, subsample_ids
from training.targets import CLASS_OF_CODE, make_target, scale_to_canonical

CLASS_NAMES = {2: ["background", "nucleus"], 3: ["background", "interior", "boundary"]}
#: Name of the distance output's channel, after the classes (metadata ``classes`` lists every output channel).
DISTANCE_CHANNEL = "distance"
#: Name prefix of StarDist's ray channels, after the distance output (ray k at angle 2 pi k / rays, StarDist's order).
RAY_CHANNEL = "ray"


@dataclass
class Prepared:
    """Network-ready arrays of one split: normalised images and class targets, plus groups."""

    ids: list[str]
    images: list[np.ndarray]
    targets: list[np.ndarray]
    groups: list[str]


def prepare(dataset: NucleiDataset, config: TrainConfig, groups: dict[str, str]) -> Prepared:
    """Normalise images and build targets, at the network's input size (resize) or canonical scale (tile)."""
    images, targets = [], []
    for sample in dataset.samples:
        image = normalise(sample.image, config.normalise)
        labels = sample.labels
        if config.inference == "resize":
            size = (config.image_size, config.image_size)
        else:
            factor = scale_to_canonical(labels, config.canonical_diameter) if config.canonical_diameter else 1.0
            size = (max(1, round(labels.shape[0] * factor)), max(1, round(labels.shape[1] * factor)))
        image = resize_image(image, size)
        labels = resize_image(labels, size, nearest=True)
        images.append(image)
        targets.append(make_target(labels, config.target, config.boundary_width, config.distance_output,
                                   rays=config.rays > 0, core=config.core_pixels))
    return Prepared(dataset.ids, images, targets, [groups[i] for i in dataset.ids])


def make_datasets(train: Prepared, val: Prepared, config: TrainConfig):
    """(train tf.data, validation tf.data, steps per epoch)."""
    if config.inference == "resize":
        train_ds = augment.resize_dataset(np.stack(train.images), np.stack(train.targets), config, training=True)
        val_ds = augment.resize_dataset(np.stack(val.images), np.stack(val.targets), config, training=False)
    else:
        crop_pixels = (config.image_size * 1.5) ** 2  # crop_dataset's crop, before rotation and zoom
        sizes = [max(1.0, image.shape[0] * image.shape[1] / crop_pixels) for image in train.images]
        probs = sampling_probabilities(train.groups, config.balance_modalities, config.balance_power, sizes)
        train_ds = augment.crop_dataset(train.images, train.targets, probs, config)
        val_x, val_y = augment.centre_crops(val.images, val.targets, config.image_size)
        val_ds = augment.resize_dataset(val_x, val_y, config, training=False)
    steps = config.steps_per_epoch or max(1, int(np.ceil(len(train.images) / config.batch_size)))
    return train_ds, val_ds, steps


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int = 1) -> None:
    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=0.05)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, use_ema=config.ema_momentum > 0,
                                        ema_momentum=config.ema_momentum or 0.99),
        loss=segmentation_loss(config),
        metrics=[pixel_accuracy(config)],
        jit_compile=False,  # measured: XLA on this 2-core CPU makes a training step ~3x slower
    )


def write_architecture(model: keras.Model, run_dir: Path) -> None:
    """Text summary always; a diagram where pydot and graphviz are installed."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), expand_nested=False)
    (run_dir / "model_summary.txt").write_text("\n".join(lines) + "\n")
    try:
        keras.utils.plot_model(model, to_file=str(run_dir / "model.png"), show_shapes=True)
    except Exception as exc:  # graphviz is optional
        print(f"note: no architecture diagram ({type(exc).__name__}: graphviz/pydot not available)")


def predictions_figure(model: keras.Model, val: Prepared, config: TrainConfig, path: Path, count: int = 4) -> None:
    """Image, true mask, predicted mask for a few validation images (network input scale)."""
    idx = np.linspace(0, len(val.images) - 1, num=min(count, len(val.images))).astype(int)
    x, y = augment.centre_crops([val.images[i] for i in idx], [val.targets[i] for i in idx], config.image_size)
    pred = np.argmax(model.predict(x.astype(np.float32), verbose=0)[..., :config.num_classes], axis=-1)
    y = CLASS_OF_CODE[y[..., 0]]
    figures.image_grid([list(x), list(y), list(pred)], ["image", "true mask", "predicted mask"], path,
                       cmaps=[None, "viridis", "viridis"])


def output_names(config: TrainConfig) -> list[str]:
    """One name per output channel: the classes, then the distance output if trained, then the rays."""
    return (CLASS_NAMES[config.num_classes] + ([DISTANCE_CHANNEL] if config.distance_output else [])
            + [f"{RAY_CHANNEL}_{k}" for k in range(config.rays)])


def count_params(model: keras.Model) -> dict[str, int]:
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(sum(np.prod(w.shape) for w in model.weights))
    return {"trainable": trainable, "total": total}


def train(config: TrainConfig, data: list[Path | str | Source], run_dir: Path, evaluate_after: bool = True,
          init: Path | None = None) -> dict:
    """The whole run; returns the metrics written to ``RUN_DIR/metrics.json``.

    ``data`` are the sources (folders in either layout); ``init`` an exported model whose weights
    the network starts from (fine-tuning; ``config`` must then have that model's architecture).
    """
    keras.utils.set_random_seed(config.seed)
    started = time.time()
    if config.precision == "auto":  # the metadata records the precision that ran, not "auto"
        config = replace(config, precision=resolved_precision("auto"))
        print(f"precision: auto -> {config.precision}"
              + ("" if config.precision != "float32" else " (no native bf16 here: no AVX512_BF16 / AMX / recent GPU)"))
    dataset = load_sources(list(data) if isinstance(data, (list, tuple)) else [data])
    run_dir.mkdir(parents=True, exist_ok=True)  # after the data loads: a bad --data leaves nothing behind
    groups = {s.id: group_of(s.source, s.image) for s in dataset.samples}
    train_ids, val_ids = split_by_source(dataset.ids, [s.source for s in dataset.samples],
                                         [groups[i] for i in dataset.ids], config.val_fraction, config.seed)
    train_ids = subsample_ids(train_ids, [groups[i] for i in train_ids], config.train_fraction, config.seed)
    print(f"data: {len(dataset)} images, {len(train_ids)} train / {len(val_ids)} validation "
          f"({time.time() - started:.1f} s to load)")
    for group in sorted(set(groups.values())):
        print(f"  {group}: {sum(groups[i] == group for i in train_ids)} train / "
              f"{sum(groups[i] == group for i in val_ids)} validation")
    train_set = prepare(dataset.subset(train_ids), config, groups)
    val_set = prepare(dataset.subset(val_ids), config, groups)
    train_ds, val_ds, steps = make_datasets(train_set, val_set, config)

    with precision(config.precision):
        model = build_unet(config)  # fixed input in resize mode, any size in tile mode
    if init is not None:
        load_serving_weights(model, init)
        print(f"weights: from {init}")
    compile_model(model, config, steps)
    write_architecture(model, run_dir)
    params = count_params(model)
    print(f"model: {params['trainable']:,} trainable of {params['total']:,} parameters")

    callbacks = [keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs")),
                 keras.callbacks.CSVLogger(str(run_dir / "history.csv"))]
    fit_start = time.time()
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, steps_per_epoch=steps,
                        callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2).history  # bar on a terminal, a line per epoch in logs
    fit_seconds = time.time() - fit_start

    figures.plot_history(history, run_dir / "curves.png")
    predictions_figure(model, val_set, config, run_dir / "predictions.png")
    metrics = {
        "epochs": config.epochs,
        "steps_per_epoch": steps,
        "fit_seconds": round(fit_seconds, 1),
        "train_images_per_second": round(config.epochs * steps * config.batch_size / fit_seconds, 2),
        "final": {k: float(v[-1]) for k, v in history.items()},
        "best_val_loss": float(min(history["val_loss"])),
        "parameters": params,
        "train_images": len(train_ids),
        "val_images": len(val_ids),
    }
    inference = {"mode": config.inference, "normalise": config.normalise,
                 "canonical_diameter": config.canonical_diameter, "tile_overlap": 32}
    postprocess = {"foreground_threshold": 0.5, "seed_threshold": 0.5, "min_size": config.min_size}
    start = init_record(init) if init is not None else None
    metadata = build_metadata(
        config.to_dict(), classes=output_names(config), inference=inference, postprocess=postprocess,
        extra={"split": split_record(config, train_ids, val_ids),
               "data": merged_data([data_record(dataset)] + ([start["data"]] if start else [])),
               **({"init": start} if start else {}),
               "validation_metrics": {k: v for k, v in metrics["final"].items() if k.startswith("val_")},
               "training": {k: metrics[k] for k in ("epochs", "steps_per_epoch", "fit_seconds",
                                                    "train_images_per_second", "parameters")}},
    )
    served = model if config.precision == "float32" else float32_copy(model, config)
    model_dir = export_network(served, config, run_dir / "model", metadata)
    metrics["total_seconds"] = round(time.time() - started, 1)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"exported {model_dir}; fit {fit_seconds:.0f} s, "
          f"{metrics['train_images_per_second']} training images/s")
    if evaluate_after:
        from training.evaluate import evaluate_model, tune_thresholds

        if config.num_classes == 3:
            tune_thresholds(model_dir, dataset.sources)
        evaluate_model(model_dir, dataset.sources, run_dir / "evaluation")
    return metrics


def export_network(network: keras.Model, config: TrainConfig, out: Path, metadata: dict) -> Path:
    """Export ``network`` of ``config`` for serving: a fixed input in resize mode, the class
    channels as softmax and the distance output (where it has one) as sigmoid."""
    return export_model(network, out, metadata, fixed_size=config.image_size if config.inference == "resize" else None,
                        softmax_channels=config.num_classes, sigmoid_channels=int(config.distance_output))


def data_record(dataset: NucleiDataset) -> dict:
    """What the metadata keeps of the training data: every source with its licence, plus totals.

    ``fingerprint`` is the one source's own (as models trained on one folder always recorded it),
    or a hash over all of them.
    """
    counts = {s.name: sum(x.source == s.name for x in dataset.samples) for s in dataset.sources}
    return sources_record([s.record(counts[s.name]) for s in dataset.sources])


def sources_record(sources: list[dict]) -> dict:
    """The ``data`` record of these source records (``Source.record``): totals, licences, a fingerprint."""
    combined = sources[0]["fingerprint"] if len(sources) == 1 else hashlib.sha256(
        "".join(f"{s['name']}:{s['fingerprint']}" for s in sources).encode()).hexdigest()[:16]
    return {"images": sum(s["images"] for s in sources), "fingerprint": combined, "sources": sources,
            "licences": sorted({s["licence"] for s in sources}),
            **({"path": sources[0]["path"]} if len(sources) == 1 else {})}


def merged_data(records: list[dict]) -> dict:
    """One ``data`` record of several models' (each source once): a fine-tuned model's, or an average's,
    names every source its weights learnt from, so its licences include theirs (a start model trained on
    non-commercial data makes its fine-tuned copies non-commercial too)."""
    unique: dict[tuple, dict] = {}
    for record in records:
        for source in record.get("sources", []):
            unique.setdefault((source["name"], source["fingerprint"]), source)
    return sources_record(list(unique.values())) if unique else records[0]


def init_record(init: Path) -> dict:
    """Provenance of a fine-tuned model: the model it started from, that model's training data and
    its own training (and, where it was fine-tuned too, its start's), so a chain of fits stays traceable."""
    metadata = json.loads((Path(init) / METADATA_FILE).read_text())
    return {"model": str(init), "git_commit": metadata.get("git_commit"), "data": metadata.get("data", {}),
            "training": metadata.get("training", {}),
            "precision": (metadata.get("training_config") or {}).get("precision"),
            **({"init": metadata["init"]} if "init" in metadata else {})}


def split_record(config: TrainConfig, train_ids: list[str], val_ids: list[str]) -> dict:
    """The split as the model's metadata keeps it: the validation ids, and the training ids when
    only a share of the rest was trained on (otherwise the rest of the data is the training split)."""
    record = {"seed": config.seed, "val_fraction": config.val_fraction, "validation_ids": val_ids}
    if config.train_fraction < 1.0:
        record["training_ids"] = train_ids
    return record


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type of a count of at least ``minimum``: a smaller one is a usage error, not a traceback."""
    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value
    return count


#: A count that may be 0 (conv blocks, filters).
non_negative = at_least(0)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="training data: a folder in Kaggle's DSB2018 layout or images/ + labels/; repeat for "
                             "several sources (each keeps its name, the split is stratified by source and modality)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="recipe (default: reference, or the --init model's own recipe)")
    parser.add_argument("--init", type=Path, metavar="MODEL",
                        help="fine-tune: start from this exported model's weights and recipe (e.g. models/default)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--encoder-weights", help="imagenet, none, or a .weights.h5 path")
    parser.add_argument("--fine-tune", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--fine-tune-from", metavar="LAYER",
                        help="first encoder layer to fine-tune (earlier ones stay frozen); 'all' for the whole encoder")
    parser.add_argument("--freeze-encoder-bn", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the encoder's BatchNorm layers fixed, in inference mode, while it is fine-tuned")
    parser.add_argument("--ema-momentum", type=float,
                        help="export an exponential moving average of the weights with this momentum per step (0: off)")
    parser.add_argument("--balance-power", type=float,
                        help="modality balance: a modality of n images gets crops ~ n ** (1 - power); 1: equal shares")
    parser.add_argument("--artefacts", action=argparse.BooleanOptionalAction, default=None,
                        help="augment with defocus blur, strong noise and JPEG compression (needs colour jitter)")
    parser.add_argument("--copy-paste", type=float,
                        help="chance (0-1) that a training crop gets some of its own nuclei pasted onto its background")
    parser.add_argument("--small-weight", type=float,
                        help="loss weight factor on nuclei under half their image's median area (1: none)")
    parser.add_argument("--dice-weight", type=float,
                        help="add this many times one minus the soft Dice of the nucleus classes (0: none)")
    parser.add_argument("--distance-weight", type=float,
                        help="train the distance output (4th channel) with this loss weight; 0 turns it off")
    parser.add_argument("--distance-head", type=non_negative,
                        help="3x3 conv blocks in the distance output's own branch (0: it shares the final layer)")
    parser.add_argument("--rays", type=non_negative,
                        help="StarDist rays per pixel (needs the distance output; 0: none)")
    parser.add_argument("--ray-weight", type=float, help="loss weight of the rays' mean absolute error")
    parser.add_argument("--canonical-diameter", type=float,
                        help="nucleus diameter (px) every image is rescaled to, in training and serving")
    parser.add_argument("--boundary-width", type=int,
                        help="3-class target: rim of each nucleus, in px at the canonical size, that is boundary")
    parser.add_argument("--core-pixels", type=non_negative,
                        help="3-class target: every nucleus keeps at least this many interior pixels (0: none)")
    parser.add_argument("--zoom", type=float,
                        help="zoom augmentation: scale factors log-uniform between 1/(1+Z) and 1+Z (0: none)")
    parser.add_argument("--decoder-convs", type=non_negative,
                        help="3x3 conv-BN-ReLU blocks after each decoder level's skip join (0: pix2pix decoder)")
    parser.add_argument("--full-res-filters", type=non_negative,
                        help="filters of a full-resolution decoder level joined to the input (0: none)")
    parser.add_argument("--precision", choices=get_args(get_type_hints(TrainConfig)["precision"]),
                        help="training arithmetic; mixed_bfloat16 needs a CPU with native bf16 (e.g. AVX512_BF16) to be fast")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--train-fraction", type=float,
                        help="train on this stratified share of the training split (a data-scaling check; default 1)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the DSB2018 evaluation at the end")
    args = parser.parse_args(argv)
    try:
        config = base_config(args.preset, args.init).override(
            epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, image_size=args.image_size,
            batch_size=args.batch_size, learning_rate=args.learning_rate, encoder_weights=args.encoder_weights,
            fine_tune=args.fine_tune, seed=args.seed, val_fraction=args.val_fraction,
            train_fraction=args.train_fraction, precision=args.precision,
            distance_weight=args.distance_weight, distance_head=args.distance_head, small_weight=args.small_weight,
            full_res_filters=args.full_res_filters, balance_power=args.balance_power,
            freeze_encoder_bn=args.freeze_encoder_bn, rays=args.rays, ray_weight=args.ray_weight,
            canonical_diameter=args.canonical_diameter, zoom=args.zoom, boundary_width=args.boundary_width,
            dice_weight=args.dice_weight, decoder_convs=args.decoder_convs,
            artefacts=args.artefacts, core_pixels=args.core_pixels, copy_paste=args.copy_paste,
            ema_momentum=args.ema_momentum,
        )
    except ValueError as error:  # settings that contradict each other
        parser.error(str(error))
    if args.fine_tune_from == "all":
        config = replace(config, fine_tune_from=None)
    elif args.fine_tune_from is not None:
        try:  # here, not after the data has loaded
            fine_tune_start(encoder_layer_names(), args.fine_tune_from)
        except ValueError as error:
            parser.error(str(error))
        config = replace(config, fine_tune_from=args.fine_tune_from)
    return config, args


def base_config(name: str | None, init: Path | None) -> TrainConfig:
    """The recipe before command-line overrides: the named preset, or the ``--init`` model's own.

    A fine-tuned network must have the architecture of the one it starts from, so ``--init``
    takes that model's recorded configuration; ImageNet weights are not loaded (they would be
    overwritten at once), and the weights are not averaged (a fine-tuning run is a few hundred steps:
    an average over the last thousand would stay near the start model; ``--ema-momentum`` sets one).
    The arithmetic is this machine's (``auto``), not the start model's: bf16 recorded on a CPU that
    has it would be emulated, 7.7x slower, on one that has not.
    """
    if init is None:
        return preset(name or "reference")
    if name is not None:
        raise ValueError("--preset and --init exclude each other: a fine-tuned model keeps its start model's recipe")
    path = Path(init) / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"--init {init}: no {METADATA_FILE} there (expected an exported model folder)")
    recorded = json.loads(path.read_text()).get("training_config")
    if not recorded:
        raise ValueError(f"--init {init}: its metadata records no training_config")
    return replace(TrainConfig.from_dict(recorded), encoder_weights="none", ema_momentum=0.0, precision="auto")


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    try:
        sources = [parse_source(spec) for spec in args.data]  # before anything is built: a bad --data is a message
        train(config, sources, args.out, evaluate_after=not args.no_evaluate, init=args.init)
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
