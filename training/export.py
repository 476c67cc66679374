"""Export a trained Keras model as a self-contained SavedModel plus ``metadata.json``.

The SavedModel holds one ``tf.Module`` whose serving signature takes ``uint8`` images and returns
softmax probabilities (and, for a model with the distance output, its sigmoid, and StarDist's ray
distances), so ``tf.saved_model.load`` serves it without this project's code and the
input scaling can never drift from training. Export is atomic: everything is written to a
temporary sibling folder, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from service.model import METADATA_FILE, SUPPORTED_FORMAT
from service.runtime import SIGNATURE


class ServingModule(tf.Module):
    """Declares the serving signature (uint8 in, probabilities out) over the model's weights only.

    The Keras model is captured by the function rather than tracked as an attribute, and only its
    weights are tracked: optimizer slots and Keras bookkeeping stay out of the export, which keeps
    the SavedModel at the size of the weights.
    """

    def __init__(self, model: keras.Model, fixed_size: int | None, softmax_channels: int | None = None,
                 sigmoid_channels: int | None = None) -> None:
        super().__init__()
        self.weights = [w.value for w in model.weights]
        spec = tf.TensorSpec([None, fixed_size, fixed_size, 3], tf.uint8, name="images")

        def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
            logits = model(tf.cast(images, tf.float32), training=False)
            if softmax_channels is None or softmax_channels >= logits.shape[-1]:
                return {"probabilities": tf.nn.softmax(logits, axis=-1)}
            classes = tf.nn.softmax(logits[..., :softmax_channels], axis=-1)
            end = logits.shape[-1] if sigmoid_channels is None else softmax_channels + sigmoid_channels
            outputs = [classes, tf.sigmoid(logits[..., softmax_channels:end]), tf.nn.relu(logits[..., end:])]
            return {"probabilities": tf.concat(outputs, axis=-1)}

        self.serve = tf.function(serve, input_signature=[spec])


def load_serving_weights(model: keras.Model, model_dir: Path) -> None:
    """Set ``model``'s weights from an exported SavedModel (``--init``: fine-tuning a served model).

    ``ServingModule`` tracks the Keras model's weights as one list, in ``model.weights`` order, so a
    network built from the same configuration takes them back one by one. A mismatch (another
    architecture) is refused before any weight is changed.
    """
    from service.model import ModelLoadError

    stored = stored_weights(model_dir)
    if len(stored) != len(model.weights) or any(
            tuple(s.shape) != tuple(w.shape) for s, w in zip(stored, model.weights)):
        raise ModelLoadError(f"{model_dir} holds {len(stored)} weights that do not match this network's "
                             f"{len(model.weights)}: it was trained with another architecture")
    for weight, value in zip(model.weights, stored):
        weight.assign(tf.cast(value, weight.dtype))


def stored_weights(model_dir: Path) -> list[np.ndarray]:
    """An exported model's weights as arrays, in the order of the Keras model's ``weights``
    (``ServingModule`` tracks them as one list)."""
    from service.model import ModelLoadError

    try:
        return [w.numpy() for w in tf.saved_model.load(str(model_dir)).weights]
    except (OSError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"cannot read weights from {model_dir}: {error}") from None


def git_commit() -> str | None:
    """The current commit of the project checkout, if any (recorded for provenance)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_metadata(config_dict: dict[str, Any], *, classes: list[str], inference: dict[str, Any],
                   postprocess: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The ``metadata.json`` document the service reads (see ``service.model.ModelSpec``)."""
    return {
        "format_version": SUPPORTED_FORMAT,
        "input_size": config_dict["image_size"],
        "input": {"dtype": "uint8", "channels": "RGB", "layout": "NHWC"},
        "output": {"kind": "probabilities", "signature": SIGNATURE},
        "classes": classes,
        "inference": inference,
        "postprocess": postprocess,
        "training_config": config_dict,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "git_commit": git_commit(),
        **extra,
    }


def export_model(model: keras.Model, out_dir: Path, metadata: dict[str, Any], fixed_size: int | None,
                 softmax_channels: int | None = None, sigmoid_channels: int | None = None) -> Path:
    """Write SavedModel + metadata to ``out_dir`` atomically (temp folder, then rename).

    The first ``softmax_channels`` outputs are class logits (softmax); the ``sigmoid_channels`` after
    them (the distance output; ``None``: all the rest) are independent (sigmoid), and any after those
    (StarDist ray distances, in pixels) are clipped at 0. ``softmax_channels`` None: all outputs are classes.
    An existing ``out_dir`` is replaced only once the new export is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        module = ServingModule(model, fixed_size, softmax_channels, sigmoid_channels)
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: module.serve})
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first and deleted after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def update_metadata(model_dir: Path, updates: dict[str, Any]) -> None:
    """Merge ``updates`` into a model's metadata.json atomically (write temp file, rename)."""
    path = Path(model_dir) / METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata.update(updates)
    write_text_atomic(path, json.dumps(metadata, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temp file beside it, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
