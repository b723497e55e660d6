"""The Gymnasium front-ends: env checkers, SB3 PPO, the native vector env and its autoreset."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from env_helpers import tiny_recognizer, write_tiny_h5
from gymnasium.utils.env_checker import check_env

import vimo_env  # noqa: F401 - the import registers VideoLocators-v0
from vimo_env.gym_env import VideoLocatorsEnv, VideoLocatorsVectorEnv

LENGTHS = [10, 7, 2, 1, 13, 4, 30, 25]


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    return write_tiny_h5(tmp_path_factory.mktemp("features") / "tiny.h5", LENGTHS)


def kwargs(h5, **kw):
    base = dict(features=h5, recognizer=tiny_recognizer(seed=1), device="cpu", seed=0)
    base.update(kw)
    return base


def test_registered_and_gymnasium_check_env(h5):
    assert "VideoLocators-v0" in gymnasium.registry
    env = gymnasium.make("VideoLocators-v0", **kwargs(h5))
    check_env(env.unwrapped)
    assert env.observation_space["observation"].shape == (3, 8 + 3)
    assert env.action_space == gymnasium.spaces.MultiDiscrete([4, 4, 4])


def test_sb3_check_env_and_ppo(h5):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env as sb3_check_env
    from stable_baselines3.common.env_util import make_vec_env

    sb3_check_env(VideoLocatorsEnv(**kwargs(h5)), warn=False)
    venv = make_vec_env(VideoLocatorsEnv, n_envs=2, seed=0, env_kwargs=kwargs(h5))
    model = PPO("MultiInputPolicy", venv, n_steps=64, batch_size=32, n_epochs=1, seed=0,
                device="cpu", policy_kwargs=dict(net_arch=[16]))
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    assert len(model.ep_info_buffer) > 0  # episodes finished and were logged


def test_joint_env_episode(h5):
    env = VideoLocatorsEnv(**kwargs(h5, frame_cost=0.1))
    obs, info = env.reset(options={"video": 0})  # T = 10
    assert info["position"].tolist() == [0, 3, 6]
    p0 = info["p_gt"]
    obs, r1, term, trunc, info = env.step(np.array([0, 1, 3]))
    assert (term, trunc) == (False, False)
    assert obs["alive"].tolist() == [0, 1, 1] and obs["alive"].dtype == np.int8
    assert info["position"].tolist() == [0, 6, 9]
    obs, r2, term, trunc, info = env.step(np.array([3, 0, 2]))  # dead locator 0: ignored
    assert term is True and info["position"].tolist() == [0, 6, 9]
    ep = info["vimo_episode"]
    assert ep["frames"] == 5 and ep["l"] == 2
    assert ep["r"] == pytest.approx(r1 + r2)
    assert r1 + r2 == pytest.approx(ep["scores"][ep["label"]] - p0 - 0.1 * 2, abs=1e-5)
    with pytest.raises(RuntimeError, match="ended"):
        env.step(np.array([1, 1, 1]))
    env.reset()
    for bad in ([1, 1], [1, 1, 4], [1.5, 1, 1], [np.nan, 1, 1]):
        with pytest.raises(ValueError):
            env.step(np.array(bad))


def test_make_vec_native_and_autoreset_next_step(h5):
    B = 5
    venv = gymnasium.make_vec("VideoLocators-v0", num_envs=B,
                              vectorization_mode="vector_entry_point", **kwargs(h5))
    assert isinstance(venv.unwrapped, VideoLocatorsVectorEnv)
    assert venv.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
    assert venv.single_action_space == gymnasium.spaces.MultiDiscrete([4, 4, 4])
    obs, info = venv.reset(seed=3)
    assert obs["observation"].shape == (B, 3, 11) and venv.observation_space.contains(obs)
    rng = np.random.default_rng(0)
    prev_done = np.zeros(B, dtype=bool)
    returns = np.zeros(B)
    finished = 0
    for _ in range(40):
        actions = rng.integers(0, 4, size=(B, 3))
        obs, rew, term, trunc, info = venv.step(actions)
        assert venv.observation_space.contains(obs)
        assert not trunc.any()
        # rows that ended last step were reset now: fresh episode, reward 0, not terminated
        assert (rew[prev_done] == 0).all() and not term[prev_done].any()
        assert (info["frames"][prev_done] == 1).all()
        assert (obs["observation"][prev_done][:, :, -1] == 0).all()  # step counter t/m = 0
        assert obs["alive"][prev_done].all()
        returns[~prev_done] += rew[~prev_done]
        if term.any():
            assert info["_vimo_episode"].tolist() == term.tolist()
            np.testing.assert_allclose(info["vimo_episode"]["r"][term], returns[term])
            assert (info["vimo_episode"]["frames"][term] >= 3).all()
            assert all(v.startswith("vid") for v in info["vimo_episode"]["video_id"][term])
            finished += int(term.sum())
        returns[term] = 0.0
        returns[prev_done] = rew[prev_done]
        prev_done = term
    assert finished >= B


def test_vector_env_matches_single_env(h5):
    """Row b of the vector env replays exactly what a B=1 env does on the same video."""
    B = 4
    venv = VideoLocatorsVectorEnv(num_envs=B, **kwargs(h5, sampler="sweep"))
    obs, _ = venv.reset()
    videos = venv.core.videos.tolist()
    singles = [VideoLocatorsEnv(**kwargs(h5)) for _ in range(B)]
    single_obs = [s.reset(options={"video": v})[0] for s, v in zip(singles, videos, strict=True)]
    for b in range(B):
        np.testing.assert_allclose(obs["observation"][b], single_obs[b]["observation"],
                                   atol=1e-6)
    rng = np.random.default_rng(1)
    for _ in range(3):
        actions = rng.integers(1, 4, size=(B, 3))
        obs, rew, term, _, _ = venv.step(actions)
        for b, s in enumerate(singles):
            if s.core.done[0]:
                continue
            o, r, t, _, _ = s.step(actions[b])
            assert r == pytest.approx(rew[b], abs=1e-6) and t == term[b]
            np.testing.assert_allclose(obs["observation"][b], o["observation"], atol=1e-6)


def test_vector_env_rejects_bad_actions(h5):
    venv = VideoLocatorsVectorEnv(num_envs=3, **kwargs(h5))
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        venv.step(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="0..3"):
        venv.step(np.full((3, 3), 5))
    with pytest.raises(ValueError, match="NaN"):
        venv.step(np.full((3, 3), np.nan))


def test_vector_env_seed_determinism(h5):
    def run(seed):
        venv = VideoLocatorsVectorEnv(num_envs=4, **kwargs(h5))
        obs, _ = venv.reset(seed=seed)
        out = [obs["observation"]]
        rng = np.random.default_rng(seed)
        for _ in range(10):
            obs, rew, *_ = venv.step(rng.integers(0, 4, size=(4, 3)))
            out += [obs["observation"], rew]
        return out

    a, b = run(5), run(5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, run(6), strict=True))


def test_lean_vector_env_rewards_are_frame_costs(h5):
    venv = VideoLocatorsVectorEnv(num_envs=4, **kwargs(h5, compute_rewards=False,
                                                        frame_cost=0.25))
    venv.reset(seed=0)
    frames_before = venv.core.frames_observed.sum(1).clone()
    _, rew, term, _, info = venv.step(np.ones((4, 3), dtype=np.int64))
    new = venv.core.frames_observed.sum(1) - frames_before
    np.testing.assert_allclose(rew, -0.25 * new.numpy())
    # P_t is only computed when an episode ends
    assert np.isnan(info["p_gt"][~term]).all() and np.isfinite(info["p_gt"][term]).all()


def test_vector_env_partial_reset_mask(h5):
    """``options={"reset_mask": m}`` restarts only masked rows and cancels their autoreset."""
    B = 4
    venv = VideoLocatorsVectorEnv(num_envs=B, **kwargs(h5))
    venv.reset(seed=0)
    obs, _, term, _, info = venv.step(np.zeros((B, 3), dtype=np.int64))  # all stop: all end
    assert term.all()
    mask = np.array([True, False, True, False])
    obs, info = venv.reset(options={"reset_mask": mask})
    assert (info["frames"][mask] == 1).all() and obs["alive"][mask].all()
    # masked rows step on as fresh episodes; unmasked rows still autoreset this step
    obs, rew, term, _, info = venv.step(np.ones((B, 3), dtype=np.int64))
    step_counter = obs["observation"][:, 0, -1]  # t / m
    np.testing.assert_allclose(step_counter[mask], 1 / 4)
    assert (step_counter[~mask] == 0).all() and (rew[~mask] == 0).all()
    assert (info["frames"][~mask] == 1).all()
    with pytest.raises(ValueError, match="reset_mask"):
        venv.reset(options={"reset_mask": np.ones(B + 1, dtype=bool)})


def test_tianshou_collector_on_video_locators(h5):
    """Tianshou's stock Collector gathers whole episodes from the batched env via the adapter."""
    from tianshou.data import Collector, VectorReplayBuffer

    from agents.ctde_sac import SACConfig, build_ctde_sac
    from agents.tianshou_env import TianshouVectorEnvAdapter

    B = 4
    venv = VideoLocatorsVectorEnv(num_envs=B, **kwargs(h5))
    adapter = TianshouVectorEnvAdapter(venv)
    obs_dim = venv.single_observation_space["observation"].shape[1]
    config = SACConfig(actor_hidden=(32,), critic_hidden=(32,), seed=0, device="cpu")
    algorithm = build_ctde_sac(obs_dim, 3, config)
    collector = Collector(algorithm, adapter, VectorReplayBuffer(256, B),
                          raise_on_nan_in_buffer=False)
    collector.reset()
    stats = collector.collect(n_step=40)
    assert stats.n_collected_steps == 40
    assert stats.n_collected_episodes >= B  # episodes last at most m + 1 = 5 steps
    # every stored episode starts with all locators alive and one frame each
    buf = collector.buffer
    assert len(buf) == 40 and np.isfinite(buf.rew[:40]).all()


