"""The shared harness of the seed peers: one selection record, one cost rule, one row.

Every peer (and ViMo) is scored the same way:

* a :class:`SelectionRecord` per split says, per video, which frames went through the glance
  backbone and which through the focus backbone (boolean masks ``[V, T_max]``), plus the
  method's own head cost per video (its RNNs, gates, classifier: everything after the
  backbones), counted with ``FlopCounterMode`` (:func:`count_head_gflops`);
* ONE cost rule, :func:`video_gflops`: GFLOPs per video = frames_glanced x glance_cost +
  frames_focused x focus_cost + head cost, all in the pair's unit (:class:`FrameCosts` refuses
  two files stating different units). ViMo's rows are the same rule with zero glanced frames:
  :meth:`FrameCosts.focus_only` and :meth:`SelectionRecord.from_frames` with its observed
  frames as ``focused``;
* :func:`score` turns scores + record into a :class:`PeerResult` whose :meth:`PeerResult.row`
  is a SPEC section 7 ``policies`` entry plus ``frames_glanced`` and ``frames_focused``.

It also holds the small training pieces both peers share (frame sampling, input
normalization, the learning-rate schedule, the step budget, straight-through Gumbel decisions)
and the reference every peer must beat: :func:`matched_uniform`, a pooled logistic regression
on uniformly sampled focus frames at the same GFLOPs per video.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.metrics import mean_average_precision, top1_accuracy
from agents.probe import pooled_classifier
from features.atomic import torch_save_atomic, write_text_atomic
from features.pairs import FeaturePair, PairSplit
from features.source import CachedFrameSource
from vimo_env.costs import check_flops_unit, count_flops, flops_in_unit

# -- accounting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameCosts:
    """Per-frame backbone costs (G``unit`` per frame) of the glance and focus backbones."""

    glance: float
    focus: float
    unit: str

    def __post_init__(self) -> None:
        check_flops_unit(self.unit)
        for name in ("glance", "focus"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"FrameCosts.{name} must be a number >= 0, got {value!r}")

    @classmethod
    def from_units(cls, glance: float, glance_unit: str, focus: float, focus_unit: str
                   ) -> FrameCosts:
        """Costs stated by two sources; refused when their units differ (a MAC is 2 FLOPs:
        adding the two would silently mix scales)."""
        check_flops_unit(glance_unit, "glance costs")
        check_flops_unit(focus_unit, "focus costs")
        if glance_unit != focus_unit:
            raise ValueError(f"glance cost is in {glance_unit!r} but focus cost in "
                             f"{focus_unit!r}: both must state the same unit")
        return cls(float(glance), float(focus), glance_unit)

    @classmethod
    def from_pair(cls, pair: FeaturePair) -> FrameCosts:
        return cls(pair.glance_cost, pair.focus_cost, pair.flops_unit)

    @classmethod
    def focus_only(cls, gflops_per_frame: float, unit: str) -> FrameCosts:
        """ViMo's rows: one backbone (the focus file's), no glance."""
        return cls(0.0, float(gflops_per_frame), unit)


@dataclass
class SelectionRecord:
    """Which frames of each video went through which backbone.

    Attributes:
        lengths: int64 ``[V]`` frames per video.
        glanced: bool ``[V, T_max]``: frame went through the glance backbone.
        focused: bool ``[V, T_max]``: frame went through the focus backbone.
        head_gflops: float64 ``[V]``: the method's own cost per video (everything after the
            backbones), in the pair's unit.
    """

    lengths: np.ndarray
    glanced: np.ndarray
    focused: np.ndarray
    head_gflops: np.ndarray

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        V = len(self.lengths)
        t_max = int(self.lengths.max()) if V else 0
        for name in ("glanced", "focused"):
            mask = np.asarray(getattr(self, name), dtype=bool)
            if mask.ndim != 2 or mask.shape[0] != V or mask.shape[1] < t_max:
                raise ValueError(f"SelectionRecord.{name}: expected bool [V={V}, >= {t_max}], "
                                 f"got shape {mask.shape}")
            beyond = np.arange(mask.shape[1])[None, :] >= self.lengths[:, None]
            if (mask & beyond).any():
                v = int(np.flatnonzero((mask & beyond).any(1))[0])
                raise ValueError(f"SelectionRecord.{name}: video {v} marks a frame at or past "
                                 f"its length {self.lengths[v]}")
            setattr(self, name, mask)
        head = np.broadcast_to(np.asarray(self.head_gflops, dtype=np.float64), (V,)).copy()
        if not (np.isfinite(head).all() and (head >= 0).all()):
            raise ValueError("SelectionRecord.head_gflops must be finite and >= 0")
        self.head_gflops = head

    @classmethod
    def from_frames(cls, lengths: np.ndarray, focused: list[list[int]],
                    glanced: list[list[int]] | None = None,
                    head_gflops: float | np.ndarray = 0.0) -> SelectionRecord:
        """A record from per-video frame index lists (repeats count once: a frame's features
        are computed once). ViMo: ``focused`` = every locator's observed frames, no glance."""
        lengths = np.asarray(lengths, dtype=np.int64)
        V, t_max = len(lengths), int(lengths.max()) if len(lengths) else 0
        masks = []
        for lists in (glanced, focused):
            mask = np.zeros((V, t_max), dtype=bool)
            if lists is not None:
                if len(lists) != V:
                    raise ValueError(f"expected {V} frame lists, got {len(lists)}")
                for v, frames in enumerate(lists):
                    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
                    if len(frames) and (frames.min() < 0 or frames.max() >= lengths[v]):
                        raise ValueError(f"video {v}: frame index outside [0, {lengths[v]})")
                    mask[v, frames] = True
            masks.append(mask)
        return cls(lengths, masks[0], masks[1], head_gflops)

    @property
    def frames_glanced(self) -> np.ndarray:
        return self.glanced.sum(1)

    @property
    def frames_focused(self) -> np.ndarray:
        return self.focused.sum(1)

    @property
    def frames_observed(self) -> np.ndarray:
        """Frames seen by either backbone."""
        return (self.glanced | self.focused).sum(1)


