"""The network runtimes: OpenVINO and TensorFlow agree, precisions and threads are what was asked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.model import ModelLoadError, SegmentationModel
from service.pipeline import segment
from service.runtime import RuntimeOptions, available_cpus, cgroup_cpu_quota, resolve_precision
from tests.synthetic import random_labels, render

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def both(tile_model_dir: Path) -> tuple[SegmentationModel, SegmentationModel]:
    return (SegmentationModel.load(tile_model_dir, RuntimeOptions("openvino", "f32")),
            SegmentationModel.load(tile_model_dir, RuntimeOptions("tensorflow")))


def test_openvino_and_tensorflow_agree_on_the_network_and_the_labels(both):
    """The parity CI runs: the same SavedModel through both runtimes, f32."""
    openvino, tensorflow = both
    assert openvino.network.runtime == "openvino" and tensorflow.network.runtime == "tensorflow"
    batch = np.random.default_rng(0).integers(0, 256, (3, 96, 128, 3), dtype=np.uint8)
    np.testing.assert_allclose(openvino.predict(batch), tensorflow.predict(batch), atol=2e-4)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        image = np.repeat(render(random_labels(rng, (160, 192), 12, 7), rng)[..., None], 3, axis=-1)
        assert np.array_equal(segment(image, openvino).labels, segment(image, tensorflow).labels)


def test_precision_auto_is_f32_unless_the_model_passed_the_gate():
    passed = {"runtime": {"parity": {"bf16": {"passed": True}}}}
    failed = {"runtime": {"parity": {"bf16": {"passed": False}}}}
    assert resolve_precision("auto", ["FP32", "BF16"], {}) == "f32"
    assert resolve_precision("auto", ["FP32", "BF16"], failed) == "f32"
    assert resolve_precision("auto", ["FP32", "BF16"], passed) == "bf16"
    assert resolve_precision("auto", ["FP32"], passed) == "f32"  # no native bf16 on this CPU
    quantized = {"precision": "int8", "runtime": {"parity": {"int8": {"passed": True}}}}
    assert resolve_precision("auto", ["FP32"], quantized) == "int8"


def test_precision_auto_says_why_a_bf16_cpu_serves_f32(caplog: pytest.LogCaptureFixture):
    """A model shipped from a host without bf16 carries no bf16 verdict: the log names the gate to run."""
    with caplog.at_level("WARNING", logger="nuclei_seg"):
        resolve_precision("auto", ["FP32", "BF16"], {})
    assert "never gated" in caplog.text and "--precision bf16 --record" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nuclei_seg"):
        resolve_precision("auto", ["FP32", "BF16"], {"runtime": {"parity": {"bf16": {"passed": False}}}})
    assert "failed the bf16 parity gate" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nuclei_seg"):
        resolve_precision("auto", ["FP32"], {})  # no bf16 here: nothing to say
    assert caplog.text == ""


def test_impossible_runtime_settings_are_refused_with_a_reason(tile_model_dir: Path):
    with pytest.raises(ModelLoadError, match="int8 needs a quantized model"):
        SegmentationModel.load(tile_model_dir, RuntimeOptions("openvino", "int8"))
    with pytest.raises(ModelLoadError, match="f32 only"):
        SegmentationModel.load(tile_model_dir, RuntimeOptions("tensorflow", "bf16"))
    with pytest.raises(ValueError, match="runtime"):
        RuntimeOptions("onnx")
    with pytest.raises(ValueError, match="precision"):
        RuntimeOptions(precision="fp8")


def test_cpu_quota_is_read_from_cgroup_v2_and_v1(tmp_path: Path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "v1") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "v1") is None
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_threads_follow_the_quota_and_are_shared_among_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)), raising=False)
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert available_cpus(tmp_path) == 4  # 16 cores visible, a quota of 4 CPUs
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1  # half a CPU still gets one thread
    monkeypatch.setattr("service.runtime.available_cpus", lambda: 4)
    assert RuntimeOptions(workers=2).thread_count() == 2
    assert RuntimeOptions(workers=8).thread_count() == 1
    assert RuntimeOptions(threads=3, workers=2).thread_count() == 3  # a setting wins


@pytest.mark.parametrize("runtime", ["openvino", "tensorflow"])
def test_the_thread_setting_takes_effect_at_start(tile_model_dir: Path, runtime: str):
    """A fresh process started as the CLI starts (settings from the environment, model loaded before the app):
    the runtime really runs the set number of threads, and nothing warns that it was set too late."""
    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from service.cli import parse_settings\n"
        "from service.model import SegmentationModel\n"
        "s = parse_settings(['--model-dir', %r])\n"
        "m = SegmentationModel.load(s.model_dir, s.runtime_options())\n"
        "print('THREADS', m.network.runtime, m.network.threads)\n" % str(tile_model_dir))
    env = {"NUCLEI_THREADS": "1", "NUCLEI_RUNTIME": runtime, "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"THREADS {runtime} 1" in done.stdout
    assert "already" not in done.stderr


def test_model_info_names_the_runtime(tile_model_dir: Path, loaded_model):
    from tests.client import make_client

    call = make_client(loaded_model, tile_model_dir)
    serving = call("GET", "/model").json()["serving"]
    assert serving["runtime"] == loaded_model.network.runtime == "openvino"
    assert serving["precision"] in ("f32", "bf16") and serving["threads"] >= 1


def test_a_quantized_copy_is_served_in_int8(tile_model_dir: Path, tmp_path: Path):
    """The contract with training.quantize: the IR named in the metadata is what int8 runs."""
    import openvino as ov

    copy = tmp_path / "model"
    shutil.copytree(tile_model_dir, copy)
    (copy / "openvino").mkdir()
    ov.save_model(ov.Core().read_model(str(copy)), str(copy / "openvino" / "int8.xml"))  # a stand-in IR
    meta = json.loads((copy / "metadata.json").read_text())
    meta.update({"precision": "int8", "openvino": {"int8": "openvino/int8.xml"}})
    (copy / "metadata.json").write_text(json.dumps(meta))
    model = SegmentationModel.load(copy, RuntimeOptions("openvino", "int8"))
    assert model.network.precision == "int8"
    assert model.predict(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 64, 64, model.spec.num_classes)


def test_streams_give_the_plain_calls_results_and_never_run_beside_one(tile_model_dir: Path):
    """NUCLEI_STREAMS: the shared streams compute what the plain call does, run side by side, and a plain
    call (all threads) waits until none of them runs, so threads never outnumber the ones asked for."""
    from concurrent.futures import ThreadPoolExecutor

    model = SegmentationModel.load(tile_model_dir, RuntimeOptions("openvino", "f32", threads=2, streams=2))
    assert model.streams == 2 and model.serving()["streams"] == 2
    batch = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.predict_shared(batch), model.predict_now(batch), atol=1e-5)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: model.predict_shared(batch), range(8)))
    assert all(np.allclose(r, results[0], atol=1e-5) for r in results)

    seen = []
    network = model.network
    original_shared = network.shared

    def shared(b):  # noqa: ANN001, ANN202
        seen.append(("shared", model._alone, model._running))
        return original_shared(b)

    network.shared = shared
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(model.predict_shared, batch) for _ in range(4)] + [pool.submit(model.predict_now, batch)]
        for f in futures:
            f.result()
    assert all(not alone and 1 <= running <= 2 for _, alone, running in seen)
    assert not model._alone and model._running == 0
    plain_only = SegmentationModel.load(tile_model_dir, RuntimeOptions("openvino", "f32", threads=2))
    assert plain_only.streams == 1 and RuntimeOptions(threads=2, streams=0).stream_count() == 2
    assert RuntimeOptions(threads=1, streams=4).stream_count() == 1
    with pytest.raises(ValueError):
        RuntimeOptions(streams=-1)
