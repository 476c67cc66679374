"""Training module: loading, targets, augmentation, model, CLI run, export."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import ndimage as ndi

from tests.conftest import tiny_config
from tests.synthetic import disc_labels, make_dataset
from training import augment
from training.config import PRESETS, TrainConfig, preset
from training.data import DataError, data_load, load_dataset
from training.export import export_model
from training.model import build_unet
from training.losses import segmentation_loss, soft_dice_loss
from training.targets import CLASS_OF_CODE, CONTACT, GAP, SMALL, boundary_target, distance_target, make_target
from training.train import main, parse_args, split_record


def test_loader_merges_masks_and_handles_modes(dataset_dir: Path):
    ds = load_dataset(dataset_dir)
    assert len(ds) == 8 and ds.ids == sorted(ds.ids)
    for sample in ds.samples:
        assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
        masks = sorted((dataset_dir / sample.id / "masks").glob("*.png"))
        assert sample.labels.max() == len(masks)
        union = np.zeros(sample.labels.shape, bool)
        for m in masks:
            union |= np.asarray(Image.open(m)) > 0
        np.testing.assert_array_equal(sample.mask, union.astype(np.uint8))
    # grayscale and RGBA images decode to the same pixels in all three channels
    gray = ds.samples[1].image
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_reference_loader_returns_stacked_arrays(dataset_dir: Path):
    images, masks, ids = data_load(dataset_dir, image_size=32)
    assert images.shape == (8, 32, 32, 3) and masks.shape == (8, 32, 32, 1)
    assert set(np.unique(masks)) <= {0, 1} and len(ids) == 8


@pytest.mark.parametrize("breakage", ["no_images", "bad_png", "wrong_size_mask"])
def test_bad_data_names_the_file(tmp_path: Path, breakage: str):
    root = make_dataset(tmp_path / "d", count=2)
    sample = root / "img01"
    if breakage == "no_images":
        shutil.rmtree(sample / "images")
        culprit = "img01.png"
    elif breakage == "bad_png":
        (sample / "images" / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        culprit = "img01.png"
    else:
        bad = next((sample / "masks").glob("*.png"))
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad)
        culprit = bad.name
    with pytest.raises(DataError, match=culprit):
        load_dataset(root)


def test_boundary_target_separates_touching_nuclei():
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2
    target = boundary_target(labels, width=2)
    classes = CLASS_OF_CODE[target]
    assert set(np.unique(classes)) == {0, 1, 2}
    assert (classes[5:15, 13:17] == 2).all()  # the shared edge is boundary on both sides
    assert (target[6:14, 13:17] == CONTACT).all()  # ... and marked as a contact, weighted more
    assert (target[5:15, 5:7] == 2).all()  # an edge facing background is plain boundary
    interior = classes == 1
    from scipy import ndimage as ndi

    assert ndi.label(interior)[1] == 2  # interiors of touching nuclei do not touch


def test_cores_give_small_nuclei_an_interior_and_leave_large_ones_alone():
    from scipy import ndimage as ndi

    labels = np.zeros((30, 40), np.int32)
    labels[2:5, 2:5] = 1  # 3x3: a 2-px rim swallows it whole
    labels[10:13, 10:13] = 2
    labels[10:13, 13:16] = 3  # touching 2 along a whole side
    labels[15:29, 20:34] = 4  # 14x14: plenty of interior already
    plain = CLASS_OF_CODE[boundary_target(labels, width=2)]
    assert not (plain[labels == 1] == 1).any() and not (plain[labels == 2] == 1).any()
    cored = CLASS_OF_CODE[boundary_target(labels, width=2, core=1)]
    assert cored[3, 3] == 1 and (cored[labels == 1] == 1).sum() == 1  # the deepest pixel, the centre
    assert (CLASS_OF_CODE[boundary_target(labels, width=2, core=9)][labels == 1] == 1).all()  # 9 px: all of it
    many = CLASS_OF_CODE[boundary_target(labels, width=2, core=9)]
    assert (many[10:13, 12:14] == 2).all()  # the columns where 2 and 3 touch stay boundary ...
    assert ndi.label(many[8:15, 8:18] == 1)[1] == 2  # ... so the two get two separate cores
    assert ((many == plain) | (labels != 4)).all()  # a large nucleus' target is unchanged
    assert (make_target(labels, "boundary", 2, core=9)[..., 0] == boundary_target(labels, 2, core=9)).all()


def test_gap_between_close_nuclei_is_marked_but_lone_background_is_not():
    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 5:15] = 1
    labels[5:15, 16:26] = 2  # one background column between 1 and 2
    labels[5:15, 33:38] = 3  # far from everything
    target = boundary_target(labels, width=2)
    assert (target[6:14, 15] == GAP).all()
    assert not (target[:, 27:33] == GAP).any()
    assert (target[5:15, 36:38] == 2).all() and not (target[:, 30:] == CONTACT).any()


def test_small_nuclei_are_marked_relative_to_their_image():
    labels = np.zeros((40, 60), np.int32)
    labels[2:14, 2:14] = 1
    labels[2:14, 20:32] = 2
    labels[20:32, 2:14] = 3
    labels[20:26, 20:26] = 4  # a quarter of the median area: small
    labels[20:29, 40:49] = 5  # 81 px, over half the median 144: not small
    target = boundary_target(labels, width=2)
    small = target >= SMALL + 1
    assert (small == (labels == 4)).all()
    assert (CLASS_OF_CODE[target[labels == 4]] == CLASS_OF_CODE[target[labels == 4] - SMALL]).all()
    assert set(np.unique(CLASS_OF_CODE[target[labels == 4]])) == {1, 2}  # classes unchanged, interior and rim
    alone = np.zeros((20, 20), np.int32)
    alone[5:8, 5:8] = 1  # one nucleus is its image's median: never small
    assert not (boundary_target(alone, width=1) > CONTACT).any()


def test_distance_target_peaks_in_the_middle_of_each_touching_nucleus():
    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2  # touches 1 along a whole edge
    labels[8:11, 30:33] = 3  # small: still peaks at 255
    distance = distance_target(labels).astype(int)
    assert (distance[labels == 0] == 0).all() and (distance[labels > 0] > 0).all()
    for k in (1, 2, 3):
        assert distance[labels == k].max() == 255
    assert distance[9, 14] < 100 and distance[9, 15] < 100  # the shared edge is an edge of both
    row = distance[9, 5:15]
    assert (np.diff(row[:5]) >= 0).all() and (np.diff(row[5:]) <= 0).all()  # rises to the middle, falls after
    stacked = make_target(labels, "boundary", 2, distance=True)
    assert stacked.shape == (20, 40, 2) and np.array_equal(stacked[..., 1], distance)


def test_distance_loss_adds_weighted_sigmoid_cross_entropy_to_the_class_loss():
    config = tiny_config("best").override(distance_weight=0.5)
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(2, 4, 4, 4)), tf.float32)
    classes = rng.integers(0, 3, (2, 4, 4))
    distance = rng.random((2, 4, 4))
    y_true = tf.constant(np.stack([classes, distance], -1), tf.float32)
    expected = np.mean(
        keras_ce(classes, logits[..., :3]) + 0.5 * tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.constant(distance, tf.float32), logits=logits[..., 3]).numpy())
    per_pixel = segmentation_loss(config)(y_true, logits).numpy()
    assert per_pixel.shape == (2, 4, 4) and per_pixel.mean() == pytest.approx(expected, rel=1e-5)
    # without the distance output the loss is Keras' cross-entropy over the classes
    plain = segmentation_loss(config.override(distance_weight=0.0))
    assert float(plain(classes, logits[..., :3])) == pytest.approx(float(np.mean(keras_ce(classes, logits[..., :3]))), rel=1e-5)


def test_dice_term_scores_each_images_nucleus_classes_as_a_whole():
    config = tiny_config("best").override(distance_weight=0.0, dice_weight=0.5)
    classes = np.zeros((2, 8, 8), np.int64)
    classes[0, 2:6, 2:6], classes[0, 2:6, 6] = 1, 2  # image 0: one nucleus with a rim; image 1: none
    sure = tf.constant(np.eye(3)[classes] * 20.0 - 10.0, tf.float32)  # confident and right everywhere
    # a tiny nucleus missed: a few pixels of cross-entropy, but the whole of the interior's Dice
    missed = sure.numpy()
    missed[0, 2:6, 2:6] = [10.0, -10.0, -10.0]
    dice = soft_dice_loss(tf.constant(classes), tf.constant(missed)).numpy()
    assert dice[1] == pytest.approx(0.0, abs=1e-6)  # empty and predicted empty: no penalty
    assert dice[0] == pytest.approx((1 - 1 / 17 + 1 - 9 / 9) / 2, abs=1e-4)  # interior (16 px) lost; rim (4) kept
    loss = segmentation_loss(config)
    assert loss(classes, sure).numpy().max() == pytest.approx(0.0, abs=1e-3)
    per_pixel = loss(classes, tf.constant(missed)).numpy()
    assert per_pixel.shape == (2, 8, 8)
    assert per_pixel.mean() == pytest.approx(keras_ce(classes, missed).mean() + 0.5 * dice[0] / 2, rel=1e-5)
    with pytest.raises(SystemExit):  # a negative weight would reward missing nuclei
        parse_args(["--data", "d", "--out", "o", "--dice-weight", "-1"])
    with pytest.raises(ValueError, match="dice_weight"):
        TrainConfig(dice_weight=-1.0)
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best", "--dice-weight", "1"])[0].dice_weight == 1.0


def keras_ce(classes: np.ndarray, logits: tf.Tensor) -> np.ndarray:
    return keras.losses.sparse_categorical_crossentropy(classes, logits, from_logits=True).numpy()


def test_distance_channel_moves_with_the_classes_through_augmentation_and_weights():
    config = tiny_config("best").override(colour=False, distance_weight=1.0)
    labels = np.zeros((96, 96), np.int32)
    labels[20:50, 20:50], labels[20:50, 50:80], labels[60:90, 30:60] = 1, 2, 3
    target = make_target(labels, "boundary", 2, distance=True)
    tf.random.set_seed(5)
    _, y = augment.augment(tf.zeros((96, 96, 3), tf.uint8), tf.constant(target), config, 64)
    _, classes, weights = augment.with_weights(tf.zeros((64, 64, 3)), y, config)
    classes = classes.numpy()
    assert classes.shape == (64, 64, 2) and weights.shape == (64, 64)
    assert ((classes[..., 0] == 0) == (classes[..., 1] == 0)).all()  # distance is 0 exactly off the nuclei
    assert classes[..., 1].max() <= 1.0 and classes[..., 1][classes[..., 0] == 1].min() >= 0.1  # interiors lie at least 3 of 15 px in


def test_loss_weights_follow_the_target_codes():
    config = tiny_config("best").override(boundary_weight=2.0, contact_weight=5.0, small_weight=3.0,
                                          distance_weight=0.0)
    codes = tf.constant(np.arange(8, dtype=np.uint8).reshape(1, 8, 1))
    _, classes, weights = augment.with_weights(tf.zeros((1, 8, 3)), codes, config)
    assert classes.numpy().tolist() == [[0, 1, 2, 2, 0, 1, 2, 2]]
    assert weights.numpy().tolist() == [[1.0, 1.0, 2.0, 10.0, 5.0, 3.0, 6.0, 30.0]]
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best", "--small-weight", "3"])[0].small_weight == 3.0
    with pytest.raises(SystemExit):  # a zero weight would silently drop small nuclei from the loss
        parse_args(["--data", "d", "--out", "o", "--small-weight", "0"])
    with pytest.raises(ValueError, match="small_weight"):  # the config itself refuses it, metadata files too
        TrainConfig(small_weight=0.0)


def test_augmentation_keeps_image_and_mask_aligned():
    config = tiny_config("best").override(colour=False)
    rng = np.random.default_rng(1)
    target = np.kron(rng.random((12, 12)) > 0.5, np.ones((8, 8))).astype(np.uint8)
    image = np.repeat(target[..., None] * 255, 3, axis=-1).astype(np.uint8)
    tf.random.set_seed(3)
    for _ in range(5):
        x, y = augment.augment(tf.constant(image), tf.constant(target[..., None]), config, 64)
        x, y = x.numpy(), y.numpy()[..., 0]
        # where the image is clearly white/black, the nearest-neighbour mask agrees
        confident = (x[..., 0] > 230) | (x[..., 0] < 25)
        assert confident.mean() > 0.3
        agree = (x[..., 0] > 127) == (y == 1)
        assert agree[confident].mean() > 0.97
        assert set(np.unique(y)) <= {0, 1}


def test_copy_paste_adds_whole_nuclei_on_free_background_only():
    # two touching discs, one lone disc, one cut by the crop's edge; the rest is free background
    labels = disc_labels((160, 160), [(40, 40), (40, 55), (110, 50), (80, 2)], radius=8)
    target = boundary_target(labels)[..., None]
    image = np.where(labels[..., None] > 0, 200, 10).astype(np.uint8).repeat(3, axis=-1)
    image[labels == 4] = 90  # the edge-cut nucleus has a colour of its own
    pasted = 0
    for seed in range(8):
        new_image, new_target = augment.paste_nuclei(image, target, np.random.default_rng(seed), most=10)
        changed = (new_target != target)[..., 0]
        assert np.all(target[changed] == 0)  # only plain background took codes: every nucleus' target is kept
        assert np.all(ndi.binary_dilation(target[..., 0] != 0, iterations=2)[changed] == 0)  # not next to one
        assert np.all(new_image[changed] == 200)  # whole nuclei of the crop, never the edge-cut one (90)
        assert set(np.unique(new_target)) <= set(np.unique(target))  # codes of the crop's own, rims included
        pasted += changed.any()
    assert pasted >= 6  # most draws find room on a mostly empty crop
    empty = np.zeros_like(target)
    same_image, same_target = augment.paste_nuclei(image, empty, np.random.default_rng(0))
    assert same_image is image and same_target is empty  # nothing to copy: the crop is returned as it is


def test_copy_paste_flag_is_a_probability_for_crops():
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--copy-paste", "0.5"])
    assert config.copy_paste == 0.5 and preset("best").copy_paste == 0.0
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(["--data", "d", "--out", "o", "--preset", "best", "--copy-paste", bad])
    with pytest.raises(ValueError, match="copy_paste"):
        TrainConfig(copy_paste=0.5)  # the reference recipe resizes whole images: there is no crop to paste into


def test_gaussian_blur_keeps_flat_images_and_smooths_noise():
    flat = tf.fill([32, 40, 3], 0.4)
    np.testing.assert_allclose(augment.gaussian_blur(flat, tf.constant(1.5)).numpy(), 0.4, atol=1e-5)
    noise = tf.constant(np.random.default_rng(0).random((64, 64, 3)), tf.float32)
    blurred = augment.gaussian_blur(noise, tf.constant(1.5)).numpy()
    assert blurred.shape == (64, 64, 3)
    assert blurred.std() < 0.5 * noise.numpy().std()  # a 1.5-px blur averages ~30 pixels
    assert abs(blurred.mean() - noise.numpy().mean()) < 0.01


def test_acquisition_artefacts_change_some_crops_and_stay_in_range():
    tf.random.set_seed(0)
    image = tf.constant(np.kron(np.random.default_rng(1).random((8, 8, 1)) > 0.5, np.ones((8, 8, 3))), tf.float32)
    outputs = [augment.acquisition_artefacts(image).numpy() for _ in range(12)]
    assert all(o.shape == (64, 64, 3) and o.min() >= 0.0 and o.max() <= 1.0 for o in outputs)
    changed = [np.abs(o - image.numpy()).mean() > 1e-3 for o in outputs]
    assert 3 <= sum(changed) <= 11  # each of three artefacts a third of the time: most crops, not all
    with pytest.raises(ValueError, match="artefacts"):
        TrainConfig(artefacts=True)  # without the colour augmentation they would silently do nothing
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--artefacts"])
    assert config.artefacts and not preset("best").artefacts


def test_model_output_shape_fixed_and_any_size():
    ref = build_unet(tiny_config("reference"))
    assert ref.output_shape == (None, 64, 64, 2)
    tile = build_unet(tiny_config("best").override(distance_weight=0.0))
    assert tile(np.zeros((1, 96, 64, 3), np.float32)).shape == (1, 96, 64, 3)
    with_distance = build_unet(tiny_config("best").override(distance_weight=1.0))
    assert with_distance(np.zeros((1, 96, 64, 3), np.float32)).shape == (1, 96, 64, 4)


def refine_blocks(model) -> list[str]:
    return sorted(layer.name for layer in model.layers if layer.name.startswith("refine_"))


def test_decoder_convs_add_refine_blocks_at_every_level():
    assert refine_blocks(build_unet(tiny_config("best").override(decoder_convs=0))) == []
    refined = build_unet(tiny_config("best").override(decoder_convs=2))
    assert refine_blocks(refined) == [f"refine_{i}_{j}" for i in range(4) for j in range(2)]
    assert refined.get_layer("refine_3_1").output.shape[-1] == 16  # the level's decoder width
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best", "--decoder-convs", "2"])[0].decoder_convs == 2
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best"])[0].decoder_convs == 2  # the preset's
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--decoder-convs", "-1"])
    with pytest.raises(ValueError, match="decoder_convs"):  # the config refuses it, not only the CLI
        TrainConfig(decoder_convs=-1)


def test_full_res_level_joins_the_input_at_full_resolution():
    plain = build_unet(tiny_config("best"))
    assert isinstance(plain.get_layer("logits"), keras.layers.Conv2DTranspose)  # 1/2 resolution to logits
    full = build_unet(tiny_config("best").override(full_res_filters=4))
    assert full.get_layer("stem_full").output.shape[1:] == (None, None, 4)  # a conv of the input itself
    assert full.get_layer("skip_full").output.shape[-1] == 8  # upsampled features + input conv
    assert isinstance(full.get_layer("logits"), keras.layers.Conv2D)
    assert not isinstance(full.get_layer("logits"), keras.layers.Conv2DTranspose)
    assert full(np.zeros((1, 64, 96, 3), np.float32)).shape == (1, 64, 96, 3)
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--full-res-filters", "-1"])
    assert parse_args(["--data", "d", "--out", "o", "--full-res-filters", "8"])[0].full_res_filters == 8
    with pytest.raises(ValueError, match="full_res_filters"):
        TrainConfig(full_res_filters=-1)


def test_distance_head_gives_the_distance_a_branch_of_its_own():
    shared = build_unet(tiny_config("best").override(distance_weight=1.0, distance_head=0))
    assert not any(layer.name.startswith("distance_") for layer in shared.layers)
    own = build_unet(tiny_config("best").override(distance_weight=1.0, distance_head=2))
    assert [layer.name for layer in own.layers if layer.name.startswith("distance_")] == [
        "distance_0", "distance_1", "distance_logits"]
    assert own.get_layer("class_logits").output.shape[-1] == 3
    assert own(np.zeros((1, 64, 96, 3), np.float32)).shape == (1, 64, 96, 4)
    with pytest.raises(SystemExit):  # a clear argparse error, not a silently odd network
        parse_args(["--data", "d", "--out", "o", "--distance-head", "-1"])
    with pytest.raises(ValueError, match="distance_head"):  # a metadata file is checked like the CLI
        TrainConfig(distance_weight=1.0, distance_head=-1)
    # without the distance output, a head setting changes nothing
    plain = build_unet(tiny_config("best").override(distance_weight=0.0, distance_head=2))
    assert plain.count_params() == build_unet(tiny_config("best").override(distance_weight=0.0)).count_params()


def encoder_bn_drift(config: TrainConfig) -> float:
    """How far one training-mode pass moves the fine-tuned encoder's BatchNorm running means."""
    model = build_unet(config)
    norms = [layer for layer in model.get_layer("mobilenetv2_encoder").layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    before = [keras.ops.convert_to_numpy(layer.moving_mean) for layer in norms]
    model(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32), training=True)
    return max(float(np.abs(keras.ops.convert_to_numpy(layer.moving_mean) - b).max())
               for layer, b in zip(norms, before))


