"""StarDist rays: targets, flips, decoding, rescaling and the trained-and-exported output layout."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries
from stardist.geometry import star_dist

from service.model import METADATA_FILE, ModelLoadError, ModelSpec, SegmentationModel
from service.pipeline import SegmentOptions, segment
from service.postprocess import RAY_START, PostprocessParams, flipped_ray_order, instances_from_probabilities
from tests.conftest import tiny_config
from tests.test_pipeline import CANONICAL, DiskModel, disks
from training.config import TrainConfig, preset
from training.evaluate import tune_thresholds
from training.report import decoding_note, distance_note
from training.targets import distance_target, make_target, star_rays
from training.train import parse_args, train

RAYS = 16


def triangles(shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    """Instance labels of two right triangles: no flip maps either onto itself."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    labels[(yy > 8) & (xx > 6) & (yy - 8 > 1.5 * (xx - 6) - 10) & (yy < 50) & (xx < 36)] = 1
    labels[(yy > 20) & (xx > 44) & (yy - 20 < 0.5 * (xx - 44)) & (xx < 76)] = 2
    return labels


def star_output(labels: np.ndarray, merged: bool = False) -> np.ndarray:
    """The output a perfect StarDist-ray model gives for ``labels``: classes, distance, rays.

    ``merged``: the classes and the distance output see touching nuclei as one blob (the commonest
    error on stained tissue); only the rays still know each nucleus' own shape.
    """
    inside = labels > 0
    blob = ndi.label(inside)[0] if merged else labels
    interior = inside & ~ndi.binary_dilation(find_boundaries(blob, mode="inner") & inside)
    classes = np.stack([~inside, interior, inside & ~interior], axis=-1).astype(np.float32)
    distance = (np.where(inside, 0.9, 0.0) if merged else distance_target(labels) / 255.0).astype(np.float32)
    return np.concatenate([classes, distance[..., None], star_dist(labels, RAYS, mode="cpp")], axis=-1)


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
def test_flipped_ray_order_turns_a_flipped_images_rays_back(axes: tuple[int, ...]):
    labels = triangles()
    direct = star_dist(labels, RAYS, mode="cpp")
    flipped = np.flip(star_dist(np.ascontiguousarray(np.flip(labels, axes)), RAYS, mode="cpp"), axes)
    restored = flipped[..., flipped_ray_order(RAYS, axes)]
    inside = labels > 0
    assert np.median(np.abs(restored - direct)[inside]) < 0.5  # equal up to pixel rounding
    assert np.median(np.abs(flipped - direct)[inside]) > 2.0  # while the unpermuted rays are not


def test_polygons_separate_touching_nuclei_that_share_one_interior():
    left, right = disks_at([(20, 18), (20, 37)], radius=10)
    labels = left + 2 * (right & ~left)
    probs = star_output(labels, merged=True)
    merged = instances_from_probabilities(probs, PostprocessParams(0.5, 0.5, 10, instances="watershed"))
    assert merged.max() == 1
    for kind in ("polygons", "polygons_in_foreground"):
        found = instances_from_probabilities(probs, PostprocessParams(0.5, 0.5, 10, instances=kind))
        assert found.max() == 2, kind
        for nucleus in (labels == 1, labels == 2):
            hit = found == np.bincount(found[nucleus]).argmax()
            assert (hit & nucleus).sum() / (hit | nucleus).sum() > 0.8, kind


def test_polygons_in_foreground_take_the_foregrounds_extent():
    labels = triangles()
    probs = star_output(labels)
    foreground = (1.0 - probs[..., 0]) > 0.5
    inside = instances_from_probabilities(probs, PostprocessParams(0.5, 0.5, 10, instances="polygons_in_foreground"))
    assert inside.max() == 2
    assert np.array_equal(inside > 0, foreground)


def test_an_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="instances"):
        PostprocessParams(instances="stardist")


def test_a_model_without_rays_cannot_be_set_to_decode_polygons(tile_model_dir: Path, tmp_path: Path):
    model_dir = tmp_path / "model"
    shutil.copytree(tile_model_dir, model_dir)  # 3 classes, no rays
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    metadata["postprocess"]["instances"] = "polygons"
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="needs StarDist ray outputs"):
        SegmentationModel.load(model_dir)


def test_rays_are_computed_from_the_label_bytes_the_target_carries():
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15], labels[20:35, 10:30] = 300, 7  # a label above 255 needs both bytes
    target = make_target(labels, "boundary", 2, distance=True, rays=True)
    assert target.shape == (40, 40, 4) and target.dtype == np.uint8
    np.testing.assert_array_equal(star_rays(target[..., 2:4], RAYS), star_dist(labels, RAYS, mode="cpp"))


