"""The PettingZoo front-end: conformance suites, determinism, infos, rendering, errors."""

from __future__ import annotations

import numpy as np
import pytest
from env_helpers import tiny_recognizer, write_tiny_h5
from pettingzoo.test import api_test, parallel_api_test, render_test, seed_test, state_test
from pettingzoo.utils.conversions import parallel_to_aec

import vimo_env

LENGTHS = [10, 7, 2, 1, 13, 4, 30, 25]


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "tiny.h5"
    splits = ["train"] * 6 + ["val"] * 2
    return write_tiny_h5(path, LENGTHS, splits=splits)


def make(h5, **kw):
    kw.setdefault("recognizer", tiny_recognizer(seed=1))
    kw.setdefault("device", "cpu")
    return vimo_env.parallel_env(features=h5, **kw)


def test_parallel_api(h5):
    parallel_api_test(make(h5, seed=0), num_cycles=50)


def test_aec_api_state_seed_render(h5):
    api_test(parallel_to_aec(make(h5, seed=0)), num_cycles=50)
    state_test(vimo_env.env(features=h5, recognizer=tiny_recognizer(), device="cpu", seed=0),
               make(h5, seed=0), num_cycles=20)
    seed_test(lambda: vimo_env.env(features=h5, device="cpu", seed=3,
                                   recognizer=tiny_recognizer()), num_cycles=30)
    render_test(lambda render_mode=None: vimo_env.env(
        features=h5, recognizer=tiny_recognizer(), device="cpu", seed=0,
        render_mode=render_mode))


def rollout(env, seed, episodes=6):
    """All observations, rewards and infos of a few episodes under seeded random actions."""
    rng = np.random.default_rng(seed)
    trace = []
    obs, infos = env.reset(seed=seed)
    for _ in range(episodes):
        trace.append(("reset", obs, infos))
        while env.agents:
            actions = {a: int(rng.integers(0, 4)) for a in env.agents}
            obs, rewards, terms, truncs, infos = env.step(actions)
            trace.append(("step", obs, rewards, terms, infos))
        obs, infos = env.reset()
    return trace


def test_multi_step_determinism(h5):
    a = rollout(make(h5, seed=7, recognizer=None), seed=7)
    b = rollout(make(h5, seed=7, recognizer=None), seed=7)
    c = rollout(make(h5, seed=8, recognizer=None), seed=8)
    assert repr(a) == repr(b)
    assert repr(a) != repr(c)


def test_spaces_flags_infos_and_episode(h5):
    env = make(h5, seed=0, frame_cost=0.05)
    assert env.possible_agents == ["locator_0", "locator_1", "locator_2"]
    assert env.observation_space("locator_1") is env.observation_space("locator_1")
    assert env.action_space("locator_0") is env.action_space("locator_0")
    obs, infos = env.reset(options={"video": 0})  # T = 10: positions 0, 3, 6
    assert [infos[a]["position"] for a in env.agents] == [0, 3, 6]
    assert all(infos[a]["frames"] == 1 for a in env.agents)
    p0 = infos["locator_0"]["p_gt"]
    total = 0.0
    obs, rewards, terms, truncs, infos = env.step({"locator_0": 0, "locator_1": 2,
                                                    "locator_2": 1})
    assert all(type(v) is bool for v in (*terms.values(), *truncs.values()))
    assert terms == {"locator_0": True, "locator_1": False, "locator_2": False}
    assert env.agents == ["locator_1", "locator_2"]
    assert len(set(rewards.values())) == 1
    total += rewards["locator_1"]
    for a, o in obs.items():
        assert o.dtype == np.float32 and env.observation_space(a).contains(o)
    assert infos["locator_1"]["position"] == 9 and infos["locator_2"]["position"] == 9
    obs, rewards, terms, truncs, infos = env.step({"locator_1": 3, "locator_2": 0})
    total += rewards["locator_1"]
    assert set(obs) == {"locator_1", "locator_2"} and env.agents == []
    ep = infos["locator_1"]["episode"]
    assert set(ep) >= {"video_id", "label", "frames", "frame_rate", "gflops", "scores",
                       "correct"}
    assert ep["video_id"] == "vid0" and ep["frames"] == 5
    assert ep["frame_rate"] == pytest.approx(0.5)
    assert infos["locator_2"]["trajectory"] == [6, 9]
    assert total == pytest.approx(ep["scores"][ep["label"]] - p0 - 0.05 * 2, abs=1e-5)
    assert env.state_space.contains(env.state())
    with pytest.raises(RuntimeError, match="ended"):
        env.step({"locator_0": 1})
    assert env.step({}) == ({}, {}, {}, {}, {})


@pytest.mark.parametrize("bad", [4, -1, 1.5, float("nan"), "1", [1, 2], True])
def test_invalid_actions_raise_naming_the_agent(h5, bad):
    env = make(h5, seed=0)
    env.reset()
    with pytest.raises(ValueError, match="locator_1"):
        env.step({"locator_0": 1, "locator_1": bad, "locator_2": 1})


def test_missing_and_unknown_agents(h5):
    env = make(h5, seed=0)
    env.reset()
    with pytest.raises(ValueError, match="locator_2"):
        env.step({"locator_0": 1, "locator_1": 1})
    with pytest.raises(ValueError, match="unknown"):
        env.step({"locator_0": 1, "locator_1": 1, "locator_2": 1, "locator_9": 0})


