"""Training targets and per-image geometry derived from instance labels.

* ``mask``: 0 background / 1 nucleus (the reference recipe).
* ``boundary``: 0 background / 1 interior / 2 boundary, so that touching nuclei are separated by
  a predicted boundary and can be split again by a seeded watershed in post-processing. Where two
  nuclei meet, the target carries two extra codes (``CONTACT``, ``GAP``) that the loss counts as
  boundary and background, weighted ``contact_weight`` times more (as the U-Net paper weights the
  gaps between touching cells; merged neighbours are the shipped model's commonest error). At the
  default weight 1.0 the codes change nothing. Pixels of nuclei smaller than ``SMALL_FRACTION`` of
  their image's median nucleus area carry their code plus ``SMALL``, weighted ``small_weight`` times
  more (the shipped model's unmatched nuclei are mostly such small ones beside large ones).
* ``distance`` (optional, beside the classes): each nucleus pixel's distance to its nucleus' edge,
  divided by that nucleus' largest distance, so every nucleus peaks at 1 in its middle. Seeds cut
  from it are the nuclei's cores, far apart even where two nuclei share a long edge (stored as
  ``uint8`` 0..255 in a second channel, so augmentation moves it with the classes).
* ``rays`` (optional, after the distance): the instance labels themselves, as two ``uint8``
  channels (low and high byte), so that augmentation moves them with the rest (nearest-neighbour
  picks the same source pixel for every channel). StarDist's ray distances are computed from them
  after augmentation (``star_rays``): a rotated or zoomed crop needs its own rays.
* the image's median nucleus diameter, used to rescale every image to a canonical nucleus size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from service.postprocess import median_diameter


def mask_target(labels: np.ndarray) -> np.ndarray:
    """Binary target: 1 wherever any nucleus is."""
    return (labels > 0).astype(np.uint8)


#: Target code of a boundary pixel within reach of another nucleus (class 2, weighted more).
CONTACT = 3
#: Target code of a background pixel with two different nuclei within reach (class 0, weighted more).
GAP = 4
#: Added to the code of each pixel of a small nucleus: its codes follow ``GAP`` (interior 5, boundary 6, contact 7).
SMALL = GAP
#: A nucleus is small below this fraction of its image's median nucleus area.
SMALL_FRACTION = 0.5
_BASE_CLASSES = np.array([0, 1, 2, 2, 0], np.uint8)  # background, interior, boundary, CONTACT, GAP
#: Class of each target code: the network predicts 3 classes, the codes only steer the loss weights.
CLASS_OF_CODE = np.concatenate([_BASE_CLASSES, _BASE_CLASSES[1:SMALL]])


def code_weights(boundary: float, contact: float, small: float) -> np.ndarray:
    """Loss weight of each target code, in ``CLASS_OF_CODE``'s order (the code layout lives here only)."""
    base = np.array([1.0, 1.0, boundary, boundary * contact, contact], np.float32)
    return np.concatenate([base, small * base[1:SMALL]])


def boundary_target(labels: np.ndarray, width: int = 2, core: int = 0) -> np.ndarray:
    """3-class target: the outer ``width`` pixels of every nucleus are class 2, the rest class 1.

    Where two nuclei touch, both rims are boundary, so the interiors never touch; those rims are
    coded ``CONTACT`` and the background between nuclei closer than ``width`` pixels ``GAP``.
    With ``core`` > 0 every nucleus keeps at least that many interior pixels (see ``keep_cores``).
    Every pixel of a small nucleus (see ``small_nuclei``) gets ``SMALL`` added to its code.
    """
    inside = labels > 0
    edges = find_boundaries(labels, mode="inner") & inside
    if width > 1:
        edges = ndi.binary_dilation(edges, iterations=width - 1) & inside
    target = inside.astype(np.uint8)
    target[edges] = 2
    near_other, between = contacts(labels, width)
    target[edges & near_other] = CONTACT
    target[between] = GAP
    if core > 0:
        target[keep_cores(labels, target == 1, core)] = 1
    target[small_nuclei(labels)] += SMALL
    return target


