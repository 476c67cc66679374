"""Instance decoding of class probabilities (the post-processing that the evaluation scores)."""

from __future__ import annotations

import numpy as np

from service.postprocess import PostprocessParams, instances_from_probabilities, nucleus_probability


def three_class(interior: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """(H, W, 3) probabilities from interior and boundary maps (background takes the rest)."""
    return np.stack([1.0 - interior - boundary, interior, boundary], axis=-1).astype(np.float32)


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_a_predicted_boundary_separates_touching_nuclei():
    left, right = disc((30, 50), (15, 16), 9), disc((30, 50), (15, 33), 9)
    touching = left | right
    boundary = touching & ~(disc((30, 50), (15, 16), 7) | disc((30, 50), (15, 33), 7))
    probs = three_class(np.where(touching & ~boundary, 0.9, 0.0), np.where(boundary, 0.9, 0.0))
    labels = instances_from_probabilities(probs, PostprocessParams(0.5, 0.5, 10))
    assert labels.max() == 2 and labels[15, 16] != labels[15, 33]
    for centre, true in (((15, 16), left), ((15, 33), right)):
        found = labels == labels[centre]
        assert (found & true).sum() / (found | true).sum() > 0.85  # each nucleus whole, boundary included


def test_seed_smoothing_keeps_a_one_pixel_dip_from_splitting_a_nucleus():
    nucleus = disc((40, 40), (20, 20), 12)
    interior = np.where(nucleus, 0.9, 0.0)
    interior[:, 20] = np.where(nucleus[:, 20], 0.5, 0.0)  # a thin line below the seed threshold
    probs = three_class(interior, np.zeros_like(interior))
    split = instances_from_probabilities(probs, PostprocessParams(0.3, 0.6, 10))
    smoothed = instances_from_probabilities(probs, PostprocessParams(0.3, 0.6, 10, seed_sigma=1.0))
    assert split.max() == 2
    assert smoothed.max() == 1
    assert np.array_equal(smoothed > 0, split > 0)  # smoothing moves seeds, never the foreground


def test_params_from_metadata_default_to_no_smoothing():
    assert PostprocessParams.from_dict({"seed_threshold": 0.7}).seed_sigma == 0.0
    params = PostprocessParams.from_dict({"seed_sigma": 1.0, "tuned_on": "validation", "min_size": 3})
    assert (params.seed_sigma, params.min_size) == (1.0, 3)


def test_nuclei_below_min_size_are_dropped():
    probs = three_class(np.where(disc((30, 30), (8, 8), 5), 0.9, 0.0) + np.where(disc((30, 30), (22, 22), 1), 0.9, 0.0),
                        np.zeros((30, 30)))
    labels = instances_from_probabilities(probs, PostprocessParams(0.5, 0.5, 10))
    assert labels.max() == 1 and labels[8, 8] == 1 and labels[22, 22] == 0


def test_a_distance_output_seeds_touching_nuclei_whose_interiors_run_together():
    shape = (30, 50)
    left, right = disc(shape, (15, 16), 9), disc(shape, (15, 31), 9)
    touching = left | right
    interior = np.where(touching, 0.9, 0.0)  # no boundary predicted between them: one interior blob
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    distance = np.maximum(np.where(left, 1 - np.hypot(yy - 15, xx - 16) / 9, 0),
                          np.where(right, 1 - np.hypot(yy - 15, xx - 31) / 9, 0))
    three = three_class(interior, np.zeros(shape))
    params = PostprocessParams(0.5, 0.5, 10)
    assert instances_from_probabilities(three, params).max() == 1  # P(interior) alone merges them
    labels = instances_from_probabilities(np.concatenate([three, distance[..., None]], -1).astype(np.float32), params)
    assert labels.max() == 2 and labels[15, 16] != labels[15, 31]
    assert np.array_equal(labels > 0, touching)  # the distance moves seeds, never the foreground


def test_seedless_foreground_at_the_image_edge_is_kept_only_where_asked():
    shape = (40, 60)
    whole = disc(shape, (20, 20), 8)  # a nucleus with a seed
    cut = disc(shape, (20, 62), 8) & ~disc(shape, (20, 62), 5)  # the rim of a nucleus whose middle is outside
    inner_rim = disc(shape, (8, 45), 4) & ~disc(shape, (8, 45), 2)  # seedless too, but inside the image
    sliver = np.zeros(shape, bool)
    sliver[0, 5:9] = True  # 4 px at the edge: under any sensible minimum
    boundary = (whole & ~disc(shape, (20, 20), 6)) | cut | inner_rim | sliver
    probs = three_class(np.where(whole & ~boundary, 0.9, 0.0), np.where(boundary, 0.9, 0.0))
    plain = PostprocessParams(0.5, 0.5, min_size=1)
    assert instances_from_probabilities(probs, plain).max() == 1  # the watershed keeps the seeded nucleus only
    labels = instances_from_probabilities(probs, PostprocessParams(0.5, 0.5, min_size=1, border_min_size=10))
    assert labels.max() == 2 and (labels[cut] == labels[20, 55]).all() and labels[20, 55] not in (0, labels[20, 20])
    assert not labels[inner_rim].any() and not labels[sliver].any()  # inside, or too small: still dropped
    touching = probs.copy()  # joined to a seeded nucleus by rim, the cut one is grown into it: no second nucleus
    touching[20, 28:56] = touching[20, 27]  # a bridge of rim from the nucleus to the cut one
    assert instances_from_probabilities(touching, PostprocessParams(0.5, 0.5, min_size=1, border_min_size=10)).max() == 1


def test_nucleus_probability_is_each_nucleus_mean_foreground_probability():
    labels = np.zeros((6, 8), np.int32)
    labels[1:3, 1:3] = 1
    labels[3:5, 4:7] = 2
    background = np.full((6, 8), 0.9, np.float32)
    background[1:3, 1:3] = [[0.1, 0.3], [0.1, 0.3]]  # P(nucleus) 0.9, 0.7: mean 0.8
    background[3:5, 4:7] = 0.6  # P(nucleus) 0.4
    probs = np.stack([background, 1.0 - background, np.zeros_like(background)], axis=-1)
    np.testing.assert_allclose(nucleus_probability(labels, probs), [0.8, 0.4], atol=1e-6)
    assert nucleus_probability(np.zeros((6, 8), np.int32), probs).shape == (0,)


def test_holes_are_filled_only_where_one_nucleus_encloses_them():
    """A hole inside one nucleus joins it; a gap enclosed by touching nuclei, or open to the image's
    edge, stays background (as per-nucleus ``binary_fill_holes`` had it)."""
    from service.postprocess import fill_holes

    labels = np.zeros((40, 60), np.int32)
    ring = disc(labels.shape, (12, 12), 8) & ~disc(labels.shape, (12, 12), 3)
    labels[ring] = 1  # one hole of 29 px inside nucleus 1
    labels[20:31, 30:45] = 2  # nuclei 2 and 3 together enclose a gap, each alone does not
    labels[20:31, 45:56] = 3
    labels[23:28, 40:50] = 0  # the gap straddles their common border
    labels[22:29, 39] = 2
    labels[22, 39:51], labels[28, 39:51] = 2, 2
    labels[22:29, 50], labels[22, 45:51], labels[28, 45:51] = 3, 3, 3
    labels[0:6, 50:60] = 4
    labels[0:3, 54:56] = 0  # a notch open to the top edge: not a hole
    filled = fill_holes(labels)
    assert (filled[disc(labels.shape, (12, 12), 3)] == 1).all()
    assert (filled[23:28, 40:50] == 0).all()
    assert (filled[0:3, 54:56] == 0).all()
    changed = filled != labels
    assert changed.sum() == disc(labels.shape, (12, 12), 3).sum()  # nothing else moved
    assert filled.dtype == labels.dtype and fill_holes(np.zeros((5, 5), np.int32)).max() == 0
