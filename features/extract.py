"""Feature extraction: a dataset manifest in, a ``vimo-features`` HDF5 file out.

    python -m features.extract --manifest FILE [FILE ...] --out FILE.h5
        [--backbone efficientnet_lite0|resnet50] [--weights PATH] [--fps 1] [--device auto]
        [--kind auto] [--video-root DIR] [--workers 1] [--batch-size 8] [--no-resume]
        [--engine local|ray] [--address ADDR] [--shards K] [--ray-workers N]

``--engine ray`` shards the manifest over Ray actors (``features.extract_ray``) and merges
their part files into the same file the local engine writes.

Decoding runs in worker processes (a torch ``DataLoader`` over a decode dataset, in manifest
order) while the main process runs the backbone, so decoding hides behind inference. The
output is written through ``FeatureWriter`` to ``<out>.partial`` and renamed when complete; a
rerun (``resume=True``, the default) skips videos already in the partial or final file. Files
that fail to decode are skipped, listed at the end and written to ``<out>.failed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features.atomic import write_text_atomic
from features.backbones import BACKBONES, Backbone, build_backbone
from features.decode import DecodeError, sample_frames
from features.manifests import ManifestEntry, load_manifests
from features.store import FeatureWriter

# Test hook: hard-exit (as if killed) after this many videos were written in this run.
_STOP_AFTER_ENV = "VIMO_EXTRACT_STOP_AFTER"


@dataclass
class ExtractionSummary:
    """What one extraction run did (counts, failures and throughput)."""

    out: str
    videos_total: int
    videos_written: int = 0
    videos_skipped: int = 0
    frames: int = 0
    seconds: float = 0.0
    failed: list[dict[str, str]] = field(default_factory=list)
    #: frames and seconds after the first video was written: throughput once the decode
    #: pipeline is full (worker start-up and the first decode excluded)
    steady_frames: int = 0
    steady_seconds: float = 0.0

    @property
    def steady_frames_per_s(self) -> float:
        return self.steady_frames / self.steady_seconds if self.steady_seconds > 0 else 0.0

    @property
    def videos_per_s(self) -> float:
        return self.videos_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0



class DecodeDataset(Dataset):
    """Decodes manifest entries to uint8 frames; a failure is returned, not raised.

    Item ``i`` is ``(i, frames [T, 224, 224, 3] | None, error message | None)``.
    """

    def __init__(self, entries: Sequence[ManifestEntry], fps: float = 1.0,
                 size: int = 224, decoder_threads: int = 1) -> None:
        self.entries = list(entries)
        self.fps = float(fps)
        self.size = int(size)
        self.decoder_threads = int(decoder_threads)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        entry = self.entries[i]
        try:
            frames, _ = sample_frames(entry.path, self.fps, self.size,
                                      threads=self.decoder_threads)
            return i, frames, None
        except DecodeError as exc:
            return i, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch job
            return i, None, f"{entry.path}: unexpected {type(exc).__name__}: {exc}"


def _first(batch: list) -> object:
    return batch[0]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def decode_loader(dataset: DecodeDataset, workers: int = 1, prefetch: int = 4) -> DataLoader:
    """Yields ``dataset`` items in order, decoded by ``workers`` processes (0: in-process)."""
    kwargs = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if workers > 0 else {}
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers,
                      collate_fn=_first, **kwargs)


def extract_frames(backbone: Backbone, frames: np.ndarray, batch_size: int) -> np.ndarray:
    """Features float32 ``[T, D]`` of uint8 frames ``[T, 224, 224, 3]``, in batches."""
    chunks = [backbone.extract(frames[s : s + batch_size]).cpu()
              for s in range(0, len(frames), batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, backbone.feature_dim), np.float32)


def extract_videos(writer: FeatureWriter, net: Backbone, pending: Sequence[ManifestEntry],
                   fps: float, batch_size: int, workers: int
                   ) -> Iterator[tuple[int, dict[str, str] | None]]:
    """The per-video loop of both engines (the local one and each Ray shard): decode
    ``pending`` in order (``workers`` processes), extract, add to ``writer`` and flush (a
    crash loses at most the video in flight). One write sequence for both, which is what
    makes their files byte-for-byte equal. Yields ``(frames, None)`` per video written and
    ``(0, failure)`` per video that failed to decode (nothing written)."""
    for index, frames, error in decode_loader(DecodeDataset(pending, fps), workers=workers):
        entry = pending[index]
        if error is not None:
            yield 0, {"video_id": entry.video_id, "path": str(entry.path), "error": error}
            continue
        writer.add(entry.video_id, extract_frames(net, frames, batch_size), entry.label,
                   entry.split)
        _flush(writer)
        yield len(frames), None


def _open_writer(out: Path, backbone: Backbone, class_names: list[str], fps: float,
                 resume: bool, dtype: str) -> FeatureWriter:
    partial = out.with_name(out.name + ".partial")
    if resume and out.exists() and not partial.exists():
        os.replace(out, partial)  # a finished file is extended, never rewritten
    if resume and partial.exists():
        try:
            with h5py.File(partial, "r") as f:
                attrs = dict(f.attrs)
                old_classes = [s.decode() if isinstance(s, bytes) else s
                               for s in f["class_names"][:]]
        except (OSError, KeyError) as exc:
            aside = partial.with_name(partial.name + ".corrupt")
            warnings.warn(f"{partial}: unreadable partial output ({exc}); moved to {aside} and "
                          "starting afresh", stacklevel=2)
            os.replace(partial, aside)
        else:
            expected = {"backbone": backbone.name, "feature_dim": backbone.feature_dim,
                        "fps": float(fps)}
            for key, value in expected.items():
                if attrs.get(key) != value:
                    raise ValueError(f"{partial}: cannot resume: attribute '{key}' is "
                                     f"{attrs.get(key)!r}, this run uses {value!r} "
                                     "(delete the file or pass resume=False)")
            if old_classes != list(class_names):
                raise ValueError(f"{partial}: cannot resume: field 'class_names' differs from "
                                 "the manifest's classes")
    return FeatureWriter(out, feature_dim=backbone.feature_dim, class_names=class_names,
                         backbone=backbone.name, fps=fps,
                         gflops_per_frame=backbone.gmacs_per_frame, flops_unit="MACs",
                         dtype=dtype, resume=resume)


def extract(
    manifest: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    fps: float = 1.0,
    device: str = "auto",
    workers: int = 1,
    batch_size: int = 8,
    resume: bool = True,
    *,
    kind: str = "auto",
    video_root: str | os.PathLike | None = None,
    dtype: str = "float16",
    progress: bool = True,
) -> ExtractionSummary:
    """Extract per-frame features of every manifest video into a ``vimo-features`` file.

    Args:
        manifest: manifest file(s) of one dataset (see ``features.manifests``).
        out: output HDF5 path.
        backbone: ``"efficientnet_lite0"`` or ``"resnet50"``.
        weights: state-dict file for the backbone (default: shipped weights / random).
        fps: frames sampled per second of video.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        workers: decode processes (0: decode in the main process, no overlap).
        batch_size: frames per backbone call.
        resume: continue a previous run on ``out`` (skip finished videos).
        kind / video_root: passed to ``load_manifests``.
        dtype: storage dtype of the features.
        progress: show a tqdm progress bar.
    """
    paths = [manifest] if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    entries, class_names = load_manifests(paths, kind, video_root)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = ExtractionSummary(out=str(out), videos_total=len(entries))
    net = build_backbone(backbone, weights, device)
    stop_after = int(os.environ.get(_STOP_AFTER_ENV, "0") or 0)
    _ = net.macs_per_frame  # measured once (one forward), outside the timed run
    start = time.perf_counter()
    first_written: float | None = None
    first_frames = 0
    with _open_writer(out, net, class_names, fps, resume, dtype) as writer:
        pending = [e for e in entries if e.video_id not in writer]
        summary.videos_skipped = len(entries) - len(pending)
        bar = tqdm(total=len(pending), unit="video", desc=f"extract {out.name}",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for frames, failure in extract_videos(writer, net, pending, fps, batch_size,
                                                  workers):
                if failure is not None:
                    summary.failed.append(failure)
                else:
                    summary.videos_written += 1
                    summary.frames += frames
                    if first_written is None:
                        first_written, first_frames = time.perf_counter(), summary.frames
                    if stop_after and summary.videos_written >= stop_after:
                        _crash()
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix(frames_per_s=f"{summary.frames / max(elapsed, 1e-9):.1f}",
                                failed=len(summary.failed))
    end = time.perf_counter()
    summary.seconds = end - start
    if first_written is not None:
        summary.steady_frames = summary.frames - first_frames
        summary.steady_seconds = end - first_written
    _write_failed(out, summary.failed)
    return summary


def _crash() -> None:
    """Test hook: die like a killed job (decode workers included), with no cleanup at all."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os._exit(3)


