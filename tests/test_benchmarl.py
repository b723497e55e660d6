"""The BenchMARL task: its specs against the env's, its configs, and one short experiment per
algorithm family (on-policy MAPPO / IPPO, off-policy MASAC, value-based IQL) on the tiny
synthetic dataset, each scored by ``agents.evaluate.evaluate_policy``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from benchmarl.experiment.callback import Callback  # noqa: E402

from agents.benchmarl_task import (  # noqa: E402
    ALGORITHMS,
    GROUP,
    TINY_STAGE1,
    BenchMARLPolicy,
    Schedule,
    TaskConfig,
    VideoLocatorsClass,
    VideoLocatorsTask,
    check_task_config,
    evaluate_on_split,
    experiment_config,
    prepare,
    run_experiment,
)
from agents.policies import as_policy  # noqa: E402
from agents.trainer import source_for  # noqa: E402

N, M = 3, 4
# small enough for a 2-core machine: 512 env steps per algorithm
SCHEDULE = Schedule(num_envs=32, off_policy_frames=128, updates_per_env_step=0.25,
                    batch_size=64, buffer_size=4096, warmup_env_steps=128, on_policy_frames=256,
                    minibatch_size=128, ppo_epochs=2, hidden=(32, 32))
ENV_STEPS = 512


@pytest.fixture(scope="module")
def prepared(tiny_dataset, tmp_path_factory):
    """The tiny dataset with a short Stage I (the package's trainer, stopped after Stage I)."""
    out = tmp_path_factory.mktemp("benchmarl") / "stage1"
    overrides = dict(copy.deepcopy(TINY_STAGE1), stage1_steps=40, stage1_alternatives=[])
    return prepare(tiny_dataset, out_dir=out, seed=0, trainer_overrides=overrides)


@pytest.fixture(scope="module")
def task(prepared):
    return VideoLocatorsTask.TINY.get_task(prepared.task_config())


def test_prepare_uses_stage1_and_derives_lambda(prepared, tmp_path):
    assert prepared.recognizer.is_file() and prepared.recognizer.name == "stage1_selected.pt"
    assert prepared.frame_cost > 0 and prepared.stage1["frame_cost"]["value"] == pytest.approx(
        prepared.frame_cost)
    config = prepared.task_config()
    assert config["recognizer"] == str(prepared.recognizer)
    assert config["frame_cost"] == prepared.frame_cost and config["max_moves"] == M


def test_task_specs_match_the_env(task):
    env = task.get_env_fun(num_envs=4, continuous_actions=False, seed=0, device="cpu")()
    unbatched = env.full_observation_spec_unbatched
    D = env.core.obs_dim
    assert task.group_map(env) == {GROUP: [f"locator_{i}" for i in range(N)]}
    obs = task.observation_spec(env)
    assert list(obs.keys(True, True)) == [(GROUP, "observation")]
    assert obs[GROUP, "observation"] == unbatched[GROUP, "observation"]
    assert obs[GROUP, "observation"].shape == (N, D)
    mask = task.action_mask_spec(env)
    assert list(mask.keys(True, True)) == [(GROUP, "action_mask")]
    assert mask[GROUP, "action_mask"] == unbatched[GROUP, "action_mask"]
    assert mask[GROUP, "action_mask"].shape == (N, 4)
    assert mask[GROUP, "action_mask"].dtype == torch.bool
    state = task.state_spec(env)
    assert list(state.keys()) == ["state"] and state["state"] == unbatched["state"]
    assert state["state"].shape == (N * D + N,)
    action = task.action_spec(env)
    assert action[GROUP, "action"] == env.full_action_spec_unbatched[GROUP, "action"]
    assert action[GROUP, "action"].shape == (N,) and action[GROUP, "action"].space.n == 4
    assert task.info_spec(env) is None
    assert task.supports_discrete_actions() and not task.supports_continuous_actions()
    # what the env returns is in the specs the algorithms are built from
    td = env.reset()
    for spec in (obs, mask, state):
        for key in spec.keys(True, True):
            assert spec[key].is_in(td[key][0]), key
    # max_steps: every episode ends within it (BenchMARL's evaluation rollout length)
    rollout = env.rollout(task.max_steps(env), break_when_any_done=False)
    assert rollout["next", "done"].any(1).all()
    assert task.max_steps(env) == M


def test_task_config_validation_and_yaml(prepared, tmp_path):
    config = prepared.task_config()
    assert check_task_config(config) == config
    with pytest.raises(ValueError, match="unknown TaskConfig fields \\['stirde'\\]"):
        check_task_config({**config, "stirde": 3})
    with pytest.raises(ValueError, match="TaskConfig.max_moves"):
        VideoLocatorsClass("TINY", {**config, "max_moves": 0})
    with pytest.raises(ValueError, match="needs a config"):
        VideoLocatorsTask.TINY.get_task()
    with pytest.raises(ValueError, match="TaskConfig.features"):
        TaskConfig(features=None)
    good = tmp_path / "tiny.yaml"
    good.write_text("defaults:\n  - _self_\n" + "".join(
        f"{k}: {'null' if v is None else v}\n" for k, v in config.items()))
    assert VideoLocatorsTask.TINY.get_from_yaml(str(good)).config == config
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"features: {config['features']}\nframe_cost: -1\n")
    with pytest.raises(ValueError, match="bad.yaml.*TaskConfig.frame_cost"):
        VideoLocatorsTask.TINY.get_from_yaml(str(bad))


