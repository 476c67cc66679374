"""Load annotated images, the first step of training, from either of two layouts.

* Kaggle's DSB2018 layout: ``<root>/<id>/images/<id>.png`` is the image and
  ``<root>/<id>/masks/*.png`` holds one binary PNG per nucleus (merged into instance labels,
  nucleus ``k`` has value ``k``, masks in sorted file-name order).
* Image + label-image pairs, the StarDist / Cellpose convention users' own annotations come in:
  ``<root>/images/<stem>.<ext>`` and ``<root>/labels/<stem>.<ext>`` (PNG or TIFF; labels 8, 16 or
  32-bit, 0 background, any positive id a nucleus).

Images are decoded by the service's own decoder (one source of truth for how pixels become RGB).
Several folders can be loaded at once (:func:`load_sources`); each keeps its name and licence, so
that the split can be stratified by source and the model's metadata can list what it was trained on.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.segmentation import relabel_sequential

from service.decode import DecodeError, decode_image
from service.resample import resize

#: File endings read as images (and as label images) in the pairs layout.
PAIR_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
#: Licences of the public sources this project trains on, recognised by a folder name in their path.
#: A user's folder gets its licence from a LICENSE / LICENCE file in it or its parent, else "unknown".
KNOWN_LICENCES = {
    "dsb2018": "CC0-1.0 (BBBC038v1, Broad Bioimage Benchmark Collection)",
    "monuseg": "CC BY-NC-SA 4.0 (MoNuSeg 2018, Kumar et al., IEEE TMI 2020)",
}


class DataError(ValueError):
    """The data folder is malformed; the message names the offending file."""


@dataclass
class Sample:
    """One training image with its instance labels (``uint16``/``int32``, 0 = background)."""

    id: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32, nucleus k has value k
    source: str = ""  # name of the data folder it came from (see ``Source``)

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

    sources: list["Source"] = field(default_factory=list)

    def subset(self, ids: list[str]) -> "NucleiDataset":
        by_id = {s.id: s for s in self.samples}
        return NucleiDataset([by_id[i] for i in ids], self.sources)


@dataclass(frozen=True)
class Source:
    """One data folder: its name (kept with every sample), path, layout and licence."""

    name: str
    path: Path
    layout: str  # "kaggle" or "pairs"
    licence: str

    def record(self, images: int) -> dict:
        """What the model's metadata keeps of this source."""
        return {"name": self.name, "path": str(self.path), "layout": self.layout, "licence": self.licence,
                "images": images, "fingerprint": fingerprint(self.path)}


def layout_of(root: Path) -> str:
    """``pairs`` when ``root`` holds ``images/`` and ``labels/`` folders, else Kaggle's layout."""
    return "pairs" if (Path(root) / "images").is_dir() and (Path(root) / "labels").is_dir() else "kaggle"


def source_name(root: Path) -> str:
    """A readable name for a data folder: its last two path parts (``dsb2018/stage1_train``,
    ``monuseg/train``), because folders are often called ``train`` or ``data`` alone."""
    parts = Path(root).resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else parts[-1]


def licence_of(root: Path) -> str:
    """The licence of a data folder: a LICENSE/LICENCE file in it or its parent, else a known source's."""
    root = Path(root).resolve()
    for folder in (root, root.parent):
        for name in ("LICENSE", "LICENCE", "LICENSE.txt", "LICENCE.txt", "LICENSE.md"):
            if (folder / name).is_file():
                text = (folder / name).read_text(errors="replace").strip()
                return text.splitlines()[0][:200] if text else "unknown (empty licence file)"
    for part in reversed(root.parts):
        for key, licence in KNOWN_LICENCES.items():
            if key in part.lower():
                return licence
    return "unknown"


def parse_source(spec: str | Path | Source) -> Source:
    """A ``--data`` argument, ``PATH`` or ``NAME=PATH``, as a :class:`Source` (the folder must exist);
    a :class:`Source` is returned as it is, so every loader takes either."""
    if isinstance(spec, Source):
        return spec
    text = str(spec)
    name, sep, path_text = text.partition("=")
    if not sep or not re.fullmatch(r"[\w./-]+", name) or Path(text).exists():
        name, path_text = "", text
    root = Path(path_text)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return Source(name or source_name(root), root, layout_of(root), licence_of(root))


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


