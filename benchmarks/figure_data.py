"""The numbers behind the trajectory figure (ViMo Figure 4), gathered once and saved as JSON.

A run's ``trajectories.json`` holds, for a few test videos of different classes, everything
:func:`benchmarks.plots.plot_trajectories` draws, so figures are redrawn from the results files
without the dataset's features or any model:

* per video: id, label, class name, length ``T``, the locators' segment bounds, a colour per
  frame (the video's features projected on their first three principal components, so a
  change of colour is a change of content), the ground-truth semantic units per frame where
  the dataset knows them (PhotoUnits plans, the synthetic generator's ``frame_units``), and
  the video file with the frame rate of the features, where there is one (thumbnails);
* per strategy (``random-25``, ``uniform-25``, ``adaptive``, then any other env-driven
  policy): each locator's observed frames in order, and the strategy's probability of the true
  class and predicted class on that video;
* per glance/focus peer (``liteeval``, ``afnet``, ...; kind ``peer``, :func:`peer_row`): the
  frames it glanced and the frames it focused (two lanes), with the same two numbers.

Format ``vimo-trajectories`` version 2 (see :func:`collect_trajectories`): version 1 had no
peer rows; both are read.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.selection import parse_policy, segment_bounds, select_frames
from features.atomic import write_text_atomic
from features.source import FrameSource
from vimo_env.render import video_files

FORMAT = "vimo-trajectories"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added the peers' rows (kind "peer", "lanes")
#: Strategies drawn first, in this order (ViMo Figure 4: random, uniform, adaptive).
DEFAULT_STRATEGIES = ("random-25", "uniform-25", "adaptive")
#: Policies never drawn by default: one frame per locator, or one fixed schedule for all.
SKIPPED_STRATEGIES = frozenset({"initial", "open-loop", "open-loop@adaptive", "all"})
#: The lanes of a glance/focus peer's row (kind ``peer``): frames glanced, frames focused.
PEER_LANES = ("glance", "focus")


def choose_videos(source: FrameSource, count: int = 4,
                  files: dict[str, Path] | None = None) -> list[int]:
    """Up to ``count`` video indices of ``source``, each of a different class where the split
    has enough classes; videos with a video file (``files``, by id) come first, so the figure
    shows thumbnails where it can. Deterministic (source order)."""
    files = files or {}
    order = sorted(range(source.num_videos),
                   key=lambda v: (source.video_ids[v] not in files, v))
    chosen: list[int] = []
    classes: set[int] = set()
    for v in order:  # one per class first
        if len(chosen) < count and int(source.labels[v]) not in classes:
            chosen.append(v)
            classes.add(int(source.labels[v]))
    for v in order:  # then fill up when the split has fewer classes than `count`
        if len(chosen) < count and v not in chosen:
            chosen.append(v)
    return chosen


def feature_colors(features: np.ndarray) -> np.ndarray:
    """float ``[T, 3]`` in ``[0, 1]``: each frame's features projected on the video's first
    three principal components (scaled per component), used as an RGB colour."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    if len(x) < 2 or not np.any(x):
        return np.full((len(x), 3), 0.5)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = proj.min(0), proj.max(0)
    return np.where(hi > lo, (proj - lo) / np.where(hi > lo, hi - lo, 1.0), 0.5)


def _video_features(source: FrameSource, video: int) -> np.ndarray:
    T = int(source.lengths[video])
    frames = torch.arange(T, device=source.device)
    videos = torch.full((T,), int(video), dtype=torch.long, device=source.device)
    return source.gather(videos, frames).float().cpu().numpy()


