"""``nuclei-serve``: start the HTTP service (uvicorn) with the settings of ``service.config``.

Flags override the ``NUCLEI_*`` environment variables. The model is loaded and checked before
uvicorn starts, so a missing, corrupt or incompatible model ends the start with one line that
names the path and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from service.config import Settings


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
    exit_quietly_after_graceful_shutdown()
    if settings.workers == 1:
        app = create_app(settings, model)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
        return
    del model  # each worker process loads its own copy from the environment
    os.environ.update({"NUCLEI_MODEL_DIR": str(settings.model_dir), "NUCLEI_HOST": settings.host,
                       "NUCLEI_PORT": str(settings.port)})
    uvicorn.run("service.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level)


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