def test_rays_need_the_distance_output_and_the_3_class_target():
    with pytest.raises(ValueError, match="distance"):
        TrainConfig(rays=RAYS)
    with pytest.raises(ValueError, match="3-class"):
        TrainConfig(rays=RAYS, distance_weight=1.0, target="mask")
    with pytest.raises(ValueError, match="rays must be 0 or more"):  # -1 would still count as "has rays"
        TrainConfig(rays=-1, distance_weight=1.0)
    with pytest.raises(SystemExit):  # a usage error, before any data loads
        parse_args(["--data", "d", "--out", "o", "--preset", "best", "--rays", "32"])
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--rays", "32", "--distance-weight", "1"])
    assert config.rays == 32 and config.output_channels == 3 + 1 + 32


class StarDiskModel(DiskModel):
    """``DiskModel`` plus a perfect distance output and rays, measured in the pixels of each tile."""

    def __init__(self) -> None:
        super().__init__()
        spec = self.spec
        self.spec = ModelSpec(spec.image_size, RAY_START + RAYS, spec.inference, spec.normalise,
                              spec.canonical_diameter, spec.tile_overlap,
                              PostprocessParams(0.5, 0.5, 4, instances="polygons"), metadata={})

    def predict_now(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        return np.stack([star_output(ndi.label(tile[..., 0] > 127)[0]) for tile in batch])


def test_ray_lengths_follow_the_scale_the_image_was_run_at():
    diameter = 40  # run at half scale: the model sees 20-px disks, the labels are drawn at 40 px
    image = disks(diameter, 3)
    result = segment(image, StarDiskModel())
    assert result.scale == pytest.approx(CANONICAL / diameter, rel=0.1)
    true = ndi.label(image[..., 0] > 127)[0]
    assert result.labels.max() == true.max()
    for index in range(1, true.max() + 1):
        nucleus = true == index
        hit = result.labels == np.bincount(result.labels[nucleus]).argmax()
        assert (hit & nucleus).sum() / (hit | nucleus).sum() > 0.8


def test_test_time_flips_keep_the_rays_pointing_the_right_way():
    image = np.repeat((triangles((96, 96)) > 0)[..., None].astype(np.uint8) * 255, 3, axis=-1)
    model = StarDiskModel()
    options = SegmentOptions(auto_scale=False)
    plain = segment(image, model, options).probabilities
    flipped = segment(image, model, SegmentOptions(auto_scale=False, tta=True)).probabilities
    inside = image[..., 0] > 0
    assert np.median(np.abs(flipped - plain)[inside][:, RAY_START:]) < 0.5


def disks_at(centres: list[tuple[int, int]], radius: float, shape: tuple[int, int] = (40, 56)) -> list[np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return [(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2 for cy, cx in centres]


@pytest.fixture(scope="module")
def ray_model_dir(dataset_dir, tmp_path_factory) -> Path:
    """A tiny model with the distance output and 8 rays, trained and exported by the real training code."""
    run = tmp_path_factory.mktemp("run_rays")
    train(tiny_config("best").override(distance_weight=1.0, distance_head=1, rays=8), dataset_dir, run,
          evaluate_after=False)
    return run / "model"


def test_a_trained_model_with_rays_exports_classes_distance_and_non_negative_rays(ray_model_dir: Path):
    model = SegmentationModel.load(ray_model_dir)
    assert model.spec.metadata["classes"] == ["background", "interior", "boundary", "distance",
                                              *[f"ray_{k}" for k in range(8)]]
    probs = model.predict(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    assert probs.shape == (2, 64, 64, RAY_START + 8)
    np.testing.assert_allclose(probs[..., :3].sum(-1), 1.0, atol=1e-4)
    assert ((probs[..., 3] > 0) & (probs[..., 3] < 1)).all() and (probs[..., RAY_START:] >= 0).all()
    polygons = PostprocessParams(0.5, 0.5, 4, instances="polygons", candidate_threshold=0.3)
    model.spec = replace(model.spec, postprocess=polygons)
    assert segment(np.zeros((40, 50, 3), np.uint8), model).labels.shape == (40, 50)


def test_tuning_a_model_with_rays_also_tries_polygons(ray_model_dir: Path, dataset_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture):
    model_dir = tmp_path / "model"
    shutil.copytree(ray_model_dir, model_dir)
    chosen = tune_thresholds(model_dir, dataset_dir)
    printed = capsys.readouterr().out
    assert "best polygons:" in printed and "best polygons_in_foreground:" in printed
    stored = SegmentationModel.load(model_dir).spec.postprocess
    assert stored.instances == chosen["instances"] and stored.nms_threshold == chosen["nms_threshold"]


def test_the_report_says_how_rays_are_trained_and_decoded():
    config = preset("best").override(distance_weight=1.0, rays=32)
    assert "32 rays" in distance_note(config)
    assert "watershed seeded by" in decoding_note(PostprocessParams(), "the distance output")
    assert "edge" not in decoding_note(PostprocessParams(), "the distance output")
    assert "at least 50 px at the image's edge" in decoding_note(PostprocessParams(border_min_size=50), "P")
    polygons = decoding_note(PostprocessParams(instances="polygons", nms_threshold=0.3), "the distance output")
    assert "IoU 0.3" in polygons and "watershed" not in polygons
    assert "watershed gives each its pixels" in decoding_note(
        PostprocessParams(instances="polygons_in_foreground"), "the distance output")
