"""Feature noise for SAC's training env (agents.augment): the noise itself, its calibration
rule, and the trainer and command-line settings that turn it on."""

from __future__ import annotations

import pytest
import torch
from env_helpers import tiny_recognizer, write_tiny_h5

from agents.augment import FeatureNoiseSource, calibrate_noise
from agents.trainer import ThreeStageTrainer, TrainerConfig, source_for

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
