"""Post-training int8 quantization of an exported model with NNCF, for OpenVINO on the CPU.

    python -m training.quantize --model models/default --data ../shared/data/dsb2018/stage1_train \
        --data ../shared/data/monuseg/train --out models/default-int8

``--data`` takes the folders the model was trained on (either layout, ``NAME=PATH`` as in
``training.train``). Calibration crops come from the model's training split only, as its metadata
records it (``training.evaluate.split_samples``), so the validation images stay unseen by every
step that fits anything, quantization ranges included. Each image is prepared exactly as training
prepared it (``training.train.prepare``: the model's normalisation, then the rescale to the
canonical nucleus diameter), and ``--crops`` squares of the network's input size are cut from
those at seeded random places.

OUT receives a full copy of the model folder (the SavedModel stays the reference, float32), plus
``openvino/int8.xml`` and ``openvino/int8.bin``, and ``metadata.json`` gains ``precision``,
``openvino`` and ``quantization`` (how, from what, with which versions). The IR keeps the
SavedModel's dynamic input ``[?, ?, ?, 3]``, so every tile shape the service uses still works.
OUT is written to a temporary sibling folder and renamed into place at the end: a failure leaves
nothing half-written. An OUT that exists and is not empty is refused, and so are a MODEL that is
not an exported model folder and data without training images (exit status 2, nothing changed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import openvino as ov

from service.model import METADATA_FILE, ModelLoadError, ModelSpec, SegmentationModel
from service.runtime import available_cpus
from training.augment import pad_to_at_least
from training.config import TrainConfig
from training.data import DataError, parse_source, sample_ids
from training.evaluate import DataSpec, as_sources, split_samples
from training.export import update_metadata
from training.split import group_of
from training.train import at_least, prepare

#: Where the int8 IR lies inside the output folder (the service reads ``metadata["openvino"]["int8"]``).
INT8_XML = "openvino/int8.xml"
DEFAULT_CROPS = 300
DEFAULT_SEED = 0


class QuantizeError(RuntimeError):
    """A refused request (the output exists, the model folder is not one, no training images)."""


@dataclass
class Calibration:
    """The calibration inputs: network-ready crops and the training image each was cut from."""

    crops: list[np.ndarray]  # each uint8 [1, S, S, 3], S the model's input size
    ids: list[str]  # per crop

    @property
    def images(self) -> int:
        """How many distinct training images the crops came from."""
        return len(set(self.ids))


def openvino_core() -> ov.Core:
    """An OpenVINO runtime whose CPU plugin uses the cores this process may use, and no more.

    NNCF compiles its statistics-collection model on a Core of its own, whose default (all cores
    the CPU plugin sees) is the same on a plain machine.
    """
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": available_cpus()})
    return core


def read_metadata(model_dir: Path) -> dict:
    """The model folder's validated metadata; :class:`QuantizeError` naming the path if it is not a model.

    Checked before anything is loaded or written: the metadata must be one the service accepts
    (``ModelSpec``) and a SavedModel must lie beside it, since that is what gets quantized.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QuantizeError(f"model folder not found: {model_dir}")
    meta_path = model_dir / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text())
        ModelSpec.from_metadata(metadata)
    except FileNotFoundError:
        raise QuantizeError(f"{model_dir} is not an exported model folder: no {METADATA_FILE}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise QuantizeError(f"model metadata invalid in {meta_path}: {exc}") from None
    if not (model_dir / "saved_model.pb").is_file():
        raise QuantizeError(f"{model_dir} is not an exported model folder: no saved_model.pb")
    return metadata


def serving_config(metadata: dict) -> TrainConfig:
    """The training configuration, set to the way the service feeds this network.

    ``prepare`` reads the normalisation, the canonical diameter, the mode and the input size from
    it; the metadata's ``inference`` block and ``input_size`` are what the service uses, so they win
    (they equal the training config's for every model ``training.train`` exported).
    """
    config = TrainConfig.from_dict(metadata.get("training_config") or {})
    inference = metadata["inference"]
    return replace(config, inference=inference["mode"], normalise=inference["normalise"],
                   canonical_diameter=inference.get("canonical_diameter"), image_size=int(metadata["input_size"]))


def calibration_crops(model_dir: Path, data: DataSpec | list[DataSpec], count: int = DEFAULT_CROPS,
                      seed: int = DEFAULT_SEED) -> Calibration:
    """``count`` random (seeded) network-input squares from the model's training split of ``data``.

    Why the training split: quantization ranges are fitted to these images, so the validation
    images must stay out, or later scores on them would be scores on calibration data. Why
    ``prepare``: int8 ranges only fit if the crops have the intensities and nucleus scale the
    network sees in serving. Images are visited in shuffled order, each once before any repeats,
    so the crops span as many images (and modalities) as ``count`` allows; an image smaller than a
    crop is reflect-padded, as in training.
    """
    metadata = read_metadata(model_dir)
    validation = set((metadata.get("split") or {}).get("validation_ids") or [])
    if not validation:
        raise QuantizeError(f"model {model_dir} records no validation split, so its training images are unknown")
    sources = [parse_source(spec) for spec in as_sources(data)]
    if not any(i in validation for source in sources for i in sample_ids(source)):  # listed, not decoded
        raise QuantizeError(f"no training images of {model_dir} in {', '.join(s.name for s in sources)}: none of "
                            f"the model's validation ids is there, so these are not the folders it was trained on")
    # split_samples needs only the model's metadata and folder: no network is loaded for it
    model = SegmentationModel.without_network(model_dir)
    dataset = split_samples(model, sources, "training")
    if not dataset.samples:
        raise QuantizeError(f"no training images of {model_dir} in the data given: every image there is in the "
                            f"model's validation split")
    leaked = validation.intersection(dataset.ids)
    if leaked:  # split_samples never returns these; a guard, since calibrating on them would be silent
        raise QuantizeError(f"validation images among the calibration candidates: {sorted(leaked)[:3]}")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(dataset)) for _ in range(-(-count // len(dataset)))])[:count]
    chosen = sorted({dataset.ids[k] for k in order})
    subset = dataset.subset(chosen)  # prepare only the images the crops come from
    prepared = prepare(subset, serving_config(metadata), {s.id: group_of(s.source, s.image) for s in subset.samples})
    index = {sample_id: k for k, sample_id in enumerate(prepared.ids)}
    size = int(metadata["input_size"])
    crops, ids = [], []
    for k in order:
        sample_id = dataset.ids[k]
        image, _ = pad_to_at_least(prepared.images[index[sample_id]], prepared.targets[index[sample_id]], size)
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        crops.append(np.ascontiguousarray(image[None, top:top + size, left:left + size, :3], dtype=np.uint8))
        ids.append(sample_id)
    return Calibration(crops, ids)


#: NNCF's ``overflow_fix``: weights of every layer (``enable``), of the first only (``first_layer_only``, NNCF's
#: default) or of none (``disable``) are quantized to 7 bits, so that CPUs without VNNI (AVX2, AVX-512 before
#: Cascade Lake) cannot saturate the 16-bit sums of their u8 x s8 products.
OVERFLOW_FIXES = ("first_layer_only", "enable", "disable")


def quantize(model_dir: Path, crops: list[np.ndarray], overflow_fix: str = "first_layer_only") -> ov.Model:
    """The SavedModel as an OpenVINO model with int8 weights and activations (NNCF's default preset).

    ``nncf.quantize`` fits each quantizer's range to the activations of ``crops`` (all of them:
    ``subset_size``); the input stays uint8 ``[?, ?, ?, 3]`` and the output float32 probabilities,
    as in the SavedModel, so the service feeds both the same tiles. ``overflow_fix`` (``OVERFLOW_FIXES``):
    ``enable`` for a copy that must keep its quality on CPUs without VNNI too (docs/runtimes.md).
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    nncf.set_log_level(logging.WARNING)  # its INFO lines repeat per step and say nothing a user needs
    try:
        model = openvino_core().read_model(str(model_dir))
    except Exception as exc:  # OpenVINO's frontends raise several types for a foreign or corrupt folder
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(f"OpenVINO cannot read the SavedModel in {model_dir}: {reason}") from None
    quantized = nncf.quantize(model, nncf.Dataset(crops), subset_size=len(crops),
                              advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(overflow_fix)))
    shape = quantized.input(0).get_partial_shape()
    if not (shape.rank.is_static and shape.rank.get_length() == 4 and all(d.is_dynamic for d in list(shape)[:3])):
        raise QuantizeError(f"the quantized model's input is {shape}, not [?,?,?,3]: it would take one tile shape only")
    return quantized


def check_out(out: Path, model_dir: Path) -> None:
    """Refuse an ``out`` that holds anything, or lies inside the model folder (it would copy itself)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"output {out} exists and is not empty; give a new folder")
    if out.resolve().is_relative_to(Path(model_dir).resolve()):
        raise QuantizeError(f"output {out} lies inside the model folder {model_dir}")


def write_quantized(model_dir: Path, quantized: ov.Model, out: Path, calibration: Calibration, seed: int,
                    overflow_fix: str = "first_layer_only") -> Path:
    """Write the model folder's copy, the int8 IR and the updated metadata to ``out``, all or nothing.

    Everything goes to a temporary sibling folder first, renamed to ``out`` once complete, so the
    service can never find a folder whose metadata names an IR that is not (fully) there.
    """
    import nncf

    model_dir, out = Path(model_dir), Path(out)
    check_out(out, model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        (tmp / INT8_XML).parent.mkdir(exist_ok=True)
        ov.save_model(quantized, str(tmp / INT8_XML), compress_to_fp16=False)
        update_metadata(tmp, {
            "precision": "int8",
            "openvino": {"int8": INT8_XML},
            "quantization": {"method": "nncf.quantize", "nncf_version": nncf.__version__,
                             "openvino_version": ov.__version__, "calibration_crops": len(calibration.crops),
                             "calibration_images": calibration.images, "from_split": "train", "seed": seed,
                             "overflow_fix": overflow_fix,
                             "source_model": str(model_dir)},
        })
        if out.exists():  # an empty folder (check_out refused anything else)
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model folder (SavedModel + metadata.json)")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="the model's training data folders (repeat for several sources)")
    parser.add_argument("--out", type=Path, required=True, help="output model folder (new, or empty)")
    parser.add_argument("--crops", type=at_least(1), default=DEFAULT_CROPS,
                        help=f"calibration crops (default {DEFAULT_CROPS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"crop seed (default {DEFAULT_SEED})")
    parser.add_argument("--overflow-fix", choices=OVERFLOW_FIXES, default="first_layer_only",
                        help="7-bit weights in every layer (enable), the first (first_layer_only, the default) or "
                             "none: enable keeps int8's quality on CPUs without VNNI, such as AVX2-only ones")
    args = parser.parse_args(argv)
    try:
        read_metadata(args.model)
        check_out(args.out, args.model)  # both before any image is loaded
        calibration = calibration_crops(args.model, args.data, args.crops, args.seed)
        print(f"calibration: {len(calibration.crops)} crops from {calibration.images} training images")
        quantized = quantize(args.model, calibration.crops, args.overflow_fix)
        out = write_quantized(args.model, quantized, args.out, calibration, args.seed, args.overflow_fix)
    except (QuantizeError, DataError, ModelLoadError) as error:  # the user's input: a message, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out / INT8_XML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
