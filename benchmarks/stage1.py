"""Stage I on a synthetic dataset: training time and the frame-selection baselines.

    python benchmarks/stage1.py [--preset default] [--dataset FILE.h5] [--seed 0]
                                [--steps N] [--out results/stage1] [--threads 2]

Generates the preset (unless ``--dataset`` is given: then ``--preset``/``--seed`` must be the
ones it was generated with, for the oracle's unit annotations), trains the default recognizer
(LSTM + transformer) with Stage I, and evaluates it on the test split with the per-segment
selections ``initial``, ``random-25``, ``uniform-25``, ``random-50``, ``uniform-50``, ``all``
and the diagnostic ``oracle-in-reach``: per locator, the frames ``s_i + k*delta``
(``k = 0..m``, ``delta = 3``, ``m = 4``: the positions a locator reaches with single-stride
moves) that lie on a semantic unit, else its initial frame. It shows how well a policy that
moves onto units can do inside its reachable window with <= 5 frames per locator. A second
diagnostic, ``oracle-path``, is a feasible closed-loop path (moves of 1-3 strides, every landing
frame observed) that looks one step ahead on the unit annotations (see :func:`oracle_path`).

Prints a table and the checks (Stage I under 3 minutes; all-frames mAP >= initial-only + 20;
random-25 between them) and saves ``DIR/stage1.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.selection import Selection, evaluate_selection, segment_bounds  # noqa: E402
from agents.stage1 import Stage1Config, train_stage1  # noqa: E402
from features.source import CachedFrameSource  # noqa: E402
from features.synthetic import PRESETS, frame_units, generate  # noqa: E402

POLICIES = ["initial", "random-25", "uniform-25", "random-50", "uniform-50", "all"]


def oracle_in_reach(
    lengths: np.ndarray, units: list[np.ndarray], num_locators: int = 3, max_moves: int = 4,
    stride: int = 3,
) -> Selection:
    """Per locator: the unit frames among ``s_i + k*stride`` (k = 0..max_moves), else ``s_i``."""
    starts = segment_bounds(lengths, num_locators)[:, :-1]  # [V, N]
    k = np.arange(max_moves + 1) * stride
    pos = np.minimum(starts[..., None] + k, lengths[:, None, None] - 1)  # [V, N, m+1]
    on_unit = np.zeros(pos.shape, dtype=bool)
    for v, ann in enumerate(units):  # annotations are ragged; the lookup per video is numpy
        on_unit[v] = ann[pos[v]] >= 0
    on_unit &= np.concatenate(  # a clipped position repeats the last frame: count it once
        [np.ones_like(pos[..., :1], bool), np.diff(pos, axis=-1) > 0], axis=-1)
    none = ~on_unit.any(-1)
    on_unit[..., 0] |= none  # nothing reachable on a unit: the initial frame only
    order = np.argsort(~on_unit, axis=-1, kind="stable")  # chosen first, in temporal order
    frame_index = np.take_along_axis(pos, order, -1)
    mask = np.take_along_axis(on_unit, order, -1)
    frame_index = np.where(mask, frame_index, starts[..., None])
    return frame_index, mask


def oracle_path(
    lengths: np.ndarray, units: list[np.ndarray], num_locators: int = 3, max_moves: int = 4,
    stride: int = 3,
) -> Selection:
    """A feasible closed-loop path per locator with one step of look-ahead on the annotations.

    From ``s_i``, each move (1-3 strides, at most ``max_moves``) lands on the nearest reachable
    frame of a unit type this locator has not seen yet, else jumps 3 strides; the locator stops
    once it has seen two distinct unit types. Every landing frame counts (background ones too),
    exactly as in the environment. Python loops: a diagnostic on the test split only.
    """
    starts = segment_bounds(lengths, num_locators)[:, :-1]
    V, N = starts.shape
    frame_index = np.repeat(starts[..., None], max_moves + 1, axis=-1)
    mask = np.zeros(frame_index.shape, dtype=bool)
    mask[..., 0] = True
    for v, ann in enumerate(units):
        T = len(ann)
        for i in range(N):
            p = int(starts[v, i])
            seen = {int(ann[p])} - {-1}
            for n in range(1, max_moves + 1):
                if len(seen) >= 2 or p >= T - 1:
                    break
                reach = sorted({min(p + k * stride, T - 1) for k in (1, 2, 3)})
                new = [c for c in reach if ann[c] >= 0 and int(ann[c]) not in seen]
                p = new[0] if new else reach[-1]
                frame_index[v, i, n], mask[v, i, n] = p, True
                if ann[p] >= 0:
                    seen.add(int(ann[p]))
    return frame_index, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--dataset", default=None, help="existing file (made with --preset/--seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="gradient steps (default: Stage1Config's budget for the split)")
    parser.add_argument("--out", default="results/stage1")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    path = Path(args.dataset) if args.dataset else out / f"synthetic-{args.preset}-{args.seed}.h5"
    if not args.dataset:
        generate(args.preset, path, seed=args.seed, progress=True)
    generate_s = time.perf_counter() - t0

    config = Stage1Config(steps=args.steps, seed=args.seed, device="cpu",
                          out_dir=str(out / "checkpoints"))
    t0 = time.perf_counter()
    model, history = train_stage1(path, config, progress=True)
    train_s = time.perf_counter() - t0

    test = CachedFrameSource(path, split="test", device="cpu")
    rows = {}
    for policy in POLICIES:
        rows[policy] = evaluate_selection(model, test, policy, seed=args.seed)
    units = frame_units(args.preset, args.seed, test.video_ids)
    oracle = oracle_in_reach(test.lengths, units, config.num_locators)
    rows["oracle-in-reach"] = evaluate_selection(model, test, oracle, seed=args.seed)
    path_sel = oracle_path(test.lengths, units, config.num_locators)
    rows["oracle-path"] = evaluate_selection(model, test, path_sel, seed=args.seed)

    print(f"\ndataset {path} ({len(test.lengths)} test videos), generated in {generate_s:.1f} s")
    print(f"Stage I: {history['steps']} steps in {train_s:.1f} s ({torch.get_num_threads()} "
          f"threads), best at step {history['best_step']} (val mAP "
          f"{history['best_val_mAP']:.1f})")
    print(f"{'selection':<16}{'mAP':>7}{'top1':>7}{'frames/video':>14}{'frame rate %':>14}")
    for name, r in rows.items():
        print(f"{name:<16}{r['mAP']:>7.1f}{r['top1']:>7.1f}{r['frames_per_video']:>14.1f}"
              f"{r['frame_rate']:>14.1f}")
    m = {k: r["mAP"] for k, r in rows.items()}
    checks = {
        "stage1_under_180s": train_s < 180,
        "all_ge_initial_plus_20": m["all"] >= m["initial"] + 20,
        "random25_between": m["initial"] < m["random-25"] < m["all"],
        "oracle_vs_uniform50": m["oracle-in-reach"] - m["uniform-50"],
    }
    for k, v in checks.items():
        print(f"check {k}: {v}")
    result = {
        "dataset": str(path), "preset": args.preset, "seed": args.seed,
        "synthetic_config": asdict(PRESETS[args.preset]), "stage1_config": asdict(config),
        "generate_s": generate_s, "train_s": train_s, "threads": torch.get_num_threads(),
        "history": history, "checks": checks,
        "policies": [{"name": k, **{kk: vv for kk, vv in r.items() if kk != "scores"}}
                     for k, r in rows.items()],
    }
    (out / "stage1.json").write_text(json.dumps(result, indent=2))
    print(f"saved {out / 'stage1.json'}")


if __name__ == "__main__":
    main()
