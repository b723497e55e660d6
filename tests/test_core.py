"""The batched locator core against hand-computed cases (SPEC section 2)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from env_helpers import ArraySource, tiny_recognizer

from vimo_env.core import LocatorCore, VideoSampler, observed_step

LENGTHS = [10, 7, 2, 1, 13, 4, 30]


def make_core(lengths=LENGTHS, *, locators=3, batch=None, seed=0, **kw):
    source = ArraySource(lengths, dim=4, classes=3, seed=seed)
    rec = tiny_recognizer(4, 3, locators, seed=seed)
    core = LocatorCore(source, rec, num_locators=locators, device="cpu", batch_size=batch, **kw)
    return core, source, rec


@pytest.mark.parametrize(
    "length, locators, expected",
    [(10, 3, [0, 3, 6]), (7, 3, [0, 2, 4]), (2, 3, [0, 0, 1]), (1, 3, [0, 0, 0]),
     (13, 5, [0, 2, 5, 7, 10]), (10, 1, [0]), (4, 2, [0, 2])],
)
def test_placement_and_initial_frames(length, locators, expected):
    core, source, rec = make_core([length], locators=locators)
    obs = core.reset(torch.tensor([0]))
    assert obs.positions[0].tolist() == expected
    assert obs.frames_observed[0].tolist() == [1] * locators
    assert obs.alive[0].all()
    assert sorted(source.requests) == sorted((0, p) for p in expected)
    assert source.begun == [[0]]
    # h_i = F_T^i(X[p_i], h_init); P_0 from all embeddings; observation layout
    frames = torch.stack([source.frame(0, p) for p in expected]).unsqueeze(0)
    state = rec.observe(rec.initial_state(1), frames)
    torch.testing.assert_close(core.state, state)
    p0 = rec.probs(state)[0, 0]  # label of video 0 is 0
    assert core.p_gt[0].item() == pytest.approx(p0.item(), abs=1e-6)
    ob = obs.observation[0]
    assert ob.shape == (locators, 8 + 3) and ob.dtype == torch.float32
    torch.testing.assert_close(ob[:, :8], rec.embeddings(state)[0])
    torch.testing.assert_close(ob[:, 8], torch.full((locators,), 1 / 5))
    torch.testing.assert_close(ob[:, 9], torch.tensor(expected) / max(length - 1, 1))
    assert ob[:, 10].tolist() == [0.0] * locators


def test_clamp_at_last_frame_and_stop_there():
    core, source, _ = make_core([10])
    core.reset(torch.tensor([0]))
    source.requests.clear()
    out = core.step(torch.tensor([[3, 3, 3]]))  # 0+9, 3+9 -> 9, 6+9 -> 9
    assert core.positions[0].tolist() == [9, 9, 9]
    assert out.new_frames.tolist() == [3]
    assert core.alive[0].tolist() == [True, True, True]
    assert sorted(source.requests) == [(0, 9)] * 3
    source.requests.clear()
    out = core.step(torch.tensor([[1, 0, 2]]))  # at T-1 a move stops instead
    assert source.requests == []
    assert out.new_frames.tolist() == [0]
    assert out.done.tolist() == [True]
    assert core.frames_observed[0].tolist() == [2, 2, 2]
    rec = out.finished.records()[0]
    assert rec.trajectories == [[0, 9], [3, 9], [6, 9]]
    assert rec.frames == 6 and rec.frame_rate == pytest.approx(0.6)


def test_max_moves_and_stride():
    core, source, _ = make_core([100], locators=1, max_moves=2, stride=5)
    core.reset(torch.tensor([0]))
    out = core.step(torch.tensor([[1]]))
    assert core.positions.tolist() == [[5]] and not out.done[0]
    out = core.step(torch.tensor([[2]]))  # second move is the last: stops after observing
    assert core.positions.tolist() == [[15]]
    assert core.frames_observed.tolist() == [[3]]
    assert out.done.tolist() == [True] and not core.alive[0, 0]
    assert out.finished.records()[0].trajectories == [[0, 5, 15]]
    with pytest.raises(RuntimeError, match="no running episode"):
        core.step(torch.tensor([[1]]))


def test_stopped_locators_keep_state_and_ignore_actions():
    core, source, _ = make_core([30], max_moves=4)
    core.reset(torch.tensor([0]))
    core.step(torch.tensor([[0, 1, 1]]))
    frozen = core.state[0, 0].clone()
    source.requests.clear()
    core.step(torch.tensor([[3, 1, 0]]))  # locator 0 is stopped: its 3 is ignored
    assert core.positions[0].tolist() == [0, 16, 23]
    assert source.requests == [(0, 16)]
    torch.testing.assert_close(core.state[0, 0], frozen)


def run_random(core, videos, seed, steps_cap=20):
    """Random actions until every row ends; returns per-row rewards, P_0, records."""
    gen = torch.Generator().manual_seed(seed)
    obs = core.reset(torch.as_tensor(videos))
    p0 = obs.p_gt.clone()
    rewards = torch.zeros(len(videos), dtype=torch.float64)
    records = {}
    history = []
    for _ in range(steps_cap):
        running = (~core.done).nonzero(as_tuple=True)[0]
        if len(running) == 0:
            break
        acts = torch.randint(0, 4, (len(videos), core.num_locators), generator=gen)
        out = core.step(acts[running], rows=running)
        rewards[running] += out.reward.double()
        history.append((running.clone(), acts[running].clone(), out.reward.clone(),
                        out.observation.clone()))
        if out.finished is not None:
            for r in out.finished.records():
                records[r.row] = r
    return rewards, p0, records, history


def test_rewards_telescope_to_final_minus_initial_minus_cost():
    core, source, _ = make_core(frame_cost=0.07)
    videos = list(range(len(LENGTHS)))
    rewards, p0, records, _ = run_random(core, videos, seed=3)
    assert len(records) == len(videos)
    for row, rec in records.items():
        p_end = rec.scores[rec.label]
        expected = p_end - p0[row].item() - 0.07 * (rec.frames - 3)
        assert rewards[row].item() == pytest.approx(expected, abs=1e-5)
        assert rec.frames == sum(len(t) for t in rec.trajectories)
        assert rec.frame_rate == pytest.approx(rec.frames / LENGTHS[rec.video])
        assert rec.correct == (int(np.argmax(rec.scores)) == rec.label)
        assert rec.scores.sum() == pytest.approx(1.0, abs=1e-5)


def test_batched_core_matches_single_video_cores():
    videos = [0, 1, 2, 3, 4, 5, 6, 6]
    core, _, _ = make_core(batch=len(videos))
    _, p0, records, history = run_random(core, videos, seed=11)
    for row, video in enumerate(videos):
        single, _, _ = make_core(batch=1)
        obs = single.reset(torch.tensor([video]))
        assert obs.p_gt[0].item() == pytest.approx(p0[row].item(), abs=1e-6)
        for running, acts, reward, observation in history:
            hit = (running == row).nonzero(as_tuple=True)[0]
            if len(hit) == 0:
                continue
            k = hit.item()
            out = single.step(acts[k : k + 1])
            assert out.reward[0].item() == pytest.approx(reward[k].item(), abs=1e-6)
            torch.testing.assert_close(out.observation[0], observation[k], atol=1e-6, rtol=0)
        rec = records[row]
        assert single.done[0]
        assert single.frames_observed[0].sum().item() == rec.frames
        traj = [[p for p in t if p >= 0] for t in single.trajectories[0].tolist()]
        assert traj == rec.trajectories


@pytest.mark.parametrize(
    "actions, error, match",
    [([[4, 0, 0]], ValueError, "0..3"), ([[-1, 0, 0]], ValueError, "0..3"),
     ([[0, 0]], ValueError, "shape"), ([0, 0, 0], ValueError, "shape"),
     ([[float("nan"), 0, 0]], ValueError, "NaN"), ([[1.5, 0, 0]], ValueError, "whole"),
     ([[True, False, False]], TypeError, "integers")],
)
def test_invalid_actions_are_rejected(actions, error, match):
    core, _, _ = make_core([10])
    core.reset(torch.tensor([0]))
    before = core.positions.clone()
    with pytest.raises(error, match=match):
        core.step(torch.tensor(actions))
    assert torch.equal(core.positions, before)  # nothing moved


def test_integral_float_actions_accepted_and_dead_locator_range_checked():
    core, _, _ = make_core([30])
    core.reset(torch.tensor([0]))
    core.step(torch.tensor([[0.0, 1.0, 2.0]]))
    assert core.positions[0].tolist() == [0, 13, 26]
    with pytest.raises(ValueError, match="0..3"):
        core.step(torch.tensor([[7, 1, 1]]))  # locator 0 is dead, 7 is still invalid


def test_step_before_reset_and_inactive_rows():
    core, _, _ = make_core(batch=3)
    with pytest.raises(RuntimeError, match="no running episode"):
        core.step(torch.zeros(3, 3, dtype=torch.long))
    core.reset(torch.tensor([4]), rows=torch.tensor([1]))
    assert core.active.tolist() == [False, True, False]
    with pytest.raises(RuntimeError, match=r"rows \[0\]"):
        core.step(torch.ones(1, 3, dtype=torch.long), rows=torch.tensor([0]))
    out = core.step(torch.ones(1, 3, dtype=torch.long), rows=torch.tensor([1]))
    assert out.rows.tolist() == [1]
    with pytest.raises(IndexError):
        core.reset(torch.tensor([99]), rows=torch.tensor([0]))
    with pytest.raises(IndexError):
        core.reset(torch.tensor([0]), rows=torch.tensor([5]))


def test_partial_reset_and_step_leave_other_rows_untouched():
    core, _, _ = make_core(batch=4)
    core.reset(torch.tensor([0, 4, 6, 1]))
    core.step(torch.tensor([[1, 1, 1]] * 4))
    snapshot = {k: getattr(core, k).clone() for k in ("state", "positions", "frames_observed",
                                                      "observation", "p_gt", "alive")}
    core.step(torch.tensor([[2, 0, 1], [1, 1, 1]]), rows=torch.tensor([1, 3]))
    for name, before in snapshot.items():
        now = getattr(core, name)
        assert torch.equal(now[[0, 2]], before[[0, 2]]), name
        assert not torch.equal(now[[1, 3]], before[[1, 3]]) or name == "alive", name
    core.reset(torch.tensor([2]), rows=torch.tensor([2]))
    assert core.videos.tolist() == [0, 4, 2, 1]
    assert core.positions[2].tolist() == [0, 0, 1]
    assert core.steps.tolist() == [1, 2, 0, 2]
    assert torch.equal(core.state[0], snapshot["state"][0])


def test_without_rewards_same_episodes_and_single_final_prediction():
    videos = list(range(len(LENGTHS)))
    full, _, _ = make_core(frame_cost=0.1)
    lean, _, _ = make_core(frame_cost=0.1, compute_rewards=False)
    _, _, rec_full, hist_full = run_random(full, videos, seed=5)
    obs = lean.reset(torch.tensor(videos))
    assert torch.isnan(obs.p_gt).all()
    rewards, _, rec_lean, hist_lean = run_random(lean, videos, seed=5)
    for (rows_a, acts_a, _, obs_a), (rows_b, acts_b, _, obs_b) in zip(
            hist_full, hist_lean, strict=True):
        assert torch.equal(rows_a, rows_b) and torch.equal(acts_a, acts_b)
        torch.testing.assert_close(obs_a, obs_b)
    for row in rec_full:
        a, b = rec_full[row], rec_lean[row]
        assert (a.frames, a.trajectories, a.correct) == (b.frames, b.trajectories, b.correct)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        assert rewards[row].item() == pytest.approx(-0.1 * (b.frames - 3), abs=1e-6)
        assert lean.p_gt[row].item() == pytest.approx(b.scores[b.label], abs=1e-6)


def test_counting_costs_leaves_the_global_random_stream_alone():
    """Recognizer.flops runs a train-mode pass (dropout): it must not shift the caller's RNG,
    or evaluating a policy (which counts costs) would change the training that follows."""
    recognizer = tiny_recognizer()
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    cost = recognizer.flops()
    assert torch.equal(torch.rand(4), expected)
    assert cost["temporal_per_frame"] > 0 and not recognizer.training  # mode restored


def test_gflops_accounting_in_the_files_unit():
    for unit, factor in (("MACs", 0.5), ("FLOPs", 1.0)):
        source = ArraySource([20], dim=4, classes=3, gflops_per_frame=2.0, flops_unit=unit)
        rec = tiny_recognizer()
        cost = rec.flops()
        core = LocatorCore(source, rec, device="cpu")
        core.reset(torch.tensor([0]))
        out = core.step(torch.tensor([[1, 0, 0]]))
        out = core.step(torch.tensor([[0, 0, 0]]))
        record = out.finished.records()[0]
        assert record.frames == 4 and record.flops_unit == unit
        expected = 4 * 2.0 + (4 * cost["temporal_per_frame"] + cost["integration"]) * factor / 1e9
        assert record.gflops == pytest.approx(expected, rel=1e-9)
    # LSTM gates: one [D+H] x [4H] matmul per frame, plus the pooled linear path's [D] x [C],
    # 2 FLOPs per multiply-add
    assert cost["temporal_per_frame"] == 2 * (4 + 8) * 32 + 2 * 4 * 3


def test_only_visited_frames_are_requested():
    core, source, _ = make_core()
    videos = list(range(len(LENGTHS)))
    _, _, records, _ = run_random(core, videos, seed=9)
    requested = sorted(source.requests)
    visited = sorted((rec.video, p) for rec in records.values() for t in rec.trajectories
                     for p in t)
    assert requested == visited


def test_bad_inputs_name_the_problem():
    core, source, _ = make_core([10])
    source.corrupt = True
    with pytest.raises(ValueError, match="non-finite"):
        core.reset(torch.tensor([0]))
    source = ArraySource([10], dim=5)
    with pytest.raises(ValueError, match="feature_dim"):
        LocatorCore(source, tiny_recognizer(4), device="cpu")
    with pytest.raises(ValueError, match="num_locators"):
        LocatorCore(ArraySource([10]), tiny_recognizer(locators=2), device="cpu")
    with pytest.raises(ValueError, match="max_moves"):
        LocatorCore(ArraySource([10]), tiny_recognizer(), max_moves=0, device="cpu")
    with pytest.raises(TypeError, match="integer"):
        make_core()[0].reset(torch.tensor([0.5]))


def test_pooling_recognizer_and_global_state():
    source = ArraySource(LENGTHS)
    rec = tiny_recognizer(temporal="meanpool", integration="forward")
    core = LocatorCore(source, rec, device="cpu")
    assert core.observation_bounds() == (-np.inf, np.inf)
    core.reset(torch.arange(len(LENGTHS)))
    gs = core.global_state()
    assert gs.shape == (len(LENGTHS), 3 * core.obs_dim + 3)
    torch.testing.assert_close(gs[:, : core.obs_dim], core.observation[:, 0])
    assert gs[:, -3:].eq(1).all()


def test_sampler_seeded_and_sweep():
    a, b = VideoSampler(50, "random", seed=4), VideoSampler(50, "random", seed=4)
    assert a.draw(20).tolist() == b.draw(20).tolist()
    sweep = VideoSampler(5, "sweep")
    assert sweep.draw(3).tolist() == [0, 1, 2] and sweep.draw(4).tolist() == [3, 4, 0, 1]
    with pytest.raises(ValueError, match="sampler"):
        VideoSampler(5, "shuffle")


def test_eval_transformer_path_matches_torch_module():
    rec = tiny_recognizer(transformer_layers=2)
    emb = torch.randn(5, 3, 8).tanh()
    with torch.no_grad():
        fast = rec.eval().logits_from_embeddings(emb)
        tokens = rec.to_model(emb) + rec.locator_embedding
        reference = rec.classifier(rec.integrate(tokens).mean(dim=1))  # torch's own eval path
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_difference_credit_is_team_reward_minus_reward_had_the_locator_stopped():
    core, _, _ = make_core(batch=5, frame_cost=0.03, locator_credit=True)
    core.reset(torch.tensor([0, 1, 4, 6, 6]))
    assert torch.equal(core.credit, torch.zeros(5, 3))
    gen = torch.Generator().manual_seed(5)
    checked = 0
    while not bool(core.done.all()):
        rows = (~core.done).nonzero(as_tuple=True)[0]
        acts = torch.randint(0, 4, (len(rows), 3), generator=gen)
        stopped_reward = []
        for i in range(3):  # the same step on a copy where locator i alone stops
            alt = acts.clone()
            alt[:, i] = 0
            stopped_reward.append(copy.deepcopy(core).step(alt, rows=rows).reward)
        out = core.step(acts, rows=rows)
        expected = out.reward[:, None] - torch.stack(stopped_reward, 1)
        torch.testing.assert_close(core.credit[rows], expected, atol=1e-6, rtol=0)
        assert torch.equal(core.credit[rows][~out.moved], torch.zeros(int((~out.moved).sum())))
        checked += int(out.moved.sum())
    assert checked > 10


def test_difference_credit_of_a_single_locator_is_the_team_reward():
    core, _, _ = make_core(locators=1, batch=7, frame_cost=0.01, locator_credit=True)
    core.reset(torch.arange(7))
    out = core.step(torch.tensor([[1], [2], [3], [1], [0], [2], [3]]))
    torch.testing.assert_close(core.credit[:, 0], out.reward, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="locator_credit needs compute_rewards"):
        make_core(locator_credit=True, compute_rewards=False)


@pytest.mark.parametrize("rows", [None, torch.tensor([0, 2, 3])])
def test_returned_tensors_are_not_overwritten_by_later_steps(rows):
    """A caller that keeps ``out.observation``, ``alive``, ``p_gt`` ... of one step must still
    hold that step's values after the next steps (the core writes its buffers in place)."""
    core, _, _ = make_core([30, 40, 50, 60], batch=4)
    k = 4 if rows is None else len(rows)
    fields = ("observation", "alive", "positions", "frames_observed", "p_gt", "rows")
    kept, snapshots = [], []
    out = core.reset(torch.arange(4))
    for _ in range(4):  # m = 4 moves of one stride: no row reaches its last frame
        kept.append(out)
        snapshots.append({f: getattr(out, f).clone() for f in fields})
        out = core.step(torch.ones(k, 3, dtype=torch.long), rows=rows)
    assert bool(out.done.all())
    for out, snap in zip(kept, snapshots, strict=True):
        for f in fields:
            assert torch.equal(getattr(out, f), snap[f]), f


