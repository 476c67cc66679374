"""Where a run's files go, written so that no reader ever sees half a file.

Per image ``<key>`` under the output folder ``DIR``:

- ``labels/<key>.tif``: instance labels (16-bit, zlib-compressed; 32-bit past 65,535 nuclei);
- ``measurements/<key>.csv``: one row per nucleus, the fields of ``POST /segment?format=rle``;
- with ``--save``: ``overlays/<key>.png``, ``geojson/<key>.geojson`` (QuPath), ``rois/<key>.zip``
  (ImageJ ROIs for Fiji's ROI Manager), ``rle/<key>.csv``;
- ``.status/<key>.json``: the image's summary row, written *last*. A re-run skips an image only
  when this record exists for the same settings and every requested file is there, so a run
  killed at any point redoes at most the images that were in flight.

Every file is written to a hidden temporary name in its final folder and renamed over the final
name (atomic on POSIX file systems, shared storage included), so a final name only ever holds
a whole file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.encode import geojson_bytes, imagej_roi_zip, labels_tiff, measurements_csv, overlay_png, submission_csv

Extra = Literal["overlay", "geojson", "imagej-roi", "rle"]
EXTRAS: tuple[Extra, ...] = ("overlay", "geojson", "imagej-roi", "rle")
TEMP_PREFIX = ".nuclei-seg-tmp-"
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)
SUMMARY_COLUMNS = ("image", "input", "status", "count", "area_mean", "area_median", "area_min", "area_max",
                   "seconds", "error")


def atomic_write(path: Path, data: bytes, sync_folder: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The data reach the disk before the rename (fsync), so after a power cut or a node crash a final
    name holds the whole file or the previous one, never an empty one; ``sync_folder`` also makes
    the rename itself durable (for the status record, which vouches for the other files).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are for the lab to read
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    if sync_folder:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def source_identity(source: Path) -> dict[str, Any]:
    """What identifies an input file: where it is, its size and modification time. A record for
    another file with the same key, or for this file before it was replaced, does not match."""
    stat = source.stat()
    return {"path": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class Row:
    """One image's line of ``summary.csv`` (and its ``.status`` record)."""

    image: str
    input: str
    status: Literal["ok", "error", "pending"]
    count: int | None = None
    area_mean: float | None = None
    area_median: float | None = None
    area_min: int | None = None
    area_max: int | None = None
    seconds: float | None = None
    error: str = ""

    @classmethod
    def ok(cls, key: str, source: Path, nuclei: list[dict[str, Any]], seconds: float) -> "Row":
        areas = [n["area"] for n in nuclei]
        return cls(key, str(source), "ok", len(areas),
                   round(statistics.fmean(areas), 2) if areas else None,
                   float(statistics.median(areas)) if areas else None,
                   min(areas, default=None), max(areas, default=None), round(seconds, 3))

    @classmethod
    def failed(cls, key: str, source: Path, error: str, seconds: float) -> "Row":
        return cls(key, str(source), "error", seconds=round(seconds, 3), error=error)


@dataclass(frozen=True)
class Layout:
    """The output folder of a run, and what each image must have there to count as done."""

    root: Path
    extras: tuple[Extra, ...] = ()
    fingerprint: str = ""  # the model and settings the outputs were made with

    def files(self, key: str) -> dict[str, Path]:
        """The files an image gets, by kind: labels, measurements, then the requested extras."""
        paths = {"labels": self.root / "labels" / f"{key}.tif",
                 "measurements": self.root / "measurements" / f"{key}.csv",
                 "overlay": self.root / "overlays" / f"{key}.png",
                 "geojson": self.root / "geojson" / f"{key}.geojson",
                 "imagej-roi": self.root / "rois" / f"{key}.zip",
                 "rle": self.root / "rle" / f"{key}.csv"}
        return {kind: path for kind, path in paths.items() if kind in ("labels", "measurements") or kind in self.extras}

    def status_path(self, key: str) -> Path:
        return self.root / ".status" / f"{key}.json"

    def write(self, key: str, labels: np.ndarray, nuclei: list[dict[str, Any]], image: np.ndarray | None) -> None:
        """Write one segmented image's files (``image`` is needed only for the overlay)."""
        encoders = {
            "labels": lambda: labels_tiff(labels),
            "measurements": lambda: measurements_csv(nuclei).encode(),
            "overlay": lambda: overlay_png(image, labels),
            "geojson": lambda: geojson_bytes(labels, nuclei),
            "imagej-roi": lambda: imagej_roi_zip(labels),
            "rle": lambda: submission_csv([(Path(key).name, {"nuclei": nuclei})]).encode(),
        }
        for kind, path in self.files(key).items():
            atomic_write(path, encoders[kind]())

    def forget(self, key: str) -> None:
        """Remove the image's status record before its files are rewritten: a record must never
        vouch for files that are half this run's and half an earlier one's."""
        self.status_path(key).unlink(missing_ok=True)

    def record(self, row: Row, source: Path) -> None:
        """Write the image's status record: the last write, the one that marks it done."""
        try:
            identity = source_identity(source)
        except OSError:
            identity = None  # the input is gone or unreadable: a record that never matches
        record = {"fingerprint": self.fingerprint, "source": identity, **asdict(row)}
        atomic_write(self.status_path(row.image), json.dumps(record).encode(), sync_folder=True)

    def done(self, key: str, source: Path) -> Row | None:
        """The image's row if this very input is finished with these settings and has every file
        asked for, else None."""
        try:
            record = json.loads(self.status_path(key).read_text())
            identity = source_identity(source)
        except (OSError, ValueError):
            return None
        if record.pop("fingerprint", None) != self.fingerprint or record.get("status") != "ok":
            return None  # other settings, or it failed: do it again
        if record.pop("source", None) != identity:
            return None  # another file with the same name, or this one changed since
        if not all(path.is_file() for path in self.files(key).values()):
            return None
        return Row(**{k: record[k] for k in SUMMARY_COLUMNS if k in record})

    def write_summary(self, rows: list[Row]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
        atomic_write(self.root / "summary.csv", buffer.getvalue().encode())

    def write_run(self, run: dict[str, Any]) -> None:
        atomic_write(self.root / "run.json", (json.dumps(run, indent=2, default=str) + "\n").encode())

    def output_folders(self) -> list[Path]:
        """The folders a run writes, which an input search must not read back."""
        return [self.root / name for name in ("labels", "measurements", "overlays", "geojson", "rois", "rle", ".status")]

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed run left behind (never a final name); returns how many."""
        stale = list(self.root.rglob(TEMP_PREFIX + "*")) if self.root.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def parse_extras(text: str) -> tuple[Extra, ...]:
    """``--save overlay,geojson`` -> ("overlay", "geojson"); unknown names are an error."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in EXTRAS]
    if unknown:
        raise ValueError(f"unknown --save output {', '.join(unknown)}; choose from {', '.join(EXTRAS)}")
    return names  # type: ignore[return-value]

