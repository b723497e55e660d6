"""Synthetic long untrimmed videos with the structure ViMo relies on, as ``vimo-features`` HDF5.

A class is a combination of ``units_per_class`` *semantic unit types* drawn from a shared
vocabulary. Classes overlap: every unit type belongs to at least two classes, so no single unit
identifies a class, while any two distinct units of a class identify it (no pair of units is
shared by two classes). A video of class ``y`` is ``T`` frames (1 fps, default 60-180) of

* **background shots** shared by all classes (a layer of shots of ``shot_length`` frames, each
  from one of ``background_types`` prototypes), overlaid with
* **unit instances** of the class's unit types, cycling through them in random order (every
  unit of the class appears once the video is long enough; units recur): contiguous spans of
  ``unit_length`` frames separated by background gaps of ``gap_length`` frames, so unit
  positions are random and uniformly placed locators do not land on them by construction;
* a few **noise frames** (``noise_frame_prob``, e.g. cuts or blur) that carry no prototype.

Frame features are ``prototype + instance offset + drift + noise``: frames within one unit or
shot are alike (shared prototype and offset) and drift slowly (a random walk inside the span);
every frame carries i.i.d. Gaussian noise.

Cost: the synthetic backbone is given ResNet-50's nominal cost per 224x224 frame, 4.09 GMACs
(8.18 GFLOPs with 2 FLOPs per MAC, as ``torch.utils.flop_counter`` counts), stored with
``flops_unit = "MACs"``, so frame-rate savings translate into realistic GFLOPs figures.

Determinism: video ``v`` is generated from its own ``numpy`` Generator seeded with
``(seed, v)``, so the output depends only on the config and seed (same seed, same bytes; HDF5
object timestamps are off in h5py by default) and the ``large`` preset is written in streaming
fashion, one video at a time, never holding the dataset in memory.

Command line::

    python -m features.synthetic --preset {tiny,default,large} --out FILE.h5 [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.store import SPLITS, FeatureWriter

#: Nominal backbone cost per frame: ResNet-50 at 224x224 (4.09 GMACs = 8.18 GFLOPs).
GMACS_PER_FRAME = 4.09
BACKGROUND = -1  # frame annotation value of background and noise frames


@dataclass(frozen=True)
class SyntheticConfig:
    """All knobs of the synthetic dataset (lengths in frames; ranges are inclusive)."""

    num_videos: int = 3000
    num_classes: int = 20
    vocabulary: int = 24  # unit types shared by all classes
    units_per_class: int = 3
    background_types: int = 16
    length: tuple[int, int] = (60, 180)  # frames per video (1 fps)
    unit_length: tuple[int, int] = (5, 16)  # frames per unit instance
    gap_length: tuple[int, int] = (4, 16)  # background frames between unit instances
    shot_length: tuple[int, int] = (3, 12)  # frames per background shot
    feature_dim: int = 128
    # noise above the prototype scale, so that seeing more frames of a unit pays
    prototype_scale: float = 1.0  # std of prototype entries
    instance_scale: float = 0.35  # std of a per-instance offset (same unit, different look)
    drift: float = 0.08  # std per frame of the random walk inside a span
    noise: float = 1.3  # std of i.i.d. per-frame noise
    noise_frame_prob: float = 0.04  # frames replaced by pure noise (cuts, blur)
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, val, test
    dtype: str = "float16"
    fps: float = 1.0
    # held-out variants (robustness matrix): how features look to the recognizer
    # distractors: background shots replaced, with this probability, by a brief span of ANY
    # unit type (so every unit type also appears in videos of classes it does not belong to)
    distractor_prob: float = 0.0
    nonnegative: bool = False  # CNN-like: ReLU of the features (sparse, non-negative, skewed)
    feature_scale: float = 1.0  # every feature multiplied by this (x0.01 .. x100)

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, problem: str) -> None:
            if not cond:
                raise ValueError(f"SyntheticConfig.{name}: {problem}")

        for name in ("num_videos", "num_classes", "vocabulary", "units_per_class",
                     "background_types", "feature_dim"):
            check(int(getattr(self, name)) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("length", "unit_length", "gap_length", "shot_length"):
            lo, hi = getattr(self, name)
            check(1 <= lo <= hi, name, f"need 1 <= low <= high, got {(lo, hi)}")
        check(self.units_per_class >= 2, "units_per_class",
              "must be >= 2 (a single unit would identify its class)")
        check(self.units_per_class <= self.vocabulary, "units_per_class", "exceeds vocabulary")
        check(self.vocabulary * 2 <= self.num_classes * self.units_per_class, "vocabulary",
              "too large: every unit type must belong to >= 2 classes (need vocabulary <= "
              f"{self.num_classes * self.units_per_class // 2})")
        pairs = self.num_classes * math.comb(self.units_per_class, 2)
        check(pairs <= math.comb(self.vocabulary, 2), "vocabulary",
              f"too small: {pairs} unit pairs must be distinct across classes")
        for name in ("prototype_scale", "instance_scale", "drift", "noise"):
            check(float(getattr(self, name)) >= 0, name, "must be >= 0")
        check(0 <= self.noise_frame_prob < 1, "noise_frame_prob", "must be in [0, 1)")
        fr = self.split_fractions
        check(len(fr) == 3 and min(fr) >= 0 and abs(sum(fr) - 1) < 1e-6, "split_fractions",
              f"need three non-negative fractions summing to 1, got {fr}")
        check(self.dtype in ("float16", "float32"), "dtype", "must be 'float16' or 'float32'")
        check(0 <= self.distractor_prob < 1, "distractor_prob", "must be in [0, 1)")
        check(self.feature_scale > 0, "feature_scale", "must be > 0")


PRESETS: dict[str, SyntheticConfig] = {
    # tests: ~100 videos, short, small dim: generates in well under a second
    "tiny": SyntheticConfig(
        num_videos=120, num_classes=6, vocabulary=8, units_per_class=3, background_types=4,
        length=(30, 60), unit_length=(4, 10), gap_length=(2, 8), feature_dim=16,
        prototype_scale=1.0, instance_scale=0.3, noise=0.6,
        split_fractions=(0.6, 0.2, 0.2),
    ),
    # the demo: 3000 videos of 60-180 frames, 20 classes over 24 unit types
    "default": SyntheticConfig(),
    # scale tests: 100k videos, streamed to disk
    "large": SyntheticConfig(num_videos=100_000, num_classes=100, vocabulary=60,
                             feature_dim=64),
}


def resolve_config(preset: str | SyntheticConfig) -> SyntheticConfig:
    """A preset name or a config -> the config (clear error on an unknown name)."""
    if isinstance(preset, SyntheticConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


class SyntheticWorld:
    """The fixed part of a synthetic dataset: class definitions and prototypes (from the seed)."""

    def __init__(self, config: SyntheticConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 0x5EED, 0])
        self.class_units = _class_units(config, rng)  # [C, K] unit type ids
        D = config.feature_dim
        self.unit_prototypes = rng.normal(0.0, config.prototype_scale, (config.vocabulary, D))
        self.background_prototypes = rng.normal(
            0.0, config.prototype_scale, (config.background_types, D)
        )
        # one table: unit types 0..V-1, then background types
        self._prototypes = np.concatenate([self.unit_prototypes, self.background_prototypes])

    @property
    def class_names(self) -> list[str]:
        return [
            f"class{c:03d}[" + "+".join(f"u{u}" for u in units) + "]"
            for c, units in enumerate(self.class_units)
        ]

    def label_and_split(self, video: int) -> tuple[int, str]:
        """Label (balanced: ``video % C``) and split (drawn from the video's generator)."""
        label = video % self.config.num_classes
        u = np.random.default_rng([self.seed, video, 1]).random()
        edges = np.cumsum(self.config.split_fractions)
        return label, SPLITS[min(int(np.searchsorted(edges, u, side="right")), 2)]

    def video(self, video: int) -> tuple[np.ndarray, np.ndarray, int, str]:
        """Video ``video``: features float32 ``[T, D]``, frame units int16 ``[T]`` (unit type,
        or -1 for background/noise), label, split."""
        c = self.config
        label, split = self.label_and_split(video)
        rng = np.random.default_rng([self.seed, video, 2])
        T = int(rng.integers(c.length[0], c.length[1] + 1))
        D = c.feature_dim

        # background layer: shots covering [0, T)
        n_shots = T // c.shot_length[0] + 1
        shot_len = rng.integers(c.shot_length[0], c.shot_length[1] + 1, n_shots)
        shot_of_frame = np.repeat(np.arange(n_shots), shot_len)[:T]
        shot_type = c.vocabulary + rng.integers(0, c.background_types, n_shots)
        if c.distractor_prob > 0:  # drawn only when enabled: default outputs keep their bytes
            glimpse = rng.random(n_shots) < c.distractor_prob
            shot_type = np.where(glimpse, rng.integers(0, c.vocabulary, n_shots), shot_type)
        kind = shot_type[shot_of_frame]  # prototype index per frame
        span = shot_of_frame.copy()  # span id per frame (drift / instance offset)

        # unit instances: gap, unit, gap, unit, ... starting at a random phase
        n_max = T // (c.unit_length[0] + c.gap_length[0]) + 2
        gaps = rng.integers(c.gap_length[0], c.gap_length[1] + 1, n_max)
        gaps[0] = rng.integers(0, c.gap_length[1] + c.unit_length[1] + 1)  # random phase
        lens = rng.integers(c.unit_length[0], c.unit_length[1] + 1, n_max)
        starts = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(lens)[:-1]])
        ends = np.minimum(starts + lens, T)
        keep = starts < T
        starts, ends = starts[keep], ends[keep]
        k = c.units_per_class
        order = np.concatenate([rng.permutation(k) for _ in range(len(starts) // k + 1)])
        unit_type = self.class_units[label][order[: len(starts)]]
        frame_units = np.full(T, BACKGROUND, dtype=np.int16)
        if len(starts):
            # mark spans without a Python loop: +1 at start, -1 at end, cumulative sum
            inside = np.zeros(T + 1, dtype=np.int64)
            np.add.at(inside, starts, 1)
            np.add.at(inside, ends, -1)
            on_unit = np.cumsum(inside[:T]) > 0
            instance = np.searchsorted(starts, np.arange(T), side="right") - 1
            kind = np.where(on_unit, unit_type[np.clip(instance, 0, None)], kind)
            span = np.where(on_unit, n_shots + instance, span)
            frame_units[on_unit] = unit_type[instance[on_unit]]

        # features: prototype + per-span offset + within-span random walk + noise
        n_spans = n_shots + len(starts)
        offsets = rng.normal(0.0, c.instance_scale, (n_spans, D))
        steps = rng.normal(0.0, c.drift, (T, D))
        walk = np.cumsum(steps, axis=0)
        first = np.flatnonzero(np.concatenate([[True], span[1:] != span[:-1]]))
        run_start = np.repeat(first, np.diff(np.concatenate([first, [T]])))
        walk -= walk[run_start] - steps[run_start]  # restart the walk at every span boundary
        x = self._prototypes[kind] + offsets[span] + walk
        x += rng.normal(0.0, c.noise, (T, D))
        noise_frames = rng.random(T) < c.noise_frame_prob
        if noise_frames.any():
            x[noise_frames] = rng.normal(
                0.0, math.hypot(c.prototype_scale, c.noise), (int(noise_frames.sum()), D)
            )
            frame_units[noise_frames] = BACKGROUND
        if c.nonnegative:
            x = np.maximum(x, 0.0)
        if c.feature_scale != 1.0:
            x = x * c.feature_scale
        return x.astype(np.float32), frame_units, label, split

    def videos(
        self, indices: Iterable[int]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, int, str]]:
        """``(index, features, frame_units, label, split)`` for each video index."""
        for v in indices:
            yield (v, *self.video(v))


def video_id(index: int) -> str:
    return f"syn{index:06d}"


def _class_units(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Class -> unit types: distinct unit pairs across classes, every unit in >= 2 classes.

    Greedy: each class takes the least-used unit types (random tie-break) that do not repeat a
    pair already used; restarts with a new draw in the rare case the greedy gets stuck.
    """
    C, V, K = config.num_classes, config.vocabulary, config.units_per_class
    for _ in range(1000):
        used_pairs: set[tuple[int, int]] = set()
        count = np.zeros(V, dtype=np.int64)
        classes = []
        ok = True
        for _c in range(C):
            chosen: list[int] = []
            for u in np.lexsort((rng.random(V), count)):  # least used first
                u = int(u)
                if all((min(u, w), max(u, w)) not in used_pairs for w in chosen):
                    chosen.append(u)
                    if len(chosen) == K:
                        break
            if len(chosen) < K:
                ok = False
                break
            used_pairs.update(itertools.combinations(sorted(chosen), 2))
            count[chosen] += 1
            classes.append(sorted(chosen))
        if ok and count.min() >= 2:
            return np.asarray(classes, dtype=np.int64)
    raise ValueError(
        f"SyntheticConfig: could not build {C} classes of {K} units over a vocabulary of {V} "
        "with distinct unit pairs and every unit in >= 2 classes; change vocabulary"
    )


def generate(
    preset: str | SyntheticConfig = "default",
    out: str | os.PathLike = "synthetic.h5",
    seed: int = 0,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Write a synthetic ``vimo-features`` file; returns its path.

    The file is written to ``<out>.partial`` and renamed when complete. With ``resume=True`` an
    interrupted run continues its partial file (written with the same preset and seed: videos
    already there are kept and the content is the same as an uninterrupted run).
    """
    config = resolve_config(preset)
    world = SyntheticWorld(config, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FeatureWriter(
        out, feature_dim=config.feature_dim, class_names=world.class_names, backbone="synthetic",
        fps=config.fps, gflops_per_frame=GMACS_PER_FRAME, flops_unit="MACs", dtype=config.dtype,
        resume=resume,
    ) as writer:
        done = len(writer)  # videos are written in order, so a resume continues at `done`
        todo = range(done, config.num_videos)
        bar = tqdm(todo, desc=f"synthetic -> {out.name}", unit="video", disable=not progress,
                   initial=done, total=config.num_videos)
        for v in bar:
            x, _, label, split = world.video(v)
            writer.add(video_id(v), x.astype(config.dtype), label, split)
    return out


def frame_units(
    preset: str | SyntheticConfig, seed: int, video_ids: list[str]
) -> list[np.ndarray]:
    """Ground-truth unit annotations (int16 ``[T]``: unit type or -1) of generated videos.

    Regenerated from the config and seed (not stored in the file); used by diagnostics such as
    the oracle frame selection in ``benchmarks/stage1.py``.
    """
    world = SyntheticWorld(resolve_config(preset), seed)
    result = []
    for vid in video_ids:
        if not vid.startswith("syn"):
            raise ValueError(f"video id {vid!r} is not a synthetic video id")
        result.append(world.video(int(vid[3:]))[1])
    return result


#: Bump whenever the generator's output for a given config and seed changes: cached files
#: named by :func:`dataset_path` are then regenerated instead of silently reused.
GENERATOR_VERSION = 2


def dataset_path(data_dir: str | os.PathLike, preset: str | SyntheticConfig = "default",
                 seed: int = 0) -> Path:
    """Cache file name for ``preset`` and ``seed``: keyed by a hash of the config, the seed and
    :data:`GENERATOR_VERSION`, so a changed generator or preset never reuses a stale file."""
    config = resolve_config(preset)
    blob = json.dumps({"config": asdict(config), "seed": int(seed),
                       "generator": GENERATOR_VERSION}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    name = preset if isinstance(preset, str) else "custom"
    return Path(data_dir) / f"synthetic-{name}-{key}.h5"


def ensure_dataset(data_dir: str | os.PathLike = "data",
                   preset: str | SyntheticConfig = "default", seed: int = 0, *,
                   progress: bool = True) -> Path:
    """The synthetic dataset for ``preset`` and ``seed``, generated on first use (resuming an
    interrupted generation) and cached under ``data_dir`` (see :func:`dataset_path`)."""
    path = dataset_path(data_dir, preset, seed)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        generate(preset, path, seed=seed, progress=progress, resume=partial.is_file())
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m features.synthetic",
        description="Write a synthetic long-untrimmed-video feature dataset (vimo-features HDF5).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--out", required=True, help="output .h5 file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-videos", type=int, default=None, help="override the preset's count")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run (same preset and seed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    if args.num_videos is not None:
        config = replace(config, num_videos=args.num_videos)
    path = generate(config, args.out, seed=args.seed, progress=not args.quiet, resume=args.resume)
    print(path)


if __name__ == "__main__":
    main()
