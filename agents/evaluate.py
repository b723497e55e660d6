"""One evaluation harness for every policy: env-driven policies and frame-selection baselines.

* :func:`evaluate_policy` sweeps every video of a split once, deterministically, through the
  batched :class:`vimo_env.core.LocatorCore` (``compute_rewards=False``: F_M runs once per
  episode, as in ViMo's inference), ``batch_size`` videos at a time. The policy is anything
  :func:`agents.policies.as_policy` accepts (a plain callable, a Tianshou policy, an SB3 model,
  the CTDE actors, an open-loop schedule).
* :func:`evaluate_selection_baseline` scores the per-segment selections of ViMo Table 2
  (``all``, ``uniform-25/50``, ``random-25/50``, ``initial``) with
  :func:`agents.selection.evaluate_selection` and the same cost accounting.

Both return an :class:`EvalResult`. Metrics: mAP (mean over classes of the AP of video-level
softmax scores, scikit-learn), top-1, frames observed per video, frame rate (mean of F/T, in
percent), GFLOPs per video = frames x (backbone + F_T cost per frame) + one F_M + classifier
evaluation + the policy's own inference cost (:meth:`agents.policies.LocatorPolicy.
inference_flops`: per locator decision, or per step of a joint network), in the feature file's
unit (``flops_unit``: "MACs" for our data), converted by :mod:`vimo_env.costs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agents.metrics import mean_average_precision, top1_accuracy
from agents.policies import LocatorPolicy, as_policy
from agents.selection import evaluate_selection
from features.source import FrameSource
from features.validation import require_int
from vimo_env.core import LocatorCore, source_name
from vimo_env.costs import flops_in_unit, recognizer_gflops
from vimo_env.recognizer import Recognizer

SELECTION_BASELINES = ("all", "uniform-50", "random-50", "uniform-25", "random-25", "initial")


@dataclass
class EvalResult:
    """One row of a results table (percentages for mAP, top1 and frame_rate).

    ``trajectories[v][i]`` lists the frames locator ``i`` observed on video ``v`` (env-driven
    policies; None for selection baselines). ``scores`` are the ``[V, C]`` softmax scores.
    """

    name: str
    mAP: float  # noqa: N815 - the field name of SPEC section 7
    top1: float
    frame_rate: float
    frames_per_video: float
    gflops_per_video: float
    flops_unit: str
    scores: np.ndarray | None = None
    trajectories: list[list[list[int]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The ``policies`` entry of ``results.json`` (SPEC section 7); a glance/focus peer's
        row also carries ``frames_glanced`` and ``frames_focused`` (from ``extra``)."""
        row = {"name": self.name, "mAP": self.mAP, "top1": self.top1,
               "frame_rate": self.frame_rate, "frames_per_video": self.frames_per_video,
               "gflops_per_video": self.gflops_per_video}
        row.update({k: float(self.extra[k]) for k in ("frames_glanced", "frames_focused")
                    if k in self.extra})
        return row


def recognizer_cost(recognizer: Recognizer, flops_unit: str) -> tuple[float, float]:
    """(F_T cost per observed frame, F_M + classifier cost per video), in G``flops_unit``."""
    return recognizer_gflops(recognizer, flops_unit)


