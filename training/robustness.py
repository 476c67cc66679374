"""How a model holds up when images are degraded the way real acquisitions degrade them.

    python -m training.robustness --model models/default --data ../shared/data/dsb2018/stage1_train \
        --out docs/robustness.md

The validation split comes from the same microscopes as the training split; users' images do
not. Every validation image is changed (saved as JPEG, out of focus, noisy, under-exposed, gray,
inverted, colour-cast) and segmented by the service's own code path (``training.evaluate``), and
the DSB2018 score and AP@0.5 are reported per change, overall and per modality, for one model or
several side by side (``--model A --model B``), so a training change can be judged on images
unlike the validation split's.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from service.model import ModelLoadError, SegmentationModel
from training.data import DataError
from training.evaluate import DataSpec, markdown_table, score_samples, split_samples, summarise
from training.export import write_text_atomic
from training.split import MODALITIES

Change = Callable[[np.ndarray, np.random.Generator], np.ndarray]
MODALITY_NAMES = {"fluorescence": "fluorescence", "brightfield": "bright-field", "histology": "stained tissue"}


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """The image as a JPEG of ``quality`` would decode (what a microscope's "export as JPEG" gives)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


#: name -> (what it simulates, the change); each image gets its own seeded generator for the noise.
CHANGES: dict[str, tuple[str, Change]] = {
    "none": ("the image as stored", lambda x, rng: x),
    "jpeg_q40": ("saved as JPEG, quality 40", lambda x, rng: jpeg(x, 40)),
    "blur_1.5px": ("out of focus: Gaussian blur, sigma 1.5 px",
                   lambda x, rng: to_uint8(ndi.gaussian_filter(x.astype(np.float32), (1.5, 1.5, 0)))),
    "noise_8": ("noisy: Gaussian noise, sd 8 grey levels", lambda x, rng: to_uint8(x + rng.normal(0, 8, x.shape))),
    "dim_x0.25": ("under-exposed: intensities x 0.25, so 8-bit levels are lost", lambda x, rng: to_uint8(x * 0.25)),
    "grayscale": ("converted to gray (luma)",
                  lambda x, rng: np.repeat(to_uint8(x.astype(np.float32) @ [0.299, 0.587, 0.114])[..., None], 3, -1)),
    "invert": ("inverted (255 - x)", lambda x, rng: 255 - x),
    "colour_cast": ("colour cast: R, G, B x 1.0, 0.8, 1.15", lambda x, rng: to_uint8(x * np.array([1.0, 0.8, 1.15]))),
}


def measure(model_dir: Path, data_dir: DataSpec | list[DataSpec], names: list[str], seed: int = 0) -> list[dict]:
    """One row per change: DSB2018 score and AP@0.5, overall and per modality, and the minutes it took."""
    model = SegmentationModel.load(model_dir)
    model.warm()
    dataset = split_samples(model, data_dir, "validation")
    rows = []
    for name in names:
        alter = CHANGES[name][1]
        started = time.perf_counter()
        images, _, _ = score_samples(dataset, model,
                                     change=lambda image, index: alter(image, np.random.default_rng([seed, index])))
        summary = summarise(images)
        row = {"change": name, "model": str(model_dir), "DSB2018 score": f"{summary['dsb_score']:.3f}",
               "AP@0.5": f"{summary['ap50']:.3f}"}
        for modality in MODALITIES:
            per = summary["per_modality"].get(modality)
            if per:
                row[f"{MODALITY_NAMES[modality]} (n={per['images']}) score / AP@0.5"] = \
                    f"{per['dsb_score']:.3f} / {per['ap50']:.3f}"
        row["minutes"] = f"{(time.perf_counter() - started) / 60:.1f}"
        print(" | ".join(row.values()), flush=True)
        rows.append(row)
    return rows


def report(rows: list[dict], command: str) -> str:
    """Markdown: the command, what each change simulates, and the table (changes x models)."""
    used = dict.fromkeys(r["change"] for r in rows)
    lines = ["# Robustness: the validation split under acquisition changes", "",
             f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')}).", "",
             *[f"- `{name}`: {CHANGES[name][0]}" for name in used], "",
             markdown_table(sorted(rows, key=lambda r: list(used).index(r["change"])))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="exported model folder (repeat to compare models on the same changed images)")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="the model's training data, either layout (its validation split is scored); repeatable")
    parser.add_argument("--changes", nargs="+", choices=list(CHANGES), default=list(CHANGES),
                        help="which changes (default: all)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: print only)")
    args = parser.parse_args(argv)
    try:
        rows = [row for model_dir in args.model for row in measure(model_dir, args.data, args.changes)]
    except (DataError, ModelLoadError) as error:  # the user's input, not a bug: a message, no traceback
        sys.exit(f"error: {error}")
    text = report(rows, "python -m training.robustness " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.out:
        write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
