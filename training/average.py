"""Weight averaging: one exported model whose weights are the mean of several of the same architecture.

    python -m training.average --model models/default --model runs/cont/model --out runs/soup

Averaging a model with its own fine-tuned continuation (a "model soup", Wortsman et al., ICML 2022;
WiSE-FT, Wortsman et al., CVPR 2022) often keeps what each gained, at no extra cost when it
serves: the result is one network of the same size. Every weight is averaged, the BatchNorm
running statistics too. The result has the first model's contract and recipe; its decoding
thresholds are the first model's until re-tuned (``training.evaluate.tune_thresholds``), and no
precision verdict carries over: a new network must pass ``training.parity`` afresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from service.model import METADATA_FILE, ModelLoadError
from training.config import TrainConfig
from training.export import export_model, git_commit
from training.model import build_unet, precision
from training.train import init_record

#: Metadata of the first model that does not describe the averaged network (verdicts, a start).
NOT_INHERITED = ("runtime", "init", "averaged_from", "precision", "openvino")


def stored_weights(model_dir: Path) -> list[np.ndarray]:
    """An exported model's weights as arrays, in the Keras model's ``weights`` order."""
    try:
        return [w.numpy() for w in tf.saved_model.load(str(model_dir)).weights]
    except (OSError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"cannot read weights from {model_dir}: {error}") from None


def mean_weights(models: list[list[np.ndarray]], names: list[str]) -> list[np.ndarray]:
    """The element-wise mean; refused (naming the model) where any weight's count or shape differs."""
    first = models[0]
    for weights, name in zip(models[1:], names[1:]):
        if len(weights) != len(first) or any(a.shape != b.shape for a, b in zip(first, weights)):
            raise ModelLoadError(f"{name} does not have the architecture of {names[0]}: weights differ in count "
                                 f"or shape ({len(weights)} vs {len(first)})")
    return [np.mean(np.stack(group), axis=0).astype(group[0].dtype) for group in zip(*models)]


def average(model_dirs: list[Path], out: Path) -> Path:
    """Export the mean of ``model_dirs`` to ``out`` (atomically); the first model gives the recipe."""
    if len(model_dirs) < 2:
        raise ValueError("averaging needs at least two models")
    metadata = json.loads((model_dirs[0] / METADATA_FILE).read_text())
    config = TrainConfig.from_dict(metadata["training_config"])
    weights = mean_weights([stored_weights(d) for d in model_dirs], [str(d) for d in model_dirs])
    with precision("float32"):
        network = build_unet(config.override(encoder_weights="none"),
                             fixed_size=True if config.inference == "resize" else None)
    if len(network.weights) != len(weights):
        raise ModelLoadError(f"{model_dirs[0]}'s weights do not fit the network its recipe builds")
    network.set_weights(weights)
    record = {k: v for k, v in metadata.items() if k not in NOT_INHERITED}
    record.update(git_commit=git_commit(), averaged_from=[init_record(d) for d in model_dirs])
    return export_model(network, out, record, fixed_size=config.image_size if config.inference == "resize" else None,
                        softmax_channels=config.num_classes, sigmoid_channels=int(config.distance_output))


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