def video_gflops(record: SelectionRecord, costs: FrameCosts) -> np.ndarray:
    """THE cost rule: GFLOPs per video = glanced x glance + focused x focus + head (``[V]``,
    in ``costs.unit``)."""
    return (record.frames_glanced * costs.glance + record.frames_focused * costs.focus
            + record.head_gflops)


@dataclass
class PeerResult:
    """One method on one split: metrics, costs, and what produced them."""

    name: str
    mAP: float  # noqa: N815 - SPEC section 7 field name
    top1: float
    frame_rate: float  # percent of frames seen by either backbone
    frames_per_video: float  # frames seen by either backbone
    gflops_per_video: float
    frames_glanced: float
    frames_focused: float
    glance_rate: float  # percent of frames glanced
    focus_rate: float  # percent of frames focused
    head_gflops: float
    flops_unit: str
    scores: np.ndarray | None = None
    record: SelectionRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The ``policies`` entry of ``results.json`` (SPEC section 7) with the two peer
        fields."""
        return {"name": self.name, "mAP": self.mAP, "top1": self.top1,
                "frame_rate": self.frame_rate, "frames_per_video": self.frames_per_video,
                "gflops_per_video": self.gflops_per_video,
                "frames_glanced": self.frames_glanced, "frames_focused": self.frames_focused}

    def summary(self) -> dict[str, Any]:
        """Row + the rates and head cost (logs, docs)."""
        return {**self.row(), "glance_rate": self.glance_rate, "focus_rate": self.focus_rate,
                "head_gflops": self.head_gflops, "flops_unit": self.flops_unit, **self.extra}


def score(name: str, scores: np.ndarray, labels: np.ndarray, record: SelectionRecord,
          costs: FrameCosts, **extra: Any) -> PeerResult:
    """Metrics (mAP / top-1 via :mod:`agents.metrics`) and costs (:func:`video_gflops`)."""
    lengths = record.lengths.astype(np.float64)
    return PeerResult(
        name=name,
        mAP=mean_average_precision(scores, labels),
        top1=top1_accuracy(scores, labels),
        frame_rate=float(100.0 * np.mean(record.frames_observed / lengths)),
        frames_per_video=float(record.frames_observed.mean()),
        gflops_per_video=float(video_gflops(record, costs).mean()),
        frames_glanced=float(record.frames_glanced.mean()),
        frames_focused=float(record.frames_focused.mean()),
        glance_rate=float(100.0 * np.mean(record.frames_glanced / lengths)),
        focus_rate=float(100.0 * np.mean(record.frames_focused / lengths)),
        head_gflops=float(record.head_gflops.mean()),
        flops_unit=costs.unit, scores=np.asarray(scores), record=record, extra=dict(extra))


def count_head_gflops(fn: Any, unit: str) -> float:
    """G``unit`` of one call of ``fn()`` (``FlopCounterMode``: 2 FLOPs per MAC)."""
    return flops_in_unit(count_flops(fn), unit) / 1e9


# -- data and training pieces ----------------------------------------------------------------


def sample_frames(lengths: np.ndarray, num_frames: int | None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TSN segment sampling: ``num_frames`` segments per video, one frame each.

    A random frame of each segment with ``generator`` (training), the segment's centre without
    (evaluation). Videos shorter than ``num_frames`` take every frame and are padded;
    ``num_frames=None`` takes every frame of every video. Returns frame indices int64 ``[V, n]``
    (increasing along ``n``; padding repeats frame 0) and a bool mask ``[V, n]``.
    """
    lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
    n = int(lengths.max()) if num_frames is None else int(num_frames)
    T = lengths[:, None].double()
    k = torch.arange(n, dtype=torch.float64)[None, :]
    if generator is None:
        pos = ((k + 0.5) * T / n).floor()
    else:
        pos = ((k + torch.rand(len(lengths), n, generator=generator, dtype=torch.float64))
               * T / n).floor()
    frames = torch.minimum(pos.long(), lengths[:, None] - 1)
    short = lengths < n  # every frame, then padding
    every = torch.arange(n)[None, :].expand(len(lengths), n)
    frames = torch.where(short[:, None], every, frames)
    mask = every < lengths[:, None]
    return torch.where(mask, frames, 0), mask


