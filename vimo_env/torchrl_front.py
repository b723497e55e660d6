"""TorchRL front-end: a natively batched ``EnvBase`` over :class:`~vimo_env.core.LocatorCore`.

``vimo_env.torchrl_env(features=..., num_envs=B, ...)`` (the keywords of
:class:`~vimo_env.settings.EnvSettings`, or ``settings=`` one, plus its own) returns
:class:`VideoLocatorsTorchRLEnv`, ``batch_size=[B]``, on the core's device. It is a thin view of
the core - not a wrapper around the PettingZoo or Gymnasium envs: a step is one
``LocatorCore.step`` plus a few tensor reshapes, no Python loop over videos or locators, and
every tensor stays on the core's device.

Data layout (TorchRL's multi-agent convention, as VMAS / BenchMARL; ``N`` locators, group
``"locators"``)::

    ("locators", "observation")     float32 [B, N, obs_dim]   [h_i, n_i/(m+1), p_i/(T-1), t/m]
    ("locators", "action_mask")     bool    [B, N, 4]         legal actions (stop always)
    ("locators", "action")          int64   [B, N]            Categorical(4): index, not one-hot
    ("locators", "reward")          float32 [B, N, 1]         the team reward, broadcast
    ("locators", "locator_credit")  float32 [B, N, 1]         difference reward (locator_credit)
    ("locators", "alive")           bool    [B, N, 1]         the locator has not stopped yet
    ("locators", "done" | "terminated" | "truncated")  bool [B, N, 1]  the row's, broadcast
    "done" | "terminated" | "truncated"                bool [B, 1]
    "state"                         float32 [B, N*obs_dim + N] all observations + alive flags
    "p_gt"                          float32 [B, 1]            P_t (NaN without compute_rewards)

Episode end: ``terminated`` (= ``done``) is True when every locator of the row has stopped;
``truncated`` is always False (episodes end by themselves within ``max_moves`` steps). The
group's flags are the row's, broadcast to every locator (the team ends together, as in VMAS /
BenchMARL): TorchRL's collectors start a new trajectory id whenever *any* done leaf is True, so a
per-locator "stopped" flag there would cut trajectories mid-episode. Which locators already
stopped is ``("locators", "alive")`` (False once stopped; its actions are then ignored).
``_reset`` with a ``"_reset"`` mask ``[B, 1]`` restarts only those rows (each draws its next
video from the sampler, in row order); ``env.rollout(..., break_when_any_done=False)`` and the
collectors rely on it. Partial steps (``"_step"``, used by ``rollout(break_when_all_done=True)``)
step only the masked rows; the others return their current observation and reward 0.

Actions follow the core: a value outside ``{0, 1, 2, 3}`` raises; a move the mask forbids is not
an error (a stopped locator's action is ignored, a locator at the last frame stops instead),
exactly as in the other front-ends. ``strict_masks=True`` raises on such actions instead (one
host sync per step). The action spec carries the current mask (``spec.update_mask``, as TorchRL's
PettingZoo wrapper does), so ``env.rand_action()`` and ``env.rollout`` without a policy sample
legal actions; ``update_spec_mask=False`` skips that.

Seeding: ``seed=`` (or ``env.set_seed(s)``) seeds the video sampler; the same seed replays the
same episodes. With ``recognizer=None`` the constructor's seed also fixes the fresh recognizer.
Episode accounting (SPEC section 6's ``episode`` fields) of the rows that ended in the last
step is kept on the host side as :attr:`VideoLocatorsTorchRLEnv.last_finished`
(:class:`~vimo_env.core.EpisodeBatch`, tensors on the device, or None).

Importing this module imports torchrl; ``import vimo_env`` does not (``vimo_env.torchrl_env`` is
resolved lazily). The module is not called ``torchrl_env``: importing a submodule binds its name
on the package, which would then shadow the ``vimo_env.torchrl_env`` function.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from features.validation import require_int
from vimo_env.core import NUM_ACTIONS, EpisodeBatch
from vimo_env.frontend import (
    draw_videos,
    observation_space_for,
    render_first_row,
    state_space_for,
)
from vimo_env.render import check_render_mode
from vimo_env.settings import EnvSettings, SettingsKeywords, Unpack

GROUP = "locators"


class VideoLocatorsTorchRLEnv(EnvBase):
    """``num_envs`` ViMo episodes as one batched TorchRL env (see the module doc).

    Keywords: ``num_envs`` (B, also positional first), ``features``, ``recognizer`` and the
    other keywords of :class:`~vimo_env.settings.EnvSettings` (``render_mode`` ``"ansi"`` or
    ``"rgb_array"``), or ``settings=`` one ``EnvSettings`` (kept as ``self.settings``); plus
    its own ``strict_masks`` and ``update_spec_mask`` (see the module doc).
    """

    batch_locked = True
    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, num_envs: int = 1, features: Any = None, recognizer: Any = None, *,
                 strict_masks: bool = False, update_spec_mask: bool = True,
                 settings: EnvSettings | None = None,
                 **keywords: Unpack[SettingsKeywords]) -> None:
        s = EnvSettings.resolve(
            settings, features, recognizer, keywords,
            owner=type(self).__name__, own=("num_envs", "strict_masks", "update_spec_mask"))
        check_render_mode(s.render_mode, self.metadata["render_modes"])
        num_envs = require_int(num_envs, "num_envs", minimum=1)
        core, sampler = s.build(batch_size=num_envs)
        super().__init__(device=core.device, batch_size=torch.Size([num_envs]))
        self.settings = s
        self.core = core
        self.render_mode = s.render_mode
        self.num_envs = num_envs
        self.num_locators = core.num_locators
        self.strict_masks = bool(strict_masks)
        self.update_spec_mask = bool(update_spec_mask)
        self.sampler = sampler
        self.last_finished: EpisodeBatch | None = None
        self._started = False
        self._make_specs()

    # ---------------------------------------------------------------- specs
    def _make_specs(self) -> None:
        core, dev = self.core, self.core.device
        B, N, D = self.num_envs, core.num_locators, core.obs_dim
        # the other front-ends' bounds (Gymnasium boxes), as tensors
        box, state_box = observation_space_for(core), state_space_for(core)
        if np.isfinite(box.low).all() and np.isfinite(box.high).all():

            def bounded(space: spaces.Box, *shape: int) -> Bounded:
                return Bounded(low=torch.from_numpy(space.low).expand(*shape).clone(),
                               high=torch.from_numpy(space.high).expand(*shape).clone(),
                               shape=shape, dtype=torch.float32, device=dev)

            obs, state = bounded(box, B, N, D), bounded(state_box, B, N * D + N)
        else:  # pooled F_T: the embedding part is unbounded
            obs = Unbounded(shape=(B, N, D), dtype=torch.float32, device=dev)
            state = Unbounded(shape=(B, N * D + N), dtype=torch.float32, device=dev)
        group_obs = {"observation": obs,
                     "action_mask": Categorical(2, shape=(B, N, NUM_ACTIONS), dtype=torch.bool,
                                                device=dev),
                     "alive": Categorical(2, shape=(B, N, 1), dtype=torch.bool, device=dev)}
        if core.locator_credit:
            group_obs["locator_credit"] = Unbounded(shape=(B, N, 1), dtype=torch.float32,
                                                    device=dev)
        self.full_observation_spec = Composite(
            {GROUP: Composite(group_obs, shape=(B, N), device=dev),
             "state": state,
             "p_gt": Unbounded(shape=(B, 1), dtype=torch.float32, device=dev)},
            shape=(B,), device=dev)
        self.full_action_spec = Composite(
            {GROUP: Composite(
                {"action": Categorical(NUM_ACTIONS, shape=(B, N), dtype=torch.int64, device=dev)},
                shape=(B, N), device=dev)},
            shape=(B,), device=dev)
        self.full_reward_spec = Composite(
            {GROUP: Composite({"reward": Unbounded(shape=(B, N, 1), dtype=torch.float32,
                                                   device=dev)}, shape=(B, N), device=dev)},
            shape=(B,), device=dev)

        def flags(*shape: int) -> dict[str, Categorical]:
            return {k: Categorical(2, shape=shape, dtype=torch.bool, device=dev)
                    for k in ("done", "terminated", "truncated")}

        self.full_done_spec = Composite(
            {**flags(B, 1), GROUP: Composite(flags(B, N, 1), shape=(B, N), device=dev)},
            shape=(B,), device=dev)
        self._action_spec_leaf = self.full_action_spec[GROUP, "action"]

    # ---------------------------------------------------------------- output
    def _output(self, observation: torch.Tensor, alive: torch.Tensor, mask: torch.Tensor,
                done: torch.Tensor, reward: torch.Tensor | None) -> TensorDict:
        """The step/reset tensordict of all B rows (every tensor the caller's to keep)."""
        core = self.core
        B, N = self.num_envs, core.num_locators
        done = done.view(B, 1)
        group_done = done.view(B, 1, 1).expand(B, N, 1)
        group = {"observation": observation, "action_mask": mask, "alive": alive.unsqueeze(-1),
                 "done": group_done.clone(), "terminated": group_done.clone(),
                 "truncated": torch.zeros_like(group_done)}
        if reward is not None:
            group["reward"] = reward.to(torch.float32).view(B, 1, 1).expand(B, N, 1).clone()
        if core.locator_credit:
            group["locator_credit"] = core.credit.unsqueeze(-1).to(torch.float32, copy=True)
        if self.update_spec_mask:
            self._action_spec_leaf.update_mask(mask)
        state = torch.cat([observation.flatten(1), alive.to(observation.dtype)], 1)
        return TensorDict(
            {GROUP: TensorDict(group, batch_size=(B, N), device=core.device),
             "state": state, "p_gt": core.p_gt.to(torch.float32).view(B, 1).clone(),
             "done": done, "terminated": done.clone(), "truncated": torch.zeros_like(done)},
            batch_size=(B,), device=core.device)

    # ---------------------------------------------------------------- reset
    def _draw(self, count: int) -> torch.Tensor:
        return draw_videos(self.sampler, count, self.core)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDict:
        core, B = self.core, self.num_envs
        reset = None
        if tensordict is not None and self._started:
            reset = tensordict.get("_reset", None)
            if reset is None:  # only the group's mask: a locator cannot restart alone
                reset = tensordict.get((GROUP, "_reset"), None)
                if reset is not None:
                    reset = reset.reshape(B, -1).any(1)
        if reset is None or bool(reset.all()):
            core.reset(self._draw(B))
        else:
            rows = reset.reshape(B).nonzero(as_tuple=True)[0]
            if len(rows):
                core.reset(self._draw(len(rows)), rows=rows)
        self._started = True
        self.last_finished = None
        return self._output(core.observation.clone(), core.alive.clone(), core.action_mask(),
                            core.done.clone(), None)

    # ---------------------------------------------------------------- step
    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        core, B, N = self.core, self.num_envs, self.num_locators
        if not self._started:
            raise RuntimeError("step() before reset()")
        actions = tensordict.get((GROUP, "action"))
        if actions.shape != (B, N):
            hint = (" (the action is a Categorical index, not one-hot)"
                    if actions.shape == (B, N, NUM_ACTIONS) else "")
            raise ValueError(f"({GROUP!r}, 'action') must have shape ({B}, {N}){hint}, got "
                             f"{tuple(actions.shape)}")
        # every row's action is validated, also those a partial step leaves alone
        actions = core.check_actions(actions, B)
        partial = tensordict.get("_step", None)
        # rollout(break_when_all_done=True) writes "_neg_step" next to every done leaf but pops
        # only the root one (torchrl 0.14); a leftover group entry breaks its torch.where
        tensordict.pop((GROUP, "_neg_step"), None)
        rows = None
        if partial is not None and not bool(partial.all()):
            rows = partial.reshape(B).nonzero(as_tuple=True)[0]
        if self.strict_masks:
            self._check_masks(actions, rows)
        if rows is None:
            out = core.step(actions)
            self.last_finished = out.finished
            return self._output(out.observation, out.alive, out.action_mask, out.done, out.reward)
        reward = torch.zeros(B, dtype=torch.float32, device=core.device)
        self.last_finished = None
        if len(rows):
            out = core.step(actions[rows], rows=rows)
            reward[rows] = out.reward.to(torch.float32)
            self.last_finished = out.finished
        return self._output(core.observation.clone(), core.alive.clone(), core.action_mask(),
                            core.done.clone(), reward)

    def _check_masks(self, actions: torch.Tensor, rows: torch.Tensor | None) -> None:
        mask = self.core.action_mask()
        legal = mask.gather(2, actions.unsqueeze(-1)).squeeze(-1)
        if rows is not None:  # rows a partial step leaves alone are not checked
            skipped = torch.ones(self.num_envs, dtype=torch.bool, device=legal.device)
            skipped[rows] = False
            legal = legal | skipped.unsqueeze(1)
        if not bool(legal.all()):
            bad = (~legal).nonzero()[:5].tolist()
            raise ValueError(f"strict_masks: actions illegal per ({GROUP!r}, 'action_mask') at "
                             f"[row, locator] {bad} (a stopped locator or one at its video's "
                             "last frame may only stop, action 0)")

    def _set_seed(self, seed: int | None) -> None:
        """Restart the video sampler from ``seed`` (same seed, same episodes)."""
        self.sampler.seed(seed)

    # ---------------------------------------------------------------- extras
    def render(self) -> str | np.ndarray | None:
        """Row 0's timeline in ``render_mode`` (``"ansi"`` or ``"rgb_array"``)."""
        if not self._started:
            return None
        return render_first_row(self.core, self.render_mode, warn=False)


def torchrl_env(num_envs: int = 1, features: Any = None, recognizer: Any = None, *,
                strict_masks: bool = False, update_spec_mask: bool = True,
                settings: EnvSettings | None = None,
                **keywords: Unpack[SettingsKeywords]) -> VideoLocatorsTorchRLEnv:
    """The natively batched TorchRL env (keywords: :class:`VideoLocatorsTorchRLEnv`)."""
    return VideoLocatorsTorchRLEnv(num_envs, features, recognizer, strict_masks=strict_masks,
                                   update_spec_mask=update_spec_mask, settings=settings,
                                   **keywords)
