"""Figures and images: thumbnails in the envs' rgb_array renders, RecordVideo of
VideoLocators-v0, and benchmarks.plots drawn from hand-made results (panel counts and file
sizes, never pixels). The figures of a real tiny run are tested in test_run_marl.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import av
import gymnasium
import numpy as np
import pytest
from env_helpers import tiny_recognizer, write_tiny_h5

import vimo_env  # noqa: F401 - registers VideoLocators-v0
from agents.peers.harness import SelectionRecord
from benchmarks import plots
from benchmarks.figure_data import (
    feature_colors,
    load_trajectories,
    peer_row,
    save_trajectories,
)
from features.video_writer import write_video
from vimo_env.render import FramePixels, decode_thumbnails, render_rgb, video_files

LENGTHS = [10, 12]  # frames at 1 fps
VIDEO_FPS = 2


def _write_mp4s(folder, lengths, with_manifest=True):
    """Solid-colour videos whose colour encodes the second: frame t is (20 t, 255 - 20 t, 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,split,video_id"]
    for v, seconds in enumerate(lengths):
        frames = np.zeros((seconds * VIDEO_FPS, 64, 64, 3), np.uint8)
        for k in range(len(frames)):
            t = k // VIDEO_FPS
            frames[k] = (20 * t, 255 - 20 * t, 90)
        write_video(folder / f"vid{v}.mp4", frames, fps=VIDEO_FPS, keyframe_interval=4)
        rows.append(f"vid{v}.mp4,c{v},train,vid{v}")
    if with_manifest:
        (folder / "manifest.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def h5_with_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("with_videos")
    path = write_tiny_h5(root / "features.h5", LENGTHS)
    _write_mp4s(root / "mp4", LENGTHS)
    return path


def test_thumbnails_are_the_frames_on_screen(h5_with_videos):
    files = video_files(h5_with_videos)
    assert sorted(files) == ["vid0", "vid1"]
    thumbs = decode_thumbnails(files["vid1"], [7, 0, 3], fps=1.0, size=16)
    assert sorted(thumbs) == [0, 3, 7]
    for t, image in thumbs.items():
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert np.abs(image.reshape(-1, 3).mean(0) - (20 * t, 255 - 20 * t, 90)).max() < 12
    assert video_files(h5_with_videos.parent / "elsewhere" / "x.h5") == {}


def test_rgb_array_shows_film_strips_when_videos_exist(h5_with_videos, tmp_path):
    kw = dict(recognizer=tiny_recognizer(seed=1), device="cpu", seed=0, render_mode="rgb_array")
    env = gymnasium.make("VideoLocators-v0", features=h5_with_videos, **kw).unwrapped
    env.reset(options={"video": 0})
    first = env.render()
    env.step(np.array([1, 1, 0]))
    second = env.render()
    assert first.shape == second.shape  # fixed size over an episode (video recorders)
    plain = write_tiny_h5(tmp_path / "plain.h5", LENGTHS)  # same features, no video files
    env2 = gymnasium.make("VideoLocators-v0", features=plain, **kw).unwrapped
    env2.reset(options={"video": 0})
    lanes_only = env2.render()
    assert second.shape[0] > lanes_only.shape[0]  # the film strips below the lanes
    strip = second[lanes_only.shape[0]:]
    # the thumbnail of frame 3 (locator 0 moved 1 stride) is in the strip
    assert (np.abs(strip.astype(int) - (60, 195, 90)).max(-1) < 14).sum() > 100
    assert FramePixels.for_source(env2.core.source) is None


def test_render_rgb_film_strip_layout():
    thumbs = [[np.full((8, 8, 3), 10, np.uint8)] * 2, [np.full((8, 8, 3), 200, np.uint8)]]
    image = render_rgb(20, [3, 10], [[0, 3], [10]], [True, False], thumbnails=thumbs, slots=4)
    lanes = render_rgb(20, [3, 10], [[0, 3], [10]], [True, False])
    assert image.shape[0] > lanes.shape[0] and image.dtype == np.uint8
    assert (image[lanes.shape[0]:] == 10).all(-1).sum() == 2 * 64
    assert (image[lanes.shape[0]:] == (185, 185, 185)).all(-1).sum() == 5 * 64  # empty slots


def test_record_video_of_an_episode(h5_with_videos, tmp_path):
    pytest.importorskip("moviepy")  # gymnasium's RecordVideo writes with moviepy
    from gymnasium.wrappers import RecordVideo

    env = gymnasium.make("VideoLocators-v0", features=h5_with_videos, render_mode="rgb_array",
                         recognizer=tiny_recognizer(seed=1), device="cpu", seed=0)
    env = RecordVideo(env, str(tmp_path / "videos"), episode_trigger=lambda e: e == 0,
                      name_prefix="locators", disable_logger=True)
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.array([1, 1, 1]))
        done, steps = terminated or truncated, steps + 1
    env.close()
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert [v.name for v in videos] == ["locators-episode-0.mp4"]
    with av.open(str(videos[0])) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == steps + 1  # the reset frame and one per step
    assert frames[0].height > 100  # lanes and film strips


def _results(points):
    return {"flops_unit": "MACs", "dataset": "x.h5", "seed": 0, "config": {"max_moves": 4},
            "policies": [{"name": n, "mAP": y, "gflops_per_video": x, "top1": y,
                          "frame_rate": 10.0, "frames_per_video": 5.0} for n, x, y in points],
            "stages": [{"stage": "I", "mAP": 90.0, "gflops_per_video": 30.0},
                       {"stage": "II", "mAP": 95.5, "gflops_per_video": 20.0},
                       {"stage": "III", "mAP": 96.0, "gflops_per_video": 21.0}]}


def test_tradeoff_zooms_only_when_points_sit_far_below(tmp_path):
    close = _results([("adaptive", 21.0, 96.0), ("uniform-50", 60.0, 95.0),
                      ("all", 120.0, 93.0)])
    info = plots.plot_tradeoff(close, tmp_path / "a.png")
    assert info["panels"] == 1 and info["zoom"] is None
    far = _results([("adaptive", 21.0, 96.0), ("uniform-50", 60.0, 95.0),
                    ("initial", 4.0, 25.0), ("open-loop", 22.0, 94.0)])
    info = plots.plot_tradeoff(far, tmp_path / "b.png")
    assert info["panels"] == 2 and info["zoom"][0] > 25.0 and info["zoom"][1] > 96.0
    assert 5_000 < (tmp_path / "b.png").stat().st_size == info["bytes"] < 300_000
    sweep = [{"sweep": "max_moves", "value": m, "mAP": 93.0 + m / 2, "top1": 90.0,
              "frame_rate": 5.0 * m, "frames_per_video": 3.0 * m, "gflops_per_video": 5.0 * m}
             for m in (3, 4, 5, 6)]
    info = plots.plot_sweep({**far, "sweep": sweep}, tmp_path / "sweep.png")
    assert info["panels"] == 2 and info["values"] == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="no sweep"):
        plots.plot_sweep(far, tmp_path / "none.png")
    # each peer's budget-knob sweep is one more curve (run_marl.py --peer-sweep)
    peer_sweep = {name: {"knob": "ratio", "points": [
        {"value": r, "mAP": y0 + 4 * r, "gflops_per_video": g0 * (1 + 4 * r)}
        for r in (0.125, 0.25, 0.5)]} for name, y0, g0 in (("afnet", 94.0, 2.0),
                                                            ("adafocus", 93.0, 2.5))}
    info = plots.plot_tradeoff({**far, "peers": {"sweep": peer_sweep}}, tmp_path / "peers.png")
    assert info["peer_curves"] == 2 and info["points"] == 4 + 3 + 2 * 3
    assert info["panels"] == 2 and info["bytes"] < 300_000


