"""Load a DSB2018 folder in Kaggle's layout: the first step of training.

``<root>/<id>/images/<id>.png`` is the image; ``<root>/<id>/masks/*.png`` holds one binary PNG per
nucleus. Images are decoded by the service's own decoder (one source of truth for how pixels
become RGB), masks are merged into a binary mask and an instance label image (nucleus ``k`` has
value ``k``, masks in sorted file-name order).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from service.decode import DecodeError, decode_image


class DataError(ValueError):
    """The data folder is malformed; the message names the offending file."""


@dataclass
class Sample:
    """One training image with its instance labels (``uint16``/``int32``, 0 = background)."""

    id: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32, nucleus k has value k

    @property
    def mask(self) -> np.ndarray:
        """Binary nucleus mask (``uint8`` 0/1), the merge of all nucleus masks."""
        return (self.labels > 0).astype(np.uint8)


@dataclass
class NucleiDataset:
    """A whole folder at native resolution (images differ in size, so these are lists)."""

    samples: list[Sample] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, ids: list[str]) -> "NucleiDataset":
        by_id = {s.id: s for s in self.samples}
        return NucleiDataset([by_id[i] for i in ids])


def list_sample_dirs(root: Path) -> list[Path]:
    """The sample folders under ``root`` in sorted order (sorted so splits are reproducible)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"no sample folders in {root} (expected <id>/images/<id>.png)")
    return dirs


def load_sample(sample_dir: Path, with_masks: bool = True) -> Sample:
    """Read one ``<id>`` folder; raise :class:`DataError` naming the file on any problem."""
    sample_id = sample_dir.name
    image_path = sample_dir / "images" / f"{sample_id}.png"
    if not image_path.is_file():
        raise DataError(f"missing image file: {image_path}")
    try:
        image = decode_image(image_path.read_bytes(), max_pixels=10**9)
    except DecodeError as exc:
        raise DataError(f"unreadable image {image_path}: {exc}") from None
    labels = np.zeros(image.shape[:2], dtype=np.int32)
    if with_masks:
        mask_dir = sample_dir / "masks"
        if not mask_dir.is_dir():
            raise DataError(f"missing masks folder: {mask_dir}")
        for k, mask_path in enumerate(sorted(mask_dir.glob("*.png")), start=1):
            labels[_read_mask(mask_path, image.shape[:2])] = k
    return Sample(sample_id, image, labels)


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) > 0
    except Exception as exc:
        raise DataError(f"unreadable mask {path}: {exc}") from None
    if mask.shape != shape:
        raise DataError(f"mask {path} is {mask.shape[::-1]} but its image is {shape[::-1]} (W, H)")
    return mask


def load_dataset(root: Path, with_masks: bool = True, workers: int | None = None) -> NucleiDataset:
    """Load every sample under ``root`` at native resolution, decoding in parallel threads.

    PNG decoding in Pillow and zlib releases the GIL, so threads scale on the cores we have.
    """
    dirs = list_sample_dirs(root)
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        samples = list(pool.map(lambda d: load_sample(d, with_masks), dirs))
    return NucleiDataset(samples)


def resize_image(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an ``(H, W[, C])`` ``uint8``/label array to ``size = (height, width)`` with Pillow."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if image.ndim == 2 and image.dtype != np.uint8:
        return np.asarray(Image.fromarray(image.astype(np.int32)).resize((width, height), resample))
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def data_load(root: Path, image_size: int = 128) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The reference loader: every image and merged mask resized to ``image_size`` squared.

    Returns ``images_np (N, S, S, 3) uint8``, ``masks_np (N, S, S, 1) uint8`` in {0, 1}, and the ids.
    """
    dataset = load_dataset(root)
    size = (image_size, image_size)
    images = np.stack([resize_image(s.image, size) for s in dataset.samples])
    masks = np.stack([resize_image(s.mask, size, nearest=True) for s in dataset.samples])[..., None]
    return images, masks, dataset.ids


def fingerprint(root: Path) -> str:
    """A short hash of the data folder's file names and sizes, recorded in the model metadata."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.png")):
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