def test_experiment_config_rounds_to_whole_collections(tmp_path):
    config = experiment_config(SCHEDULE, 300, on_policy=False, save_folder=tmp_path)
    assert config.max_n_frames == 384 and config.off_policy_n_optimizer_steps == 32
    assert config.loggers == [] and not config.create_json and not config.evaluation
    assert config.checkpoint_interval == 0 and not config.checkpoint_at_end
    with pytest.raises(ValueError, match="on_policy_frames=100 must be a multiple"):
        experiment_config(Schedule(num_envs=32, on_policy_frames=100), 512, on_policy=True,
                          save_folder=tmp_path)


class _Snapshot(Callback):
    """Records the group's trainable parameters when the experiment is set up."""

    def on_setup(self) -> None:
        self.before = [p.detach().clone() for p in
                       self.experiment.losses[GROUP].parameters() if p.requires_grad]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_trains_and_is_scored(algorithm, task, prepared, tmp_path, monkeypatch,
                                        capfd):
    monkeypatch.chdir(tmp_path)  # nothing may land outside save_folder
    snapshot = _Snapshot()
    run = run_experiment(task, algorithm, env_steps=ENV_STEPS, save_folder=tmp_path / "bm",
                         seed=0, schedule=SCHEDULE, callbacks=[snapshot])
    err = capfd.readouterr().err
    assert "mean return" not in err and "it/s" not in err  # no progress bar unless asked
    exp = run.experiment
    assert run.env_steps == ENV_STEPS == exp.total_frames
    assert exp.on_policy == (algorithm in ("mappo", "ippo"))
    per_batch = SCHEDULE.frames_per_batch(exp.on_policy)
    assert exp.n_iters_performed == ENV_STEPS // per_batch
    after = [p.detach() for p in exp.losses[GROUP].parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(snapshot.before, after, strict=True))
    assert [p.name for p in tmp_path.iterdir()] == ["bm"]
    assert (exp.folder_name / "config.pkl").is_file()
    assert not list(exp.folder_name.rglob("*.pt")) and not list(exp.folder_name.rglob("*.json"))

    policy = as_policy(run.policy)
    assert policy is run.policy and isinstance(policy, BenchMARLPolicy)
    # deterministic and legal: a locator whose mask allows only "stop" stops
    obs = torch.randn(5, N, exp.observation_spec[GROUP, "observation"].shape[-1])
    mask = torch.ones(5, N, 4, dtype=torch.bool)
    mask[:, 1, 1:] = False
    alive = torch.ones(5, N, dtype=torch.bool)
    first = policy.act_masked(obs, alive, mask, 0)
    assert torch.equal(first, policy.act_masked(obs, alive, mask, 0))
    assert first.shape == (5, N) and (first[:, 1] == 0).all()
    assert ((first >= 0) & (first < 4)).all()
    assert policy.inference_flops(obs[:1], alive[:1]).per_decision > 0

    result = evaluate_on_split(policy, prepared, "test", name=algorithm)
    assert result.name == algorithm and 0.0 <= result.mAP <= 100.0
    assert N <= result.frames_per_video <= N * (M + 1)
    assert result.extra["decisions_per_video"] > 0
    assert np.isfinite(result.scores).all()
    assert result.scores.shape[0] == source_for(prepared.features, "test").num_videos
    # the policy's own cost is charged on top of the frames and the recognizer
    free = evaluate_on_split(lambda o: policy.act_masked(
        torch.as_tensor(o["observation"]), torch.as_tensor(o["alive"]).bool(),
        torch.as_tensor(o["action_mask"]).bool(), 0).numpy(), prepared, "test")
    assert free.frames_per_video == result.frames_per_video
    assert result.gflops_per_video > free.gflops_per_video


def test_cli_stops_on_an_unhealthy_stage1_unless_allowed(monkeypatch, tmp_path):
    """The CLI turns Stage I's failed self-check into an exit with the diagnosis, and
    --allow-unhealthy-stage1 reaches the trainer's config."""
    from agents import benchmarl_task
    from agents.trainer import Stage1Unhealthy

    seen = []

    def fake_prepare(dataset, **kwargs):
        overrides = kwargs.get("trainer_overrides") or {}
        seen.append(overrides)
        if not overrides.get("allow_unhealthy_stage1"):
            raise Stage1Unhealthy("Stage I recognizer: val mAP 20.0 is 23% of the linear probe's")
        raise RuntimeError("went on")

    monkeypatch.setattr(benchmarl_task, "prepare", fake_prepare)
    argv = ["--out", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit, match="linear probe"):
        benchmarl_task.main(argv)
    with pytest.raises(RuntimeError, match="went on"):
        benchmarl_task.main([*argv, "--allow-unhealthy-stage1"])
    assert seen == [{}, {"allow_unhealthy_stage1": True}]
