"""Weight averaging: one exported model whose weights are the mean of several of the same architecture.

    python -m training.average --model models/default --model runs/cont/model --out runs/soup

Averaging a model with its own fine-tuned continuation (a "model soup", Wortsman et al., ICML 2022;
WiSE-FT, Wortsman et al., CVPR 2022) often keeps what each gained, at no extra cost when it
serves: the result is one network of the same size. Every weight is averaged, the BatchNorm
running statistics too. The models must share the recipe's architecture and input fields, the
contract and the validation split. The result has the first model's contract and recipe, and the
training sources and licences of all; its decoding thresholds are the first model's until re-tuned
(``training.evaluate.tune_thresholds``), and no precision verdict carries over: a new network must
pass ``training.parity`` afresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from service.model import METADATA_FILE, ModelLoadError
from training.config import TrainConfig
from training.export import git_commit, stored_weights
from training.model import float32_network
from training.train import export_network, init_record, merged_data

#: The recipe's fields that decide the network's layers or what it is fed: models that differ in
#: any of them are not one architecture, even where their weights happen to have the same shapes.
ARCHITECTURE = ("image_size", "inference", "normalise", "input_scale", "target", "canonical_diameter",
                "decoder_filters", "decoder_convs", "full_res_filters", "distance_weight", "distance_head", "rays")
#: Metadata of the first model that does not describe the averaged network (verdicts, a start, a fit).
NOT_INHERITED = ("runtime", "init", "averaged_from", "precision", "openvino", "training", "validation_metrics")


def check_compatible(metadata: list[dict], names: list[str]) -> None:
    """Refuse models that are not one architecture with one contract and one validation split."""
    first = metadata[0]
    for other, name in zip(metadata[1:], names[1:]):
        for key in ARCHITECTURE:
            mine, theirs = first["training_config"].get(key), other["training_config"].get(key)
            if key == "distance_weight":  # only whether the output exists shapes the network
                mine, theirs = bool(mine), bool(theirs)
            if mine != theirs:
                raise ModelLoadError(f"{name} does not have the architecture of {names[0]}: "
                                     f"{key} {theirs!r} against {mine!r}")
        for key in ("classes", "input", "inference"):
            if other.get(key) != first.get(key):
                raise ModelLoadError(f"{name} does not have the contract of {names[0]}: its {key} differs")
        if set(other["split"]["validation_ids"]) != set(first["split"]["validation_ids"]):
            # the average is validated on one split: another input may have trained on its images
            raise ModelLoadError(f"{name} was validated on another split than {names[0]}")


def mean_weights(models: list[list[np.ndarray]], names: list[str]) -> list[np.ndarray]:
    """The element-wise mean; refused (naming the model) where any weight's count or shape differs."""
    first = models[0]
    for weights, name in zip(models[1:], names[1:]):
        if len(weights) != len(first):
            raise ModelLoadError(f"{name} does not have the architecture of {names[0]}: "
                                 f"{len(weights)} weights against {len(first)}")
        for index, (a, b) in enumerate(zip(first, weights)):
            if a.shape != b.shape:
                raise ModelLoadError(f"{name} does not have the architecture of {names[0]}: "
                                     f"weight {index} is {b.shape} against {a.shape}")
    return [np.mean(np.stack(group), axis=0).astype(group[0].dtype) for group in zip(*models)]


def average(model_dirs: list[Path], out: Path) -> Path:
    """Export the mean of ``model_dirs`` to ``out`` (atomically); the first model gives the recipe."""
    if len(model_dirs) < 2:
        raise ValueError("averaging needs at least two models")
    names = [str(d) for d in model_dirs]
    metadata = [json.loads((d / METADATA_FILE).read_text()) for d in model_dirs]
    check_compatible(metadata, names)
    config = TrainConfig.from_dict(metadata[0]["training_config"])
    weights = mean_weights([stored_weights(d) for d in model_dirs], names)
    try:
        network = float32_network(config, weights)
    except ValueError:  # Keras' set_weights: another count or shape than the recipe's network has
        raise ModelLoadError(f"{model_dirs[0]}'s weights do not fit the network its recipe builds") from None
    record = {k: v for k, v in metadata[0].items() if k not in NOT_INHERITED}
    record.update(git_commit=git_commit(), data=merged_data([m.get("data", {}) for m in metadata]),
                  averaged_from=[init_record(d) for d in model_dirs])
    return export_network(network, config, out, record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="exported model folder; at least two, of one architecture (the first gives the recipe)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the averaged model (replaced atomically)")
    args = parser.parse_args(argv)
    try:
        missing = [d for d in args.model if not (d / METADATA_FILE).is_file()]
        if missing:
            raise ModelLoadError(f"not an exported model folder (no {METADATA_FILE}): {missing[0]}")
        print(f"averaged {len(args.model)} models into {average(args.model, args.out)}")
    except (ModelLoadError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
