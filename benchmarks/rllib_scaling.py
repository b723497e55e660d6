"""RLlib sampling throughput with 1, 2 and 4 EnvRunner processes (``agents.rllib_ppo``'s env).

    python benchmarks/rllib_scaling.py [--dataset FILE.h5] [--runners 1,2,4] [--rounds 3]
        [--steps 300] [--recognizer CKPT] [--out results/rllib_scaling.json]

Sampling only: each algorithm (one per runner count, all built up front with the same env and
module config as ``agents.rllib_ppo``'s shared PPO) is asked for ``--steps`` env steps per
runner (``EnvRunner.sample``, exploring, as PPO samples), all its runners at once; no
learning. Rounds are interleaved (1, 2, 4 runners, then the next round in a rotated order) so
a change in the machine's load hits every runner count alike; the table shows the best round
and lists all.

CPU: each runner reports the CPU seconds its process spent in the call (``getrusage``) and
the wall time of the call, so ``cpu %`` is how much of one core each runner got; ``cores`` is
their sum and ``steps/cpu-s`` the env steps per CPU second (the cost of a step: constant when
runners do not slow each other down, so throughput = steps/cpu-s x cores obtained). The
machine's load average and the share of all its cores that were busy during the round
(``/proc/stat``, other jobs included) are recorded too: a ratio below the runner count with
each runner far below 100% of a core means the runners waited for CPU, not for each other.

Without ``--dataset`` the tiny synthetic preset is generated in a temporary folder. Without
``--recognizer`` the env uses the package's default recognizer architecture (LSTM 256 +
8-layer transformer), freshly initialized with ``--seed``: throughput does not depend on
trained weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import rllib_ppo  # noqa: E402
from features.atomic import write_text_atomic  # noqa: E402


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot (``/proc/stat``)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _sample_on_runner(runner, steps: int) -> dict:
    """Runs inside an EnvRunner process: sample ``steps`` env steps, time them."""
    import resource

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    episodes = runner.sample(num_timesteps=steps, explore=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"pid": os.getpid(), "env_steps": int(sum(e.env_steps() for e in episodes)),
            "wall_s": wall, "cpu_s": cpu}


def measure(algo, steps: int) -> dict:
    """One sampling call on every remote runner of ``algo`` at once."""
    busy0, total0 = cpu_busy()
    t0 = time.perf_counter()
    per_runner = algo.env_runner_group.foreach_env_runner(
        lambda runner: _sample_on_runner(runner, steps), local_env_runner=False)
    wall = time.perf_counter() - t0
    busy1, total1 = cpu_busy()
    env_steps = sum(r["env_steps"] for r in per_runner)
    cpu = sum(r["cpu_s"] for r in per_runner)
    return {"env_steps": env_steps, "wall_s": wall, "env_steps_per_s": env_steps / wall,
            "runner_cpu_pct": [100.0 * r["cpu_s"] / r["wall_s"] for r in per_runner],
            "runner_cores": cpu / wall, "env_steps_per_cpu_s": env_steps / max(cpu, 1e-9),
            "machine_busy_pct": 100.0 * (busy1 - busy0) / max(total1 - total0, 1e-9),
            "loadavg_1min": float(Path("/proc/loadavg").read_text().split()[0]),
            "pids": [r["pid"] for r in per_runner]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=None, help="vimo-features file (default: tiny preset)")
    p.add_argument("--recognizer", default=None, help="Recognizer checkpoint (default: fresh)")
    p.add_argument("--runners", default="1,2,4", help="EnvRunner counts (%(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="env steps per runner per call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/rllib_scaling.json")
    args = p.parse_args(argv)
    try:
        counts = [int(x) for x in args.runners.split(",")]
    except ValueError:
        p.error(f"--runners: expected comma-separated integers, got {args.runners!r}")
    if not counts or min(counts) < 1 or args.rounds < 1 or args.steps < 1:
        p.error("--runners, --rounds and --steps must be >= 1")
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="rllib_scaling-"))
    if args.dataset is None:
        from features.synthetic import generate

        dataset = generate("tiny", tmp / "tiny.h5", seed=0, progress=False)
    else:
        dataset = Path(args.dataset)
        if not dataset.is_file():
            p.error(f"--dataset: no such file {dataset}")
    if args.recognizer is None:
        from features.source import CachedFrameSource
        from vimo_env.core import load_recognizer

        source = CachedFrameSource(dataset, split="train", device="cpu")
        recognizer = tmp / "recognizer.pt"
        load_recognizer(None, source, num_locators=3, seed=args.seed).save(recognizer)
    else:
        recognizer = Path(args.recognizer)

    session = rllib_ppo.init_ray(num_cpus=max(os.cpu_count() or 1, sum(counts)))
    results: dict[int, list[dict]] = {k: [] for k in counts}
    try:
        algos = {}
        for k in counts:
            config_args = rllib_ppo.Args(dataset=str(dataset), out=str(tmp / f"r{k}"),
                                         env_runners=k, iterations=0, seed=args.seed,
                                         recognizer=str(recognizer), frame_cost=0.01)
            algos[k] = rllib_ppo.build_algorithm(
                rllib_ppo.build_config(config_args, recognizer, 0.01), config_args.out)
            measure(algos[k], max(args.steps // 4, 20))  # warm-up
        for r in range(args.rounds):
            order = counts[r % len(counts):] + counts[:r % len(counts)]
            for k in order:
                results[k].append(measure(algos[k], args.steps))
                print(f"round {r + 1} runners {k}: "
                      f"{results[k][-1]['env_steps_per_s']:.1f} env steps/s", flush=True)
        for algo in algos.values():
            algo.stop()
    finally:
        rllib_ppo.shutdown_ray(session)
        shutil.rmtree(tmp, ignore_errors=True)

    base = max(m["env_steps_per_s"] for m in results[counts[0]])
    rows = []
    for k in counts:
        best = max(results[k], key=lambda m: m["env_steps_per_s"])
        rows.append({"runners": k, "best_env_steps_per_s": best["env_steps_per_s"],
                     "ratio_to_1": best["env_steps_per_s"] / base,
                     "all_env_steps_per_s": [m["env_steps_per_s"] for m in results[k]],
                     "best_round": best})
    print(f"\nRLlib sampling, {args.dataset or 'tiny preset'}, {args.steps} env steps per "
          f"runner per call, {args.rounds} interleaved rounds, {os.cpu_count()} cores")
    print(f"{'runners':>7} {'env steps/s (best)':>19} {'x 1 runner':>11} "
          f"{'cpu % per runner':>17} {'cores':>6} {'steps/cpu-s':>12} {'machine busy %':>15} "
          f"{'load':>5}   all rounds")
    for row in rows:
        b = row["best_round"]
        cpu = "/".join(f"{c:.0f}" for c in b["runner_cpu_pct"])
        every = ", ".join(f"{v:.1f}" for v in row["all_env_steps_per_s"])
        print(f"{row['runners']:>7} {row['best_env_steps_per_s']:>19.1f} "
              f"{row['ratio_to_1']:>10.2f}x {cpu:>17} {b['runner_cores']:>6.2f} "
              f"{b['env_steps_per_cpu_s']:>12.1f} {b['machine_busy_pct']:>15.0f} "
              f"{b['loadavg_1min']:>5.1f}   {every}")
    payload = {"dataset": str(args.dataset or "tiny preset (seed 0)"),
               "recognizer": args.recognizer or "fresh (default architecture)",
               "steps_per_runner": args.steps, "rounds": args.rounds,
               "cpu_count": os.cpu_count(), "rows": rows,
               "median_ratio": {k: float(np.median([m["env_steps_per_s"] for m in results[k]])
                                         / np.median([m["env_steps_per_s"]
                                                      for m in results[counts[0]]]))
                                for k in counts}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
