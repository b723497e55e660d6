"""Dataset manifests: which video files make up a dataset, with labels and splits.

``load_manifest(path, kind="auto")`` returns ``(entries, class_names)`` where each entry is a
``ManifestEntry(path, label, split, video_id)`` (``label`` is a class index, ``-1`` when
unlabeled; ``split`` is ``"train"``, ``"val"`` or ``"test"``). Supported layouts:

- ``generic``: CSV with header ``path,label,split`` (paths relative to the CSV's folder;
  ``label`` a class name, empty for unlabeled; optional ``video_id`` column).
- ``activitynet``: the ActivityNet v1.3 JSON (``database -> video id -> {subset,
  annotations[].label}``; a video's several annotations normally share one label). Class
  names are the taxonomy's leaf nodes when a ``taxonomy`` is present. Files are looked up
  in ``video_root`` as ``v_<id>.<ext>`` or ``<id>.<ext>``.
- ``fcvid``: FCVID's materials: ``FCVID_VideoName_TrainTestSplit.txt`` (lines
  ``<category>/<name>.mp4 train|test``) with ``FCVID_Label.txt`` (one 0/1 row of C columns
  per video, same order) and ``FCVID_Category.txt`` (class names, one per line) beside it.
  ``path`` may name the split file or the folder holding the three files.
- ``kinetics_sounds``: Kinetics CSV layout (header ``label,youtube_id,time_start,time_end,
  split``, optional ``is_cc``) of the Kinetics-Sounds subset; files are
  ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` found in ``video_root``, ``video_root/<split>``
  or ``video_root/<split>/<label>``.

A ``classes.txt`` (one name per line) beside the manifest, or ``class_names=``, fixes the class
order; a label outside it raises ``ManifestError``. Missing manifest files, malformed rows and
unknown labels raise ``ManifestError(path, problem)`` naming the file (and row).
Missing *video* files are not an error here (extraction records them per file) unless
``require_files=True``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = ("generic", "activitynet", "fcvid", "kinetics_sounds")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "validate": "val",
    "test": "test", "testing": "test",
}
FCVID_SPLIT_FILE = "FCVID_VideoName_TrainTestSplit.txt"
FCVID_LABEL_FILE = "FCVID_Label.txt"
FCVID_CATEGORY_FILE = "FCVID_Category.txt"


class ManifestError(ValueError):
    """A manifest is missing or malformed; the message names the file (and row)."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class ManifestEntry:
    """One video of a dataset: its file, class index (-1: unlabeled), split and unique id."""

    path: Path
    label: int
    split: str
    video_id: str


