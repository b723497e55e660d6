"""Stage I alone on any ``vimo-features`` file, with settings changed: the driver behind the
ablations of docs/experiments.md section 1.

    python benchmarks/stage1_ablation.py FILE.h5 [KEY=VALUE ...] [rec.KEY=VALUE ...]

``KEY`` is a :class:`agents.stage1.Stage1Config` field (e.g. ``steps=600``, ``lr=1e-3``,
``alternatives=()``, ``pooled_lr_scale=1.0``), ``rec.KEY`` a recognizer option (e.g.
``rec.temporal='meanpool'``, ``rec.pooled_linear=False``); values are Python literals. Trains on
train with one torch thread, keeps the best val checkpoint, then prints one JSON line: the
validation curve, val and test mAP of the recognizer on uniform-25, random-25 and all frames,
and the linear probe's uniform-25 val and test mAP (as the run's self-check compares them).
"""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.probe import linear_probe  # noqa: E402
from agents.selection import evaluate_selection  # noqa: E402
from agents.stage1 import Stage1Config, train_stage1  # noqa: E402
from features.source import CachedFrameSource  # noqa: E402


def parse(pairs: list[str]) -> tuple[dict, dict]:
    """``KEY=VALUE`` strings -> (Stage1Config fields, recognizer options)."""
    config, recognizer = {}, {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"stage1_ablation: expected KEY=VALUE, got {pair!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: a string
        target = recognizer if key.startswith("rec.") else config
        target[key.removeprefix("rec.")] = value
    return config, recognizer


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    path, (fields, recognizer) = argv[0], parse(argv[1:])
    config = Stage1Config(out_dir=None, device="cpu", recognizer=recognizer, **fields)
    t0 = time.perf_counter()
    model, history = train_stage1(path, config, progress=False)
    result: dict = {"args": argv[1:], "steps": history["steps"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "chosen": history["candidates"][history["chosen"]]["recognizer"],
                    "curve": [(e["step"], round(e["loss"], 3), round(e["val_mAP"], 1))
                              for e in history["evaluations"]]}
    sources = {split: CachedFrameSource(path, split=split) for split in ("train", "val", "test")}
    for split in ("val", "test"):
        for policy in ("uniform-25", "random-25", "all"):
            result[f"{split}_{policy}"] = round(evaluate_selection(
                model, sources[split], policy, 256, seed=config.seed)["mAP"], 1)
    probe = linear_probe(sources["train"], {"val": sources["val"], "test": sources["test"]},
                         config.num_locators, seed=config.seed)
    for split in ("val", "test"):
        result[f"probe_{split}_uniform-25"] = round(probe[split]["mAP"], 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
