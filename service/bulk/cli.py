"""``nuclei-seg``: the command line. ``nuclei-seg segment INPUT... --out DIR`` segments files,
folders (recursive) or globs; ``nuclei-seg serve`` starts the HTTP service (as ``nuclei-serve``).

By default the model runs in this process. ``--server URL`` posts the images to a running
service or a load-balanced cluster instead; ``--scheduler tcp://HOST:8786`` runs them on a Dask
cluster and ``--dask-workers N`` on a local one. Every engine writes the same outputs (see
``service.bulk.outputs``) and re-running the same command skips the images already done.

Exit status: 0 when every image was segmented, 1 when any failed (the reasons are in
``summary.csv``), 2 for a usage error (no images, no model, no server), 130 when stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from service.bulk.inputs import InputError, find_jobs
from service.bulk.outputs import EXTRAS, Layout, parse_extras
from service.bulk.run import RunLocked, fingerprint, run_jobs
from service.config import Settings
from service.runtime import PRECISIONS, RUNTIMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nuclei-seg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="start the HTTP service (the flags of nuclei-serve)", add_help=False)
    seg = commands.add_parser("segment", help="segment files, folders or globs into an output folder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    seg.add_argument("--out", type=Path, required=True, help="output folder (created; re-runs resume in it)")
    seg.add_argument("--save", default="", help=f"extra outputs, comma-separated: {','.join(EXTRAS)}")
    seg.add_argument("--overwrite", action="store_true", help="redo images whose outputs are already complete")
    what = seg.add_argument_group("segmentation (as the query parameters of POST /segment)")
    what.add_argument("--diameter", type=float, help="typical nucleus diameter in pixels (default: estimated)")
    what.add_argument("--tiling", action=argparse.BooleanOptionalAction, default=None,
                      help="native-resolution tiles, or resize to the model input (default: the model's mode)")
    what.add_argument("--tta", action="store_true", help="average 4 flipped predictions (4x slower)")
    what.add_argument("--min-size", type=int, help="drop nuclei smaller than this many pixels")
    what.add_argument("--channel", type=int, help="nuclear channel (0-based) of multi-channel images, or page")
    what.add_argument("--prob-thresh", type=float, help="foreground threshold (default: the model's)")
    what.add_argument("--seed-thresh", type=float, help="seed threshold (default: the model's)")
    local = seg.add_argument_group("in-process and Dask (default: the NUCLEI_* settings)")
    local.add_argument("--model-dir", type=Path, help="exported model folder (default NUCLEI_MODEL_DIR or the shipped model)")
    local.add_argument("--runtime", choices=RUNTIMES)
    local.add_argument("--precision", choices=PRECISIONS)
    local.add_argument("--threads", type=int, help="network threads per process (0: the CPUs it may use)")
    remote = seg.add_argument_group("on a running service")
    remote.add_argument("--server", metavar="URL", help="post the images to this service instead of loading a model")
    remote.add_argument("--concurrency", type=int, default=4, help="images in flight at once (default 4)")
    remote.add_argument("--retries", type=int, default=5, help="retries on 503/connection errors (default 5)")
    remote.add_argument("--api-key-env", default="NUCLEI_API_KEY", metavar="NAME",
                        help="environment variable holding the API key (default NUCLEI_API_KEY)")
    dask = seg.add_argument_group("on a Dask cluster")
    dask.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://HOST:8786")
    dask.add_argument("--dask-workers", type=int, metavar="N", help="start a local Dask cluster of N processes")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from service.cli import main as serve

        serve(argv[1:])
        return
    args = build_parser().parse_args(argv)
    sys.exit(segment_command(args))


def segment_command(args: argparse.Namespace) -> int:
    """Run ``nuclei-seg segment``; returns the exit status."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)  # a local cluster's start and stop chatter
    args.out = args.out.resolve()  # Dask workers resolve paths in their own working directories
    try:
        settings, extras = settings_from(args), parse_extras(args.save)
        jobs = find_jobs(args.inputs, exclude=Layout(args.out).output_folders())
        # the query parameters of POST /segment: --server sends them, the other engines take them as options
        chosen = {"tiling": args.tiling, "tta": args.tta, "min_size": args.min_size, "diameter": args.diameter,
                  "channel": args.channel, "prob_thresh": args.prob_thresh, "seed_thresh": args.seed_thresh}
        options = settings.segment_options(**{k: v for k, v in chosen.items() if k != "channel"})
        engine, metadata, model = build_engine(args, settings, options, chosen, need_image="overlay" in extras)
    except (InputError, ValueError, RuntimeError, OSError) as exc:
        print(f"nuclei-seg: error: {exc}", file=sys.stderr)
        return 2
    layout = Layout(args.out, extras, fingerprint(metadata, outputs_depend_on(args, settings, chosen, metadata)))
    description = {"inputs": args.inputs, "out": str(args.out), "model": model, "options": chosen,
                   "save": list(extras)}
    stop = threading.Event()
    restore = stop_on_signals(stop)
    try:
        outcome = run_jobs(jobs, layout, engine, stop, args.overwrite, description)
    except RunLocked as exc:
        print(f"nuclei-seg: error: {exc}", file=sys.stderr)
        return 2
    finally:
        restore()
        engine.close()
    print(f"{outcome.segmented} segmented, {outcome.skipped} already done, {outcome.failed} failed"
          + (f", {outcome.pending} not started (stopped)" if outcome.pending else "")
          + f" in {outcome.seconds:.1f} s; summary: {args.out / 'summary.csv'}", file=sys.stderr)
    for failure in outcome.failures[:10]:
        print(f"  failed: {failure}", file=sys.stderr)
    return outcome.exit_status


