"""Seeded train/validation split, stratified by imaging modality.

Stratifying keeps the rare bright-field and H&E images in both halves, so per-modality
validation scores exist and mean something. The split is stored in the model's metadata.
"""

from __future__ import annotations

import numpy as np

from service.modality import MODALITIES, modality  # noqa: F401 (re-exported: training's callers use them)

def split_ids(ids: list[str], groups: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (train, validation), ``val_fraction`` of each group to validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for group in sorted(set(groups)):
        members = sorted(i for i, g in zip(ids, groups) if g == group)
        rng.shuffle(members)
        n_val = int(round(len(members) * val_fraction)) if len(members) > 1 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def subsample_ids(ids: list[str], groups: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded share ``fraction`` of ``ids``, of each group alike (all of them at 1; a group of one
    image, which ``split_ids`` keeps whole on its training side, is left out).

    Training on part of the training split, with the validation split unchanged, measures how
    the scores depend on the amount of data, and so what more images of the same kinds could buy.
    """
    if fraction >= 1.0:
        return sorted(ids)
    _, kept = split_ids(ids, groups, fraction, seed)
    return kept


def group_of(source: str, image: np.ndarray) -> str:
    """The stratum of an image: its source and modality (``dsb2018/stage1_train:histology``)."""
    return f"{source}:{modality(image)}"


def split_by_source(ids: list[str], sources: list[str], groups: list[str], val_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """:func:`split_ids` run on each source alone (stratified by ``groups`` within it), then joined.

    Each source is split with a fresh generator of the same seed, so adding a source never moves an
    image of another between training and validation: DSB2018's validation ids stay those of
    every earlier model, and scores compare across models trained on different mixes.
    """
    train, val = [], []
    for source in sorted(set(sources)):
        members = [k for k, s in enumerate(sources) if s == source]
        part_train, part_val = split_ids([ids[k] for k in members], [groups[k] for k in members], val_fraction, seed)
        train += part_train
        val += part_val
    return sorted(train), sorted(val)


def sampling_probabilities(groups: list[str], balance: bool, power: float = 0.5,
                           sizes: list[float] | None = None) -> np.ndarray:
    """Per-image sampling probabilities; with ``balance``, each group's images weigh ``size ** -power``.

    A group then gets ``size ** (1 - power)`` of the samples: 0.5 (the square root) oversamples
    rare modalities without letting a handful of images dominate; 1 gives every group the same share.
    ``sizes`` counts each image as that many images (its area in training crops): 13 MoNuSeg
    images of 1000x1000 hold as many crops as 90 small DSB2018 images, and their group's share
    should say so. Within a group every image is drawn alike either way.
    """
    groups_arr = np.asarray(groups)
    sizes_arr = np.ones(len(groups)) if sizes is None else np.asarray(sizes, dtype=np.float64)
    weights = np.ones(len(groups), dtype=np.float64)
    if balance:
        for group in set(groups):
            members = groups_arr == group
            size = float(sizes_arr[members].sum())
            weights[members] = size ** (1.0 - power) / members.sum()
    return weights / weights.sum()
