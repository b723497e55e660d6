"""The ``vimo-features`` v1 HDF5 feature store: reader and writer (SPEC section 5).

One file holds one dataset (all splits) in a flat ragged layout::

    /features   float16|float32 [sum T, D]   all frames, video after video
    /offsets    int64 [V+1]                  video v is rows offsets[v]:offsets[v+1]
    /video_ids  str [V]   /labels int64 [V]   /splits str [V]   /class_names str [C]
    attrs: format="vimo-features", version=1, backbone, feature_dim, fps,
           gflops_per_frame, flops_unit ("MACs" | "FLOPs")

Reading one video is one slice. Every error names the file and the field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

FORMAT = "vimo-features"
VERSION = 1
SPLITS = ("train", "val", "test")
FLOPS_UNITS = ("MACs", "FLOPs")
_STR = h5py.string_dtype("utf-8")


class FeatureStoreError(ValueError):
    """A ``vimo-features`` file is malformed or a request on it is invalid.

    The message always names the file and the field at fault.
    """

    def __init__(self, path: str | os.PathLike, field: str, problem: str) -> None:
        self.path = str(path)
        self.field = field
        super().__init__(f"{self.path}: field '{field}': {problem}")


class FeatureStore:
    """Lazy reader of a ``vimo-features`` file, optionally restricted to a split / labels.

    Opening reads only the small index datasets (offsets, ids, labels, splits), so a file of
    100k videos opens fast. ``video(i)`` returns video ``i`` of the selection as a float32
    array ``[T, D]`` read with one slice and checked for NaN/Inf.

    Args:
        path: the HDF5 file.
        split: keep only videos of this split (``"train"``, ``"val"``, ``"test"``), or all.
        labels: keep only videos whose label is in this collection.
        preload: read the selected videos' features into memory at open.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        labels: Sequence[int] | None = None,
        preload: bool = False,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FeatureStoreError(self.path, "<file>", "no such file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise FeatureStoreError(self.path, "<file>", f"not a readable HDF5 file ({exc})")
        f = self._file
        attrs = f.attrs
        if attrs.get("format") != FORMAT:
            raise FeatureStoreError(self.path, "format", f"expected '{FORMAT}', got {attrs.get('format')!r}")
        if int(attrs.get("version", -1)) != VERSION:
            raise FeatureStoreError(self.path, "version", f"expected {VERSION}, got {attrs.get('version')!r}")
        for name in ("features", "offsets", "video_ids", "labels", "splits", "class_names"):
            if name not in f:
                raise FeatureStoreError(self.path, name, "dataset missing")
        self._features = f["features"]
        self.feature_dim = int(attrs["feature_dim"])
        self.backbone = str(attrs["backbone"])
        self.fps = float(attrs["fps"])
        self.gflops_per_frame = float(attrs["gflops_per_frame"])
        self.flops_unit = str(attrs["flops_unit"])
        self.class_names: list[str] = [s.decode() if isinstance(s, bytes) else str(s) for s in f["class_names"][:]]
        all_offsets = f["offsets"][:].astype(np.int64)
        all_labels = f["labels"][:].astype(np.int64)
        all_splits = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in f["splits"][:]])
        all_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["video_ids"][:]]

        keep = np.ones(len(all_labels), dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise FeatureStoreError(self.path, "splits", f"unknown split {split!r}; expected one of {SPLITS}")
            keep &= all_splits == split
        if labels is not None:
            keep &= np.isin(all_labels, np.asarray(list(labels), dtype=np.int64))
        self.indices = np.flatnonzero(keep)
        self.starts = all_offsets[self.indices]
        self.lengths = all_offsets[self.indices + 1] - self.starts
        self.labels = all_labels[self.indices]
        self.splits = all_splits[self.indices]
        self.video_ids = [all_ids[i] for i in self.indices]
        self._cache: list[np.ndarray] | None = None
        if preload:
            self._cache = [self._read(i) for i in range(len(self))]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, i: int) -> np.ndarray:
        start = int(self.starts[i])
        rows = np.asarray(self._features[start : start + int(self.lengths[i])], dtype=np.float32)
        if not np.isfinite(rows).all():
            bad = start + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise FeatureStoreError(
                self.path, "features", f"non-finite value in row {bad} (video '{self.video_ids[i]}')"
            )
        return rows

    def video(self, i: int) -> np.ndarray:
        """Features of selected video ``i`` as float32 ``[T, D]``."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: video index {i} out of range [0, {len(self)})")
        if self._cache is not None:
            return self._cache[i]
        return self._read(i)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureWriter:
    """Writes a ``vimo-features`` file video by video.

    Data goes to ``<path>.partial``; ``close()`` renames it to ``path``, so a file under the
    final name is always complete. With ``resume=True`` an existing ``.partial`` file is
    reopened and its finished videos kept (``video_id in writer`` tells which).

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
    ) -> None:
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.feature_dim = int(feature_dim)
        if flops_unit not in FLOPS_UNITS:
            raise ValueError(f"flops_unit must be one of {FLOPS_UNITS}, got {flops_unit!r}")
        if resume and self.partial_path.exists():
            self._file = h5py.File(self.partial_path, "a")
        else:
            self._file = h5py.File(self.partial_path, "w")
            f = self._file
            f.attrs.update(
                format=FORMAT, version=VERSION, backbone=backbone, feature_dim=self.feature_dim,
                fps=float(fps), gflops_per_frame=float(gflops_per_frame), flops_unit=flops_unit,
            )
            f.create_dataset("class_names", data=list(class_names), dtype=_STR)
            f.create_dataset("features", shape=(0, self.feature_dim), maxshape=(None, self.feature_dim),
                             dtype=dtype, chunks=(1024, self.feature_dim))
            f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,))
            for name, dt in (("video_ids", _STR), ("labels", np.int64), ("splits", _STR)):
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        self._ids = {s.decode() if isinstance(s, bytes) else s for s in self._file["video_ids"][:]}

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, video_id: str, features: np.ndarray, label: int, split: str) -> None:
        """Append one video's features ``[T, D]``."""
        f = self._file
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"{video_id}: features must be [T, {self.feature_dim}], got {features.shape}")
        if video_id in self._ids:
            raise ValueError(f"{video_id}: duplicate video id")
        n = len(self._ids)
        end = int(f["offsets"][n])
        T = len(features)
        f["features"].resize(end + T, axis=0)
        f["features"][end:] = features
        for name, value in (("video_ids", video_id), ("labels", label), ("splits", split)):
            f[name].resize(n + 1, axis=0)
            f[name][n] = value
        f["offsets"].resize(n + 2, axis=0)
        f["offsets"][n + 1] = end + T  # written last: a video counts once its offset is in
        self._ids.add(video_id)

    def close(self) -> None:
        """Finish the file and move it to its final name."""
        self._file.close()
        os.replace(self.partial_path, self.path)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the partial file for resume
            self._file.close()
