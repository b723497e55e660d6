"""AdaFocus (temporal): the reward, the record, the cost, the budget knob, checkpoints."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from agents.peers import adafocus
from agents.peers.adafocus import AdaFocus, AdaFocusArgs, confidence_gains, reinforce_terms
from agents.peers.harness import FrameCosts, gather_batch, sample_frames, video_gflops
from benchmarks import comparison
from features.pairs import FeaturePair, make_glance_features
from features.synthetic import PRESETS, generate

SPEC_KEYS = {"name", "mAP", "top1", "frame_rate", "frames_per_video", "gflops_per_video",
             "frames_glanced", "frames_focused"}
# the default recipe with fewer gradient steps (the suite runs on 1 thread)
FAST = {"min_steps": 150, "max_steps": 150, "eval_every": 25}
# the budget-knob runs: small networks, short
KNOB = {"embed_dim": 32, "hidden": 32, "policy_dim": 16, "policy_hidden": 16,
        "min_steps": 100, "max_steps": 100, "eval_every": 50}


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    """One AdaFocus trained through the benchmark's own path (comparison.run_peer, which
    saves ``adafocus.pt`` and its record), registered for this module only."""
    folder = tmp_path_factory.mktemp("peers")
    args = AdaFocusArgs(**FAST)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(comparison.PEERS, "adafocus", (adafocus, AdaFocusArgs))
        result = comparison.run_peer("adafocus", tiny_pair, args, folder, resume=False)
    return result, args, folder


# -- the reward ------------------------------------------------------------------------------


def test_reinforce_rewards_returns_and_advantages_by_hand():
    gains = torch.tensor([[0.3, 0.1, 0.2], [0.05, 0.4, 0.9]])
    b = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # video 1: 2 frames
    rewards, returns, advantages = reinforce_terms(gains, b, mask, cost=0.1, gamma=0.5)
    # r_t = b_t (gain_t - cost); a skipped frame and padding earn 0
    assert torch.allclose(rewards, torch.tensor([[0.2, 0.0, 0.1], [-0.05, 0.3, 0.0]]))
    # R_t = r_t + gamma R_{t+1}
    assert torch.allclose(returns, torch.tensor([[0.225, 0.05, 0.1], [0.1, 0.3, 0.0]]))
    # baseline: the mean return of the videos valid at frame t (0.1625, 0.175, 0.1)
    assert torch.allclose(advantages, torch.tensor([[0.0625, -0.125, 0.0],
                                                    [-0.0625, 0.125, 0.0]]))


def test_confidence_gain_is_the_true_class_confidence_with_minus_without_the_frame():
    torch.manual_seed(0)
    model = AdaFocus(6, 5, 4, AdaFocusArgs(embed_dim=8, hidden=8)).eval()
    g, f = torch.randn(3, 5, 8).relu(), torch.randn(3, 5, 8).relu()
    b = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    labels = torch.tensor([2, 0, 3])
    gains = confidence_gains(model, g, f, b, mask, labels)
    with torch.no_grad():
        for v in range(3):
            for t in range(5):
                if not mask[v, t]:
                    assert gains[v, t] == 0
                    continue
                with_t, without_t = b[v:v + 1].clone(), b[v:v + 1].clone()
                with_t[0, t], without_t[0, t] = 1, 0
                p = [torch.softmax(model.classify(g[v:v + 1], f[v:v + 1], d, mask[v:v + 1]),
                                   1)[0, labels[v]] for d in (with_t, without_t)]
                assert gains[v, t] == pytest.approx(float(p[0] - p[1]), abs=1e-6)


# -- a trained model: learning, record, cost, checkpoint, resume ----------------------------


def test_learns_tiny_above_chance(trained, tiny_pair):
    result, _, _ = trained
    row = result["row"]
    assert row["name"] == "adafocus" and set(row) == SPEC_KEYS
    chance = 100 / len(tiny_pair.class_names)
    assert row["top1"] > chance + 30 and row["mAP"] > 60
    assert 0 < row["frames_focused"] < row["frames_glanced"] <= 32
    assert result["uniform"]["gflops_per_video"] >= row["gflops_per_video"]
    info = result["train"]
    assert sum(info["stage_steps"]) == info["steps"] == 150
    assert [h["stage"] for h in info["history"]][-1] == "III"


def test_record_holds_the_policy_decisions_and_is_charged_by_the_cost_rule(trained, tiny_pair):
    result, args, _ = trained
    model = result["model"]
    test = tiny_pair.load("test")
    costs = FrameCosts.from_pair(tiny_pair)
    scored = adafocus.evaluate(model, test, costs, args)
    record = scored.record
    # the policy's decisions, recomputed: p^B >= rho at the segment centres
    frames, mask = sample_frames(test.lengths, args.num_frames)
    glance, _ = gather_batch(test, torch.arange(test.num_videos), frames)
    with torch.no_grad():
        p = torch.sigmoid(model.policy_logits(glance, mask))
    decided = (p >= model.rho) & mask
    for v in range(test.num_videos):
        assert set(np.flatnonzero(record.focused[v])) == set(frames[v][decided[v]].tolist())
        assert set(np.flatnonzero(record.glanced[v])) == set(frames[v][mask[v]].tolist())
    assert np.array_equal(record.frames_focused, decided.sum(1).numpy())
    # the cost: the harness's rule on that record, head included
    per = model.cost_per_frame(costs.unit)
    head = (record.frames_glanced * per["glanced"] + record.frames_focused * per["focused"]
            + per["video"])
    assert np.allclose(record.head_gflops, head) and per["glanced"] > 0 < per["focused"]
    assert scored.gflops_per_video == pytest.approx(float(video_gflops(record, costs).mean()))
    assert scored.gflops_per_video == pytest.approx(result["row"]["gflops_per_video"])
    floor = (record.frames_glanced * costs.glance + record.frames_focused * costs.focus).mean()
    assert floor < scored.gflops_per_video < floor + 0.1  # heads are small but counted


def test_save_load_and_resume_reproduce_the_scores(trained, tiny_pair):
    result, args, folder = trained
    costs = FrameCosts.from_pair(tiny_pair)
    test = tiny_pair.load("test")
    model, loaded_args = adafocus.load(folder / "adafocus.pt")
    assert asdict(loaded_args) == asdict(args)
    assert torch.equal(model.rho, result["model"].rho) and float(model.rho) > 0
    assert torch.equal(model.norm_focus.mean, result["model"].norm_focus.mean)
    original = adafocus.evaluate(result["model"], test, costs, args)
    again = adafocus.evaluate(model, test, costs, args)
    assert np.array_equal(again.scores, original.scores)
    assert np.array_equal(again.record.focused, original.record.focused)
    # --resume: the finished peer is loaded and scored, not retrained
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(comparison.PEERS, "adafocus", (adafocus, AdaFocusArgs))
        resumed = comparison.run_peer("adafocus", tiny_pair, args, folder, resume=True)
        assert resumed["resumed"] and resumed["row"] == result["row"]
        assert resumed["uniform"] == result["uniform"]
        assert comparison.peer_latency_ms(resumed["model"], test, args.num_frames, 3) > 0
    # other arguments: not taken as finished (retrained)
    assert comparison._finished("adafocus", folder, replace(args, seed=1), tiny_pair) is None


# -- the budget knob -------------------------------------------------------------------------


def test_a_higher_focusing_cost_focuses_fewer_frames(tiny_pair):
    # the paper's fixed lambda (no dual ascent) and the policy's own decision p^B >= 0.5
    base = AdaFocusArgs(ratio=0.5, cost_lr=0.0, calibrate=False, **KNOB)
    test = tiny_pair.load("test")
    costs = FrameCosts.from_pair(tiny_pair)
    focused, usage = [], []
    for cost in (0.0, 0.3):
        model, info = adafocus.train(tiny_pair, replace(base, cost=cost))
        assert info["cost"] == cost and float(model.rho) == 0.5
        focused.append(adafocus.evaluate(model, test, costs, base).frames_focused)
        usage.append([h["usage"] for h in info["history"] if h["stage"] == "II"][-1])
    assert focused[1] < focused[0] and usage[1] < usage[0]


def test_the_focus_ratio_is_the_budget_knob(tiny_pair):
    test = tiny_pair.load("test")
    costs = FrameCosts.from_pair(tiny_pair)
    rows = {}
    for ratio in (0.15, 0.5):
        model, info = adafocus.train(tiny_pair, AdaFocusArgs(ratio=ratio, **KNOB))
        rows[ratio] = adafocus.evaluate(model, test, costs, AdaFocusArgs(ratio=ratio, **KNOB))
        # rho is solved on train for the top `ratio` of the frames: test lands near it
        assert abs(rows[ratio].frames_focused / rows[ratio].frames_glanced - ratio) < 0.1
    assert rows[0.15].frames_focused < rows[0.5].frames_focused
    assert rows[0.15].gflops_per_video < rows[0.5].gflops_per_video


def test_defaults_work_on_features_they_were_not_tuned_for(tmp_path):
    # non-negative (ReLU-like) features x0.01: standardized with train statistics
    focus = generate(replace(PRESETS["tiny"], nonnegative=True, feature_scale=0.01),
                     tmp_path / "focus.h5", seed=1, progress=False)
    glance = make_glance_features(focus, tmp_path / "glance.h5", seed=1)
    row = adafocus.run(FeaturePair(glance, focus), AdaFocusArgs(**FAST))["row"]
    assert row["top1"] > 100 / 6 + 25 and row["mAP"] > 55


# -- determinism -----------------------------------------------------------------------------


def test_same_seed_same_numbers(tiny_pair):
    args = AdaFocusArgs(**{**KNOB, "min_steps": 30, "max_steps": 30, "eval_every": 10})
    a, info_a = adafocus.train(tiny_pair, args)
    b, info_b = adafocus.train(tiny_pair, args)
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in info_a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "time_s"} for h in info_b["history"]]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    c, _ = adafocus.train(tiny_pair, replace(args, seed=1))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    with pytest.raises(ValueError, match="ratio"):
        AdaFocus(4, 4, 2, AdaFocusArgs(ratio=1.0))
