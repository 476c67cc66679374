"""Interoperability: channels and pages, polygons for QuPath (GeoJSON) and Fiji (ImageJ ROIs),
and per-request thresholds, through the real app and the shipped model (so nuclei are found)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import roifile
import tifffile
from skimage.draw import polygon2mask

from service.decode import DecodeError, decode_image
from service.encode import geojson_document, labels_from_rle
from tests.client import make_client, png, upload
from tests.synthetic import random_labels, render

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "default"


def tiff(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client():
    from service.model import SegmentationModel

    return make_client(SegmentationModel.load(SHIPPED), SHIPPED)


@pytest.fixture(scope="module")
def nuclei() -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-like nuclear channel of 12 nuclei, and the labels drawn."""
    rng = np.random.default_rng(7)
    labels = random_labels(rng, (160, 192), count=12, radius=9)
    return render(labels, rng), labels


def count(client, data: bytes, name: str = "cells.tif", **params) -> int:
    response = client("POST", "/segment", params={"format": "rle", **params}, **upload(data, name, "image/tiff"))
    assert response.status_code == 200, response.text
    return response.json()["count"]


# --- channels and pages ------------------------------------------------------------------------

def test_hyperstack_needs_a_channel_and_then_counts_as_the_nuclear_channel_alone(client, nuclei):
    dapi, _ = nuclei
    cytoplasm = np.random.default_rng(1).integers(30, 120, dapi.shape).astype(np.uint8)  # no nuclei in it
    stack = tiff(np.stack([cytoplasm, dapi]).astype(np.uint16) * 257, imagej=True, metadata={"axes": "CYX"})
    refused = client("POST", "/segment", params={"format": "rle"}, **upload(stack, "stack.tif", "image/tiff"))
    assert refused.status_code == 422
    assert "2 channels (CYX); pass channel=0 or channel=1" in refused.json()["detail"]
    alone = count(client, png(dapi), "dapi.png")
    assert alone >= 8  # the shipped model finds the drawn nuclei
    assert abs(count(client, stack, channel=1) - alone) <= 0.1 * alone
    beyond = client("POST", "/segment", params={"channel": 2}, **upload(stack, "stack.tif", "image/tiff"))
    assert beyond.status_code == 422 and "0 to 1" in beyond.json()["detail"]


def test_ome_tiff_and_channels_last_choose_a_channel(nuclei):
    dapi, _ = nuclei
    other = np.zeros_like(dapi)
    ome = tiff(np.stack([other, other, dapi]), ome=True, metadata={"axes": "CYX"})
    assert np.array_equal(decode_image(ome, channel=2)[..., 0], dapi)
    five = tiff(np.stack([other, other, other, dapi, other], -1), photometric="minisblack", planarconfig="contig")
    with pytest.raises(DecodeError, match=r"5 channels \(YXS\)"):
        decode_image(five)
    assert np.array_equal(decode_image(five, channel=3)[..., 0], dapi)


def test_rgb_stays_rgb_and_a_channel_of_it_can_be_chosen(nuclei):
    dapi, _ = nuclei
    rgb = np.stack([np.zeros_like(dapi), np.zeros_like(dapi), dapi], -1)  # DAPI in blue
    assert np.array_equal(decode_image(png(rgb)), rgb)
    assert np.array_equal(decode_image(png(rgb), channel=2)[..., 1], dapi)
    with pytest.raises(DecodeError, match="one channel"):
        decode_image(png(dapi), channel=1)


def test_pages_need_a_choice_and_stacks_are_refused(nuclei):
    dapi, _ = nuclei
    pages = tiff(np.stack([255 - dapi, dapi]), photometric="minisblack")
    with pytest.raises(DecodeError, match="2 pages"):
        decode_image(pages)
    assert np.array_equal(decode_image(pages, channel=1)[..., 0], dapi)
    for axes, word in (("ZYX", "z-stack"), ("TYX", "time series")):
        with pytest.raises(DecodeError, match=word):
            decode_image(tiff(np.stack([dapi] * 3), imagej=True, metadata={"axes": axes}), channel=0)


# --- polygons ----------------------------------------------------------------------------------