def frame_annotations(dataset: str | os.PathLike | None, source: FrameSource,
                      indices: Sequence[int], hint: dict[str, Any] | None = None
                      ) -> tuple[list[dict[str, str]], list[list[int]]] | None:
    """Ground-truth semantic units of videos ``indices`` of ``source``, if the dataset is one
    we generate: ``(labels, codes)`` with ``labels[k] = {"name", "kind"}`` (``kind`` "unit", or
    "cue" for PhotoUnits' build-up shots) and ``codes[i][t]`` the label of frame ``t`` of the
    ``i``-th video (-1: background). None when unknown.

    PhotoUnits builds are recognized by their folder (``photounits-<preset>-<key>``, the key
    checked against the preset and the build seed of its dataset card); synthetic files by
    regenerating a video from the preset and seed in ``hint`` (``{"preset", "seed"}``), or by
    trying each preset with ``hint["seed"]`` (default 0), and comparing its features.
    """
    if dataset is None or not indices:
        return None
    ids = [source.video_ids[v] for v in indices]
    try:
        if all(i.startswith("pu") for i in ids):
            return _photounits_annotations(Path(dataset), ids, hint or {})
        if all(i.startswith("syn") for i in ids):
            return _synthetic_annotations(source, indices, hint or {})
    except Exception as err:  # an annotation is a nicety: never fail a run for it
        warnings.warn(f"no ground-truth units for the trajectory figure: {err}", stacklevel=2)
    return None


def _photounits_annotations(dataset: Path, ids: list[str], hint: dict[str, Any]):
    from features.photounits import PRESETS, PhotoUnitsWorld

    match = re.fullmatch(r"photounits-(\w+)-([0-9a-f]{12})", dataset.parent.name)
    if match is None or match.group(1) not in PRESETS:
        return None
    config = PRESETS[match.group(1)]
    seeds = [int(hint["seed"])] if "seed" in hint else []
    card = dataset.parent / "DATASET_CARD.md"
    if card.is_file():
        found = re.search(r"seed (\d+)", card.read_text(encoding="utf-8"))
        if found:
            seeds.append(int(found.group(1)))
    seed = next((s for s in seeds if config.key(s) == match.group(2)), None)
    if seed is None:
        return None
    world = PhotoUnitsWorld(config, seed)
    labels = [{"name": u, "kind": "unit"} for u in config.units]
    labels += [{"name": f"build-up ({t})", "kind": "cue"} for t in config.leadin_textures]
    cues = {p: len(config.units) + j for j, p in enumerate(config.leadin_photos)}
    codes = []
    for vid in ids:
        plan = world.plan(int(vid[2:]))
        code = plan.unit.astype(np.int64).copy()
        for photo, label in cues.items():
            code[plan.photo == photo] = label
        codes.append(code.tolist())
    return labels, codes


def _synthetic_annotations(source: FrameSource, indices: Sequence[int], hint: dict[str, Any]):
    from features.synthetic import PRESETS, SyntheticWorld

    seed = int(hint.get("seed", 0))
    presets = [hint["preset"]] if hint.get("preset") in PRESETS else sorted(PRESETS)
    first = int(indices[0])
    have = _video_features(source, first)
    for name in presets:
        config = PRESETS[name]
        if config.feature_dim != source.feature_dim:
            continue
        world = SyntheticWorld(config, seed)
        if world.class_names != list(source.class_names):
            continue
        x, _, _, _ = world.video(int(source.video_ids[first][3:]))
        if x.shape == have.shape and np.allclose(x, have, rtol=1e-2, atol=1e-2):
            labels = [{"name": f"u{u}", "kind": "unit"} for u in range(config.vocabulary)]
            codes = [world.video(int(source.video_ids[v][3:]))[1].astype(int).tolist()
                     for v in indices]
            return labels, codes
    return None


def selection_trajectories(lengths: np.ndarray, num_locators: int, policy: str, seed: int,
                           indices: Sequence[int]) -> list[list[list[int]]]:
    """The frames each locator of a selection baseline observes on videos ``indices``, drawn
    exactly as :func:`agents.selection.evaluate_selection` draws them for the whole split
    (one ``numpy`` Generator seeded with ``seed`` over all videos)."""
    frame_index, mask = select_frames(np.asarray(lengths), num_locators, policy,
                                      np.random.default_rng(seed))
    return [[frame_index[v, i][mask[v, i]].astype(int).tolist() for i in range(num_locators)]
            for v in indices]


def _is_selection(name: str) -> bool:
    try:
        parse_policy(name)
    except ValueError:
        return False
    return True


