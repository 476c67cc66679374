"""Find the images a run is given and name each one's outputs uniquely and stably.

INPUT arguments are files, folders (searched recursively) or glob patterns. An image's *key* names
its outputs (``labels/<key>.tif``): its path below the folder it was found in, without the suffix.
Keys must not collide, or one image's outputs would overwrite another's, so colliding keys take
parent folders until they differ (``plateA/A01``, ``plateB/A01``) and, where only the suffix
differs, the suffix too (``A01_png``). The same command always gives the same keys, which is what
lets a re-run find the outputs it already wrote.
"""

from __future__ import annotations

import glob
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: What a folder search picks up: the formats ``service.decode`` reads.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})


class InputError(ValueError):
    """An INPUT argument names nothing (no such path, or a pattern or folder without images)."""


@dataclass(frozen=True)
class Job:
    """One image to segment: where it is, and the key its outputs are named by."""

    source: Path
    key: str  # POSIX-style relative name, may contain "/"


def find_jobs(inputs: list[str], exclude: list[Path] = ()) -> list[Job]:
    """The images named by ``inputs``, each once, with unique keys; files under the folders of
    ``exclude`` (a run's own output folders, when they lie inside an input folder) are left out."""
    found: dict[Path, PurePosixPath] = {}
    excluded = [folder.resolve() for folder in exclude]
    for argument in inputs:
        for path, relative in _expand(argument):
            resolved = path.resolve()
            if any(resolved.is_relative_to(folder) for folder in excluded):
                continue
            found.setdefault(resolved, relative)
    if not found:
        raise InputError("no images found in " + " ".join(inputs))
    return [Job(path, key) for path, key in sorted(_unique_keys(found).items(), key=lambda item: item[1])]


def _expand(argument: str) -> list[tuple[Path, PurePosixPath]]:
    """``(file, its path relative to where it was found)`` for one INPUT argument."""
    path = Path(argument)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if _is_image(f) and not _hidden(f.relative_to(path)))
        if not files:
            raise InputError(f"{argument}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [(f, PurePosixPath(f.relative_to(path).as_posix())) for f in files]
    if path.is_file():  # named explicitly: the decoder says whether it is an image
        return [(path, PurePosixPath(path.name))]
    if glob.has_magic(argument):
        files = sorted(Path(f) for f in glob.glob(argument, recursive=True) if _is_image(Path(f)))
        if not files:
            raise InputError(f"{argument}: pattern matches no images")
        return [(f, PurePosixPath(f.name)) for f in files]
    raise InputError(f"{argument}: no such file or folder")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _unique_keys(found: dict[Path, PurePosixPath]) -> dict[Path, str]:
    """A key per file: its relative path without suffix, lengthened where two would collide.

    Files of one folder that differ only in suffix keep it (``A01_png``); files of different
    folders take as many parent folders as it takes. Collisions are found case-insensitively,
    as macOS and Windows file systems would make them.
    """
    keys = {path: str(relative.with_suffix("")) for path, relative in found.items()}
    names = {path: path.stem for path in found}
    clashing = _clashes(keys)
    siblings = defaultdict(list)
    for path in clashing:
        siblings[(path.parent, path.stem.casefold())].append(path)
    for paths in siblings.values():
        if len(paths) > 1:
            for path in paths:
                names[path] = f"{path.stem}_{path.suffix.lstrip('.').lower()}"
                keys[path] = str(found[path].with_suffix("").with_name(names[path]))
    for depth in range(1, max(len(p.parts) for p in found)):
        clashing = _clashes(keys)
        if not clashing:
            return keys
        for path in clashing:
            keys[path] = "/".join((*path.parent.parts[1:][-depth:], names[path]))
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(_clashes(keys)):  # only letter case differs (a case-sensitive file system)
        groups[keys[path].casefold()].append(path)
    for paths in groups.values():
        for index, path in enumerate(paths[1:], start=2):
            keys[path] = f"{keys[path]}_{index}"
    return keys


def _clashes(keys: dict[Path, str]) -> set[Path]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, key in keys.items():
        groups[key.casefold()].append(path)
    return {path for paths in groups.values() if len(paths) > 1 for path in paths}
