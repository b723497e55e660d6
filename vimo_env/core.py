"""The batched locator engine: B videos x N locators, all state as tensors on one device.

:class:`LocatorCore` implements SPEC section 2 (ViMo sections 3.1, 3.3, App. F) for a fixed
batch of ``B`` rows. Every row plays one episode on one video; videos of different lengths
share a batch. A step is a handful of tensor operations over ``[B, N]`` - no Python loop over
videos or locators - plus one recognizer update:

    core = LocatorCore(source, recognizer, num_locators=3, batch_size=B)
    obs = core.reset(videos)                 # LongTensor [B] of video indices in the source
    out = core.step(actions)                 # LongTensor [B, N] in {0, 1, 2, 3}
    out.reward, out.done, out.finished       # finished: EpisodeBatch of the rows that ended

Partial operation (Tianshou's collector, the autoresetting vector env): ``reset(videos,
rows=...)`` restarts only those rows, ``step(actions, rows=...)`` steps only those rows, with
``videos``/``actions`` holding one entry per row given. Rows never reset are inactive.

Observation of locator ``i`` (float32, ``obs_dim = H + 3``)::

    [h_i (H = recognizer hidden), n_i / (m + 1), p_i / (T - 1), t / m]

Frame features come from a :class:`features.source.FrameSource`; the core asks it only for
the frames locators actually visit (their initial frames on reset, then the new frame of
every alive locator that moves), and calls ``source.begin_episodes(videos)`` on every reset.

Cost accounting (SPEC section 2): GFLOPs per video = ``F * gflops_per_frame`` of the source
plus the recognizer's inference cost, ``F`` F_T updates and one F_M + classifier evaluation,
all in the feature file's unit (``flops_unit``, "MACs" or "FLOPs"; any other unit is refused):
see :mod:`vimo_env.costs`, the one place that converts torch's FLOP counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from features.device import resolve_device
from features.source import FrameSource
from features.validation import require_int
from vimo_env.costs import check_flops_unit, recognizer_gflops
from vimo_env.recognizer import Recognizer

NUM_ACTIONS = 4  # stop, or move 1/2/3 strides forward


@dataclass
class EpisodeRecord:
    """Accounting of one finished episode (one row of an :class:`EpisodeBatch`).

    ``gflops`` is in the source's ``flops_unit`` (``"MACs"`` or ``"FLOPs"``); ``frame_rate``
    is the fraction ``frames / length``; ``trajectories[i]`` lists the frame indices locator
    ``i`` observed, in order, its initial frame first.
    """

    row: int
    video: int
    video_id: str
    label: int
    length: int
    frames: int
    frame_rate: float
    gflops: float
    flops_unit: str
    scores: np.ndarray
    correct: bool
    trajectories: list[list[int]]

    def as_info(self) -> dict:
        """The ``episode`` info dict of SPEC section 6 (plus length, trajectories, unit)."""
        return {
            "video_id": self.video_id, "label": self.label, "frames": self.frames,
            "frame_rate": self.frame_rate, "gflops": self.gflops, "scores": self.scores,
            "correct": self.correct, "length": self.length, "flops_unit": self.flops_unit,
            "trajectories": self.trajectories,
        }


@dataclass
class EpisodeBatch:
    """Episode accounting, as tensors, of the ``K`` rows that finished in one step.

    Fields are ``[K]`` (``scores`` is ``[K, C]``, ``trajectories`` ``[K, N, m + 1]`` padded
    with -1). :meth:`records` turns them into :class:`EpisodeRecord` objects.
    """

    rows: torch.Tensor
    videos: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    frames: torch.Tensor
    frame_rate: torch.Tensor
    gflops: torch.Tensor
    scores: torch.Tensor
    correct: torch.Tensor
    trajectories: torch.Tensor
    video_ids: list[str]
    flops_unit: str

    def __len__(self) -> int:
        return len(self.rows)

    def records(self) -> list[EpisodeRecord]:
        """One :class:`EpisodeRecord` per finished row."""
        cols = {k: getattr(self, k).cpu().numpy() for k in (
            "rows", "videos", "labels", "lengths", "frames", "frame_rate", "gflops", "scores",
            "correct", "trajectories")}
        out = []
        for k in range(len(self)):
            traj = cols["trajectories"][k]
            out.append(EpisodeRecord(
                row=int(cols["rows"][k]), video=int(cols["videos"][k]),
                video_id=self.video_ids[k], label=int(cols["labels"][k]),
                length=int(cols["lengths"][k]), frames=int(cols["frames"][k]),
                frame_rate=float(cols["frame_rate"][k]), gflops=float(cols["gflops"][k]),
                flops_unit=self.flops_unit, scores=cols["scores"][k].astype(np.float32),
                correct=bool(cols["correct"][k]),
                trajectories=[[int(p) for p in row if p >= 0] for row in traj],
            ))
        return out


@dataclass
class CoreObs:
    """What :meth:`LocatorCore.reset` returns for the ``K`` rows it (re)started.

    ``observation [K, N, obs_dim]``, ``alive [K, N]``, ``positions [K, N]``,
    ``frames_observed [K, N]``, ``p_gt [K]`` (``P_0``; NaN without ``compute_rewards``),
    ``rows [K]``, ``action_mask [K, N, 4]`` (each locator's legal actions, see
    :meth:`LocatorCore.action_mask`). Every tensor is a copy the caller may keep: later steps
    never change it.
    """

    rows: torch.Tensor
    observation: torch.Tensor
    alive: torch.Tensor
    positions: torch.Tensor
    frames_observed: torch.Tensor
    p_gt: torch.Tensor
    action_mask: torch.Tensor


@dataclass
class CoreStep(CoreObs):
    """What :meth:`LocatorCore.step` returns for the ``K`` rows it stepped.

    Adds ``reward [K]`` (team reward ``(P_t - P_{t-1}) - lambda * N_t``; only ``-lambda * N_t``
    without ``compute_rewards``), ``new_frames [K]`` (``N_t``), ``moved [K, N]`` (locators that
    observed a new frame), ``done [K]`` and ``finished`` (:class:`EpisodeBatch` of the rows that
    ended now, or None).
    """

    reward: torch.Tensor
    new_frames: torch.Tensor
    moved: torch.Tensor
    done: torch.Tensor
    finished: EpisodeBatch | None


def observed_step(observation: torch.Tensor, max_moves: int) -> torch.Tensor:
    """The step counter ``t`` every observation carries (its last entry, ``t / m``), as a long
    tensor of the observation's leading shape: what a policy of the step index alone (a fixed
    schedule) reads."""
    return torch.round(observation[..., -1] * max_moves).long().clamp(0, max_moves)


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether two devices are the same one (``"cuda"`` is the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.index is None or b.index is None
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def source_name(source: FrameSource) -> str:
    """How error messages name a frame source: its file (and split) when it has one."""
    store = getattr(source, "store", None)
    path = getattr(store, "path", None) or getattr(source, "path", None)
    split = getattr(source, "split", None)
    name = str(path) if path is not None else f"frame source {type(source).__name__}"
    return name if split is None else f"{name} (split {split!r})"


def check_labels(source: FrameSource, num_classes: int) -> None:
    """Refuse labels the recognizer cannot score: each must be -1 (unlabeled) or a class index
    below the recognizer's ``num_classes``. Checked once when a core is built; a bad label would
    otherwise fail deep inside a step's ``gather`` (a device-side assert on CUDA)."""
    labels = np.asarray(source.labels)
    bad = np.flatnonzero((labels < -1) | (labels >= num_classes))
    if len(bad):
        k = int(bad[0])
        raise ValueError(
            f"{source_name(source)}: field 'labels': video {source.video_ids[k]!r} has label "
            f"{int(labels[k])}, but the recognizer has num_classes={num_classes} (labels must "
            f"be -1 or in 0..{num_classes - 1}; {len(bad)} videos are outside)")