def test_freeze_encoder_bn_keeps_the_encoders_batchnorm_in_inference_mode():
    whole = tiny_config("best").override(fine_tune_from="Conv1", freeze_encoder_bn=False)  # all layers train
    # Keras 3 hands the outer training flag to the nested encoder: its BatchNorm follows the batch
    assert encoder_bn_drift(whole) > 0
    frozen = whole.override(freeze_encoder_bn=True)
    assert encoder_bn_drift(frozen) == 0
    encoder = build_unet(frozen).get_layer("mobilenetv2_encoder")
    assert encoder.get_layer("Conv1").trainable and not encoder.get_layer("bn_Conv1").trainable
    assert parse_args(["--data", "d", "--out", "o", "--freeze-encoder-bn"])[0].freeze_encoder_bn
    assert not parse_args(["--data", "d", "--out", "o"])[0].freeze_encoder_bn  # the reference preset
    best = ["--data", "d", "--out", "o", "--preset", "best"]
    assert parse_args(best)[0].freeze_encoder_bn
    assert not parse_args([*best, "--no-freeze-encoder-bn"])[0].freeze_encoder_bn


def test_cli_run_exports_a_savedmodel_matching_keras(dataset_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    main(["--data", str(dataset_dir), "--out", str(run), "--epochs", "1", "--image-size", "64",
          "--batch-size", "4", "--encoder-weights", "none", "--no-evaluate"])
    for name in ("curves.png", "predictions.png", "metrics.json", "model_summary.txt", "history.csv"):
        assert (run / name).is_file(), name
    assert any((run / "logs").rglob("*tfevents*"))
    meta = json.loads((run / "model" / "metadata.json").read_text())
    assert meta["input_size"] == 64 and meta["classes"] == ["background", "nucleus"]
    assert len(meta["split"]["validation_ids"]) >= 1 and meta["data"]["fingerprint"]
    loaded = tf.saved_model.load(str(run / "model"))
    batch = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    served = loaded.signatures["serving_default"](images=tf.constant(batch))["probabilities"].numpy()
    assert served.shape == (2, 64, 64, 2)
    np.testing.assert_allclose(served.sum(-1), 1.0, atol=1e-5)


def test_a_model_with_the_distance_output_trains_exports_and_serves(dataset_dir: Path, tmp_path: Path):
    from service.model import SegmentationModel
    from service.pipeline import segment

    run = tmp_path / "run"
    main(["--data", str(dataset_dir), "--out", str(run), "--preset", "best", "--distance-weight", "1",
          "--distance-head", "1", "--epochs", "1", "--steps-per-epoch", "2", "--image-size", "64", "--batch-size", "2",
          "--encoder-weights", "none", "--no-evaluate"])
    model = SegmentationModel.load(run / "model")
    assert model.spec.metadata["classes"] == ["background", "interior", "boundary", "distance"]
    assert model.spec.metadata["training_config"]["distance_weight"] == 1.0
    assert model.spec.metadata["training_config"]["distance_head"] == 1
    image = load_dataset(dataset_dir).samples[0].image
    result = segment(image, model)
    probs = result.probabilities
    assert probs.shape == (*image.shape[:2], 4) and result.labels.shape == image.shape[:2]
    np.testing.assert_allclose(probs[..., :3].sum(-1), 1.0, atol=1e-4)  # softmax over the classes only
    assert ((probs[..., 3] >= 0) & (probs[..., 3] <= 1)).all()


def test_export_matches_keras_model_and_is_atomic(tmp_path: Path, monkeypatch):
    config = tiny_config("best").override(distance_weight=1.0)
    model = build_unet(config)
    out = tmp_path / "model"
    export_model(model, out, {"format_version": 1}, fixed_size=None, softmax_channels=config.num_classes)
    batch = np.random.default_rng(0).integers(0, 255, (1, 64, 96, 3), dtype=np.uint8)
    logits = model(batch.astype(np.float32), training=False)
    expected = np.concatenate([tf.nn.softmax(logits[..., :3], -1), tf.sigmoid(logits[..., 3:])], -1)
    served = tf.saved_model.load(str(out)).signatures["serving_default"](images=tf.constant(batch))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)

    # a crash during a second export leaves the first model intact and no temp folders behind
    before = sorted(p.name for p in out.rglob("*"))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(RuntimeError):
        export_model(model, out, {"format_version": 1}, fixed_size=None)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_stain_jitter_keeps_range_and_is_the_identity_at_zero_strength():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.uniform(0.05, 1.0, (16, 16, 3)).astype(np.float32))
    same = augment.stain_jitter(x, scale=0.0, shift=0.0).numpy()
    np.testing.assert_allclose(same, x.numpy(), atol=1e-4)
    tf.random.set_seed(0)
    jittered = augment.stain_jitter(x).numpy()
    assert jittered.min() >= 0.0 and jittered.max() <= 1.0 and not np.allclose(jittered, x.numpy(), atol=1e-3)


