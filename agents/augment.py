"""Feature noise for the SAC training env: the training videos as a recognizer sees new ones.

The Stage I recognizer has fit the training videos: from the same frames it is more confident
on them than on held-out videos (docs/experiments.md 2d). SAC's rewards (the gain in P(true
class)) and observations (the recognizer's hidden state) come from that recognizer, so on the
training videos a few frames already look enough, and the learned locators stop too early on
new videos. :class:`FeatureNoiseSource` adds Gaussian noise to every frame the SAC env reads
from the train split, in units of the recognizer's input standard deviation;
:func:`calibrate_noise` picks its scale on the data (the smallest scale whose train
confidence comes down to the val confidence), so nothing is set per dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agents.metrics import mean_true_class_probability
from features.source import FrameSource
from vimo_env.core import stream_seed

#: Noise scales tried by :func:`calibrate_noise`, in units of the input standard deviation.
NOISE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
#: Selections whose mean P(true class) :func:`calibrate_noise` compares across splits.
CALIBRATION_POLICIES = ("initial", "uniform-10")


class FeatureNoiseSource(FrameSource):
    """``source`` with Gaussian noise ``scale * N(0, 1)`` added to every frame read (fresh noise
    per read, from a generator seeded with ``seed`` on the source's device).

    Args:
        source: the frame source to wrap (its videos, labels and costs are shown unchanged).
        scale: per-dimension noise standard deviation ``[D]`` (or a scalar).
        seed: seeds the noise (same seed, same reads, same noise).
    """

    def __init__(self, source: FrameSource, scale: torch.Tensor | float, seed: int = 0) -> None:
        self.base = source
        for name in ("feature_dim", "class_names", "gflops_per_frame", "flops_unit", "lengths",
                     "labels", "video_ids", "device", "split", "finite_checked",
                     "cheap_gather"):
            setattr(self, name, getattr(source, name))
        if hasattr(source, "store"):
            self.store = source.store  # the feature file: error messages and thumbnails
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=source.device)
        if self.scale.ndim > 1 or self.scale.numel() not in (1, source.feature_dim):
            raise ValueError(f"FeatureNoiseSource: scale must be a number or one value per "
                             f"feature dimension ({source.feature_dim}), got shape "
                             f"{tuple(self.scale.shape)}")
        if not bool(torch.isfinite(self.scale).all()) or bool((self.scale < 0).any()):
            raise ValueError(f"FeatureNoiseSource: scale must be finite and >= 0, got "
                             f"{self.scale.tolist() if self.scale.numel() < 8 else '...'}")
        # a stream of its own: the same seed elsewhere (torch's global generator, the start
        # jitter) must not draw the same numbers
        self.generator = torch.Generator(device=source.device).manual_seed(
            stream_seed(seed, "feature-noise"))

    def begin_episodes(self, videos: torch.Tensor) -> None:
        self.base.begin_episodes(videos)

    def random_state(self) -> dict[str, Any]:
        return {"noise": self.generator.get_state(), "base": self.base.random_state()}

    def set_random_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise ValueError("the saved episodes were read without feature noise, this source "
                             "adds it: resume with the noise setting they were trained with")
        self.generator.set_state(state["noise"].cpu())
        self.base.set_random_state(state["base"])

    def _noisy(self, features: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(features.shape, generator=self.generator, device=features.device)
        return features + noise * self.scale

    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self._noisy(self.base.gather(videos, frames))

    def gather_in_range(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self._noisy(self.base.gather_in_range(videos, frames))


def _mean_true_probability(recognizer: torch.nn.Module, source: FrameSource, policy: str,
                           seed: int) -> float:
    from agents.selection import evaluate_selection

    result = evaluate_selection(recognizer, source, policy, seed=seed)
    return mean_true_class_probability(result["scores"], source.labels)


def calibrate_noise(recognizer: torch.nn.Module, train: FrameSource, val: FrameSource, *,
                    grid: Sequence[float] = NOISE_GRID,
                    policies: Sequence[str] = CALIBRATION_POLICIES, seed: int = 0) -> dict:
    """The feature noise that makes the training videos look new to ``recognizer``.

    For each scale of ``grid`` (in units of the recognizer's input standard deviation), the
    mean P(true class) of ``policies`` (few frames each: where the recognizer's memory of a
    video shows most) on the noisy train split; the smallest scale at which it is no higher
    than on the clean val split (the largest scale when none is). Returns ``{"scale",
    "train_p" {scale: P}, "val_p", "policies"}``; multiply ``scale`` by the recognizer's
    ``input_std`` for :class:`FeatureNoiseSource`.
    """
    std = recognizer.input_std.detach().to(train.device)
    val_p = float(np.mean([_mean_true_probability(recognizer, val, p, seed) for p in policies]))
    train_p: dict[float, float] = {}
    chosen = float(grid[-1])
    for scale in grid:
        source = train if scale == 0 else FeatureNoiseSource(train, scale * std, seed)
        train_p[float(scale)] = float(np.mean(
            [_mean_true_probability(recognizer, source, p, seed) for p in policies]))
        if train_p[float(scale)] <= val_p:
            chosen = float(scale)
            break
    return {"scale": chosen, "train_p": train_p, "val_p": val_p, "policies": list(policies)}
