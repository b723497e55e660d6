"""The main job: train ViMo's three stages, evaluate every policy, print and save the tables.

    python benchmarks/run_marl.py [--dataset FILE.h5 | --preset {tiny,default,large}
                                   | --photounits {tiny,small,default}]
                                  [--out DIR] [--seed S] [--num-locators N] [--max-moves m]
                                  [--stride delta] [--lambda L] [--temporal lstm|meanpool|...]
                                  [--integration transformer|meanpool|maxpool|forward]
                                  [--resume]
                                  [--sweep lambda|locators|max_moves --sweep-values a,b,c]

Data. By default the PhotoUnits ``default`` dataset (``features.photounits``: long videos
assembled from real photos seen through the pretrained EfficientNet-Lite0, D=1280) is built on
first use under ``--data-dir`` (``data/``; the shot-level feature bank, the only part that runs
the backbone, is cached by its own key and shared by every assembly of the same photos), with
``--data-seed`` (0: the dataset is a fixed benchmark; ``--seed`` is the training seed).
``--preset`` selects the synthetic generator instead (``features.synthetic``), ``--dataset``
any ``vimo-features`` file (your own features: lengths, class counts and feature dimensions are
read from the file; it needs train/val/test splits).

Budgets. One recipe for every dataset (``agents.trainer.TrainerConfig``): Stage I's gradient
steps follow the train split's size, inputs are normalized with train statistics, lambda is
derived from the data after Stage I, and a linear probe checks Stage I before any SAC budget
is spent (the run stops when Stage I is below 0.9 x the probe's val mAP on the same frames;
``--allow-unhealthy-stage1`` goes on). ``--budget tiny`` shrinks networks and step counts for
smoke tests. Why these defaults, with the measurements: ``docs/experiments.md``.

Baselines. Table 2 scores every strategy with the final (Stage III) recognizer, as ViMo's Table 2
compares observing strategies within the trained framework; since that recognizer was
fine-tuned on the adaptive policy's frames, the selection baselines are also printed with the
Stage I recognizer (trained on random samples), which is the fairer recognizer for them.

Trade-off. Table 5's ``improves`` column: a stage improves the mAP-GFLOPs trade-off over the
stage before when its mAP is higher at no more than 2% more GFLOPs, or no lower at fewer
GFLOPs. Stage II (a policy) is compared with Stage I's recognizer on random frames at Stage
II's frame rate (row ``I@II``, matched cost); Stage III with Stage II.

Per-locator credit. Each locator's critic learns from ``0.5 x team reward + 0.5 x its
difference reward`` (``SACConfig.difference_credit``; the env's ``locator_credit``); the
measurements that chose it are in ``docs/experiments.md``.

Peers (``benchmarks.comparison``). After ViMo, the seed peers (``--peers``, default all four;
``--no-peers`` skips them) train on a glance/focus pair: ``--glance FILE.h5`` paired
with the dataset; on PhotoUnits (the default data) its real glance, the same frames through
Lite0 at 112 px (``features.photounits.build_glance``); otherwise a SYNTHETIC stand-in built
once from the dataset (cached beside a generated dataset, under ``--data-dir`` for a
``--dataset`` file). ``--peer-sweep`` adds each peer's operating points along its budget
knob. Their rows join Table 2 and ``policies`` (with ``frames_glanced`` /
``frames_focused``); a ViMo-Table-6-style table compares them side by side (backbones, mAP,
GFLOPs, frames, batch-1 latency, uniform sampling at no less GFLOPs), then the papers' own
ActivityNet numbers, as reported.

Prints ViMo Table 2 (strategy: frame rate, mAP, GFLOPs; test split, final recognizer) and
Table 5 (mAP and GFLOPs after each stage), with the command line that produced them, and writes
``DIR/results.json`` (SPEC section 7), ``DIR/results.csv``, ``DIR/trajectories.json`` (a few
test videos' locator trajectories per strategy, ``benchmarks.figure_data``) and the figures of
``benchmarks.plots`` (``map_vs_gflops.png``, ``trajectories.png``, ``sweep_<name>.png``; redraw
them with ``python -m benchmarks.plots DIR``). Checkpoints and TensorBoard logs go to
``DIR/train`` (``--resume`` continues them; the run's hparams under ``DIR/train/tb/hparams``).
``--sweep lambda`` (ViMo Table 3) / ``--sweep locators`` (Table 1a) / ``--sweep max_moves``
(Figure 3, default values 3,4,5,6) run the pipeline per value under
``DIR/sweep-<name>-<value>`` and add a sweep table (``sweep`` in results.json). Stage I does
not depend on lambda or on the max moves (it trains on random-25 frames of each locator's
segment), so those sweeps start from the main run's Stage I (copied; lambda set to the swept
value) and train Stages II-III only; a locator sweep trains everything per value. The value
the main run used is not trained again: its row is the main run's.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.baselines import InitialPolicy, best_schedule, search_open_loop  # noqa: E402
from agents.ctde_sac import SACConfig  # noqa: E402
from agents.evaluate import (  # noqa: E402
    SELECTION_BASELINES,
    EvalResult,
    evaluate_policy,
    evaluate_selection_baseline,
)
from agents.policies import CTDEActorPolicy  # noqa: E402
from agents.trainer import (  # noqa: E402
    SELECTION_METRICS,
    TINY_STAGE1,
    SettingsMismatch,
    Stage1Unhealthy,
    ThreeStageTrainer,
    TrainerConfig,
    source_for,
)
from benchmarks import comparison, plots  # noqa: E402
from benchmarks.figure_data import (  # noqa: E402
    collect_trajectories,
    peer_row,
    save_trajectories,
)
from benchmarks.machine import dense_matmul_gflops, peak_rss_gb  # noqa: E402
from features.atomic import atomic_path, write_text_atomic  # noqa: E402
from features.photounits import PRESETS as PHOTOUNITS_PRESETS  # noqa: E402
from features.photounits import ensure_dataset, ensure_glance  # noqa: E402
from features.synthetic import PRESETS  # noqa: E402
from features.synthetic import ensure_dataset as ensure_synthetic  # noqa: E402
from vimo_env.recognizer import INTEGRATION_VARIANTS, TEMPORAL_VARIANTS, Recognizer  # noqa: E402

# Training budgets. "default" is the one recipe for every dataset (agents.trainer.TrainerConfig;
# Stage I's budget in gradient steps follows the train split, lambda follows the data); "tiny"
# only shrinks networks and step counts for tests and smoke runs. No dataset has its own budget.
BUDGETS: dict[str, dict] = {
    "default": {},
    # a smoke budget (agents.trainer.TINY_STAGE1 for Stage I)
    "tiny": dict(
        **TINY_STAGE1, stage2_env_steps=1024, stage3_rounds=1, finetune_epochs=1,
        stage3_env_steps=512, rollout_batch_size=256, stage3_critic_warmup=8,
        schedule_prior_steps=200,
        sac=dict(actor_hidden=(64, 64), critic_hidden=(64, 64), num_envs=32,
                 collect_env_steps=128, epoch_env_steps=512, warmup_env_steps=128,
                 batch_size=64, updates_per_env_step=0.05),
    ),
}

# --sweep NAME: (argparse field swept, value type, default values)
SWEEPS: dict[str, tuple[str, type, str]] = {
    "lambda": ("frame_cost", float, "0.005,0.02,0.05,0.1"),
    "locators": ("num_locators", int, "1,2,3,4"),
    "max_moves": ("max_moves", int, "3,4,5,6"),
}
# swept fields that Stage I does not read: their sweeps start from the main run's Stage I
STAGE1_INDEPENDENT = ("frame_cost", "max_moves")


def reuse_stage1(main_train: Path, sweep_train: Path, frame_cost: float | None) -> None:
    """Copy the main run's finished Stage I into a sweep run (once; a resumed sweep keeps its
    own), with lambda set to ``frame_cost`` when given (the rule's value otherwise)."""
    src, dst = main_train / "stage1", sweep_train / "stage1"
    if (dst / "done.json").is_file():
        return
    if not (src / "done.json").is_file():
        raise FileNotFoundError(f"{src}: the main run's Stage I is not finished")
    if dst.exists():
        shutil.rmtree(dst)
    staging = dst.with_name("stage1.partial")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(src, staging)
    if frame_cost is not None:
        record = json.loads((staging / "done.json").read_text())
        record["frame_cost"] = {"value": float(frame_cost), "rule": "given"}
        write_text_atomic(staging / "done.json", json.dumps(record, indent=2))
    staging.rename(dst)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", default=None, help="a vimo-features HDF5 file")
    data.add_argument("--preset", default=None, choices=sorted(PRESETS),
                      help="use the SYNTHETIC dataset of this preset (generated on first use)")
    data.add_argument("--photounits", default="default", choices=sorted(PHOTOUNITS_PRESETS),
                      help="PhotoUnits preset, built on first use (the default data: default)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="PhotoUnits build seed (the benchmark dataset; --seed is the training "
                        "seed)")
    p.add_argument("--budget", default=None, choices=sorted(BUDGETS),
                   help="'default' (one recipe for every dataset) or 'tiny' (small networks and "
                        "step counts for smoke tests; the default for the tiny presets)")
    p.add_argument("--data-dir", default="data", help="where generated datasets are cached")
    p.add_argument("--out", default="results/marl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-locators", "-N", type=int, default=3)
    p.add_argument("--max-moves", "-m", type=int, default=4)
    p.add_argument("--stride", "--delta", type=int, default=3)
    p.add_argument("--lambda", dest="frame_cost", type=float, default=None,
                   help="reward cost per frame (default: derived from the data after Stage I, "
                        f"{TrainerConfig.frame_cost_fraction} x the val gain in P(true class) "
                        "per frame of uniform-25 over initial; see agents.trainer."
                        "frame_cost_rule)")
    p.add_argument("--temporal", choices=TEMPORAL_VARIANTS, default=None, help="F_T variant")
    p.add_argument("--integration", choices=INTEGRATION_VARIANTS, default=None, help="F_M variant")
    p.add_argument("--stage1-steps", type=int, default=None,
                   help="Stage I gradient steps (default: derived from the train split's size)")
    p.add_argument("--allow-unhealthy-stage1", action="store_true",
                   help="go on to Stage II even when Stage I is far below the linear probe")
    p.add_argument("--stage2-steps", type=int, default=None, help="SAC env steps in Stage II")
    p.add_argument("--stage3-rounds", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="K: recognizer epochs per Stage III round before switching to SAC")
    p.add_argument("--stage3-steps", type=int, default=None, help="SAC env steps per round")
    p.add_argument("--stage3-critic-warmup", type=int, default=None,
                   help="gradient steps that fit only the critics at the start of each Stage III "
                        "round (the actor waits)")
    p.add_argument("--schedule-prior-steps", type=int, default=None,
                   help="behaviour-cloning steps of Stage II's second candidate, the best "
                        "open-loop schedule on val as a policy (default 1000; 0 = SAC alone, "
                        "the paper)")
    p.add_argument("--sac-feature-noise", type=_noise_setting, default=None,
                   help="Gaussian noise on the train frames SAC's env reads, in units of the "
                        "recognizer's input std: a number, or 'auto' (calibrated so the "
                        "training videos look as new to the recognizer as val ones; default 0)")
    p.add_argument("--sac-start-jitter", type=int, default=None,
                   help="SAC's training episodes start each locator up to this many frames into "
                        "its segment (an augmentation; evaluation starts on the first frame; "
                        "default 0)")
    p.add_argument("--selection-metric", choices=SELECTION_METRICS, default=None,
                   help="val score that picks each SAC part's policy and each fine-tuning's "
                        "recognizer: p_gt (mean final P(true class), default) or mAP")
    p.add_argument("--sac", action="append", default=[], metavar="KEY=VALUE",
                   type=_sac_override,
                   help="override one SACConfig field (repeatable), e.g. --sac n_step=3 "
                        "--sac actor_hidden=512,512,512,512 --sac actor_lr=1e-5")
    p.add_argument("--sweep", choices=sorted(SWEEPS), default=None)
    p.add_argument("--sweep-values", default=None,
                   help="comma-separated values (default lambda 0.005,0.02,0.05,0.1; N 1,2,3,4; "
                        "max_moves 3,4,5,6)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--stop-after", choices=["I", "II"], default=None,
                   help="stop training after this stage (then --resume continues)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (2: the reference machine's cores; the float "
                        "reductions, and so the exact figures, depend on it)")
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--glance", default=None, metavar="FILE.h5",
                   help="the peers' glance features, paired with the dataset (same videos and "
                        "frames; default: PhotoUnits' own Lite0-at-112-px glance, else a "
                        "SYNTHETIC stand-in built once from the dataset, see "
                        "benchmarks.comparison)")
    peers = p.add_mutually_exclusive_group()
    peers.add_argument("--peers", default=",".join(comparison.PEERS),
                       help="seed peers run on the same features after ViMo (comma-separated; "
                            f"default {','.join(comparison.PEERS)})")
    peers.add_argument("--no-peers", action="store_true", help="skip the peers (a quick run)")
    p.add_argument("--peer-sweep", action="store_true",
                   help="also train each peer at two other values of its budget knob (LiteEval "
                        "gamma, NSNet K, AdaFocus and AFNet-style ratio): their operating "
                        "points in map_vs_gflops.png and results.json peers.sweep")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.schedule_prior_steps is not None and args.schedule_prior_steps < 0:
        p.error(f"--schedule-prior-steps must be >= 0, got {args.schedule_prior_steps}")
    try:
        args.peers = [] if args.no_peers else comparison.parse_peers(args.peers)
    except ValueError as err:
        p.error(str(err))
    return args


def _sac_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (field, value) for a SACConfig field; the value is a Python literal
    (``3``, ``1e-5``, ``True``) or a comma-separated tuple of them (``512,512``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    names = {f.name for f in fields(SACConfig)} - {"seed", "device", "extra"}
    if not sep or key not in names:
        raise argparse.ArgumentTypeError(
            f"--sac {text!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
    try:
        parts = [ast.literal_eval(v.strip()) for v in raw.split(",")]
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"--sac {text!r}: {raw!r} is not a number, bool or "
                                         "comma-separated list of numbers") from None
    return key, tuple(parts) if "," in raw else parts[0]


def trainer_config(args: argparse.Namespace, budget: str) -> TrainerConfig:
    values = dict(BUDGETS[budget])
    recognizer = dict(values.pop("recognizer", {}))
    values["sac"] = {**values.get("sac", {}), **dict(args.sac)}
    if args.temporal:
        recognizer["temporal"] = args.temporal
    if args.integration:
        recognizer["integration"] = args.integration
    if args.temporal or args.integration:  # an architecture asked for is the one trained
        values["stage1_alternatives"] = []
    overrides = {"stage1_steps": args.stage1_steps, "stage2_env_steps": args.stage2_steps,
                 "stage3_rounds": args.stage3_rounds, "finetune_epochs": args.finetune_epochs,
                 "stage3_env_steps": args.stage3_steps, "frame_cost": args.frame_cost,
                 "stage3_critic_warmup": args.stage3_critic_warmup,
                 "schedule_prior_steps": args.schedule_prior_steps,
                 "sac_feature_noise": args.sac_feature_noise,
                 "sac_start_jitter": args.sac_start_jitter,
                 "selection_metric": args.selection_metric,
                 "allow_unhealthy_stage1": True if args.allow_unhealthy_stage1 else None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = TrainerConfig(num_locators=args.num_locators, max_moves=args.max_moves,
                               stride=args.stride, seed=args.seed, device=args.device,
                               recognizer=recognizer, **values)
        config.sac_config()  # SACConfig checks its values: fail now, not after Stage I
    except (TypeError, ValueError) as err:
        raise SystemExit(f"run_marl.py: {err}") from None
    return config


def evaluate_run(path: Path, trainer: ThreeStageTrainer, stages: list, config: TrainerConfig,
                 batch: int, progress: bool) -> tuple[list[EvalResult], list[dict], dict]:
    """Table 2 rows (final recognizer) and Table 5 rows (each stage), on the test split.

    Extra (``extra``): every selection baseline also scored with the Stage I recognizer (the one
    trained on random samples; the final one was fine-tuned on the adaptive policy's frames),
    and Stage I's recognizer with random selection at Stage II's frame rate (matched cost).
    """
    dev = config.device
    test, val = source_for(path, "test", dev), source_for(path, "val", dev)
    kw = dict(max_moves=config.max_moves, stride=config.stride, batch_size=batch, device=dev)
    rec1 = Recognizer.load(stages[0].recognizer, map_location=dev).eval()
    stage_rows = [{"stage": "I", **_stage(evaluate_selection_baseline(rec1, test, "random-25",
                                                                     seed=config.seed))}]
    final_rec, final_actor = rec1, None
    extra: dict = {}
    if len(stages) > 1:
        actor2 = trainer.load_algorithm(rec1, stages[1].sac)
        res2 = evaluate_policy(CTDEActorPolicy(actor2), test, rec1, **kw)
        # Stage I at Stage II's cost: random frames at (at most) the adaptive frame rate
        matched = f"random-{max(1, int(res2.frame_rate))}"
        res1m = evaluate_selection_baseline(rec1, test, matched, seed=config.seed)
        extra["stage1_matched"] = {"stage": "I@II", **_stage(res1m)}
        stage_rows.append({"stage": "II", **_stage(res2)})
        final_actor = actor2
    if len(stages) > 2:
        final_rec = Recognizer.load(stages[2].recognizer, map_location=dev).eval()
        final_actor = trainer.load_algorithm(final_rec, stages[2].sac)
    rows: list[EvalResult] = []
    if final_actor is not None:
        rows.append(evaluate_policy(CTDEActorPolicy(final_actor, name="adaptive"), test,
                                    final_rec, **kw))
    for name in SELECTION_BASELINES:
        if name == "initial":
            continue
        rows.append(evaluate_selection_baseline(final_rec, test, name, seed=config.seed))
    rows.append(evaluate_policy(InitialPolicy(), test, final_rec, **kw))
    open_loop, table = search_open_loop(final_rec, val, max_moves=config.max_moves,
                                        stride=config.stride, progress=progress)
    res = evaluate_policy(open_loop, test, final_rec, **kw)
    res.extra["schedule"] = open_loop.schedule
    rows.append(res)
    if final_actor is not None:
        # the best blind schedule that costs no more than the learned policy (both on val)
        adaptive_val = evaluate_policy(CTDEActorPolicy(final_actor, name="adaptive"), val,
                                       final_rec, **kw)
        matched = best_schedule(table, adaptive_val.gflops_per_video,
                                name="open-loop@adaptive")
        res = evaluate_policy(matched, test, final_rec, **kw)
        res.extra["schedule"] = matched.schedule
        rows.append(res)
        extra["open_loop_matched_schedule"] = matched.schedule
    if len(stages) > 2:
        stage_rows.append({"stage": "III", **_stage(rows[0])})
    if final_rec is not rec1:
        extra["stage1_recognizer"] = {
            name: evaluate_selection_baseline(rec1, test, name, seed=config.seed).row()
            for name in SELECTION_BASELINES}
    extra.update({"open_loop_schedule": open_loop.schedule,
                  "open_loop_val": sorted(table, key=lambda r: -r["mAP"])[:5]})
    return rows, _mark_tradeoff(stage_rows, extra.get("stage1_matched")), extra


def _mark_tradeoff(stage_rows: list[dict], stage1_matched: dict | None) -> list[dict]:
    """``improves``: does each stage improve the mAP-GFLOPs trade-off over the stage before?

    Definition: stage X improves on the previous stage's point when it is not dominated and
    gains: mAP higher at no more than 2% more GFLOPs, or mAP no lower at lower GFLOPs (a
    Pareto improvement up to the 2% cost tolerance of our accounting). Stage II is compared
    with Stage I's recognizer at Stage II's frame rate (row ``I@II``: matched cost); Stage III
    with Stage II.
    """
    previous: dict | None = stage1_matched
    for row in stage_rows:
        if row["stage"] in ("II", "III") and previous is not None:
            cost_ok = row["gflops_per_video"] <= previous["gflops_per_video"] * 1.02
            row["improves"] = bool(
                (row["mAP"] > previous["mAP"] and cost_ok)
                or (row["mAP"] >= previous["mAP"]
                    and row["gflops_per_video"] < previous["gflops_per_video"]))
        if row["stage"] != "I":
            previous = row
    return stage_rows


def _stage(res: EvalResult) -> dict:
    return {"mAP": res.mAP, "gflops_per_video": res.gflops_per_video,
            "frame_rate": res.frame_rate, "policy": res.name}


def dataset_path(args: argparse.Namespace) -> tuple[Path, str]:
    if args.dataset:
        path = Path(args.dataset)
        if not path.is_file():
            raise SystemExit(f"--dataset {path}: file not found")
        return path, args.budget or "default"
    if args.preset is None:  # the default: PhotoUnits (real photos through Lite0)
        path = ensure_dataset(args.data_dir, args.photounits, args.data_seed,
                              progress=not args.no_progress)
        return path, args.budget or ("tiny" if args.photounits == "tiny" else "default")
    path = ensure_synthetic(args.data_dir, args.preset, args.data_seed,
                            progress=not args.no_progress)
    return path, args.budget or ("tiny" if args.preset == "tiny" else "default")


def run_once(args: argparse.Namespace, path: Path, budget: str, out: Path) -> dict:
    config = trainer_config(args, budget)
    trainer = ThreeStageTrainer(
        path, config, out / "train", progress=not args.no_progress,
        sac_epoch_callback=plots.trajectory_logger(max_moves=config.max_moves,
                                                   stride=config.stride, device=config.device,
                                                   dataset=path))
    try:
        stages = trainer.run(resume=args.resume, stop_after=args.stop_after)
    except SettingsMismatch as err:
        raise SystemExit(str(err)) from None
    except Stage1Unhealthy as err:
        banner = "!" * 100
        raise SystemExit(f"{banner}\nrun_marl.py: {err}\n{banner}") from None
    t0 = time.perf_counter()
    rows, stage_rows, extra = evaluate_run(path, trainer, stages, config, args.eval_batch_size,
                                           not args.no_progress)
    phases = {**trainer.phase_times, "evaluation": time.perf_counter() - t0}
    stage1 = stages[0].history
    probe = stage1["probe"]["test"]
    rows.append(EvalResult(name="probe", mAP=probe["mAP"], top1=probe["top1"],
                           frame_rate=probe["frame_rate"],
                           frames_per_video=probe["frames_per_video"],
                           gflops_per_video=probe["gflops_per_video"],
                           flops_unit=rows[0].flops_unit))
    extra["probe"] = stage1["probe"]
    extra["stage1_health"] = {**stage1["health"],
                              "stage1_val_mAP": stage1.get("val_mAP_on_probe_frames",
                                                           stage1["best_val_mAP"]),
                              "probe_val_mAP": stage1["probe"]["val"]["mAP"]}
    extra["frame_cost"] = stage1["frame_cost"]
    extra["stage1_steps"] = stage1["steps"]
    prior, done_file = (trainer.out / "stage2" / n for n in ("prior.json", "done.json"))
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    if prior.is_file() and "kept" in done:  # Stage II compared SAC with the cloned schedule
        extra["schedule_prior"] = {k: v for k, v in json.loads(prior.read_text()).items()
                                   if k != "top5"}
        extra["schedule_prior"]["stage2_kept"] = done["kept"]  # "sac" or "schedule prior"
        extra["schedule_prior"]["stage2_sac_val_score"] = done["best_val_score"]
    noise = {str(f.parent.relative_to(trainer.out)): json.loads(f.read_text())["scale"]
             for f in sorted(trainer.out.glob("stage[23]/**/noise.json"))}
    if noise:  # --sac-feature-noise auto: the scale each SAC part calibrated (x input std)
        extra["sac_feature_noise"] = noise
    extra["stage1_candidates"] = [{**c, "chosen": k == stage1.get("chosen", 0)}
                                  for k, c in enumerate(stage1.get("candidates", []))]
    trajectories = collect_trajectories(  # figure data: a few test videos, every strategy
        source_for(path, "test", config.device), rows, num_locators=config.num_locators,
        max_moves=config.max_moves, stride=config.stride, seed=config.seed, dataset=path,
        dataset_hint={"preset": args.preset, "seed": args.data_seed})
    return {"config": asdict(config), "rows": rows, "stages": stage_rows, "extra": extra,
            "phases": phases, "trajectories": trajectories,
            "handles": {"trainer": trainer, "stages": stages, "config": config}}


def run_peers(args: argparse.Namespace, path: Path, budget: str, out: Path, result: dict,
              pair: comparison.FeaturePair | None) -> str:
    """The ``peers`` phase: each of ``--peers`` on the glance/focus pair (``pair``: the
    checked ``--glance``; None: PhotoUnits' real glance, else the cached synthetic stand-in),
    then ViMo's batch-1 latency.
    Appends the peers' rows to ``result["rows"]`` (Table 2, ``policies``), stores the record
    under ``result["extra"]["peers"]`` and the time under ``result["phases"]["peers"]``;
    returns the printed comparison tables. Runs on one torch thread whatever ``--threads``
    (the peers' per-step ops are small: more threads only add synchronization, and their
    numbers do not depend on the setting; latencies are single-stream)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_peers(args, path, budget, out, result, pair)
    finally:
        torch.set_num_threads(threads)


def _run_peers(args: argparse.Namespace, path: Path, budget: str, out: Path, result: dict,
               pair: comparison.FeaturePair | None) -> str:
    t0 = time.perf_counter()
    built = None
    if pair is None:  # a user's file or a synthetic preset: the synthetic stand-in
        glance = comparison.stand_in_path(path, args.data_dir, user_dataset=bool(args.dataset))
        glance, built = comparison.ensure_stand_in(path, glance, args.data_seed)
        pair = comparison.FeaturePair(glance, path)
    seed = result["config"]["seed"]
    figure = result.get("trajectories")

    def add_to_figure(name: str, test: Any, video_ids: list[str]) -> None:
        row = peer_row(name, test, video_ids, figure) if figure is not None else None
        if row is not None:  # a panel per peer in trajectories.png (Figure 4)
            figure["strategies"].append(row)

    splits = {s: pair.load(s) for s in ("train", "val", "test")}  # read once, for both
    peers = comparison.run_peers(pair, args.peers, budget, seed, out / "train" / "peers",
                                 args.resume, comparison.glance_record(pair, built),
                                 on_test=add_to_figure, splits=splits)
    handles = result.get("handles")
    if handles is not None:
        peers["latency"]["vimo_ms"] = comparison.vimo_latency_ms(
            path, handles["trainer"], handles["stages"], handles["config"])
    text = comparison.comparison_table(peers, result["rows"])
    if args.peer_sweep:
        peers["sweep"] = comparison.sweep_peers(pair, peers, budget, seed,
                                                out / "train" / "peers" / "sweep", args.resume,
                                                splits=splits)
        text += "\n" + comparison.sweep_table(peers["sweep"], peers["flops_unit"])
    result["rows"].extend(comparison.peer_rows(peers))
    result["extra"]["peers"] = peers
    result.setdefault("phases", {})["peers"] = time.perf_counter() - t0
    return text


def _noise_setting(text: str) -> float | str:
    """``--sac-feature-noise``: 'auto' or a number >= 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}"
                                         ) from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}")
    return value


