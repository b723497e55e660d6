"""Per-segment frame selections and their evaluation (Stage I sampling, baselines).

A video of ``T`` frames is cut into ``N`` segments ``[s_i, s_{i+1})`` with
``s_i = floor(i*T/N)`` (SPEC section 2); locator ``i`` sees frames of its segment only.
A *policy* picks, per segment, the frames the locator observes, always in temporal order and
always including the segment's initial frame ``s_i``:

* ``"all"``: every frame of the segment;
* ``"initial"``: the initial frame only;
* ``"uniform-P"``: ``k = max(1, ceil(P% * n_i))`` frames evenly spaced from ``s_i``
  (``s_i + floor(j * n_i / k)``, ``j = 0..k-1``), ``n_i`` the segment length;
* ``"random-P"``: the initial frame and ``k - 1`` other frames of the segment drawn without
  replacement (same ``k``).

``P`` is any integer percent in ``1..100`` (``"uniform-25"``, ``"random-50"``, ...).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from agents.metrics import mean_average_precision, top1_accuracy
from features.source import CachedFrameSource, FrameSource
from features.store import FeatureStore

Selection = tuple[np.ndarray, np.ndarray]  # frame_index [V, N, L] int64, mask [V, N, L] bool


def segment_bounds(lengths: np.ndarray, num_locators: int) -> np.ndarray:
    """``s_i = floor(i*T/N)`` for ``i = 0..N``: int64 ``[B, N+1]``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return (np.arange(num_locators + 1, dtype=np.int64) * lengths[:, None]) // num_locators


def parse_policy(policy: str) -> tuple[str, float]:
    """``"random-25"`` -> ``("random", 0.25)``; ``"all"`` -> ``("all", 1.0)``."""
    if policy == "all":
        return "all", 1.0
    if policy == "initial":
        return "initial", 0.0
    kind, _, percent = policy.partition("-")
    if kind in ("uniform", "random") and percent.isdigit() and 1 <= int(percent) <= 100:
        return kind, int(percent) / 100.0
    raise ValueError(
        f"unknown frame-selection policy {policy!r}; expected 'all', 'initial', "
        "'uniform-P' or 'random-P' with P an integer percent in 1..100"
    )


def select_frames(
    lengths: np.ndarray, num_locators: int, policy: str, rng: np.random.Generator | None = None
) -> Selection:
    """Frames each locator observes under ``policy``, batched over videos.

    Args:
        lengths: int ``[B]`` frames per video (each ``>= num_locators``).
        num_locators: N.
        policy: see the module docstring.
        rng: numpy Generator for the ``random-P`` policies (required for them).

    Returns:
        ``frame_index`` int64 ``[B, N, L]`` (absolute frame indices, increasing along ``L``;
        padding repeats ``s_i``) and ``mask`` bool ``[B, N, L]`` (True for selected frames),
        ``L`` the largest per-segment count.
    """
    kind, fraction = parse_policy(policy)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be [B], got shape {lengths.shape}")
    if num_locators < 1:
        raise ValueError(f"num_locators must be >= 1, got {num_locators}")
    if len(lengths) and lengths.min() < num_locators:
        raise ValueError(
            f"lengths: every video needs >= num_locators={num_locators} frames, "
            f"got a video of {lengths.min()}"
        )
    bounds = segment_bounds(lengths, num_locators)
    starts = bounds[:, :-1]  # [B, N]
    seg_len = bounds[:, 1:] - starts  # [B, N], >= 1
    if kind == "all":
        count = seg_len
    elif kind == "initial":
        count = np.ones_like(seg_len)
    else:  # ceil with a tolerance so that e.g. 0.25 * 40 is exactly 10
        count = np.maximum(1, np.ceil(fraction * seg_len - 1e-9).astype(np.int64))
    L = int(count.max()) if count.size else 1
    slot = np.arange(L, dtype=np.int64)
    mask = slot < count[..., None]  # [B, N, L]
    if kind in ("all", "initial"):
        offset = slot[None, None, :].repeat(len(lengths), 0).repeat(num_locators, 1)
    elif kind == "uniform":
        offset = (slot * seg_len[..., None]) // count[..., None]
    else:
        if rng is None:
            raise ValueError(f"policy {policy!r} needs a numpy Generator (rng)")
        M = int(seg_len.max())
        within = np.arange(M, dtype=np.int64)
        keys = rng.random((len(lengths), num_locators, M))
        keys[..., 0] = -1.0  # the initial frame always ranks first
        keys[within >= seg_len[..., None]] = np.inf  # outside the segment: never chosen
        # the `count` lowest keys are chosen; listing chosen offsets first in their natural
        # (temporal) order is a stable argsort of "not chosen"
        rank = np.argsort(np.argsort(keys, axis=-1, kind="stable"), axis=-1, kind="stable")
        chosen = rank < count[..., None]
        offset = np.argsort(~chosen, axis=-1, kind="stable")[..., :L]  # L <= M always
    offset = np.where(mask, offset, 0)
    return starts[..., None] + offset, mask