def gather_batch(split: PairSplit, videos: torch.Tensor, frames: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(glance ``[B, n, Dg]``, focus ``[B, n, Df]``) of ``frames[b]`` of ``videos[b]``."""
    return split.gather(videos[:, None].expand_as(frames), frames)


class Standardize(nn.Module):
    """``(x - mean) / std`` with train-split statistics held as buffers (so they travel in the
    checkpoint)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, frames: CachedFrameSource) -> Standardize:
        """Per-dimension mean and sample std of every frame of a cached split (computed once
        per split and shared by every model fit on it)."""
        mean, std = frames.column_moments(ddof=1)
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the same numbers as (x - mean) / std with one new tensor, not two: 4x faster on the
        # CPU for LiteEval's [64, 32, 1280] batches (page faults of a second fresh tensor)
        return torch.sub(x, self.mean).div_(self.std)


def train_steps(num_train: int, batch_size: int, epochs: float, min_steps: int,
                max_steps: int) -> int:
    """A budget in gradient steps that follows the train split's size: ``epochs`` passes,
    clipped to ``[min_steps, max_steps]``."""
    return int(min(max_steps, max(min_steps, math.ceil(epochs * num_train / batch_size))))


def lr_at(step: int, total: int, base: float, warmup_frac: float = 0.05,
          floor: float = 0.02) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to
    ``floor x base``."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def anneal(step: int, total: int, start: float, end: float) -> float:
    """Exponential interpolation from ``start`` (step 0) to ``end`` (last step)."""
    return float(start * (end / start) ** min(1.0, step / max(1, total - 1)))


