"""Augmentations of SAC's training episodes: feature noise (agents.augment: the noise itself
and its calibration rule), start jitter (LocatorCore.set_start_jitter), and the trainer
settings that turn them on."""

from __future__ import annotations

import json

import pytest
import torch
from env_helpers import tiny_recognizer, write_tiny_h5

from agents.augment import FeatureNoiseSource, calibrate_noise
from agents.trainer import ThreeStageTrainer, TrainerConfig, source_for
from vimo_env.core import LocatorCore

LENGTHS = [9, 12, 10, 11, 8, 12]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("augment") / "f.h5"
    return write_tiny_h5(path, LENGTHS * 2, splits=["train"] * 6 + ["val"] * 6)


def test_noise_has_the_asked_scale_and_is_seeded(tiny_file):
    train = source_for(tiny_file, "train")
    videos = torch.tensor([0, 1, 2, 3] * 500)
    frames = torch.tensor([3, 0, 7, 5] * 500)
    clean = train.gather(videos, frames)
    scale = torch.tensor([0.0, 0.5, 1.0, 2.0])
    noisy = FeatureNoiseSource(train, scale, seed=3)
    first = noisy.gather(videos, frames)
    assert first.shape == clean.shape and first.dtype == torch.float32
    std = (first - clean).std(0)
    assert std[0] == 0 and torch.allclose(std[1:], scale[1:], rtol=0.1)
    assert not torch.equal(first, noisy.gather(videos, frames))  # fresh noise per read
    again = FeatureNoiseSource(train, scale, seed=3)
    assert torch.equal(again.gather(videos, frames), first)  # same seed, same noise
    fresh = FeatureNoiseSource(train, scale, seed=3)
    assert torch.equal(fresh.gather_in_range(videos, frames), first)  # the same noise
    assert noisy.lengths is train.lengths and noisy.labels is train.labels
    assert noisy.feature_dim == train.feature_dim and noisy.split == "train"
    with pytest.raises(ValueError, match="scale must be finite and >= 0"):
        FeatureNoiseSource(train, -1.0)


def test_calibration_picks_the_smallest_scale_that_reaches_val_confidence(tiny_file):
    recognizer = tiny_recognizer(seed=2)
    recognizer.input_std.fill_(0.5)
    train = source_for(tiny_file, "train")
    # val = the training videos themselves: no gap, no noise
    same = calibrate_noise(recognizer, train, train)
    assert same["scale"] == 0.0 and list(same["train_p"]) == [0.0]
    assert same["train_p"][0.0] == pytest.approx(same["val_p"])
    # val = the training videos through heavy noise: every scale before the chosen one keeps
    # train above val, the chosen one does not (or the grid ran out)
    val = FeatureNoiseSource(train, 3.0, seed=9)
    rule = calibrate_noise(recognizer, train, val, grid=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0))
    scales = list(rule["train_p"])
    assert scales == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0][:len(scales)] and rule["scale"] == scales[-1]
    assert all(rule["train_p"][s] > rule["val_p"] for s in scales[:-1])
    assert rule["train_p"][rule["scale"]] <= rule["val_p"] or rule["scale"] == 8.0


def test_trainer_env_reads_noisy_train_frames_and_bad_settings_are_refused(tiny_file, tmp_path):
    for bad in (-0.5, "sometimes", float("nan"), True):
        with pytest.raises(ValueError, match="sac_feature_noise"):
            TrainerConfig(sac_feature_noise=bad)
    config = TrainerConfig(sac_feature_noise=0.5, frame_cost=0.01)
    trainer = ThreeStageTrainer(tiny_file, config, tmp_path)
    recognizer = tiny_recognizer(seed=1)
    recognizer.input_std.fill_(2.0)
    noise = trainer._feature_noise(recognizer, tmp_path / "stage2", resume=False)
    assert torch.equal(noise, torch.full((4,), 1.0))  # 0.5 x the recognizer's input std
    env = trainer._env_factory(recognizer, noise=noise)(2, 0)
    assert isinstance(env.core.source, FeatureNoiseSource)
    plain = ThreeStageTrainer(tiny_file, TrainerConfig(frame_cost=0.01), tmp_path / "plain")
    assert plain._feature_noise(recognizer, tmp_path / "x", resume=False) is None
    assert plain._env_factory(recognizer)(2, 0).core.source is plain.train_source


