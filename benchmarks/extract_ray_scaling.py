"""Scaling of the Ray extraction engine: frames/s with 1, 2, ... Ray workers on one machine.

    python benchmarks/extract_ray_scaling.py [--workers 1,2] [--videos 12] [--seconds 60]
        [--backbone efficientnet_lite0] [--threads 1] [--shards N]
        [--out results/extract_ray_scaling.json]

Generates the H.264 videos of ``benchmarks/extract_throughput.py`` (640x360, 25 fps,
keyframes every 10 s), then runs ``features.extract_ray.extract_ray`` once per worker count,
each on its own local Ray cluster (one torch thread per worker, decoding inside the worker).
Frames/s is timed from the first shard dispatched (cluster up, backbones loaded) to the merged
file in place; start-up is reported apart. The ratio is frames/s of each count over that of
the first. On a shared machine the ratio is bounded by the CPU the workers actually get, so the
script also reports, per run, each worker process's CPU seconds (its shards' process time),
the CPU share each got (CPU seconds / wall), frames per worker CPU second (the work per frame:
constant when the engine itself scales) and how busy the machine was overall (/proc/stat).
``ratio_at_full_cores`` is the ratio those figures project for a whole free core per worker.
The merged files of all runs must be byte-identical (``identical`` in the output).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.extract_throughput import make_videos  # noqa: E402
from features.atomic import write_text_atomic  # noqa: E402
from features.extract_ray import extract_ray  # noqa: E402


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def run_once(manifest: Path, out: Path, workers: int, args: argparse.Namespace) -> dict:
    """One extraction with ``workers`` Ray workers; its figures."""
    busy0, total0 = _cpu_jiffies()
    start = time.perf_counter()
    summary = extract_ray(manifest, out, backbone=args.backbone, device="cpu",
                          batch_size=args.batch_size, resume=False, progress=False,
                          shards=args.shards, workers=workers, threads=args.threads)
    wall = time.perf_counter() - start
    busy1, total1 = _cpu_jiffies()
    cpu = summary.cpu_seconds_by_worker()
    return {
        "workers": summary.workers, "shards": summary.shards, "frames": summary.frames,
        "frames_per_s": summary.frames_per_s, "seconds": summary.seconds,
        "merge_seconds": summary.merge_seconds, "startup_seconds": summary.startup_seconds,
        "end_to_end_seconds": wall,
        "worker_cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "worker_cpu_share": {k: round(v / summary.seconds, 3) for k, v in cpu.items()},
        "frames_per_worker_cpu_s": summary.frames / max(sum(cpu.values()), 1e-9),
        "machine_busy_fraction": (busy1 - busy0) / max(total1 - total0, 1),
        "machine_cpus": os.cpu_count(),
        "loadavg_1min_after": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shards", type=int, default=None,
                        help="shards per run (default: one per video)")
    parser.add_argument("--out", default="results/extract_ray_scaling.json")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    args.shards = args.shards or args.videos
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_videos(Path(tmp), args.videos, args.seconds)
        outputs = []
        for workers in counts:
            out = Path(tmp) / f"ray{workers}.h5"
            runs.append(run_once(manifest, out, workers, args))
            outputs.append(out)
            print(f"{workers} worker(s): {runs[-1]['frames_per_s']:.1f} frames/s", flush=True)
        identical = all(filecmp.cmp(outputs[0], o, shallow=False) for o in outputs[1:])
    base, base_cpu = runs[0], runs[0]["frames_per_worker_cpu_s"]
    result = {
        "backbone": args.backbone, "device": "cpu", "torch_threads_per_worker": args.threads,
        "videos": args.videos, "seconds_per_video": args.seconds, "runs": runs,
        "ratio": {str(r["workers"]): r["frames_per_s"] / base["frames_per_s"] for r in runs},
        # what the ratio would be with a whole free core per worker: the measured work per
        # frame (worker CPU seconds) times the workers, over that of the first run
        "ratio_at_full_cores": {
            str(r["workers"]): (r["frames_per_worker_cpu_s"] * r["workers"])
            / (base_cpu * base["workers"]) for r in runs},
        "identical": identical,
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
