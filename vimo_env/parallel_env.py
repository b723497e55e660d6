"""PettingZoo ParallelEnv over the batched core (B = 1): agents ``locator_0 .. locator_{N-1}``.

``vimo_env.parallel_env(features=..., ...)`` builds it; ``vimo_env.env(...)`` gives the AEC
version via ``parallel_to_aec``. Keyword names and info keys follow SPEC section 6.
"""

from __future__ import annotations

import numbers
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils.conversions import parallel_to_aec

from features.validation import require_int
from vimo_env.core import (
    NUM_ACTIONS,
    LocatorCore,
    VideoSampler,
    build_core,
)
from vimo_env.render import RENDER_MODES, check_render_mode, render_row


def observation_space_for(core: LocatorCore) -> spaces.Box:
    """Box of one locator's observation ``[h_i, n_i/(m+1), p_i/(T-1), t/m]`` (float32)."""
    low_h, high_h = core.observation_bounds()
    H = core.hidden_dim
    low = np.concatenate([np.full(H, low_h), np.zeros(3)]).astype(np.float32)
    high = np.concatenate([np.full(H, high_h), np.ones(3)]).astype(np.float32)
    return spaces.Box(low=low, high=high, dtype=np.float32)


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


class VideoLocatorsParallelEnv(ParallelEnv):
    """ViMo locators as a PettingZoo ParallelEnv (one video per episode).

    Observations: float32 ``[h_i, n_i/(m+1), p_i/(T-1), t/m]``; ``state()``: all observations
    flattened plus alive flags (``state_space``). Rewards: the team reward
    ``(P_t - P_{t-1}) - lambda * N_t`` to every agent that acted. Infos: ``position``,
    ``frames`` (n_i), ``p_gt`` (P_t), ``action_mask`` (``[4]`` of 0/1, int8 as PettingZoo and
    ``Discrete.sample(mask)`` expect: the agent's legal actions; stop always, moves only before
    the video's last frame), with ``locator_credit=True`` ``locator_credit`` (this
    agent's difference reward: the team reward minus the team reward had it alone stopped;
    0 when it did not observe) and, when the episode ends, ``episode`` (SPEC section 6,
    plus ``trajectory``: this locator's observed frames). ``reset(options={"video": i})``
    picks a video; otherwise the sampler does (``"random"`` seeded by ``seed``, or
    ``"sweep"``: videos in order). Stepping after the end with actions raises; an empty
    action dict then is a no-op returning empty dicts (SuperSuit's black_death does that).

    Args: see :func:`vimo_env.parallel_env` (SPEC section 6).
    """

    metadata = {"name": "video_locators_v0", "render_modes": list(RENDER_MODES),
                "render_fps": 4, "is_parallelizable": True}

    def __init__(
        self,
        features: Any = None,
        recognizer: Any = None,
        split: str | None = "train",
        num_locators: int = 3,
        max_moves: int = 4,
        stride: int = 3,
        frame_cost: float = 0.1,
        device: str | torch.device = "auto",
        seed: int | None = None,
        render_mode: str | None = None,
        sampler: str = "random",
        compute_rewards: bool = True,
        locator_credit: bool = False,
    ) -> None:
        check_render_mode(render_mode)
        self.render_mode = render_mode
        self.core = build_core(features, recognizer, split=split, num_locators=num_locators,
                               max_moves=max_moves, stride=stride, frame_cost=frame_cost,
                               device=device, seed=seed, compute_rewards=compute_rewards,
                               batch_size=1, locator_credit=locator_credit)
        self.source = self.core.source
        self.sampler = VideoSampler(self.source.num_videos, sampler, seed)
        self.possible_agents = [f"locator_{i}" for i in range(num_locators)]
        self.agents: list[str] = []
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        obs_space = observation_space_for(self.core)
        self._observation_spaces = {a: obs_space for a in self.possible_agents}
        self._action_spaces = {a: spaces.Discrete(NUM_ACTIONS) for a in self.possible_agents}
        if seed is not None:  # as reset(seed=): agent i's action space from seed + i
            self._seed_action_spaces(seed)
        N, d = num_locators, self.core.obs_dim
        self.state_space = spaces.Box(
            low=np.concatenate([np.tile(obs_space.low, N), np.zeros(N, np.float32)]),
            high=np.concatenate([np.tile(obs_space.high, N), np.ones(N, np.float32)]),
            shape=(N * d + N,), dtype=np.float32,
        )
        self._episode: dict | None = None

    # ---------------------------------------------------------------- spaces
    def _seed_action_spaces(self, seed: int) -> None:
        for i, agent in enumerate(self.possible_agents):
            self._action_spaces[agent].seed(seed + i)

    def observation_space(self, agent: str) -> spaces.Box:
        return self._observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._action_spaces[agent]

    # ---------------------------------------------------------------- API
    def reset(self, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        if seed is not None:
            self.sampler.seed(seed)
            self._seed_action_spaces(seed)
        if options and "video" in options:
            video = video_option(options["video"], self.source.num_videos)
        else:
            video = int(self.sampler.draw(1)[0])
        self.core.reset(torch.tensor([video], device=self.core.device))
        self.agents = list(self.possible_agents)
        self._episode = None
        return self._observations(self.agents), self._infos(self.agents)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            if not actions:
                return {}, {}, {}, {}, {}
            raise RuntimeError("step() after the episode ended (every locator stopped); "
                               "call reset()")
        unknown = set(actions) - set(self.possible_agents)
        if unknown:
            raise ValueError(f"actions for unknown agents {sorted(unknown)}")
        joint = np.zeros((1, len(self.possible_agents)), dtype=np.int64)
        for agent in self.agents:
            if agent not in actions:
                raise ValueError(f"{agent}: no action given (alive agents: {self.agents})")
            joint[0, self._index[agent]] = action_from(actions[agent], agent)
        acting = self.agents
        out = self.core.step(torch.as_tensor(joint, device=self.core.device))
        reward = float(out.reward[0])
        alive = out.alive[0].tolist()
        if out.finished is not None:
            self._episode = out.finished.records()[0].as_info()
        rewards = {a: reward for a in acting}
        terminations = {a: not alive[self._index[a]] for a in acting}
        truncations = {a: False for a in acting}
        observations = self._observations(acting)
        infos = self._infos(acting)
        self.agents = [a for a in acting if alive[self._index[a]]]
        return observations, rewards, terminations, truncations, infos

    def _observations(self, agents: list[str]) -> dict[str, np.ndarray]:
        obs = self.core.observation[0].cpu().numpy()
        return {a: obs[self._index[a]].copy() for a in agents}

    def _infos(self, agents: list[str]) -> dict[str, dict]:
        core = self.core
        pos = core.positions[0].tolist()
        frames = core.frames_observed[0].tolist()
        p_gt = float(core.p_gt[0])
        credit = core.credit[0].tolist() if core.locator_credit else None
        masks = core.action_mask()[0].cpu().numpy().astype(np.int8)  # sample(mask) needs int8
        infos = {}
        for a in agents:
            i = self._index[a]
            info = {"position": pos[i], "frames": frames[i], "p_gt": p_gt,
                    "action_mask": masks[i].copy()}
            if credit is not None:
                info["locator_credit"] = credit[i]
            if self._episode is not None:
                info["episode"] = self._episode
                info["trajectory"] = self._episode["trajectories"][i]
            infos[a] = info
        return infos

    def state(self) -> np.ndarray:
        return self.core.global_state()[0].cpu().numpy()

    def render(self, mode: str | None = None) -> str | np.ndarray | None:
        """The locators on the video's timeline, in ``render_mode`` (or ``mode``: RLlib's
        PettingZoo wrapper passes one positionally)."""
        render_mode = mode or self.render_mode
        if render_mode is None:
            gymnasium.logger.warn("render() called without a render_mode; pass render_mode=")
            return None
        check_render_mode(render_mode)
        title = ""
        if self.core.batch_size is not None:
            title = self.source.video_ids[int(self.core.videos[0])]
        out = render_row(self.core, 0, "ansi" if render_mode == "human" else render_mode, title)
        if render_mode == "human":
            print(out)
            return None
        return out

    def close(self) -> None:
        pass


def parallel_env(**kwargs: Any) -> VideoLocatorsParallelEnv:
    """The PettingZoo ParallelEnv (keywords: SPEC section 6, plus ``sampler`` and
    ``compute_rewards``)."""
    return VideoLocatorsParallelEnv(**kwargs)


def env(**kwargs: Any) -> AECEnv:
    """The AEC version of :func:`parallel_env` (``parallel_to_aec``)."""
    return parallel_to_aec(parallel_env(**kwargs))
