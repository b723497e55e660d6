"""Glance/focus feature pairs: two ``vimo-features`` v1 files over the same frames.

The seed peers (LiteEval, NSNet, AdaFocus, AFNet) *glance* at many frames with a cheap network
and *focus* on a few with an expensive one, so they need two feature sets of the same frames.
A pair is two ordinary ``vimo-features`` files (SPEC section 5; each one stays readable by
every v1 reader, :class:`features.store.FeatureStore` opens and validates each):

* the **glance** file, e.g. MobileNetV2 features, with its own ``backbone`` and
  ``gflops_per_frame`` (the cheap per-frame cost);
* the **focus** file, e.g. ResNet-50 features, with its own ``backbone`` and
  ``gflops_per_frame`` (the expensive per-frame cost). ViMo's own rows use this file alone.

:class:`FeaturePair` checks on open that both files describe the same frames: same video ids
in the same order, same lengths (offsets), same splits, same labels, same class names, same
fps, same ``flops_unit`` (the two per-frame costs are added in one sum). Feature dimensions may
differ. Every mismatch raises :class:`FeaturePairError` naming BOTH files and the field.

Your own pair (features extracted elsewhere) plugs in as two files written with
:class:`features.store.FeatureWriter` (or ``python -m features.extract`` twice, once per
backbone, from the same manifest).

For tests and development, :func:`make_glance_features` builds a **synthetic stand-in** glance
file from a focus file: a fixed random projection to a lower dimension plus more noise, with a
smaller ``gflops_per_frame``. It is a degraded copy of the focus features, not a real cheap
backbone: the glance features hold strictly less information than the focus features of the
same frame, which is the one property the peers rely on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.source import CachedFrameSource
from features.store import FeatureStore, FeatureWriter

#: Default cost of the synthetic glance backbone: MobileNetV2 at 224x224, 0.32 GMACs per frame,
#: the lightweight extractor of NSNet / AdaFocus / AFNet's comparisons (NSNet's own figure).
GLANCE_GMACS_PER_FRAME = 0.32


class FeaturePairError(ValueError):
    """The glance and focus files of a pair do not describe the same frames.

    The message names both files and the field at fault.
    """

    def __init__(self, glance: str | os.PathLike, focus: str | os.PathLike, field: str,
                 problem: str) -> None:
        self.glance, self.focus, self.field, self.problem = str(glance), str(focus), field, problem
        super().__init__(f"glance file {self.glance} and focus file {self.focus}: field "
                         f"'{field}': {problem}")

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.glance, self.focus, self.field, self.problem))


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.flatnonzero(a != b)[0])


@dataclass
class PairSplit:
    """One split of a pair in memory: two frame sources with the same videos.

    ``glance.flat`` / ``focus.flat`` hold every frame ``[sum T, D_glance]`` /
    ``[sum T, D_focus]``; ``offsets`` (into both), ``lengths``, ``labels`` and ``video_ids``
    are shared. :meth:`gather` reads frames of both by (video, frame) index.
    """

    split: str
    glance: CachedFrameSource
    focus: CachedFrameSource

    @property
    def lengths(self) -> np.ndarray:
        return self.focus.lengths

    @property
    def labels(self) -> np.ndarray:
        return self.focus.labels

    @property
    def video_ids(self) -> list[str]:
        return self.focus.video_ids

    @property
    def num_videos(self) -> int:
        return self.focus.num_videos

    @property
    def num_classes(self) -> int:
        return self.focus.num_classes

    def gather(self, videos: torch.Tensor, frames: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(glance, focus) features of frame ``frames[...]`` of video ``videos[...]`` (any
        matching shapes; the feature dimension is appended)."""
        shape = videos.shape
        v, f = videos.reshape(-1), frames.reshape(-1)
        return (self.glance.gather(v, f).reshape(*shape, -1),
                self.focus.gather(v, f).reshape(*shape, -1))


