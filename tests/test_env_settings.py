"""EnvSettings: one settings object builds every front-end alike; keyword errors; validation."""

from __future__ import annotations

import dataclasses

import gymnasium
import numpy as np
import pytest
import torch
from env_helpers import tiny_recognizer, write_tiny_h5

import vimo_env
from vimo_env.gym_env import VideoLocatorsEnv, VideoLocatorsVectorEnv
from vimo_env.settings import EnvSettings, SettingsKeywords

LENGTHS = [10, 7, 2, 1, 13, 4, 30, 25]
G = "locators"


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    return write_tiny_h5(tmp_path_factory.mktemp("features") / "tiny.h5", LENGTHS)


def settings(h5, **kw) -> EnvSettings:
    base = dict(features=h5, recognizer=tiny_recognizer(seed=1), device="cpu", seed=0,
                sampler="sweep", max_moves=5, stride=2)
    base.update(kw)
    return EnvSettings(**base)


def test_every_front_end_from_one_settings_object(h5):
    """PettingZoo (parallel and AEC), Gymnasium (single and vector) and TorchRL built from the
    same EnvSettings keep it, agree on sizes and bounds, and see the same first observation
    and first step of video 0 (the sweep sampler starts the batched ones' row 0 there)."""
    pytest.importorskip("torchrl")
    s = settings(h5)
    par = vimo_env.parallel_env(settings=s)
    aec = vimo_env.env(settings=s)
    single = gymnasium.make("VideoLocators-v0", settings=s)
    venv = gymnasium.make_vec("VideoLocators-v0", num_envs=2,
                              vectorization_mode="vector_entry_point", settings=s)
    trl = vimo_env.torchrl_env(num_envs=2, settings=s)
    envs = {"parallel": par, "aec": aec.unwrapped, "single": single.unwrapped,
            "vector": venv.unwrapped, "torchrl": trl}
    for name, env in envs.items():
        assert env.settings is s, name
        assert (env.core.num_locators, env.core.max_moves, env.core.stride) == (3, 5, 2), name
    N, D = 3, envs["single"].core.obs_dim
    assert D == 8 + 3
    one = par.observation_space("locator_0")
    assert one.shape == (D,) and par.possible_agents == aec.possible_agents
    assert len(par.possible_agents) == N and par.state_space.shape == (N * D + N,)
    box = single.observation_space["observation"]
    assert box.shape == (N, D) and np.array_equal(box.low[1], one.low)
    assert single.action_space == gymnasium.spaces.MultiDiscrete([4] * N)
    assert venv.single_observation_space == single.observation_space
    assert venv.single_action_space == single.action_space
    spec = trl.observation_spec[G, "observation"]
    assert spec.shape == (2, N, D)
    assert np.array_equal(spec.space.low[0, 2].numpy(), one.low)
    assert trl.observation_spec["state"].shape == (2, N * D + N)
    assert trl.full_action_spec[G, "action"].shape == (2, N)

    first = {}
    obs, _ = par.reset(options={"video": 0})
    first["parallel"] = np.stack([obs[a] for a in par.possible_agents])
    aec.reset(options={"video": 0})
    first["aec"] = np.stack([aec.observe(a) for a in aec.possible_agents])
    first["single"] = single.reset(options={"video": 0})[0]["observation"]
    first["vector"] = venv.reset()[0]["observation"][0]
    td = trl.reset()
    first["torchrl"] = td[G, "observation"][0].numpy()
    for name, env in envs.items():
        assert int(env.core.videos[0]) == 0, name
        # batch-1 and batch-2 matmuls may differ in the last float32 bit
        np.testing.assert_allclose(first[name], first["parallel"], atol=1e-6, err_msg=name)
    assert np.abs(first["parallel"][:, :-3]).sum() > 0  # a real F_T embedding, not zeros

    # one joint step: same next observation and team reward
    joint = np.array([1, 2, 3])
    o_par, r_par, *_ = par.step({a: int(joint[i]) for i, a in enumerate(par.possible_agents)})
    r_par = r_par["locator_0"]  # the team reward, to every agent
    o_single, r_single, *_ = single.step(joint)
    o_vec, r_vec, *_ = venv.step(np.stack([joint, joint]))
    td.set((G, "action"), torch.as_tensor(np.stack([joint, joint])))
    out = trl.step(td)["next"]
    after = np.stack([o_par[a] for a in par.possible_agents])
    assert not np.array_equal(after, first["parallel"])
    for name, (o, r) in {"single": (o_single["observation"], r_single),
                         "vector": (o_vec["observation"][0], r_vec[0]),
                         "torchrl": (out[G, "observation"][0].numpy(),
                                     float(out[G, "reward"][0, 0, 0]))}.items():
        np.testing.assert_allclose(o, after, atol=1e-6, err_msg=name)
        assert r == pytest.approx(r_par, abs=1e-6), name


