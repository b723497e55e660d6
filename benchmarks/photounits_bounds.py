"""How far is a learned policy from what PhotoUnits allows? Rule policies that read the plan.

    python benchmarks/photounits_bounds.py --run-dir results/demo [--split test]
                                           [--preset default] [--data-seed 0]
                                           [--out FILE.json]

PhotoUnits (``features.photounits``) announces every unit instance with a build-up of three
reserved textures, 3, 2 and 1 strides before it. The policies below read each frame's
category from the build's plans (what the frame shows, which a locator can tell from its
observation: see the dataset card) and act on it, inside the same batched locator core and
with the same recognizer as the learned policy (``--run-dir``'s final Stage III one):

* ``learned`` - the run's CTDE SAC actors (argmax), as in run_marl's Table 2;
* ``countdown`` - on build-up phase k, move k strides (onto the unit); elsewhere move 3;
* ``countdown+stop`` - the same, and stop on a unit frame;
* ``learned+countdown`` - the learned actors, except on build-up frames, where the countdown
  acts: the gap between this row and ``learned`` is what imprecise build-up following costs.

Prints mAP, top-1, the mean final probability of the true class (the quantity the reward
telescopes to, ``P_gt``), frames per video and frame rate; uniform-50 with the same recognizer
is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.evaluate import evaluate_selection_baseline  # noqa: E402
from agents.metrics import (  # noqa: E402
    mean_average_precision,
    mean_true_class_probability,
    top1_accuracy,
)
from agents.trainer import (  # noqa: E402
    ThreeStageTrainer,
    TrainerConfig,
    final_checkpoints,
    source_for,
)
from features.atomic import write_text_atomic  # noqa: E402
from features.photounits import PRESETS, PhotoUnitsWorld  # noqa: E402
from vimo_env.core import LocatorCore  # noqa: E402
from vimo_env.recognizer import Recognizer  # noqa: E402

POLICIES = ("learned", "countdown", "countdown+stop", "learned+countdown")
UNIT, BACKGROUND = -1, 0  # frame categories; build-up phases are 1, 2, 3 (strides to the unit)


def frame_categories(world: PhotoUnitsWorld, video_ids: list[str]) -> np.ndarray:
    """``[V, T_max]``: UNIT, BACKGROUND or the build-up phase k (k strides before)."""
    c = world.config
    leadin = c.leadin_photos
    plans = [world.plan(int(v.removeprefix("pu"))) for v in video_ids]
    out = np.full((len(plans), max(len(p.photo) for p in plans)), BACKGROUND)
    for row, plan in enumerate(plans):
        cat = out[row, : len(plan.photo)]
        cat[plan.photo < c.vocabulary] = UNIT
        for j, photo in enumerate(leadin):  # far -> near: phase len(leadin) ... 1
            cat[plan.photo == photo] = len(leadin) - j
    return out


def run_policy(name: str, core: LocatorCore, categories: np.ndarray, actor: torch.nn.Module
               ) -> dict:
    """One batched sweep over every video of the core's source."""
    n = categories.shape[0]
    core.reset(torch.arange(n))
    scores = np.zeros((n, core.recognizer.config.num_classes))
    frames = np.zeros(n)
    while not bool(core.done.all()):
        rows = (~core.done).nonzero(as_tuple=True)[0]
        cat = categories[rows.cpu().numpy()[:, None], core.positions[rows].cpu().numpy()]
        rule = np.where(cat > 0, cat, 3)
        if name.startswith("learned"):
            with torch.no_grad():
                learned = actor(core.observation[rows].float()).argmax(-1).cpu().numpy()
            act = np.where(cat > 0, rule, learned) if name == "learned+countdown" else learned
        else:
            act = np.where(cat == UNIT, 0, rule) if name == "countdown+stop" else rule
        out = core.step(torch.as_tensor(act, device=rows.device), rows=rows)
        if out.finished is not None:
            done = out.finished.videos.cpu().numpy()
            scores[done] = out.finished.scores.float().cpu().numpy()
            frames[done] = out.finished.frames.cpu().numpy()
    labels = np.asarray(core.source.labels)
    lengths = np.asarray(core.source.lengths)
    return {"policy": name, "mAP": mean_average_precision(scores, labels),
            "top1": top1_accuracy(scores, labels),
            "p_gt": mean_true_class_probability(scores, labels),
            "frames_per_video": float(frames.mean()),
            "frame_rate": 100.0 * float((frames / lengths).mean())}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a run_marl.py --out folder (Stage III)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    train_dir = run / "train" if (run / "train").is_dir() else run
    if not (train_dir / "trainer_config.json").is_file():
        raise SystemExit(f"{run}: no trainer_config.json; pass a run_marl.py --out folder")
    settings = json.loads((train_dir / "trainer_config.json").read_text())
    features = Path(settings["features"])
    key = PRESETS[args.preset].key(args.data_seed)
    if key not in features.parent.name:
        raise SystemExit(f"{features}: not PhotoUnits {args.preset!r} with data seed "
                         f"{args.data_seed} (build key {key}); pass the run's --preset and "
                         "--data-seed")
    config = TrainerConfig(**settings["config"])
    try:
        rec_path, sac_path = final_checkpoints(train_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"{err} (has the run finished Stage III?)") from None
    recognizer = Recognizer.load(rec_path, map_location=config.device).eval()
    trainer = ThreeStageTrainer(features, config, train_dir, progress=False)
    actor = trainer.load_algorithm(recognizer, sac_path).policy.actor.eval()
    source = source_for(features, args.split, config.device)
    world = PhotoUnitsWorld(PRESETS[args.preset], args.data_seed)
    categories = frame_categories(world, list(source.video_ids))  # (positions stop at T-1)
    core = LocatorCore(source, recognizer, num_locators=config.num_locators,
                       max_moves=config.max_moves, stride=config.stride, frame_cost=0.0,
                       compute_rewards=False, device=config.device,
                       batch_size=source.num_videos)
    rows = [run_policy(name, core, categories, actor) for name in POLICIES]
    uniform = evaluate_selection_baseline(recognizer, source, "uniform-50", seed=config.seed)
    print(f"{args.split} split, recognizer {rec_path}, actors {sac_path}")
    print(f"{'policy':<18} {'mAP %':>7} {'top1 %':>7} {'mean P_gt':>10} {'frames/video':>13} "
          f"{'frame rate %':>13}")
    for r in rows:
        print(f"{r['policy']:<18} {r['mAP']:>7.1f} {r['top1']:>7.1f} {r['p_gt']:>10.3f} "
              f"{r['frames_per_video']:>13.1f} {r['frame_rate']:>13.1f}")
    print(f"{'uniform-50':<18} {uniform.mAP:>7.1f} {uniform.top1:>7.1f} {'':>10} "
          f"{uniform.frames_per_video:>13.1f} {uniform.frame_rate:>13.1f}")
    if args.out:
        write_text_atomic(args.out, json.dumps(
            {"run_dir": str(run), "split": args.split, "recognizer": str(rec_path),
             "actors": str(sac_path), "policies": rows, "uniform-50": uniform.row()},
            indent=2))
    return rows


if __name__ == "__main__":
    main()
