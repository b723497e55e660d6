"""The ``vimo-features`` v1 HDF5 feature store: reader and writer (SPEC section 5).

One file holds one dataset (all splits) in a flat ragged layout::

    /features   float16|float32 [sum T, D]   all frames, video after video
    /offsets    int64 [V+1]                  video v is rows offsets[v]:offsets[v+1]
    /video_ids  str [V]   /labels int64 [V]   /splits str [V]   /class_names str [C]
    attrs: format="vimo-features", version=1, backbone, feature_dim, fps,
           gflops_per_frame, flops_unit ("MACs" | "FLOPs")

Reading one video is one slice. Opening validates every attribute and index dataset (never the
feature rows themselves, so a 100k-video file opens in well under a second); feature rows are
checked for NaN/Inf lazily, per video read, or all at once by :meth:`FeatureStore.validate`.
Every error is a :class:`FeatureStoreError` that names the file and the field.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

FORMAT = "vimo-features"
VERSION = 1
SPLITS = ("train", "val", "test")
FLOPS_UNITS = ("MACs", "FLOPs")
DATASETS = ("features", "offsets", "video_ids", "labels", "splits", "class_names")
_STR = h5py.string_dtype("utf-8")
# Target size of one /features chunk written by FeatureWriter. Small chunks keep a random read
# of one video close to the bytes it needs (the benchmark in benchmarks/read_store.py).
CHUNK_BYTES = 64 * 1024
# Size of the blocks read_all()/validate() read at once.
_BLOCK_BYTES = 32 * 1024 * 1024
# A read call costs about as much as reading this many more bytes (h5py call overhead).
_READ_CALL_BYTES = 256 * 1024
# Fraction of MemAvailable a preload may take.
_MEMORY_FRACTION = 0.8


class FeatureStoreError(ValueError):
    """A ``vimo-features`` file is malformed or a request on it is invalid.

    The message always names the file and the field at fault.
    """

    def __init__(self, path: str | os.PathLike, field: str, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path}: field '{field}': {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (vector envs)
        return (type(self), (self.path, self.field, self.problem))


def available_memory_bytes() -> int:
    """Memory the OS can still give this process (``MemAvailable``; total RAM as a fallback)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(path: str | os.PathLike, nbytes: int, what: str) -> None:
    """Raise :class:`FeatureStoreError` when ``nbytes`` would not fit in available memory."""
    available = available_memory_bytes()
    if nbytes > _MEMORY_FRACTION * available:
        raise FeatureStoreError(
            path, "features",
            f"{what} needs {nbytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of memory "
            f"is available (limit {_MEMORY_FRACTION:.0%}); read videos lazily instead "
            "(preload=False) or select fewer videos",
        )


