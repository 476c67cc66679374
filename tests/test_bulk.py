"""``nuclei-seg segment``: input discovery, outputs, resume, failures, stop, and the three engines
(in-process, ``--server``, Dask ``LocalCluster``) giving identical labels."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.bulk.engines import InProcess, OnServer
from service.bulk.inputs import InputError, find_jobs
from service.bulk.outputs import TEMP_PREFIX, Layout, Row, atomic_write, parse_extras
from service.bulk.run import RunLocked, fingerprint, locked, run_jobs
from service.client import Client, RetryPolicy, ServiceError
from service.config import Settings
from service.encode import geojson_document, labels_from_rle, rle_document
from tests.synthetic import random_labels, render

ROOT = Path(__file__).resolve().parent.parent
#: The shipped model, so that the images really have nuclei to count (a tiny test model finds none).
SHIPPED = ROOT / "models" / "default"


@pytest.fixture(scope="module")
def shipped():
    """The shipped model on one thread: what each worker of a 2-worker local Dask cluster uses on 2 cores."""
    from service.model import SegmentationModel
    from service.runtime import RuntimeOptions

    return SegmentationModel.load(SHIPPED, RuntimeOptions(threads=1))


def write_images(folder: Path, count: int, seed: int = 3, prefix: str = "cells") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        labels = random_labels(rng, (72 + 8 * (i % 3), 88), count=5, radius=7)
        path = folder / f"{prefix}{i:02d}.png"
        Image.fromarray(render(labels, rng)).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    write_images(root / "plateA", 3)
    write_images(root / "plateB", 2)  # same file names as plateA: outputs must not collide
    (root / "plateA" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def engine_for(model) -> InProcess:
    return InProcess(model, Settings().segment_options(), max_pixels=4_000_000)


def layout_for(out: Path, extras=(), model=None) -> Layout:
    return Layout(out, extras, fingerprint(model.spec.metadata if model else {}, {}))


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def label_files(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out / "labels").as_posix(): tifffile.imread(p) for p in sorted((out / "labels").rglob("*.tif"))}


# --- inputs -----------------------------------------------------------------------------------

def test_inputs_recurse_folders_expand_globs_and_keep_keys_unique(tmp_path: Path):
    write_images(tmp_path / "a" / "sub", 2)
    write_images(tmp_path / "b", 2)
    Image.new("L", (8, 8)).save(tmp_path / "b" / "cells00.tif")  # same stem as b/cells00.png
    (tmp_path / "b" / ".hidden").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "b" / ".hidden" / "x.png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    jobs = find_jobs([str(tmp_path / "a"), str(tmp_path / "b" / "*.png"), str(tmp_path / "b" / "cells00.tif")])
    keys = [job.key for job in jobs]
    assert len(keys) == len(set(k.casefold() for k in keys)) == 5
    # a folder's images keep their relative path; one folder's clash keeps the suffix
    assert set(keys) == {"sub/cells00", "sub/cells01", "cells01", "cells00_png", "cells00_tif"}
    assert all(not key.startswith("/") and ".." not in key for key in keys)
    # the same image named twice is one job; the same command gives the same keys
    again = find_jobs([str(tmp_path / "a"), str(tmp_path / "a" / "sub" / "cells00.png"), str(tmp_path / "b" / "*.png"),
                       str(tmp_path / "b" / "cells00.tif")])
    assert [j.key for j in again] == keys


def test_same_stem_in_two_folders_gets_two_keys(images: Path):
    keys = {job.key for job in find_jobs([str(images / "plateA"), str(images / "plateB")])}
    assert {"plateA/cells00", "plateB/cells00", "cells02", "corrupt"} <= keys


def test_inputs_that_name_nothing_are_an_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for argument in (tmp_path / "missing", tmp_path / "empty", tmp_path / "*.png"):
        with pytest.raises(InputError):
            find_jobs([str(argument)])


def test_output_folder_inside_the_input_folder_is_not_read_back(images: Path):
    out = images / "results"
    write_images(out / "overlays", 2)
    keys = {job.key for job in find_jobs([str(images)], exclude=Layout(out).output_folders())}
    assert not any(key.startswith("results") for key in keys)
    # and --out above the inputs keeps them: only the run's own folders are left out
    keys = {job.key for job in find_jobs([str(images / "plateA")], exclude=Layout(images).output_folders())}
    assert "cells00" in keys


def test_unknown_save_output_is_an_error():
    assert parse_extras("overlay, geojson,overlay") == ("overlay", "geojson")
    with pytest.raises(ValueError, match="unknown --save"):
        parse_extras("overlay,pdf")


# --- outputs ----------------------------------------------------------------------------------

def test_atomic_write_leaves_nothing_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "labels" / "x.tif"
    atomic_write(target, b"old")

    def no_space(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("service.bulk.outputs.os.replace", no_space)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"  # the final name still holds the whole old file
    assert not list(tmp_path.rglob(TEMP_PREFIX + "*"))
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # readable by the group, as the umask allows


def test_rle_geojson_and_labels_round_trip():
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:12] = 1
    labels[20:31, 30:45] = 2
    document = rle_document(labels)
    assert np.array_equal(labels_from_rle(document["nuclei"], labels.shape), labels)
    features = geojson_document(labels, document["nuclei"])["features"]
    assert [f["properties"]["label"] for f in features] == [1, 2]
    for feature, nucleus in zip(features, document["nuclei"]):
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert np.array_equal(ring[0], ring[-1])
        x, y = ring[:, 0], ring[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        assert nucleus["area"] - 2 <= area <= nucleus["area"]  # pixel edges, corners cut by half a pixel
        r0, c0, r1, c1 = nucleus["bbox"]
        assert (x.min(), y.min(), x.max(), y.max()) == (c0, r0, c1, r1)
        assert feature["properties"]["measurements"]["area"] == nucleus["area"]


def test_status_record_counts_only_for_the_same_settings_and_complete_files(tmp_path: Path):
    layout = Layout(tmp_path, ("overlay",), "abc")
    labels = np.zeros((8, 8), np.int32)
    labels[2:5, 2:5] = 1
    nuclei = rle_document(labels)["nuclei"]
    source, other = tmp_path / "x.png", tmp_path / "elsewhere" / "x.png"
    source.write_bytes(b"image bytes")
    other.parent.mkdir()
    other.write_bytes(b"other image")
    layout.write("p/x", labels, nuclei, np.zeros((8, 8, 3), np.uint8))
    layout.record(Row.ok("p/x", source, nuclei, 0.1), source)
    assert layout.done("p/x", source).count == 1
    assert Layout(tmp_path, ("overlay",), "other").done("p/x", source) is None  # another model or options
    assert Layout(tmp_path, ("overlay", "geojson"), "abc").done("p/x", source) is None  # a file asked for is missing
    assert layout.done("p/x", other) is None  # another image with the same name
    source.write_bytes(b"image bytes, replaced")
    assert layout.done("p/x", source) is None  # the image changed since
    layout.record(Row.ok("p/x", source, nuclei, 0.1), source)
    assert layout.done("p/x", source) is not None
    (tmp_path / "overlays" / "p" / "x.png").unlink()
    assert layout.done("p/x", source) is None


def test_a_second_run_on_the_same_folder_is_refused(tmp_path: Path):
    with locked(tmp_path):
        with pytest.raises(RunLocked):
            with locked(tmp_path):
                pass
    with locked(tmp_path):  # released
        pass


# --- in-process runs --------------------------------------------------------------------------

def test_run_writes_every_output_and_records_the_bad_image(images: Path, tmp_path: Path, shipped):
    out = tmp_path / "out"
    jobs = find_jobs([str(images)])
    outcome = run_jobs(jobs, layout_for(out, ("overlay", "geojson", "imagej-roi", "rle"), shipped), engine_for(shipped),
                       threading.Event())
    assert (outcome.total, outcome.segmented, outcome.failed, outcome.exit_status) == (6, 5, 1, 1)
    rows = {row["image"]: row for row in read_summary(out)}
    assert set(rows) == {job.key for job in jobs}
    assert rows["plateA/corrupt"]["status"] == "error" and "DecodeError" in rows["plateA/corrupt"]["error"]
    labels = label_files(out)
    assert len(labels) == 5
    assert all(int(row["count"]) >= 3 for row in rows.values() if row["status"] == "ok")  # 5 discs were drawn
    for key, row in rows.items():
        if row["status"] != "ok":
            continue
        image = labels[f"{key}.tif"]
        assert image.dtype == np.uint16 and image.shape == Image.open(row["input"]).size[::-1]
        assert int(row["count"]) == len(np.unique(image)) - 1
        with open(out / "measurements" / f"{key}.csv", newline="") as handle:
            assert len(list(csv.DictReader(handle))) == int(row["count"])
        assert (out / "overlays" / f"{key}.png").is_file() and (out / "rle" / f"{key}.csv").is_file()
        assert len(zipfile.ZipFile(out / "rois" / f"{key}.zip").namelist()) == int(row["count"])
        assert len(json.loads((out / "geojson" / f"{key}.geojson").read_text())["features"]) == int(row["count"])
    run = json.loads((out / "run.json").read_text())
    assert run["outcome"]["failed"] == 1 and run["ended"] and run["packages"]["numpy"] and run["engine"] == "in-process"


def test_summary_counts_equal_what_the_service_returns(images: Path, tmp_path: Path, shipped):
    out = tmp_path / "out"
    run_jobs(find_jobs([str(images)]), layout_for(out, (), shipped), engine_for(shipped), threading.Event())
    app = create_app(Settings(model_dir=SHIPPED), shipped)
    with TestClient(app) as http:
        for row in read_summary(out):
            if row["status"] != "ok":
                continue
            with open(row["input"], "rb") as handle:
                response = http.post("/segment", params={"format": "rle"}, files={"file": ("x.png", handle.read())})
            assert response.json()["count"] == int(row["count"])


def test_rerun_skips_finished_images_and_overwrite_redoes_them(images: Path, tmp_path: Path, shipped):
    out = tmp_path / "out"
    jobs = find_jobs([str(images)])
    layout = layout_for(out, (), shipped)
    run_jobs(jobs, layout, engine_for(shipped), threading.Event())
    first = {p: p.stat().st_mtime_ns for p in (out / "labels").rglob("*.tif")}
    again = run_jobs(jobs, layout, engine_for(shipped), threading.Event())
    assert (again.skipped, again.segmented, again.failed) == (5, 0, 1)  # the failed image is retried
    assert {p: p.stat().st_mtime_ns for p in first} == first
    redone = run_jobs(jobs, layout, engine_for(shipped), threading.Event(), overwrite=True)
    assert (redone.skipped, redone.segmented) == (0, 5)
    other = run_jobs(jobs, Layout(out, (), "another model"), engine_for(shipped), threading.Event())
    assert other.skipped == 0  # outputs of other settings are not taken as done


def test_stopped_run_marks_the_rest_pending_and_a_rerun_does_only_them(images: Path, tmp_path: Path, shipped):
    out = tmp_path / "out"
    jobs = find_jobs([str(images)])
    layout = layout_for(out, (), shipped)
    stop = threading.Event()

    class StopAfterTwo(InProcess):
        def run(self, jobs, layout, stop_event):
            for index, row in enumerate(super().run(jobs, layout, stop_event)):
                if index == 1:
                    stop.set()  # as the Ctrl-C handler does
                yield row

    stale = out / "labels" / (TEMP_PREFIX + "killed")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file from a killed run")
    stopped = run_jobs(jobs, layout, StopAfterTwo(shipped, Settings().segment_options(), 4_000_000), stop)
    # stopped after the second image: at most the two images then in flight (one segmenting, one writing) finish
    assert stopped.interrupted and stopped.exit_status == 130 and stopped.pending in (3, 4)
    assert not stale.exists()
    before = [r["status"] for r in read_summary(out)]
    assert before.count("pending") == stopped.pending
    resumed = run_jobs(jobs, layout, engine_for(shipped), threading.Event())
    assert resumed.skipped == before.count("ok")
    assert resumed.segmented + resumed.failed == before.count("pending") + before.count("error")
    assert [r["status"] for r in read_summary(out)].count("pending") == 0


def test_cli_end_to_end_sigterm_stops_cleanly_and_rerun_resumes(tmp_path: Path):
    inputs = tmp_path / "in"
    write_images(inputs, 40)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "service.bulk.cli", "segment", str(inputs), "--out", str(out),
               "--model-dir", str(SHIPPED), "--save", "overlay"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process_ = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first_line = process_.stdout.readline()  # one image finished: a plain line, as stdout is no terminal
    assert first_line.startswith("[1/40] ")
    process_.send_signal(signal.SIGTERM)
    _, stderr = process_.communicate(timeout=120)
    assert process_.returncode == 130, stderr
    assert not list(out.rglob(TEMP_PREFIX + "*"))
    statuses = [row["status"] for row in read_summary(out)]
    assert "pending" in statuses and "ok" in statuses
    for path in (out / "labels").rglob("*.tif"):
        tifffile.imread(path)  # whole files only under final names
    done_before = statuses.count("ok")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{40 - done_before} segmented, {done_before} already done, 0 failed" in result.stderr
    assert [row["status"] for row in read_summary(out)] == ["ok"] * 40


def test_cli_usage_errors_exit_2(tmp_path: Path):
    from service.bulk.cli import main

    for argv in (["segment", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                 ["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--save", "pdf"],
                 ["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--model-dir", str(tmp_path / "nomodel")]):
        write_images(tmp_path, 1)
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert not (tmp_path / "o").exists()  # nothing written for a command that could not start


# --- on a server ------------------------------------------------------------------------------

def test_server_engine_gives_the_in_process_labels(images: Path, tmp_path: Path, shipped):
    jobs = find_jobs([str(images)])
    local_out, server_out = tmp_path / "local", tmp_path / "server"
    run_jobs(jobs, layout_for(local_out, ("overlay",), shipped), engine_for(shipped), threading.Event())
    with TestClient(create_app(Settings(model_dir=SHIPPED, api_key="k3y"), shipped)) as http:
        client = Client("http://testserver", api_key="k3y", http=http)
        engine = OnServer(client, {}, need_image=True, max_pixels=4_000_000, concurrency=2)
        outcome = run_jobs(jobs, layout_for(server_out, ("overlay",), shipped), engine, threading.Event())
    assert (outcome.segmented, outcome.failed) == (5, 1)
    local, remote = label_files(local_out), label_files(server_out)
    assert local.keys() == remote.keys() and all(np.array_equal(local[k], remote[k]) for k in local)
    failed = [row for row in read_summary(server_out) if row["status"] == "error"]
    assert len(failed) == 1 and "HTTP 422" in failed[0]["error"]


def mock_client(responses: list, sleeps: list[float], retries: int = 3) -> Client:
    """A client whose transport answers from ``responses`` (a status with headers, or an exception)."""
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers = answer
        return httpx.Response(status, headers=headers, json={"detail": f"status {status}"} if status >= 400 else
                              {"height": 1, "width": 1, "count": 0, "nuclei": []})

    return Client("http://svc", retry=RetryPolicy(retries, backoff=0.01), sleep=sleeps.append,
                  http=httpx.Client(transport=httpx.MockTransport(handler)))


def test_client_retries_overload_and_connection_errors_honouring_retry_after():
    sleeps: list[float] = []
    client = mock_client([(503, {"Retry-After": "2"}), httpx.ConnectError("refused"), (502, {}), (200, {})], sleeps)
    assert client.segment(b"png bytes")["count"] == 0
    assert sleeps[0] == 2.0 and len(sleeps) == 3 and all(0 < s <= 0.04 for s in sleeps[1:])


def test_client_does_not_retry_a_bad_image_and_gives_up_after_the_retries():
    sleeps: list[float] = []
    with pytest.raises(ServiceError, match="HTTP 422: status 422") as error:
        mock_client([(422, {}), (200, {})], sleeps).segment(b"x")
    assert error.value.status == 422 and sleeps == []
    with pytest.raises(ServiceError, match="HTTP 503"):
        mock_client([(503, {})] * 3, sleeps, retries=2).segment(b"x")
    assert len(sleeps) == 2


# --- on Dask ----------------------------------------------------------------------------------

def test_dask_local_cluster_gives_the_in_process_labels(images: Path, tmp_path: Path, shipped):
    from service.bulk.cluster import OnDask
    from service.runtime import RuntimeOptions

    jobs = find_jobs([str(images)])
    local_out, dask_out = tmp_path / "local", tmp_path / "dask"
    run_jobs(jobs, layout_for(local_out, ("geojson",), shipped), engine_for(shipped), threading.Event())
    engine = OnDask(SHIPPED, RuntimeOptions(threads=1), Settings().segment_options(), 4_000_000, workers=2)
    try:
        assert len(engine.client.scheduler_info()["workers"]) == 2
        outcome = run_jobs(jobs, layout_for(dask_out, ("geojson",), shipped), engine, threading.Event())
        loads = engine.client.run(lambda dask_worker: dask_worker.plugins["nuclei-seg-model"].segmenter is not None)
    finally:
        engine.close()
    assert (outcome.segmented, outcome.failed) == (5, 1)
    assert all(loads.values())  # each worker holds its model from the plugin, loaded once
    local, remote = label_files(local_out), label_files(dask_out)
    assert local.keys() == remote.keys() and all(np.array_equal(local[k], remote[k]) for k in local)
    for path in (local_out / "geojson").rglob("*.geojson"):
        assert path.read_bytes() == (dask_out / path.relative_to(local_out)).read_bytes()
    assert read_summary(local_out)[0]["count"] == read_summary(dask_out)[0]["count"]


def test_dask_workers_use_their_own_settings_and_say_why_a_model_did_not_load(tmp_path, monkeypatch):
    from service.bulk.cluster import ModelPlugin, worker_settings
    from service.runtime import RuntimeOptions

    client_side = RuntimeOptions("openvino", "auto", 0, 1)
    assert worker_settings(Path("/client/model"), client_side) == (Path("/client/model"), client_side)
    monkeypatch.setenv("NUCLEI_MODEL_DIR", "/app/models/default")
    monkeypatch.setenv("NUCLEI_THREADS", "4")
    model_dir, runtime = worker_settings(Path("/client/model"), client_side)
    assert model_dir == Path("/app/models/default") and runtime.threads == 4 and runtime.precision == "auto"
    monkeypatch.delenv("NUCLEI_MODEL_DIR")
    plugin = ModelPlugin(tmp_path / "no-model", client_side, Settings().segment_options(), 1000)
    plugin.setup(None)
    assert plugin.segmenter is None and "no-model" in plugin.error


def test_fingerprint_changes_with_precision_and_tiling(tmp_path):
    from service.bulk.cli import build_parser, outputs_depend_on

    args = build_parser().parse_args(["segment", str(tmp_path), "--out", str(tmp_path / "o")])
    base = Settings()
    prints = {fingerprint({}, outputs_depend_on(args, settings, {}, {}))
              for settings in (base, base.model_copy(update={"precision": "f32"}),
                               base.model_copy(update={"max_tile_size": 256}))}
    assert len(prints) == 3


def test_the_in_process_engine_loads_the_network_without_streams(tmp_path: Path):
    """One image after another never overlaps model calls: the folder command compiles no streams, whatever
    NUCLEI_STREAMS says for the server."""
    from service.bulk.cli import build_engine, build_parser, settings_from

    args = build_parser().parse_args(["segment", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--model-dir", str(SHIPPED)])
    settings = settings_from(args)
    assert settings.streams == 2  # the server's default
    engine, _, _ = build_engine(args, settings, settings.segment_options(), {}, False)
    assert engine.describe()["serving"]["streams"] == 1
