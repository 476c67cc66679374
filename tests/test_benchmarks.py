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