def test_mixed_precision_model_is_served_as_a_float32_twin():
    from training.model import float32_copy, precision

    config = tiny_config("best").override(precision="mixed_bfloat16")
    with precision(config.precision):
        model = build_unet(config)
    assert model.get_layer("up_0").compute_dtype == "bfloat16" and model.output.dtype == "float32"
    twin = float32_copy(model, config)
    assert all(layer.compute_dtype == "float32" for layer in twin.layers)
    batch = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    low = tf.nn.softmax(model(batch, training=False), -1).numpy()
    full = tf.nn.softmax(twin(batch, training=False), -1).numpy()
    assert np.abs(low - full).max() < 0.05  # same weights; only bfloat16 rounding differs


def test_cli_overrides_the_preset_precision():
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best"])
    assert config.precision == "auto" and config.stain  # bf16 only where this machine computes it natively
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--precision", "float32"])
    assert config.precision == "float32"


def test_cli_chooses_where_fine_tuning_starts(monkeypatch):
    args = ["--data", "d", "--out", "o", "--preset", "best"]
    assert parse_args(args)[0].fine_tune_from is None  # the preset trains the whole encoder
    assert parse_args([*args, "--fine-tune-from", "block_3_expand"])[0].fine_tune_from == "block_3_expand"
    # 'all' overrides a preset that starts part-way (the best preset no longer does, so one is made here)
    monkeypatch.setitem(PRESETS, "best", replace(preset("best"), fine_tune_from="block_3_expand"))
    assert parse_args(args)[0].fine_tune_from == "block_3_expand"
    assert parse_args([*args, "--fine-tune-from", "all"])[0].fine_tune_from is None
    assert parse_args([*args, "--fine-tune-from", "block_6_expand"])[0].fine_tune_from == "block_6_expand"
    with pytest.raises(SystemExit):  # a usage error before any data is loaded
        parse_args([*args, "--fine-tune-from", "block_99_expand"])