def _arch(options: dict) -> str:
    """'lstm+transformer' style name of a recognizer's F_T and F_M."""
    return (f"{options.get('temporal', 'lstm')}+"
            f"{options.get('integration', 'transformer')}")


def print_tables(command: str, result: dict, dataset: str, unit: str, wall: float,
                 machine: dict) -> str:
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in machine["phases"].items())
    lines = [f"$ {command}", f"dataset: {dataset}   GFLOPs counted as {unit} "
             f"(1 MAC = 2 FLOPs)   wall time {wall:.0f} s ({phases}); this machine: "
             f"{machine['matmul_gflops']:.0f} GFLOP/s fp32 matmul with {machine['threads']} "
             f"threads, peak RSS {machine['peak_rss_gb']:.1f} GB", "",
             "Table 2 - localizing strategy (test split, final recognizer)",
             f"{'strategy':<18} {'frame rate %':>12} {'frames/video':>12} {'mAP %':>8} "
             f"{'top1 %':>8} {'GFLOPs':>9}"]
    for r in result["rows"]:
        lines.append(f"{r.name:<18} {r.frame_rate:>12.1f} {r.frames_per_video:>12.1f} "
                     f"{r.mAP:>8.1f} {r.top1:>8.1f} {r.gflops_per_video:>9.1f}")
    health = result["extra"]["stage1_health"]
    lam = result["extra"]["frame_cost"]
    lines += ["", f"probe = scikit-learn logistic regression on mean-pooled uniform-25 frames "
              f"(fit on train); Stage I self-check (val, uniform-25 frames): Stage I "
              f"{health['stage1_val_mAP']:.1f}"
              f" vs probe {health['probe_val_mAP']:.1f} mAP = {100 * health['ratio']:.0f}% "
              f"({'healthy' if health['healthy'] else 'UNHEALTHY: ' + health['diagnosis']})",
              "Stage I recognizers (best val mAP on random-25): " + ", ".join(
                  f"{_arch(c['recognizer'])} {c['best_val_mAP']:.1f}"
                  + (" (kept)" if c["chosen"] else "")
                  for c in result["extra"].get("stage1_candidates", [])),
              f"lambda = {lam['value']:.5f} ({lam['rule']})",
              f"open-loop schedule (best on val): {result['extra']['open_loop_schedule']}; "
              f"within the adaptive policy's val cost (open-loop@adaptive): "
              f"{result['extra'].get('open_loop_matched_schedule')}"
              + (f"; Stage II kept: {prior['stage2_kept']} (val score: SAC "
                 f"{prior['stage2_sac_val_score']:.2f}, {prior['schedule']} cloned "
                 f"{prior['val_score']:.2f})"
                 if (prior := result["extra"].get("schedule_prior")) else ""),
              "", "Table 5 - after each training stage (test split)",
              f"{'stage':<6} {'policy':<10} {'frame rate %':>12} {'mAP %':>8} {'GFLOPs':>9} "
              f"{'improves':>9}"]
    matched = result["extra"].get("stage1_matched")
    for s in result["stages"][:1] + ([matched] if matched else []) + result["stages"][1:]:
        verdict = {True: "yes", False: "NO"}.get(s.get("improves"), "")
        lines.append(f"{s['stage']:<6} {s['policy']:<10} {s['frame_rate']:>12.1f} "
                     f"{s['mAP']:>8.1f} {s['gflops_per_video']:>9.1f} {verdict:>9}")
    lines += ["improves: mAP higher at <= 2% more GFLOPs, or mAP no lower at fewer GFLOPs, "
              "than the row before (II vs I@II = Stage I's recognizer on random frames at "
              "Stage II's frame rate; III vs II)"]
    stage1 = result["extra"].get("stage1_recognizer")
    if stage1:
        lines += ["", "Selection baselines with the Stage I recognizer (trained on random "
                  "samples; Table 2 above uses the final one)",
                  f"{'strategy':<18} {'frame rate %':>12} {'mAP %':>8} {'GFLOPs':>9}"]
        for name, r in stage1.items():
            lines.append(f"{name:<12} {r['frame_rate']:>12.1f} {r['mAP']:>8.1f} "
                         f"{r['gflops_per_video']:>9.1f}")
    text = "\n".join(lines)
    print(text)
    return text


