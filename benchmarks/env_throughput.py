"""Environment throughput: PettingZoo loop vs the native batched vector env.

Prints a table and writes JSON with

* locator-steps/s (alive locators acted on per second) of (a) the PettingZoo ParallelEnv
  stepped in a Python loop and (b) ``gymnasium.make_vec("VideoLocators-v0", num_envs=B,
  vectorization_mode="vector_entry_point")`` at several B, random actions, default recognizer;
* (c) the same vector env with ``compute_rewards=False`` (F_M once per episode, at its end);
* the recognizer's achieved GFLOP/s during (b)/(c): recognizer FLOPs executed per step (per-part
  costs counted by ``torch.utils.flop_counter.FlopCounterMode``, FLOPs = 2 x MACs, times the
  rows/locators actually processed) / step time, next to a large dense fp32 matmul's GFLOP/s
  measured in the same process with the same thread count right before and after each run
  (the practical ceiling; the better of the two is used, the machine being shared);
* peak resident memory (``ru_maxrss``) after each batch size.

Usage::

    python benchmarks/env_throughput.py [--dataset data/default.h5] [--batches 64 256 1024 4096]
        [--threads 1] [--steps 6] [--out results/env_throughput.json]

The dataset defaults to the synthetic ``default`` preset, generated into ``data/`` if absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gymnasium  # noqa: E402

import vimo_env  # noqa: E402, F401 - registers VideoLocators-v0
from benchmarks.machine import dense_matmul_gflops, peak_rss_gb  # noqa: E402
from features.source import CachedFrameSource  # noqa: E402
from vimo_env.core import load_recognizer  # noqa: E402


def bench_pettingzoo(source, recognizer, seconds: float, seed: int) -> dict:
    env = vimo_env.parallel_env(features=source, split=source.split, recognizer=recognizer,
                                device="cpu", seed=seed)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    locator_steps = steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if not env.agents:
            env.reset()
        actions = {a: int(rng.integers(0, 4)) for a in env.agents}
        env.step(actions)
        locator_steps += len(actions)
        steps += 1
    dt = time.perf_counter() - t0
    return {"mode": "pettingzoo", "B": 1, "steps": steps, "seconds": dt,
            "locator_steps_per_s": locator_steps / dt}


def bench_vector(source, recognizer, B: int, steps: int, seed: int, compute_rewards: bool,
                 cost: dict) -> dict:
    venv = gymnasium.make_vec("VideoLocators-v0", num_envs=B,
                              vectorization_mode="vector_entry_point", features=source,
                              split=source.split, recognizer=recognizer, device="cpu", seed=seed,
                              compute_rewards=compute_rewards)
    inner = venv.unwrapped
    core = inner.core
    N = core.num_locators
    rng = np.random.default_rng(seed)
    venv.reset(seed=seed)
    venv.step(rng.integers(0, 4, size=(B, N)))  # warm-up
    locator_steps = 0
    flops = 0.0
    elapsed = 0.0
    for _ in range(steps):
        actions = rng.integers(0, 4, size=(B, N))
        restarting = torch.as_tensor(inner._needs_reset.copy())
        stepped = int((~restarting).sum())
        locator_steps += int((core.alive & ~restarting.unsqueeze(1)).sum())
        ending = 0
        t0 = time.perf_counter()
        _, _, terminated, _, _ = venv.step(actions)
        elapsed += time.perf_counter() - t0
        ending = int(terminated.sum())
        # executed recognizer work: F_T on every stepped (row, locator) (masked, not skipped),
        # F_M per stepped row (or per ending row without rewards); restarts observe N frames
        # and (with rewards) run F_M for P_0
        restarts = int(restarting.sum())
        fm_rows = stepped + restarts if compute_rewards else ending
        flops += (stepped + restarts) * N * cost["temporal_per_frame"] \
            + fm_rows * cost["integration"]
    venv.close()
    return {"mode": "vector" if compute_rewards else "vector-no-rewards", "B": B,
            "steps": steps, "seconds": elapsed, "locator_steps_per_s": locator_steps / elapsed,
            "ms_per_step": elapsed / steps * 1e3, "recognizer_gflops_per_s": flops / elapsed / 1e9,
            "peak_rss_gb": peak_rss_gb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None,
                        help="a vimo-features file (default: the cached synthetic default)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--steps", type=int, default=6, help="timed vector steps per B")
    parser.add_argument("--pz-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "env_throughput.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dataset is None:
        from features.synthetic import ensure_dataset

        args.dataset = ensure_dataset(ROOT / "data", "default", seed=0)
    source = CachedFrameSource(args.dataset, split=args.split, device="cpu")
    recognizer = load_recognizer(None, source, 3, args.seed)
    cost = recognizer.flops()
    ceiling = [dense_matmul_gflops()]
    rows = [bench_pettingzoo(source, recognizer, args.pz_seconds, args.seed)]
    # the machine is shared: the ceiling is re-measured right before and after every vector run
    # and each run is compared with the better of its two neighbours
    for B in args.batches:
        for rewards in (True, False) if B == 1024 else (True,):
            row = bench_vector(source, recognizer, B, args.steps, args.seed, rewards, cost)
            ceiling.append(dense_matmul_gflops())
            row["matmul_gflops"] = max(ceiling[-2], ceiling[-1])
            rows.append(row)
        print(f"  done B={B}", file=sys.stderr)
    peak = max(ceiling)
    pz = rows[0]["locator_steps_per_s"]
    print(f"dataset {args.dataset.name} split {args.split}: {source.num_videos} videos, "
          f"D={source.feature_dim}; threads={args.threads}")
    print(f"recognizer cost: F_T {cost['temporal_per_frame'] / 1e6:.3f} MFLOPs/frame, "
          f"F_M+classifier {cost['integration'] / 1e6:.2f} MFLOPs/prediction")
    print(f"dense fp32 matmul 2048^3: best {peak:.1f} GFLOP/s; samples "
          + ", ".join(f"{c:.0f}" for c in ceiling))
    print(f"{'mode':<18}{'B':>6}{'loc-steps/s':>14}{'x PZ':>8}{'ms/step':>10}"
          f"{'GFLOP/s':>10}{'matmul':>8}{'% matmul':>10}{'peak RSS GB':>13}")
    for r in rows:
        r["speedup_vs_pettingzoo"] = r["locator_steps_per_s"] / pz
        g = r.get("recognizer_gflops_per_s")
        if g is not None:
            r["fraction_of_matmul"] = g / r["matmul_gflops"]
        print(f"{r['mode']:<18}{r['B']:>6}{r['locator_steps_per_s']:>14.0f}"
              f"{r['speedup_vs_pettingzoo']:>8.1f}{r.get('ms_per_step', float('nan')):>10.1f}"
              f"{g if g is not None else float('nan'):>10.1f}"
              f"{r.get('matmul_gflops', float('nan')):>8.1f}"
              f"{100 * r.get('fraction_of_matmul', float('nan')):>10.1f}"
              f"{r.get('peak_rss_gb', float('nan')):>13.2f}")
    lean = [r for r in rows if r["mode"] == "vector-no-rewards"]
    full = [r for r in rows if r["mode"] == "vector" and r["B"] == 1024]
    if lean and full:
        print(f"no-rewards / rewarded locator-steps/s at B=1024: "
              f"{lean[0]['locator_steps_per_s'] / full[0]['locator_steps_per_s']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({
        "dataset": str(args.dataset), "split": args.split, "threads": args.threads,
        "matmul_gflops": peak, "matmul_gflops_samples": ceiling, "recognizer_cost": cost,
        "results": rows}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
