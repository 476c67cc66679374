"""Load test: the real server under sustained concurrent load, checking answers and memory.

    python -m benchmarks.load_test --requests 2000 --concurrency 32 --out docs/load_test.md

Every request must be answered with a 2xx or a deliberate 503 (queue full, with Retry-After);
anything else is a failure. RSS after all requests must stay within 10% of RSS after the first
200 (no leak). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.harness import ROOT, Server, pct, png_bytes, real_images, send_all


def run(requests: int, concurrency: int, model_dir: Path, env: dict[str, str] | None = None) -> dict:
    """Drive the server and return the figures (statuses, p99, RSS at 200 and at the end)."""
    images, source = real_images(16)
    payloads = [png_bytes(im) for im in images]
    server = Server({"NUCLEI_MODEL_DIR": str(model_dir), **(env or {})})
    rss_at: dict[int, float] = {}
    checkpoint = min(200, requests)

    def on_done(n: int) -> None:
        if n == checkpoint:
            rss_at[checkpoint] = server.rss_mb()


    try:
        results, wall = send_all(server.url, payloads, concurrency, requests, on_done)
        rss_at[requests] = server.rss_mb()
        peak = server.peak_rss_mb()
    finally:
        server.stop()
    statuses = Counter(status for status, _ in results)
    latencies = [s for status, s in results if status == 200]
    unexpected = {s: n for s, n in statuses.items() if s not in (200, 503)}
    growth = rss_at[requests] / rss_at[checkpoint] - 1.0
    return {
        "source": source, "requests": requests, "concurrency": concurrency, "wall_s": wall,
        "statuses": dict(statuses), "unexpected": unexpected, "rejected_503": statuses.get(503, 0),
        "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000,
        "rss_checkpoint": checkpoint, "rss_at_checkpoint_mb": rss_at[checkpoint], "rss_end_mb": rss_at[requests],
        "rss_growth": growth, "peak_rss_mb": peak, "cold_start_s": server.cold_start,
        "passed": not unexpected and growth <= 0.10,
    }


def markdown(r: dict, command: str) -> str:
    return "\n".join([
        f"Command: `{command}` ({r['source']}), {time.strftime('%Y-%m-%d %H:%M')}.\n",
        "| requests | concurrency | 200 | deliberate 503 | other | p50 ms | p99 ms | RSS after "
        f"{r['rss_checkpoint']} (MB) | RSS after {r['requests']} (MB) | growth | throughput (req/s) | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['requests']} | {r['concurrency']} | {r['statuses'].get(200, 0)} | {r['rejected_503']} | "
        f"{sum(r['unexpected'].values())} {r['unexpected'] or ''} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
        f"{r['rss_at_checkpoint_mb']:.0f} | {r['rss_end_mb']:.0f} | {r['rss_growth']:+.1%} | "
        f"{r['requests'] / r['wall_s']:.1f} | {'pass' if r['passed'] else 'FAIL'} |",
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--out", type=Path, help="markdown file to write the table to")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = run(args.requests, args.concurrency, args.model_dir)
    text = markdown(result, "python -m benchmarks.load_test " + " ".join(argv or sys.argv[1:]))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