def test_labels_outside_the_recognizers_classes_are_refused_when_the_core_is_built():
    """A custom source whose labels exceed the recognizer's classes must fail at construction
    with a message naming both, not inside a step's gather (a device-side assert on CUDA)."""
    for label in (3, -2):
        source = ArraySource([10, 12], labels=[0, label], classes=3)
        with pytest.raises(ValueError, match=rf"'labels'.*'v1'.*label {label}.*num_classes=3"):
            LocatorCore(source, tiny_recognizer(), device="cpu")
    LocatorCore(ArraySource([10, 12], labels=[-1, 2]), tiny_recognizer(), device="cpu")


def test_integer_settings_are_never_truncated():
    """max_moves=2.9 used to become 2 through int(); non-integers (bools too) are refused."""
    for name, bad in (("max_moves", 2.9), ("stride", 3.0), ("stride", True), ("max_moves", "4"),
                      ("num_locators", 3.5), ("batch_size", 2.5)):
        kw = {"num_locators": 3, name: bad}
        with pytest.raises(TypeError, match=rf"{name} must be an integer"):
            LocatorCore(ArraySource([10]), tiny_recognizer(), device="cpu", **kw)
    core = LocatorCore(ArraySource([10]), tiny_recognizer(), device="cpu",
                       max_moves=np.int64(2), stride=torch.tensor(1), batch_size=np.int32(2))
    assert (core.max_moves, core.stride, core.batch_size) == (2, 1, 2)
    assert type(core.max_moves) is int and type(core.stride) is int