def binary_gumbel(logits: torch.Tensor, tau: float, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """Decision ``B`` in {0, 1} from two-class logits ``[..., 2]`` (class 1 = "yes").

    With a ``generator`` (training): a straight-through Gumbel-softmax sample (the forward value
    is the hard one-hot of ``argmax(logits + G)``, the gradient that of the relaxed
    ``softmax((logits + G) / tau)``). Without: the hard ``argmax`` (test time).
    """
    if generator is None:
        return (logits[..., 1] > logits[..., 0]).to(logits.dtype)
    u = torch.rand(logits.shape, generator=generator).clamp(1e-10, 1 - 1e-10)
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)[..., 1]
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def seeded_init(seed: int, build: Any) -> Any:
    """``build()`` under ``torch.manual_seed(seed)`` without touching the global stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# -- the reference: uniform sampling at the same cost ----------------------------------------


def _pooled_uniform(split: PairSplit, k: int) -> np.ndarray:
    """Mean of ``k`` uniformly spaced focus frames per video (all frames if shorter)."""
    frames, mask = sample_frames(split.lengths, k)
    videos = torch.arange(split.num_videos)
    x = split.focus.gather(videos[:, None].expand_as(frames), frames).double()
    m = mask[..., None].double()
    return ((x * m).sum(1) / m.sum(1)).numpy()


def uniform_reference(train: PairSplit, evaluate: PairSplit, k: int, costs: FrameCosts,
                      c: float = 1.0, name: str | None = None) -> PeerResult:
    """Uniform sampling of ``k`` focus frames per video (segment centres), mean-pooled,
    standardized and classified by a scikit-learn logistic regression fit on ``train`` (the
    pooled linear probe of :mod:`agents.probe`, with a fixed frame count). Its own cost (one
    linear map per video) is not counted, in its favour."""
    predict = pooled_classifier(_pooled_uniform(train, k), train.labels, c=c, max_iter=1000,
                                tol=1e-4)
    scores = predict(_pooled_uniform(evaluate, k), evaluate.num_classes)
    frames, mask = sample_frames(evaluate.lengths, k)
    focused = [f[m].tolist() for f, m in zip(frames, mask, strict=True)]
    record = SelectionRecord.from_frames(evaluate.lengths, focused)
    return score(name or f"uniform-{k}", scores, evaluate.labels, record, costs, k=k)


def matched_uniform(train: PairSplit, evaluate: PairSplit, gflops_per_video: float,
                    costs: FrameCosts, name: str | None = None) -> PeerResult:
    """:func:`uniform_reference` with the smallest ``k`` whose cost reaches
    ``gflops_per_video`` (``k = ceil(gflops / focus_cost)``): uniform sampling at no less than
    the peer's cost, so a peer above it wins at matched cost."""
    k = max(1, math.ceil(gflops_per_video / costs.focus - 1e-9))
    return uniform_reference(train, evaluate, k, costs, name=name)


# -- one scaffolding for every peer: evaluation, checkpoint, run, command line ------------------


@torch.no_grad()
def evaluate_peer(name: str, model: nn.Module, split: PairSplit, costs: FrameCosts,
                  num_frames: int | None, batch_size: int = 256) -> PeerResult:
    """Every video of ``split`` once at the segment centres, hard focus decisions. ``model(
    glance, focus, mask)`` returns ``(logits [B, C], focused [B, n])`` and
    ``model.cost_per_frame(unit)`` its own cost per glanced / focused frame and per video."""
    model.eval()
    frames, mask = sample_frames(split.lengths, num_frames)
    scores, decisions = [], []
    for lo in range(0, split.num_videos, batch_size):
        videos = torch.arange(lo, min(lo + batch_size, split.num_videos))
        glance, focus = gather_batch(split, videos, frames[videos])
        logits, focused = model(glance, focus, mask[videos])
        scores.append(torch.softmax(logits, dim=1))
        decisions.append(focused > 0.5)
    focus_mask = torch.cat(decisions) & mask
    glanced = [f[m].tolist() for f, m in zip(frames, mask, strict=True)]
    focused = [f[m].tolist() for f, m in zip(frames, focus_mask, strict=True)]
    per = model.cost_per_frame(costs.unit)
    head = (mask.sum(1).numpy() * per["glanced"] + focus_mask.sum(1).numpy() * per["focused"]
            + per["video"])
    record = SelectionRecord.from_frames(split.lengths, focused, glanced, head)
    return score(name, torch.cat(scores).numpy(), split.labels, record, costs)


