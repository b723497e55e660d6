"""The Tianshou adapter: stock Collector over every row of a batched gymnasium VectorEnv."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from tianshou.data import Batch, Collector, VectorReplayBuffer

from agents.tianshou_env import TianshouVectorEnvAdapter
from agents.toy import UnitCoverageVectorEnv


class CountingToy(UnitCoverageVectorEnv):
    """The toy env counting how often the batched step is called."""

    step_calls = 0

    def step(self, actions):
        self.step_calls += 1
        return super().step(actions)


def _collector(env, size=4000):
    from agents.ctde_sac import SACConfig, build_ctde_sac

    adapter = env if isinstance(env, TianshouVectorEnvAdapter) else TianshouVectorEnvAdapter(env)
    algo = build_ctde_sac(env.obs_dim, env.num_locators,
                          SACConfig(actor_hidden=(16,), critic_hidden=(16,)))
    return adapter, Collector(algo, adapter, VectorReplayBuffer(size, len(adapter)),
                              raise_on_nan_in_buffer=False)


def _check_transitions_chain(buffer: VectorReplayBuffer, key=None) -> int:
    """Within each episode, obs_next of step t equals obs of step t+1. Returns #checked."""
    checked = 0
    for sub in buffer.buffers:
        n = len(sub)
        for i in range(n - 1):
            if sub.done[i]:
                continue
            a = sub.obs_next[i] if key is None else sub.obs_next[i][key]
            b = sub.obs[i + 1] if key is None else sub.obs[i + 1][key]
            assert np.array_equal(a, b), i
            checked += 1
    return checked


def test_collector_steps_all_rows_in_one_call_and_chains_transitions():
    env = CountingToy(8, seed=0)
    adapter, collector = _collector(env)
    collector.reset()
    stats = collector.collect(n_step=8 * 30)
    assert env.step_calls == 30  # all 8 rows per batched step
    assert stats.n_collected_steps == 240 and stats.n_collected_episodes > 0
    buf = collector.buffer
    assert len(buf) == 240
    data = buf[buf.sample_indices(0)]
    assert data.obs.observation.shape == (240, 3, env.obs_dim) and data.obs.alive.shape == (240, 3)
    assert _check_transitions_chain(buf, "observation") > 100
    # every episode starts with all locators alive at cell 0 and ends with none alive
    for sub in buf.buffers:
        done = sub.done[: len(sub)]
        starts = np.flatnonzero(np.r_[True, done[:-1]])
        assert np.all(sub.obs.alive[starts] == 1)
        assert np.all(sub.obs_next.alive[: len(sub)][done] == 0)
    # stopped locators act 0 (the env ignores them anyway)
    assert np.all(data.act[data.obs.alive == 0] == 0)


def test_partial_reset_touches_only_named_rows():
    env = UnitCoverageVectorEnv(4, seed=1)
    adapter = TianshouVectorEnvAdapter(env, info_keys=("coverage",))
    obs, info = adapter.reset()
    assert isinstance(obs, Batch) and obs.observation.shape == (4, 3, env.obs_dim)
    assert [i["env_id"] for i in info] == [0, 1, 2, 3] and "coverage" in info[0]
    adapter.step(np.ones((4, 3), dtype=np.int64))
    before = env.position.copy()
    obs2, info2 = adapter.reset(env_id=[2])
    assert obs2.observation.shape == (1, 3, env.obs_dim) and info2[0]["env_id"] == 2
    assert np.all(env.position[2] == 0)
    assert np.array_equal(env.position[[0, 1, 3]], before[[0, 1, 3]])


def test_subset_step_detaches_left_out_rows():
    env = UnitCoverageVectorEnv(3, seed=2)
    adapter = TianshouVectorEnvAdapter(env)
    adapter.reset()
    out = adapter.step(np.ones((2, 3), dtype=np.int64), id=[0, 2])
    assert out[0].observation.shape[0] == 2 and len(out[1]) == 2
    assert out[4][1]["env_id"] == 2
    with pytest.raises(RuntimeError, match=r"rows \[1\]"):
        adapter.step(np.ones((3, 3), dtype=np.int64))
    adapter.reset(env_id=1)
    adapter.step(np.ones((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="2 actions for 3"):
        adapter.step(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(IndexError, match="outside"):
        adapter.reset(env_id=[5])


def test_collect_n_episodes_with_surplus_rows():
    env = UnitCoverageVectorEnv(8, seed=3)
    _, collector = _collector(env)
    collector.reset()
    stats = collector.collect(n_episode=13)
    assert stats.n_collected_episodes == 13
    assert _check_transitions_chain(collector.buffer, "observation") > 0
    # after an n_episode collect the Collector resets everything; n_step goes on cleanly
    collector.collect(n_step=16)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_generic_gymnasium_vector_env(mode):
    """A stock SyncVectorEnv (CartPole): reward 1 per step, so return == length."""
    venv = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 4,
                                    autoreset_mode=mode)
    adapter = TianshouVectorEnvAdapter(venv, seed=0)
    obs, _ = adapter.reset()
    rng = np.random.default_rng(0)
    lengths = np.zeros(4, dtype=int)
    prev = obs.copy()
    finished = 0
    for _ in range(300):
        obs_next, rew, term, trunc, info = adapter.step(rng.integers(0, 2, 4))
        assert np.all(rew == 1.0)
        lengths += 1
        done = np.flatnonzero(term | trunc)
        # obs_next of a finished row is its final state, not the next episode's start
        final = obs_next[done]
        assert np.all((np.abs(final[:, 2]) > 0.2) | (np.abs(final[:, 0]) > 2.3))
        if len(done):
            reset_obs, _ = adapter.reset(env_id=done)
            assert np.all(np.abs(reset_obs) <= 0.05)
            obs_next[done] = reset_obs
            lengths[done] = 0
            finished += len(done)
        prev = obs_next
    assert finished > 10 and prev.shape == (4, 4)