# Exponent bits of IEEE floats: all ones means Inf or NaN.
_EXPONENT_MASKS = {np.dtype(np.float16): (np.uint16, 0x7C00),
                   np.dtype(np.float32): (np.uint32, 0x7F800000),
                   np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def has_non_finite(block: np.ndarray) -> bool:
    """Whether a float array holds NaN/Inf: an integer test of the exponent bits, several times
    faster than ``np.isfinite`` on float16 and without a float temporary."""
    mask = _EXPONENT_MASKS.get(block.dtype)
    if mask is None or not block.flags.c_contiguous:
        return not np.isfinite(block).all()
    uint, exponent = mask
    bits = block.view(uint)
    return bool(((bits & uint(exponent)) == uint(exponent)).any())


def to_float32(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``rows`` as float32 (into ``out`` if given). torch converts float16 several times faster
    than numpy; it is imported here only, so ``import features.store`` stays light."""
    if out is None and rows.dtype == np.float32:
        return rows
    import torch

    if out is None:
        return torch.from_numpy(rows).float().numpy()
    torch.from_numpy(out).copy_(torch.from_numpy(rows))
    return out


def _decode(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes | np.bytes_) else value


def _read_strings(path: Path, dataset: h5py.Dataset, name: str) -> np.ndarray:
    """A 1-D string dataset as an object array of ``str``."""
    if dataset.ndim != 1:
        raise FeatureStoreError(path, name,
                                f"expected a 1-D string dataset, got shape {dataset.shape}")
    if h5py.check_string_dtype(dataset.dtype) is None:
        raise FeatureStoreError(path, name, f"expected utf-8 strings, got dtype {dataset.dtype}")
    try:
        return dataset.asstr()[()] if len(dataset) else np.empty(0, dtype=object)
    except UnicodeDecodeError as exc:
        raise FeatureStoreError(path, name, f"not valid utf-8 ({exc})") from None


def _read_ints(path: Path, dataset: h5py.Dataset, name: str) -> np.ndarray:
    if dataset.ndim != 1:
        raise FeatureStoreError(path, name,
                                f"expected a 1-D integer dataset, got shape {dataset.shape}")
    if dataset.dtype.kind not in "iu":
        raise FeatureStoreError(path, name, f"expected integers (int64), got dtype {dataset.dtype}")
    return dataset[()].astype(np.int64)


class _Index:
    """The validated small datasets of one open file, shared by every view on it."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file
        self._read_attrs()
        for name in DATASETS:
            if name not in file:
                raise FeatureStoreError(path, name, "dataset missing")
            if not isinstance(file[name], h5py.Dataset):
                raise FeatureStoreError(path, name, "expected a dataset, found a group")
        self.features: h5py.Dataset = file["features"]
        self._check_features()
        self.class_names = [str(s) for s in _read_strings(path, file["class_names"], "class_names")]
        self.offsets = _read_ints(path, file["offsets"], "offsets")
        self.labels = _read_ints(path, file["labels"], "labels")
        self.video_ids = _read_strings(path, file["video_ids"], "video_ids")
        self.splits = _read_strings(path, file["splits"], "splits")
        self._check_index()
        self._id_to_index: dict[str, int] | None = None

    def _attr(self, name: str) -> Any:
        if name not in self.file.attrs:
            raise FeatureStoreError(self.path, name, "attribute missing")
        value = self.file.attrs[name]
        if np.ndim(value) != 0:
            raise FeatureStoreError(self.path, name, f"expected a scalar attribute, got {value!r}")
        return _decode(value.item() if isinstance(value, np.ndarray) else value)

    def _typed_attr(self, name: str, kind: type, describe: str) -> Any:
        value = self._attr(name)
        if not isinstance(value, kind) or isinstance(value, bool | np.bool_):
            raise FeatureStoreError(self.path, name, f"expected {describe}, got {value!r}")
        return value

    def _read_attrs(self) -> None:
        path = self.path
        fmt = self._attr("format")
        if fmt != FORMAT:
            raise FeatureStoreError(path, "format", f"expected '{FORMAT}', got {fmt!r}")
        version = self._typed_attr("version", Integral, "an integer")
        if version != VERSION:
            raise FeatureStoreError(path, "version", f"unsupported version {version}; this reader "
                                    f"reads version {VERSION}")
        self.backbone = self._typed_attr("backbone", str, "a string")
        self.feature_dim = int(self._typed_attr("feature_dim", Integral, "an integer"))
        if self.feature_dim <= 0:
            raise FeatureStoreError(path, "feature_dim",
                                    f"must be positive, got {self.feature_dim}")
        self.fps = float(self._typed_attr("fps", Real, "a number"))
        if not (np.isfinite(self.fps) and self.fps > 0):
            raise FeatureStoreError(path, "fps", f"must be a positive number, got {self.fps}")
        self.gflops_per_frame = float(self._typed_attr("gflops_per_frame", Real, "a number"))
        if not (np.isfinite(self.gflops_per_frame) and self.gflops_per_frame >= 0):
            raise FeatureStoreError(path, "gflops_per_frame",
                                    f"must be a number >= 0, got {self.gflops_per_frame}")
        self.flops_unit = self._attr("flops_unit")
        if self.flops_unit not in FLOPS_UNITS:
            raise FeatureStoreError(path, "flops_unit",
                                    f"expected one of {FLOPS_UNITS}, got {self.flops_unit!r}")

    def _check_features(self) -> None:
        features = self.features
        if features.ndim != 2:
            raise FeatureStoreError(self.path, "features",
                                    f"expected a 2-D dataset [rows, D], got shape {features.shape}")
        if features.dtype.kind != "f":
            raise FeatureStoreError(self.path, "features",
                                    f"expected float16 or float32, got dtype {features.dtype}")
        if features.shape[1] != self.feature_dim:
            raise FeatureStoreError(
                self.path, "features",
                f"dimension {features.shape[1]} does not match attribute feature_dim="
                f"{self.feature_dim}",
            )

    def _check_index(self) -> None:
        path, offsets = self.path, self.offsets
        num_videos = len(self.video_ids)
        for name, array in (("labels", self.labels), ("splits", self.splits)):
            if len(array) != num_videos:
                raise FeatureStoreError(path, name, f"has {len(array)} entries but video_ids has "
                                        f"{num_videos}")
        if len(offsets) != num_videos + 1:
            raise FeatureStoreError(path, "offsets", f"has {len(offsets)} entries, expected "
                                    f"len(video_ids)+1 = {num_videos + 1}")
        if offsets[0] != 0:
            raise FeatureStoreError(path, "offsets", f"offsets[0] must be 0, got {offsets[0]}")
        decreasing = np.flatnonzero(np.diff(offsets) < 0)
        if len(decreasing):
            raise FeatureStoreError(path, "offsets",
                                    f"not non-decreasing at index {int(decreasing[0]) + 1}")
        if offsets[-1] != len(self.features):
            raise FeatureStoreError(path, "offsets", f"offsets[-1] = {offsets[-1]} but features "
                                    f"has {len(self.features)} rows")
        if len(set(self.video_ids.tolist())) != num_videos:
            _, first, counts = np.unique(self.video_ids.astype(str), return_index=True,
                                         return_counts=True)
            dup = int(first[np.flatnonzero(counts > 1)].min())
            raise FeatureStoreError(path, "video_ids",
                                    f"duplicate video id {self.video_ids[dup]!r} (index {dup})")
        bad_split = np.flatnonzero(~np.isin(self.splits.astype(str), SPLITS))
        if len(bad_split):
            i = int(bad_split[0])
            raise FeatureStoreError(path, "splits", f"unknown split {self.splits[i]!r} at index "
                                    f"{i} (video {self.video_ids[i]!r}); expected one of {SPLITS}")
        num_classes = len(self.class_names)
        bad_label = np.flatnonzero((self.labels < -1) | (self.labels >= num_classes))
        if len(bad_label):
            i = int(bad_label[0])
            raise FeatureStoreError(path, "labels", f"label {self.labels[i]} at index {i} (video "
                                    f"{self.video_ids[i]!r}) outside [-1, {num_classes})")

    def id_to_index(self) -> dict[str, int]:
        if self._id_to_index is None:
            self._id_to_index = {vid: i for i, vid in enumerate(self.video_ids.tolist())}
        return self._id_to_index


def _open(path: Path) -> _Index:
    if not path.exists():
        raise FeatureStoreError(path, "<file>", "no such file")
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureStoreError(path, "<file>", f"not a readable HDF5 file ({exc})") from None
    try:
        return _Index(path, file)
    except BaseException:
        file.close()
        raise


class FeatureStore:
    """Lazy reader of a ``vimo-features`` file, optionally restricted to a split / labels.

    Opening reads and validates only the attributes and the small index datasets (offsets, ids,
    labels, splits, class names), so a file of 100k videos opens fast. ``video(i)`` returns
    video ``i`` of the selection as a float32 array ``[T, D]`` read with one slice and checked
    for NaN/Inf; :meth:`validate` scans every feature row.

    Views made by :meth:`select` share the open file. The store pickles by path: a copy reopens
    (and revalidates) the file, so stores travel into vectorized-env worker processes.
    Not thread-safe (one h5py handle); give each thread or process its own store.

    Args:
        path: the HDF5 file.
        split: keep only videos of this split (``"train"``, ``"val"``, ``"test"``), or all.
        labels: keep only videos whose label is in this collection.
        preload: read the selected videos' features into memory (float32) at open; refused
            with a :class:`FeatureStoreError` when they would not fit. ``"auto"``: preload
            only when they fit, else read lazily. For features on a GPU, use
            :class:`features.source.CachedFrameSource`.
        progress: show a progress bar while preloading / validating large selections.

    Attributes:
        indices: int64 ``[V]``, file index of every selected video.
        starts, lengths: int64 ``[V]``, first row and number of frames of every selected video.
        labels: int64 ``[V]``; splits: str ``[V]``; video_ids: ``list[str]``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        labels: Sequence[int] | None = None,
        preload: bool | str = False,
        progress: bool = True,
    ) -> None:
        self.path = Path(path)
        self._progress = progress
        self._index = _open(self.path)
        self._set_selection(self._selection_mask(split, labels))
        if preload == "auto":
            needed = self.num_frames * self.feature_dim * 4
            if needed <= _MEMORY_FRACTION * available_memory_bytes():
                self.preload()
        elif preload is True:
            self.preload()
        elif preload is not False:
            raise ValueError(f"preload must be True, False or 'auto', got {preload!r}")

    # -- selection ----------------------------------------------------------------------------

    def _selection_mask(self, split: str | None, labels: Sequence[int] | None) -> np.ndarray:
        index = self._index
        keep = np.ones(len(index.labels), dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise FeatureStoreError(self.path, "splits",
                                        f"unknown split {split!r} requested; expected one of "
                                        f"{SPLITS}")
            keep &= index.splits == split
        if labels is not None:
            wanted = np.asarray(list(labels))
            if wanted.dtype.kind not in "iu" and wanted.size:
                raise FeatureStoreError(self.path, "labels",
                                        f"requested labels must be integers, got {list(labels)!r}")
            wanted = wanted.astype(np.int64)
            bad = wanted[(wanted < -1) | (wanted >= self.num_classes)]
            if len(bad):
                raise FeatureStoreError(self.path, "labels", f"requested label {int(bad[0])} "
                                        f"outside [-1, {self.num_classes})")
            keep &= np.isin(index.labels, wanted)
        return keep

    def _set_selection(self, keep: np.ndarray) -> None:
        index = self._index
        self.indices = np.flatnonzero(keep).astype(np.int64)
        self.starts = index.offsets[self.indices]
        self.lengths = index.offsets[self.indices + 1] - self.starts
        self.labels = index.labels[self.indices]
        self.splits = index.splits[self.indices]
        self.video_ids: list[str] = index.video_ids[self.indices].tolist()
        # Plain int lists: the per-read hot path avoids numpy scalar conversions.
        self._starts = self.starts.tolist()
        self._stops = (self.starts + self.lengths).tolist()
        self._flat: np.ndarray | None = None
        self._flat_starts: list[int] = []

    def select(self, split: str | None = None, labels: Sequence[int] | None = None) -> FeatureStore:
        """A new view of this selection further restricted to ``split`` / ``labels``.

        The view shares the open file (closing either closes both) and is not preloaded.
        """
        view = object.__new__(FeatureStore)
        view.path, view._progress, view._index = self.path, self._progress, self._index
        keep = np.zeros(len(self._index.labels), dtype=bool)
        keep[self.indices] = True
        view._set_selection(keep & view._selection_mask(split, labels))
        return view

    # -- metadata -----------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        return self._index.feature_dim

    @property
    def backbone(self) -> str:
        return self._index.backbone

    @property
    def fps(self) -> float:
        return self._index.fps

    @property
    def gflops_per_frame(self) -> float:
        return self._index.gflops_per_frame

    @property
    def flops_unit(self) -> str:
        return self._index.flops_unit

    @property
    def class_names(self) -> list[str]:
        return list(self._index.class_names)

    @property
    def num_classes(self) -> int:
        return len(self._index.class_names)

    @property
    def storage_dtype(self) -> np.dtype:
        """dtype of ``/features`` in the file (reads always return float32)."""
        return self._index.features.dtype

    @property
    def num_frames(self) -> int:
        """Total frames of the selected videos."""
        return int(self.lengths.sum())

    @property
    def preloaded(self) -> bool:
        return self._flat is not None

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return (f"FeatureStore('{self.path}', videos={len(self)}, frames={self.num_frames}, "
                f"D={self.feature_dim}, classes={self.num_classes}, preloaded={self.preloaded})")

    def split_counts(self) -> dict[str, int]:
        """Videos per split in the whole file (not only this selection)."""
        splits = self._index.splits
        return {name: int(np.count_nonzero(splits == name)) for name in SPLITS}

    def index_of(self, video_id: str) -> int:
        """Position of ``video_id`` in this selection (``KeyError`` naming the file if absent)."""
        file_index = self._index.id_to_index().get(video_id)
        if file_index is not None:
            pos = int(np.searchsorted(self.indices, file_index))
            if pos < len(self.indices) and self.indices[pos] == file_index:
                return pos
        raise KeyError(f"{self.path}: video id {video_id!r} not in this selection")

    # -- reading ------------------------------------------------------------------------------

    def _raise_non_finite(self, block: np.ndarray, rows: int | np.ndarray) -> None:
        """Raise naming the first non-finite row of ``block``, whose file rows are ``rows``
        (the first row number of a contiguous block, or one number per row)."""
        first_bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        bad_row = rows + first_bad if isinstance(rows, int) else int(rows[first_bad])
        offsets = self._index.offsets
        video = int(np.searchsorted(offsets, bad_row, side="right")) - 1
        raise FeatureStoreError(
            self.path, "features",
            f"non-finite value (NaN/Inf) in row {bad_row} = frame {bad_row - offsets[video]} of "
            f"video {self._index.video_ids[video]!r}",
        )

    def video(self, i: int) -> np.ndarray:
        """Features of selected video ``i`` as float32 ``[T, D]`` (read-only when preloaded)."""
        i = operator.index(i)
        if not 0 <= i < len(self._starts):
            raise IndexError(f"{self.path}: video index {i} out of range [0, {len(self)})")
        start, stop = self._starts[i], self._stops[i]
        if self._flat is not None:
            begin = self._flat_starts[i]
            return self._flat[begin : begin + stop - start]
        rows = self._index.features[start:stop]
        if has_non_finite(rows):
            self._raise_non_finite(rows, start)
        return to_float32(rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.video(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.video(i)

    def _runs(self) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` covering the selection, adjacent videos merged."""
        if len(self) == 0:
            return []
        stops = self.starts + self.lengths
        breaks = np.flatnonzero(self.starts[1:] != stops[:-1]) + 1
        run_starts = self.starts[np.concatenate([[0], breaks])]
        run_stops = stops[np.concatenate([breaks - 1, [len(self) - 1]])]
        return [(int(a), int(b)) for a, b in zip(run_starts, run_stops, strict=True)]

    def _selected_blocks(self, desc: str) -> Iterator[tuple[np.ndarray, int | np.ndarray]]:
        """The selected rows in file order, in blocks of at most ~32 MiB of the file.

        Yields ``(rows, where)``: rows in the stored dtype and their file row numbers (the first
        one for a contiguous block, else one per row). Within a block, runs of selected videos
        are read with one slice over the block when the unselected rows in between cost less
        to read than separate reads would (e.g. one split of an interleaved file), else one read
        per run (a sparse selection).
        """
        runs = self._runs()
        if not runs:
            return
        run_starts = np.array([a for a, _ in runs])
        run_stops = np.array([b for _, b in runs])
        row_bytes = self.feature_dim * self.storage_dtype.itemsize
        block_rows = max(1, _BLOCK_BYTES // row_bytes)
        features = self._index.features
        small = self.num_frames * row_bytes < 4 * _BLOCK_BYTES
        # disable=None: tqdm shows the bar only on a terminal (logs stay clean)
        with tqdm(total=self.num_frames, desc=desc, unit="row", unit_scale=True,
                  disable=True if (not self._progress or small) else None) as bar:
            for begin in range(runs[0][0], runs[-1][1], block_rows):
                end = begin + block_rows
                first = int(np.searchsorted(run_stops, begin, side="right"))
                last = int(np.searchsorted(run_starts, end, side="left"))
                pieces = [(max(int(run_starts[k]), begin), min(int(run_stops[k]), end))
                          for k in range(first, last)]
                pieces = [(a, b) for a, b in pieces if b > a]
                if not pieces:
                    continue
                count = sum(b - a for a, b in pieces)
                low, high = pieces[0][0], pieces[-1][1]
                if len(pieces) == 1:
                    yield features[low:high], low
                elif (high - low - count) * row_bytes <= len(pieces) * _READ_CALL_BYTES:
                    rows = np.concatenate([np.arange(a, b) for a, b in pieces])
                    yield features[low:high][rows - low], rows
                else:
                    for a, b in pieces:
                        yield features[a:b], a
                bar.update(count)

    def read_all(self) -> np.ndarray:
        """The selection's features concatenated, float32 ``[sum T, D]``.

        Contiguous runs of videos are read in large blocks, not video by video; every row is
        checked for NaN/Inf. Refused when the result would not fit in available memory.
        """
        if self._flat is not None:
            return self._flat
        total = self.num_frames
        check_fits_in_memory(self.path, total * self.feature_dim * 4, "reading all features")
        out = np.empty((total, self.feature_dim), dtype=np.float32)
        pos = 0
        for block, rows in self._selected_blocks(f"reading {self.path.name}"):
            if has_non_finite(block):
                self._raise_non_finite(block, rows)
            to_float32(block, out=out[pos : pos + len(block)])
            pos += len(block)
        return out

    def preload(self) -> None:
        """Read the selection into memory; later ``video(i)`` calls are slices of it."""
        if self._flat is None:
            flat = self.read_all()
            flat.setflags(write=False)
            self._flat_starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).tolist()
            self._flat = flat

    def validate(self) -> None:
        """Scan every feature row of the selection for NaN/Inf (in large blocks).

        Raises :class:`FeatureStoreError` naming the first bad row and its video id.
        """
        for block, rows in self._selected_blocks(f"validating {self.path.name}"):
            if has_non_finite(block):
                self._raise_non_finite(block, rows)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (and every view sharing it)."""
        self._index.file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "indices": self.indices, "preloaded": self.preloaded,
                "progress": self._progress}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._progress = state["progress"]
        self._index = _open(self.path)
        keep = np.zeros(len(self._index.labels), dtype=bool)
        indices = np.asarray(state["indices"], dtype=np.int64)
        if len(indices) and indices[-1] >= len(keep):
            raise FeatureStoreError(self.path, "video_ids",
                                    "file changed since the store was pickled (fewer videos)")
        keep[indices] = True
        self._set_selection(keep)
        if state["preloaded"]:
            self.preload()


class FeatureWriter:
    """Writes a ``vimo-features`` file video by video, streaming to disk.

    Data goes to ``<path>.partial``; ``close()`` renames it to ``path``, so a file under the
    final name is always complete. Videos are committed (their offset written, the file flushed)
    every ``flush_every`` videos, feature rows and index entries before the offset, so a killed
    process loses at most the uncommitted videos. With ``resume=True`` the committed videos of
    an existing ``.partial`` file are copied into a fresh partial file (anything past the last
    commit is dropped; HDF5 is not crash-safe, so nothing else of the crashed file is reused)
    and writing continues there (``video_id in writer`` tells which videos are done). An
    exception inside ``with`` keeps the partial file for a later resume.

    Args:
        path: final file name.
        feature_dim: D.
        class_names: class index -> name.
        backbone: name of the spatial network that made the features.
        fps: frames per second of the sampled frames.
        gflops_per_frame: cost of the backbone per frame, in ``flops_unit``.
        flops_unit: ``"MACs"`` or ``"FLOPs"``.
        dtype: storage dtype of ``/features`` (``"float16"`` or ``"float32"``).
        resume: continue an interrupted write instead of starting afresh.
        flush_every: commit every this many videos (1: after each video).
        chunk_rows: rows per ``/features`` chunk (default: about 64 KiB per chunk).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        feature_dim: int,
        class_names: Sequence[str],
        backbone: str,
        fps: float = 1.0,
        gflops_per_frame: float = 0.0,
        flops_unit: str = "MACs",
        dtype: str = "float16",
        resume: bool = False,
        flush_every: int = 1,
        chunk_rows: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.feature_dim = int(feature_dim)
        self.class_names = [str(c) for c in class_names]
        self.dtype = np.dtype(dtype)
        self.flush_every = int(flush_every)
        self._check_args(backbone, fps, gflops_per_frame, flops_unit)
        attrs = {"format": FORMAT, "version": VERSION, "backbone": str(backbone),
                 "feature_dim": self.feature_dim, "fps": float(fps),
                 "gflops_per_frame": float(gflops_per_frame), "flops_unit": flops_unit}
        if resume and self.partial_path.exists():
            self._file = self._reopen(attrs)
        else:
            self._file = self._create(attrs, chunk_rows)
        self._closed = False
        f = self._file
        self._features, self._offsets = f["features"], f["offsets"]
        self._video_ids, self._labels, self._splits = f["video_ids"], f["labels"], f["splits"]
        stored_ids = _read_strings(self.partial_path, self._video_ids, "video_ids")
        self._ids: set[str] = set(stored_ids.tolist())
        self._rows = int(self._offsets[-1])
        # (id, label, split, end offset) of videos whose rows are written but not committed
        self._pending: list[tuple[str, int, str, int]] = []

    def _check_args(self, backbone: str, fps: float, gflops: float, flops_unit: str) -> None:
        where = self.partial_path
        if self.feature_dim <= 0:
            raise FeatureStoreError(where, "feature_dim",
                                    f"must be positive, got {self.feature_dim}")
        if self.dtype not in (np.float16, np.float32):
            raise FeatureStoreError(where, "features", f"dtype must be float16 or float32, got "
                                    f"{self.dtype}")
        if flops_unit not in FLOPS_UNITS:
            raise FeatureStoreError(where, "flops_unit", f"must be one of {FLOPS_UNITS}, got "
                                    f"{flops_unit!r}")
        if not isinstance(backbone, str) or not backbone:
            raise FeatureStoreError(where, "backbone",
                                    f"must be a non-empty string, got {backbone!r}")
        if not (np.isfinite(fps) and fps > 0):
            raise FeatureStoreError(where, "fps", f"must be positive, got {fps}")
        if not (np.isfinite(gflops) and gflops >= 0):
            raise FeatureStoreError(where, "gflops_per_frame", f"must be >= 0, got {gflops}")
        if self.flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {self.flush_every}")
        if not self.class_names:
            raise FeatureStoreError(where, "class_names", "needs at least one class")
        if len(set(self.class_names)) != len(self.class_names):
            raise FeatureStoreError(where, "class_names", "class names must be unique")

    def _create(self, attrs: dict[str, Any], chunk_rows: int | None,
                target: Path | None = None) -> h5py.File:
        if chunk_rows is None:
            chunk_rows = max(1, CHUNK_BYTES // (self.feature_dim * self.dtype.itemsize))
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(target or self.partial_path, "w")
        f.attrs.update(attrs)
        f.create_dataset("class_names", data=self.class_names, dtype=_STR)
        f.create_dataset("features", shape=(0, self.feature_dim), maxshape=(None, self.feature_dim),
                         dtype=self.dtype, chunks=(int(chunk_rows), self.feature_dim))
        f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,))
        for name, dt in (("video_ids", _STR), ("labels", np.int64), ("splits", _STR)):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        f.flush()
        return f

    def _reopen(self, attrs: dict[str, Any]) -> h5py.File:
        """Copy the partial file's committed videos into a fresh partial file and open that.

        HDF5 is not crash-safe: a process killed in the middle of a flush can leave internal
        structures (e.g. the heap of variable-length strings) damaged in ways that only show on
        the next write. Copying the committed content into a new file, which replaces the old
        one only once complete, leaves nothing of the crash behind.
        """
        where = self.partial_path
        try:
            old = h5py.File(where, "r")
        except OSError as exc:
            raise FeatureStoreError(where, "<file>", f"cannot resume: partial file unreadable "
                                    f"({exc}); delete it to start afresh") from None
        fresh_path = self.path.with_name(self.path.name + ".resume.partial")
        try:
            with old:
                num_videos, index = self._committed(old, attrs)
                fresh = self._create(attrs, old["features"].chunks[0], target=fresh_path)
                try:
                    self._copy_committed(old, fresh, num_videos, index)
                except BaseException:
                    fresh.close()
                    raise
        except OSError as exc:
            fresh_path.unlink(missing_ok=True)
            raise FeatureStoreError(where, "<file>", f"cannot resume: partial file damaged "
                                    f"({exc}); delete it to start afresh") from None
        os.replace(fresh_path, where)  # the open handle follows the file
        return fresh

    def _committed(self, old: h5py.File, attrs: dict[str, Any]) -> tuple[int, dict]:
        """Check the old partial file matches this writer; its committed videos' index."""
        where = self.partial_path
        for name in DATASETS:
            if name not in old:
                raise FeatureStoreError(where, name, "cannot resume: dataset missing")
        for name, value in attrs.items():
            stored = _decode(old.attrs.get(name))
            if stored != value:
                raise FeatureStoreError(where, name, f"cannot resume: file has {stored!r}, "
                                        f"writer was given {value!r}")
        if _read_strings(where, old["class_names"], "class_names").tolist() != self.class_names:
            raise FeatureStoreError(where, "class_names", "cannot resume: class names differ")
        if old["features"].dtype != self.dtype:
            raise FeatureStoreError(where, "features", f"cannot resume: file stores "
                                    f"{old['features'].dtype}, writer was given {self.dtype}")
        offsets = _read_ints(where, old["offsets"], "offsets")
        num_videos = min(len(offsets) - 1, len(old["video_ids"]), len(old["labels"]),
                         len(old["splits"]))
        # A video counts once its offset is in, its rows exist and offsets still make sense.
        while num_videos > 0 and (offsets[num_videos] > len(old["features"])
                                  or np.any(np.diff(offsets[: num_videos + 1]) < 0)):
            num_videos -= 1
        index = {
            "offsets": offsets[: num_videos + 1],
            "video_ids": _read_strings(where, old["video_ids"], "video_ids")[:num_videos],
            "labels": _read_ints(where, old["labels"], "labels")[:num_videos],
            "splits": _read_strings(where, old["splits"], "splits")[:num_videos],
        }
        return num_videos, index

    def _copy_committed(self, old: h5py.File, fresh: h5py.File, num_videos: int,
                        index: dict) -> None:
        rows = int(index["offsets"][-1])
        features = fresh["features"]
        features.resize(rows, axis=0)
        block = max(1, _BLOCK_BYTES // (self.feature_dim * self.dtype.itemsize))
        for start in tqdm(range(0, rows, block), desc=f"resuming {self.path.name}",
                          disable=rows < 4 * block, unit="block"):
            stop = min(rows, start + block)
            features[start:stop] = old["features"][start:stop]
        for name in ("video_ids", "labels", "splits"):
            fresh[name].resize(num_videos, axis=0)
            if num_videos:
                fresh[name][:] = index[name]
        fresh["offsets"].resize(num_videos + 1, axis=0)
        fresh["offsets"][:] = index["offsets"]
        fresh.flush()

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, video_id: str, features: Any, label: int, split: str) -> None:
        """Append one video's features ``[T, D]`` (numpy array or CPU/GPU tensor)."""
        if self._closed:
            raise RuntimeError(f"{self.partial_path}: writer is closed")
        rows = self._check_video(video_id, features, label, split)
        end = self._rows
        self._features.resize(end + len(rows), axis=0)
        self._features[end:] = rows  # rows stream to disk; the small index waits for commit()
        self._ids.add(video_id)
        self._rows = end + len(rows)
        self._pending.append((video_id, int(label), split, self._rows))
        if len(self._pending) >= self.flush_every:
            self.commit()

    def _check_video(self, video_id: str, features: Any, label: int, split: str) -> np.ndarray:
        where = self.partial_path
        if not isinstance(video_id, str) or not video_id:
            raise FeatureStoreError(where, "video_ids", f"video id must be a non-empty string, got "
                                    f"{video_id!r}")
        if video_id in self._ids:
            raise FeatureStoreError(where, "video_ids", f"duplicate video id {video_id!r}")
        if hasattr(features, "detach"):  # torch tensor, possibly on a GPU
            features = features.detach().cpu().numpy()
        rows = np.asarray(features)
        if rows.dtype.kind not in "fiu" or rows.ndim != 2 or rows.shape[1] != self.feature_dim:
            raise FeatureStoreError(where, "features", f"video {video_id!r}: expected a real array "
                                    f"[T, {self.feature_dim}], got {rows.dtype} {rows.shape}")
        if len(rows) == 0:
            raise FeatureStoreError(where, "features", f"video {video_id!r} has no frames")
        with np.errstate(over="ignore"):  # overflow is reported below, naming the video
            rows = rows.astype(self.dtype, copy=False)
        if not np.isfinite(rows).all():  # after the cast: float16 overflows to inf above 65504
            bad = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise FeatureStoreError(where, "features", f"video {video_id!r}: non-finite value "
                                    f"(NaN/Inf, or too large for {self.dtype}) in frame {bad}")
        if isinstance(label, bool) or not isinstance(label, Integral) or not (
            -1 <= label < len(self.class_names)
        ):
            raise FeatureStoreError(where, "labels", f"video {video_id!r}: label {label!r} not an "
                                    f"integer in [-1, {len(self.class_names)})")
        if split not in SPLITS:
            raise FeatureStoreError(where, "splits", f"video {video_id!r}: unknown split "
                                    f"{split!r}; expected one of {SPLITS}")
        return rows

    def commit(self) -> None:
        """Make every added video durable: write and flush its rows and index entries, then
        its offset (a video counts once its offset is in)."""
        if not self._pending:
            return
        ids, labels, splits, offsets = zip(*self._pending, strict=True)
        committed = len(self._offsets) - 1
        for dataset, values in ((self._video_ids, ids), (self._labels, labels),
                                (self._splits, splits)):
            dataset.resize(committed + len(values), axis=0)
            dataset[committed:] = values
        self._file.flush()  # rows and index entries reach the file before the offsets
        self._offsets.resize(committed + 1 + len(offsets), axis=0)
        self._offsets[committed + 1 :] = offsets
        self._file.flush()
        self._pending = []

    def close(self) -> None:
        """Commit, finish the file and move it to its final name."""
        if self._closed:
            return
        self.commit()
        self._file.close()
        self._closed = True
        os.replace(self.partial_path, self.path)

    def abort(self) -> None:
        """Close without finishing; the committed videos stay in ``.partial`` for a resume."""
        if not self._closed:
            self.commit()
            self._file.close()
            self._closed = True

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the partial file for resume
            self.abort()
