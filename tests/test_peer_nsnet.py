"""NSNet (agents/peers/nsnet.py): its pieces on hand-made examples, then the peer end to end
on the tiny synthetic pair (learning, the selection record and its cost, checkpoint, resume,
determinism, unseen feature variants)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from agents.peers import nsnet
from agents.peers.harness import FrameCosts, gather_batch, sample_frames, video_gflops
from features.pairs import FeaturePair, make_glance_features
from features.store import FeatureWriter
from features.synthetic import PRESETS, frame_units, generate

# test budgets: the default recipe with fewer gradient steps (the suite runs on 1 thread)
FAST = {"min_steps": 150, "max_steps": 150, "eval_every": 25}


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    """One NSNet trained through the comparison's runner (checkpoint + record in a folder)."""
    from benchmarks import comparison

    folder = tmp_path_factory.mktemp("peers")
    args = nsnet.NSNetArgs(**FAST)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(comparison.PEERS, "nsnet", (nsnet, nsnet.NSNetArgs))
        result = comparison.run_peer("nsnet", tiny_pair, args, folder, resume=False)
    return result, args, folder


# -- the pieces, on hand-made examples ---------------------------------------------------------


def test_pseudo_labels_from_known_prototypes():
    # two classes, prototypes (0, 0) and (3, 4): distances 0 and 5
    protos = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    d = nsnet.prototype_distances(x, protos)
    assert torch.allclose(d, torch.tensor([[0.0, 5.0], [5.0, 0.0], [5.0, 0.0]]), atol=1e-5)
    assert nsnet.distance_scale(d) == pytest.approx(5 / math.sqrt(2), rel=1e-5)
    g = nsnet.guiding_saliency(d, labels, temperature=5.0)  # softmax([0, -1]) etc.
    near, far = 1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))
    assert torch.allclose(g, torch.tensor([near, far, near]), atol=1e-6)
    target = nsnet.ns_targets(g, labels, num_classes=2)  # [g y_v, 1 - g]
    expected = torch.tensor([[near, 0, far], [far, 0, near], [0, near, far]])
    assert torch.allclose(target, expected, atol=1e-6)
    assert torch.allclose(target.sum(-1), torch.ones(3))
    # a transform (the standardization) is applied before the distance
    shifted = nsnet.prototype_distances(x + 10, protos, transform=lambda z: z - 10)
    assert torch.allclose(shifted, d, atol=1e-4)


def test_class_prototypes_follow_appendix_a1():
    # one feature per frame; three videos: labels 0, 1, 0
    feats = torch.tensor([[1.0], [2.0], [3.0], [4.0], [10.0], [20.0], [7.0]])
    probs = torch.tensor([
        [0.6, 0.4], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7],  # video 0: frames 0-2 correct
        [0.9, 0.1], [0.6, 0.4],  # video 1 (class 1): none correct -> top of all frames
        [0.7, 0.3],  # video 2: its one frame
    ])
    protos = nsnet.class_prototypes(feats, probs.log(), offsets=np.array([0, 4, 6]),
                                    lengths=np.array([4, 2, 1]), labels=np.array([0, 1, 0]),
                                    num_classes=3, top_percent=0.5)
    # video 0: the 2 most confident correct frames (1 and 2) -> 2.5; video 1: frame 5 -> 20;
    # video 2: 7; class 2 has no video: the mean of all guiding features
    assert torch.allclose(protos, torch.tensor([[(2.5 + 7) / 2], [20.0], [(2.5 + 20 + 7) / 3]]))


def test_index_union_on_hand_made_scores():
    s_f = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.3, 0.05]] * 3)
    s_v = torch.tensor([[0.5, 0.1, 0.2, 0.9, 0.0, 0.3],  # top-1 frame 3 not in the FSM top 2
                        [0.1, 0.9, 0.2, 0.3, 0.0, 0.4],  # top-1 frame 1 already chosen: fill
                        [0.9, 0.1, 0.2, 0.3, 0.0, 0.4]])  # only frames 0, 1 valid
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 2:] = False
    chosen = nsnet.index_union(s_f, s_v, mask, k=3, alpha=0.6)  # ceil(1.8) = 2 from s_f, 1 s_v
    assert [torch.nonzero(row).reshape(-1).tolist() for row in chosen] == [
        [1, 2, 3], [1, 2, 4], [0, 1]]
    # K = 5 (the paper's Table 2): 3 from the FSM list, 2 from the VGM list, exactly 5 frames
    chosen = nsnet.index_union(s_f[:1], s_v[:1], mask[:1], k=5, alpha=0.6)
    assert torch.nonzero(chosen[0]).reshape(-1).tolist() == [0, 1, 2, 3, 4]
    # K = 1: the FSM's top frame alone
    chosen = nsnet.index_union(s_f[:2], s_v[:2], mask[:2], k=1, alpha=0.6)
    assert chosen.sum(1).tolist() == [1, 1] and chosen[:, 1].all()


