"""What the front-ends share besides their settings: argument checks, spaces, the batch-1 reset,
row 0 as numpy, and rendering row 0.

Neutral ground: the PettingZoo, Gymnasium and TorchRL front-ends import from here, never from
each other.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from features.validation import require_int
from vimo_env.core import NUM_ACTIONS, LocatorCore, VideoSampler
from vimo_env.render import check_render_mode, render_row


# ---------------------------------------------------------------- argument checks
def action_from(value: Any, who: str) -> int:
    """One locator's action as an int in 0..3; anything else raises naming ``who``."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{who}: action must be one integer in 0..{NUM_ACTIONS - 1}, "
                         f"got {value!r}")
    x = arr.reshape(()).item()
    if isinstance(x, float) and (not np.isfinite(x) or x != int(x)):
        raise ValueError(f"{who}: action must be an integer in 0..{NUM_ACTIONS - 1}, got {x!r}")
    if not isinstance(x, numbers.Real) or not 0 <= x < NUM_ACTIONS:
        raise ValueError(f"{who}: action {x!r} outside 0..{NUM_ACTIONS - 1} "
                         "(0 stop, k move k strides)")
    return int(x)


def video_option(value: Any, num_videos: int) -> int:
    """``reset(options={"video": i})``'s video index, checked: an integer in the split."""
    video = require_int(value, "options['video']")
    if not 0 <= video < num_videos:
        raise IndexError(f"options['video']={video} outside [0, {num_videos})")
    return video


# ---------------------------------------------------------------- spaces
def observation_space_for(core: LocatorCore) -> spaces.Box:
    """Box of one locator's observation ``[h_i, n_i/(m+1), p_i/(T-1), t/m]`` (float32)."""
    low_h, high_h = core.observation_bounds()
    H = core.hidden_dim
    low = np.concatenate([np.full(H, low_h), np.zeros(3)]).astype(np.float32)
    high = np.concatenate([np.full(H, high_h), np.ones(3)]).astype(np.float32)
    return spaces.Box(low=low, high=high, dtype=np.float32)


def state_space_for(core: LocatorCore) -> spaces.Box:
    """Box of the centralized-critic state: every locator's observation, then N alive flags
    (``LocatorCore.global_state``)."""
    one, N = observation_space_for(core), core.num_locators
    return spaces.Box(low=np.concatenate([np.tile(one.low, N), np.zeros(N, np.float32)]),
                      high=np.concatenate([np.tile(one.high, N), np.ones(N, np.float32)]),
                      shape=(N * core.obs_dim + N,), dtype=np.float32)


def joint_spaces(core: LocatorCore) -> tuple[spaces.Dict, spaces.MultiDiscrete]:
    """One episode's joint observation ``Dict(observation [N, obs_dim], alive [N],
    action_mask [N, 4])`` and action ``MultiDiscrete([4] * N)`` spaces (Gymnasium)."""
    one = observation_space_for(core)
    N = core.num_locators
    box = spaces.Box(low=np.tile(one.low, (N, 1)), high=np.tile(one.high, (N, 1)),
                     dtype=np.float32)
    obs = spaces.Dict({"observation": box, "alive": spaces.MultiBinary(N),
                       "action_mask": spaces.MultiBinary([N, NUM_ACTIONS])})
    return obs, spaces.MultiDiscrete([NUM_ACTIONS] * N)


# ---------------------------------------------------------------- reset
def draw_videos(sampler: VideoSampler, count: int, core: LocatorCore) -> torch.Tensor:
    """The sampler's next ``count`` videos as a tensor on the core's device."""
    return torch.as_tensor(sampler.draw(count), device=core.device)


def start_episode(core: LocatorCore, sampler: VideoSampler, options: dict | None) -> None:
    """Reset a batch-1 core: on ``options["video"]`` when given (checked), else on the
    sampler's next video."""
    if options and "video" in options:
        video = video_option(options["video"], core.source.num_videos)
        core.reset(torch.tensor([video], device=core.device))
    else:
        core.reset(draw_videos(sampler, 1, core))


# ---------------------------------------------------------------- row 0 as numpy
@dataclass(frozen=True)
class RowView:
    """One row of the core on the host (every array a copy): what the single-episode
    front-ends turn into their observations and infos."""

    observation: np.ndarray  # float32 [N, obs_dim]
    alive: np.ndarray  # int8 [N]
    action_mask: np.ndarray  # int8 [N, 4] (Discrete.sample(mask) wants int8)
    position: np.ndarray  # int64 [N]
    frames: np.ndarray  # int64 [N], n_i
    p_gt: float  # P_t
    locator_credit: np.ndarray | None  # float32 [N], with locator_credit only

    @classmethod
    def of(cls, core: LocatorCore, row: int = 0) -> RowView:
        credit = core.credit[row].cpu().numpy().copy() if core.locator_credit else None
        return cls(observation=core.observation[row].cpu().numpy().copy(),
                   alive=core.alive[row].cpu().numpy().astype(np.int8),
                   action_mask=core.action_mask()[row].cpu().numpy().astype(np.int8),
                   position=core.positions[row].cpu().numpy().copy(),
                   frames=core.frames_observed[row].cpu().numpy().copy(),
                   p_gt=float(core.p_gt[row]), locator_credit=credit)


# ---------------------------------------------------------------- render
def render_first_row(core: LocatorCore, render_mode: str | None, *,
                     warn: bool = True) -> str | np.ndarray | None:
    """Row 0's timeline in ``render_mode`` titled with its video id; ``"human"`` prints the
    text and returns None. Without a mode: None, with Gymnasium's warning when ``warn`` (the
    single-episode envs; the batched ones return None silently, as before)."""
    if render_mode is None:
        if warn:
            gymnasium.logger.warn("render() called without a render_mode; pass render_mode=")
        return None
    check_render_mode(render_mode)
    title = core.source.video_ids[int(core.videos[0])] if core.batch_size is not None else ""
    out = render_row(core, 0, "ansi" if render_mode == "human" else render_mode, title)
    if render_mode == "human":
        print(out)
        return None
    return out