def test_cli_sets_the_modality_balance():
    args = ["--data", "d", "--out", "o", "--preset", "best"]
    assert parse_args(args)[0].balance_power == 0.5
    config = parse_args([*args, "--balance-power", "1"])[0]
    assert config.balance_modalities and config.balance_power == 1.0


def test_cli_reports_a_missing_data_folder_and_leaves_no_run_folder(tmp_path: Path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="data folder not found"):
        main(["--data", str(tmp_path / "absent"), "--out", str(out)])
    assert not out.exists()


def test_best_preset_is_the_shipped_models_recipe():
    """``--preset best`` must reproduce ``models/default``: a new option's default may not change the recipe."""
    shipped = json.loads((Path(__file__).resolve().parent.parent / "models" / "default" / "metadata.json").read_text())
    recorded = TrainConfig.from_dict(shipped["training_config"])
    from training.model import resolved_precision

    # the preset's precision is "auto"; the shipped fit ran on a CPU with AVX512_BF16, where it means bf16
    assert recorded == preset("best").override(precision=resolved_precision("auto", bf16=True))


def test_canonical_diameter_flag_sets_the_training_and_serving_size():
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best"])[0].canonical_diameter == 20.0
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--canonical-diameter", "24"])
    assert config.canonical_diameter == 24.0
    for bad in ("0", "-5"):  # a non-positive size would divide by zero or flip every image
        with pytest.raises(SystemExit):
            parse_args(["--data", "d", "--out", "o", "--preset", "best", "--canonical-diameter", bad])
    with pytest.raises(ValueError, match="canonical_diameter"):  # the config refuses it, not only the CLI
        TrainConfig(canonical_diameter=0.0)