def test_locator_credit_info_in_every_gymnasium_front_end(h5):
    """``locator_credit=True``: info["locator_credit"] holds the core's per-locator difference
    rewards; the vector env's rows agree with B=1 envs on the same videos; 0 after a reset."""
    B = 4
    venv = VideoLocatorsVectorEnv(num_envs=B, **kwargs(h5, sampler="sweep", locator_credit=True))
    _, info = venv.reset()
    assert info["locator_credit"].shape == (B, 3) and not info["locator_credit"].any()
    videos = venv.core.videos.tolist()
    singles = [VideoLocatorsEnv(**kwargs(h5, locator_credit=True)) for _ in range(B)]
    for s, v in zip(singles, videos, strict=True):
        s.reset(options={"video": v})
    actions = np.array([[1, 2, 3], [3, 0, 1], [2, 2, 2], [1, 1, 0]])
    _, rew, _, _, info = venv.step(actions)
    np.testing.assert_allclose(info["locator_credit"], venv.core.credit.numpy())
    assert np.count_nonzero(info["locator_credit"]) > 0
    for b, s in enumerate(singles):
        _, r, _, _, single_info = s.step(actions[b])
        np.testing.assert_allclose(single_info["locator_credit"], info["locator_credit"][b],
                                   atol=1e-6)
    assert "locator_credit" not in VideoLocatorsVectorEnv(num_envs=2, **kwargs(h5)).reset()[1]


