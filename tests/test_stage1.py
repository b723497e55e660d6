"""Metrics, per-segment frame selection and Stage I training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from agents.metrics import mean_average_precision, mean_true_class_probability, top1_accuracy
from agents.selection import evaluate_selection, expected_count, segment_bounds, select_frames
from agents.stage1 import BEST, LAST, LIGHT_RECOGNIZER, SELECTED, Stage1Config, train_stage1
from vimo_env.recognizer import Recognizer

SMALL_NET = {"hidden_dim": 32, "transformer_dim": 32, "transformer_layers": 1,
             "transformer_ff_dim": 64, "dropout": 0.1}
POLICIES = ["all", "initial", "uniform-25", "uniform-50", "random-25", "random-50"]


# ---------------------------------------------------------------- metrics
def test_map_hand_case():
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 0, 1])
    # class 0 ranking by score: v0 (+), v1 (-), v2 (+), v3 (-) -> AP = (1/1 + 2/3) / 2
    # class 1 ranking: v3 (+), v2 (-), v1 (+), v0 (-) -> AP = (1/1 + 2/3) / 2
    assert mean_average_precision(scores, labels) == pytest.approx(100 * 5 / 6)
    assert top1_accuracy(scores, labels) == pytest.approx(50.0)
    # true-class scores 0.9, 0.4, 0.3, 0.8
    assert mean_true_class_probability(scores, labels) == pytest.approx(0.6)
    perfect = np.eye(3)[[0, 1, 2, 2]]
    assert mean_average_precision(perfect, np.array([0, 1, 2, 2])) == pytest.approx(100.0)


def test_map_skips_absent_classes_and_rejects_bad_input():
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])
    # class 2 has no positive video: skipped, not counted as 0
    assert mean_average_precision(scores, np.array([0, 1])) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="labels"):
        mean_average_precision(scores, np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(np.full((2, 3), np.nan), np.array([0, 1]))
    with pytest.raises(ValueError, match="scores"):
        top1_accuracy(np.ones(3), np.array([0]))
    with pytest.raises(ValueError, match="labels"):
        mean_true_class_probability(scores, np.array([0]))


# ---------------------------------------------------------------- selection
@pytest.mark.parametrize("policy", POLICIES)
def test_selection_invariants(policy):
    rng = np.random.default_rng(0)
    lengths = np.array([3, 4, 10, 37, 60, 121, 180])
    N = 3
    idx, mask = select_frames(lengths, N, policy, rng)
    assert idx.dtype == np.int64 and mask.dtype == bool and idx.shape == mask.shape
    assert idx.shape[:2] == (len(lengths), N)
    bounds = segment_bounds(lengths, N)
    for b, T in enumerate(lengths):
        for i in range(N):
            s, e = bounds[b, i], bounds[b, i + 1]
            assert s == (i * T) // N
            frames = idx[b, i][mask[b, i]]
            assert mask[b, i, : len(frames)].all()  # real frames first, padding after
            assert frames[0] == s  # initial frame always included
            assert np.all(np.diff(frames) > 0)  # temporal order, no repeats
            assert frames.min() >= s and frames.max() < e  # within the segment
            assert len(frames) == expected_count(e - s, policy)
    assert mask.any(axis=-1).all()
    assert (idx >= 0).all() and (idx < lengths[:, None, None]).all()  # padding is a valid index


def test_selection_counts_and_uniform_spacing():
    idx, mask = select_frames(np.array([120]), 3, "uniform-25", None)
    assert mask.sum() == 30
    np.testing.assert_array_equal(idx[0, 1], 40 + 4 * np.arange(10))
    idx, mask = select_frames(np.array([120]), 3, "all", None)
    np.testing.assert_array_equal(idx[0][mask[0]], np.arange(120))


def test_random_selection_deterministic_and_varied():
    lengths = np.full(200, 90)
    a = select_frames(lengths, 3, "random-25", np.random.default_rng(1))
    b = select_frames(lengths, 3, "random-25", np.random.default_rng(1))
    c = select_frames(lengths, 3, "random-25", np.random.default_rng(2))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    # every non-initial frame of a segment is picked about equally often
    picked = np.bincount(a[0][a[1]] % 30, minlength=30)[1:]
    assert picked.min() > 0.5 * picked.mean()


def test_selection_bad_input():
    with pytest.raises(ValueError, match="policy"):
        select_frames(np.array([30]), 3, "random-0", np.random.default_rng(0))
    with pytest.raises(ValueError, match="policy"):
        select_frames(np.array([30]), 3, "best", np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        select_frames(np.array([30]), 3, "random-25", None)
    with pytest.raises(ValueError, match="num_locators"):
        select_frames(np.array([2]), 3, "all", None)


# ---------------------------------------------------------------- Stage I
def _config(tmp_path, steps, **kw):
    return Stage1Config(steps=steps, batch_size=16, lr=3e-3, seed=0, recognizer=SMALL_NET,
                        evaluations=4, device="cpu", out_dir=str(tmp_path), **kw)


def test_stage1_learns_tiny(tiny_dataset, tmp_path):
    model, history = train_stage1(tiny_dataset, _config(tmp_path, 40), progress=False)
    assert [e["step"] for e in history["evaluations"]] == [10, 20, 30, 40]
    losses = [e["loss"] for e in history["evaluations"]]
    assert losses[-1] < 0.8 * losses[0]
    final = history["final"]
    chance_map = 100 / 6 * 1.5  # mAP of random scores is about the class prior, 1/6
    assert final["all"]["mAP"] > 2 * chance_map
    assert final["random-25"]["mAP"] > chance_map
    assert final["all"]["frame_rate"] == pytest.approx(100.0)
    assert (tmp_path / BEST).exists() and (tmp_path / LAST).exists()
    # the paper's recognizer and the light alternative both trained; the val-best one kept
    candidates = history["candidates"]
    assert [c["recognizer"] for c in candidates] == [SMALL_NET, LIGHT_RECOGNIZER]
    assert (tmp_path / "alternative1" / BEST).exists()
    scores = [c["best_val_mAP"] for c in candidates]
    assert history["chosen"] == scores.index(max(scores))
    assert history["best_val_mAP"] == max(scores)
    selected = Recognizer.load(tmp_path / SELECTED)
    assert selected.config.temporal == candidates[history["chosen"]]["recognizer"].get(
        "temporal", "lstm")
    again = evaluate_selection(selected, tiny_dataset, "all", split="test", device="cpu")
    assert again["mAP"] == pytest.approx(final["all"]["mAP"])
    assert history["best_val_mAP"] == max(e["val_mAP"] for e in history["evaluations"])


def test_stage1_without_alternatives_trains_one_recognizer(tiny_dataset, tmp_path):
    model, history = train_stage1(tiny_dataset, _config(tmp_path, 10, alternatives=()),
                                  progress=False)
    assert len(history["candidates"]) == 1 and history["chosen"] == 0
    assert not (tmp_path / "alternative1").exists()
    assert model.config.temporal == "lstm" and model.config.pooled_linear


def test_stage1_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    straight, h_straight = train_stage1(tiny_dataset, _config(tmp_path / "a", 40), progress=False)
    ckpt_a = torch.load(tmp_path / "a" / LAST, weights_only=False)
    assert ckpt_a["step"] == 40
    # killed right after the second of four checkpoints (step 20), then resumed
    partial = _config(tmp_path / "c", 40)
    _run_until(tiny_dataset, partial, stop_at=20)
    assert torch.load(tmp_path / "c" / LAST, weights_only=False)["step"] == 20
    resumed, h_resumed = train_stage1(tiny_dataset, partial, resume=True, progress=False)
    assert len(h_resumed["evaluations"]) == 4
    for a, b in zip(h_straight["evaluations"], h_resumed["evaluations"], strict=True):
        assert a["loss"] == b["loss"] and a["val_mAP"] == b["val_mAP"]
    last_c = torch.load(tmp_path / "c" / LAST, weights_only=False)["model"]
    for k in ckpt_a["model"]:
        assert torch.equal(ckpt_a["model"][k], last_c[k]), k
    assert h_straight["final"] == h_resumed["final"]


def _run_until(dataset, config, stop_at):
    """Train ``config`` but die (as a kill would) right after the checkpoint at ``stop_at``."""
    import agents.stage1 as stage1

    class Killed(Exception):
        pass

    real_save = stage1.torch_save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj.get("step") == stop_at:
            raise Killed

    stage1.torch_save_atomic = save_then_die
    try:
        with pytest.raises(Killed):
            train_stage1(dataset, config, progress=False)
    finally:
        stage1.torch_save_atomic = real_save


def test_stage1_resume_rejects_changed_settings(tiny_dataset, tmp_path):
    train_stage1(tiny_dataset, _config(tmp_path, 10), progress=False)
    changed = Stage1Config(steps=20, batch_size=8, lr=3e-3, recognizer=SMALL_NET, device="cpu",
                           out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="batch_size"):
        train_stage1(tiny_dataset, changed, resume=True, progress=False)
    with pytest.raises(ValueError, match="recognizer"):
        Stage1Config(recognizer={"hiden_dim": 3})
    with pytest.raises(ValueError, match="steps"):
        Stage1Config(steps=2.5)


def test_stage1_budget_scales_with_the_train_split():
    config = Stage1Config()
    assert config.budget(100) == config.min_steps  # few videos: more passes, same updates
    per_epoch = -(-3000 // config.batch_size)
    assert config.budget(3000) == max(config.min_steps,
                                      min(int(config.epochs_target * per_epoch), config.max_steps))
    assert config.budget(10**6) == config.max_steps
    assert Stage1Config(steps=7).budget(10**6) == 7


@pytest.mark.parametrize("scale,dim,nonneg", [(0.01, 64, False), (100.0, 300, True)])
def test_stage1_learns_at_extreme_scales_and_dimensions(tmp_path, scale, dim, nonneg):
    """Stage I learns well above chance whatever the features' scale, dimension and sign: the
    recognizer normalizes its inputs with train statistics."""
    from features.synthetic import PRESETS, generate

    config = dataclasses.replace(PRESETS["tiny"], feature_scale=scale, feature_dim=dim,
                                 nonnegative=nonneg, num_videos=240, dtype="float32")
    path = generate(config, tmp_path / "data.h5", seed=1, progress=False)
    model, history = train_stage1(path, _config(tmp_path / "run", 120, final_split="test"),
                                  progress=False)
    mean, std = model.input_mean, model.input_std
    assert 0.1 * scale < float(std.median()) < 10 * scale  # statistics of the raw features
    assert history["final"]["random-25"]["mAP"] > 2.5 * (100 / 6)
    # the statistics travel with the checkpoint
    loaded = Recognizer.load(tmp_path / "run" / BEST)
    assert torch.equal(loaded.input_mean, mean) and torch.equal(loaded.input_std, std)
