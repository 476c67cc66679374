"""Size normalisation in ``segment``: the scale it picks follows the nuclei's size.

A stand-in network that segments bright disks perfectly at any scale isolates the scale logic
from model quality: whatever the nuclei's size, the image must end up processed at the scale
that brings them to the model's canonical diameter, and every disk must come back as one nucleus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from service.model import ModelSpec, SegmentationModel
from service.pipeline import SegmentOptions, SizeError, segment
from service.size import COARSE_SCALES, SCALE_LIMITS, View, estimated_scale, estimated_view, scale_for_diameter
from service.postprocess import PostprocessParams

CANONICAL = 20.0


class DiskModel(SegmentationModel):
    """Background / interior / boundary of bright pixels, exact at every scale; records tile sizes."""

    def __init__(self) -> None:
        spec = ModelSpec(image_size=64, num_classes=3, inference="tile", normalise="none",
                         canonical_diameter=CANONICAL, tile_overlap=16,
                         postprocess=PostprocessParams(0.5, 0.5, 4), metadata={})
        super().__init__(Path("."), spec, None)
        self.calls: list[tuple[int, ...]] = []

    def predict_now(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        fg = batch[..., 0] > 127
        interior = np.stack([ndi.binary_erosion(f, iterations=1) for f in fg])
        probs = np.zeros(batch.shape[:3] + (3,), np.float32)
        probs[..., 0] = ~fg
        probs[..., 1] = interior
        probs[..., 2] = fg & ~interior
        return probs


def disks(diameter: int, count_per_side: int) -> np.ndarray:
    """A grid of separated bright disks on black, as an RGB image."""
    step = 2 * diameter
    size = step * count_per_side
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((size, size, 3), np.uint8)
    for cy in range(diameter, size, step):
        for cx in range(diameter, size, step):
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= (diameter / 2) ** 2] = 255
    return image


@pytest.mark.parametrize("diameter", [10, 20, 60])
def test_scale_brings_nuclei_to_the_canonical_size(diameter: int):
    model = DiskModel()
    result = segment(disks(diameter, 4), model)
    expected = float(np.clip(CANONICAL / diameter, SCALE_LIMITS[0], SCALE_LIMITS[1]))
    assert 0.8 <= result.scale / expected <= 1.25
    assert result.labels.max() == 16  # every disk found once, none split or merged


def test_large_nuclei_are_sized_from_the_coarse_look_without_a_native_pass():
    model = DiskModel()
    image = disks(60, 4)
    segment(image, model)
    # the first look is the coarse one: 240 px in 2x2 tiles of 128 px (the stand-in's budget of 8 tiles of 64 px
    # allows tiles up to 160 px, which a native pass over the 480-px image would use)
    assert round(image.shape[0] * COARSE_SCALES[0]) == 240 and model.calls[0][1:3] == (128, 128)
    # the coarse look plus the pass at the final scale cost fewer model pixels than the image has,
    # so no native-resolution pass (which needs at least that many) was run
    processed = sum(n * h * w for n, h, w, _ in model.calls)
    assert processed < image.shape[0] * image.shape[1]


def test_auto_scale_off_runs_native_resolution_only():
    model = DiskModel()
    result = segment(disks(60, 2), model, SegmentOptions(auto_scale=False))
    assert result.scale == 1.0 and result.labels.max() == 4


@pytest.mark.parametrize("diameter", [10, 20, 60])
def test_a_given_diameter_is_one_pass_at_its_scale(diameter: int):
    model = DiskModel()
    image = disks(diameter, 4)
    result = segment(image, model, SegmentOptions(diameter=float(diameter)))
    assert result.scale == pytest.approx(float(np.clip(CANONICAL / diameter, *SCALE_LIMITS)))
    assert result.labels.max() == 16
    side = round(image.shape[0] * result.scale)  # every model call tiles the one rescaled image, once
    processed = sum(n * h * w for n, h, w, _ in model.calls)
    assert side * side <= processed < 4 * side * side
    assert len({c[1:3] for c in model.calls}) == 1  # one tiling: no look at another scale


def test_diameter_is_validated_and_needs_a_canonical_size():
    with pytest.raises(ValueError, match="diameter"):
        SegmentOptions(diameter=0.5)
    with pytest.raises(ValueError, match="diameter"):
        SegmentOptions(diameter=5000.0)
    with pytest.raises(SizeError, match="canonical"):
        segment(disks(20, 2), DiskModel(), SegmentOptions(diameter=20.0, tiling=False))


def test_the_estimate_looks_at_most_twice_before_the_chosen_pass():
    """Large nuclei: the half- and quarter-scale looks, then the chosen scale (none when the quarter look is it).
    Canonical ones: the half-scale look and the native pass, which is kept. Small ones: the look, the native
    pass that sizes them, then the upscaled pass. Middling ones (40 px: 10 px at a quarter) stop at the half."""
    cases = ((160, [0.5, 0.25], 0.25), (60, [0.5, 0.25, 1 / 3], 1 / 3), (40, [0.5, 0.25], 0.5),
             (20, [0.5, 1.0], 1.0), (10, [0.5, 1.0, 2.0], 2.0))
    for diameter, expected, final in cases:
        asked: list[float] = []

        def look(scale: float) -> View:
            asked.append(scale)
            labels = disk_labels_at(int(round(diameter * scale)))  # as the model sees them at this scale
            return View(scale, np.zeros((*labels.shape, 3), np.float32), lambda _: labels)

        view = estimated_view(look, CANONICAL, (400, 400))
        assert asked == pytest.approx(expected, rel=0.03) and view.scale == pytest.approx(final, rel=0.03)
    assert scale_for_diameter(1.0, CANONICAL, (400, 400)) == SCALE_LIMITS[1]  # bounded
    assert scale_for_diameter(20.0, CANONICAL, (8000, 8000)) == 1.0  # never upscaled past the pixel cap


def disc_grid(diameter: float, size: int) -> np.ndarray:
    """Labels of a ``size``-square grid of discs of any (fractional) ``diameter``, so sizes vary smoothly."""
    step = int(np.ceil(2 * diameter))
    yy, xx = np.mgrid[:size, :size] % step - step / 2 + 0.5
    labels, _ = ndi.label(yy ** 2 + xx ** 2 <= (diameter / 2) ** 2)
    return labels


def disk_labels_at(diameter: int) -> np.ndarray:
    """Labels of the disk grid (the stand-in look finds the nuclei exactly at every scale)."""
    labels, _ = ndi.label(disks(diameter, 4)[..., 0] > 127)
    return labels


def test_the_size_estimate_moves_continuously_where_the_native_pass_fragments():
    """From ~1.2x canonical the native pass cuts nuclei into fragments (canonical ones from 1.4x, as the real
    model does), and
    the half-scale look sees them whole. A single trust threshold on that look made the estimate jump from the
    fragments' size to the true one (scale 1.0 -> 0.67 from one pixel of diameter to the next); the blend moves
    it a few percent per pixel. The kept view may still differ from the estimate by the tolerance band."""
    def look_for(diameter: float):
        def look(scale: float) -> View:
            seen = diameter * scale
            # past 1.2x canonical the pieces shrink with every pixel, to canonical ones from 1.4x
            drawn = seen if seen <= 1.2 * CANONICAL else max(CANONICAL, 2.4 * CANONICAL - seen)
            labels = disc_grid(drawn, round(400 * scale))
            return View(scale, np.zeros((*labels.shape, 3), np.float32), lambda _: labels)
        return look

    diameters = np.arange(20.0, 44.0, 1.0)
    scales = [estimated_scale(look_for(d), CANONICAL, (400, 400))[0] for d in diameters]
    steps = [max(a, b) / min(a, b) for a, b in zip(scales, scales[1:])]
    assert max(steps) < 1.2, list(zip(diameters, scales))
    assert scales[0] == pytest.approx(1.0, rel=0.05) and scales[-1] == pytest.approx(CANONICAL / 43, rel=0.05)


def test_the_chosen_rescaled_pass_is_not_decoded_at_its_working_size():
    """Small nuclei: the look and the native pass are decoded to size them; the upscaled pass that is kept
    is only decoded later, at the image's own size (``segment``), so ``estimated_view`` never decodes it."""
    decoded: list[float] = []

    def look(scale: float) -> View:
        labels = disk_labels_at(int(round(10 * scale)))

        def decode(_: np.ndarray) -> np.ndarray:
            decoded.append(scale)
            return labels

        return View(scale, np.zeros((*labels.shape, 3), np.float32), decode)

    view = estimated_view(look, CANONICAL, (400, 400))
    assert view.scale == pytest.approx(2.0, rel=0.03) and decoded == [0.5, 1.0]
    assert view.coverage() == 1.0  # read off the probabilities (P(background) 0 everywhere), no decoding
    assert decoded == [0.5, 1.0]


def test_views_of_concurrent_requests_decode_side_by_side():
    """Each view decodes its labels once, and no view waits for another's: a lock shared by all views
    (``functools.cached_property`` on Python 3.11) would serialise the requests of a busy server."""
    import threading

    barrier = threading.Barrier(2, timeout=5)
    calls: list[int] = []

    def decode(_: np.ndarray) -> np.ndarray:
        calls.append(1)
        barrier.wait()  # both decodings must be in progress at once
        return np.ones((4, 4), np.int32)

    views = [View(1.0, np.zeros((4, 4, 3), np.float32), decode) for _ in range(2)]
    errors: list[BaseException] = []

    def read(view: View) -> None:
        try:
            assert view.labels is view.labels
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(v,)) for v in views]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 2