def list_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, label image) paths of a pairs-layout folder, matched by stem, in sorted order.

    An image without a label image (or the reverse) is an error naming it: silently training on
    part of a user's annotations would hide the mistake.
    """
    def by_stem(folder: Path) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in PAIR_EXTENSIONS and not path.name.startswith("."):
                if path.stem in files:
                    raise DataError(f"two files with the stem {path.stem!r} in {folder}: {files[path.stem].name}, "
                                    f"{path.name}")
                files[path.stem] = path
        return files

    images, labels = by_stem(Path(root) / "images"), by_stem(Path(root) / "labels")
    unlabelled, orphans = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    if unlabelled:
        raise DataError(f"{len(unlabelled)} images in {root}/images have no label image in {root}/labels, "
                        f"e.g. {images[unlabelled[0]].name}")
    if orphans:
        raise DataError(f"{len(orphans)} label images in {root}/labels have no image, e.g. {labels[orphans[0]].name}")
    if not images:
        raise DataError(f"no images in {root}/images (expected images/<stem>.png + labels/<stem>.tif)")
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def read_label_image(path: Path) -> np.ndarray:
    """An instance label image (8/16/32-bit PNG or TIFF) as ``int32`` labels numbered 1..N."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            labels = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                labels = np.asarray(im)
    except Exception as exc:
        raise DataError(f"unreadable label image {path}: {exc}") from None
    labels = np.squeeze(labels)
    if labels.ndim != 2:
        raise DataError(f"label image {path} has shape {labels.shape}; expected one 2D plane of nucleus ids")
    if labels.dtype.kind not in "ui" or labels.dtype.itemsize > 4:
        raise DataError(f"label image {path} is {labels.dtype}; expected 8, 16 or 32-bit integer ids")
    if labels.min(initial=0) < 0:
        raise DataError(f"label image {path} has negative ids")
    relabelled, _, _ = relabel_sequential(labels.astype(np.int64))
    return relabelled.astype(np.int32)


def load_pair(image_path: Path, label_path: Path) -> Sample:
    """One image + label-image pair; its id is the file stem."""
    try:
        image = decode_image(image_path.read_bytes(), max_pixels=10**9)
    except DecodeError as exc:
        raise DataError(f"unreadable image {image_path}: {exc}") from None
    labels = read_label_image(label_path)
    if labels.shape != image.shape[:2]:
        raise DataError(f"label image {label_path} is {labels.shape[::-1]} but its image is "
                        f"{image.shape[1::-1]} (W, H)")
    return Sample(image_path.stem, image, labels)


def sample_ids(source: Source) -> list[str]:
    """The ids of a folder's samples (folder names, or pair stems), read from the listing alone."""
    if source.layout == "pairs":
        return [image.stem for image, _ in list_pairs(source.path)]
    return [d.name for d in list_sample_dirs(source.path)]


def load_dataset(root: Path | Source, with_masks: bool = True, workers: int | None = None,
                 ids: Container[str] | None = None) -> NucleiDataset:
    """Load the samples of one folder (either layout) at native resolution, decoding in parallel threads.

    PNG decoding in Pillow and zlib releases the GIL, so threads scale on the cores we have.
    ``ids``: only these samples (a validation split is a fifth of its folder; the rest is not decoded).
    """
    source = parse_source(root)
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if source.layout == "pairs":
            pairs = [pair for pair in list_pairs(source.path) if ids is None or pair[0].stem in ids]
            samples = list(pool.map(lambda pair: load_pair(*pair), pairs))
        else:
            dirs = [d for d in list_sample_dirs(source.path) if ids is None or d.name in ids]
            samples = list(pool.map(lambda d: load_sample(d, with_masks), dirs))
    for sample in samples:
        sample.source = source.name
    return NucleiDataset(samples, [source])


def load_sources(specs: list[str | Path | Source], ids: Container[str] | None = None) -> NucleiDataset:
    """Load several data folders as one data set; each sample keeps its source's name.

    Ids must be unique across sources (the split and the metadata refer to images by id), and
    two sources may not share a name. ``ids``: only these samples, as in :func:`load_dataset`.
    """
    sources = [parse_source(spec) for spec in specs]
    if not sources:
        raise DataError("no data folder given")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"two data folders have the same name ({', '.join(names)}); name them with NAME=PATH")
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for source in sources:
        for sample in load_dataset(source, ids=ids).samples:
            if sample.id in seen:
                raise DataError(f"image id {sample.id!r} occurs in both {seen[sample.id]} and {source.name}")
            seen[sample.id] = source.name
            samples.append(sample)
    return NucleiDataset(samples, sources)


def resize_image(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an ``(H, W[, C])`` image or label array to ``size = (height, width)``: the service's own
    resampler (``service.resample``), so training sees uploads' pixels."""
    return resize(image, size, nearest)


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
    files = (p for p in Path(root).rglob("*") if p.suffix.lower() in PAIR_EXTENSIONS)
    for path in sorted(files):
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