class FeaturePair:
    """A glance file and a focus file over the same frames, validated on open.

    Args:
        glance: the cheap backbone's ``vimo-features`` file.
        focus: the expensive backbone's ``vimo-features`` file (ViMo's input).

    Attributes:
        glance_path, focus_path: the two files.
        glance_cost, focus_cost: ``gflops_per_frame`` of each file, in :attr:`flops_unit`.
        glance_backbone, focus_backbone, glance_dim, focus_dim, class_names, flops_unit.
    """

    def __init__(self, glance: str | os.PathLike, focus: str | os.PathLike) -> None:
        self.glance_path, self.focus_path = Path(glance), Path(focus)
        with FeatureStore(self.glance_path) as g, FeatureStore(self.focus_path) as f:
            self._check(g, f)
            self.glance_cost, self.focus_cost = g.gflops_per_frame, f.gflops_per_frame
            self.glance_backbone, self.focus_backbone = g.backbone, f.backbone
            self.glance_dim, self.focus_dim = g.feature_dim, f.feature_dim
            self.class_names = f.class_names
            self.flops_unit = f.flops_unit
            self.split_counts = f.split_counts()

    def _error(self, field: str, problem: str) -> FeaturePairError:
        return FeaturePairError(self.glance_path, self.focus_path, field, problem)

    def _check(self, g: FeatureStore, f: FeatureStore) -> None:
        if g.flops_unit != f.flops_unit:
            raise self._error("flops_unit", f"glance costs are in {g.flops_unit!r}, focus costs "
                              f"in {f.flops_unit!r}; both files must state the same unit")
        if g.fps != f.fps:
            raise self._error("fps", f"glance {g.fps} vs focus {f.fps}: not the same frames")
        if g.class_names != f.class_names:
            if len(g.class_names) != len(f.class_names):
                problem = f"{len(g.class_names)} vs {len(f.class_names)} classes"
            else:
                i = next(k for k, (a, b) in enumerate(zip(g.class_names, f.class_names,
                                                          strict=True)) if a != b)
                problem = f"class {i} is {g.class_names[i]!r} vs {f.class_names[i]!r}"
            raise self._error("class_names", problem)
        if len(g) != len(f):
            raise self._error("video_ids", f"{len(g)} vs {len(f)} videos")
        gi, fi = np.asarray(g.video_ids, dtype=object), np.asarray(f.video_ids, dtype=object)
        if (gi != fi).any():
            i = _first_difference(gi, fi)
            raise self._error("video_ids", f"video {i} is {gi[i]!r} in the glance file but "
                              f"{fi[i]!r} in the focus file (same ids in the same order needed)")
        for name, a, b in (("offsets", g.lengths, f.lengths), ("labels", g.labels, f.labels),
                           ("splits", g.splits, f.splits)):
            if (a != b).any():
                i = _first_difference(a, b)
                what = "frames" if name == "offsets" else name[:-1]
                raise self._error(name, f"video {fi[i]!r} (index {i}): {what} {a[i]!r} vs "
                                  f"{b[i]!r}")

    def load(self, split: str, device: str | torch.device = "cpu") -> PairSplit:
        """Both files' ``split`` as in-memory frame sources."""
        return PairSplit(split, CachedFrameSource(self.glance_path, split=split, device=device),
                         CachedFrameSource(self.focus_path, split=split, device=device))

    def __repr__(self) -> str:
        return (f"FeaturePair(glance='{self.glance_path}' [{self.glance_backbone}, "
                f"D={self.glance_dim}, {self.glance_cost} G{self.flops_unit}/frame], "
                f"focus='{self.focus_path}' [{self.focus_backbone}, D={self.focus_dim}, "
                f"{self.focus_cost} G{self.flops_unit}/frame])")


def make_glance_features(
    focus_path: str | os.PathLike,
    out: str | os.PathLike,
    dim: int | None = None,
    noise: float = 1.0,
    gflops_per_frame: float = GLANCE_GMACS_PER_FRAME,
    seed: int = 0,
    backbone: str = "synthetic-glance",
) -> Path:
    """Write a SYNTHETIC STAND-IN glance file for ``focus_path`` (tests and development only).

    Each frame ``x`` (``[D]``) becomes ``P x / sqrt(D) * s + noise * s * eps``: ``P`` a fixed
    random Gaussian projection ``[dim, D]`` (from ``seed``), ``s`` the focus file's overall
    feature std (so ``noise`` is relative to the feature scale), ``eps`` i.i.d. standard normal
    noise drawn per frame. Fewer dimensions and more noise: the glance feature of a frame holds
    strictly less information than its focus feature. Ids, lengths, labels, splits, class
    names, fps and ``flops_unit`` are copied, so the two files form a valid
    :class:`FeaturePair`; ``gflops_per_frame`` (default: MobileNetV2's 0.32 GMACs) is the
    glance cost. Deterministic for a seed.

    Args:
        focus_path: the focus ``vimo-features`` file.
        out: the glance file to write.
        dim: glance feature dimension (default ``max(8, D // 4)``).
        noise: std of the added noise, relative to the focus features' std.
        gflops_per_frame: the glance backbone's cost per frame (the focus file's unit).
        seed: seeds the projection and the noise.
        backbone: the ``backbone`` attribute of the glance file.
    """
    out = Path(out)
    with FeatureStore(focus_path) as store:
        D = store.feature_dim
        dim = max(8, D // 4) if dim is None else int(dim)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not (np.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be >= 0, got {noise}")
        rng = np.random.default_rng([int(seed), 0x61A4CE])
        projection = rng.normal(0.0, 1.0, (D, dim)) / np.sqrt(D)
        # overall scale from a sample of frames (first videos), so noise is scale-free
        sample = np.concatenate([store.video(i) for i in range(min(len(store), 32))])
        scale = float(sample.std()) or 1.0
        with FeatureWriter(out, feature_dim=dim, class_names=store.class_names,
                           backbone=backbone, fps=store.fps, gflops_per_frame=gflops_per_frame,
                           flops_unit=store.flops_unit, dtype=str(store.storage_dtype)) as writer:
            for i in range(len(store)):
                x = store.video(i).astype(np.float64)
                vid_rng = np.random.default_rng([int(seed), 0x61A4CE, i])
                y = x @ projection + noise * scale * vid_rng.normal(0.0, 1.0, (len(x), dim))
                writer.add(store.video_ids[i], y, int(store.labels[i]), str(store.splits[i]))
    return out