def _record(video_file, strategies=("random-25", "uniform-25", "adaptive")):
    T, N = 12, 3
    return {"format": "vimo-trajectories", "version": 1, "split": "test", "num_locators": N,
            "max_moves": 4, "stride": 3, "class_names": ["c0", "c1"],
            "unit_labels": [{"name": "coffee", "kind": "unit"},
                            {"name": "build-up (page)", "kind": "cue"}],
            "videos": [{"index": v, "video_id": f"vid{v}", "label": v, "class_name": f"c{v}",
                        "length": T, "segments": [0, 4, 8, 12],
                        "colors": feature_colors(np.random.default_rng(v).normal(
                            size=(T, 5))).tolist(),
                        "units": [-1, -1, 1, 0, 0, -1, -1, -1, 0, 0, -1, -1],
                        "video_file": str(video_file) if v == 0 else None, "fps": 1.0}
                       for v in range(2)],
            "strategies": [{"name": s, "kind": "policy" if s == "adaptive" else "selection",
                            "videos": [{"frames": [[0, 3], [4], [8, 11]], "p_true": 0.7,
                                        "predicted": v} for v in range(2)]}
                           for s in strategies]}


def test_trajectory_figure_panels_thumbnails_and_size(h5_with_videos, tmp_path):
    record = _record(video_files(h5_with_videos)["vid1"])
    save_trajectories(tmp_path / "trajectories.json", record)
    assert load_trajectories(tmp_path / "trajectories.json") == json.loads(json.dumps(record))
    info = plots.plot_trajectories(tmp_path / "trajectories.json", tmp_path / "t.png")
    assert info["panels"] == 2 * 3 and info["videos"] == 2
    assert info["strategies"] == ["random-25", "uniform-25", "adaptive"]
    assert info["thumbnail_panels"] == 3 and info["thumbnails"] == 3 * 5  # video 0 only
    assert (tmp_path / "t.png").stat().st_size == info["bytes"] < 300_000
    # an env-driven policy's trajectories are drawn as one more strategy
    more = plots.plot_trajectories(_record(None, ("uniform-25", "adaptive", "other")),
                                   tmp_path / "u.png")
    assert more["panels"] == 2 * 3 and more["thumbnails"] == 0 and more["peer_panels"] == 0
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="vimo-trajectories"):
        load_trajectories(tmp_path / "bad.json")
    (tmp_path / "new.json").write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(ValueError, match="version 1 or 2"):
        load_trajectories(tmp_path / "new.json")


