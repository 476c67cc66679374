"""The validation split, the modality classifier it is stratified by, and crop sampling by modality."""

import numpy as np
import pytest

from training.split import group_of, modality, sampling_probabilities, split_by_source, split_ids, subsample_ids


def group_shares(groups: list[str], probabilities: np.ndarray) -> dict[str, float]:
    labels = np.asarray(groups)
    return {g: float(probabilities[labels == g].sum()) for g in sorted(set(groups))}


GROUPS = ["fluorescence"] * 400 + ["histology"] * 100 + ["brightfield"] * 16


def test_without_balance_every_image_is_equally_likely():
    probabilities = sampling_probabilities(GROUPS, balance=False)
    assert np.allclose(probabilities, 1 / len(GROUPS))


def test_square_root_balance_gives_each_modality_a_share_proportional_to_the_root_of_its_size():
    shares = group_shares(GROUPS, sampling_probabilities(GROUPS, balance=True))
    roots = {"fluorescence": 20.0, "histology": 10.0, "brightfield": 4.0}
    assert shares == pytest.approx({g: r / sum(roots.values()) for g, r in roots.items()})


def test_power_one_gives_every_modality_the_same_share():
    probabilities = sampling_probabilities(GROUPS, balance=True, power=1.0)
    assert probabilities.sum() == pytest.approx(1.0)
    assert group_shares(GROUPS, probabilities) == pytest.approx({g: 1 / 3 for g in set(GROUPS)})


def test_split_is_seeded_disjoint_and_stratified():
    ids = [f"img{i:03d}" for i in range(len(GROUPS))]
    train, val = split_ids(ids, GROUPS, 0.25, seed=7)
    assert (train, val) == split_ids(ids, GROUPS, 0.25, seed=7)
    assert not set(train) & set(val) and len(train) + len(val) == len(ids)
    by_id = dict(zip(ids, GROUPS))
    assert sum(by_id[i] == "brightfield" for i in val) == 4  # a quarter of each modality
    assert sum(by_id[i] == "histology" for i in val) == 25
    assert split_ids(ids, GROUPS, 0.25, seed=8)[1] != val


def test_training_share_is_seeded_stratified_and_inside_the_training_split():
    ids = [f"img{i:03d}" for i in range(len(GROUPS))]
    by_id = dict(zip(ids, GROUPS))
    train, val = split_ids(ids, GROUPS, 0.25, seed=7)
    half = subsample_ids(train, [by_id[i] for i in train], 0.5, seed=7)
    assert half == subsample_ids(train, [by_id[i] for i in train], 0.5, seed=7)
    assert set(half) < set(train) and not set(half) & set(val)
    assert sum(by_id[i] == "histology" for i in half) == 38  # half of the 75 training histology images, rounded
    assert sum(by_id[i] == "brightfield" for i in half) == 6  # half of 12
    assert subsample_ids(train, [by_id[i] for i in train], 1.0, seed=7) == sorted(train)


def test_split_rejects_a_fraction_outside_zero_to_one():
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(["a", "b"], ["x", "x"], 1.0, seed=0)


def test_modality_from_background_and_colour():
    dark = np.full((32, 32, 3), 10, np.uint8)
    dark[8:16, 8:16] = 200  # a bright nucleus on black
    grey = np.full((32, 32, 3), 220, np.uint8)
    grey[8:16, 8:16] = 90  # a dark nucleus on a white field
    stained = np.zeros((32, 32, 3), np.uint8)
    stained[...] = (200, 170, 220)  # pink-purple H&E background
    stained[8:16, 8:16] = (90, 40, 150)
    assert modality(dark) == "fluorescence"
    assert modality(grey) == "brightfield"
    assert modality(stained) == "histology"


def test_sizes_weigh_a_group_by_its_area_and_leave_images_within_it_alike():
    groups = ["small"] * 100 + ["large"] * 4
    sizes = [1.0] * 100 + [25.0] * 4  # four images, each as big as 25 small ones
    probabilities = sampling_probabilities(groups, balance=True, sizes=sizes)
    assert group_shares(groups, probabilities) == pytest.approx({"small": 0.5, "large": 0.5})
    assert np.allclose(probabilities[:100], probabilities[0]) and np.allclose(probabilities[100:], probabilities[100])
    # counted by image, the four would get sqrt(4) / (sqrt(4) + sqrt(100)) of the crops
    assert group_shares(groups, sampling_probabilities(groups, balance=True))["large"] == pytest.approx(2 / 12)


def test_adding_a_source_leaves_the_other_sources_split_as_it_was():
    ids = [f"img{i:03d}" for i in range(len(GROUPS))]
    alone = split_by_source(ids, ["dsb"] * len(ids), GROUPS, 0.2, seed=42)
    assert alone == split_ids(ids, GROUPS, 0.2, seed=42)  # one source: the split every earlier model had
    extra = [f"tcga{i}" for i in range(13)]
    train, val = split_by_source(ids + extra, ["dsb"] * len(ids) + ["monuseg"] * 13,
                                 GROUPS + ["monuseg:histology"] * 13, 0.2, seed=42)
    assert [i for i in val if i.startswith("img")] == alone[1]
    assert sum(i.startswith("tcga") for i in val) == 3 and sum(i.startswith("tcga") for i in train) == 10


def test_group_names_source_and_modality():
    dark = np.full((8, 8, 3), 10, np.uint8)
    assert group_of("monuseg/train", dark) == "monuseg/train:fluorescence"
