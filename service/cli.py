"""``nuclei-serve``: start the HTTP service (uvicorn) with the settings of ``service.config``.

Flags override the ``NUCLEI_*`` environment variables. The model is loaded and checked before
uvicorn starts, so a missing, corrupt or incompatible model ends the start with one line that
names the path and a non-zero exit status. With several workers, Prometheus metrics are summed
over the workers through ``PROMETHEUS_MULTIPROC_DIR`` (a private temporary directory unless set).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from service.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsDirError(Exception):
    """The multiprocess metrics directory given in the environment cannot be used."""


def parse_settings(argv: list[str] | None = None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="nuclei-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=defaults.host, help=f"interface to bind (default {defaults.host})")
    parser.add_argument("--port", type=int, default=defaults.port, help=f"TCP port (default {defaults.port})")
    parser.add_argument("--model-dir", type=Path, default=defaults.model_dir, help="exported model folder")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="worker processes")
    args = parser.parse_args(argv)
    return defaults.model_copy(update={"host": args.host, "port": args.port, "model_dir": args.model_dir,
                                       "workers": args.workers})


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from service.app import create_app
    from service.model import ModelLoadError, SegmentationModel

    try:
        model = SegmentationModel.load(settings.model_dir, settings.runtime_options())
    except ModelLoadError as exc:
        print(f"nuclei-serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        own_metrics_dir = prepare_metrics_dir(settings.workers)
    except MetricsDirError as exc:
        print(f"nuclei-serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
    exit_quietly_after_graceful_shutdown()
    if settings.workers == 1:
        app = create_app(settings, model)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
        return
    del model  # each worker process loads its own copy from the environment
    os.environ.update({"NUCLEI_MODEL_DIR": str(settings.model_dir), "NUCLEI_HOST": settings.host,
                       "NUCLEI_PORT": str(settings.port), "NUCLEI_WORKERS": str(settings.workers)})
    try:
        uvicorn.run("service.app:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level)
    finally:  # uvicorn has joined the workers
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def prepare_metrics_dir(workers: int) -> Path | None:
    """Give prometheus_client's multiprocess mode a clean directory; returns the one to remove at exit.

    The variable must be set before the workers import prometheus_client, which picks file-backed
    values at import. A directory the user set is kept but emptied of ``*.db`` files, which are
    a previous run's counts and would be summed in (as prometheus_client's documentation requires);
    without one, several workers get a private temporary directory. One worker needs none.
    """
    given = os.environ.get(MULTIPROC_ENV, os.environ.get(MULTIPROC_ENV.lower()))  # lower case: deprecated name
    if given is None:
        if workers == 1:
            return None
        path = Path(tempfile.mkdtemp(prefix="nuclei-metrics-"))
        os.environ[MULTIPROC_ENV] = str(path)
        return path
    if not given or not Path(given).is_dir():
        raise MetricsDirError(f"{MULTIPROC_ENV}={given!r} is not a directory: create it, or unset it "
                              "to use a private temporary one")
    os.environ[MULTIPROC_ENV] = given
    try:
        for stale in Path(given).glob("*.db"):
            stale.unlink()
    except OSError as exc:
        raise MetricsDirError(f"cannot empty {MULTIPROC_ENV}={given!r} of a previous run's metrics: {exc}") from None
    return None


def exit_quietly_after_graceful_shutdown() -> None:
    """Make SIGTERM/SIGINT end the process with status 0 once uvicorn has drained in-flight requests.

    Uvicorn handles the signal itself (stop accepting, finish in-flight requests, run the
    lifespan shutdown), then re-raises it so the previous handler runs; with the default handler
    that would kill the process with -SIGTERM. A no-op previous handler lets ``main`` return 0.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


if __name__ == "__main__":
    main()
