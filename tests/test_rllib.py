"""RLlib on the locators: the PettingZoo wrapper, and ``agents.rllib_ppo`` (multi-agent PPO on
the new API stack with parallel EnvRunners, action masking, a centralized critic option).

``ray[rllib]`` is part of the dev install (``make test``): a missing Ray fails here, it does not
skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np  # noqa: E402
import pytest
import torch  # noqa: E402
from ray.rllib.env.multi_agent_env import MultiAgentEnv  # noqa: E402
from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv  # noqa: E402

import vimo_env  # noqa: E402
from agents import rllib_ppo  # noqa: E402
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


# ---------------------------------------------------------------- agents.rllib_ppo
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli_run(tiny, tmp_path_factory):
    """``python -m agents.rllib_ppo`` on tiny: Stage I (tiny budget, cached under OUT), shared
    PPO with 2 EnvRunner processes on a fresh local Ray cluster, test-split evaluation.

    A subprocess with a fixed hash seed (bitwise reproducible) and HOME pointing at an empty
    folder, to see what Ray and RLlib write there."""
    out = tmp_path_factory.mktemp("ppo_cli")
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "agents.rllib_ppo", "--dataset", str(tiny), "--out", str(out),
         "--budget", "tiny", "--stage1-steps", "100", "--env-runners", "2", "--iterations", "3",
         "--train-batch-size", "512", "--minibatch-size", "128", "--seed", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "rllib_ppo.json").read_text())
    return {"out": out, "home": home, "payload": payload, "stdout": proc.stdout}


def held_out(make_policy, seeds, tiny, recognizer_path, frame_cost) -> tuple[float, float]:
    """(team objective, mAP) of ``make_policy(seed)`` pooled over the val and test splits (46
    videos), averaged over ``seeds``."""
    from agents.metrics import mean_average_precision
    from features.source import CachedFrameSource
    from vimo_env.recognizer import Recognizer

    recognizer = Recognizer.load(recognizer_path).eval()
    objective, mAP = [], []
    for seed in seeds:
        scores, labels, total = [], [], 0.0
        for split in ("val", "test"):
            source = CachedFrameSource(tiny, split=split, device="cpu")
            result = rllib_ppo.evaluate_policy(make_policy(seed), source, recognizer,
                                               keep_trajectories=False)
            total += source.num_videos * rllib_ppo.team_objective(result, source.labels,
                                                                  frame_cost)
            scores.append(result.scores)
            labels.append(np.asarray(source.labels))
        objective.append(total / sum(len(x) for x in labels))
        mAP.append(mean_average_precision(np.concatenate(scores), np.concatenate(labels)))
    return float(np.mean(objective)), float(np.mean(mAP))


def test_ppo_learns_above_random_with_two_env_runners(cli_run, tiny):
    payload = cli_run["payload"]
    rows = {r["name"]: r for r in payload["test"]}
    assert set(rows) == {"rllib-ppo", "random"}
    assert rows["rllib-ppo"]["team_objective"] > rows["random"]["team_objective"], rows
    # training made progress: its own (stochastic) team return went up from the first
    # iteration's, whose near-uniform initial policy is about the random policy
    returns = [h["team_return"] for h in payload["training"]]
    assert len(returns) == 3 and returns[-1] > returns[0] + 0.01, returns
    assert payload["training"][-1]["env_steps"] >= 3 * 512
    assert payload["args"]["env_runners"] == 2
    # the saved policy (RLlib checkpoints) against the random policy on the 46 held-out
    # videos (val + test; 26 test videos alone make a noisy mAP): the team objective (mean
    # final P(true class) - lambda * frames, the team return up to constants) and mAP
    frame_cost = payload["frame_cost"]
    assert frame_cost > 0  # Stage I's data-derived lambda
    checkpoint = cli_run["out"] / "recognizer" / "stage1" / "stage1_selected.pt"
    policy = rllib_ppo.RLlibLocatorPolicy.load(cli_run["out"] / "policy")
    assert set(policy.actors) == {"shared"}
    trained = held_out(lambda seed: policy, [0], tiny, checkpoint, frame_cost)
    rand = held_out(rllib_ppo.random_policy, [0, 1, 2], tiny, checkpoint, frame_cost)
    # the objective is what PPO optimizes (0.439 against 0.406 here); held-out mAP after
    # three iterations is too noisy to assert on (78.6 against 69.3 here, but within a few
    # points of random at 20 iterations on the 26 test videos alone)
    assert trained[0] > rand[0] + 0.01, (trained, rand)
    # the printed table: both rows; no progress lines when stdout is not a terminal
    lines = cli_run["stdout"].splitlines()
    assert any(line.startswith("rllib-ppo") for line in lines)
    assert any(line.startswith("random") for line in lines)
    assert not any(line.startswith("iter") for line in lines), lines
    print("held-out (objective, mAP): trained", trained, "random", rand)


def test_cli_leaves_no_ray_state(cli_run):
    # nothing under HOME (no ~/.ray/auth_token, no ~/ray_results): RLlib's log folder is
    # under OUT; the local cluster's folder is removed and none of its processes is left
    home = cli_run["home"]
    assert not (home / ".ray").exists() and not (home / "ray_results").exists(), \
        sorted(p.name for p in home.iterdir())
    assert any((cli_run["out"] / "rllib").iterdir())
    temp_dir = cli_run["payload"]["ray"]["local_temp_dir"]
    assert temp_dir and not Path(temp_dir).exists()
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if temp_dir.encode() in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:  # a process that ended meanwhile
            pass
    assert not left, f"Ray processes of the CLI's cluster still running: {left}"


def test_cli_rejects_bad_inputs(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rllib_ppo.parse_args(["--dataset", str(tmp_path / "missing.h5")])
    assert "Args.dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rllib_ppo.parse_args(["--dataset", str(tiny), "--policies", "each"])
    with pytest.raises(SystemExit):
        rllib_ppo.parse_args(["--dataset", str(tiny), "--env-runners", "-1"])
    assert "Args.env_runners" in capsys.readouterr().err
    with pytest.raises(ValueError, match="minibatch_size"):
        rllib_ppo.Args(dataset=str(tiny), train_batch_size=64, minibatch_size=128)
    args = rllib_ppo.parse_args(["--dataset", str(tiny), "--policies", "per_locator",
                                 "--critic", "central", "--hidden", "32,16"])
    assert (args.policies, args.critic, args.hidden) == ("per_locator", "central", (32, 16))
    # a cached Stage I trained with other settings is refused, naming what differs
    settings = tmp_path / "recognizer" / "trainer_config.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"features": str(tiny), "config": {"stage1_steps": 7}}))
    with pytest.raises(ValueError, match="stage1_steps"):
        rllib_ppo.stage1_recognizer(rllib_ppo.Args(dataset=str(tiny), out=str(tmp_path),
                                                   budget="tiny"))


@pytest.fixture(scope="module")
def recognizer(cli_run):
    """The Stage I checkpoint and lambda the CLI run trained (reused, not retrained)."""
    path = cli_run["out"] / "recognizer" / "stage1" / "stage1_selected.pt"
    return path, cli_run["payload"]["frame_cost"]


def test_env_dict_observations_and_masks(tiny, recognizer):
    path, frame_cost = recognizer
    env = rllib_ppo.LocatorsMultiAgentEnv({"features": str(tiny), "recognizer": str(path),
                                          "frame_cost": frame_cost, "seed": 3})
    obs, _ = env.reset(seed=3)
    assert list(obs) == sorted(AGENTS)  # a fixed order, unlike the PettingZoo wrapper's set
    state_dim = env.par_env.state_space.shape[0]
    for _ in range(10):
        for i, a in enumerate(sorted(obs)):
            o = obs[a]
            assert env.observation_spaces[a].contains(o), (a, o)
            assert o["critic"].shape == (state_dim + 3,)
            np.testing.assert_array_equal(o["critic"][:state_dim], env.par_env.state())
            assert o["critic"][state_dim + i] == 1 and o["critic"][state_dim:].sum() == 1
            assert o["action_mask"][0] == 1  # stop is always legal
        # move every live locator 3 strides until the masks forbid it
        acts = {a: 3 if obs[a]["action_mask"][3] else 0 for a in env.par_env.agents}
        obs, rewards, terms, truncs, infos = env.step(acts)
        assert set(rewards) == set(obs) == set(env.agents)
        if terms["__all__"]:
            ends = list(infos.values())
            assert ends[0]["frames"] >= 3 and np.isfinite(ends[0]["team_return"])
            break
    else:
        pytest.fail("episode did not end")


def test_module_masks_illegal_actions_and_central_critic_reads_state(tiny, recognizer):
    from ray.rllib.core.columns import Columns

    path, frame_cost = recognizer
    env = rllib_ppo.LocatorsMultiAgentEnv({"features": str(tiny), "recognizer": str(path),
                                          "frame_cost": frame_cost})
    space = env.observation_spaces["locator_0"]
    torch.manual_seed(0)
    central = rllib_ppo.LocatorModule(observation_space=space, action_space=env.action_spaces[
        "locator_0"], model_config={"hidden": [16], "critic": "central"})
    B = 256
    batch_obs = {k: torch.as_tensor(np.stack([space.sample()[k] for _ in range(B)]))
                 for k in ("observations", "critic")}
    mask = torch.zeros(B, 4)
    mask[:, 0] = 1
    mask[: B // 2, 2] = 1  # half the rows may also move 2 strides
    batch_obs["action_mask"] = mask
    out = central.forward_exploration({Columns.OBS: batch_obs})
    dist = central.get_exploration_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    actions = dist.sample()
    assert bool((mask.gather(1, actions[:, None]) == 1).all())  # never an illegal action
    assert set(actions[: B // 2].tolist()) == {0, 2}
    assert torch.all(dist.logp(torch.full((B,), 3)) < -1e6)
    # the centralized value reads the critic entry (global state), not only the observation
    values = central.compute_values({Columns.OBS: batch_obs})
    changed = dict(batch_obs, critic=batch_obs["critic"] + 0.5)
    assert values.shape == (B,)
    assert not torch.allclose(values, central.compute_values({Columns.OBS: changed}))
    local = rllib_ppo.LocatorModule(observation_space=space, action_space=env.action_spaces[
        "locator_0"], model_config={"hidden": [16], "critic": "local"})
    assert torch.equal(local.compute_values({Columns.OBS: batch_obs}),
                       local.compute_values({Columns.OBS: changed}))
    # the evaluation adapter takes the argmax among legal actions only
    policy = rllib_ppo.RLlibLocatorPolicy({"shared": central}, "shared")
    obs3 = batch_obs["observations"][:6].reshape(2, 3, -1)
    only_stop = torch.zeros(2, 3, 4, dtype=torch.bool)
    only_stop[..., 0] = True
    alive = torch.ones(2, 3, dtype=torch.bool)
    assert policy.act_masked(obs3, alive, only_stop, 0).eq(0).all()


@pytest.fixture(scope="module")
def ray_session(cli_run):
    session = rllib_ppo.init_ray()
    yield session
    rllib_ppo.shutdown_ray(session)


@pytest.mark.parametrize("policies,critic", [("shared", "central"), ("per_locator", "local"),
                                             ("per_locator", "central")])
def test_configs_build_and_step(tiny, recognizer, ray_session, tmp_path, policies, critic):
    """Each option builds and trains one PPO iteration (sampling in the driver here)."""
    path, frame_cost = recognizer
    args = rllib_ppo.Args(dataset=str(tiny), out=str(tmp_path), policies=policies,
                          critic=critic, env_runners=0, iterations=1, train_batch_size=64,
                          minibatch_size=32, num_epochs=1, hidden=(16,), recognizer=str(path),
                          frame_cost=frame_cost)
    algo, history = rllib_ppo.train(args, path, frame_cost)
    try:
        ids = rllib_ppo.module_ids(policies, 3)
        assert set(algo.config.policies) == set(ids)
        obs_dim = algo.get_module(ids[0]).observation_space["observations"].shape[0]
        state_dim = 3 * obs_dim + 3 + 3  # all observations, alive flags, locator id
        for mid in ids:
            module = algo.get_module(mid)
            assert isinstance(module, rllib_ppo.LocatorModule)
            assert module.value[0].in_features == (state_dim if critic == "central" else obs_dim)
        assert history[0]["env_steps"] >= 64
        policy = rllib_ppo.trained_policy(algo, policies, 3)
    finally:
        algo.stop()
    assert set(policy.actors) == set(ids)
    # the trained policy plugs into the package's evaluation harness
    from agents.evaluate import evaluate_policy
    from features.source import CachedFrameSource
    from vimo_env.recognizer import Recognizer

    test = CachedFrameSource(tiny, split="test", device="cpu")
    result = evaluate_policy(policy, test, Recognizer.load(path).eval(), keep_trajectories=False)
    assert 3 <= result.frames_per_video <= 15 and result.gflops_per_video > 0


def test_ppo_old_api_stack_one_iteration(tiny, ray_session, tmp_path):
    """One PPO ``train()`` on the old API stack over RLlib's own PettingZoo wrapper, a shared
    policy, no remote env runners."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    register_env("vimo_rllib_test", lambda cfg: make_env(cfg["path"]))
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
    algo = rllib_ppo.build_algorithm(config, tmp_path)  # logs under tmp_path, not ~/ray_results
    try:
        result = algo.train()
    finally:
        algo.stop()
    assert result["training_iteration"] == 1
    steps = result.get("num_env_steps_sampled_lifetime",
                       result.get("num_env_steps_sampled", 0))
    assert steps >= 64


def test_unhealthy_stage1_stops_the_cli_unless_allowed(tiny, tmp_path):
    """A Stage I that fails its self-check (1 gradient step: near chance) stops the CLI with
    the trainer's diagnosis before Ray starts; --allow-unhealthy-stage1 goes on from the same
    cached Stage I (the flag is not a setting that invalidates it)."""
    argv = ["--dataset", str(tiny), "--out", str(tmp_path), "--stage1-steps", "1",
            "--threads", "1"]
    with pytest.raises(SystemExit, match="linear probe") as stopped:
        rllib_ppo.main(argv)
    # the hint is this CLI's: its Stage I cache resumes by itself, it has no --resume
    assert "--allow-unhealthy-stage1" in str(stopped.value) and "--resume" not in str(
        stopped.value)
    args = rllib_ppo.parse_args([*argv, "--allow-unhealthy-stage1"])
    assert args.allow_unhealthy_stage1
    checkpoint, frame_cost = rllib_ppo.stage1_recognizer(args)
    assert Path(checkpoint).is_file() and frame_cost > 0