def test_a_source_on_another_device_is_refused_naming_both(tmp_path):
    """Features on one device and the core on another used to fail later with an opaque
    indexing error; construction now names both devices (meta stands in for a GPU here)."""
    from env_helpers import write_tiny_h5

    from features.source import CachedFrameSource

    path = write_tiny_h5(tmp_path / "feats.h5", [10, 12])
    source = CachedFrameSource(path, split="train", device="meta")
    with pytest.raises(ValueError, match=r"feats\.h5.*on meta but the env runs on cpu"):
        LocatorCore(source, tiny_recognizer(), device="cpu")
    moved = ArraySource([10])
    moved.device = torch.device("meta")
    with pytest.raises(ValueError, match="ArraySource.*on meta but the env runs on cpu"):
        LocatorCore(moved, tiny_recognizer(), device="cpu")
    from vimo_env.core import same_device

    assert same_device("cpu", torch.device("cpu")) and not same_device("cpu", "meta")


def test_action_mask_stop_always_moves_only_before_the_last_frame():
    """Batched legal actions: stop always; a locator at T-1 or a stopped one may only stop."""
    core, _, _ = make_core([10, 1, 2, 13], batch=4, max_moves=2)
    out = core.reset(torch.arange(4))

    def by_hand():
        mask = torch.zeros(4, 3, 4, dtype=torch.bool)
        for b in range(4):
            for i in range(3):
                mask[b, i, 0] = True
                movable = bool(core.alive[b, i]) and int(core.positions[b, i]) < int(
                    core.lengths[b]) - 1
                mask[b, i, 1:] = movable
        return mask

    assert torch.equal(out.action_mask, by_hand())
    assert not out.action_mask[1, :, 1:].any()  # T = 1: every locator starts on the last frame
    assert out.action_mask[0].all()
    gen = torch.Generator().manual_seed(0)
    while not bool(core.done.all()):
        rows = (~core.done).nonzero(as_tuple=True)[0]
        out = core.step(torch.randint(0, 4, (len(rows), 3), generator=gen), rows=rows)
        expected = by_hand()
        assert torch.equal(core.action_mask(), expected)
        assert torch.equal(out.action_mask, expected[rows])
        assert out.action_mask[..., 0].all()  # never all-false
        assert not (out.action_mask[..., 1:] & ~out.alive[..., None]).any()
    assert not core.action_mask()[..., 1:].any()  # everyone stopped


