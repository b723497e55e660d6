"""Does a run's locator policy generalize? The same deterministic policies on train and on val.

For a finished (or stopped) ``run_marl.py`` run, plays each given SAC checkpoint's actors on the
train and the val split with the Stage I recognizer and prints mean P(true class), frames per
video and the team objective ``P - lambda x frames``, next to the initial-only and uniform-25
selections. A policy that gains on train what it loses on val fits the training videos
(docs/experiments.md section 2c)::

    python benchmarks/policy_generalization.py --run results/demo \\
        --checkpoints stage2/prior.pt stage2/best.pt stage2/checkpoint.pt

Checkpoint paths are relative to ``RUN/train``. Prints one row per (split, policy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.evaluate import evaluate_policy  # noqa: E402
from agents.metrics import mean_true_class_probability  # noqa: E402
from agents.policies import CTDEActorPolicy  # noqa: E402
from agents.selection import evaluate_selection  # noqa: E402
from agents.stage1 import SELECTED  # noqa: E402
from agents.trainer import ThreeStageTrainer, TrainerConfig, source_for  # noqa: E402
from vimo_env.recognizer import Recognizer  # noqa: E402


def measure(run: Path, checkpoints: list[str], batch_size: int = 512,
            device: str = "cpu") -> list[dict]:
    """Rows ``{"split", "policy", "p_gt", "frames_per_video", "objective", "mAP"}``. Reads the
    run's files only (nothing is trained or written)."""
    train_dir = run / "train"
    settings_file = train_dir / "trainer_config.json"
    stage1_done = train_dir / "stage1" / "done.json"
    for needed in (settings_file, stage1_done):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: missing; --run must be a run_marl.py output "
                                    "whose Stage I finished")
    settings = json.loads(settings_file.read_text())
    config = TrainerConfig(**{**settings["config"], "device": device})
    data = settings["features"]
    trainer = ThreeStageTrainer(data, config, train_dir, progress=False)
    lam = float(json.loads(stage1_done.read_text())["frame_cost"]["value"])
    recognizer = Recognizer.load(train_dir / "stage1" / SELECTED, map_location=device).eval()
    rows = []
    for split in ("train", "val"):
        source = source_for(data, split, device)
        for name in ("initial", "uniform-25"):
            r = evaluate_selection(recognizer, source, name, batch_size=batch_size,
                                   seed=config.seed)
            p = mean_true_class_probability(r["scores"], source.labels)
            rows.append({"split": split, "policy": name, "p_gt": p, "mAP": r["mAP"],
                         "frames_per_video": r["frames_per_video"],
                         "objective": p - lam * r["frames_per_video"]})
        for checkpoint in checkpoints:
            path = train_dir / checkpoint
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such checkpoint")
            algorithm = trainer.load_algorithm(recognizer, path)
            r = evaluate_policy(CTDEActorPolicy(algorithm), source, recognizer,
                                max_moves=config.max_moves, stride=config.stride,
                                batch_size=batch_size, device=device, keep_trajectories=False)
            p = mean_true_class_probability(r.scores, source.labels)
            rows.append({"split": split, "policy": checkpoint, "p_gt": p, "mAP": r.mAP,
                         "frames_per_video": r.frames_per_video,
                         "objective": p - lam * r.frames_per_video})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a run_marl.py --out folder")
    p.add_argument("--checkpoints", nargs="+", default=["stage2/best.pt"],
                   help="SAC checkpoints relative to RUN/train (default: stage2/best.pt)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where to run (the run's own device is not "
                                                   "needed: default cpu)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.run, args.checkpoints, device=args.device)
    print(f"{'split':<6} {'policy':<26} {'P(true)':>8} {'frames':>7} {'P - lam x fr':>12} "
          f"{'mAP':>6}")
    for r in rows:
        print(f"{r['split']:<6} {r['policy']:<26} {r['p_gt']:>8.3f} {r['frames_per_video']:>7.2f} "
              f"{r['objective']:>12.4f} {r['mAP']:>6.1f}")
    return rows


if __name__ == "__main__":
    main()