def test_head_cost_is_counted_multiply_by_multiply():
    args = nsnet.NSNetArgs()
    model = nsnet.NSNet(8, 16, 6, args)
    d, n = args.d_model, args.num_frames
    per = model.cost_per_frame("MACs")
    assert per["glanced"] == pytest.approx((8 * d + d * 7 + d) / 1e9)  # embed, FSM, attention
    assert per["focused"] == pytest.approx(16 * 6 / 1e9)  # the recognizer
    layer = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * d  # qkv, attention, proj, FFN
    assert per["video"] == pytest.approx(args.layers * layer / 1e9)
    assert model.cost_per_frame("FLOPs")["video"] == pytest.approx(2 * per["video"])


def test_record_counts_k_focused_and_16_glanced_frames_even_in_short_videos(tmp_path):
    lengths = (3, 10, 16, 40)
    rng = np.random.default_rng(0)
    paths = {}
    for name, dim, cost in (("glance", 8, 0.3), ("focus", 16, 4.0)):
        paths[name] = tmp_path / f"{name}.h5"
        with FeatureWriter(paths[name], feature_dim=dim, class_names=["a", "b"],
                           backbone=name, fps=1.0, gflops_per_frame=cost,
                           flops_unit="MACs") as writer:
            for i, n in enumerate(lengths):
                writer.add(f"v{i}", rng.normal(size=(n, dim)), i % 2, "test")
    pair = FeaturePair(paths["glance"], paths["focus"])
    args = nsnet.NSNetArgs()
    model = nsnet.NSNet(8, 16, 2, args).eval()
    costs = FrameCosts.from_pair(pair)
    result = nsnet.evaluate(model, pair.load("test"), costs, args)
    record = result.record
    assert record.frames_glanced.tolist() == [3, 10, 16, 16]
    assert record.frames_focused.tolist() == [3, 5, 5, 5]
    assert not (record.focused & ~record.glanced).any()  # focused among the observed frames
    per = model.cost_per_frame("MACs")
    head = record.frames_glanced * per["glanced"] + record.frames_focused * per["focused"]
    assert np.allclose(record.head_gflops, head + per["video"])
    assert np.allclose(video_gflops(record, costs),
                       record.frames_glanced * 0.3 + record.frames_focused * 4.0 + head
                       + per["video"])


# -- the peer on the tiny pair -------------------------------------------------------------


def test_learns_tiny_above_chance_and_its_record_is_charged_by_the_rule(trained, tiny_pair):
    result, args, _ = trained
    row = result["row"]
    chance = 100 / len(tiny_pair.class_names)
    assert row["name"] == "nsnet" and not result["resumed"]
    assert row["top1"] > chance + 20 and row["mAP"] > 60
    test = tiny_pair.load("test")
    costs = FrameCosts.from_pair(tiny_pair)
    scored = nsnet.evaluate(result["model"], test, costs, args)
    record = scored.record
    assert (record.frames_glanced == 16).all()  # tiny videos: 30-60 frames
    assert (record.frames_focused == args.k).all()
    assert not (record.focused & ~record.glanced).any()
    assert scored.gflops_per_video == pytest.approx(video_gflops(record, costs).mean())
    assert scored.row() == row
    floor = 16 * costs.glance + args.k * costs.focus
    assert floor < row["gflops_per_video"] < floor + 0.01  # heads are small but counted
    assert result["uniform"]["gflops_per_video"] >= row["gflops_per_video"]


