"""Frame sources: where an environment gets per-frame features from.

A frame source is a dataset of videos (one split) seen as frame features. The environment
asks it only for the frames its locators actually visit, in batches:
``gather(videos, frames)`` returns the features of frame ``frames[k]`` of video
``videos[k]`` for every ``k``. Cached sources read an HDF5 feature file; the live source
(``features.live``) decodes and runs the backbone on demand.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np
import torch

from features.device import resolve_device
from features.store import FeatureStore


class FrameSource(ABC):
    """A split of a video dataset, served as frame features on a device.

    Attributes every source sets: ``feature_dim``, ``class_names``, ``gflops_per_frame``,
    ``flops_unit``, ``lengths`` (int64 ``[V]``, frames per video), ``labels`` (int64 ``[V]``),
    ``video_ids`` (``list[str]``), ``device`` (where ``gather`` returns tensors).
    """

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

    @abstractmethod
    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Features ``[K, D]`` (float32, on ``self.device``) of frame ``frames[k]`` of video ``videos[k]``."""


class CachedFrameSource(FrameSource):
    """Frame source over a ``vimo-features`` HDF5 file (one split), held on a device.

    All selected videos are loaded into one flat tensor ``[sum T, D]`` so that ``gather`` is a
    single indexed read with no Python loop.
    """

    def __init__(
        self,
        features: str | os.PathLike | FeatureStore,
        *,
        split: str | None = "train",
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        store = features if isinstance(features, FeatureStore) else FeatureStore(features, split=split)
        self.store = store
        self.device = resolve_device(device)
        self.feature_dim = store.feature_dim
        self.class_names = list(store.class_names)
        self.gflops_per_frame = store.gflops_per_frame
        self.flops_unit = store.flops_unit
        self.lengths = store.lengths.astype(np.int64)
        self.labels = store.labels.astype(np.int64)
        self.video_ids = list(store.video_ids)
        if len(self.lengths) == 0:
            raise ValueError(f"{store.path}: no videos in split {split!r}")
        flat = store.read_all() if hasattr(store, "read_all") else np.concatenate(
            [store.video(i) for i in range(len(store))]
        )
        self.flat = torch.as_tensor(flat, dtype=dtype, device=self.device)
        offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.offsets = torch.as_tensor(offsets, dtype=torch.long, device=self.device)

    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.flat[self.offsets[videos] + frames]
