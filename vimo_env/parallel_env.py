"""PettingZoo ParallelEnv over the batched core (B = 1): agents ``locator_0 .. locator_{N-1}``.

``vimo_env.parallel_env(features=..., ...)`` builds it; ``vimo_env.env(...)`` gives the AEC
version via ``parallel_to_aec``. Keywords: :class:`~vimo_env.settings.EnvSettings` (SPEC
section 6); info keys follow SPEC section 6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils.conversions import parallel_to_aec

from vimo_env.core import NUM_ACTIONS
from vimo_env.frontend import (
    RowView,
    action_from,
    observation_space_for,
    render_first_row,
    start_episode,
    state_space_for,
)
from vimo_env.render import RENDER_MODES
from vimo_env.settings import EnvSettings, SettingsKeywords, Unpack


class VideoLocatorsParallelEnv(ParallelEnv):
    """ViMo locators as a PettingZoo ParallelEnv (one video per episode).

    Observations: float32 ``[h_i, n_i/(m+1), p_i/(T-1), t/m]``; ``state()``: all observations
    flattened plus alive flags (``state_space``). Rewards: the team reward
    ``(P_t - P_{t-1}) - lambda * N_t`` to every agent that acted. Infos: ``position``,
    ``frames`` (n_i), ``p_gt`` (P_t), ``action_mask`` (``[4]`` of 0/1, int8 as PettingZoo and
    ``Discrete.sample(mask)`` expect: the agent's legal actions; stop always, moves only before
    the video's last frame), with ``locator_credit=True`` ``locator_credit`` (this agent's
    difference reward) and, when the episode ends, ``episode`` (SPEC section 6, plus
    ``trajectory``: this locator's observed frames). ``reset(options={"video": i})`` picks a
    video; otherwise the sampler does. Stepping after the end with actions raises; an empty
    action dict then is a no-op returning empty dicts (SuperSuit's black_death does that).

    Args: ``features``, ``recognizer`` and the other keywords of
    :class:`~vimo_env.settings.EnvSettings` (documented there), or ``settings=`` one
    ``EnvSettings``; the result is ``self.settings``.
    """

    metadata = {"name": "video_locators_v0", "render_modes": list(RENDER_MODES),
                "render_fps": 4, "is_parallelizable": True}

    def __init__(self, features: Any = None, recognizer: Any = None, *,
                 settings: EnvSettings | None = None,
                 **keywords: Unpack[SettingsKeywords]) -> None:
        self.settings = s = EnvSettings.resolve(
            settings, features, recognizer, keywords,
            owner=type(self).__name__)
        self.render_mode = s.render_mode
        self.core, self.sampler = s.build(batch_size=1)
        self.source = self.core.source
        self.possible_agents = [f"locator_{i}" for i in range(s.num_locators)]
        self.agents: list[str] = []
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        obs_space = observation_space_for(self.core)
        self._observation_spaces = {a: obs_space for a in self.possible_agents}
        self._action_spaces = {a: spaces.Discrete(NUM_ACTIONS) for a in self.possible_agents}
        if s.seed is not None:  # as reset(seed=): agent i's action space from seed + i
            self._seed_action_spaces(s.seed)
        self.state_space = state_space_for(self.core)
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
        start_episode(self.core, self.sampler, options)
        self.agents = list(self.possible_agents)
        self._episode = None
        return self._outputs(self.agents)

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
        observations, infos = self._outputs(acting)
        self.agents = [a for a in acting if alive[self._index[a]]]
        return observations, rewards, terminations, truncations, infos

    def _outputs(self, agents: list[str]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        """``agents``' observations and infos (plain Python numbers in the infos)."""
        view = RowView.of(self.core)
        pos, frames = view.position.tolist(), view.frames.tolist()
        credit = view.locator_credit.tolist() if view.locator_credit is not None else None
        observations, infos = {}, {}
        for a in agents:
            i = self._index[a]
            observations[a] = view.observation[i].copy()
            info = {"position": pos[i], "frames": frames[i], "p_gt": view.p_gt,
                    "action_mask": view.action_mask[i].copy()}
            if credit is not None:
                info["locator_credit"] = credit[i]
            if self._episode is not None:
                info["episode"] = self._episode
                info["trajectory"] = self._episode["trajectories"][i]
            infos[a] = info
        return observations, infos

    def state(self) -> np.ndarray:
        return self.core.global_state()[0].cpu().numpy()

    def render(self, mode: str | None = None) -> str | np.ndarray | None:
        """The locators on the video's timeline, in ``render_mode`` (or ``mode``: RLlib's
        PettingZoo wrapper passes one positionally)."""
        return render_first_row(self.core, mode or self.render_mode)

    def close(self) -> None:
        pass


def parallel_env(features: Any = None, recognizer: Any = None, *,
                 settings: EnvSettings | None = None,
                 **keywords: Unpack[SettingsKeywords]) -> VideoLocatorsParallelEnv:
    """The PettingZoo ParallelEnv (keywords: :class:`~vimo_env.settings.EnvSettings`)."""
    return VideoLocatorsParallelEnv(features, recognizer, settings=settings, **keywords)


def env(features: Any = None, recognizer: Any = None, *, settings: EnvSettings | None = None,
        **keywords: Unpack[SettingsKeywords]) -> AECEnv:
    """The AEC version of :func:`parallel_env` (``parallel_to_aec``)."""
    return parallel_to_aec(parallel_env(features, recognizer, settings=settings, **keywords))