def test_zoom_flag_sets_the_augmentation_range():
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best"])[0].zoom == 0.5
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--zoom", "0.25"])
    assert config.zoom == 0.25
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best", "--zoom", "0"])[0].zoom == 0.0
    with pytest.raises(SystemExit):  # a negative zoom inverts the range (and from -1 on, log1p is undefined)
        parse_args(["--data", "d", "--out", "o", "--preset", "best", "--zoom", "-0.2"])
    with pytest.raises(ValueError, match="zoom"):
        TrainConfig(zoom=-1.0)


def test_boundary_width_flag_sets_the_target_rim():
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best"])[0].boundary_width == 2
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--boundary-width", "3"])
    assert config.boundary_width == 3
    with pytest.raises(SystemExit):  # no rim: touching nuclei's interiors would meet, nothing to split them at
        parse_args(["--data", "d", "--out", "o", "--preset", "best", "--boundary-width", "0"])
    with pytest.raises(ValueError, match="boundary_width"):
        TrainConfig(boundary_width=0)


def test_core_pixels_flag_sets_the_target_cores():
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best"])[0].core_pixels == 0
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--core-pixels", "9"])
    assert config.core_pixels == 9
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--preset", "best", "--core-pixels", "-1"])
    with pytest.raises(ValueError, match="core_pixels"):
        TrainConfig(core_pixels=-1)
    with pytest.raises(ValueError, match="core_pixels"):
        TrainConfig(core_pixels=9, target="mask")  # a 2-class mask has no interior: the option would do nothing