def save_peer(name: str, model: nn.Module, args: Any, pair: FeaturePair,
              path: str | Path) -> None:
    """Checkpoint (atomic): weights (normalization statistics included), the arguments and
    the shapes the model is rebuilt from."""
    torch_save_atomic({"method": name, "args": asdict(args), "state_dict": model.state_dict(),
                       "dims": [pair.glance_dim, pair.focus_dim, len(pair.class_names)]}, path)


def load_peer(path: str | Path, model_cls: type, args_cls: type) -> tuple[nn.Module, Any]:
    """A model and its arguments from :func:`save_peer`, in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    args = args_cls(**ckpt["args"])
    model = model_cls(*ckpt["dims"], args)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), args


def run_peer(name: str, args: Any, pair: FeaturePair, train: Any, evaluate: Any,
             out: str | Path | None = None, log: bool = False) -> dict:
    """Train (train split), select (val mAP), score (test) and compare with uniform sampling
    at the same GFLOPs. ``train(pair, args, train_split, val_split, log=)`` returns
    ``(model, info)``; ``evaluate(model, split, costs, args)`` a :class:`PeerResult`. Returns
    ``{"row", "uniform", "val", "summary", "train", "args", "model", "test"}``: ``row`` and
    ``uniform`` are SPEC section 7 ``policies`` entries (test split); ``model`` and ``test``
    (the test :class:`PeerResult`, with its scores and frame selections) are not JSON."""
    splits = {s: pair.load(s) for s in ("train", "val", "test")}
    costs = FrameCosts.from_pair(pair)
    model, info = train(pair, args, splits["train"], splits["val"], log=log)
    test = evaluate(model, splits["test"], costs, args)
    val = evaluate(model, splits["val"], costs, args)
    uniform = matched_uniform(splits["train"], splits["test"], test.gflops_per_video, costs)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_peer(name, model, args, pair, Path(out) / f"{name}.pt")
    return {"row": test.row(), "uniform": uniform.row(), "val": val.summary(),
            "summary": test.summary(), "train": info, "args": asdict(args), "model": model,
            "test": test}


def peer_cli(name: str, args_cls: type, run: Any, doc: str,
             argv: list[str] | None = None) -> None:
    """``python -m agents.peers.<name> --glance G --focus F [--out DIR] [--<arg> V ...]``."""
    parser = argparse.ArgumentParser(prog=f"python -m agents.peers.{name}",
                                     description=doc.split("\n\n")[0])
    parser.add_argument("--glance", required=True)
    parser.add_argument("--focus", required=True)
    parser.add_argument("--out", default=None)
    for field_name, value in asdict(args_cls()).items():
        kind = float if isinstance(value, float) else int
        parser.add_argument(f"--{field_name.replace('_', '-')}", type=kind, default=value)
    ns = vars(parser.parse_args(argv))
    glance, focus, out = ns.pop("glance"), ns.pop("focus"), ns.pop("out")
    result = run(FeaturePair(glance, focus), args_cls(**ns), out, log=True)
    for key in ("model", "test"):  # not JSON
        result.pop(key)
    print(json.dumps({k: result[k] for k in ("row", "uniform", "val")}, indent=1))
    if out is not None:
        write_text_atomic(Path(out) / f"{name}.json", json.dumps(result, indent=1))