def keep_cores(labels: np.ndarray, interior: np.ndarray, count: int) -> np.ndarray:
    """Pixels that become interior so that every nucleus has at least ``count`` of them.

    A rim of ``width`` px swallows a nucleus a few px across whole, and with no interior in its
    target the network has no seed to learn for it: 85% of the validation nuclei whose target had
    no interior are missed by the shipped model. Such a nucleus gets its ``count`` deepest pixels
    (distance to its own edge, ties kept) as interior; pixels beside another nucleus stay boundary,
    so two touching small nuclei still get two separate seeds. Measured with 9 (docs/training.md):
    a tie overall, and the network still missed those nuclei, so the preset does not use it.
    """
    labels = labels.astype(np.int64, copy=False)
    have = np.bincount(labels[interior], minlength=int(labels.max()) + 1)
    cores = np.zeros(labels.shape, bool)
    beside_other = contacts(labels, 1)[0]
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None or have[index] >= count:  # None: no nucleus has this number
            continue
        box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)  # 1 px of context: edges count
        own = labels[box] == index
        depth = ndi.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
        depth[~own | beside_other[box]] = 0.0
        candidates = np.sort(depth[depth > 0])[::-1]
        if candidates.size:
            cores[box] |= depth >= candidates[min(count, candidates.size) - 1]
    return cores


def small_nuclei(labels: np.ndarray) -> np.ndarray:
    """Pixels of nuclei smaller than ``SMALL_FRACTION`` of the image's median nucleus area.

    Relative to the image, because every image is rescaled to one canonical nucleus size: what is
    small is what is small beside its neighbours.
    """
    areas = np.bincount(labels.ravel().astype(np.int64))
    present = areas[1:][areas[1:] > 0]
    if present.size == 0:
        return np.zeros(labels.shape, bool)
    small = areas < SMALL_FRACTION * np.median(present)
    small[0] = False
    return small[labels]


def contacts(labels: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus pixels with another nucleus within ``reach`` px, background pixels with two nuclei within reach)."""
    labels = labels.astype(np.int64, copy=False)
    size = 2 * reach + 1
    absent = int(labels.max()) + 1
    upper = ndi.maximum_filter(labels, size)  # largest label nearby (background 0 never wins)
    lower = ndi.minimum_filter(np.where(labels > 0, labels, absent), size)  # smallest nucleus label nearby
    inside = labels > 0
    near_other = inside & ((upper > labels) | (lower < labels))
    between = ~inside & (lower < absent) & (upper > lower)
    return near_other, between


def distance_target(labels: np.ndarray) -> np.ndarray:
    """``uint8`` normalised distance to the nucleus' own edge: 255 at each nucleus' middle, 0 outside.

    Distances are measured inside each nucleus alone (a touching neighbour is an edge too).
    """
    inside = labels > 0
    rim = find_boundaries(labels, mode="inner") & inside
    distance = ndi.distance_transform_edt(inside & ~rim) + inside  # the rim is 1 px in, the next ring 2
    distance[~inside] = 0.0
    count = int(labels.max())
    if count == 0:
        return np.zeros(labels.shape, np.uint8)
    peak = np.asarray(ndi.maximum(distance, labels, index=np.arange(1, count + 1)), np.float64)
    peak = np.concatenate([[1.0], np.maximum(peak, 1.0)])
    return np.round(255.0 * distance / peak[labels]).astype(np.uint8)


def make_target(labels: np.ndarray, kind: str, width: int = 2, distance: bool = False,
                rays: bool = False, core: int = 0) -> np.ndarray:
    """Dispatch on the configured target kind: ``(H, W, C)`` codes [, distance] [, label low/high byte].

    Always channels-last, so augmentation, padding and the loss see one layout whatever the recipe.
    """
    if kind == "mask":
        codes = mask_target(labels)
    elif kind == "boundary":
        codes = boundary_target(labels, width, core)
    else:
        raise ValueError(f"unknown target kind {kind!r}")
    channels = [codes] + ([distance_target(labels)] if distance else [])
    if rays:
        if labels.max() >= 2**16:
            raise ValueError(f"{int(labels.max())} nuclei in one image: at most 65,535 can be stored")
        channels += [(labels % 256).astype(np.uint8), (labels // 256).astype(np.uint8)]
    return np.stack(channels, axis=-1)


def star_rays(label_bytes: np.ndarray, rays: int) -> np.ndarray:
    """``(H, W, rays) float32`` StarDist distances (px) from each nucleus pixel to its edge, 0 outside.

    ``label_bytes`` is ``(H, W, 2)``: the low and high byte of the instance labels (see ``make_target``).
    """
    from stardist.geometry import star_dist  # C++ (OpenMP): 30 ms for a 256x256 crop and 32 rays

    labels = label_bytes[..., 0].astype(np.int32) + 256 * label_bytes[..., 1].astype(np.int32)
    return star_dist(labels, rays, mode="cpp").astype(np.float32)


def scale_to_canonical(labels: np.ndarray, canonical: float, limits: tuple[float, float] = (0.2, 5.0)) -> float:
    """Factor that brings this image's median nucleus diameter to ``canonical`` pixels."""
    diameter = median_diameter(labels)
    if diameter is None:
        return 1.0
    return float(np.clip(canonical / diameter, *limits))
