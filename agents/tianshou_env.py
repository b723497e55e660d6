"""Expose a natively batched gymnasium ``VectorEnv`` to Tianshou 2.0.x as one vector env.

Tianshou's ``Collector`` talks to a ``BaseVectorEnv``: ``reset(env_id)`` returns the first
observations of only the rows it names, and ``step(action, id)`` steps only the rows it names,
each returning numpy arrays (plus an object array of per-row info dicts). A batched gymnasium
``VectorEnv`` always steps every row and autoresets by itself. This adapter bridges the two so
that the stock ``Collector`` collects from all B rows of the batched env with one ``step`` call:

* ``reset(env_id=None)`` resets the whole batch; ``reset(env_id=rows)`` resets only those rows
  through gymnasium's ``options={"reset_mask": mask}`` (which also cancels a pending NEXT_STEP
  autoreset of those rows). With SAME_STEP autoreset the rows were already restarted inside the
  step that finished them, so their cached first observation is returned instead.
* ``step(action, id=rows)`` steps the whole batch. Rows not named (the Collector only leaves
  out rows whose episode it no longer wants, when collecting a fixed number of episodes) are
  given ``idle_action`` and marked *detached*: their results are dropped and they must be reset
  before Tianshou may step them again (stepping a detached row raises).
* Dict observations come back as a ``tianshou.data.Batch`` of arrays (one array per key, rows
  first), which the Collector and replay buffers slice and store like arrays.
* Info: one dict per row holding ``env_id`` and the keys listed in ``info_keys`` (those must be
  present for every row). Heterogeneous per-row infos break Tianshou's info batching, so
  everything else is dropped; ``last_info`` keeps the env's full info dict of the last call.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from tianshou.data import Batch


def _to_batch(obs: Any) -> Any:
    """Dict observations -> Batch of arrays; arrays unchanged."""
    if isinstance(obs, dict):
        return Batch({key: _to_batch(value) for key, value in obs.items()})
    return np.asarray(obs)


def _select_rows(obs: Any, rows: np.ndarray) -> Any:
    if isinstance(obs, dict):
        return {key: _select_rows(value, rows) for key, value in obs.items()}
    return np.asarray(obs)[rows]


def _assign_rows(target: Any, rows: np.ndarray, source: Any) -> None:
    if isinstance(target, dict):
        for key in target:
            _assign_rows(target[key], rows, source[key])
    else:
        target[rows] = source


class TianshouVectorEnvAdapter:
    """A gymnasium ``VectorEnv`` seen by Tianshou as a synchronous ``BaseVectorEnv`` of B rows.

    Duck-typed to what Tianshou 2.0.x's ``Collector`` and trainer use: ``len()``, ``env_num``,
    ``is_async``, ``action_space`` / ``observation_space`` (one entry per row, like
    ``BaseVectorEnv.get_env_attr``), ``reset(env_id)``, ``step(action, id)``, ``seed``,
    ``render`` and ``close``. ``single_action_space`` / ``single_observation_space`` are the
    per-row spaces an algorithm is built for.
    """

    is_async = False

    def __init__(
        self,
        env: VectorEnv,
        *,
        info_keys: Sequence[str] = (),
        idle_action: np.ndarray | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(env, VectorEnv):
            raise TypeError(f"env must be a gymnasium.vector.VectorEnv, got {type(env).__name__}")
        self.env = env
        self.env_num = int(env.num_envs)
        self.info_keys = tuple(info_keys)
        self.single_action_space: gym.Space = env.single_action_space
        self.single_observation_space: gym.Space = env.single_observation_space
        mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        self.autoreset_mode = AutoresetMode(mode) if isinstance(mode, str) else mode
        if idle_action is None:
            idle_action = np.zeros(self.single_action_space.shape, dtype=np.int64)
        self.idle_action = np.asarray(idle_action)
        if self.idle_action not in self.single_action_space:
            raise ValueError(f"idle_action {self.idle_action} is not in {self.single_action_space}")
        self._next_seed = seed
        if seed is not None:  # the Collector's random warm-up samples from this space
            self.single_action_space.seed(seed)
        self._attached = np.zeros(self.env_num, dtype=bool)
        self._needs_reset = np.ones(self.env_num, dtype=bool)
        self._pending_obs: Any = None  # SAME_STEP: first observations of rows restarted in step
        self.last_info: dict[str, Any] = {}

    # --- attributes Tianshou reads -------------------------------------------------------
    def __len__(self) -> int:
        return self.env_num

    @property
    def action_space(self) -> list[gym.Space]:
        return [self.single_action_space] * self.env_num

    @property
    def observation_space(self) -> list[gym.Space]:
        return [self.single_observation_space] * self.env_num

    def _rows(self, ids: int | Sequence[int] | np.ndarray | None) -> np.ndarray:
        if ids is None:
            return np.arange(self.env_num)
        rows = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= self.env_num):
            raise IndexError(f"env ids {rows.tolist()} outside 0..{self.env_num - 1}")
        if len(np.unique(rows)) != len(rows):
            raise ValueError(f"env ids must be distinct, got {rows.tolist()}")
        return rows

    def _infos(self, info: dict[str, Any], rows: np.ndarray) -> np.ndarray:
        self.last_info = info
        columns = {}
        for key in self.info_keys:
            present = info.get(f"_{key}", np.ones(self.env_num, dtype=bool))
            if key not in info or not np.all(np.asarray(present)[rows]):
                raise KeyError(f"info key {key!r} is missing for some of rows {rows.tolist()}")
            columns[key] = np.asarray(info[key])[rows]
        out = np.empty(len(rows), dtype=object)
        for j, row in enumerate(rows):
            out[j] = {"env_id": int(row), **{key: col[j] for key, col in columns.items()}}
        return out

    # --- Tianshou's vector-env API -------------------------------------------------------
    def reset(
        self, env_id: int | Sequence[int] | np.ndarray | None = None, **kwargs: Any
    ) -> tuple[Any, np.ndarray]:
        """Reset all rows (``env_id=None``) or only the named rows; return their first obs."""
        rows = self._rows(env_id)
        full = len(rows) == self.env_num
        seed, self._next_seed = self._next_seed, None
        if full:
            obs, info = self.env.reset(seed=seed, **kwargs)
        elif self.autoreset_mode == AutoresetMode.SAME_STEP and self._pending_obs is not None and (
            not np.any(self._needs_reset[rows])
        ):
            obs, info = self._pending_obs, self.last_info
        else:
            mask = np.zeros(self.env_num, dtype=bool)
            mask[rows] = True
            options = dict(kwargs.pop("options", None) or {})
            options["reset_mask"] = mask
            obs, info = self.env.reset(seed=seed, options=options, **kwargs)
        self._attached[rows] = True
        self._needs_reset[rows] = False
        return _to_batch(_select_rows(obs, rows)), self._infos(info, rows)

    def step(
        self,
        action: np.ndarray | torch.Tensor | None,
        id: int | Sequence[int] | np.ndarray | None = None,  # noqa: A002 - Tianshou's name
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step the whole batch with ``action`` for the named rows; return those rows' results."""
        if action is None:
            raise ValueError("action must not be None (this env is synchronous)")
        rows = self._rows(id)
        if not np.all(self._attached[rows]) or np.any(self._needs_reset[rows]):
            bad = rows[~self._attached[rows] | self._needs_reset[rows]]
            raise RuntimeError(
                f"rows {bad.tolist()} must be reset before they are stepped (their episode ended "
                "or they were left out of an earlier step)"
            )
        action = np.asarray(action.cpu() if isinstance(action, torch.Tensor) else action)
        if action.shape[0] != len(rows):
            raise ValueError(f"got {action.shape[0]} actions for {len(rows)} env ids")
        full_action = np.broadcast_to(
            self.idle_action, (self.env_num, *self.idle_action.shape)
        ).copy()
        full_action = full_action.astype(np.result_type(full_action, action))
        full_action[rows] = action
        left_out = np.ones(self.env_num, dtype=bool)
        left_out[rows] = False
        obs, reward, terminated, truncated, info = self.env.step(full_action)
        done = np.logical_or(terminated, truncated)
        self._attached &= ~left_out
        self._needs_reset |= done
        obs_next = obs
        if self.autoreset_mode == AutoresetMode.SAME_STEP and np.any(done):
            # The env already restarted finished rows: keep their first observation for
            # reset() and hand Tianshou the final one as obs_next.
            self._pending_obs = obs
            obs_next = copy.deepcopy(obs)
            finals = np.flatnonzero(done)
            final_obs = info["final_obs"]
            for row in finals:
                _assign_rows(obs_next, np.array([row]), final_obs[row])
        return (
            _to_batch(_select_rows(obs_next, rows)),
            np.asarray(reward, dtype=np.float64)[rows],
            np.asarray(terminated, dtype=bool)[rows],
            np.asarray(truncated, dtype=bool)[rows],
            self._infos(info, rows),
        )

    @property
    def saves_episodes(self) -> bool:
        """Whether the wrapped env can save and restore its in-flight episodes."""
        return hasattr(self.env, "episode_state") and hasattr(self.env, "load_episode_state")

    def episode_state(self) -> dict[str, Any] | None:
        """The wrapped env's :meth:`~vimo_env.gym_env.VideoLocatorsVectorEnv.episode_state`
        and this adapter's own bookkeeping; None when the env cannot save its episodes."""
        if not self.saves_episodes:
            return None
        return {"env": self.env.episode_state(), "attached": self._attached.copy(),
                "needs_reset": self._needs_reset.copy(), "next_seed": self._next_seed,
                "pending_obs": copy.deepcopy(self._pending_obs),
                "last_info": copy.deepcopy(self.last_info)}

    def same_device(self, state: dict[str, Any]) -> bool:
        """Whether :meth:`episode_state` ``state`` was saved on this env's device (random
        generator states do not move between devices)."""
        return state["env"]["core"].get("device") == str(self.env.core.device)

    def load_episode_state(self, state: dict[str, Any]) -> None:
        """Undo :meth:`episode_state`."""
        self.env.load_episode_state(state["env"])
        self._attached, self._needs_reset = state["attached"].copy(), state["needs_reset"].copy()
        self._next_seed = state["next_seed"]
        self._pending_obs = copy.deepcopy(state["pending_obs"])
        self.last_info = copy.deepcopy(state["last_info"])

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Seed the next full reset (the batched env has one generator for all rows)."""
        self._next_seed = seed
        self.single_action_space.seed(seed)
        return [seed] * self.env_num

    def render(self, **kwargs: Any) -> list[Any]:
        frames = self.env.render()
        return list(frames) if frames is not None else []

    def close(self) -> None:
        self.env.close()
