"""Baseline policies that ignore what the locators see.

* :class:`InitialPolicy` - every locator stops at once: only the N initial frames are seen.
* :class:`OpenLoopPolicy` - a fixed schedule ``a_0 .. a_{m-1}`` shared by all locators, a
  function of the step index only. :func:`search_open_loop` tries every distinct schedule
  (``{0..3}^m``; everything after a stop is irrelevant, so ``sum_k 3^k`` of them: 121 for m=4)
  on the validation split and keeps the best by mAP (ties: fewer GFLOPs); :func:`best_schedule`
  also picks the best one within a cost (a learned policy's). A learned policy that cannot beat
  the best open-loop schedule of its cost is not using its observations.

Schedules are scored in one batched recognizer pass each through the frame selections they
imply (:func:`open_loop_selection`, the env's movement rules in numpy), which is equivalent
to playing them in the env; the chosen schedule is then reported through the env harness.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from agents.evaluate import recognizer_cost
from agents.metrics import mean_average_precision, mean_true_class_probability
from agents.policies import LocatorPolicy
from agents.selection import Selection, gather_padded, segment_bounds
from features.source import FrameSource
from vimo_env.recognizer import Recognizer


class InitialPolicy(LocatorPolicy):
    """Stop at once: each locator sees only its initial frame."""

    name = "initial"

    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> torch.Tensor:
        return torch.zeros(alive.shape, dtype=torch.long, device=alive.device)


class OpenLoopPolicy(LocatorPolicy):
    """Action ``schedule[t]`` for every locator at step ``t`` (0 = stop after the schedule)."""

    def __init__(self, schedule: Sequence[int], name: str = "open-loop") -> None:
        schedule = [int(a) for a in schedule]
        if any(a not in (0, 1, 2, 3) for a in schedule):
            raise ValueError(f"schedule actions must be in 0..3, got {schedule}")
        self.schedule, self.name = schedule, name

    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> torch.Tensor:
        a = self.schedule[step] if step < len(self.schedule) else 0
        return torch.full(alive.shape, a, dtype=torch.long, device=alive.device)


def distinct_schedules(max_moves: int) -> list[tuple[int, ...]]:
    """Every schedule up to equivalence: k moves (1..3 strides each) then a stop, k = 0..m."""
    out: list[tuple[int, ...]] = []
    for k in range(max_moves + 1):
        for moves in itertools.product((1, 2, 3), repeat=k):
            out.append(tuple(moves) + ((0,) if k < max_moves else ()))
    return out


def open_loop_selection(lengths: np.ndarray, num_locators: int, schedule: Sequence[int],
                        max_moves: int = 4, stride: int = 3) -> Selection:
    """Frames each locator observes under a fixed schedule (the env's movement rules).

    A locator starts at ``s_i``; action ``a > 0`` moves it to ``min(p + a*stride, T-1)`` and it
    observes that frame unless it already stood at ``T-1`` (then it stops); ``a = 0`` stops it;
    it stops after ``max_moves`` moves. Returns ``(frame_index, mask)`` ``[V, N, m+1]``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    pos = segment_bounds(lengths, num_locators)[:, :-1].copy()  # [V, N]
    last = (lengths - 1)[:, None]
    frame_index = np.repeat(pos[..., None], max_moves + 1, axis=-1)
    mask = np.zeros(frame_index.shape, dtype=bool)
    mask[..., 0] = True
    alive = np.ones(pos.shape, dtype=bool)
    for t, a in enumerate(list(schedule)[:max_moves]):
        moved = alive & (a > 0) & (pos < last)
        pos = np.where(moved, np.minimum(pos + a * stride, last), pos)
        frame_index[..., t + 1] = np.where(moved, pos, frame_index[..., 0])
        mask[..., t + 1] = moved
        alive = moved
    return frame_index, mask


def search_open_loop(
    recognizer: Recognizer, val: FrameSource, *, max_moves: int = 4, stride: int = 3,
    batch_size: int = 2048, progress: bool = False,
) -> tuple[OpenLoopPolicy, list[dict]]:
    """Best fixed schedule on ``val`` by mAP (ties -> fewer GFLOPs), and every schedule's score.

    Returns the policy and ``[{"schedule", "mAP", "p_gt", "frames_per_video",
    "gflops_per_video"}]`` (``p_gt``: mean probability of the true class, 0-1).
    """
    N = recognizer.config.num_locators
    per_frame, per_video = recognizer_cost(recognizer, val.flops_unit)
    lengths = np.asarray(val.lengths)
    labels = np.asarray(val.labels)
    V = len(lengths)
    schedules = distinct_schedules(max_moves)
    sels = [open_loop_selection(lengths, N, s, max_moves, stride) for s in schedules]
    frame_index = np.concatenate([f for f, _ in sels])  # [S*V, N, m+1], schedule-major
    mask = np.concatenate([m for _, m in sels])
    videos = np.tile(np.arange(V), len(schedules))
    device = next(recognizer.parameters()).device
    was_training = recognizer.training
    recognizer.eval()
    scores = []
    try:
        with torch.no_grad():
            for lo in tqdm(range(0, len(videos), batch_size), desc="open-loop search",
                           unit="batch", disable=not progress):
                hi = lo + batch_size
                frames = gather_padded(val, videos[lo:hi], frame_index[lo:hi]).to(device)
                logits = recognizer(frames, torch.as_tensor(mask[lo:hi], device=device))
                scores.append(torch.softmax(logits.float(), -1).cpu().numpy())
    finally:
        recognizer.train(was_training)
    scores = np.concatenate(scores).reshape(len(schedules), V, -1)
    table = []
    for k, schedule in enumerate(schedules):
        fpv = float(sels[k][1].sum(axis=(1, 2)).mean())
        table.append({"schedule": list(schedule),
                      "mAP": mean_average_precision(scores[k], labels),
                      "p_gt": mean_true_class_probability(scores[k], labels),
                      "frames_per_video": fpv,
                      "gflops_per_video": fpv * (val.gflops_per_frame + per_frame) + per_video})
    return best_schedule(table), table


def best_schedule(table: list[dict], max_gflops: float | None = None,
                  name: str = "open-loop",
                  score: Callable[[dict], float] = lambda row: row["mAP"]) -> OpenLoopPolicy:
    """The best schedule of a :func:`search_open_loop` table by ``score`` (default val mAP;
    ties -> fewer GFLOPs), among those costing at most ``max_gflops`` per video on val when
    given (the open-loop schedule at a learned policy's cost: a policy that uses its
    observations should beat the best blind one that spends no more). The initial-only
    schedule always qualifies."""
    fewest = min(r["frames_per_video"] for r in table)
    fits = [r for r in table if max_gflops is None or r["gflops_per_video"] <= max_gflops
            or r["frames_per_video"] == fewest]
    best = max(fits, key=lambda r: (round(score(r), 9), -r["gflops_per_video"]))
    return OpenLoopPolicy(best["schedule"], name=name)
