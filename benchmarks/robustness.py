"""The robustness matrix: the main job's defaults on datasets they were never tuned on.

    python benchmarks/robustness.py [--out results/robustness] [--data-dir data]
                                    [--only NAME[,NAME]] [--jobs 2] [--threads 1] [--quick]

Builds held-out variants of our own generators that differ in feature dimension (64-2048), scale
(x0.01 to x100), sign (signed / non-negative, CNN-like), class count (10-200), train size
(300-5,000 videos; the small ones keep 150-280 val and test videos each, so a split's mAP is not
decided by a handful of videos), video length (30-600 frames), unit length and sparsity, with
and without distractors and build-ups; PhotoUnits variants re-use the cached shot bank of real
photos seen through EfficientNet-Lite0 (no new backbone pass). Then runs
``benchmarks/run_marl.py`` with its defaults on each (a subprocess per dataset, ``--jobs`` at a
time) and prints one table: Stage I (random-25, Stage I recognizer) against the linear probe
(uniform-25), the adaptive policy, open-loop, uniform-25/50, all frames and initial (final
recognizer), frames per video, wall time, and the checks of issue 12 (Stage I >= 0.9 x probe;
adaptive strictly above open-loop and initial, and above the best open-loop schedule of its own
cost; all frames at most 1 mAP below uniform-25).
``--quick`` runs two tiny variants with the tiny budget (what the test suite runs). The table
and every run's ``results.json`` go under ``--out``; a dataset whose run already finished is not
re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import dense_matmul_gflops  # noqa: E402
from features.atomic import atomic_path, write_text_atomic  # noqa: E402
from features.photounits import PRESETS as PHOTOUNITS  # noqa: E402
from features.photounits import build as build_photounits  # noqa: E402
from features.photounits import shared_bank_path  # noqa: E402
from features.synthetic import PRESETS as SYNTHETIC  # noqa: E402
from features.synthetic import generate as generate_synthetic  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One held-out dataset: a generator, its overrides and a scale applied afterwards."""

    name: str
    generator: str  # "synthetic" or "photounits"
    overrides: dict = field(default_factory=dict)
    scale: float = 1.0  # features multiplied after generation (PhotoUnits: a scaled copy)
    note: str = ""


MATRIX: tuple[Variant, ...] = (
    Variant("syn-cnn768", "synthetic",
            dict(feature_dim=768, nonnegative=True, length=(90, 240), distractor_prob=0.3,
                 noise=2.0, num_videos=1200),
            note="D=768 ReLU features, 20 classes, distractor units in every class"),
    Variant("syn-d64-x0.01-short", "synthetic",
            dict(feature_dim=64, feature_scale=0.01, num_classes=10, vocabulary=10,
                 length=(30, 60), unit_length=(3, 8), gap_length=(2, 8), num_videos=650,
                 split_fractions=(0.5, 0.25, 0.25), dtype="float32"),
            note="D=64 signed x0.01, 10 classes, 300 train videos of 30-60 frames"),
    Variant("syn-d2048-x100-relu", "synthetic",
            dict(feature_dim=2048, feature_scale=100.0, nonnegative=True, num_videos=900),
            note="D=2048 ReLU x100 (ResNet-50-like width)"),
    Variant("syn-200cls-5k", "synthetic",
            dict(num_classes=200, vocabulary=50, feature_dim=256, length=(30, 90),
                 unit_length=(4, 10), gap_length=(2, 10), num_videos=7150),
            note="200 classes, 5,000 train videos"),
    Variant("syn-long-sparse", "synthetic",
            dict(length=(300, 600), unit_length=(3, 8), gap_length=(30, 60), num_videos=900,
                 split_fractions=(0.5, 0.25, 0.25), feature_dim=128),
            note="300-600 frames, short sparse units"),
    Variant("pu-24cls-distract", "photounits",
            dict(num_classes=24, length=(100, 200), distractor_prob=0.1, num_videos=1400,
                 split_fractions=(0.6, 0.2, 0.2), mp4_videos=0),
            note="real photos (Lite0 D=1280 fp16), 24 classes, distractor glimpses, 840 train"),
    Variant("pu-short-dense", "photounits",
            dict(num_classes=10, length=(30, 90), num_videos=900,
                 split_fractions=(0.5, 0.25, 0.25), mp4_videos=0),
            note="real photos, 10 classes, 30-90 frames, dense units, no build-ups"),
    Variant("pu-buildup-x0.01", "photounits",
            dict(num_classes=12, gap_length=(20, 40), leadin_textures=("page", "text", "cell"),
                 leadin_length=(3, 3), num_videos=1000, mp4_videos=0),
            scale=0.01, note="real photos x0.01, sparse units announced by build-ups"),
)