class LocatorCore:
    """Batched ViMo locator engine over a frame source and a recognizer (see module doc).

    Args:
        source: frame source of one split; video indices refer to it.
        recognizer: F_T / F_M / classifier; its ``num_locators`` must equal ``num_locators``.
            It is moved to ``device``; calls run it in eval mode without gradients and
            restore its train/eval mode afterwards.
        num_locators: N.
        max_moves: m, moves per locator before it stops (>= 1).
        stride: delta, frames per unit of movement.
        frame_cost: lambda, reward penalty per newly observed frame.
        compute_rewards: compute ``P_t`` every step; False skips F_M until an episode ends
            (ViMo's inference), rewards then hold only the frame cost and ``p_gt`` is NaN.
        locator_credit: also compute every locator's difference reward each step (``credit``
            ``[B, N]``, :meth:`_difference_credit`; one more F_M pass, over one counterfactual
            state per locator that observed), for learners that credit locators separately.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
        batch_size: B; ``None`` fixes it at the first full ``reset``.
    """

    def __init__(
        self,
        source: FrameSource,
        recognizer: Recognizer,
        *,
        num_locators: int = 3,
        max_moves: int = 4,
        stride: int = 3,
        frame_cost: float = 0.1,
        compute_rewards: bool = True,
        locator_credit: bool = False,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
    ) -> None:
        num_locators = require_int(num_locators, "num_locators", minimum=1)
        max_moves = require_int(max_moves, "max_moves", minimum=1)
        stride = require_int(stride, "stride", minimum=1)
        if not np.isfinite(frame_cost):
            raise ValueError(f"frame_cost must be finite, got {frame_cost}")
        cfg = recognizer.config
        if cfg.num_locators != num_locators:
            raise ValueError(
                f"recognizer was built for num_locators={cfg.num_locators}, env has {num_locators}"
            )
        if cfg.feature_dim != source.feature_dim:
            raise ValueError(
                f"feature_dim mismatch: frame source has {source.feature_dim}, recognizer "
                f"expects {cfg.feature_dim}"
            )
        if cfg.num_classes != source.num_classes:
            raise ValueError(
                f"num_classes mismatch: frame source has {source.num_classes} classes, "
                f"recognizer has {cfg.num_classes}"
            )
        if np.any(np.asarray(source.lengths) < 1):
            raise ValueError("frame source has a video with no frames (lengths must be >= 1)")
        check_labels(source, cfg.num_classes)
        recognizer.check_source(source, source_name(source))  # class order, backbone
        self.source = source
        self.device = resolve_device(device)
        source_device = getattr(source, "device", None)
        if source_device is not None and not same_device(source_device, self.device):
            raise ValueError(f"{source_name(source)}: the frame source serves features on "
                             f"{source_device} but the env runs on {self.device}; build the "
                             f"source with device={str(self.device)!r} or pass the env "
                             f"device={str(source_device)!r}")
        self.recognizer = recognizer.to(self.device)  # run in eval mode per call, see step()
        self.num_locators = num_locators
        self.max_moves = max_moves
        self.stride = stride
        self.frame_cost = float(frame_cost)
        self.compute_rewards = bool(compute_rewards)
        if locator_credit and not compute_rewards:
            raise ValueError("locator_credit needs compute_rewards=True (it is a share of P_t)")
        self.locator_credit = bool(locator_credit)
        self.hidden_dim = recognizer.embedding_dim
        self.obs_dim = self.hidden_dim + 3
        self.num_classes = cfg.num_classes
        self.flops_unit = check_flops_unit(source.flops_unit, source_name(source))
        self._lengths_all = torch.as_tensor(np.asarray(source.lengths), dtype=torch.long,
                                            device=self.device)
        self._labels_all = torch.as_tensor(np.asarray(source.labels), dtype=torch.long,
                                           device=self.device)
        self.recognizer_gflops_per_frame, self.recognizer_gflops_per_episode = \
            recognizer_gflops(recognizer, self.flops_unit)
        self.gflops_per_frame = float(source.gflops_per_frame) + self.recognizer_gflops_per_frame
        self.start_jitter = 0  # see set_start_jitter (training augmentation; 0 = the paper)
        self._jitter_generator: torch.Generator | None = None
        self.batch_size: int | None = None
        if batch_size is not None:
            self._allocate(require_int(batch_size, "batch_size", minimum=1))

    def set_start_jitter(self, frames: int, seed: int = 0) -> None:
        """Start each locator up to ``frames`` frames after its segment's first frame (an offset
        drawn uniformly from 0..frames, clamped to the segment's last frame), instead of on it
        (``frames=0``, the paper). A training augmentation: the same training video then gives
        other frames from one episode to the next, so a policy cannot pay off by remembering
        which frames worked on each training video. Evaluation keeps 0. The offsets come from
        a generator of their own, seeded from ``seed`` (a front-end's ``reset(seed=)`` reseeds
        it)."""
        self.start_jitter = require_int(frames, "start_jitter", minimum=0)
        # a stream of its own, not the numbers torch's global generator draws from this seed
        self._jitter_generator = torch.Generator(device=self.device)
        self._jitter_generator.manual_seed(stream_seed(seed, "start-jitter"))

    # ---------------------------------------------------------------- state
    def _allocate(self, batch: int) -> None:
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch}")
        B, N, dev = batch, self.num_locators, self.device
        self.batch_size = B
        self.videos = torch.zeros(B, dtype=torch.long, device=dev)
        self.lengths = torch.ones(B, dtype=torch.long, device=dev)
        self.labels = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.frames_observed = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.steps = torch.zeros(B, dtype=torch.long, device=dev)
        self.alive = torch.zeros(B, N, dtype=torch.bool, device=dev)
        self.done = torch.ones(B, dtype=torch.bool, device=dev)
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)
        self.p_gt = torch.full((B,), float("nan"), device=dev)
        self.credit = torch.zeros(B, N, device=dev)
        self.trajectories = torch.full((B, N, self.max_moves + 1), -1, dtype=torch.long,
                                       device=dev)
        self.state = self.recognizer.initial_state(B, dev)
        self.observation = torch.zeros(B, N, self.obs_dim, device=dev)
        self._locator_index = torch.arange(N, device=dev)

    #: every tensor that changes while episodes run (see :meth:`episode_state`)
    EPISODE_TENSORS = ("videos", "lengths", "labels", "positions", "frames_observed", "steps",
                       "alive", "done", "active", "p_gt", "credit", "trajectories", "state",
                       "observation")

    def episode_state(self) -> dict[str, Any]:
        """Copies of everything the running episodes are made of (the per-row tensors, the
        start jitter's and the source's random streams), for a training checkpoint that
        continues in-flight episodes exactly (:meth:`load_episode_state`)."""
        if self.batch_size is None:
            raise RuntimeError("episode_state() before the first reset()")
        return {"batch_size": self.batch_size, "device": str(self.device),
                "identity": self._episode_identity(),
                "tensors": {name: getattr(self, name).clone() for name in self.EPISODE_TENSORS},
                "jitter": (self._jitter_generator.get_state()
                           if self._jitter_generator is not None else None),
                "source": self.source.random_state()}

    def _episode_identity(self) -> dict[str, Any]:
        """What saved episodes must agree with to go on here: the split's videos and the
        settings that shape an episode."""
        digest = hashlib.sha1()
        for name in ("lengths", "labels"):
            digest.update(np.ascontiguousarray(np.asarray(getattr(self.source, name),
                                                          dtype=np.int64)).tobytes())
        digest.update("\n".join(map(str, getattr(self.source, "video_ids", []))).encode())
        return {"videos": digest.hexdigest(), "num_locators": self.num_locators,
                "max_moves": self.max_moves, "stride": self.stride,
                "frame_cost": self.frame_cost, "compute_rewards": self.compute_rewards,
                "locator_credit": self.locator_credit, "start_jitter": self.start_jitter}

    def load_episode_state(self, state: dict[str, Any]) -> None:
        """Continue the episodes of :meth:`episode_state`: the same split, settings, batch
        size and device, or a ValueError naming what differs."""
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"episode state is for {state['batch_size']} rows, this core has "
                             f"{self.batch_size}")
        if state.get("device") != str(self.device):
            raise ValueError(f"episode state was saved on {state.get('device')}, this core runs "
                             f"on {self.device}")
        mine = self._episode_identity()
        for key, value in state.get("identity", {}).items():
            if mine.get(key) != value:
                raise ValueError(f"episode state is for another env: its {key} is {value!r}, "
                                 f"this env's {mine.get(key)!r} (another dataset or settings?)")
        for name in self.EPISODE_TENSORS:
            saved, mine = state["tensors"][name], getattr(self, name)
            if saved.shape != mine.shape or saved.dtype != mine.dtype:
                raise ValueError(f"episode state: {name} is {saved.dtype} "
                                 f"{tuple(saved.shape)}, this core's is {mine.dtype} "
                                 f"{tuple(mine.shape)} (another recognizer or settings?)")
            mine.copy_(saved.to(mine.device))
        if (state["jitter"] is None) != (self._jitter_generator is None):
            raise ValueError("episode state and this core disagree on start jitter")
        if self._jitter_generator is not None:
            self._jitter_generator.set_state(state["jitter"].cpu())
        self.source.set_random_state(state["source"])

    def _rows(self, rows: torch.Tensor | None, what: str) -> torch.Tensor | None:
        """Validated row indices (None = all rows)."""
        if rows is None:
            return None
        rows = torch.as_tensor(rows, device=self.device)
        if rows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"{what}: rows must be integer indices, got dtype {rows.dtype}")
        rows = rows.long().reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise IndexError(f"{what}: rows must lie in [0, {self.batch_size}), "
                             f"got {rows.tolist()}")
        if len(torch.unique(rows)) != len(rows):
            raise ValueError(f"{what}: rows must not repeat, got {rows.tolist()}")
        return rows

    def _observe_into(self, sel: torch.Tensor | slice) -> None:
        """Recompute ``observation[sel]`` from the current state."""
        emb = self.recognizer.embeddings(self.state[sel])
        T = self.lengths[sel]
        denom = (T - 1).clamp(min=1).unsqueeze(1).float()
        obs = self.observation
        H = self.hidden_dim
        if isinstance(sel, slice):
            obs[:, :, :H] = emb
            obs[:, :, H] = self.frames_observed / (self.max_moves + 1)
            obs[:, :, H + 1] = self.positions / denom
            obs[:, :, H + 2] = (self.steps.float() / self.max_moves).unsqueeze(1)
        else:
            part = torch.cat([
                emb,
                (self.frames_observed[sel] / (self.max_moves + 1)).unsqueeze(-1),
                (self.positions[sel] / denom).unsqueeze(-1),
                (self.steps[sel].float() / self.max_moves)[:, None, None].expand(
                    -1, self.num_locators, 1),
            ], dim=-1)
            obs[sel] = part

    def _gt_prob(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``P(y)`` per row; 0 for unlabeled videos (label -1)."""
        p = probs.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        return torch.where(labels >= 0, p, torch.zeros_like(p))

    # ---------------------------------------------------------------- reset
    def reset(self, videos: torch.Tensor, rows: torch.Tensor | None = None) -> CoreObs:
        """Start episodes on ``videos`` (indices into the source), one per row.

        Without ``rows`` every row restarts (``len(videos)`` must be B, or fixes B on the first
        call); with ``rows`` only those rows restart, ``videos[k]`` on row ``rows[k]``.
        """
        videos = torch.as_tensor(videos, device=self.device)
        if videos.dtype.is_floating_point or videos.dtype == torch.bool or videos.ndim != 1:
            raise TypeError(f"videos must be a 1-d integer tensor, got {videos.dtype} "
                            f"of shape {tuple(videos.shape)}")
        videos = videos.long()
        if self.batch_size is None:
            if rows is not None:
                raise ValueError("the first reset must restart every row (batch_size unknown)")
            self._allocate(len(videos))
        rows = self._rows(rows, "reset")
        k = self.batch_size if rows is None else len(rows)
        if len(videos) != k:
            raise ValueError(f"reset: got {len(videos)} videos for {k} rows")
        V = len(self._lengths_all)
        if k and (videos.min() < 0 or videos.max() >= V):
            raise IndexError(f"reset: video indices must lie in [0, {V}), got "
                             f"{videos.min().item()}..{videos.max().item()}")
        sel: torch.Tensor | slice = slice(None) if rows is None else rows
        self.source.begin_episodes(videos)
        N = self.num_locators
        with self._inference() as rec:
            T = self._lengths_all[videos]
            labels = self._labels_all[videos]
            start = torch.div(self._locator_index.unsqueeze(0) * T.unsqueeze(1), N,
                              rounding_mode="floor")  # s_i = floor(i T / N)
            if self.start_jitter:
                end = torch.div((self._locator_index.unsqueeze(0) + 1) * T.unsqueeze(1), N,
                                rounding_mode="floor")  # the next segment's first frame
                offset = torch.randint(0, self.start_jitter + 1, start.shape,
                                       generator=self._jitter_generator, device=self.device)
                start = torch.maximum(torch.minimum(start + offset, end - 1), start)
            self.videos[sel] = videos
            self.lengths[sel] = T
            self.labels[sel] = labels
            self.positions[sel] = start
            self.frames_observed[sel] = 1
            self.steps[sel] = 0
            self.alive[sel] = True
            self.done[sel] = False
            self.active[sel] = True
            traj = torch.full((k, N, self.max_moves + 1), -1, dtype=torch.long, device=self.device)
            traj[:, :, 0] = start
            self.trajectories[sel] = traj
            self.credit[sel] = 0.0
            feats = self.source.gather(videos.repeat_interleave(N), start.reshape(-1))
            feats = self._check_features(feats, k * N).reshape(k, N, -1)
            state = rec.observe(rec.initial_state(k, self.device), feats)
            self.state[sel] = state
            if self.compute_rewards:
                self.p_gt[sel] = self._gt_prob(rec.probs(state), labels)
            else:
                self.p_gt[sel] = float("nan")
            self._observe_into(sel)
        return self._view(CoreObs, rows, sel)

    def _check_features(self, feats: torch.Tensor, count: int) -> torch.Tensor:
        D = self.source.feature_dim
        if feats.shape != (count, D):
            raise ValueError(f"frame source returned features of shape {tuple(feats.shape)}, "
                             f"expected ({count}, {D})")
        # a cached source checked every row at load; re-checking would sync the device
        if not self.source.finite_checked and not torch.isfinite(feats).all():
            raise ValueError("frame source returned non-finite features (NaN or Inf)")
        return feats.to(self.state.dtype)

    def _require(self, ok: torch.Tensor, explain: Callable[[], str],
                 error: type[Exception] = ValueError) -> None:
        """Raise ``error(explain())`` unless ``ok`` (a bool tensor) is all true. On the CPU
        that is a plain check; on an accelerator it is an asynchronous device assert, so a
        step never waits on the device to validate its inputs."""
        if ok.device.type == "cpu":
            if not bool(ok.all()):
                raise error(explain())
        else:
            torch._assert_async(ok.all(), f"LocatorCore: {error.__name__}: invalid input "
                                "(rerun on the CPU for the full message)")

    # ---------------------------------------------------------------- step
    def check_actions(self, actions: torch.Tensor, k: int) -> torch.Tensor:
        """``actions`` as int64 ``[k, N]`` on the device; any value outside {0,1,2,3} (out of
        range, fractional, NaN, bool, wrong shape) raises: nothing is ever clipped."""
        actions = torch.as_tensor(actions, device=self.device)
        N = self.num_locators
        if tuple(actions.shape) != (k, N):
            raise ValueError(f"actions must have shape ({k}, {N}), got {tuple(actions.shape)}")
        if actions.dtype == torch.bool or actions.is_complex():
            raise TypeError(f"actions must be integers in 0..{NUM_ACTIONS - 1}, got dtype "
                            f"{actions.dtype}")
        if actions.dtype.is_floating_point:
            self._require(torch.isfinite(actions),
                          lambda: "actions contain NaN or Inf; valid actions are 0, 1, 2, 3")
            self._require(actions == actions.round(), lambda: (
                f"actions must be whole numbers in 0..{NUM_ACTIONS - 1}, got "
                f"{actions[actions != actions.round()][:5].tolist()}"))
            actions = actions.nan_to_num(0.0)  # (only reached on an accelerator)
        actions = actions.long()
        self._require((actions >= 0) & (actions < NUM_ACTIONS), lambda: (
            f"actions must lie in 0..{NUM_ACTIONS - 1} (stop, move 1-3 strides), got "
            f"{actions[(actions < 0) | (actions >= NUM_ACTIONS)][:5].tolist()}"))
        return actions

    def step(self, actions: torch.Tensor, rows: torch.Tensor | None = None) -> CoreStep:
        """Apply ``actions [K, N]`` (K = B, or ``len(rows)``) and return the team rewards.

        Stopped locators' actions are ignored (but must still be in range). Stepping a row
        whose episode has ended, or that was never reset, raises.
        """
        if self.batch_size is None:
            raise RuntimeError("step() before reset()")
        rows = self._rows(rows, "step")
        sel: torch.Tensor | slice = slice(None) if rows is None else rows
        k = self.batch_size if rows is None else len(rows)
        actions = self.check_actions(actions, k)
        ended = self.done[sel] | ~self.active[sel]
        row_ids = torch.arange(k, device=self.device) if rows is None else rows
        self._require(~ended, lambda: (
            f"step: rows {row_ids[ended][:10].tolist()} have no running episode (ended or "
            "never reset); reset them first"), RuntimeError)
        N, m = self.num_locators, self.max_moves
        with self._inference() as rec:
            alive = self.alive[sel]
            pos = self.positions[sel]
            last = (self.lengths[sel] - 1).unsqueeze(1)
            moved = alive & (actions > 0) & (pos < last)  # a locator at T-1 stops instead
            new_pos = torch.where(moved, torch.minimum(pos + actions * self.stride, last), pos)
            n = self.frames_observed[sel] + moved.long()
            still = moved & (n <= m)  # after its m-th move (n = m + 1 frames) it stops
            videos = self.videos[sel]
            if self.source.cheap_gather:
                # every locator's (clamped, in-range) position: no nonzero(), so no device
                # sync; observe() ignores the rows of locators that did not move
                frames = self.source.gather_in_range(
                    videos.unsqueeze(1).expand(-1, N).reshape(-1), new_pos.reshape(-1))
                frames = self._check_features(frames, k * N).view(k, N, -1)
            else:  # a decoder: read only the frames the moving locators observe
                idx = moved.nonzero(as_tuple=True)
                visited = self._check_features(self.source.gather(videos[idx[0]], new_pos[idx]),
                                               len(idx[0]))
                frames = torch.zeros(k, N, visited.shape[-1], dtype=visited.dtype,
                                     device=self.device)
                frames[idx] = visited
            state = rec.observe(self.state[sel], frames, moved)
            new_frames = moved.sum(1)
            labels = self.labels[sel]
            done = ~still.any(1)
            probs = None
            if self.compute_rewards:
                probs = rec.probs(state)
                p = self._gt_prob(probs, labels)
                reward = p - self.p_gt[sel] - self.frame_cost * new_frames
                self.p_gt[sel] = p
                if self.locator_credit:
                    self.credit[sel] = self._difference_credit(
                        rec, self.state[sel], state, p, labels, moved)
            else:
                reward = -self.frame_cost * new_frames.to(state.dtype)
            # trajectories: the new frame goes to slot n - 1 of each moving locator
            traj = self.trajectories[sel]
            slot = (n - 1).clamp(max=m).unsqueeze(-1)
            traj = traj.scatter(2, slot, torch.where(moved, new_pos,
                                                     traj.gather(2, slot).squeeze(-1)
                                                     ).unsqueeze(-1))
            # indexed assignment writes in place for a slice (all rows) and for row indices
            self.state[sel] = state
            self.positions[sel] = new_pos
            self.frames_observed[sel] = n
            self.alive[sel] = still
            self.done[sel] = done
            self.steps[sel] += 1
            self.trajectories[sel] = traj
            self._observe_into(sel)
            finished = self._finish(rows, done, state, probs) if done.any() else None
        return self._view(CoreStep, rows, sel, reward=reward, new_frames=new_frames,
                          moved=moved, done=done, finished=finished)

    def _difference_credit(self, rec: Recognizer, before: torch.Tensor, after: torch.Tensor,
                           p: torch.Tensor, labels: torch.Tensor, moved: torch.Tensor
                           ) -> torch.Tensor:
        """Per-locator difference reward ``[K, N]``: the team reward minus the team reward had
        locator i alone stopped instead, ``P_t - P_t(i's state unchanged) - lambda * moved_i``;
        0 for locators that did not observe. One F_M pass over the counterfactual states of
        the locators that observed."""
        credit = torch.zeros_like(moved, dtype=p.dtype)
        rows, who = moved.nonzero(as_tuple=True)  # only observers get a counterfactual
        if len(rows):
            counterfactual = after[rows].clone()  # [M, N, S]
            pairs = torch.arange(len(rows), device=after.device)
            counterfactual[pairs, who] = before[rows, who]
            p_without = self._gt_prob(rec.probs(counterfactual), labels[rows])
            credit[rows, who] = p[rows] - p_without - self.frame_cost
        return credit

    @contextmanager
    def _inference(self) -> Iterator[Recognizer]:
        """No gradients, recognizer in eval mode; its mode is restored afterwards because a
        trainer (Stage III) may share the recognizer object with the env."""
        rec = self.recognizer
        was_training = rec.training
        rec.eval()
        try:
            with torch.no_grad():
                yield rec
        finally:
            rec.train(was_training)

    def _view(self, kind: type[CoreObs], rows: torch.Tensor | None, sel: torch.Tensor | slice,
              **extra: object) -> CoreObs:
        """The result of a reset/step: the touched rows' tensors plus ``extra`` fields.

        Every tensor is the caller's to keep: the next step writes the state buffers in place,
        so a slice (all rows) is cloned; row indices (``rows``) already gather copies.
        """
        def own(buffer: torch.Tensor) -> torch.Tensor:
            return buffer.clone() if rows is None else buffer[sel]

        return kind(
            rows=torch.arange(self.batch_size, device=self.device) if rows is None else rows,
            observation=own(self.observation), alive=own(self.alive),
            positions=own(self.positions), frames_observed=own(self.frames_observed),
            p_gt=own(self.p_gt), action_mask=self.action_mask(rows), **extra,
        )

    def _finish(self, rows: torch.Tensor | None, done: torch.Tensor, state: torch.Tensor,
                probs: torch.Tensor | None) -> EpisodeBatch:
        """Episode accounting of the stepped rows that ended (``done`` is over those rows)."""
        local = done.nonzero(as_tuple=True)[0]
        batch_rows = local if rows is None else rows[local]
        if probs is None:  # F_M runs once per episode, at its end (ViMo inference)
            scores = self.recognizer.probs(state[local])
            self.p_gt[batch_rows] = self._gt_prob(scores, self.labels[batch_rows])
        else:
            scores = probs[local]
        labels = self.labels[batch_rows]
        lengths = self.lengths[batch_rows]
        frames = self.frames_observed[batch_rows].sum(1)
        gflops = (frames.double() * self.gflops_per_frame + self.recognizer_gflops_per_episode)
        videos = self.videos[batch_rows]
        ids = self.source.video_ids
        return EpisodeBatch(
            rows=batch_rows, videos=videos, labels=labels, lengths=lengths, frames=frames,
            frame_rate=frames.double() / lengths, gflops=gflops, scores=scores,
            correct=(scores.argmax(1) == labels) & (labels >= 0),
            trajectories=self.trajectories[batch_rows],
            video_ids=[ids[v] for v in videos.tolist()], flops_unit=self.flops_unit,
        )

    # ---------------------------------------------------------------- views
    def action_mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Legal actions ``bool [K, N, 4]`` of every locator (all rows, or ``rows``).

        Stop (0) is always legal; moves (1-3) only for an alive locator before its video's
        last frame (one at ``T - 1`` stops instead of moving, a stopped one ignores its action).
        A row is never all-false. Tensor ops only, no host sync.
        """
        if self.batch_size is None:
            raise RuntimeError("action_mask() before reset()")
        sel: torch.Tensor | slice = slice(None) if rows is None else rows
        last = (self.lengths[sel] - 1).unsqueeze(1)
        can_move = self.alive[sel] & (self.positions[sel] < last)  # [K, N]
        stop = torch.ones_like(can_move)
        return torch.stack([stop, can_move, can_move, can_move], dim=-1)

    def global_state(self) -> torch.Tensor:
        """Centralized-critic state ``[B, N * obs_dim + N]``: all observations + alive flags."""
        return torch.cat([self.observation.flatten(1), self.alive.to(self.observation.dtype)], 1)

    def observation_bounds(self) -> tuple[float, float]:
        """Bounds of the ``h_i`` part of an observation (LSTM: [-1, 1], pools: unbounded)."""
        if self.recognizer.config.temporal == "lstm":
            return -1.0, 1.0
        return -np.inf, np.inf


# -------------------------------------------------------------------- construction helpers
SAMPLERS = ("random", "sweep")


class VideoSampler:
    """Chooses the videos of new episodes: ``"random"`` (uniform, seeded) or ``"sweep"``.

    ``"sweep"`` visits videos 0, 1, 2, ... in order and wraps around (evaluation). The random
    generator is created at the first draw, not in ``__init__``, so copies made with
    cloudpickle before the first reset (SuperSuit) do not share a stream.
    """

    def __init__(self, num_videos: int, mode: str = "random", seed: int | None = None) -> None:
        if mode not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {mode!r}")
        if num_videos < 1:
            raise ValueError("the split has no videos to sample from")
        self.num_videos = int(num_videos)
        self.mode = mode
        self._seed = seed
        self._rng: np.random.Generator | None = None
        self._next = 0

    def seed(self, seed: int | None) -> None:
        """Restart the random stream from ``seed`` and the sweep from video 0."""
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._next = 0

    def get_state(self) -> dict[str, Any]:
        """Where the sampler stands (its random stream, the sweep's next video)."""
        return {"mode": self.mode, "num_videos": self.num_videos, "seed": self._seed,
                "next": self._next,
                "rng": self._rng.bit_generator.state if self._rng is not None else None}

    def set_state(self, state: dict[str, Any]) -> None:
        """Undo :meth:`get_state`."""
        if state["mode"] != self.mode:
            raise ValueError(f"sampler state is for mode {state['mode']!r}, not {self.mode!r}")
        if state.get("num_videos", self.num_videos) != self.num_videos:
            raise ValueError(f"sampler state is for {state['num_videos']} videos, this split has "
                             f"{self.num_videos}")
        self._seed, self._next = state["seed"], int(state["next"])
        self._rng = None
        if state["rng"] is not None:
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = state["rng"]

    def draw(self, count: int) -> np.ndarray:
        """Video indices (int64 ``[count]``) for the next ``count`` episodes."""
        if self.mode == "sweep":
            out = (self._next + np.arange(count)) % self.num_videos
            self._next = int((self._next + count) % self.num_videos)
            return out.astype(np.int64)
        if self._rng is None:
            self._rng = np.random.default_rng(self._seed)
        return self._rng.integers(0, self.num_videos, size=count, dtype=np.int64)


def load_source(features: object, split: str | None, device: str | torch.device) -> FrameSource:
    """A frame source: ``features`` is a FrameSource, or a ``vimo-features`` HDF5 path (then
    ``split`` of it is loaded). A source object is used as it is: a ``split`` that contradicts
    its own ``split`` raises (it used to be ignored silently); None accepts any."""
    if isinstance(features, FrameSource):
        own = getattr(features, "split", None)
        if split is not None and own is not None and split != own:
            raise ValueError(f"split={split!r} contradicts the frame source's own split {own!r} "
                             f"({source_name(features)}): a source object serves one split; "
                             f"pass split={own!r} or split=None, or build a source of split "
                             f"{split!r}")
        return features
    if features is None:
        raise ValueError("features= is required: a vimo-features HDF5 path or a FrameSource")
    from features.source import CachedFrameSource

    return CachedFrameSource(features, split=split, device=device)


def load_recognizer(recognizer: object, source: FrameSource, num_locators: int,
                    seed: int | None) -> Recognizer:
    """A recognizer: an object, a checkpoint path, or None (fresh default, seeded by ``seed``)."""
    if isinstance(recognizer, Recognizer):
        return recognizer
    if recognizer is None:
        from vimo_env.recognizer import RecognizerConfig

        config = RecognizerConfig(feature_dim=source.feature_dim,
                                  num_classes=source.num_classes, num_locators=num_locators)
        if seed is None:
            return Recognizer(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Recognizer(config)
    if isinstance(recognizer, (str, bytes)) or hasattr(recognizer, "__fspath__"):
        return Recognizer.load(recognizer)
    raise TypeError(f"recognizer must be a Recognizer, a checkpoint path or None, "
                    f"got {type(recognizer).__name__}")


def stream_seed(seed: int, stream: str) -> int:
    """A seed for the named random stream derived from ``seed``: generators seeded from one
    run seed for different purposes (start jitter, feature noise) draw independent numbers."""
    key = [int(seed) & 0xFFFFFFFF, *stream.encode()]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_core(
    features: object,
    recognizer: object,
    *,
    split: str | None,
    num_locators: int,
    max_moves: int,
    stride: int,
    frame_cost: float,
    device: str | torch.device,
    seed: int | None,
    compute_rewards: bool,
    batch_size: int,
    locator_credit: bool = False,
) -> LocatorCore:
    """The engine behind every front-end, from the SPEC section 6 keywords. ``device="auto"``
    follows a given source's device, else picks CUDA only for batches of at least
    ``AUTO_CUDA_MIN_BATCH`` rows (a batch-1 env stays on the CPU)."""
    if device == "auto":
        source_device = getattr(features, "device", None)
        device = (torch.device(source_device) if source_device is not None
                  else resolve_device("auto", batch_size=batch_size))
    source = load_source(features, split, device)
    rec = load_recognizer(recognizer, source, num_locators, seed)
    return LocatorCore(source, rec, num_locators=num_locators, max_moves=max_moves,
                       stride=stride, frame_cost=frame_cost, compute_rewards=compute_rewards,
                       locator_credit=locator_credit, device=device, batch_size=batch_size)