def test_train_fraction_is_a_share_of_the_training_split():
    config, _ = parse_args(["--data", "d", "--out", "o", "--preset", "best", "--train-fraction", "0.5"])
    assert config.train_fraction == 0.5 and config.val_fraction == preset("best").val_fraction  # validation unchanged
    assert parse_args(["--data", "d", "--out", "o"])[0].train_fraction == 1.0
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):  # no images, or a share with no meaning
            parse_args(["--data", "d", "--out", "o", "--train-fraction", bad])
    whole, share = preset("best"), preset("best").override(train_fraction=0.5)
    assert "training_ids" not in split_record(whole, ["a", "b"], ["c"])  # the rest of the data is the training split
    assert split_record(share, ["a"], ["c"]) == {"seed": 42, "val_fraction": share.val_fraction,
                                                 "validation_ids": ["c"], "training_ids": ["a"]}


def test_ema_momentum_exports_the_moving_average_of_the_trained_weights():
    """With --ema-momentum the weights left after fit are m * w1 + (1 - m) * w2 of the two steps' raw weights
    (Keras seeds the average with the first step's), not the last step's."""
    from training.train import compile_model

    config = tiny_config("best").override(ema_momentum=0.5, lr_schedule="constant", learning_rate=0.1)
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    compile_model(model, config)
    raw: list[np.ndarray] = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs=None: raw.append(model.layers[1].kernel.numpy()))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, (2, 8, 8))
    model.fit(x, y, batch_size=1, epochs=1, callbacks=[record], verbose=0, shuffle=False)
    assert len(raw) == 2 and not np.allclose(raw[0], raw[1])
    np.testing.assert_allclose(model.layers[1].kernel.numpy(), 0.5 * raw[0] + 0.5 * raw[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ema_momentum"):
        config.override(ema_momentum=1.0)
    assert parse_args(["--data", "d", "--out", "o", "--preset", "best", "--ema-momentum", "0.999"])[0].ema_momentum == 0.999


def test_fine_tuning_does_not_average_the_weights_unless_asked(tmp_path: Path):
    """A start model trained with --ema-momentum 0.999 must not pass it on to a fine-tuning run of a few hundred
    steps (its average would stay near the start weights); the flag still sets one."""
    start = tmp_path / "start"
    start.mkdir()
    recorded = preset("best").override(ema_momentum=0.999).to_dict()
    (start / "metadata.json").write_text(json.dumps({"training_config": recorded}))
    config, _ = parse_args(["--init", str(start), "--data", "d", "--out", "o"])
    assert config.ema_momentum == 0.0 and config.decoder_filters == preset("best").decoder_filters
    config, _ = parse_args(["--init", str(start), "--data", "d", "--out", "o", "--ema-momentum", "0.99"])
    assert config.ema_momentum == 0.99


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """mixed_bfloat16 on a CPU without AVX512_BF16 / AMX is emulated (7.7x the float32 step on AVX2), so
    ``auto`` (the best preset's, and every --init fine-tuning's) picks it only where the flags say so."""
    import tensorflow as tf

    from training import model as model_module
    from training.model import native_bf16, resolved_precision

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])  # a CPU-only machine
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not native_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert native_bf16(cpuinfo)
    assert not native_bf16(tmp_path / "missing")  # macOS, or flags unreadable: float32
    assert resolved_precision("auto", bf16=False) == "float32"
    assert resolved_precision("auto", bf16=True) == "mixed_bfloat16"
    assert resolved_precision("float32", bf16=True) == "float32"  # an explicit choice stands
    assert resolved_precision("mixed_bfloat16", bf16=False) == "mixed_bfloat16"
    monkeypatch.setattr(model_module, "native_bf16", lambda: False)
    assert resolved_precision("auto") == "float32"
    # a start model trained in bf16 elsewhere is fine-tuned in this machine's arithmetic
    start = tmp_path / "start"
    start.mkdir()
    recorded = preset("best").override(precision="mixed_bfloat16").to_dict()
    (start / "metadata.json").write_text(json.dumps({"training_config": recorded}))
    assert parse_args(["--init", str(start), "--data", "d", "--out", "o"])[0].precision == "auto"


def test_a_fit_records_the_precision_it_ran_not_auto(tile_model_dir: Path):
    from training.model import resolved_precision

    recorded = json.loads((tile_model_dir / "metadata.json").read_text())["training_config"]["precision"]
    assert preset("best").precision == "auto" and recorded == resolved_precision("auto")
