"""RLlib on the PettingZoo front-end (optional extra ``vimo-env[rllib]``).

Skipped unless ``ray[rllib]`` is importable: RLlib pins an older gymnasium, so it runs in its
own environment (``pip install torch ray[rllib]`` then ``pip install -e . --no-deps`` plus
h5py, pettingzoo, scikit-learn and tqdm).
"""

from __future__ import annotations

import pytest

pytest.importorskip("ray.rllib")

import numpy as np  # noqa: E402
from ray.rllib.env.multi_agent_env import MultiAgentEnv  # noqa: E402
from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv  # noqa: E402

import vimo_env  # noqa: E402
from features.synthetic import generate  # noqa: E402

AGENTS = {"locator_0", "locator_1", "locator_2"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate("tiny", out=tmp_path_factory.mktemp("rllib") / "t.h5", seed=0,
                    progress=False)


def make_env(path) -> ParallelPettingZooEnv:
    return ParallelPettingZooEnv(
        vimo_env.parallel_env(features=path, split="train", seed=0, device="cpu"))


def test_wrapper_spaces(tiny):
    env = make_env(tiny)
    assert isinstance(env, MultiAgentEnv)
    assert set(env.possible_agents) == AGENTS
    assert set(env.observation_space.spaces) == AGENTS
    assert set(env.action_space.spaces) == AGENTS
    par = env.par_env
    for a in AGENTS:
        assert env.observation_space[a] == par.observation_space(a)
        assert env.action_space[a].n == 4


def test_random_episodes(tiny):
    env = make_env(tiny)
    obs_space, act_space = env.observation_space, env.action_space
    rng = np.random.default_rng(0)
    staggered = 0  # episodes where locators stopped at different steps
    for episode in range(8):
        obs, infos = env.reset(seed=episode if episode == 0 else None)
        assert set(obs) == AGENTS and set(infos) == AGENTS
        live = set(AGENTS)
        stop_step: dict[str, int] = {}
        ret, t = 0.0, 0
        while True:
            for a, o in obs.items():
                assert o.shape == obs_space[a].shape and o.dtype == np.float32
                assert obs_space[a].contains(o), (a, o)
            actions = {a: int(rng.integers(0, act_space[a].n)) for a in sorted(live)}
            obs, rewards, terms, truncs, infos = env.step(actions)
            t += 1
            assert "__all__" in terms and "__all__" in truncs
            agent_terms = {a: v for a, v in terms.items() if a != "__all__"}
            # Every agent that acted gets obs, reward, flags and info; no one else does.
            assert set(obs) == set(rewards) == set(agent_terms) == set(infos) == live
            assert set(truncs) - {"__all__"} == live
            assert not any(truncs.values())
            # The team reward is shared by every acting locator.
            values = set(rewards.values())
            assert len(values) == 1 and np.isfinite(next(iter(values)))
            ret += next(iter(values))
            assert terms["__all__"] == all(agent_terms.values())
            for a, done in agent_terms.items():
                if done:
                    stop_step[a] = t
            live = {a for a, done in agent_terms.items() if not done}
            assert set(env.par_env.agents) == live
            if terms["__all__"]:
                assert not live
                ep = next(iter(infos.values()))["episode"]
                assert ep["frames"] >= len(AGENTS) and np.isfinite(ret)
                break
            assert t < 100, "episode did not end"
        assert set(stop_step) == AGENTS
        staggered += len(set(stop_step.values())) > 1
    assert staggered > 0, "random locators never stopped at different times"
    # After the end an empty action dict is a no-op (not an error).
    out = env.step({})
    assert out[0] == {} and out[1] == {}
    env.close()


def test_ppo_one_iteration(tiny, tmp_path):
    """One PPO ``train()`` on the old API stack, a shared policy, no remote env runners."""
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    register_env("vimo_rllib_test", lambda cfg: make_env(cfg["path"]))
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir="/tmp/ray",
             ignore_reinit_error=True, log_to_driver=False)
    try:
        config = (
            PPOConfig()
            .api_stack(enable_rl_module_and_learner=False,
                       enable_env_runner_and_connector_v2=False)
            .environment("vimo_rllib_test", env_config={"path": str(tiny)})
            .framework("torch")
            .env_runners(num_env_runners=0, rollout_fragment_length=64)
            .training(train_batch_size=64, minibatch_size=32, num_epochs=1,
                      model={"fcnet_hiddens": [16]})
            .multi_agent(policies={"shared"},
                         policy_mapping_fn=lambda agent_id, *args, **kwargs: "shared")
            .resources(num_gpus=0)
            .debugging(seed=0)
        )
        algo = config.build()
        try:
            result = algo.train()
        finally:
            algo.stop()
    finally:
        ray.shutdown()
    assert result["training_iteration"] == 1
    steps = result.get("num_env_steps_sampled_lifetime",
                       result.get("num_env_steps_sampled", 0))
    assert steps >= 64