def rasterise(ring: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    """A polygon in continuous [x, y] pixel units back to a mask (pixel centres at +0.5)."""
    points = np.asarray(ring)
    return polygon2mask(shape, np.stack([points[:, 1] - 0.5, points[:, 0] - 0.5], axis=1))


def test_geojson_polygons_round_trip_to_the_labels(client, nuclei):
    dapi, _ = nuclei
    data = png(dapi)
    rle = client("POST", "/segment", params={"format": "rle"}, **upload(data)).json()
    labels = labels_from_rle(rle["nuclei"], (rle["height"], rle["width"]))
    response = client("POST", "/segment", params={"format": "geojson"}, **upload(data))
    assert response.status_code == 200 and response.headers["content-type"] == "application/geo+json"
    features = response.json()["features"]
    assert len(features) == rle["count"] == len(np.unique(labels)) - 1 >= 8
    for feature in features:
        label = feature["properties"]["label"]
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["measurements"]["area"] == int((labels == label).sum())
        mask = rasterise(feature["geometry"]["coordinates"][0], labels.shape)
        truth = labels == label
        assert (mask & truth).sum() / (mask | truth).sum() >= 0.9, label


def test_polygons_are_simplified_within_half_a_pixel():
    yy, xx = np.mgrid[:80, :80]
    disc = ((yy - 40) ** 2 + (xx - 40) ** 2 <= 30 ** 2).astype(np.int32)
    ring = np.asarray(geojson_document(disc)["features"][0]["geometry"]["coordinates"][0])
    assert len(ring) < 120  # the raw contour has ~240 points
    mask = rasterise(ring.tolist(), disc.shape)
    assert (mask & (disc > 0)).sum() / (mask | (disc > 0)).sum() >= 0.97


def test_imagej_roi_zip_opens_with_roifile(client, nuclei):
    dapi, _ = nuclei
    response = client("POST", "/segment", params={"format": "imagej-roi"}, **upload(png(dapi)))
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    rois = [roifile.ImagejRoi.frombytes(archive.read(name)) for name in archive.namelist()]
    expected = client("POST", "/segment", params={"format": "rle"}, **upload(png(dapi))).json()["count"]
    assert len(rois) == expected and all(roi.roitype == roifile.ROI_TYPE.POLYGON for roi in rois)
    x, y = rois[0].coordinates().T
    assert 0 <= x.min() and x.max() <= dapi.shape[1] and 0 <= y.min() and y.max() <= dapi.shape[0]


# --- thresholds --------------------------------------------------------------------------------

def test_thresholds_per_request_change_the_answer_within_range(client, nuclei):
    dapi, _ = nuclei
    data = png(dapi)

    def area(**params) -> int:
        body = client("POST", "/segment", params={"format": "rle", **params}, **upload(data)).json()
        return sum(n["area"] for n in body["nuclei"])

    assert area(prob_thresh=0.2) > area(prob_thresh=0.9)  # a lower foreground threshold grows nuclei
    for bad in ({"prob_thresh": 0.0}, {"seed_thresh": 1.0}, {"prob_thresh": "x"}):
        response = client("POST", "/segment", params=bad, **upload(data))
        assert response.status_code == 422 and "thresh" in response.json()["detail"]
    model = client("GET", "/model").json()
    assert model["postprocess"]["foreground_threshold"]  # the defaults users override are published
    json.dumps(model)


# --- the Python client -------------------------------------------------------------------------

def test_python_client_takes_arrays_and_returns_python_objects(nuclei):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.client import Client
    from service.config import Settings
    from service.model import SegmentationModel

    dapi, _ = nuclei
    with TestClient(create_app(Settings(model_dir=SHIPPED), SegmentationModel.load(SHIPPED))) as http:
        client = Client("http://testserver", http=http)
        document = client.segment(dapi)  # rle by default: a dict
        labels = client.segment(dapi, format="labels")
        assert labels.dtype == np.int32 and labels.shape == dapi.shape
        assert np.array_equal(labels, labels_from_rle(document["nuclei"], dapi.shape))
        assert len(client.segment(dapi, format="geojson")["features"]) == document["count"]
        two = np.stack([np.zeros_like(dapi), dapi], -1).astype(np.uint16) * 257  # 16-bit, 2 channels: sent as TIFF
        assert client.segment(two, channel=1)["count"] == document["count"]
        assert client.segment(dapi, format="overlay").shape == (*dapi.shape, 3)


def test_phone_jpeg_with_previews_and_tiff_with_thumbnail_read_their_main_image(nuclei):
    from PIL import Image

    dapi, _ = nuclei
    mpo = io.BytesIO()
    Image.fromarray(dapi).convert("RGB").save(mpo, format="MPO", save_all=True,
                                             append_images=[Image.fromarray(255 - dapi).convert("RGB")])
    assert abs(decode_image(mpo.getvalue())[..., 0].astype(int) - dapi).mean() < 15  # the first picture (JPEG noise), not the inverted second
    scan = io.BytesIO()
    with tifffile.TiffWriter(scan) as writer:
        writer.write(dapi)
        writer.write(dapi[::8, ::8])  # a preview page, not marked reduced
    assert np.array_equal(decode_image(scan.getvalue())[..., 0], dapi)


def test_a_multi_channel_tiff_reads_only_the_chosen_plane(nuclei):
    import tracemalloc

    dapi, _ = nuclei
    planes = np.zeros((16, 1000, 1000), np.float64)  # 128 MB of pixels, 140 kB compressed
    data = tiff(planes, photometric="minisblack", metadata={"axes": "CYX"}, compression="zlib")
    tracemalloc.start()
    decode_image(data, channel=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 60e6, peak  # one 8-MB plane and its 8-bit copies, not all 16
    with pytest.raises(Exception, match="bytes per pixel"):  # a whole-file read is capped in bytes
        decode_image(tiff(np.zeros((500, 500, 6), np.float64), photometric="minisblack", planarconfig="contig"),
                     channel=0, max_pixels=300_000)  # 250,000 pixels x 48 bytes > 8 x 300,000


def test_batch_takes_the_thresholds_too(client, nuclei):
    dapi, _ = nuclei

    def area(threshold: float) -> int:
        response = client("POST", "/segment/batch", params={"prob_thresh": threshold},
                          files=[("files", ("a.png", png(dapi), "image/png"))])
        return sum(n["area"] for n in response.json()[0]["nuclei"])

    assert area(0.2) > area(0.9)
