"""The seed peers' foundation: glance/focus pairs, the one cost rule, LiteEval and AFNet-style."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from agents.peers import adafocus, afnet, liteeval, nsnet
from agents.peers.harness import (
    FrameCosts,
    SelectionRecord,
    matched_uniform,
    sample_frames,
    score,
    video_gflops,
)
from features.pairs import FeaturePair, FeaturePairError, make_glance_features
from features.store import FeatureStore, FeatureWriter
from features.synthetic import PRESETS, generate

SPEC_KEYS = {"name", "mAP", "top1", "frame_rate", "frames_per_video", "gflops_per_video"}
# test budgets: the default recipe with fewer gradient steps (the suite runs on 1 thread)
FAST = {"min_steps": 150, "max_steps": 150, "eval_every": 25}


# -- pairing ---------------------------------------------------------------------------------


def _write(path, ids=("a", "b", "c"), lengths=(3, 4, 5), labels=(0, 1, 0),
           splits=("train", "val", "test"), classes=("x", "y"), unit="MACs", gflops=1.0,
           dim=4, fps=1.0):
    rng = np.random.default_rng(0)
    with FeatureWriter(path, feature_dim=dim, class_names=list(classes), backbone="test",
                       fps=fps, gflops_per_frame=gflops, flops_unit=unit) as writer:
        for vid, n, label, split in zip(ids, lengths, labels, splits, strict=True):
            writer.add(vid, rng.normal(size=(n, dim)), label, split)
    return path


def test_glance_file_is_a_plain_v1_file_with_its_own_cost(tiny_pair, tiny_dataset):
    with FeatureStore(tiny_pair.glance_path) as g, FeatureStore(tiny_dataset) as f:
        assert g.backbone == "synthetic-glance" and g.gflops_per_frame == pytest.approx(0.32)
        assert g.feature_dim == 8 < f.feature_dim == 16
        assert g.video_ids == f.video_ids and (g.lengths == f.lengths).all()
    assert (tiny_pair.glance_cost, tiny_pair.focus_cost) == (pytest.approx(0.32), 4.09)
    split = tiny_pair.load("val")
    assert split.glance.flat.shape == (split.focus.flat.shape[0], 8)
    glance, focus = split.gather(torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert glance.shape == (2, 8) and focus.shape == (2, 16)


def test_glance_features_are_deterministic_and_degraded(tiny_dataset, tmp_path):
    a = make_glance_features(tiny_dataset, tmp_path / "a.h5", seed=3)
    b = make_glance_features(tiny_dataset, tmp_path / "b.h5", seed=3)
    c = make_glance_features(tiny_dataset, tmp_path / "c.h5", seed=4)
    with FeatureStore(a) as sa, FeatureStore(b) as sb, FeatureStore(c) as sc:
        assert np.array_equal(sa.read_all(), sb.read_all())
        assert not np.array_equal(sa.read_all(), sc.read_all())


@pytest.mark.parametrize("change, field", [
    ({"ids": ("a", "c", "b")}, "video_ids"),
    ({"ids": ("a", "b")}, "video_ids"),
    ({"lengths": (3, 4, 6)}, "offsets"),
    ({"labels": (0, 1, 1)}, "labels"),
    ({"splits": ("train", "test", "test")}, "splits"),
    ({"classes": ("x", "z")}, "class_names"),
    ({"unit": "FLOPs"}, "flops_unit"),
    ({"fps": 2.0}, "fps"),
])
def test_a_mismatched_pair_names_both_files_and_the_field(tmp_path, change, field):
    focus = _write(tmp_path / "focus.h5")
    if "ids" in change and len(change["ids"]) == 2:
        change = {**change, "lengths": (3, 4), "labels": (0, 1), "splits": ("train", "val")}
    glance = _write(tmp_path / "glance.h5", dim=2, gflops=0.1, **change)
    with pytest.raises(FeaturePairError) as err:
        FeaturePair(glance, focus)
    message = str(err.value)
    assert str(glance) in message and str(focus) in message and f"'{field}'" in message


def test_a_matching_pair_of_own_files_plugs_in(tmp_path):
    focus = _write(tmp_path / "resnet50.h5", gflops=4.1, dim=6)
    glance = _write(tmp_path / "mobilenetv2.h5", gflops=0.3, dim=3)
    pair = FeaturePair(glance, focus)
    assert (pair.glance_dim, pair.focus_dim) == (3, 6)
    assert FrameCosts.from_pair(pair) == FrameCosts(0.3, 4.1, "MACs")


# -- accounting ------------------------------------------------------------------------------


def test_cost_rule_is_exact_on_hand_built_records():
    glanced = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0]], dtype=bool)
    focused = np.array([[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 1, 1]], dtype=bool)
    record = SelectionRecord(np.array([4, 6]), glanced, focused, np.array([0.5, 0.25]))
    costs = FrameCosts(glance=0.25, focus=4.0, unit="MACs")
    assert np.array_equal(record.frames_glanced, [4, 3])
    assert np.array_equal(record.frames_focused, [1, 3])
    assert np.array_equal(record.frames_observed, [4, 4])
    assert np.allclose(video_gflops(record, costs), [4 * 0.25 + 4 + 0.5, 3 * 0.25 + 12 + 0.25])
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    result = score("peer", scores, np.array([0, 1]), record, costs)
    row = result.row()
    assert set(row) == SPEC_KEYS | {"frames_glanced", "frames_focused"}
    assert row["gflops_per_video"] == pytest.approx((5.5 + 13.0) / 2)
    assert (row["frames_glanced"], row["frames_focused"]) == (3.5, 2.0)
    assert row["frame_rate"] == pytest.approx(100 * (4 / 4 + 4 / 6) / 2)
    assert row["mAP"] == 100.0 and row["top1"] == 100.0
    assert result.focus_rate == pytest.approx(100 * (1 / 4 + 3 / 6) / 2)
    # the same record from index lists (a repeated frame is computed once)
    same = SelectionRecord.from_frames([4, 6], focused=[[1, 1], [0, 4, 5]],
                                       glanced=[[0, 1, 2, 3], [0, 2, 4]], head_gflops=[0.5, 0.25])
    assert np.allclose(video_gflops(same, costs), video_gflops(record, costs))


def test_vimo_rows_are_the_same_rule_with_no_glance():
    # ViMo: every locator's observed frames through the one backbone
    record = SelectionRecord.from_frames([10, 12], focused=[[0, 3, 6], [0, 4, 8, 11]],
                                         head_gflops=0.01)
    costs = FrameCosts.focus_only(4.09, "MACs")
    assert np.allclose(video_gflops(record, costs), [3 * 4.09 + 0.01, 4 * 4.09 + 0.01])
    assert record.frames_glanced.sum() == 0


def test_nsnet_arithmetic():
    # NSNet (nsnet.md, Table 2 setting): ResNet-50 on 5 frames + MobileNetV2 on 16 frames +
    # heads (transformer 0.315 + VGM 0.004 + FSM 0.002) = 25.99 G (multiply-accumulates)
    T = 16
    glanced = np.ones((1, T), dtype=bool)
    focused = np.zeros((1, T), dtype=bool)
    focused[0, [1, 4, 7, 10, 13]] = True
    record = SelectionRecord(np.array([T]), glanced, focused, np.array([0.315 + 0.004 + 0.002]))
    gflops = video_gflops(record, FrameCosts(glance=0.320, focus=4.109, unit="MACs"))
    assert gflops[0] == pytest.approx(25.99, abs=0.005)
    assert gflops[0] == pytest.approx(26.0, abs=0.02)


def test_units_must_agree_and_records_must_be_valid():
    with pytest.raises(ValueError, match="same unit"):
        FrameCosts.from_units(0.3, "MACs", 8.2, "FLOPs")
    with pytest.raises(ValueError, match="flops_unit"):
        FrameCosts(0.3, 4.1, "GMACs")
    assert FrameCosts.from_units(0.3, "FLOPs", 8.2, "FLOPs").unit == "FLOPs"
    with pytest.raises(ValueError, match="past its length"):
        SelectionRecord(np.array([2]), np.array([[1, 1, 1]], bool), np.zeros((1, 3), bool), 0.0)
    with pytest.raises(ValueError, match="outside"):
        SelectionRecord.from_frames([3], focused=[[3]])
    with pytest.raises(ValueError, match="head_gflops"):
        SelectionRecord.from_frames([3], focused=[[0]], head_gflops=-1.0)


def test_segment_sampling():
    frames, mask = sample_frames(np.array([8, 3]), 4)
    assert frames[0].tolist() == [1, 3, 5, 7] and mask[0].all()
    assert frames[1].tolist() == [0, 1, 2, 0] and mask[1].tolist() == [True] * 3 + [False]
    gen = torch.Generator().manual_seed(0)
    frames, mask = sample_frames(np.array([100] * 50), 10, gen)
    seg = torch.arange(10) * 10
    assert ((frames >= seg) & (frames < seg + 10)).all()


def test_matched_uniform_reaches_the_peer_cost(tiny_pair):
    train, test = tiny_pair.load("train"), tiny_pair.load("test")
    costs = FrameCosts.from_pair(tiny_pair)
    ref = matched_uniform(train, test, 4.5 * 4.09, costs)
    assert ref.name == "uniform-5" and ref.frames_focused == 5
    assert ref.gflops_per_video == pytest.approx(5 * 4.09)
    assert ref.gflops_per_video >= 4.5 * 4.09
    assert ref.top1 > 100 / 6  # the features are informative


# -- the peers -------------------------------------------------------------------------------

PEERS = {"liteeval": (liteeval, liteeval.LiteEvalArgs), "afnet": (afnet, afnet.AFNetArgs),
         "adafocus": (adafocus, adafocus.AdaFocusArgs), "nsnet": (nsnet, nsnet.NSNetArgs)}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_learns_tiny_above_chance(tiny_pair, name, tmp_path):
    module, make_args = PEERS[name]
    result = module.run(tiny_pair, make_args(**FAST), out=tmp_path)
    row = result["row"]
    chance = 100 / len(tiny_pair.class_names)
    assert row["name"] == name and set(row) == SPEC_KEYS | {"frames_glanced", "frames_focused"}
    assert row["top1"] > chance + 30 and row["mAP"] > 60
    assert 0 < row["frames_focused"] < row["frames_glanced"] <= 32
    costs = FrameCosts.from_pair(tiny_pair)
    floor = row["frames_glanced"] * costs.glance + row["frames_focused"] * costs.focus
    assert floor < row["gflops_per_video"] < floor + 0.1  # heads are small but counted
    assert result["uniform"]["gflops_per_video"] >= row["gflops_per_video"]
    # the checkpoint holds the normalization and reproduces the test scores
    model, args = module.load(tmp_path / f"{name}.pt")
    assert torch.equal(model.norm_focus.mean, result["model"].norm_focus.mean)
    test = tiny_pair.load("test")
    original = module.evaluate(result["model"], test, costs, args)
    assert np.allclose(module.evaluate(model, test, costs, args).scores, original.scores)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_same_seed_same_numbers(tiny_pair, name):
    module, make_args = PEERS[name]
    args = make_args(min_steps=30, max_steps=30, eval_every=10)
    a, info_a = module.train(tiny_pair, args)
    b, info_b = module.train(tiny_pair, args)
    assert info_a["history"] == [{**h, "time_s": h2["time_s"]} for h, h2 in
                                 zip(info_b["history"], info_a["history"], strict=True)]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    c, _ = module.train(tiny_pair, replace(args, seed=1))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     c.state_dict().values(), strict=True))


@pytest.mark.parametrize("variant", [
    {"feature_scale": 100.0, "feature_dim": 40},
    {"nonnegative": True, "feature_scale": 0.01},
])
@pytest.mark.parametrize("name", sorted(PEERS))
def test_defaults_work_on_features_they_were_not_tuned_for(name, variant, tmp_path):
    focus = generate(replace(PRESETS["tiny"], **variant), tmp_path / "focus.h5", seed=1,
                     progress=False)
    glance = make_glance_features(focus, tmp_path / "glance.h5", seed=1)
    module, make_args = PEERS[name]
    result = module.run(FeaturePair(glance, focus), make_args(**FAST))
    assert result["row"]["top1"] > 100 / 6 + 25 and result["row"]["mAP"] > 55


def test_budget_sweep_trains_the_other_knob_values_and_resumes(tiny_pair, tmp_path, capsys):
    """--peer-sweep: NSNet at K=3 beside the run's own K=5 point (reused, not retrained);
    fewer focused frames cost less; a resumed sweep loads the finished point."""
    from benchmarks import comparison

    folder = tmp_path / "peers"
    peers = comparison.run_peers(tiny_pair, ["nsnet"], "tiny", 0, folder, False,
                                 comparison.glance_record(tiny_pair, None))
    sweep = comparison.sweep_peers(tiny_pair, peers, "tiny", 0, folder / "sweep", False,
                                   values={"nsnet": (3, 5)})
    entry = sweep["nsnet"]
    assert entry["knob"] == "k" and [p["value"] for p in entry["points"]] == [3, 5]
    low, own = entry["points"]
    assert own == {"value": 5, **peers["methods"]["nsnet"]["row"]}
    assert low["frames_focused"] <= 3 < own["frames_focused"] <= 5
    assert low["gflops_per_video"] < own["gflops_per_video"]
    assert (folder / "sweep" / "nsnet-k-3" / "nsnet.pt").is_file()
    assert "trained" in capsys.readouterr().out
    again = comparison.sweep_peers(tiny_pair, peers, "tiny", 0, folder / "sweep", True,
                                   values={"nsnet": (3, 5)})
    assert again == sweep and "nsnet k=3 loaded" in capsys.readouterr().out
    table = comparison.sweep_table(sweep, "MACs")
    assert "k=3" in table and "k=5" in table


def test_budget_sweep_refuses_bad_knob_values(tiny_pair, tmp_path):
    from benchmarks import comparison

    peers = {"methods": {"nsnet": {"row": {}}}}
    with pytest.raises(ValueError, match="nsnet's knob k takes whole numbers, got 5.5"):
        comparison.sweep_peers(tiny_pair, peers, "tiny", 0, tmp_path, False,
                               values={"nsnet": (3, 5.5)})
    with pytest.raises(ValueError, match=r"no budget sweep for \['nope'\]"):
        comparison.sweep_peers(tiny_pair, peers, "tiny", 0, tmp_path, False,
                               values={"nope": (1,)})


def test_liteeval_forward_equals_the_step_by_step_masked_recurrence():
    """LiteEval's forward (one unbind, the prediction read at each video's last valid frame)
    gives the same logits, decisions and gradients as the plain recurrence that holds every
    state still on padding, for videos of different lengths."""
    from agents.peers.harness import binary_gumbel

    torch.manual_seed(0)
    model = liteeval.LiteEval(6, 10, 4, liteeval.LiteEvalArgs(embed_dim=8, coarse_hidden=4,
                                                               fine_hidden=8, dropout=0.0))
    glance, focus = torch.randn(5, 7, 6), torch.randn(5, 7, 10)
    mask = torch.arange(7)[None] < torch.tensor([7, 1, 4, 6, 2])[:, None]

    def held(m, glance, focus, mask, tau, generator):
        vc, vf = m.embed_glance(m.norm_glance(glance)), m.embed_focus(m.norm_focus(focus))
        hc = cc = glance.new_zeros(len(mask), m.Hc)
        hf = cf = glance.new_zeros(len(mask), m.Hf)
        decisions = []
        for t in range(mask.shape[1]):
            valid = mask[:, t, None].float()
            hc_new, cc_new = m.coarse(vc[:, t], (hc, cc))
            b = binary_gumbel(m.gate(torch.cat([vc[:, t], hc_new, hf], 1)), tau,
                              generator)[:, None] * valid
            hf_read, cf_read = m.fine(torch.cat([vc[:, t], vf[:, t]], 1), (hf, cf))
            hf_new = b * hf_read + (1 - b) * torch.cat([hc_new, hf[:, m.Hc:]], 1)
            cf_new = b * cf_read + (1 - b) * torch.cat([cc_new, cf[:, m.Hc:]], 1)
            hc, cc = valid * hc_new + (1 - valid) * hc, valid * cc_new + (1 - valid) * cc
            hf, cf = valid * hf_new + (1 - valid) * hf, valid * cf_new + (1 - valid) * cf
            decisions.append(b[:, 0])
        return m.classifier(hf), torch.stack(decisions, 1)

    results = []
    for forward in (liteeval.LiteEval.forward, held):
        model.zero_grad()
        logits, decisions = forward(model, glance, focus, mask, 0.5,
                                    torch.Generator().manual_seed(3))
        (logits.square().sum() + decisions.sum()).backward()
        results.append((logits.detach(), decisions.detach(),
                        [p.grad.clone() for p in model.parameters()]))
    (logits, decisions, grads), (logits_ref, decisions_ref, grads_ref) = results
    torch.testing.assert_close(logits, logits_ref)
    assert torch.equal(decisions, decisions_ref) and not decisions[~mask].any()
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)
