"""Live mode: LiveFrameSource decodes and extracts only visited frames, each once per episode,
and its features equal those ``features.extract`` caches for the same frames."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from features.backbones import build_backbone
from features.decode import DecodeError, sample_frames
from features.live import LiveFrameSource
from features.video_writer import write_video

LENGTHS_S = (6, 9, 5)  # seconds -> frames at 1 fps
FPS = 4


def _smooth_video(rng: np.random.Generator, seconds: int) -> np.ndarray:
    """Moving color blobs, 240x320 (resize + center crop apply), FPS frames per second."""
    n = seconds * FPS
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    frames = np.empty((n, 240, 320, 3), np.uint8)
    centers = rng.uniform(0, 1, (3, 2)) * [240, 320]
    velocity = rng.normal(0, 6, (3, 2))
    colors = rng.uniform(0, 255, (3, 3))
    for i in range(n):
        image = np.full((240, 320, 3), 40.0, np.float32)
        for c, v, col in zip(centers, velocity, colors, strict=True):
            cy, cx = c + v * i
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 40.0 ** 2))
            image += blob[..., None] * col
        frames[i] = np.clip(image + rng.normal(0, 4, image.shape), 0, 255)
    return frames


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("live")
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i, (seconds, label, split) in enumerate(
        zip(LENGTHS_S, ("blobs_a", "blobs_b", "blobs_a"), ("train", "train", "test"),
            strict=True)
    ):
        write_video(root / f"v{i}.mp4", _smooth_video(rng, seconds), fps=FPS,
                    keyframe_interval=2 * FPS)
        rows.append(f"v{i}.mp4,{label},{split}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _source(manifest, backbone, **kwargs) -> LiveFrameSource:
    return LiveFrameSource(manifest, split=None, backbone=backbone, device="cpu", **kwargs)


def test_attributes_and_lengths_from_container(videos, backbone) -> None:
    source = _source(videos, backbone)
    assert source.lengths.tolist() == list(LENGTHS_S)
    for i, entry in enumerate(source.entries):
        frames, _ = sample_frames(entry.path)  # a full decode agrees with the probed length
        assert len(frames) == source.lengths[i]
    assert source.feature_dim == 1280 and source.flops_unit == "MACs"
    assert source.class_names == ["blobs_a", "blobs_b"]
    assert source.labels.tolist() == [0, 1, 0]
    assert source.video_ids == ["v0", "v1", "v2"]
    assert 0.3 < source.gflops_per_frame < 0.5  # Lite0: ~0.385 GMACs
    assert source.frames_decoded == source.frames_extracted == 0  # probing decodes nothing
    train = LiveFrameSource(videos, split="train", backbone=backbone, device="cpu")
    assert train.video_ids == ["v0", "v1"]


def test_matches_cached_features_of_same_frames(videos, backbone, tmp_path) -> None:
    from features.extract import extract
    from features.source import CachedFrameSource

    out = tmp_path / "cached.h5"
    extract(videos, out, device="cpu", batch_size=4, dtype="float32", progress=False)
    cached = CachedFrameSource(out, split=None, device="cpu")
    live = _source(videos, backbone)
    assert cached.lengths.tolist() == live.lengths.tolist()
    assert cached.video_ids == live.video_ids
    v = torch.tensor([0, 1, 2, 1, 0, 1])
    f = torch.tensor([5, 0, 4, 8, 2, 3])
    got = live.gather(v, f)
    want = cached.gather(v, f)
    assert got.shape == (6, 1280) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and they are frame-specific: another frame of the same video differs clearly
    assert (live.gather(torch.tensor([0]), torch.tensor([0])) - want[0]).abs().max() > 1e-2


def test_never_extracts_a_frame_twice(videos, backbone) -> None:
    source = _source(videos, backbone)
    v = torch.tensor([0, 0, 1, 0, 2])
    f = torch.tensor([1, 1, 3, 4, 0])  # a duplicate within one call
    first = source.gather(v, f)
    assert source.frames_decoded == source.frames_extracted == 4
    assert source.cached_frames(0) == [1, 4] and source.cached_frames(1) == [3]
    torch.testing.assert_close(first[0], first[1])
    again = source.gather(torch.tensor([1, 0, 0]), torch.tensor([3, 4, 5]))
    assert source.frames_extracted == 5  # only (0, 5) was new
    torch.testing.assert_close(again[1], first[3])
    assert source.gather_calls == 2
    source.begin_episodes(torch.tensor([0]))  # a new episode on video 0 drops its cache only
    assert source.cached_frames(0) == [] and source.cached_frames(1) == [3]
    source.gather(torch.tensor([0, 1]), torch.tensor([1, 3]))
    assert source.frames_decoded == source.frames_extracted == 6
    assert source.codec_frames >= source.frames_decoded  # decoded on the way to targets too


def test_env_episodes_touch_only_visited_frames(videos, backbone) -> None:
    from vimo_env.core import LocatorCore
    from vimo_env.recognizer import Recognizer, RecognizerConfig

    source = _source(videos, backbone)
    torch.manual_seed(0)
    recognizer = Recognizer(RecognizerConfig(feature_dim=1280, num_classes=2, num_locators=2))
    core = LocatorCore(source, recognizer, num_locators=2, max_moves=3, stride=1,
                       device="cpu")
    rng = np.random.default_rng(0)
    core.reset(torch.tensor([0, 1, 2]))
    done = torch.zeros(3, dtype=torch.bool)
    while not done.all():
        out = core.step(torch.as_tensor(rng.integers(1, 4, (3, 2))))
        done = done | out.done
    traj = core.trajectories.cpu().numpy()  # [B, N, m + 1], -1 where unused
    visited = {(b, int(p)) for b in range(3) for p in traj[b].ravel() if p >= 0}
    assert source.frames_extracted == source.frames_decoded == len(visited)
    for b in range(3):
        assert source.cached_frames(b) == sorted(p for vb, p in visited if vb == b)


def test_parallel_decoding_gives_the_same_features(videos, backbone) -> None:
    v, f = torch.tensor([0, 1, 2, 2]), torch.tensor([3, 7, 1, 4])
    one = _source(videos, backbone).gather(v, f)
    two = _source(videos, backbone, workers=2).gather(v, f)
    torch.testing.assert_close(one, two)


def test_clear_errors(videos, backbone, tmp_path) -> None:
    source = _source(videos, backbone)
    with pytest.raises(IndexError, match="frame 9 outside 0..8 of video 'v1'"):
        source.gather(torch.tensor([1]), torch.tensor([9]))
    with pytest.raises(IndexError, match=r"video indices must lie in \[0, 3\)"):
        source.gather(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="fps must be positive"):
        LiveFrameSource(videos, backbone=backbone, fps=0)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label,split\nnope.mp4,a,train\n")
    with pytest.raises(DecodeError, match="nope.mp4: no such file"):
        LiveFrameSource(missing, backbone=backbone, device="cpu")
    # a file replaced after its length was probed is refused at its first decode
    copy = tmp_path / "copy.mp4"
    shutil.copy(videos.parent / "v2.mp4", copy)
    changing = LiveFrameSource([(copy, 0, "train")], backbone=backbone, device="cpu")
    shutil.copy(videos.parent / "v1.mp4", copy)
    os.utime(copy, ns=(1, 1))
    with pytest.raises(DecodeError, match="changed since its length was probed"):
        changing.gather(torch.tensor([0]), torch.tensor([0]))
