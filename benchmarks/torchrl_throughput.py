"""TorchRL front-end throughput: ``vimo_env.torchrl_env`` vs the native Gymnasium vector env.

Both envs run over the same :class:`~vimo_env.core.LocatorCore` code with the same recognizer
object and data, the same random actions (uniform in 0..3, drawn from one seeded generator) and
B rows. Reported: locator-steps/s, counted as in ``benchmarks/env_throughput.py`` (alive
locators acted on; a Gymnasium autoreset step restarts its row and acts on none of them), and
the ratio TorchRL / Gymnasium (the issue's target: within 10%, i.e. >= 0.90).

* Gymnasium: ``VideoLocatorsVectorEnv.step(actions)`` (numpy in and out, autoreset NEXT_STEP).
* TorchRL: ``env.step_and_maybe_reset(td)`` (tensordicts; rows that end restart at once), the
  loop ``env.rollout`` and the collectors run.
* core: the bare ``LocatorCore`` in the TorchRL loop's pattern (step every row, then reset the
  rows that ended), the floor both front-ends sit on: torchrl / core is the TorchRL layer's own
  overhead, free of the workload difference between the two autoreset conventions.

Each env is timed in several interleaved rounds (the machine is shared) and the best round of
each is compared; every round's figure is printed too.

Usage::

    python benchmarks/torchrl_throughput.py [--dataset FILE.h5] [--batch 1024] [--steps 8]
        [--rounds 3] [--threads 1] [--out results/torchrl_throughput.json]

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

import vimo_env  # noqa: E402
from features.source import CachedFrameSource  # noqa: E402
from vimo_env.core import VideoSampler, build_core, load_recognizer  # noqa: E402
from vimo_env.gym_env import VideoLocatorsVectorEnv  # noqa: E402


def run_gym(venv: VideoLocatorsVectorEnv, steps: int, rng: np.random.Generator) -> dict:
    core = venv.core
    B, N = venv.num_envs, core.num_locators
    locator_steps, elapsed = 0, 0.0
    for _ in range(steps):
        actions = rng.integers(0, 4, size=(B, N))
        restarting = torch.as_tensor(venv._needs_reset)
        locator_steps += int((core.alive & ~restarting.unsqueeze(1)).sum())
        t0 = time.perf_counter()
        venv.step(actions)
        elapsed += time.perf_counter() - t0
    return {"locator_steps": locator_steps, "seconds": elapsed}


def run_torchrl(env, td, steps: int, rng: np.random.Generator) -> tuple[dict, object]:
    core = env.core
    B, N = env.num_envs, core.num_locators
    locator_steps, elapsed = 0, 0.0
    for _ in range(steps):
        actions = torch.as_tensor(rng.integers(0, 4, size=(B, N)), device=env.device)
        locator_steps += int(core.alive.sum())  # every row runs: ended rows restarted at once
        t0 = time.perf_counter()
        td.set(("locators", "action"), actions)
        _, td = env.step_and_maybe_reset(td)
        elapsed += time.perf_counter() - t0
    return {"locator_steps": locator_steps, "seconds": elapsed}, td


def run_core(core, sampler, steps: int, rng: np.random.Generator) -> dict:
    B, N = core.batch_size, core.num_locators
    locator_steps, elapsed = 0, 0.0
    for _ in range(steps):
        actions = torch.as_tensor(rng.integers(0, 4, size=(B, N)), device=core.device)
        locator_steps += int(core.alive.sum())
        t0 = time.perf_counter()
        out = core.step(actions)
        if out.finished is not None:
            rows = out.finished.rows
            core.reset(torch.as_tensor(sampler.draw(len(rows)), device=core.device), rows=rows)
        elapsed += time.perf_counter() - t0
    return {"locator_steps": locator_steps, "seconds": elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None,
                        help="a vimo-features file (default: the cached synthetic default)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "torchrl_throughput.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dataset is None:
        from features.synthetic import ensure_dataset

        args.dataset = ensure_dataset(ROOT / "data", "default", seed=0)
    source = CachedFrameSource(args.dataset, split=args.split, device=args.device)
    recognizer = load_recognizer(None, source, 3, args.seed)
    common = dict(features=source, split=source.split, recognizer=recognizer,
                  device=args.device, seed=args.seed)
    B = args.batch
    venv = VideoLocatorsVectorEnv(num_envs=B, **common)
    env = vimo_env.torchrl_env(num_envs=B, update_spec_mask=True, **common)
    core = build_core(source, recognizer, split=source.split, num_locators=3, max_moves=4,
                      stride=3, frame_cost=0.1, device=args.device, seed=args.seed,
                      compute_rewards=True, batch_size=B)
    sampler = VideoSampler(source.num_videos, "random", args.seed)
    rng_g, rng_t, rng_c = (np.random.default_rng(args.seed) for _ in range(3))
    venv.reset(seed=args.seed)
    td = env.reset()
    core.reset(torch.as_tensor(sampler.draw(B), device=core.device))
    run_gym(venv, 2, rng_g)  # warm-up
    _, td = run_torchrl(env, td, 2, rng_t)
    run_core(core, sampler, 2, rng_c)
    rounds: dict[str, list[float]] = {"gymnasium": [], "torchrl": [], "core": []}
    for _ in range(args.rounds):
        g = run_gym(venv, args.steps, rng_g)
        t, td = run_torchrl(env, td, args.steps, rng_t)
        c = run_core(core, sampler, args.steps, rng_c)
        for name, r in (("gymnasium", g), ("torchrl", t), ("core", c)):
            rounds[name].append(r["locator_steps"] / r["seconds"])
    best = {k: max(v) for k, v in rounds.items()}
    ratio = best["torchrl"] / best["gymnasium"]
    layer = best["torchrl"] / best["core"]
    print(f"dataset {args.dataset.name} split {args.split}: {source.num_videos} videos, "
          f"D={source.feature_dim}; B={B}, threads={args.threads}, device={args.device}, "
          f"{args.rounds} rounds x {args.steps} steps")
    for k, v in rounds.items():
        print(f"{k:<10} locator-steps/s best {best[k]:>10.0f}   rounds "
              + ", ".join(f"{x:.0f}" for x in v))
    print(f"torchrl / gymnasium: {ratio:.3f} (target >= 0.90); torchrl / bare core: "
          f"{layer:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({
        "dataset": str(args.dataset), "split": args.split, "batch": B, "threads": args.threads,
        "device": args.device, "steps": args.steps, "rounds": rounds, "best": best,
        "ratio_torchrl_over_gymnasium": ratio,
        "ratio_torchrl_over_core": layer}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