QUICK: tuple[Variant, ...] = (
    Variant("quick-syn-d300-x100-relu", "synthetic",
            dict(**{**dataclasses.asdict(SYNTHETIC["tiny"]), "feature_dim": 300,
                    "feature_scale": 100.0, "nonnegative": True, "num_videos": 240}),
            note="tiny, D=300 ReLU x100"),
    Variant("quick-syn-d16-x0.01", "synthetic",
            dict(**{**dataclasses.asdict(SYNTHETIC["tiny"]), "feature_scale": 0.01,
                    "num_videos": 240, "dtype": "float32"}),
            note="tiny, D=16 signed x0.01"),
)


def build(variant: Variant, data_dir: Path, progress: bool = False) -> Path:
    """The variant's ``vimo-features`` file under ``data_dir`` (built once, then cached)."""
    out = data_dir / f"{variant.name}.h5"
    if out.is_file():
        return out
    data_dir.mkdir(parents=True, exist_ok=True)
    if variant.generator == "synthetic":
        config = dataclasses.replace(SYNTHETIC["default"], **variant.overrides)
        if variant.scale != 1.0:
            config = dataclasses.replace(config, feature_scale=config.feature_scale
                                         * variant.scale)
        generate_synthetic(config, out, seed=0, progress=progress)
        return out
    config = dataclasses.replace(PHOTOUNITS["default"], **variant.overrides)
    built = build_photounits(data_dir / variant.name, config, 0, progress=progress,
                             bank_path=shared_bank_path(data_dir, config, 0))
    scaled_copy(built, out, variant.scale)
    return out


def scaled_copy(src: Path, dst: Path, scale: float) -> None:
    """``dst`` = ``src`` with every feature multiplied by ``scale`` (written atomically)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        if scale != 1.0:
            with h5py.File(tmp, "r+") as f:
                features = f["features"]
                for lo in range(0, features.shape[0], 65536):
                    block = features[lo: lo + 65536]
                    features[lo: lo + 65536] = (block.astype("float32") * scale).astype(
                        block.dtype)


def run(variant: Variant, path: Path, out: Path, threads: int, quick: bool) -> dict:
    """``run_marl.py --dataset path`` with its defaults in a subprocess; its results."""
    results = out / variant.name / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run_marl.py"), "--dataset", str(path),
           "--out", str(out / variant.name), "--threads", str(threads), "--no-progress",
           "--resume", "--no-peers"]  # ViMo's defaults only (the peers: run_marl alone)
    if quick:
        cmd += ["--budget", "tiny", "--allow-unhealthy-stage1"]
    log = out / f"{variant.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.call(cmd, stdout=stream, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if code != 0 or not results.is_file():
        tail = [line for line in log.read_text().strip().splitlines()[-6:]
                if line.strip("! ")]  # drop run_marl's banner lines
        return {"failed": True, "wall_time_s": time.perf_counter() - t0,
                "error": " ".join(tail)}
    return json.loads(results.read_text())


def row(variant: Variant, path: Path, result: dict) -> dict:
    """One line of the matrix table from a run's ``results.json``."""
    with h5py.File(path, "r") as f:
        splits = f["splits"].asstr()[:]
        lengths = f["offsets"][1:] - f["offsets"][:-1]
        info = {"D": int(f.attrs["feature_dim"]), "C": len(f["class_names"]),
                "train": int((splits == "train").sum()),
                "T": f"{int(lengths.min())}-{int(lengths.max())}"}
    base = {"dataset": variant.name, "note": variant.note, **info}
    if result.get("failed"):
        return {**base, "failed": True, "error": result["error"],
                "wall_s": result["wall_time_s"]}
    policies = {p["name"]: p for p in result["policies"]}
    stage1 = result["stages"][0]["mAP"]
    probe = policies["probe"]["mAP"]
    adaptive, open_loop = policies["adaptive"], policies["open-loop"]
    matched = policies.get("open-loop@adaptive", open_loop)
    initial, u25, everything = policies["initial"], policies["uniform-25"], policies["all"]
    return {**base, "stage1": stage1, "probe": probe,
            "stage1_ratio": stage1 / probe if probe else 0.0,
            "adaptive": adaptive["mAP"], "adaptive_frames": adaptive["frames_per_video"],
            "adaptive_rate": adaptive["frame_rate"], "open_loop": open_loop["mAP"],
            "open_loop_matched": matched["mAP"], "open_loop_matched_rate": matched["frame_rate"],
            "uniform25": u25["mAP"], "uniform50": policies["uniform-50"]["mAP"],
            "all": everything["mAP"], "initial": initial["mAP"],
            "lambda": result["frame_cost"]["value"], "wall_s": result["wall_time_s"],
            "checks": {
                "stage1_vs_probe": stage1 >= 0.9 * probe,
                "adaptive_above_open_loop_and_initial": adaptive["mAP"] > open_loop["mAP"]
                and adaptive["mAP"] > initial["mAP"],
                "adaptive_above_open_loop_at_its_cost": adaptive["mAP"] > matched["mAP"],
                "adaptive_at_most_15pct": adaptive["frame_rate"] <= 15.0,
                "all_within_1_of_uniform25": everything["mAP"] >= u25["mAP"] - 1.0}}


