"""Decoding: 1 fps timestamps, crops, seek == sequential, rotation, VFR, bad files."""

import numpy as np
import pytest

from features.decode import DecodeError, VideoReader, prepare_image, sample_frames
from features.video_writer import write_audio_only, write_video


def _frames(count: int, height: int = 96, width: int = 128) -> np.ndarray:
    """Frame i is a flat gray level encoding i, with a white top-left marker block."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i] = (i * 37) % 200 + 20
    frames[:, : height // 2, : width // 4] = 255
    return frames


def _level(frames: np.ndarray) -> np.ndarray:
    """The gray level each decoded frame shows (bottom-right region, away from the marker)."""
    return frames[:, -40:, -40:].reshape(len(frames), -1).mean(1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("dec") / "clip.mp4"
    return write_video(path, _frames(25 * 7), fps=25, keyframe_interval=25)


def test_one_fps_timestamps_and_frames(clip):
    reader = VideoReader(clip)
    assert reader.duration == pytest.approx(7.0)
    np.testing.assert_allclose(reader.keyframe_times, np.arange(7.0))
    sampled = reader.sample(fps=1.0)
    np.testing.assert_allclose(sampled.timestamps, np.arange(7.0))
    np.testing.assert_allclose(sampled.frame_times, np.arange(7.0))
    expected = np.array([(25 * k * 37) % 200 + 20 for k in range(7)])
    np.testing.assert_allclose(_level(sampled.frames), expected, atol=3)
    frames, times = sample_frames(clip, fps=2.0)
    assert len(frames) == len(times) == 14 and times[1] == 0.5


def test_crop_sizes_and_train_aug(clip):
    frames, _ = sample_frames(clip)
    assert frames.shape == (7, 224, 224, 3) and frames.dtype == np.uint8
    small, _ = sample_frames(clip, size=112)
    assert small.shape == (7, 112, 112, 3)
    aug1, _ = sample_frames(clip, train_aug=True, rng=np.random.default_rng(3))
    aug2, _ = sample_frames(clip, train_aug=True, rng=np.random.default_rng(3))
    assert aug1.shape == (7, 224, 224, 3)
    np.testing.assert_array_equal(aug1, aug2)  # same seed, same crop and flip
    crops = {sample_frames(clip, train_aug=True, rng=np.random.default_rng(s))[0][0].tobytes()
             for s in range(6)}
    assert len(crops) > 1  # random crops differ


@pytest.mark.parametrize("keyframe_interval", [10, 60])
def test_seek_and_sequential_paths_bit_identical(tmp_path, keyframe_interval):
    path = write_video(tmp_path / "k.mp4", _frames(25 * 9), fps=25,
                       keyframe_interval=keyframe_interval)
    reader = VideoReader(path)
    results = {mode: reader.sample(fps=0.8, seek=mode) for mode in ("never", "auto", "always")}
    for mode in ("auto", "always"):
        np.testing.assert_array_equal(results[mode].frames, results["never"].frames)
        np.testing.assert_array_equal(results[mode].frame_times, results["never"].frame_times)


def test_variable_frame_rate_repeats_the_frame_on_screen(tmp_path):
    # frames at 0, 0.5, 1.0, then a gap until 3.2: at t=2 and t=3 frame 2 is still on screen
    times = [0.0, 0.5, 1.0, 3.2, 3.7]
    path = write_video(tmp_path / "vfr.mp4", _frames(5), fps=2, times=times)
    sampled = VideoReader(path).sample(fps=1.0)
    np.testing.assert_allclose(sampled.timestamps, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(sampled.frame_times, [0.0, 1.0, 1.0, 1.0, 3.7])
    np.testing.assert_array_equal(sampled.frames[1], sampled.frames[3])


def test_rotation_metadata_is_applied(tmp_path):
    plain = write_video(tmp_path / "plain.mp4", _frames(10), fps=10)
    rotated = write_video(tmp_path / "rot.mp4", _frames(10), fps=10, rotation=90)
    upright = VideoReader(rotated).sample(size=96, resize=96)
    assert upright.rotation == 90
    # the landscape marker (top-left) ends up bottom-left after a 90 degree ccw turn
    reference = VideoReader(plain).sample(size=96, resize=96).frames
    frame = upright.frames[0].astype(int)
    assert frame[-12:, :40].mean() > 240 and frame[:20, -10:].mean() < 100
    assert reference[0, :10, :12].mean() > 240 and reference[0, -12:, :12].mean() < 100


def test_very_short_video_gives_one_frame(tmp_path):
    path = write_video(tmp_path / "short.mp4", _frames(5), fps=25)  # 0.2 s
    frames, times = sample_frames(path)
    assert frames.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(times, [0.0])


def test_bad_files_give_clear_errors(tmp_path, clip):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio = write_audio_only(tmp_path / "audio.m4a")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    cases = {empty: "empty file", audio: "no video stream", tmp_path / "nope.mp4": "no such file",
             truncated: "", garbage: ""}
    for path, problem in cases.items():
        with pytest.raises(DecodeError) as info:
            sample_frames(path)
        assert info.value.path == str(path) and str(path) in str(info.value)
        assert problem in info.value.problem


def test_prepare_image_matches_frame_geometry():
    image = np.zeros((300, 450, 3), np.uint8)
    image[:, 225:] = 255
    out = prepare_image(image)
    assert out.shape == (224, 224, 3)
    assert out[:, :100].max() < 5 and out[:, 124:].min() > 250
    assert prepare_image(image[:, :, 0]).shape == (224, 224, 3)
