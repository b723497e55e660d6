"""Extraction throughput vs. the backbone's pure inference throughput (same machine, threads).

    python benchmarks/extract_throughput.py [--backbone efficientnet_lite0] [--videos 12]
        [--seconds 60] [--workers 1] [--threads 1] [--batch-size 8]
        [--out results/extract_throughput.json]

Generates H.264 test videos (640x360, 25 fps, keyframes every 10 s), runs
``features.extract.extract`` on them, and times the backbone alone on the same number of
pre-decoded frames. Prints both figures and their ratios and saves them as JSON: ``ratio``
over the whole run (worker start-up and the first video's decode included: they do not hide
behind anything) and ``steady_ratio`` once the pipeline is full (what a long dataset sees).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.backbones import build_backbone  # noqa: E402
from features.extract import extract, extract_frames  # noqa: E402
from features.video_writer import write_video  # noqa: E402


def make_videos(folder: Path, count: int, seconds: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    rows = ["path,label,split"]
    for v in range(count):
        frames = [np.roll(base, 8 * t + 37 * v, axis=1) for t in range(25 * seconds)]
        write_video(folder / f"v{v}.mp4", frames, fps=25, keyframe_interval=250, crf=28)
        rows.append(f"v{v}.mp4,{'ab'[v % 2]},train")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results/extract_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_videos(Path(tmp), args.videos, args.seconds)
        summary = extract(manifest, Path(tmp) / "out.h5", backbone=args.backbone,
                          device=args.device, workers=args.workers, batch_size=args.batch_size,
                          resume=False, progress=False)
    net = build_backbone(args.backbone, device=args.device)
    frames = np.random.default_rng(1).integers(0, 256, (summary.frames, 224, 224, 3), np.uint8)
    extract_frames(net, frames[: args.batch_size], args.batch_size)  # warm-up
    if net.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    extract_frames(net, frames, args.batch_size)
    if net.device.type == "cuda":
        torch.cuda.synchronize()
    inference_fps = summary.frames / (time.perf_counter() - start)
    result = {
        "backbone": args.backbone, "device": str(net.device), "torch_threads": args.threads,
        "decode_workers": args.workers, "batch_size": args.batch_size, "videos": args.videos,
        "frames": summary.frames, "extraction_frames_per_s": summary.frames_per_s,
        "extraction_videos_per_s": summary.videos_per_s,
        "inference_frames_per_s": inference_fps,
        "ratio": summary.frames_per_s / inference_fps,
        "extraction_steady_frames_per_s": summary.steady_frames_per_s,
        "steady_ratio": summary.steady_frames_per_s / inference_fps,
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
