"""A small coordination task with the exact observation/action format of ``VideoLocators-v0``.

Used to test the CTDE learner without videos or a recognizer. ``N`` locators start at cell 0 of a
track of ``T`` cells. Every episode hides ``N`` distinct "unit" cells in ``1..T-1``. Each step a
locator either stops (action 0) or jumps ``a`` cells forward (actions 1..3); it stops by itself
after ``max_moves`` moves or when asked to move from the last cell. The team is rewarded like ViMo
(Eq. 6): ``r_t = (P_t - P_{t-1}) - move_cost * moves_t`` with ``P_t`` the fraction of units
currently occupied by at least one locator, so the return is the final coverage minus the moves.

Solving it needs observation (the units move every episode) and coordination (locators that
see the same thing must still end on *distinct* units: coverage is 1/N if all pick the same).

Observation of locator ``i`` (float32): ``[unit flags (T), one-hot position (T), n_i/(m+1),
p_i/(T-1), t/m]`` - the same ``[h_i, n_i/(m+1), p_i/(T-1), t/m]`` layout as the video env.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

NUM_ACTIONS = 4


class UnitCoverageVectorEnv(VectorEnv):
    """Natively batched toy env: ``num_envs`` independent tracks stepped with array operations.

    Observation ``Dict({"observation": Box((N, 2T+3)), "alive": MultiBinary(N)})``, action
    ``MultiDiscrete([4]*N)``, team reward, terminated when every locator stopped, autoreset
    NEXT_STEP (as gymnasium's default), partial reset through ``options={"reset_mask": mask}``.
    ``info["coverage"]`` holds the current ``P_t`` of every row.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 8,
        *,
        num_locators: int = 3,
        track_length: int = 8,
        max_moves: int = 4,
        move_cost: float = 0.02,
        seed: int | None = None,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if track_length - 1 < num_locators:
            raise ValueError(
                f"track_length={track_length} leaves fewer than num_locators={num_locators} cells"
            )
        self.num_envs = num_envs
        self.num_locators = num_locators
        self.track_length = track_length
        self.max_moves = max_moves
        self.move_cost = move_cost
        self.obs_dim = 2 * track_length + 3
        self.single_observation_space = gym.spaces.Dict(
            {
                "observation": gym.spaces.Box(
                    0.0, 1.0, shape=(num_locators, self.obs_dim), dtype=np.float32
                ),
                "alive": gym.spaces.MultiBinary(num_locators),
            }
        )
        self.single_action_space = gym.spaces.MultiDiscrete([NUM_ACTIONS] * num_locators)
        self.observation_space = gym.vector.utils.batch_space(
            self.single_observation_space, num_envs
        )
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._rng = np.random.default_rng(seed)
        shape = (num_envs, num_locators)
        self.units = np.zeros((num_envs, track_length), dtype=bool)
        self.position = np.zeros(shape, dtype=np.int64)
        self.frames = np.ones(shape, dtype=np.int64)
        self.alive = np.ones(shape, dtype=bool)
        self.t = np.zeros(num_envs, dtype=np.int64)
        self.coverage = np.zeros(num_envs, dtype=np.float64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)

    def _restart(self, rows: np.ndarray) -> None:
        """Draw fresh units and put every locator of ``rows`` back on cell 0."""
        k = len(rows)
        scores = self._rng.random((k, self.track_length - 1))
        chosen = np.argsort(scores, axis=1)[:, : self.num_locators] + 1
        self.units[rows] = False
        self.units[rows[:, None], chosen] = True
        self.position[rows] = 0
        self.frames[rows] = 1
        self.alive[rows] = True
        self.t[rows] = 0
        self.coverage[rows] = self._coverage(rows)
        self._needs_reset[rows] = False

    def _coverage(self, rows: np.ndarray) -> np.ndarray:
        on_unit = np.take_along_axis(self.units[rows], self.position[rows], axis=1)
        occupied = np.zeros((len(rows), self.track_length), dtype=bool)
        np.put_along_axis(occupied, self.position[rows], on_unit, axis=1)
        return occupied.sum(axis=1) / self.num_locators

    def _observation(self) -> dict[str, np.ndarray]:
        b, n, length = self.num_envs, self.num_locators, self.track_length
        flags = np.broadcast_to(self.units[:, None, :], (b, n, length)).astype(np.float32)
        where = np.eye(length, dtype=np.float32)[self.position]
        scalars = np.stack(
            [
                self.frames / (self.max_moves + 1),
                self.position / (length - 1),
                np.broadcast_to((self.t / self.max_moves)[:, None], (b, n)),
            ],
            axis=-1,
        ).astype(np.float32)
        return {
            "observation": np.concatenate([flags, where, scalars], axis=-1),
            "alive": self.alive.astype(np.int8),
        }

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset all rows, or only those where ``options["reset_mask"]`` is true."""
        if seed is not None:
            if not isinstance(seed, int):
                raise ValueError(f"seed must be one int for the whole batch, got {seed!r}")
            self._rng = np.random.default_rng(seed)
        mask = np.ones(self.num_envs, dtype=bool)
        if options and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"])
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(
                    f"options['reset_mask'] must be a bool array of shape ({self.num_envs},), "
                    f"got dtype {mask.dtype} shape {mask.shape}"
                )
        self._restart(np.flatnonzero(mask))
        return self._observation(), {"coverage": self.coverage.copy()}

    def step(
        self, actions: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Move every alive locator of every row; rows done last step restart instead."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, self.num_locators):
            raise ValueError(
                f"actions must have shape ({self.num_envs}, {self.num_locators}), "
                f"got {actions.shape}"
            )
        if not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions must be integers in 0..3, got dtype {actions.dtype}")
        if actions.min() < 0 or actions.max() >= NUM_ACTIONS:
            raise ValueError(f"actions must lie in 0..3, got values {np.unique(actions)}")
        restarting = self._needs_reset.copy()
        stepping = ~restarting
        last_cell = self.track_length - 1
        # Stopped locators and restarting rows ignore their actions.
        live = self.alive & stepping[:, None]
        wants_move = live & (actions > 0)
        moves = wants_move & (self.position < last_cell)
        self.position = np.where(moves, np.minimum(self.position + actions, last_cell),
                                 self.position)
        self.frames += moves
        self.alive = live & moves & (self.frames <= self.max_moves)
        self.t += stepping
        previous = self.coverage.copy()
        self.coverage = np.where(stepping, self._coverage(np.arange(self.num_envs)), previous)
        reward = (self.coverage - previous) - self.move_cost * moves.sum(axis=1)
        reward = np.where(stepping, reward, 0.0)
        terminated = stepping & ~self.alive.any(axis=1)
        if restarting.any():
            self._restart(np.flatnonzero(restarting))
        self._needs_reset = terminated.copy()
        truncated = np.zeros(self.num_envs, dtype=bool)
        return (
            self._observation(),
            reward.astype(np.float64),
            terminated,
            truncated,
            {"coverage": self.coverage.copy()},
        )


def random_policy_coverage(env: UnitCoverageVectorEnv, episodes: int, seed: int = 0) -> float:
    """Mean final coverage of uniformly random actions (the baseline a learner must beat)."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    finals: list[float] = []
    while len(finals) < episodes:
        act = rng.integers(0, NUM_ACTIONS, size=(env.num_envs, env.num_locators))
        _, _, terminated, _, info = env.step(act)
        finals.extend(info["coverage"][terminated].tolist())
    return float(np.mean(finals[:episodes]))
