"""BenchMARL's MAPPO, IPPO, MASAC and IQL next to our CTDE SAC, at one env-step budget.

Every learner trains on the same ``VideoLocators`` env (the same dataset, the same Stage I
recognizer, the same lambda derived from the data after Stage I, N, m and stride) for the same
number of env steps (one env step = one row of the batched env advanced by one step, a joint
transition of the N locators: BenchMARL's ``frames`` and Tianshou's env steps), then is scored on
the test split by :func:`agents.evaluate.evaluate_policy` (deterministic actions; GFLOPs include
the policy's own inference). Two reference rows use the same recognizer: ``uniform-25`` and
``initial`` (:func:`agents.evaluate.evaluate_selection_baseline`).

Settings shared by all learners (:meth:`agents.benchmarl_task.Schedule.like_sac`): the rows,
collection size, update-to-data ratio, batch, replay size, random warm-up, gamma, learning rate
and MLP width of our CTDE SAC's config for this budget (``benchmarks/run_marl.py``'s ``BUDGETS``:
``tiny`` for the tiny dataset, the one default recipe otherwise); BenchMARL's own algorithm
defaults (its YAML files) for everything else; on-policy batches of 32 steps of every row. Our
CTDE SAC trains as in Stage II of the main job (separate actors, centralized critics,
per-locator difference credit), but keeps its *last* policy (``--select-on-val`` keeps its
val-best one, as the main job does, which BenchMARL has no counterpart for).

Usage::

    python benchmarks/benchmarl_compare.py [--dataset tiny|default|FILE.h5] [--env-steps N]
        [--algorithms mappo,ippo,masac,iql] [--no-ctde-sac] [--select-on-val] [--seed S]
        [--out DIR] [--data-dir data] [--threads 1] [--no-progress]

Prints the table (test mAP, top-1, frames per video, GFLOPs per video, training wall time) and
writes ``DIR/benchmarl_compare.json`` atomically (default ``DIR``:
``results/benchmarl_compare/<dataset>-<env steps>``; Stage I is cached under
``DIR/../<dataset>-stage1-seed<S>`` and reused by runs with other ``--env-steps``). Progress
bars only on a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.benchmarl_task import (  # noqa: E402
    ALGORITHMS,
    Schedule,
    evaluate_on_split,
    prepare,
    run_experiment,
    task_for,
)
from agents.evaluate import EvalResult, evaluate_selection_baseline  # noqa: E402
from agents.policies import CTDEActorPolicy  # noqa: E402
from agents.trainer import StageArtifacts, ThreeStageTrainer, source_for  # noqa: E402
from benchmarks.machine import dense_matmul_gflops  # noqa: E402
from benchmarks.run_marl import BUDGETS  # noqa: E402
from features.atomic import write_text_atomic  # noqa: E402
from vimo_env.recognizer import Recognizer  # noqa: E402

REFERENCES = ("uniform-25", "initial")
# TrainerConfig fields that shape Stage I (the rest of a budget is SAC's)
STAGE1_FIELDS = ("stage1_steps", "stage1_lr", "stage1_batch_size", "stage1_alternatives",
                 "allow_unhealthy_stage1", "recognizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="tiny",
                   help="'tiny' (synthetic), 'default' (PhotoUnits default, run_marl.py's "
                        "default) or a vimo-features file")
    p.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                   help="run_marl.py budget whose Stage I and SAC settings are used (default: "
                        "tiny for the tiny dataset, else default)")
    p.add_argument("--env-steps", type=int, default=16384,
                   help="training budget of every learner, in env steps (rows x steps)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"BenchMARL algorithms (comma-separated, from {', '.join(ALGORITHMS)})")
    p.add_argument("--no-ctde-sac", action="store_true", help="skip our CTDE SAC")
    p.add_argument("--select-on-val", action="store_true",
                   help="CTDE SAC keeps its val-best policy (the main job's default) instead of "
                        "its last one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(args.algorithms) - set(ALGORITHMS))
    if unknown:
        p.error(f"--algorithms: unknown {unknown}; expected some of {list(ALGORITHMS)}")
    if args.env_steps < 1:
        p.error(f"--env-steps must be >= 1, got {args.env_steps}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.budget is None:
        args.budget = "tiny" if args.dataset == "tiny" else "default"
    return args


def row(result: EvalResult, kind: str, env_steps: int | None, train_s: float | None,
        eval_s: float, **extra: Any) -> dict[str, Any]:
    """One table row: the ``results.json`` policy fields plus budget and wall times."""
    return {**result.row(), "kind": kind, "env_steps": env_steps, "train_wall_s": train_s,
            "eval_wall_s": eval_s, "flops_unit": result.flops_unit, **extra}


def format_table(rows: list[dict[str, Any]], unit: str) -> str:
    """The comparison as a Markdown table."""
    head = (f"| method | kind | env steps | test mAP % | top-1 % | frames/video | "
            f"G{unit}/video | train wall s |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = f"{r['env_steps']:,}" if r["env_steps"] is not None else ""
        wall = f"{r['train_wall_s']:.0f}" if r["train_wall_s"] is not None else ""
        lines.append(f"| {r['name']} | {r['kind']} | {steps} | {r['mAP']:.1f} | {r['top1']:.1f} "
                     f"| {r['frames_per_video']:.2f} | {r['gflops_per_video']:.3f} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress and sys.stderr.isatty()
    t_start = time.perf_counter()
    tag = Path(args.dataset).stem if Path(args.dataset).suffix else args.dataset
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarl_compare" / (
        f"{tag}-{args.env_steps}")
    out.mkdir(parents=True, exist_ok=True)
    budget = BUDGETS[args.budget]
    stage1_overrides = {k: v for k, v in budget.items() if k in STAGE1_FIELDS}
    matmul = dense_matmul_gflops()

    t0 = time.perf_counter()
    prepared = prepare(args.dataset, out_dir=out.parent / f"{tag}-stage1-seed{args.seed}",
                       data_dir=args.data_dir, data_seed=args.data_seed, seed=args.seed,
                       progress=progress, trainer_overrides=stage1_overrides)
    stage1_s = time.perf_counter() - t0
    sac_trainer_config = dataclasses.replace(
        prepared.trainer, frame_cost=prepared.frame_cost, stage2_env_steps=args.env_steps,
        select_on_val=args.select_on_val, sac=dict(budget.get("sac", {})),
        schedule_prior_steps=0)  # the learner alone, like the BenchMARL rows (no cloned schedule)
    schedule = Schedule.like_sac(sac_trainer_config)
    print(f"dataset {prepared.features} ({args.budget} budget), recognizer "
          f"{prepared.recognizer}, lambda {prepared.frame_cost:.5f}; {args.env_steps:,} env "
          f"steps per learner; {args.threads} thread(s), matmul {matmul:.0f} GFLOP/s",
          flush=True)

    rows: list[dict[str, Any]] = []
    test = source_for(prepared.features, "test")
    recognizer = Recognizer.load(prepared.recognizer, map_location="cpu").eval()
    for name in REFERENCES:
        t0 = time.perf_counter()
        ref = evaluate_selection_baseline(recognizer, test, name, seed=args.seed)
        rows.append(row(ref, "reference", None, None, time.perf_counter() - t0))

    if not args.no_ctde_sac:
        trainer = ThreeStageTrainer(prepared.features, sac_trainer_config, out / "ctde_sac",
                                    progress=progress)
        t0 = time.perf_counter()
        stage2 = trainer.stage2(StageArtifacts("I", prepared.recognizer, None), resume=False)
        train_s = time.perf_counter() - t0
        done = json.loads((out / "ctde_sac" / "stage2" / "done.json").read_text())
        algorithm = trainer.load_algorithm(recognizer, stage2.sac)
        t0 = time.perf_counter()
        result = evaluate_on_split(CTDEActorPolicy(algorithm), prepared, "test",
                                   name="ctde-sac (ours)", batch_size=args.eval_batch_size)
        rows.append(row(result, "ours", int(done["env_steps"]), train_s,
                        time.perf_counter() - t0, gradient_steps=done["gradient_steps"]))
        print(f"ctde-sac: test mAP {result.mAP:.1f}, {train_s:.0f} s", flush=True)

    task = task_for(prepared, args.dataset)
    for algorithm in args.algorithms:
        run = run_experiment(task, algorithm, env_steps=args.env_steps,
                             save_folder=out / "benchmarl" / algorithm, seed=args.seed,
                             schedule=schedule, progress=progress)
        t0 = time.perf_counter()
        result = evaluate_on_split(run.policy, prepared, "test", name=algorithm,
                                   batch_size=args.eval_batch_size)
        rows.append(row(result, "benchmarl", run.env_steps, run.wall_s,
                        time.perf_counter() - t0, train_mean_return=run.mean_return))
        print(f"{algorithm}: test mAP {result.mAP:.1f}, {run.wall_s:.0f} s", flush=True)

    unit = test.flops_unit
    table = format_table(rows, unit)
    command = "python benchmarks/benchmarl_compare.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    print(f"\n{command}\n\n{table}")
    report = {
        "dataset": str(prepared.features.resolve()), "budget": args.budget, "seed": args.seed,
        "env_steps": args.env_steps, "recognizer": str(prepared.recognizer.resolve()),
        "frame_cost": prepared.frame_cost, "flops_unit": unit,
        "stage1": {"wall_s": stage1_s, "best_val_mAP": prepared.stage1.get("best_val_mAP"),
                   "health": prepared.stage1.get("health")},
        "schedule": dataclasses.asdict(schedule),
        "ctde_sac_config": dataclasses.asdict(sac_trainer_config.sac_config()),
        "rows": rows, "table": table, "command": command, "threads": args.threads,
        "machine": {"matmul_gflops": matmul}, "wall_time_s": time.perf_counter() - t_start,
    }
    path = out / "benchmarl_compare.json"
    write_text_atomic(path, json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