def test_integer_arguments_are_never_truncated(h5):
    """num_envs=2.9 or options={"video": 1.5} used to be truncated by int()."""
    with pytest.raises(TypeError, match="num_envs must be an integer"):
        VideoLocatorsVectorEnv(num_envs=2.9, **kwargs(h5))
    with pytest.raises(TypeError, match="max_moves must be an integer"):
        VideoLocatorsEnv(**kwargs(h5, max_moves=2.9))
    env = VideoLocatorsEnv(**kwargs(h5))
    for bad in (1.5, 2.0, True, "1"):
        with pytest.raises(TypeError, match=r"options\['video'\] must be an integer"):
            env.reset(options={"video": bad})
    _, info = env.reset(options={"video": np.int64(1)})
    assert info["position"].tolist() == [0, 2, 4]  # video 1 has 7 frames


def test_gymnasium_and_sb3_episode_wrappers_work_unchanged(h5):
    """RecordEpisodeStatistics (single and vector) and SB3's Monitor own info["episode"]; our
    statistics live under info["vimo_episode"] next to theirs."""
    from gymnasium.wrappers import RecordEpisodeStatistics
    from gymnasium.wrappers.vector import RecordEpisodeStatistics as RecordVectorStatistics
    from stable_baselines3.common.env_util import make_vec_env

    env = RecordEpisodeStatistics(VideoLocatorsEnv(**kwargs(h5)))
    env.reset(seed=0)
    total, terminated, steps = 0.0, False, 0
    while not terminated:
        _, reward, terminated, _, info = env.step(np.array([1, 2, 1]))
        total, steps = total + reward, steps + 1
    assert info["episode"]["r"] == pytest.approx(total) and info["episode"]["l"] == steps
    assert info["vimo_episode"]["r"] == pytest.approx(total)
    assert info["vimo_episode"]["frames"] == int(info["frames"].sum())

    venv = RecordVectorStatistics(gymnasium.make_vec(
        "VideoLocators-v0", num_envs=3, vectorization_mode="vector_entry_point", **kwargs(h5)))
    venv.reset(seed=0)
    seen = 0
    for _ in range(12):
        _, _, term, _, info = venv.step(np.ones((3, 3), dtype=np.int64))
        if term.any():
            assert info["_episode"].tolist() == term.tolist()
            assert info["_vimo_episode"].tolist() == term.tolist()
            np.testing.assert_allclose(info["episode"]["r"][term],
                                       info["vimo_episode"]["r"][term], rtol=1e-6)
            seen += int(term.sum())
    assert seen >= 3

    sb3 = make_vec_env(VideoLocatorsEnv, n_envs=2, seed=0, env_kwargs=kwargs(h5))  # + Monitor
    sb3.reset()
    found = []
    for _ in range(12):
        _, rewards, dones, infos = sb3.step(np.ones((2, 3), dtype=np.int64))
        found += [info for info, done in zip(infos, dones, strict=True) if done]
    assert found
    for info in found:
        assert set(info["episode"]) == {"r", "l", "t"}  # Monitor's own
        assert info["episode"]["r"] == pytest.approx(info["vimo_episode"]["r"], rel=1e-5)
        assert info["episode"]["l"] == info["vimo_episode"]["l"]
        assert info["vimo_episode"]["video_id"].startswith("vid")


