"""The benchmark's report keeps hand-written notes across reruns (the benchmarks themselves are not run in CI)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.serve_bench import NOTES_MARKER, kept_notes


def test_notes_after_the_marker_survive_a_rerun(tmp_path: Path):
    report = tmp_path / "performance.md"
    assert kept_notes(report).strip() == NOTES_MARKER  # first run: the marker is written
    report.write_text(f"# old numbers\n| 1 | 2 |\n{NOTES_MARKER}\n## Notes\nwhy the defaults win\n")
    kept = kept_notes(report)
    assert kept.startswith(NOTES_MARKER) and "why the defaults win" in kept and "old numbers" not in kept


def test_runtime_comparison_rows_are_relative_to_the_first(tile_model_dir: Path):
    """The comparison's mechanics on the tiny model (one round; the numbers mean nothing here)."""
    import numpy as np

    from benchmarks.serve_bench import compare_runtimes, parse_runtimes, runtime_rows

    runtimes = parse_runtimes("tensorflow:f32,openvino")
    assert runtimes == [("tensorflow", "f32"), ("openvino", "f32")]
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    rows = compare_runtimes(tile_model_dir, None, runtimes, image, served_batch=2, rounds=1)
    assert [r["runtime"] for r in rows] == ["tensorflow", "openvino"]
    assert rows[0]["tile_b1_speedup"] == 1.0 and rows[0]["identical_labels"]
    assert rows[1]["identical_labels"]  # f32 through either runtime: the same labels
    assert len(runtime_rows(rows, 2)) == 2 + len(rows) + 1