def test_auto_device_keeps_small_batches_on_the_cpu(monkeypatch):
    """device="auto" picks CUDA for batched envs only: a batch-1 env (PettingZoo, single
    Gymnasium) would spend a step on kernel launches and host transfers."""
    from features import device as device_module

    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    resolve = device_module.resolve_device
    minimum = device_module.AUTO_CUDA_MIN_BATCH
    assert resolve("auto").type == "cuda"
    assert resolve("auto", batch_size=1).type == "cpu"
    assert resolve("auto", batch_size=minimum - 1).type == "cpu"
    assert resolve("auto", batch_size=minimum).type == "cuda"
    assert resolve("cpu", batch_size=10_000).type == "cpu"
    # the env builder follows a given source's device under "auto"
    from vimo_env.core import build_core

    core = build_core(ArraySource([10]), tiny_recognizer(), split=None, num_locators=3,
                      max_moves=2, stride=1, frame_cost=0.0, device="auto", seed=0,
                      compute_rewards=True, batch_size=1)
    assert core.device.type == "cpu"


def test_dense_gather_of_a_cheap_source_equals_reading_only_the_moved_frames():
    """A cheap source (in memory) is read at every locator's position each step, with no
    nonzero() and so no device sync; a decoder-backed one only where locators moved. Both
    give the same episodes."""
    lengths = [9, 14, 3, 20, 11]
    sparse, _, _ = make_core(lengths, batch=5, locator_credit=True)
    dense, dense_source, _ = make_core(lengths, batch=5, locator_credit=True)
    dense_source.cheap_gather = True
    reads = []
    original = dense_source.gather_in_range
    dense_source.gather_in_range = lambda v, f: reads.append(len(v)) or original(v, f)
    gen = torch.Generator().manual_seed(3)
    a, b = sparse.reset(torch.arange(5)), dense.reset(torch.arange(5))
    while not bool(sparse.done.all()):
        actions = torch.randint(0, 4, (5, 3), generator=gen)
        live = ~sparse.done
        a = sparse.step(actions[live], rows=live.nonzero().squeeze(1))
        b = dense.step(actions[live], rows=live.nonzero().squeeze(1))
        for field in ("observation", "p_gt", "reward", "moved", "done"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field))
    assert reads and all(n % 3 == 0 for n in reads)  # every locator of every stepped row
    torch.testing.assert_close(sparse.trajectories, dense.trajectories)


def test_observed_step_reads_the_step_counter_back_from_every_observation():
    """observed_step (what a fixed schedule acts on) equals the core's step counter on every
    row and locator, through a whole episode, for m = 4 and m = 6."""
    for m in (4, 6):
        core, _, _ = make_core([100, 40], locators=3, max_moves=m)
        core.reset(torch.tensor([0, 1]))
        for _ in range(m):
            got = observed_step(core.observation, m)
            assert torch.equal(got, core.steps.unsqueeze(1).expand(-1, 3))
            out = core.step(torch.ones(2, 3, dtype=torch.long))
        assert out.done.all()