def test_peer_rows_show_glanced_and_focused_frames(h5_with_videos, tmp_path):
    """A glance/focus peer's test selections become a two-lane row (glance, focus) of the
    record's videos, found by video id whatever the peer split's order; its film strip shows
    the focused frames."""
    record = _record(video_files(h5_with_videos)["vid0"])
    glanced = np.zeros((3, 12), bool)
    focused = np.zeros((3, 12), bool)
    glanced[:, [1, 5, 9]] = True
    focused[2, [5]] = True  # the peer's split lists vid0 last
    focused[0, [1, 9]] = True  # and vid1 first
    selection = SelectionRecord(np.array([12, 12, 12]), glanced, focused, np.zeros(3))
    scores = np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    result = SimpleNamespace(record=selection, scores=scores)
    row = peer_row("liteeval", result, ["vid1", "other", "vid0"], record)
    assert row["kind"] == "peer" and row["lanes"] == ["glance", "focus"]
    assert [v["frames"] for v in row["videos"]] == [[[1, 5, 9], [5]], [[1, 5, 9], [1, 9]]]
    assert [v["p_true"] for v in row["videos"]] == [0.9, 0.8]  # labels 0 and 1
    assert [v["predicted"] for v in row["videos"]] == [0, 1]
    assert peer_row("liteeval", result, ["vid1", "other"], record) is None  # vid0 missing
    record["strategies"].append(row)
    info = plots.plot_trajectories(record, tmp_path / "p.png")
    assert info["panels"] == 2 * 4 and info["peer_panels"] == 2
    assert info["strategies"][-1] == "liteeval"
    assert info["thumbnail_panels"] == 4 and info["thumbnails"] == 3 * 5 + 1  # its focus frame
    assert (tmp_path / "p.png").stat().st_size == info["bytes"] < 300_000


def test_save_png_shrinks_to_the_size_limit(tmp_path):
    fig = plots._figure(8, 8)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    size = plots.save_png(fig, tmp_path / "noise.png", max_bytes=150_000)
    assert size == (tmp_path / "noise.png").stat().st_size <= 150_000