def _as_source(
    data: str | os.PathLike | FeatureStore | FrameSource, split: str | None, device: str
) -> FrameSource:
    if isinstance(data, FrameSource):
        return data
    return CachedFrameSource(data, split=split, device=device)


@torch.no_grad()
def evaluate_selection(
    recognizer: torch.nn.Module,
    store_or_source: str | os.PathLike | FeatureStore | FrameSource,
    policy: str | Selection,
    batch_size: int = 128,
    seed: int = 0,
    *,
    split: str | None = "test",
    device: str = "auto",
) -> dict:
    """Recognize every video of a source from the frames a selection policy picks.

    Runs the recognizer's ``forward`` on padded per-locator sequences, ``batch_size`` videos
    at a time (eval mode, no gradients).

    Args:
        recognizer: a :class:`vimo_env.recognizer.Recognizer` (anything with its ``forward``).
        store_or_source: a frame source, a ``FeatureStore`` or an HDF5 path (then ``split``
            of it is loaded on ``device``).
        policy: a policy name (see :func:`select_frames`) or a precomputed selection
            ``(frame_index [V, N, L], mask [V, N, L])`` over all videos of the source.
        seed: seeds the ``random-P`` policies (same seed, same frames and metrics).

    Returns:
        ``{"mAP", "top1"}`` in percent, ``"frames_per_video"`` (mean frames observed),
        ``"frame_rate"`` (mean over videos of frames observed / T, in percent),
        ``"gflops_per_video"`` (backbone cost of those frames, in the source's ``flops_unit``;
        the recognizer's own cost is not included) and ``"scores"`` (float32 ``[V, C]``
        softmax probabilities).
    """
    source = _as_source(store_or_source, split, device)
    num_locators = int(recognizer.config.num_locators)
    lengths = np.asarray(source.lengths, dtype=np.int64)
    V = len(lengths)
    if isinstance(policy, str):
        rng = np.random.default_rng(seed)
        frame_index, mask = select_frames(lengths, num_locators, policy, rng)
    else:
        frame_index, mask = (np.asarray(a) for a in policy)
        if frame_index.shape != mask.shape or frame_index.shape[:2] != (V, num_locators):
            raise ValueError(
                f"policy: a selection must be two arrays [V={V}, N={num_locators}, L], got "
                f"{frame_index.shape} and {mask.shape}"
            )
        if ((frame_index < 0) | (frame_index >= lengths[:, None, None]))[mask].any():
            raise ValueError("policy: selection has frame indices outside their video")
    model_device = next(recognizer.parameters()).device
    was_training = recognizer.training
    recognizer.eval()
    scores = []
    try:
        for lo in range(0, V, batch_size):
            frames = gather_padded(source, np.arange(lo, min(lo + batch_size, V)),
                                   frame_index[lo : lo + batch_size])
            m = torch.as_tensor(mask[lo : lo + batch_size], device=model_device)
            logits = recognizer(frames.to(model_device), m)
            scores.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    finally:
        recognizer.train(was_training)
    scores = np.concatenate(scores)
    frames_per_video = mask.sum(axis=(1, 2))
    return {
        "mAP": mean_average_precision(scores, source.labels),
        "top1": top1_accuracy(scores, source.labels),
        "frames_per_video": float(frames_per_video.mean()),
        "frame_rate": float(100.0 * np.mean(frames_per_video / lengths)),
        "gflops_per_video": float(frames_per_video.mean() * source.gflops_per_frame),
        "scores": scores.astype(np.float32),
    }


def gather_padded(source: FrameSource, videos: np.ndarray, frame_index: np.ndarray) -> torch.Tensor:
    """Features ``[B, N, L, D]`` of ``frame_index[b, n, l]`` of source video ``videos[b]``.

    One ``gather`` call for the whole batch (padding slots read a valid frame; mask them).
    """
    B, N, L = frame_index.shape
    vids = torch.as_tensor(np.repeat(np.asarray(videos, dtype=np.int64), N * L),
                           device=source.device)
    idx = torch.as_tensor(frame_index.reshape(-1), dtype=torch.long, device=source.device)
    return source.gather(vids, idx).reshape(B, N, L, -1)


def expected_count(segment_length: int, policy: str) -> int:
    """Frames a policy selects in a segment of ``segment_length`` frames (for checks/tests)."""
    kind, fraction = parse_policy(policy)
    if kind == "all":
        return segment_length
    if kind == "initial":
        return 1
    return max(1, math.ceil(fraction * segment_length - 1e-9))