def outputs_depend_on(args: argparse.Namespace, settings: Settings, chosen: dict[str, Any],
                      metadata: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the model that the outputs depend on, for the fingerprint: the options,
    the runtime and precision (the server's own with ``--server``), and the tiling."""
    if args.server:
        serving = metadata.get("serving") or {}
        return {**chosen, "runtime": serving.get("runtime"), "precision": serving.get("precision")}
    return {**chosen, "runtime": settings.runtime, "precision": settings.precision,
            "max_tile_size": settings.max_tile_size, "tile_batch_size": settings.tile_batch_size}


def settings_from(args: argparse.Namespace) -> Settings:
    """The ``NUCLEI_*`` settings with this command's flags over them (one list of knobs)."""
    update = {k: v for k, v in {"model_dir": args.model_dir, "runtime": args.runtime, "precision": args.precision,
                                "threads": args.threads}.items() if v is not None}
    settings = Settings().model_copy(update=update) if update else Settings()
    return settings.model_copy(update={"model_dir": settings.model_dir.resolve()})


def build_engine(args: argparse.Namespace, settings: Settings, options: Any, chosen: dict[str, Any],
                 need_image: bool) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(engine, the model's metadata, how run.json names the model) for the flags given."""
    if sum(x is not None for x in (args.server, args.scheduler, args.dask_workers)) > 1:
        raise ValueError("give at most one of --server, --scheduler and --dask-workers")
    if args.server:
        from service.bulk.engines import OnServer
        from service.client import Client, RetryPolicy, ServiceError

        if args.concurrency < 1 or args.retries < 0:
            raise ValueError("--concurrency must be >= 1 and --retries >= 0")
        client = Client(args.server, api_key=os.environ.get(args.api_key_env, ""), retry=RetryPolicy(args.retries))
        try:
            metadata = client.model()
        except ServiceError as exc:
            raise RuntimeError(f"{args.server}: {exc}") from None
        engine = OnServer(client, chosen, need_image, settings.max_pixels, args.concurrency)
        return engine, metadata, {"url": args.server, "serving": metadata.get("serving")}
    from service.model import SegmentationModel

    if args.scheduler or args.dask_workers:
        from service.bulk.cluster import OnDask

        if args.dask_workers is not None and args.dask_workers < 1:
            raise ValueError("--dask-workers must be >= 1")
        metadata = SegmentationModel.without_network(settings.model_dir).spec.metadata  # checked before the cluster starts
        engine = OnDask(settings.model_dir, settings.runtime_options(), options, settings.max_pixels,
                        args.scheduler, args.dask_workers or 1, args.channel)
        return engine, metadata, {"dir": str(settings.model_dir)}
    from service.bulk.engines import InProcess

    # one image after another: the network on all threads, no streams (they serve overlapping requests only)
    model = SegmentationModel.load(settings.model_dir, replace(settings.runtime_options(), streams=1))
    engine = InProcess(model, options, settings.max_pixels, args.channel)
    return engine, model.spec.metadata, {"dir": str(settings.model_dir)}


def stop_on_signals(stop: threading.Event) -> Any:
    """First Ctrl-C or SIGTERM: finish the images in flight, then stop; the second: stop now.

    Returns a function that puts the previous handlers back.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(signum: int, _: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\nnuclei-seg: {signal.Signals(signum).name}: finishing the images in flight "
              "(again to stop at once)", file=sys.stderr)

    for sig in previous:
        signal.signal(sig, handle)
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


if __name__ == "__main__":
    main()