def strategy_names(results: Sequence[Any], strategies: Sequence[str] | None = None) -> list[str]:
    """The strategies a trajectory figure shows: ``strategies`` if given, else
    :data:`DEFAULT_STRATEGIES` then every other result that recorded trajectories (env-driven
    policies, e.g. the peers), except :data:`SKIPPED_STRATEGIES`."""
    names = [r.name for r in results]
    if strategies is not None:
        return [s for s in strategies if s in names]
    chosen = [s for s in DEFAULT_STRATEGIES if s in names]
    chosen += [r.name for r in results if r.trajectories is not None and r.name not in chosen
               and r.name not in SKIPPED_STRATEGIES]
    return chosen


def collect_trajectories(
    source: FrameSource,
    results: Sequence[Any],
    *,
    num_locators: int,
    max_moves: int,
    stride: int,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    count: int = 4,
    strategies: Sequence[str] | None = None,
    dataset: str | os.PathLike | None = None,
    dataset_hint: dict[str, Any] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """The ``vimo-trajectories`` record of a few videos of ``source`` (JSON-ready).

    Args:
        source: the split the ``results`` were evaluated on.
        results: :class:`agents.evaluate.EvalResult` rows of that split: env-driven ones carry
            ``trajectories``; selection baselines (``random-P``, ``uniform-P``) are redrawn with
            ``seed``, as evaluated.
        indices: the videos (indices into ``source``); default :func:`choose_videos`.
        strategies: names to show (default :func:`strategy_names`).
        dataset: the feature file (finds video files and ground-truth units).
        dataset_hint: ``{"preset", "seed"}`` of a generated dataset, when known.
    """
    files = video_files(dataset) if dataset is not None else {}
    if indices is None:
        indices = choose_videos(source, count, files)
    indices = [int(v) for v in indices]
    record = video_records(source, indices, num_locators=num_locators, max_moves=max_moves,
                           stride=stride, dataset=dataset, dataset_hint=dataset_hint,
                           split=split, files=files)
    record["strategies"] = strategy_rows(source, results, indices, num_locators=num_locators,
                                         seed=seed, strategies=strategies)
    return record


def video_records(source: FrameSource, indices: Sequence[int], *, num_locators: int,
                  max_moves: int, stride: int, dataset: str | os.PathLike | None = None,
                  dataset_hint: dict[str, Any] | None = None, split: str = "test",
                  files: dict[str, Path] | None = None) -> dict[str, Any]:
    """The policy-independent part of a ``vimo-trajectories`` record (``strategies`` empty):
    the videos' lengths, segments, feature colours, units and files."""
    if files is None:
        files = video_files(dataset) if dataset is not None else {}
    indices = [int(v) for v in indices]
    fps = float(getattr(getattr(source, "store", None), "fps", getattr(source, "fps", 1.0)))
    annotations = frame_annotations(dataset, source, indices, dataset_hint)
    live_entries = getattr(source, "entries", None)  # a LiveFrameSource knows its files
    videos = []
    for k, v in enumerate(indices):
        vid = source.video_ids[v]
        T = int(source.lengths[v])
        path = files.get(vid) or (live_entries[v].path if live_entries is not None else None)
        videos.append({
            "index": v, "video_id": vid, "label": int(source.labels[v]),
            "class_name": source.class_names[int(source.labels[v])], "length": T,
            "segments": segment_bounds(np.array([T]), num_locators)[0].tolist(),
            "colors": np.round(feature_colors(_video_features(source, v)), 3).tolist(),
            "units": annotations[1][k] if annotations else None,
            "video_file": str(Path(path).resolve()) if path is not None else None,
            "fps": fps,
        })
    return {"format": FORMAT, "version": VERSION, "split": split,
            "num_locators": int(num_locators), "max_moves": int(max_moves),
            "stride": int(stride), "class_names": list(source.class_names),
            "unit_labels": annotations[0] if annotations else None,
            "videos": videos, "strategies": []}


def strategy_rows(source: FrameSource, results: Sequence[Any], indices: Sequence[int], *,
                  num_locators: int, seed: int = 0,
                  strategies: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ``strategies`` part of a ``vimo-trajectories`` record: for each strategy (see
    :func:`strategy_names`), each video's per-locator frames, P(true class) and prediction."""
    by_name = {r.name: r for r in results}
    rows = []
    for name in strategy_names(results, strategies):
        res = by_name[name]
        if res.trajectories is not None:
            traj = [[list(map(int, lane)) for lane in res.trajectories[v]] for v in indices]
            kind = "policy"
        elif _is_selection(name):
            traj = selection_trajectories(source.lengths, num_locators, name, seed, indices)
            kind = "selection"
        else:
            continue
        per_video = []
        for v, lanes in zip(indices, traj, strict=True):
            per_video.append(_video_entry(lanes, res.scores, v, int(source.labels[v])))
        rows.append({"name": name, "kind": kind, "videos": per_video})
    return rows


def _video_entry(lanes: list[list[int]], scores: np.ndarray | None, row: int, label: int
                 ) -> dict[str, Any]:
    """One video of a ``strategies`` row: its lanes, and P(true class) and the predicted class
    from ``scores[row]`` when the result kept its scores."""
    entry: dict[str, Any] = {"frames": lanes}
    if scores is not None:
        probs = np.asarray(scores[row], dtype=np.float64)
        entry["p_true"] = round(float(probs[label]), 4)
        entry["predicted"] = int(probs.argmax())
    return entry


def peer_row(name: str, result: Any, video_ids: Sequence[str], record: dict[str, Any]
             ) -> dict[str, Any] | None:
    """A glance/focus peer's ``strategies`` row for the videos of ``record`` (a
    ``vimo-trajectories`` record), from its :class:`agents.peers.harness.PeerResult` on the
    split whose video ids are ``video_ids``: two lanes per video, the frames it glanced and the
    frames it focused, with P(true class) and the prediction. None when the peer's split lacks
    one of the record's videos or the result kept no frame selections."""
    selection = getattr(result, "record", None)
    if selection is None:
        return None
    where = {vid: k for k, vid in enumerate(video_ids)}
    if any(v["video_id"] not in where for v in record["videos"]):
        return None
    per_video = []
    for video in record["videos"]:
        k = where[video["video_id"]]
        lanes = [np.flatnonzero(selection.glanced[k]).tolist(),
                 np.flatnonzero(selection.focused[k]).tolist()]
        per_video.append(_video_entry(lanes, result.scores, k, int(video["label"])))
    return {"name": name, "kind": "peer", "lanes": list(PEER_LANES), "videos": per_video}


def save_trajectories(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write a ``vimo-trajectories`` record atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))
    return path


def load_trajectories(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``vimo-trajectories`` record, checking its format and version."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != FORMAT or data.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: not a {FORMAT} file of version "
                         f"{' or '.join(map(str, READABLE_VERSIONS))} "
                         f"(format={data.get('format')!r}, version={data.get('version')!r})")
    return data


class SubsetSource(FrameSource):
    """Videos ``indices`` of another frame source, as a source of their own (e.g. the few
    fixed val videos whose trajectories TensorBoard shows after each epoch)."""

    def __init__(self, source: FrameSource, indices: Sequence[int]) -> None:
        self.base = source
        self.indices = [int(v) for v in indices]
        self._map = torch.as_tensor(self.indices, dtype=torch.long, device=source.device)
        self.feature_dim = source.feature_dim
        self.class_names = list(source.class_names)
        self.gflops_per_frame = source.gflops_per_frame
        self.flops_unit = source.flops_unit
        self.lengths = np.asarray(source.lengths)[self.indices].astype(np.int64)
        self.labels = np.asarray(source.labels)[self.indices].astype(np.int64)
        self.video_ids = [source.video_ids[v] for v in self.indices]
        self.device = source.device
        store = getattr(source, "store", None)
        if store is not None:
            self.store = store  # fps and the feature file (video files) stay visible
        if hasattr(source, "entries"):
            self.entries = [source.entries[v] for v in self.indices]
            self.fps = source.fps

    def begin_episodes(self, videos: torch.Tensor) -> None:
        self.base.begin_episodes(self._map[torch.as_tensor(videos, device=self.device)])

    def random_state(self) -> Any:
        return self.base.random_state()

    def set_random_state(self, state: Any) -> None:
        self.base.set_random_state(state)

    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.base.gather(self._map[torch.as_tensor(videos, device=self.device)], frames)
