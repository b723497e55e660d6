"""Evaluation harness, baselines and plug-in policies (agents.evaluate/baselines/policies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.baselines import (
    InitialPolicy,
    OpenLoopPolicy,
    distinct_schedules,
    open_loop_selection,
    search_open_loop,
)
from agents.ctde_sac import SACConfig, build_ctde_sac
from agents.evaluate import evaluate_policy, evaluate_selection_baseline
from agents.metrics import mean_average_precision
from agents.policies import CTDEActorPolicy, SB3Policy, TianshouPolicy, as_policy
from agents.selection import evaluate_selection, segment_bounds
from features.source import CachedFrameSource
from vimo_env.recognizer import Recognizer, RecognizerConfig

SMALL = dict(hidden_dim=16, transformer_layers=1, transformer_dim=16, transformer_ff_dim=32)


@pytest.fixture(scope="module")
def test_source(tiny_dataset):
    return CachedFrameSource(tiny_dataset, split="test", device="cpu")


@pytest.fixture(scope="module")
def recognizer(test_source):
    torch.manual_seed(0)
    rec = Recognizer(RecognizerConfig(feature_dim=test_source.feature_dim,
                                      num_classes=test_source.num_classes, **SMALL))
    return rec.eval()


def test_open_loop_in_env_equals_its_frame_selection(test_source, recognizer):
    lengths = np.asarray(test_source.lengths)
    for schedule in [(1, 2, 3, 1), (3, 3, 0), (0,), (3, 3, 3, 3)]:
        res = evaluate_policy(OpenLoopPolicy(schedule), test_source, recognizer, batch_size=7)
        frame_index, mask = open_loop_selection(lengths, 3, schedule)
        sel = evaluate_selection(recognizer, test_source, (frame_index, mask))
        np.testing.assert_allclose(res.scores, sel["scores"], atol=1e-5)
        assert res.frames_per_video == pytest.approx(mask.sum((1, 2)).mean())
        for v in range(len(lengths)):
            for i in range(3):
                assert res.trajectories[v][i] == frame_index[v, i][mask[v, i]].tolist()
    # a move of k strides lands k*delta frames on, clipped to the last frame
    res = evaluate_policy(OpenLoopPolicy((2,)), test_source, recognizer)
    start = segment_bounds(lengths, 3)[:, :-1]
    assert [t[0][1] for t in res.trajectories] == np.minimum(start[:, 0] + 6, lengths - 1).tolist()


def test_initial_policy_and_costs(test_source, recognizer):
    res = evaluate_policy(InitialPolicy(), test_source, recognizer)
    lengths = np.asarray(test_source.lengths)
    assert res.frames_per_video == 3.0
    assert res.frame_rate == pytest.approx(100 * np.mean(3 / lengths))
    sel = evaluate_selection_baseline(recognizer, test_source, "initial")
    assert res.mAP == pytest.approx(sel.mAP) and res.gflops_per_video == pytest.approx(
        sel.gflops_per_video)
    allf = evaluate_selection_baseline(recognizer, test_source, "all")
    # cost is linear in frames: backbone + F_T per frame, plus one F_M per video
    per_frame = (allf.gflops_per_video - sel.gflops_per_video) / (allf.frames_per_video - 3)
    assert per_frame > test_source.gflops_per_frame
    # mAP and top-1 recomputed independently: AP by hand = mean precision at each positive's
    # rank (scores are continuous: no ties), over the classes present
    labels = np.asarray(test_source.labels)
    aps = []
    for c in np.unique(labels):
        hits = (labels == c)[np.argsort(-res.scores[:, c], kind="stable")]
        aps.append((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits].mean())
    assert len(np.unique(res.scores)) == res.scores.size  # no ties
    assert res.mAP == pytest.approx(100 * np.mean(aps), abs=1e-9)
    assert res.top1 == pytest.approx(100 * np.mean(res.scores.argmax(1) == labels))


def test_mean_average_precision_on_known_numbers():
    """AP of a ranking by hand (precision at each positive, averaged); a class with no
    positive (class 2) is skipped."""
    scores = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4],
                       [0.55, 0.7, 0.1], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1, 0, 1, 1])
    # class 0 ranking: v0 (pos), v1, v3, v2 (pos), v4 -> AP (1/1 + 2/4) / 2 = 0.75
    # class 1 ranking: v4 (pos), v3 (pos), v1 (pos), v2, v0 -> AP 1
    expected = 100 * (0.75 + 1.0) / 2
    assert mean_average_precision(scores, labels) == pytest.approx(expected)


def test_deterministic_and_batch_size_independent(test_source, recognizer):
    a = evaluate_policy(OpenLoopPolicy((1, 1)), test_source, recognizer, batch_size=5)
    b = evaluate_policy(OpenLoopPolicy((1, 1)), test_source, recognizer, batch_size=1024)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert a.row()["mAP"] == pytest.approx(b.row()["mAP"])


def test_plugins_callable_tianshou_sb3_agree(tiny_dataset, test_source, recognizer):
    obs_dim = recognizer.embedding_dim + 3
    torch.manual_seed(1)
    algo = build_ctde_sac(obs_dim, 3, SACConfig(actor_hidden=(16,), critic_hidden=(16,)))
    direct = evaluate_policy(algo, test_source, recognizer)  # as_policy -> CTDE actor
    assert direct.name == "adaptive" and direct.extra["decisions_per_video"] > 0
    via_tianshou = evaluate_policy(TianshouPolicy(algo.policy), test_source, recognizer)
    np.testing.assert_allclose(direct.scores, via_tianshou.scores, atol=1e-6)
    assert direct.frames_per_video == via_tianshou.frames_per_video
    # both are charged the actor: per alive decision (CTDE), per running row and step (Tianshou)
    assert via_tianshou.gflops_per_video > direct.gflops_per_video

    def greedy(obs):  # a plain callable: locator 0 moves 1 stride, the others stop
        act = np.zeros(obs["alive"].shape, dtype=np.int64)
        act[:, 0] = 1
        return act

    res = evaluate_policy(greedy, test_source, recognizer)
    assert res.name == "greedy"
    assert all(len(t[1]) == 1 and len(t[2]) == 1 for t in res.trajectories)
    assert res.frames_per_video > 3

    from stable_baselines3 import PPO

    from vimo_env.gym_env import VideoLocatorsEnv

    env = VideoLocatorsEnv(features=tiny_dataset, recognizer=recognizer, split="train",
                           device="cpu", seed=0)
    model = PPO("MultiInputPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu")
    assert isinstance(as_policy(model), SB3Policy)
    sb3 = evaluate_policy(model, test_source, recognizer)
    obs = {"observation": np.zeros((2, 3, obs_dim), np.float32), "alive": np.ones((2, 3), np.int8),
           "action_mask": np.ones((2, 3, 4), np.int8)}
    assert sb3.name == "sb3" and np.asarray(model.predict(obs)[0]).shape == (2, 3)
    assert 3 <= sb3.frames_per_video <= 15


def test_bad_policy_outputs_raise(test_source, recognizer):
    with pytest.raises(ValueError, match="shape"):
        evaluate_policy(lambda o: np.zeros((1, 3), int), test_source, recognizer)
    with pytest.raises(ValueError, match="0..3"):
        evaluate_policy(lambda o: np.full(o["alive"].shape, 7), test_source, recognizer)
    with pytest.raises(TypeError, match="locator policy"):
        evaluate_policy(42, test_source, recognizer)
    with pytest.raises(ValueError, match="schedule"):
        OpenLoopPolicy((4,))


def test_open_loop_search_picks_the_best_schedule_on_val(tiny_dataset, recognizer):
    assert len(distinct_schedules(4)) == 121 and len(set(distinct_schedules(4))) == 121
    assert len(distinct_schedules(2)) == 1 + 3 + 9
    val = CachedFrameSource(tiny_dataset, split="val", device="cpu")
    policy, table = search_open_loop(recognizer, val, max_moves=2)
    assert len(table) == 13
    best = max(r["mAP"] for r in table)
    chosen = [r for r in table if r["schedule"] == policy.schedule][0]
    assert chosen["mAP"] == pytest.approx(best)
    # its table entry is what the env harness measures for that schedule on val
    res = evaluate_policy(policy, val, recognizer, max_moves=2)
    assert res.mAP == pytest.approx(chosen["mAP"], abs=1e-6)
    assert res.gflops_per_video == pytest.approx(chosen["gflops_per_video"])


def test_ctde_sampling_policy_is_seeded(test_source, recognizer):
    obs_dim = recognizer.embedding_dim + 3
    torch.manual_seed(2)
    algo = build_ctde_sac(obs_dim, 3, SACConfig(actor_hidden=(16,), critic_hidden=(16,)))

    def run(seed):
        pol = CTDEActorPolicy(algo, deterministic=False,
                              generator=torch.Generator().manual_seed(seed))
        return evaluate_policy(pol, test_source, recognizer).trajectories

    assert run(0) == run(0)
    assert run(0) != run(1)


def _linear_flops(*modules: torch.nn.Module) -> float:
    """2 x multiply-accumulates of every nn.Linear in ``modules``, by hand."""
    return float(sum(2 * m.in_features * m.out_features for mod in modules
                     for m in mod.modules() if isinstance(m, torch.nn.Linear)))


@pytest.mark.parametrize("unit, per_unit", [("MACs", 0.5), ("FLOPs", 1.0)])
def test_every_cost_is_in_the_files_unit_and_learners_are_charged(tiny_dataset, recognizer,
                                                                  unit, per_unit):
    """Backbone, recognizer and policy costs share the file's unit (the actor used to be in
    MACs whatever the file said), and Tianshou / SB3 policies pay for their network."""
    from env_helpers import ArraySource

    from agents.policies import PolicyFlops

    lengths = [30, 41, 52, 35, 60, 44]
    source = ArraySource(lengths, [0, 1, 2, 3, 4, 5], dim=recognizer.config.feature_dim,
                         classes=recognizer.config.num_classes, gflops_per_frame=2.0,
                         flops_unit=unit)
    cost = recognizer.flops()
    obs_dim, hidden = recognizer.embedding_dim + 3, 16

    def expected(res, per_decision=0.0, per_row_step=0.0):
        flops = (res.frames_per_video * cost["temporal_per_frame"] + cost["integration"]
                 + res.extra["decisions_per_video"] * per_decision
                 + res.extra["steps_per_video"] * per_row_step)
        return res.frames_per_video * 2.0 + flops * per_unit / 1e9

    torch.manual_seed(1)
    algo = build_ctde_sac(obs_dim, 3, SACConfig(actor_hidden=(hidden,), critic_hidden=(16,)))
    actor_flops = 2 * (obs_dim * hidden + hidden * 4)  # one locator's two ensemble layers
    direct = evaluate_policy(algo, source, recognizer)
    assert direct.gflops_per_video == pytest.approx(expected(direct, per_decision=actor_flops))
    assert as_policy(algo).inference_flops(torch.zeros(1, 3, obs_dim),
                                           torch.ones(1, 3, dtype=torch.bool)) == PolicyFlops(
        per_decision=actor_flops)
    via_tianshou = evaluate_policy(TianshouPolicy(algo.policy), source, recognizer)
    assert via_tianshou.gflops_per_video == pytest.approx(
        expected(via_tianshou, per_row_step=3 * actor_flops))

    from stable_baselines3 import PPO

    from vimo_env.gym_env import VideoLocatorsEnv

    env = VideoLocatorsEnv(features=tiny_dataset, recognizer=recognizer, device="cpu", seed=0)
    model = PPO("MultiInputPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu",
                policy_kwargs=dict(net_arch=[8]))
    sb3 = evaluate_policy(model, source, recognizer)
    policy = model.policy
    forward = _linear_flops(policy.features_extractor, policy.mlp_extractor.policy_net,
                            policy.action_net)
    assert forward > 0
    assert sb3.gflops_per_video == pytest.approx(expected(sb3, per_row_step=forward))


def test_an_unknown_flops_unit_is_refused(recognizer):
    from env_helpers import ArraySource

    from vimo_env.core import LocatorCore
    from vimo_env.costs import flops_in_unit

    source = ArraySource([30], dim=recognizer.config.feature_dim,
                         classes=recognizer.config.num_classes, flops_unit="GFLOPs")
    with pytest.raises(ValueError, match="field 'flops_unit'.*'GFLOPs'"):
        LocatorCore(source, recognizer, device="cpu")
    with pytest.raises(ValueError, match="my.h5: field 'flops_unit'"):
        flops_in_unit(10.0, "flops", "my.h5")
    assert flops_in_unit(10.0, "MACs") == 5.0 and flops_in_unit(10.0, "FLOPs") == 10.0