def load_manifest(
    path: str | os.PathLike,
    kind: str = "auto",
    video_root: str | os.PathLike | None = None,
    *,
    class_names: Sequence[str] | None = None,
    require_files: bool = False,
) -> tuple[list[ManifestEntry], list[str]]:
    """Read a manifest; returns ``(entries, class_names)`` in manifest order.

    Args:
        path: the manifest file (or, for FCVID, its materials folder).
        kind: ``"auto"`` (from the file name/content) or one of ``KINDS``.
        video_root: where the videos are (default: the manifest's folder).
        class_names: fixed class order; labels outside it are errors.
        require_files: raise if a video file is missing instead of leaving it to extraction.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(path, "manifest not found")
    kind = _detect_kind(path) if kind == "auto" else kind
    if kind not in KINDS:
        raise ManifestError(path, f"unknown manifest kind {kind!r}; expected one of {KINDS}")
    root = Path(video_root) if video_root is not None else (path if path.is_dir() else path.parent)
    if class_names is None:
        class_names = _classes_beside(path)
    reader = {"generic": _generic, "activitynet": _activitynet, "fcvid": _fcvid,
              "kinetics_sounds": _kinetics}[kind]
    rows, names = reader(path, root, class_names)
    entries, names = _index(path, rows, names)
    if require_files:
        missing = [str(e.path) for e in entries if not e.path.exists()]
        if missing:
            raise ManifestError(path, f"{len(missing)} video file(s) missing, e.g. {missing[:3]}")
    return entries, names


def load_manifests(
    paths: Sequence[str | os.PathLike],
    kind: str = "auto",
    video_root: str | os.PathLike | None = None,
    *,
    class_names: Sequence[str] | None = None,
    require_files: bool = False,
) -> tuple[list[ManifestEntry], list[str]]:
    """Several manifests of one dataset (e.g. Kinetics' train.csv + validate.csv) as one.

    Class names are shared: the given list, else the sorted union of all files' labels.
    """
    if class_names is None:
        found: set[str] = set()
        for path in paths:
            entries, names = load_manifest(path, kind, video_root)
            found.update(names[e.label] for e in entries if e.label >= 0)
            found.update(names)
        class_names = sorted(found)
    merged: list[ManifestEntry] = []
    for path in paths:
        entries, _ = load_manifest(path, kind, video_root, class_names=class_names,
                                   require_files=require_files)
        merged.extend(entries)
    ids = [e.video_id for e in merged]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ManifestError(paths[0], f"video id '{dup}' appears in several manifests")
    return merged, list(class_names)


# -- helpers --------------------------------------------------------------------------------

_Row = tuple[Path, str | None, str, str, int]  # path, label name, split, video id, line


def _detect_kind(path: Path) -> str:
    if path.is_dir() or path.name == FCVID_SPLIT_FILE:
        return "fcvid"
    if path.suffix.lower() == ".json":
        return "activitynet"
    header = _read_text(path).splitlines()[:1]
    fields = {f.strip() for f in header[0].split(",")} if header else set()
    if {"youtube_id", "time_start", "time_end"} <= fields:
        return "kinetics_sounds"
    return "generic"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, f"cannot read ({exc})") from exc


def _classes_beside(path: Path) -> list[str] | None:
    folder = path if path.is_dir() else path.parent
    file = folder / "classes.txt"
    if not file.is_file():
        return None
    return [line.strip() for line in _read_text(file).splitlines() if line.strip()]


def _split(path: Path, value: str, where: str) -> str:
    split = _SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise ManifestError(path, f"{where}: unknown split {value!r}; expected train/val/test")
    return split


def _index(
    path: Path, rows: list[_Row], class_names: Sequence[str] | None
) -> tuple[list[ManifestEntry], list[str]]:
    """Map label names to indices (fixed list or sorted names found) and check ids."""
    names = list(class_names) if class_names is not None else sorted(
        {r[1] for r in rows if r[1] is not None}
    )
    if len(set(names)) != len(names):
        raise ManifestError(path, "class names are not unique")
    lookup = {name: i for i, name in enumerate(names)}
    entries, seen = [], set()
    for file, label, split, video_id, line in rows:
        if label is not None and label not in lookup:
            raise ManifestError(path, f"row {line}: unknown label {label!r} (video '{video_id}')")
        if video_id in seen:
            raise ManifestError(path, f"row {line}: duplicate video id '{video_id}'")
        seen.add(video_id)
        entries.append(ManifestEntry(file, lookup[label] if label is not None else -1, split,
                                     video_id))
    return entries, names


def _csv_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in (reader.fieldnames or [])]
    missing = [c for c in required if c not in fields]
    if missing:
        raise ManifestError(path, f"header {fields} lacks column(s) {missing}")
    rows = []
    for line, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if any(not row.get(c) for c in required if c != "label"):
            raise ManifestError(path, f"row {line}: empty field among {list(required)}")
        rows.append((line, row))
    return rows


def _find_video(root: Path, stems: Sequence[str], subdirs: Sequence[str] = ("",)) -> Path:
    """First existing ``root/subdir/stem.ext``; else the first candidate with ``.mp4``."""
    for sub in subdirs:
        for stem in stems:
            for ext in VIDEO_EXTENSIONS:
                candidate = root / sub / f"{stem}{ext}"
                if candidate.exists():
                    return candidate
    return root / subdirs[0] / f"{stems[0]}.mp4"


# -- layouts --------------------------------------------------------------------------------


def _generic(path: Path, root: Path, class_names: Sequence[str] | None):
    rows: list[_Row] = []
    for line, row in _csv_rows(path, ("path", "label", "split")):
        file = Path(row["path"])
        file = file if file.is_absolute() else root / file
        video_id = row.get("video_id") or Path(row["path"]).with_suffix("").as_posix()
        rows.append((file, row["label"] or None, _split(path, row["split"], f"row {line}"),
                     video_id, line))
    return rows, class_names


def _activitynet(path: Path, root: Path, class_names: Sequence[str] | None):
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ManifestError(path, f"not valid JSON ({exc})") from exc
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise ManifestError(path, "no 'database' object (ActivityNet layout expected)")
    if class_names is None and isinstance(data.get("taxonomy"), list):
        nodes = data["taxonomy"]
        parents = {n.get("parentName") for n in nodes}
        leaves = sorted({n["nodeName"] for n in nodes if n.get("nodeName") not in parents})
        class_names = leaves or None
    rows: list[_Row] = []
    for line, (video_id, info) in enumerate(database.items(), start=1):
        where = f"database['{video_id}']"
        if not isinstance(info, dict) or "subset" not in info:
            raise ManifestError(path, f"{where}: missing 'subset'")
        split = _split(path, str(info["subset"]), where)
        labels = [a.get("label") for a in info.get("annotations", []) if isinstance(a, dict)]
        if any(not isinstance(label, str) for label in labels):
            raise ManifestError(path, f"{where}: an annotation has no string 'label'")
        distinct = sorted(set(labels))
        if len(distinct) > 1:
            raise ManifestError(path, f"{where}: annotations carry several labels {distinct}")
        file = _find_video(root, (f"v_{video_id}", video_id))
        rows.append((file, distinct[0] if distinct else None, split, video_id, line))
    return rows, class_names


def _fcvid(path: Path, root: Path, class_names: Sequence[str] | None):
    folder = path if path.is_dir() else path.parent
    split_file = path if path.is_file() else folder / FCVID_SPLIT_FILE
    label_file, category_file = folder / FCVID_LABEL_FILE, folder / FCVID_CATEGORY_FILE
    for file in (split_file, label_file):
        if not file.is_file():
            raise ManifestError(file, "FCVID materials file not found")
    split_lines = [ln.split() for ln in _read_text(split_file).splitlines() if ln.strip()]
    label_lines = [ln.split() for ln in _read_text(label_file).splitlines() if ln.strip()]
    if len(split_lines) != len(label_lines):
        raise ManifestError(label_file, f"{len(label_lines)} label rows but {len(split_lines)} "
                                        f"videos in {split_file.name}")
    if class_names is None:
        if not category_file.is_file():
            raise ManifestError(category_file, "FCVID materials file not found")
        class_names = [ln.strip() for ln in _read_text(category_file).splitlines() if ln.strip()]
    rows: list[_Row] = []
    for line, (fields, bits) in enumerate(zip(split_lines, label_lines, strict=True), start=1):
        if len(fields) != 2:
            raise ManifestError(split_file, f"line {line}: expected '<path> train|test'")
        if len(bits) != len(class_names) or any(b not in ("0", "1") for b in bits):
            raise ManifestError(label_file, f"line {line}: expected {len(class_names)} 0/1 values")
        positives = [i for i, b in enumerate(bits) if b == "1"]
        if len(positives) > 1:  # the store is single-label: keep the first, as FCVID baselines do
            positives = positives[:1]
        label = class_names[positives[0]] if positives else None
        video_id = Path(fields[0]).with_suffix("").as_posix()
        rows.append((root / fields[0], label, _split(split_file, fields[1], f"line {line}"),
                     video_id, line))
    return rows, class_names


def _kinetics(path: Path, root: Path, class_names: Sequence[str] | None):
    rows: list[_Row] = []
    for line, row in _csv_rows(path, ("label", "youtube_id", "time_start", "time_end", "split")):
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except ValueError as exc:
            raise ManifestError(path, f"row {line}: bad time_start/time_end ({exc})") from exc
        split = _split(path, row["split"], f"row {line}")
        stem = f"{row['youtube_id']}_{start:06d}_{end:06d}"
        label = row["label"] or None
        raw_split = row["split"].strip()
        subdirs = ["", raw_split, split] + ([f"{raw_split}/{label}", f"{split}/{label}"]
                                            if label else [])
        rows.append((_find_video(root, (stem,), subdirs), label, split, stem, line))
    return rows, class_names