def test_start_jitter_stays_in_each_segment_and_is_seeded(tiny_file, tmp_path):
    train = source_for(tiny_file, "train")  # lengths 9, 12, 10, 11, 8, 12
    core = LocatorCore(train, tiny_recognizer(), batch_size=6, device="cpu")
    videos = torch.arange(6)
    core.reset(videos)
    T = torch.as_tensor(LENGTHS)[:, None]
    i = torch.arange(3)[None, :]
    first, end = i * T // 3, (i + 1) * T // 3  # segment i: frames [first, end)
    assert torch.equal(core.positions, first)  # no jitter: the paper's starts
    core.set_start_jitter(2, seed=5)
    starts = []
    for _ in range(40):
        obs = core.reset(videos)
        assert ((core.positions >= first) & (core.positions <= torch.minimum(first + 2, end - 1))
                ).all()
        assert torch.equal(core.trajectories[:, :, 0], core.positions)  # the frame observed
        assert torch.equal(obs.positions, core.positions)
        starts.append(core.positions.clone())
    offsets = torch.stack(starts) - first
    assert set(offsets.unique().tolist()) == {0, 1, 2}  # every offset occurs
    core.set_start_jitter(2, seed=5)
    core.reset(videos)
    assert torch.equal(core.positions, starts[0])  # same seed, same starts
    with pytest.raises(ValueError, match="start_jitter"):
        core.set_start_jitter(-1)
    # a front-end's reset(seed=) reseeds the offsets, as it reseeds the video sampler
    env = ThreeStageTrainer(tiny_file, TrainerConfig(frame_cost=0.01), tmp_path)._env_factory(
        tiny_recognizer(), start_jitter=2)(6, 0)
    env.reset(seed=7)
    seeded = env.core.positions.clone()
    env.reset()
    env.reset(seed=7)
    assert torch.equal(env.core.positions, seeded)


def test_sac_parts_get_the_augmented_env_and_the_clone_does_not(tiny_file, tmp_path,
                                                                 monkeypatch):
    """The env a SAC part trains in carries the config's start jitter and feature noise; the
    cloned schedule's data env (and evaluation) keep the paper's episodes."""
    import agents.trainer as trainer_module

    with pytest.raises(ValueError, match="sac_start_jitter"):
        TrainerConfig(sac_start_jitter=-2)
    config = TrainerConfig(sac_start_jitter=4, sac_feature_noise=0.5, frame_cost=0.01)
    trainer = ThreeStageTrainer(tiny_file, config, tmp_path)
    recognizer = tiny_recognizer(seed=1)
    built = []

    class Built(Exception):
        pass

    def fake_train_sac(env_factory, sac_config, **kwargs):
        built.append(env_factory(2, 0))
        raise Built

    monkeypatch.setattr(trainer_module, "train_sac", fake_train_sac)
    with pytest.raises(Built):
        trainer._sac(tmp_path / "stage2", recognizer, 256, False, None, 0, 0)
    assert built[0].core.start_jitter == 4
    assert isinstance(built[0].core.source, FeatureNoiseSource)
    clone_env = trainer._env_factory(recognizer, locator_credit=False)(2, 0)
    assert clone_env.core.start_jitter == 0 and clone_env.core.source is trainer.train_source


def test_auto_noise_is_calibrated_once_per_part_and_reused_on_resume(tiny_file, tmp_path,
                                                                     monkeypatch):
    import agents.trainer as trainer_module

    calls = []

    def fake_calibrate(recognizer, train, val, *, seed=0):
        calls.append(seed)
        return {"scale": 0.75, "train_p": {0.0: 0.5, 0.75: 0.4}, "val_p": 0.41,
                "policies": ["initial"]}

    monkeypatch.setattr(trainer_module, "calibrate_noise", fake_calibrate)
    trainer = ThreeStageTrainer(tiny_file, TrainerConfig(sac_feature_noise="auto", seed=3),
                                tmp_path)
    recognizer = tiny_recognizer(seed=1)
    recognizer.input_std.fill_(2.0)
    part = tmp_path / "stage2"
    noise = trainer._feature_noise(recognizer, part, resume=False)
    assert calls == [3] and torch.equal(noise, torch.full((4,), 1.5))  # 0.75 x std 2
    assert json.loads((part / "noise.json").read_text())["scale"] == 0.75
    again = trainer._feature_noise(recognizer, part, resume=True)  # read back, not redone
    assert calls == [3] and torch.equal(again, noise)
    trainer._feature_noise(recognizer, part, resume=False)  # a fresh part calibrates anew
    assert calls == [3, 3]
    with pytest.raises(ValueError, match=r"one value per feature dimension \(4\)"):
        FeatureNoiseSource(trainer.train_source, torch.ones(3))
