"""Frame sources: where an environment gets per-frame features from.

A frame source is a dataset of videos (one split) seen as frame features. The environment
asks it only for the frames its locators actually visit, in batches:
``gather(videos, frames)`` returns the features of frame ``frames[k]`` of video
``videos[k]`` for every ``k``. Cached sources read an HDF5 feature file; the live source
(``features.live``) decodes and runs the backbone on demand.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from features.device import resolve_device
from features.moments import column_mean_std
from features.store import FeatureStore, FeatureStoreError


class FrameSource(ABC):
    """A split of a video dataset, served as frame features on a device.

    Attributes every source sets: ``feature_dim``, ``class_names``, ``gflops_per_frame``,
    ``flops_unit``, ``lengths`` (int64 ``[V]``, frames per video), ``labels`` (int64 ``[V]``),
    ``video_ids`` (``list[str]``), ``device`` (where ``gather`` returns tensors). ``split`` is
    the split the source serves (``"train"``, ``"val"``, ``"test"``), None when it is not one
    split (all videos, or a store's own selection).
    """

    split: str | None = None

    feature_dim: int
    class_names: list[str]
    gflops_per_frame: float
    flops_unit: str
    lengths: np.ndarray
    labels: np.ndarray
    video_ids: list[str]
    device: torch.device

    @property
    def num_videos(self) -> int:
        return len(self.lengths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def begin_episodes(self, videos: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Hook: episodes start on ``videos`` (a live source drops their old frame caches)."""

    def random_state(self) -> Any:
        """The state of any random stream reads draw from (None: reads are deterministic), so
        that a training checkpoint can continue it exactly."""
        return None

    def set_random_state(self, state: Any) -> None:
        """Undo :meth:`random_state`."""
        if state is not None:
            raise ValueError(f"{type(self).__name__} draws no random numbers, but was given a "
                             "random state (a checkpoint from another source?)")

    #: True when every feature was checked finite at load, so a consumer need not check the
    #: rows it gathers (the env then skips a per-step device sync)
    finite_checked: bool = False
    #: True when a read is cheap (memory, not a decoder): the env then gathers every
    #: locator's frame, moved or not, instead of finding the moved ones (a device sync)
    cheap_gather: bool = False

    @abstractmethod
    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Features ``[K, D]`` (float32, on ``self.device``) of frame ``frames[k]`` of video
        ``videos[k]``."""

    def gather_in_range(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """:meth:`gather` for indices the caller guarantees are in range (the env clamps every
        position to its video); a source may skip its range check, and with it a device sync.
        The default is :meth:`gather`."""
        return self.gather(videos, frames)


class CachedFrameSource(FrameSource):
    """Frame source over a ``vimo-features`` HDF5 file (one split), held on a device.

    All selected videos are loaded into one flat tensor ``[sum T, D]`` so that ``gather`` is a
    single indexed read with no Python loop. Loading reads contiguous runs of videos in large
    blocks, checks every row for NaN/Inf, and is refused with a clear error when the split would
    not fit in host memory or, on a GPU, in free device memory.

    Args:
        features: a ``vimo-features`` path, or an open :class:`FeatureStore` (used as it is:
            its own selection applies and ``split`` is ignored).
        split: the split to serve (``"train"``, ``"val"``, ``"test"``), or ``None`` for all.
        device: where the features live and ``gather`` returns (``"auto"``: CUDA if present).
        dtype: storage dtype of the flat tensor (``torch.float16`` halves memory);
            ``gather`` always returns float32.
    """

    def __init__(
        self,
        features: str | os.PathLike | FeatureStore,
        *,
        split: str | None = "train",
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(features, FeatureStore):
            store = features
        else:
            store = FeatureStore(features, split=split)
        self.store = store
        self.device = resolve_device(device)
        self.feature_dim = store.feature_dim
        self.class_names = list(store.class_names)
        self.gflops_per_frame = store.gflops_per_frame
        self.flops_unit = store.flops_unit
        self.backbone = store.backbone
        self.lengths = store.lengths.astype(np.int64)
        self.labels = store.labels.astype(np.int64)
        self.video_ids = list(store.video_ids)
        self.split = split if not isinstance(features, FeatureStore) else None
        if len(self.lengths) == 0:
            counts = store.split_counts()
            raise FeatureStoreError(store.path, "splits", f"no videos in split {split!r} "
                                    f"(videos per split in the file: {counts})")
        empty = np.flatnonzero(self.lengths == 0)
        if len(empty):
            raise FeatureStoreError(store.path, "offsets", f"video {self.video_ids[empty[0]]!r} "
                                    "has no frames; a frame source needs at least one per video")
        nbytes = int(self.lengths.sum()) * self.feature_dim * torch.empty((), dtype=dtype).itemsize
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes > 0.9 * free:
                raise FeatureStoreError(store.path, "features", f"split needs {nbytes / 2**30:.2f} "
                                        f"GiB on {self.device} but only {free / 2**30:.2f} GiB "
                                        "is free; use dtype=torch.float16 or the CPU")
        flat = store.read_all()  # refuses itself when it would not fit in host memory
        self.finite_checked = True  # read_all refuses NaN / Inf rows, naming the first
        self.cheap_gather = True
        with warnings.catch_warnings():  # a preloaded store's array is read-only; never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.flat = torch.as_tensor(flat, device=self.device).to(dtype)
        offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.offsets = torch.as_tensor(offsets, dtype=torch.long, device=self.device)
        self._lengths_on_device = torch.as_tensor(self.lengths, device=self.device)
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def column_moments(self, ddof: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension ``(mean, std)`` of every frame of the split (float32 ``[D]`` on the
        CPU; ``ddof`` as :func:`features.moments.column_mean_std`). Computed once per ``ddof``:
        the recognizer and each peer normalize by the same train statistics."""
        if ddof not in self._moments:
            self._moments[ddof] = column_mean_std(self.flat, ddof=ddof)
        mean, std = self._moments[ddof]
        return mean.clone(), std.clone()

    def __getstate__(self) -> dict:
        # Pickle by path (the store reopens its file), not the feature tensor: vector envs
        # clone environments with (cloud)pickle and would otherwise copy every feature.
        return {"store": self.store, "device": str(self.device), "dtype": self.flat.dtype,
                "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["store"], device=state["device"], dtype=state["dtype"])
        self.split = state["split"]

    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Features of frame ``frames[k]`` of video ``videos[k]``; a video index outside the
        split or a frame outside its video raises IndexError (without the check the flat
        layout would silently return a neighbouring video's frame). The check costs one
        ``any()``: nothing on the CPU, one device sync per call on a GPU."""
        if videos.shape != frames.shape:
            raise ValueError(f"{self._where()}: gather: videos {tuple(videos.shape)} and frames "
                             f"{tuple(frames.shape)} differ in shape")
        num_videos = len(self.lengths)
        bad_video = (videos < 0) | (videos >= num_videos)
        length = self._lengths_on_device[videos.clamp(0, num_videos - 1)]
        bad = bad_video | (frames < 0) | (frames >= length)
        if bool(bad.any()):
            self._raise_out_of_range(videos, frames, bad)
        return self.gather_in_range(videos, frames)

    def gather_in_range(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """One indexed read, no check (no device sync): the caller guarantees the range."""
        rows = self.flat[self.offsets[videos] + frames]
        return rows if rows.dtype == torch.float32 else rows.float()

    def _where(self) -> str:
        """The file and split this source serves, for error messages."""
        split = "the store's selection" if self.split is None else f"split {self.split!r}"
        return f"{self.store.path} ({split})"

    def _raise_out_of_range(self, videos: torch.Tensor, frames: torch.Tensor,
                            bad: torch.Tensor) -> None:
        k = int(bad.nonzero()[0, 0])
        video, frame = int(videos.reshape(-1)[k]), int(frames.reshape(-1)[k])
        count = int(bad.sum())
        if not 0 <= video < len(self.lengths):
            raise IndexError(f"{self._where()}: gather: video index {video} outside "
                             f"[0, {len(self.lengths)}) ({count} bad queries)")
        raise IndexError(f"{self._where()}: gather: frame {frame} outside 0..."
                         f"{int(self.lengths[video]) - 1} of video {self.video_ids[video]!r} "
                         f"(index {video}, {int(self.lengths[video])} frames; {count} bad "
                         "queries)")