def _flush(writer: FeatureWriter) -> None:
    """Push the video just added to disk, so a crash loses at most the video in flight."""
    flush = getattr(writer, "flush", None)
    if callable(flush):
        flush()
    else:
        writer._file.flush()  # noqa: SLF001 - FeatureWriter has no public flush yet


def _write_failed(out: Path, failed: list[dict[str, str]]) -> None:
    path = out.with_name(out.name + ".failed.json")
    if not failed:
        path.unlink(missing_ok=True)
        return
    write_text_atomic(path, json.dumps(failed, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", nargs="+", required=True, help="manifest file(s)")
    parser.add_argument("--out", required=True, help="output vimo-features HDF5")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES)
    parser.add_argument("--weights", default=None, help="backbone state-dict file")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kind", default="auto",
                        choices=("auto", "generic", "activitynet", "fcvid", "kinetics_sounds"))
    parser.add_argument("--video-root", default=None)
    parser.add_argument("--workers", type=int, default=None,
                        help="decode processes (default: 1; per Ray actor with --engine ray: 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per backbone call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (inference)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--no-resume", action="store_true", help="start afresh")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    ray_args = parser.add_argument_group("Ray engine (--engine ray)")
    ray_args.add_argument("--engine", default="local", choices=("local", "ray"),
                          help="local: this process; ray: shards over Ray actors")
    ray_args.add_argument("--address", default=None,
                          help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    ray_args.add_argument("--shards", type=int, default=None,
                          help="number of shards (default: 4 per actor, or the stored plan's)")
    ray_args.add_argument("--ray-workers", type=int, default=None,
                          help="extraction actors (default: one per GPU, else per CPU)")
    ray_args.add_argument("--shard-retries", type=int, default=1,
                          help="reruns of a shard whose worker died, in this run")
    args = parser.parse_args(argv)
    for flag, value, least in (("--shards", args.shards, 1), ("--ray-workers", args.ray_workers, 1),
                               ("--shard-retries", args.shard_retries, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the writer: the partial file stays valid

    signal.signal(signal.SIGTERM, _terminate)
    if args.engine == "ray":
        return _main_ray(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = extract(args.manifest, args.out, backbone=args.backbone, weights=args.weights,
                      fps=args.fps, device=args.device,
                      workers=1 if args.workers is None else args.workers,
                      batch_size=args.batch_size, resume=not args.no_resume, kind=args.kind,
                      video_root=args.video_root, dtype=args.dtype, progress=not args.quiet)
    _report(summary)
    return 0


def _report(summary: ExtractionSummary) -> None:
    print(f"{summary.out}: {summary.videos_written} videos written, {summary.videos_skipped} "
          f"already done, {len(summary.failed)} failed; {summary.frames} frames in "
          f"{summary.seconds:.1f}s ({summary.videos_per_s:.2f} videos/s, "
          f"{summary.frames_per_s:.1f} frames/s)")
    if summary.failed:
        print(f"failed files (also in {summary.out}.failed.json):", file=sys.stderr)
        for item in summary.failed:
            print(f"  {item['error']}", file=sys.stderr)


def _main_ray(args: argparse.Namespace) -> int:
    """``--engine ray``: run :func:`features.extract_ray.extract_ray`; an unfinished shard
    is reported (exit status 1), its part kept for a rerun."""
    from features.extract_ray import ShardFailure, extract_ray

    try:
        summary = extract_ray(
            args.manifest, args.out, backbone=args.backbone, weights=args.weights, fps=args.fps,
            device=args.device, batch_size=args.batch_size, resume=not args.no_resume,
            kind=args.kind, video_root=args.video_root, dtype=args.dtype,
            progress=not args.quiet, address=args.address, shards=args.shards,
            workers=args.ray_workers, threads=args.threads,
            decode_workers=args.workers or 0, retries=args.shard_retries)
    except ShardFailure as exc:
        print(str(exc), file=sys.stderr)
        return 1
    _report(summary)
    print(f"ray: {summary.workers} workers, {summary.shards} shards ({summary.shards_skipped} "
          f"already done), merge {summary.merge_seconds:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
