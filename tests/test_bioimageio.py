"""The bioimage.io package of a model (``training.export_bioimageio``), validated and run offline.

The tiny test model is exported once; bioimageio.spec validates the folder and the zip with its
file checks on, and bioimageio.core (where installed) runs the package's own test. Every test runs
with name lookups and connections beyond loopback refused and recorded, so a validator that tried
to fetch anything fails the test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("bioimageio.spec")

from service.model import SegmentationModel  # noqa: E402
from service.normalise import normalise  # noqa: E402
from service.runtime import RuntimeOptions  # noqa: E402
from training.export_bioimageio import (  # noqa: E402
    ExportError, citations, described_preprocessing, export_bioimageio, main, weights_licence)

SHIPPED_METADATA = Path(__file__).resolve().parents[1] / "models" / "default" / "metadata.json"
LOOPBACK = ("127.", "::1", "localhost")


def _is_loopback(host: object) -> bool:
    return isinstance(host, str) and host.startswith(LOOPBACK)


@pytest.fixture(scope="module")
def network_attempts() -> Iterator[list[str]]:
    """Refuse (and record) every name lookup and connection beyond loopback while this module runs.

    Recorded as well as refused: bioimageio.spec turns a failed URL check into a warning, so only
    the record shows that it tried.
    """
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family == getattr(socket, "AF_UNIX", None) or (isinstance(address, tuple) and _is_loopback(address[0])):
            return real_connect(sock, address)
        attempts.append(f"connect {address!r}")
        raise OSError(f"network access attempted: connect {address!r}")

    def getaddrinfo(host: object, *args: object, **kwargs: object):
        if host is None or _is_loopback(host):
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(f"resolve {host!r}")
        raise socket.gaierror(f"network access attempted: resolve {host!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts


@pytest.fixture(autouse=True)
def offline(network_attempts: list[str]) -> Iterator[None]:
    yield
    assert not network_attempts, f"bioimage.io tools tried the network: {network_attempts}"


def test_network_guard_catches_http(network_attempts: list[str]) -> None:
    import httpx

    with pytest.raises(httpx.HTTPError):
        httpx.head("https://example.org/", timeout=2)
    assert network_attempts == ["resolve 'example.org'"]
    network_attempts.clear()


@pytest.fixture(scope="module")
def package(tile_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, network_attempts: list[str]) -> Path:
    out = tmp_path_factory.mktemp("bioimageio") / "tiny"
    # The tiny model's synthetic data records no licence: the weights' licence must be chosen.
    return export_bioimageio(tile_model_dir, out, size=128, licence="MIT", zip_path=out.with_name("tiny.zip"))


@pytest.fixture(scope="module")
def rdf(package: Path) -> dict:
    import yaml

    return yaml.safe_load((package / "rdf.yaml").read_text())


def test_package_folder_and_zip_validate_offline(package: Path) -> None:
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    for source in (package / "rdf.yaml", package.with_name("tiny.zip")):
        descr = load_description(source, perform_io_checks=True)
        assert not isinstance(descr, InvalidDescr), descr.validation_summary.format()
        assert isinstance(descr, ModelDescr)
        assert descr.validation_summary.status in ("passed", "valid-format"), descr.validation_summary.format()
        assert str(descr.format_version).startswith("0.5")
    names = {p.name for p in package.iterdir()}
    assert {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy",
            "tf_saved_model_bundle.zip", "metadata.json"} <= names
    assert not [p for p in package.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_test_output_is_the_network_output_on_the_test_input(package: Path, tile_model_dir: Path) -> None:
    test_input, test_output = np.load(package / "test_input.npy"), np.load(package / "test_output.npy")
    assert test_input.dtype == np.uint8 and test_input.shape == (1, 128, 128, 3)
    model = SegmentationModel.load(tile_model_dir, RuntimeOptions(runtime="tensorflow"))
    prepared = described_preprocessing(test_input[0], model.spec.normalise)
    expected = model.predict_now(prepared[None])
    assert test_output.dtype == np.float32 and test_output.shape == (1, 128, 128, model.spec.num_classes)
    np.testing.assert_allclose(test_output, expected, atol=1e-5)
    np.testing.assert_allclose(test_output.sum(-1), 1.0, atol=1e-4)  # softmax probabilities
    # The described pre-processing is the service's normalisation, but for a grey level at rounding ties.
    service = normalise(test_input[0], model.spec.normalise).astype(int)
    assert np.abs(prepared.astype(int) - service).max() <= 1
    assert (prepared == service).mean() > 0.95


def test_description_axes_preprocessing_and_outputs(rdf: dict, tile_model_dir: Path) -> None:
    metadata = json.loads((tile_model_dir / "metadata.json").read_text())
    (images,), (probabilities,) = rdf["inputs"], rdf["outputs"]
    assert images["id"] == "images" and probabilities["id"] == "probabilities"  # the SavedModel signature's names
    assert [a["type"] for a in images["axes"]] == ["batch", "space", "space", "channel"]
    assert [a.get("id") for a in images["axes"][1:3]] == ["y", "x"]
    assert images["axes"][1]["size"] == {"min": 64, "step": 32}
    assert images["axes"][3]["channel_names"] == ["red", "green", "blue"]
    assert images["data"]["type"] == "uint8"
    steps = [step["id"] for step in images["preprocessing"]]
    assert steps == ["ensure_dtype", "scale_range", "clip", "scale_linear", "ensure_dtype"]
    scale_range = images["preprocessing"][1]["kwargs"]
    assert (scale_range["min_percentile"], scale_range["max_percentile"]) == (1.0, 99.8)
    assert scale_range["axes"] == ["y", "x", "channel"]
    assert images["preprocessing"][-1]["kwargs"]["dtype"] == "uint8"  # what the SavedModel takes
    assert [a["type"] for a in probabilities["axes"]] == ["batch", "space", "space", "channel"]
    assert probabilities["axes"][1]["size"] == {"tensor_id": "images", "axis_id": "y"}
    assert probabilities["axes"][3]["channel_names"] == metadata["classes"]
    assert probabilities["data"]["type"] == "float32"
    weights = rdf["weights"]["tensorflow_saved_model_bundle"]
    assert weights["source"] == "tf_saved_model_bundle.zip" and weights["tensorflow_version"]
    config = rdf["config"]["nuclei_seg"]
    assert config["canonical_diameter"] == metadata["inference"]["canonical_diameter"]
    assert config["postprocess"]["foreground_threshold"] == metadata["postprocess"]["foreground_threshold"]


def test_licence_citations_authors_and_documentation(rdf: dict, package: Path, tile_model_dir: Path) -> None:
    assert rdf["license"] == "MIT"
    assert rdf["authors"] == [{"name": "nuclei-seg contributors"}]
    assert {"nuclei", "segmentation", "unet", "tensorflow"} <= set(rdf["tags"])
    dois = {c["doi"] for c in rdf["cite"]}
    assert "10.1007/978-3-319-24574-4_28" in dois  # U-Net, cited whatever the data
    assert not [c for c in rdf["cite"] if "url" in c], "a URL would be fetched by the validator"
    readme = (package / "README.md").read_text()
    metadata = json.loads((tile_model_dir / "metadata.json").read_text())
    diameter = metadata["inference"]["canonical_diameter"]
    assert "## Validation" in readme and "probabilities, not instances" in readme
    assert f"{diameter:g} px" in readme
    assert f"1 - P(background) > {metadata['postprocess']['foreground_threshold']:g}" in readme
    assert "watershed" in readme
    with Image.open(package / "cover.png") as cover:
        assert cover.width == 2 * cover.height  # bioimage.io: 2:1 or 1:1
    assert (package / "cover.png").stat().st_size < 500_000


def test_shipped_model_licence_and_citations_follow_its_training_data() -> None:
    metadata = json.loads(SHIPPED_METADATA.read_text())
    assert weights_licence(metadata) == "CC-BY-NC-SA-4.0"  # MoNuSeg's share-alike binds the weights
    dois = {c.doi for c in citations(metadata)}
    assert {"10.1038/s41592-019-0612-7", "10.1109/TMI.2017.2677499", "10.1109/TMI.2019.2947628"} <= dois
    cc0_only = {"data": {"sources": [s for s in metadata["data"]["sources"] if s["name"].startswith("dsb2018")]}}
    assert weights_licence(cc0_only) == "MIT"
    assert "10.1109/TMI.2017.2677499" not in {c.doi for c in citations(cc0_only)}
    with pytest.raises(ExportError, match="--license"):
        weights_licence({"data": {"sources": [{"name": "mine", "licence": "unknown"}]}})


def test_failed_export_keeps_the_old_package(package: Path, tile_model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "rdf.yaml").write_text("old")
    with pytest.raises(ExportError, match="licen"):
        export_bioimageio(tile_model_dir, out, size=64, licence="NOT-A-LICENCE")
    assert (out / "rdf.yaml").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert main(["--model", str(tile_model_dir), "--out", str(out)]) == 1  # licence unknown: a message, no traceback
    assert "--license" in capsys.readouterr().err


def test_bioimageio_core_reproduces_the_test_output(package: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        from bioimageio.core import test_model
    except ImportError as error:
        pytest.skip(f"bioimageio.core is not importable ({error})")
    monkeypatch.chdir(tmp_path)  # it unpacks the weights below the working directory
    summary = test_model(package.with_name("tiny.zip"))
    assert summary.status == "passed", summary.format()