def write_outputs(out: Path, payload: dict, rows: list[EvalResult], stages: list[dict],
                  sweep: list[dict] | None, trajectories: dict | None = None) -> None:
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "name", "mAP", "top1", "frame_rate", "frames_per_video",
                    "gflops_per_video"])
        for r in rows:
            w.writerow(["policy", r.name, f"{r.mAP:.4f}", f"{r.top1:.4f}", f"{r.frame_rate:.4f}",
                        f"{r.frames_per_video:.4f}", f"{r.gflops_per_video:.4f}"])
        for s in stages:
            w.writerow([f"stage-{s['stage']}", s["policy"], f"{s['mAP']:.4f}", "",
                        f"{s['frame_rate']:.4f}", "", f"{s['gflops_per_video']:.4f}"])
        for s in sweep or []:
            w.writerow([f"sweep-{s['sweep']}={s['value']}", "adaptive", f"{s['mAP']:.4f}",
                        f"{s['top1']:.4f}", f"{s['frame_rate']:.4f}",
                        f"{s['frames_per_video']:.4f}", f"{s['gflops_per_video']:.4f}"])
    if trajectories is not None:
        save_trajectories(out / "trajectories.json", trajectories)
    plots.draw_all(out)  # every figure, from the files just written
    plots.log_hparams(out / "train" / "tb", payload)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)  # a caller's (e.g. a test session's) setting


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    command = "python benchmarks/run_marl.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    out = Path(args.out)
    path, budget = dataset_path(args)
    # a given glance file is checked against the dataset now, before any training
    pair = comparison.check_glance(args.glance, path) if args.glance and args.peers else None
    if pair is None and args.peers and not args.dataset and args.preset is None:
        # PhotoUnits builds a real glance for the peers (the same frames through Lite0 at
        # 112 px), with the dataset and its threads, before the peers' one-thread phase
        pair = comparison.FeaturePair(ensure_glance(args.data_dir, args.photounits,
                                                    args.data_seed,
                                                    progress=not args.no_progress), path)
    data_s = time.perf_counter() - t0
    result = run_once(args, path, budget, out)
    peers_text = run_peers(args, path, budget, out, result, pair) if args.peers else None
    unit = result["rows"][0].flops_unit
    sweep: list[dict] | None = None
    sweep_s = 0.0
    if args.sweep:
        t_sweep = time.perf_counter()
        field, kind, default = SWEEPS[args.sweep]
        values = [kind(v) for v in (args.sweep_values or default).split(",")]
        sweep = []
        for value in values:
            if value == getattr(args, field):  # the main run is this value's run
                sweep.append({"sweep": args.sweep, "value": value, **result["rows"][0].row()})
                continue
            sub = argparse.Namespace(**{**vars(args), field: value})  # (not a dataclass)
            sub_out = out / f"sweep-{args.sweep}-{value}"
            if field in STAGE1_INDEPENDENT:
                if not args.resume:  # a fresh run: nothing of an earlier sweep is kept
                    shutil.rmtree(sub_out / "train", ignore_errors=True)
                reuse_stage1(out / "train", sub_out / "train",
                             frame_cost=value if field == "frame_cost" else None)
                sub.resume = True  # continue from the copied Stage I
            res = run_once(sub, path, budget, sub_out)
            adaptive = res["rows"][0]
            sweep.append({"sweep": args.sweep, "value": value, **adaptive.row()})
        sweep_s = time.perf_counter() - t_sweep
    wall = time.perf_counter() - t0
    # what this machine can do, so that wall times from other machines compare
    machine = {"matmul_gflops": dense_matmul_gflops(), "threads": torch.get_num_threads(),
               "peak_rss_gb": peak_rss_gb(),
               "phases": {"dataset": data_s, **result.get("phases", {}),
                          **({"sweep": sweep_s} if sweep is not None else {})}}
    payload = {
        "dataset": str(path), "seed": args.seed, "config": result["config"],
        "policies": [r.row() for r in result["rows"]],
        "stages": [{"stage": s["stage"], "mAP": s["mAP"],
                    "gflops_per_video": s["gflops_per_video"],
                    **({"improves": s["improves"]} if "improves" in s else {})}
                   for s in result["stages"]],
        "flops_unit": unit, "wall_time_s": wall, "machine": machine,
        "command": command, **result["extra"],
    }
    if sweep is not None:
        payload["sweep"] = sweep
    write_outputs(out, payload, result["rows"], result["stages"], sweep,
                  result["trajectories"])
    print_tables(command, result, str(path), unit, wall, machine)
    if peers_text:
        print(peers_text)
    if sweep:
        name = {"lambda": "lambda", "locators": "N", "max_moves": "m"}[args.sweep]
        print(f"\nSweep over {name} (adaptive policy, test split)")
        print(f"{name:<8} {'frame rate %':>12} {'mAP %':>8} {'GFLOPs':>9}")
        for s in sweep:
            print(f"{s['value']!s:<8} {s['frame_rate']:>12.1f} {s['mAP']:>8.1f} "
                  f"{s['gflops_per_video']:>9.1f}")
    return payload


if __name__ == "__main__":
    main()
