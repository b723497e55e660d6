"""Gymnasium front-ends: ``VideoLocators-v0`` (joint control) and its native batched VectorEnv.

* :class:`VideoLocatorsEnv` - one policy controls all N locators of one video:
  observation ``Dict(observation=Box(N, obs_dim), alive=MultiBinary(N),
  action_mask=MultiBinary((N, 4)))``, action ``MultiDiscrete([4] * N)``, team reward,
  terminated when every locator stopped. Stopped locators' actions are ignored (they must still
  be in range). ``action_mask[i, a]`` is 1 when action ``a`` is legal for locator ``i``: stop
  always, moves only for an alive locator before the video's last frame;
  :meth:`VideoLocatorsEnv.action_masks` gives it flat for sb3-contrib's ``MaskablePPO``.
* :class:`VideoLocatorsVectorEnv` - ``gymnasium.make_vec("VideoLocators-v0", num_envs=B,
  vectorization_mode="vector_entry_point", features=...)``: B episodes on the batched core,
  autoreset ``NEXT_STEP`` (the step after a row terminates resets that row and ignores its
  action; that step returns reward 0 and ``terminated=False``).

Infos hold ``position [N]``, ``frames [N]``, ``p_gt`` and, when an episode ends,
``vimo_episode`` (:data:`EPISODE_KEY`): SPEC section 6's ``episode`` dict plus ``length``,
``trajectories``, ``r`` (return) and ``l`` (steps). It is not called ``episode`` here because
Gymnasium's ``RecordEpisodeStatistics`` (which asserts the key is free) and SB3's ``Monitor``
(which overwrites it; ``make_vec_env`` and every SB3 algorithm add one) own that key in
Gymnasium envs: both work unchanged and our statistics stay reachable. (The PettingZoo env keeps
SPEC's ``episode`` key.) In the vector env every value is batched and ``_vimo_episode`` masks the
rows that ended (Gymnasium's convention).

Both take ``features``, ``recognizer`` and the other keywords of
:class:`~vimo_env.settings.EnvSettings` (documented there), or ``settings=`` one ``EnvSettings``
(``gymnasium.make`` / ``make_vec`` pass either through); the result is ``env.settings``.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from features.validation import require_int
from vimo_env.core import EpisodeBatch
from vimo_env.frontend import (
    RowView,
    action_from,
    draw_videos,
    joint_spaces,
    render_first_row,
    start_episode,
)
from vimo_env.render import RENDER_MODES, check_render_mode
from vimo_env.settings import EnvSettings, SettingsKeywords, Unpack

ENV_ID = "VideoLocators-v0"
#: Info key of the per-episode statistics in the Gymnasium envs (see the module doc).
EPISODE_KEY = "vimo_episode"


class VideoLocatorsEnv(gymnasium.Env):
    """Joint-control ViMo environment (one video per episode); see the module doc.

    Keywords: :class:`~vimo_env.settings.EnvSettings` (``locator_credit`` adds
    ``info["locator_credit"]`` ``[N]``, as in :class:`VideoLocatorsVectorEnv`).
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 4}

    def __init__(self, features: Any = None, recognizer: Any = None, *,
                 settings: EnvSettings | None = None,
                 **keywords: Unpack[SettingsKeywords]) -> None:
        self.settings = s = EnvSettings.resolve(
            settings, features, recognizer, keywords,
            owner=type(self).__name__)
        self.render_mode = s.render_mode
        self.core, self.sampler = s.build(batch_size=1)
        self.observation_space, self.action_space = joint_spaces(self.core)
        if s.seed is not None:  # seed fixes everything random, action_space.sample() included
            self.action_space.seed(s.seed)
        self._return = 0.0

    def _outputs(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The observation and the info of the current state."""
        view = RowView.of(self.core)
        obs = {"observation": view.observation, "alive": view.alive,
               "action_mask": view.action_mask}
        info = {"position": view.position, "frames": view.frames, "p_gt": view.p_gt}
        if view.locator_credit is not None:
            info["locator_credit"] = view.locator_credit
        return obs, info

    def action_masks(self) -> np.ndarray:
        """Legal actions, bool ``[N * 4]`` (locator-major): sb3-contrib's ``MaskablePPO``
        reads this method; the same as ``observation["action_mask"]`` flattened."""
        if self.core.batch_size is None:
            raise RuntimeError("action_masks() before reset()")
        return self.core.action_mask()[0].reshape(-1).cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self.sampler.seed(seed)
            self.action_space.seed(seed)
            if self.core.start_jitter:
                self.core.set_start_jitter(self.core.start_jitter, seed)
        start_episode(self.core, self.sampler, options)
        self._return = 0.0
        return self._outputs()

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        core = self.core
        if core.batch_size is None or not bool(core.active[0]):
            raise RuntimeError("step() before reset()")
        if bool(core.done[0]):
            raise RuntimeError("step() after the episode ended (every locator stopped); "
                               "call reset()")
        arr = np.asarray(action)
        N = core.num_locators
        if arr.shape != (N,):
            raise ValueError(f"action must have shape ({N},) (one per locator), got {arr.shape}")
        joint = [action_from(arr[i], f"locator_{i}") for i in range(N)]
        out = core.step(torch.tensor([joint], device=core.device))
        reward = float(out.reward[0])
        self._return += reward
        obs, info = self._outputs()
        terminated = bool(out.done[0])
        if out.finished is not None:
            episode = out.finished.records()[0].as_info()
            episode.update(r=self._return, l=int(core.steps[0]))
            info[EPISODE_KEY] = episode
        return obs, reward, terminated, False, info

    def render(self) -> str | np.ndarray | None:
        return render_first_row(self.core, self.render_mode)


class VideoLocatorsVectorEnv(VectorEnv):
    """``num_envs`` joint-control episodes stepped together on the batched core.

    Same single spaces as :class:`VideoLocatorsEnv`; observations, rewards and flags are
    batched numpy arrays; autoreset mode ``NEXT_STEP``. Each finished row draws its next video
    from the sampler (``"random"`` seeded by ``seed``/``reset(seed=)``, or ``"sweep"``).
    ``locator_credit=True`` adds ``info["locator_credit"]`` (float32 ``[B, N]``): each
    locator's difference reward in the last step (the team reward minus the team reward had
    that locator alone stopped; 0 for locators that did not observe and after a reset), the
    per-locator credit CTDE learners can train on (``SACConfig.difference_credit``).

    Keywords: ``num_envs`` (B, also positional first) plus those of
    :class:`~vimo_env.settings.EnvSettings` (``render_mode`` ``"ansi"`` or ``"rgb_array"`` only).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["ansi", "rgb_array"],
                "render_fps": 4}

    def __init__(self, num_envs: int = 1, features: Any = None, recognizer: Any = None, *,
                 settings: EnvSettings | None = None,
                 **keywords: Unpack[SettingsKeywords]) -> None:
        self.settings = s = EnvSettings.resolve(
            settings, features, recognizer, keywords,
            owner=type(self).__name__, own=("num_envs",))
        check_render_mode(s.render_mode, self.metadata["render_modes"])
        self.render_mode = s.render_mode
        self.num_envs = require_int(num_envs, "num_envs", minimum=1)
        self.core, self.sampler = s.build(batch_size=self.num_envs)
        self.single_observation_space, self.single_action_space = joint_spaces(self.core)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        if s.seed is not None:  # as reset(seed=): the batched and the single action space
            self.action_space.seed(s.seed)
            self.single_action_space.seed(s.seed)
        # rows whose episode ended at the last step (they restart at the next one); on the host,
        # so a step never reads the device to find them
        self._needs_reset = np.zeros(self.num_envs, dtype=bool)
        self._returns = np.zeros(self.num_envs)

    def _draw(self, count: int) -> torch.Tensor:
        return draw_videos(self.sampler, count, self.core)

    def _host(self, *extra: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, Any],
                                                   list[np.ndarray]]:
        """Observation dict, info dict and ``extra`` (``[B]`` tensors) as numpy, in ONE
        device-to-host copy: every per-row tensor is packed into one float32 block first (the
        integers involved, frame positions and counts, are exact in float32 below 2^24)."""
        core = self.core
        B, N = self.num_envs, core.num_locators
        parts = [core.observation.reshape(B, -1), core.alive.float(),
                 core.action_mask().reshape(B, -1).float(), core.positions.float(),
                 core.frames_observed.float(), core.p_gt.float().unsqueeze(1)]
        if core.locator_credit:
            parts.append(core.credit.float())
        parts += [t.float().reshape(B, 1) for t in extra]
        block = torch.cat(parts, dim=1).cpu().numpy()
        sizes = [p.shape[1] for p in parts]
        pieces = np.split(block, np.cumsum(sizes)[:-1], axis=1)
        obs_dim = core.observation.shape[-1]
        obs = {"observation": pieces[0].reshape(B, N, obs_dim).copy(),
               "alive": pieces[1].astype(np.int8),
               "action_mask": pieces[2].reshape(B, N, -1).astype(np.int8)}
        info = {"position": pieces[3].astype(np.int64), "frames": pieces[4].astype(np.int64),
                "p_gt": pieces[5][:, 0].copy()}
        k = 6
        if core.locator_credit:
            info["locator_credit"] = pieces[6].copy()
            k = 7
        return obs, info, [p[:, 0] for p in pieces[k:]]

    def episode_state(self) -> dict[str, Any]:
        """Everything the running episodes and the next ones depend on (the core's rows, the
        sampler, pending autoresets, returns so far): a training checkpoint saves it so that a
        resumed run continues these very episodes (:meth:`load_episode_state`)."""
        return {"core": self.core.episode_state(), "sampler": self.sampler.get_state(),
                "needs_reset": self._needs_reset.copy(), "returns": self._returns.copy()}

    def load_episode_state(self, state: dict[str, Any]) -> None:
        """Undo :meth:`episode_state` (same ``num_envs``)."""
        if len(state["needs_reset"]) != self.num_envs:
            raise ValueError(f"episode state is for {len(state['needs_reset'])} envs, this "
                             f"env has {self.num_envs}")
        self.core.load_episode_state(state["core"])
        self.sampler.set_state(state["sampler"])
        self._needs_reset = state["needs_reset"].copy()
        self._returns = state["returns"].copy()

    def action_masks(self) -> np.ndarray:
        """Legal actions of every row, bool ``[B, N * 4]`` (see :class:`VideoLocatorsEnv`)."""
        if self.core.batch_size is None:
            raise RuntimeError("action_masks() before reset()")
        return self.core.action_mask().reshape(self.num_envs, -1).cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self.sampler.seed(seed)
            self.action_space.seed(seed)
            if self.core.start_jitter:
                self.core.set_start_jitter(self.core.start_jitter, seed)
            self.single_action_space.seed(seed)
        mask = (options or {}).get("reset_mask")
        if mask is not None and self.core.batch_size is not None:
            return self._reset_rows(mask)
        self.core.reset(self._draw(self.num_envs))
        self._needs_reset[:] = False
        self._returns[:] = 0.0
        obs, info, _ = self._host()
        return obs, info

    def _reset_rows(self, mask: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Gymnasium's partial reset (``options={"reset_mask": bool [B]}``): restart only the
        masked rows, cancelling their pending autoreset; the other rows run on untouched."""
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
            raise ValueError(f"options['reset_mask'] must be a bool array of shape "
                             f"({self.num_envs},), got {mask.dtype} {mask.shape}")
        rows = torch.as_tensor(np.flatnonzero(mask), device=self.core.device)
        if len(rows):
            self.core.reset(self._draw(len(rows)), rows=rows)
            self._needs_reset[mask] = False
            self._returns[mask] = 0.0
        obs, info, _ = self._host()
        return obs, info

    def step(self, actions: Any) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray,
                                          np.ndarray, dict[str, Any]]:
        core = self.core
        if core.batch_size is None or not bool(core.active.all()):
            raise RuntimeError("step() before reset()")
        B, N = self.num_envs, core.num_locators
        # a tensor (on any device) is taken as it is: a policy on the GPU needs no numpy trip
        if not isinstance(actions, torch.Tensor):
            actions = np.asarray(actions)
        actions = torch.as_tensor(actions, device=core.device)
        if tuple(actions.shape) != (B, N):
            raise ValueError(f"actions must have shape ({B}, {N}), got {tuple(actions.shape)}")
        # every row's action is validated, restarting rows' too (then ignored)
        actions = core.check_actions(actions, B)
        reward = torch.zeros(B, device=core.device)
        done = torch.zeros(B, dtype=torch.bool, device=core.device)
        restart_host = np.flatnonzero(self._needs_reset)
        finished: EpisodeBatch | None = None
        if len(restart_host) < B:
            rows = None
            if len(restart_host):
                rows = torch.as_tensor(np.flatnonzero(~self._needs_reset), device=core.device)
            out = core.step(actions if rows is None else actions[rows], rows=rows)
            if rows is None:
                reward, done = out.reward.float(), out.done
            else:
                reward[rows], done[rows] = out.reward.float(), out.done
            finished = out.finished
        if len(restart_host):
            restart = torch.as_tensor(restart_host, device=core.device)
            core.reset(self._draw(len(restart_host)), rows=restart)
            self._returns[restart_host] = 0.0
        obs, info, (rewards, terminated) = self._host(reward, done)  # one device-to-host copy
        rewards, terminated = rewards.astype(np.float64), terminated.astype(bool)
        self._needs_reset = terminated.copy()
        self._returns += rewards
        if finished is not None:
            info[EPISODE_KEY], info[f"_{EPISODE_KEY}"] = self._episode_info(finished)
        return obs, rewards, terminated, np.zeros(B, dtype=bool), info

    def _episode_info(self, batch: EpisodeBatch) -> tuple[dict[str, np.ndarray], np.ndarray]:
        B = self.num_envs
        rows = batch.rows.cpu().numpy()
        mask = np.zeros(B, dtype=bool)
        mask[rows] = True

        def spread(values: torch.Tensor | np.ndarray, fill: Any = 0) -> np.ndarray:
            values = values.cpu().numpy() if isinstance(values, torch.Tensor) else values
            out = np.full((B, *values.shape[1:]), fill, dtype=values.dtype)
            out[rows] = values
            return out

        ids = np.empty(B, dtype=object)
        ids[:] = ""
        ids[rows] = batch.video_ids
        episode = {
            "video_id": ids, "label": spread(batch.labels), "frames": spread(batch.frames),
            "frame_rate": spread(batch.frame_rate), "gflops": spread(batch.gflops),
            "scores": spread(batch.scores), "correct": spread(batch.correct, False),
            "length": spread(batch.lengths), "trajectories": spread(batch.trajectories, -1),
            "r": np.where(mask, self._returns, 0.0), "l": spread(self.core.steps[batch.rows]),
        }
        return episode, mask

    def render(self) -> str | np.ndarray | None:
        """Row 0's timeline."""
        return render_first_row(self.core, self.render_mode, warn=False)


def register() -> None:
    """Register ``VideoLocators-v0`` with Gymnasium (idempotent)."""
    if ENV_ID in gymnasium.registry:
        return
    gymnasium.register(
        id=ENV_ID,
        entry_point="vimo_env.gym_env:VideoLocatorsEnv",
        vector_entry_point="vimo_env.gym_env:VideoLocatorsVectorEnv",
    )