def _check_source(source: FrameSource) -> None:
    labels = np.asarray(source.labels)
    if len(labels) == 0:
        raise ValueError("evaluation split has no videos")
    if labels.min() < 0:
        raise ValueError("evaluation split has unlabeled videos (label -1): mAP is undefined")


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    source: FrameSource,
    recognizer: Recognizer,
    *,
    name: str | None = None,
    max_moves: int = 4,
    stride: int = 3,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    keep_trajectories: bool = True,
) -> EvalResult:
    """Run ``policy`` once on every video of ``source`` (in order) and score the predictions.

    Args:
        policy: a plug-in policy (see :mod:`agents.policies`).
        source: the frame source of the evaluation split (e.g. ``CachedFrameSource(path,
            split="test")``); every video must be labeled.
        recognizer: the recognizer behind the env (its ``num_locators`` is N).
        max_moves, stride: m and delta of the env.
        batch_size: videos played together (rows of the batched core).
        keep_trajectories: return per-locator trajectories of every video.
    """
    _check_source(source)
    batch_size = require_int(batch_size, "batch_size", minimum=1)
    pol: LocatorPolicy = as_policy(policy, name)
    V = source.num_videos
    N = recognizer.config.num_locators
    cores: dict[int, LocatorCore] = {}
    scores = np.zeros((V, recognizer.config.num_classes), dtype=np.float32)
    frames = np.zeros(V, dtype=np.int64)
    lengths = np.asarray(source.lengths, dtype=np.int64)
    decisions = np.zeros(V, dtype=np.int64)
    trajectories: list[list[list[int]]] | None = [[] for _ in range(V)] if keep_trajectories \
        else None
    base_gflops = np.zeros(V)
    row_steps = np.zeros(V, dtype=np.int64)
    obs_dim = recognizer.embedding_dim + 3
    # counted once, on one row of all-alive locators (adapters move it to their own device)
    policy_cost = pol.inference_flops(torch.zeros(1, N, obs_dim),
                                      torch.ones(1, N, dtype=torch.bool))
    for lo in range(0, V, batch_size):
        videos = torch.arange(lo, min(lo + batch_size, V))
        k = len(videos)
        if k not in cores:
            cores[k] = LocatorCore(source, recognizer, num_locators=N, max_moves=max_moves,
                                   stride=stride, frame_cost=0.0, compute_rewards=False,
                                   device=device, batch_size=k)
        core = cores[k]
        core.reset(videos.to(core.device))
        pol.begin(k)
        step = 0
        while not bool(core.done.all()):
            rows = (~core.done).nonzero(as_tuple=True)[0]
            alive = core.alive[rows]
            actions = pol.act_masked(core.observation[rows], alive, core.action_mask(rows), step)
            actions = torch.as_tensor(np.asarray(actions) if not isinstance(actions, torch.Tensor)
                                      else actions, device=core.device)
            if tuple(actions.shape) != (len(rows), N):
                raise ValueError(f"policy {pol.name!r} returned actions of shape "
                                 f"{tuple(actions.shape)}, expected ({len(rows)}, {N})")
            decisions[(lo + rows).cpu().numpy()] += alive.sum(1).cpu().numpy()
            row_steps[(lo + rows).cpu().numpy()] += 1
            out = core.step(actions, rows=rows)
            step += 1
            if out.finished is not None:
                fin = out.finished
                v = fin.videos.cpu().numpy()
                scores[v] = fin.scores.float().cpu().numpy()
                frames[v] = fin.frames.cpu().numpy()
                base_gflops[v] = fin.gflops.cpu().numpy()
                if trajectories is not None:
                    for rec in fin.records():
                        trajectories[rec.video] = rec.trajectories
            if step > max_moves + 1:  # the core stops every locator after m moves
                raise RuntimeError("episodes did not end after max_moves steps")
    where = source_name(source)
    gflops = base_gflops + (
        decisions * flops_in_unit(policy_cost.per_decision, source.flops_unit, where)
        + row_steps * flops_in_unit(policy_cost.per_row_step, source.flops_unit, where)) / 1e9
    labels = np.asarray(source.labels)
    return EvalResult(
        name=pol.name, mAP=mean_average_precision(scores, labels),
        top1=top1_accuracy(scores, labels), frame_rate=float(100.0 * np.mean(frames / lengths)),
        frames_per_video=float(frames.mean()), gflops_per_video=float(gflops.mean()),
        flops_unit=source.flops_unit, scores=scores, trajectories=trajectories,
        extra={"decisions_per_video": float(decisions.mean()),
               "steps_per_video": float(row_steps.mean())},
    )


def evaluate_selection_baseline(
    recognizer: Recognizer, source: FrameSource, policy: str, *, seed: int = 0,
    batch_size: int = 256,
) -> EvalResult:
    """A per-segment frame-selection baseline (``all``, ``uniform-P``, ``random-P``,
    ``initial``) with the same metrics and cost accounting as :func:`evaluate_policy`."""
    _check_source(source)
    out = evaluate_selection(recognizer, source, policy, batch_size=batch_size, seed=seed)
    per_frame, per_video = recognizer_cost(recognizer, source.flops_unit)
    gflops = out["frames_per_video"] * (source.gflops_per_frame + per_frame) + per_video
    return EvalResult(
        name=policy, mAP=out["mAP"], top1=out["top1"], frame_rate=out["frame_rate"],
        frames_per_video=out["frames_per_video"], gflops_per_video=float(gflops),
        flops_unit=source.flops_unit, scores=out["scores"],
    )