def test_split_and_sweep_sampler(h5):
    env = make(h5, split="val", sampler="sweep")
    seen = []
    for _ in range(4):
        env.reset()
        seen.append(env.source.video_ids[int(env.core.videos[0])])
    assert seen == ["vid6", "vid7", "vid6", "vid7"]


def test_render_modes(h5):
    env = make(h5, seed=0, render_mode="ansi")
    env.reset(options={"video": 0})
    env.step({"locator_0": 0, "locator_1": 1, "locator_2": 1})
    text = env.render()
    lines = text.splitlines()
    assert lines[1] == "locator_0 [|.........] p=0 n=1 stopped"
    assert lines[2] == "locator_1 [...*..>...] p=6 n=2 moving"
    assert lines[3] == "locator_2 [......*..>] p=9 n=2 moving"
    img = make(h5, seed=0, render_mode="rgb_array")
    img.reset()
    frame = img.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert (frame == np.array([220, 50, 40], np.uint8)).all(-1).any()  # moving locators drawn
    with pytest.raises(ValueError, match="render_mode"):
        make(h5, render_mode="video")
    # RLlib's PettingZoo wrapper passes the mode positionally: same picture, same text
    assert env.render("ansi") == text
    assert env.render("rgb_array").shape == frame.shape
    with pytest.raises(ValueError, match="render_mode must be one of"):
        env.render("video")


def test_recognizer_checkpoint_and_mismatch(h5, tmp_path):
    rec = tiny_recognizer(seed=2)
    rec.save(tmp_path / "rec.pt")
    a = make(h5, recognizer=tmp_path / "rec.pt", seed=0)
    b = make(h5, recognizer=rec, seed=0)
    oa, _ = a.reset(seed=1)
    ob, _ = b.reset(seed=1)
    np.testing.assert_allclose(oa["locator_0"], ob["locator_0"], atol=1e-6)
    with pytest.raises(ValueError, match="num_locators"):
        make(h5, recognizer=rec, num_locators=2)
    with pytest.raises(FileNotFoundError):
        make(h5, recognizer=tmp_path / "missing.pt")


def test_locator_credit_per_agent(h5):
    env = make(h5, seed=0, locator_credit=True)
    env.reset(seed=0)
    _, rewards, _, _, infos = env.step({"locator_0": 2, "locator_1": 0, "locator_2": 1})
    credit = env.core.credit[0].tolist()
    assert [infos[f"locator_{i}"]["locator_credit"] for i in range(3)] == credit
    assert credit[1] == 0.0 and credit[0] != 0.0
    assert "locator_credit" not in make(h5, seed=0).reset(seed=0)[1]["locator_0"]


def test_video_option_and_sizes_must_be_integers(h5):
    env = make(h5, seed=0)
    for bad in (1.5, 1.0, False):
        with pytest.raises(TypeError, match=r"options\['video'\] must be an integer"):
            env.reset(options={"video": bad})
    with pytest.raises(TypeError, match="stride must be an integer"):
        make(h5, stride=2.5)


def test_a_split_that_contradicts_the_source_object_is_refused(h5):
    from features.source import CachedFrameSource

    val = CachedFrameSource(h5, split="val", device="cpu")
    with pytest.raises(ValueError, match=r"split='train' contradicts .*'val'.*tiny\.h5"):
        vimo_env.parallel_env(features=val, recognizer=tiny_recognizer(), device="cpu")
    for split in ("val", None):  # agreeing or unspecified: the source as it is
        env = vimo_env.parallel_env(features=val, split=split, recognizer=tiny_recognizer(),
                                    device="cpu")
        assert env.source is val and env.source.num_videos == 2


def test_infos_carry_each_agents_action_mask(h5):
    env = make(h5, seed=0)
    _, infos = env.reset(options={"video": 0})  # T = 10, starts 0, 3, 6
    for info in infos.values():
        assert info["action_mask"].tolist() == [1, 1, 1, 1] and info["action_mask"].dtype == np.int8
    # locator_2 jumps to the last frame (6 + 9 -> 9): it may only stop now; locator_0 stops
    _, _, terms, _, infos = env.step({"locator_0": 0, "locator_1": 1, "locator_2": 3})
    assert infos["locator_0"]["action_mask"].tolist() == [1, 0, 0, 0] and terms["locator_0"]
    assert infos["locator_1"]["action_mask"].tolist() == [1, 1, 1, 1]
    assert infos["locator_2"]["position"] == 9
    assert infos["locator_2"]["action_mask"].tolist() == [1, 0, 0, 0]
    # the mask works as Gymnasium's sampling mask
    assert env.action_space("locator_2").sample(infos["locator_2"]["action_mask"]) == 0


def test_constructor_seed_fixes_the_action_spaces(h5):
    def samples(env):
        return [[env.action_space(a).sample() for a in env.possible_agents] for _ in range(10)]

    assert samples(make(h5, seed=4)) == samples(make(h5, seed=4))
    assert samples(make(h5, seed=4)) != samples(make(h5, seed=5))
    env = make(h5, seed=4)
    env.reset(seed=4)
    assert samples(env) == samples(make(h5, seed=4))  # the constructor seeds as reset(seed)