def test_observations_carry_the_action_mask(h5):
    env = VideoLocatorsEnv(**kwargs(h5))
    obs, _ = env.reset(options={"video": 3})  # T = 1: every locator is on the last frame
    assert env.observation_space.contains(obs) and obs["action_mask"].shape == (3, 4)
    assert obs["action_mask"].tolist() == [[1, 0, 0, 0]] * 3
    assert env.action_masks().tolist() == [True, False, False, False] * 3
    obs, _ = env.reset(options={"video": 0})
    obs, *_ = env.step(np.array([0, 1, 3]))  # 0 stops, 2 lands on the last frame
    assert obs["action_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert env.action_masks().tolist() == obs["action_mask"].reshape(-1).astype(bool).tolist()
    venv = VideoLocatorsVectorEnv(num_envs=4, **kwargs(h5, sampler="sweep"))
    obs, _ = venv.reset()
    assert venv.observation_space.contains(obs) and obs["action_mask"].shape == (4, 3, 4)
    assert obs["action_mask"][3].tolist() == [[1, 0, 0, 0]] * 3  # row 3 plays video 3 (T = 1)
    assert venv.action_masks().shape == (4, 12)


def test_maskable_ppo_only_takes_legal_actions(h5):
    """A masked learner (sb3-contrib MaskablePPO) trains on the env's action_masks() and never
    picks an illegal action; the evaluation harness passes it the masks too."""
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from agents.evaluate import evaluate_policy
    from features.source import CachedFrameSource

    env = VideoLocatorsEnv(**kwargs(h5))
    model = sb3_contrib.MaskablePPO("MultiInputPolicy", env, n_steps=32, batch_size=32,
                                    n_epochs=1, seed=0, device="cpu",
                                    policy_kwargs=dict(net_arch=[16]))
    model.learn(total_timesteps=64)
    checked = 0
    for video in range(len(LENGTHS)):
        obs, _ = env.reset(options={"video": video})
        terminated = False
        while not terminated:
            mask = env.action_masks().reshape(3, 4)
            action, _ = model.predict(obs, action_masks=env.action_masks(), deterministic=False)
            assert mask[np.arange(3), action].all()
            checked += int((~mask[:, 1:]).all(1).sum())  # locators that could only stop
            obs, _, terminated, _, _ = env.step(action)
    assert checked > 0
    source = CachedFrameSource(h5, split="train", device="cpu")
    result = evaluate_policy(model, source, env.core.recognizer)
    assert 3 <= result.frames_per_video <= 15


def test_seed_fixes_the_action_spaces_too(h5):
    """seed= (constructor) and reset(seed=) seed action_space.sample() as well."""
    def samples(env, count=8):
        return [env.action_space.sample().tolist() for _ in range(count)]

    a, b = VideoLocatorsEnv(**kwargs(h5, seed=5)), VideoLocatorsEnv(**kwargs(h5, seed=5))
    assert samples(a) == samples(b)
    assert samples(VideoLocatorsEnv(**kwargs(h5, seed=6))) != samples(
        VideoLocatorsEnv(**kwargs(h5, seed=5)))
    a.reset(seed=9)
    b.reset(seed=9)
    first = samples(a)
    assert samples(b) == first
    a.reset(seed=9)
    assert samples(a) == first  # reset(seed) restarts the action stream
    va = VideoLocatorsVectorEnv(num_envs=3, **kwargs(h5, seed=5))
    vb = VideoLocatorsVectorEnv(num_envs=3, **kwargs(h5, seed=5))
    assert samples(va) == samples(vb)
    assert [va.single_action_space.sample().tolist() for _ in range(4)] == [
        vb.single_action_space.sample().tolist() for _ in range(4)]


def test_vector_env_takes_torch_actions_and_returns_the_same(h5):
    """Actions as a torch tensor (a policy on the device) give exactly what numpy actions give;
    observations, infos and rewards come back as numpy, typed as before."""
    import torch

    def rollout(as_tensor):
        venv = VideoLocatorsVectorEnv(num_envs=5, **kwargs(h5, locator_credit=True))
        obs, info = venv.reset(seed=4)
        rng = np.random.default_rng(2)
        seen = [obs, info]
        for _ in range(12):
            actions = rng.integers(0, 4, size=(5, 3))
            step = venv.step(torch.as_tensor(actions) if as_tensor else actions)
            seen.append(step)
        return seen

    a, b = rollout(False), rollout(True)
    for x, y in zip(a[2:], b[2:], strict=True):
        np.testing.assert_array_equal(x[0]["observation"], y[0]["observation"])
        np.testing.assert_array_equal(x[1], y[1])
        np.testing.assert_array_equal(x[2], y[2])
        assert x[1].dtype == np.float64 and x[2].dtype == np.bool_
        assert y[0]["action_mask"].dtype == np.int8 and y[4]["position"].dtype == np.int64
        np.testing.assert_array_equal(x[4]["locator_credit"], y[4]["locator_credit"])