def test_settings_with_a_keyword_or_an_unknown_keyword_is_refused(h5):
    s = settings(h5)
    rec = tiny_recognizer(seed=1)
    builders = {
        "VideoLocatorsParallelEnv": vimo_env.parallel_env,
        "VideoLocatorsEnv": VideoLocatorsEnv,
        "VideoLocatorsVectorEnv": lambda *a, **k: VideoLocatorsVectorEnv(2, *a, **k),
    }
    for owner, build in builders.items():
        with pytest.raises(TypeError, match=rf"{owner}\(\) got settings= and also max_moves: "
                                            r"give one or the other \(dataclasses\.replace"):
            build(settings=s, max_moves=5)  # conflicting even when equal: one source of truth
        with pytest.raises(TypeError, match=r"got settings= and also features"):
            build(h5, settings=s)
        with pytest.raises(TypeError, match=rf"{owner}\(\) got an unexpected keyword argument "
                                            r"'max_move' \(did you mean 'max_moves'\?\); it "
                                            r"takes settings= or the EnvSettings keywords "
                                            r"features, recognizer, split, num_locators"):
            build(features=h5, recognizer=rec, max_move=5)
        with pytest.raises(TypeError, match="settings must be an EnvSettings, got dict"):
            build(settings={"max_moves": 5})
    # the vector env names its own keyword among the valid ones; so does gymnasium.make's path
    with pytest.raises(TypeError, match=r"'num_env' \(did you mean 'num_envs'\?\).*"
                                        r"plus its own num_envs"):
        VideoLocatorsVectorEnv(features=h5, recognizer=rec, num_env=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'seeds'"):
        gymnasium.make("VideoLocators-v0", features=h5, recognizer=rec, seeds=0)
    # replace() is the way to combine; positional features/recognizer still work
    env = vimo_env.parallel_env(settings=dataclasses.replace(s, num_locators=2,
                                                             recognizer=tiny_recognizer(
                                                                 locators=2)))
    assert env.possible_agents == ["locator_0", "locator_1"] and env.settings.max_moves == 5
    venv = VideoLocatorsVectorEnv(2, h5, rec, device="cpu", max_moves=3)
    assert venv.settings.features == h5 and venv.settings.recognizer is rec
    assert venv.core.max_moves == 3 and venv.num_envs == 2
    # the batched front-ends narrow render_mode after the settings' own check
    with pytest.raises(ValueError, match=r"render_mode must be one of \('ansi', 'rgb_array'\)"):
        VideoLocatorsVectorEnv(2, settings=dataclasses.replace(s, render_mode="human"))


def test_torchrl_keyword_errors(h5):
    pytest.importorskip("torchrl")
    s = settings(h5)
    with pytest.raises(TypeError, match=r"VideoLocatorsTorchRLEnv\(\) got settings= and also "
                                        r"seed, split"):
        vimo_env.torchrl_env(num_envs=2, settings=s, split="train", seed=1)
    with pytest.raises(TypeError, match=r"'strict_mask' \(did you mean 'strict_masks'\?\).*"
                                        r"plus its own num_envs, strict_masks, "
                                        r"update_spec_mask"):
        vimo_env.torchrl_env(features=h5, recognizer=tiny_recognizer(), strict_mask=True)
    env = vimo_env.torchrl_env(num_envs=2, settings=s, strict_masks=True)  # its own: fine
    assert env.strict_masks and env.settings is s


def test_settings_validation_names_the_field():
    with pytest.raises(TypeError, match=r"max_moves must be an integer, got 2\.9 \(float\)"):
        EnvSettings(max_moves=2.9)
    for field in ("num_locators", "stride"):
        with pytest.raises(TypeError, match=f"{field} must be an integer"):
            EnvSettings(**{field: 3.0})
        with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
            EnvSettings(**{field: 0})
    with pytest.raises(TypeError, match="seed must be an integer"):
        EnvSettings(seed=1.5)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        EnvSettings(seed=-1)
    with pytest.raises(ValueError, match="frame_cost must be finite, got nan"):
        EnvSettings(frame_cost=float("nan"))
    with pytest.raises(ValueError, match=r"sampler must be one of \('random', 'sweep'\), "
                                         "got 'shuffle'"):
        EnvSettings(sampler="shuffle")
    with pytest.raises(ValueError, match="render_mode must be one of"):
        EnvSettings(render_mode="video")
    with pytest.raises(ValueError, match="locator_credit needs compute_rewards=True"):
        EnvSettings(locator_credit=True, compute_rewards=False)
    # numpy integers are taken as ints; the object is frozen
    s = EnvSettings(max_moves=np.int64(6), seed=np.int32(3), frame_cost=np.float32(0.5))
    assert (s.max_moves, s.seed, s.frame_cost) == (6, 3, 0.5)
    assert type(s.max_moves) is int and type(s.seed) is int and type(s.frame_cost) is float
    assert s == EnvSettings(max_moves=6, seed=3, frame_cost=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_moves = 2  # type: ignore[misc]
    assert EnvSettings(frame_cost=-0.1).frame_cost == -0.1  # the core accepts any finite cost


def test_the_typed_keywords_mirror_the_settings_fields():
    """``SettingsKeywords`` (the front-ends' ``**keywords`` type) lists EnvSettings' fields
    but the two named parameters, in the same order."""
    assert ("features", "recognizer", *SettingsKeywords.__annotations__) == \
        EnvSettings.keywords()