def print_table(rows: list[dict], matmul: float, total_s: float, threads: int) -> str:
    head = (f"{'dataset':<22}{'D':>5}{'C':>5}{'train':>6}{'T':>9}{'I r25':>7}{'probe':>7}"
            f"{'ratio':>6}{'adapt':>7}{'fr %':>6}{'open':>7}{'open@':>7}{'u25':>7}{'u50':>7}"
            f"{'all':>7}{'init':>7}{'wall s':>8}  checks")
    lines = [head]
    for r in rows:
        start = f"{r['dataset']:<22}{r['D']:>5}{r['C']:>5}{r['train']:>6}{r['T']:>9}"
        if r.get("failed"):
            lines.append(f"{start}  FAILED after {r['wall_s']:.0f} s: {r['error'][:150]}")
            continue
        failed = [k for k, ok in r["checks"].items() if not ok]
        lines.append(
            f"{start}{r['stage1']:>7.1f}{r['probe']:>7.1f}{r['stage1_ratio']:>6.2f}"
            f"{r['adaptive']:>7.1f}{r['adaptive_rate']:>6.1f}{r['open_loop']:>7.1f}"
            f"{r['open_loop_matched']:>7.1f}"
            f"{r['uniform25']:>7.1f}{r['uniform50']:>7.1f}{r['all']:>7.1f}{r['initial']:>7.1f}"
            f"{r['wall_s']:>8.0f}  {'all pass' if not failed else 'FAIL: ' + ', '.join(failed)}")
    lines.append(f"total wall time {total_s:.0f} s; this machine: {matmul:.0f} GFLOP/s fp32 "
                 f"matmul ({threads} thread(s) per run)")
    lines.append("I r25 = Stage I recognizer on random-25 frames; probe = logistic regression on "
                 "mean-pooled uniform-25 frames; open@ = best open-loop schedule within the "
                 "adaptive policy's val cost; adapt / open / u25 / u50 / all / init = final "
                 "recognizer; fr % = adaptive frame rate; test split, mAP %")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/robustness")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--only", default=None, help="comma-separated dataset names")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--quick", action="store_true",
                   help="two tiny variants with the tiny budget (the test suite's version)")
    args = p.parse_args(argv)
    variants = QUICK if args.quick else MATRIX
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {v.name for v in variants}
        if unknown:
            p.error(f"--only: unknown datasets {sorted(unknown)}; known: "
                    f"{[v.name for v in variants]}")
        variants = tuple(v for v in variants if v.name in wanted)
    out, data_dir = Path(args.out), Path(args.data_dir)
    t0 = time.perf_counter()
    paths = [build(v, data_dir) for v in variants]  # sequential: PhotoUnits share one bank

    def one(item: tuple[Variant, Path]) -> dict:
        variant, path = item
        return row(variant, path, run(variant, path, out, args.threads, args.quick))

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, zip(variants, paths, strict=True)))
    total = time.perf_counter() - t0
    matmul = dense_matmul_gflops()
    text = print_table(rows, matmul, total, args.threads)
    write_text_atomic(out / "robustness.json", json.dumps(
        {"rows": rows, "total_wall_s": total, "matmul_gflops": matmul, "threads": args.threads,
         "command": "python benchmarks/robustness.py " + " ".join(argv or sys.argv[1:])},
        indent=2))
    write_text_atomic(out / "robustness.txt", text + "\n")
    return rows


if __name__ == "__main__":
    main()
