"""Small hand-made data for the environment tests: in-memory frame sources and HDF5 files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from features.source import FrameSource
from features.store import FeatureWriter
from vimo_env.recognizer import Recognizer, RecognizerConfig


class ArraySource(FrameSource):
    """In-memory frame source that logs every (video, frame) it is asked for."""

    def __init__(self, lengths: list[int], labels: list[int] | None = None, *, dim: int = 4,
                 classes: int = 3, seed: int = 0, gflops_per_frame: float = 2.0,
                 flops_unit: str = "MACs") -> None:
        rng = np.random.default_rng(seed)
        self.videos_data = [rng.normal(size=(t, dim)).astype(np.float32) for t in lengths]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if labels is None:
            labels = [i % classes for i in range(len(lengths))]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.video_ids = [f"v{i}" for i in range(len(lengths))]
        self.class_names = [f"c{i}" for i in range(classes)]
        self.feature_dim = dim
        self.gflops_per_frame = gflops_per_frame
        self.flops_unit = flops_unit
        self.device = torch.device("cpu")
        self.requests: list[tuple[int, int]] = []
        self.begun: list[list[int]] = []
        self.corrupt = False

    def begin_episodes(self, videos: torch.Tensor) -> None:
        self.begun.append(videos.tolist())

    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        pairs = list(zip(videos.tolist(), frames.tolist(), strict=True))
        self.requests.extend(pairs)
        out = torch.stack([torch.from_numpy(self.videos_data[v][f]) for v, f in pairs]) \
            if pairs else torch.zeros(0, self.feature_dim)
        if self.corrupt:
            out[:] = float("nan")
        return out

    def frame(self, video: int, frame: int) -> torch.Tensor:
        return torch.from_numpy(self.videos_data[video][frame])


def tiny_recognizer(dim: int = 4, classes: int = 3, locators: int = 3, seed: int = 0,
                    **overrides: object) -> Recognizer:
    """A small recognizer (LSTM 8 + 1-layer transformer) with seeded weights."""
    cfg = dict(feature_dim=dim, num_classes=classes, num_locators=locators, hidden_dim=8,
               transformer_layers=1, transformer_dim=8, transformer_heads=2,
               transformer_ff_dim=16, forward_dim=16)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Recognizer(RecognizerConfig(**cfg)).eval()


def write_tiny_h5(path: Path, lengths: list[int], *, dim: int = 4, classes: int = 3,
                  seed: int = 0, splits: list[str] | None = None) -> Path:
    """A ``vimo-features`` file with random features; labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    splits = splits or ["train"] * len(lengths)
    with FeatureWriter(path, feature_dim=dim, class_names=[f"c{i}" for i in range(classes)],
                       backbone="synthetic", gflops_per_frame=4.0, flops_unit="MACs",
                       dtype="float32") as writer:
        for i, (t, split) in enumerate(zip(lengths, splits, strict=True)):
            writer.add(f"vid{i}", rng.normal(size=(t, dim)).astype(np.float32), i % classes,
                       split)
    return path