def test_it_selects_the_salient_frames(trained, tiny_pair, tiny_dataset):
    """On the synthetic data the ground truth is known: frames of a semantic unit are salient,
    background and noise frames are not. The pseudo labels rate unit frames higher, and the
    selected frames are unit frames far more often than the observed frames are."""
    result, args, _ = trained
    model = result["model"]
    train = tiny_pair.load("train")
    g, _ = nsnet.pseudo_labels(model, train, args)
    units = np.concatenate(frame_units("tiny", 0, train.video_ids)) >= 0
    assert g[units].mean() > 1.5 * g[~units].mean()
    observed, selected = [], []
    for split in ("val", "test"):
        data = tiny_pair.load(split)
        truth = frame_units("tiny", 0, data.video_ids)
        frames, mask = sample_frames(data.lengths, args.num_frames)
        glance, focus = gather_batch(data, torch.arange(data.num_videos), frames)
        with torch.no_grad():
            _, chosen = model(glance, focus, mask)
        is_unit = torch.tensor(np.stack([u[f] >= 0 for u, f in zip(truth, frames.numpy(),
                                                                    strict=True)]))
        observed.append(is_unit[mask])
        selected.append(is_unit[chosen > 0])
    base, hit = torch.cat(observed).float().mean(), torch.cat(selected).float().mean()
    assert hit > base + 0.1, (float(hit), float(base))


def test_checkpoint_round_trip_gives_identical_scores(trained, tiny_pair):
    result, args, folder = trained
    model, loaded_args = nsnet.load(folder / "nsnet.pt")
    assert loaded_args == args
    assert torch.equal(model.norm_focus.mean, result["model"].norm_focus.mean)
    assert torch.equal(model.recognizer.weight, result["model"].recognizer.weight)
    costs = FrameCosts.from_pair(tiny_pair)
    test = tiny_pair.load("test")
    a = nsnet.evaluate(result["model"], test, costs, args)
    b = nsnet.evaluate(model, test, costs, args)
    assert np.array_equal(a.scores, b.scores) and a.row() == b.row()
    assert np.array_equal(a.record.focused, b.record.focused)


def test_resume_loads_the_finished_peer(trained, tiny_pair, monkeypatch):
    from benchmarks import comparison

    result, args, folder = trained
    monkeypatch.setitem(comparison.PEERS, "nsnet", (nsnet, nsnet.NSNetArgs))

    def no_training(*a, **kw):
        raise AssertionError("a finished peer was retrained under --resume")

    monkeypatch.setattr(nsnet, "train", no_training)
    resumed = comparison.run_peer("nsnet", tiny_pair, args, folder, resume=True)
    assert resumed["resumed"] and resumed["row"] == result["row"]
    assert resumed["uniform"] == result["uniform"] and resumed["args"] == asdict(args)
    saved = json.loads((folder / "nsnet.json").read_text())
    assert resumed["train"] == saved["train"]
    assert comparison.peer_latency_ms(resumed["model"], tiny_pair.load("test"),
                                      args.num_frames, videos=3) > 0
    with pytest.raises(AssertionError, match="retrained"):  # other arguments: retrained
        comparison.run_peer("nsnet", tiny_pair, replace(args, k=4), folder, resume=True)


def test_same_seed_same_numbers(tiny_pair):
    args = nsnet.NSNetArgs(min_steps=30, max_steps=30, eval_every=10)
    a, info_a = nsnet.train(tiny_pair, args)
    b, info_b = nsnet.train(tiny_pair, args)
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in info_a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "time_s"} for h in info_b["history"]]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    c, _ = nsnet.train(tiny_pair, replace(args, seed=1))
    assert not torch.equal(a.frame_head.weight, c.frame_head.weight)


@pytest.mark.parametrize("variant", [
    {"feature_scale": 100.0, "feature_dim": 40},
    {"nonnegative": True, "feature_scale": 0.01},
])
def test_defaults_work_on_features_they_were_not_tuned_for(variant, tmp_path):
    focus = generate(replace(PRESETS["tiny"], **variant), tmp_path / "focus.h5", seed=1,
                     progress=False)
    glance = make_glance_features(focus, tmp_path / "glance.h5", seed=1)
    result = nsnet.run(FeaturePair(glance, focus), nsnet.NSNetArgs(**FAST))
    assert result["row"]["top1"] > 100 / 6 + 20 and result["row"]["mAP"] > 55
