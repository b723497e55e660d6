"""Live mode: a frame source that decodes and extracts frames on demand, straight from video files.

:class:`LiveFrameSource` serves a dataset of video files (a manifest, or ``(path, label, split)``
rows) to the environment exactly like a cached feature file, but computes a frame's feature only
when a locator visits it:

* ``gather(videos, frames)`` looks the requested ``(video, frame)`` pairs up in per-video caches,
  decodes only the missing ones (frame ``t`` = the frame on screen at time ``t / fps``, with
  ``features.decode``'s keyframe-aware seek: the decoder jumps to the keyframe before a target
  when that skips work, otherwise it decodes on) and runs the backbone once on all of them
  together, so one vector-env step is one batched backbone call across all its videos.
* ``begin_episodes(videos)`` drops those videos' caches, so within an episode every visited
  frame is decoded and extracted at most once, and nothing else is touched.
* ``frames_decoded`` / ``frames_extracted`` count the sampled frames decoded and passed through
  the backbone (``codec_frames`` counts every frame the codec produced, including those
  decoded on the way to a target); ``decode_seconds`` / ``extract_seconds`` time the two parts.

Lengths are known up front: opening a video runs a demux pass (packet headers, no decoding) that
gives its exact duration, and ``T = ceil(duration * fps)`` as in ``features.decode``. At its
first decode in this source a file is checked to be the one that was probed (same size and
modification time), so a length can never silently disagree with the frames served.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from features.backbones import Backbone, build_backbone
from features.decode import (
    CROP_SIZE,
    RESIZE_SHORT_SIDE,
    DecodeError,
    VideoReader,
    _rotation_of,
)
from features.device import resolve_device
from features.manifests import ManifestEntry, ManifestError, load_manifest
from features.source import FrameSource
from features.store import SPLITS
from features.validation import require_int

VideoRow = tuple[str | os.PathLike, int | str | None, str]


class _LiveReader(VideoReader):
    """A :class:`VideoReader` that decodes only chosen sample indices (not the whole video)."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        super().__init__(path, threads=threads)
        stat = self.path.stat()
        self.signature = (stat.st_size, stat.st_mtime_ns)
        self.verified = False
        self._layout_cache = None
        self.codec_frames = 0

    def frames_at(self, indices: np.ndarray, fps: float) -> np.ndarray:
        """uint8 ``[K, 224, 224, 3]`` frames on screen at times ``indices / fps``
        (``indices`` sorted ascending, unique), resized and center-cropped as in extraction."""
        if not self.verified:
            stat = self.path.stat() if self.path.exists() else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != self.signature:
                raise DecodeError(self.path, "file changed since its length was probed; "
                                  "rebuild the live source")
            self.verified = True
        times = np.asarray(indices, dtype=np.float64) / fps
        targets = [self.start_pts + int(np.floor(t / self.time_base + 1e-6)) for t in times]
        chosen = self._decode_targets(targets, "auto")
        if self._layout_cache is None:
            rotation = _rotation_of(chosen[0])
            self._layout_cache = (rotation, self._layout(CROP_SIZE, RESIZE_SHORT_SIDE, rotation,
                                                         False, None))
        rotation, layout = self._layout_cache
        return np.stack([self._to_rgb(f, CROP_SIZE, RESIZE_SHORT_SIDE, rotation, layout)
                         for f in chosen])

    def _frames(self, container, stream):  # count every frame the codec hands out
        for frame in super()._frames(container, stream):
            self.codec_frames += 1
            yield frame


def _rows_from(
    videos: str | os.PathLike | Sequence[ManifestEntry] | Sequence[VideoRow],
    class_names: Sequence[str] | None,
) -> tuple[list[ManifestEntry], list[str]]:
    """Normalize the accepted inputs to manifest entries plus class names."""
    if isinstance(videos, (str, os.PathLike)):
        return load_manifest(videos, class_names=class_names)
    rows = list(videos)
    if rows and all(isinstance(r, ManifestEntry) for r in rows):
        if class_names is None:
            top = max((r.label for r in rows), default=-1)
            class_names = [f"class{c}" for c in range(top + 1)]
        return rows, list(class_names)
    names = list(class_names) if class_names is not None else sorted(
        {str(r[1]) for r in rows if isinstance(r[1], str) and r[1] != ""})
    entries = []
    for i, row in enumerate(rows):
        if len(row) != 3:
            raise ManifestError("<rows>", f"row {i}: expected (path, label, split), got {row!r}")
        path, label, split = row
        if split not in SPLITS:
            raise ManifestError(path, f"row {i}: split must be one of {SPLITS}, got {split!r}")
        if label is None or label == "":
            index = -1
        elif isinstance(label, str):
            if label not in names:
                raise ManifestError(path, f"row {i}: label {label!r} is not a known class")
            index = names.index(label)
        else:
            index = int(label)
            if index < -1 or (names and index >= len(names)):
                raise ManifestError(path, f"row {i}: label {index} outside 0..{len(names) - 1}")
        entries.append(ManifestEntry(Path(path), index, split, Path(path).stem))
    if not names:
        top = max((e.label for e in entries), default=-1)
        names = [f"class{c}" for c in range(top + 1)]
    return entries, names


class LiveFrameSource(FrameSource):
    """Frame source that decodes and extracts only the frames locators visit (see module doc).

    Args:
        videos: a manifest file (any kind ``features.manifests`` reads, e.g. a generic CSV
            ``path,label,split``), a list of ``ManifestEntry``, or ``(path, label, split)`` rows
            (label: class index, class name, or None/-1 for unlabeled).
        split: serve this split only (``None``: all videos).
        class_names: class order (default: the manifest's).
        backbone: a backbone name (``features.backbones.BACKBONES``) or a built ``Backbone``.
        weights: weights file for a backbone built by name.
        fps: sampling rate; frame ``t`` is the frame on screen at ``t / fps`` seconds.
        device: where the backbone runs and ``gather`` returns (``"auto"``: CUDA if present).
        decoder_threads: FFmpeg threads per decoder.
        workers: videos decoded in parallel threads within one ``gather`` (1: sequentially).
        max_cached_videos: per-video caches kept (least recently used dropped first); keep it
            above the number of episodes running at once, or a running episode may re-extract.
        extract_batch: most frames per backbone call (a large gather is split to bound memory).
        progress: a progress bar while probing the files' lengths.
    """

    def __init__(
        self,
        videos: str | os.PathLike | Sequence[ManifestEntry] | Sequence[VideoRow],
        *,
        split: str | None = "train",
        class_names: Sequence[str] | None = None,
        backbone: str | Backbone = "efficientnet_lite0",
        weights: str | os.PathLike | None = None,
        fps: float = 1.0,
        device: str | torch.device = "auto",
        decoder_threads: int = 1,
        workers: int = 1,
        max_cached_videos: int = 4096,
        extract_batch: int = 64,
        progress: bool = False,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        max_cached_videos = require_int(max_cached_videos, "max_cached_videos", minimum=1)
        extract_batch = require_int(extract_batch, "extract_batch", minimum=1)
        workers = require_int(workers, "workers", minimum=0)
        decoder_threads = require_int(decoder_threads, "decoder_threads", minimum=0)
        entries, names = _rows_from(videos, class_names)
        origin = str(videos) if isinstance(videos, (str, os.PathLike)) else "<rows>"
        entries = [e for e in entries if split is None or e.split == split]
        if not entries:
            raise ManifestError(origin, f"no videos in split {split!r}")
        self.entries = entries
        self.split = split
        self.class_names = list(names)
        self.video_ids = [e.video_id for e in entries]
        self.labels = np.array([e.label for e in entries], dtype=np.int64)
        self.fps = float(fps)
        self.device = resolve_device(device)
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        else:
            self.backbone = build_backbone(backbone, weights, device=self.device)
        self.feature_dim = self.backbone.feature_dim
        self.gflops_per_frame = self.backbone.gmacs_per_frame
        self.flops_unit = "MACs"
        self.readers: list[_LiveReader] = []
        bar = tqdm(entries, desc="probing videos", unit="video", disable=not progress)
        for entry in bar:  # demux pass per file: exact durations, no decoding
            self.readers.append(_LiveReader(entry.path, threads=decoder_threads))
        self.lengths = np.array([len(r.sample_times(self.fps)) for r in self.readers],
                                dtype=np.int64)
        self.workers = workers
        self.extract_batch = extract_batch
        self.max_cached_videos = max_cached_videos
        self._cache: OrderedDict[int, dict[int, torch.Tensor]] = OrderedDict()
        self.reset_counters()

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        """Zero ``frames_decoded``, ``frames_extracted``, ``codec_frames`` and the timers."""
        self.frames_decoded = 0
        self.frames_extracted = 0
        self.decode_seconds = 0.0
        self.extract_seconds = 0.0
        self.gather_calls = 0
        for reader in self.readers:
            reader.codec_frames = 0

    @property
    def codec_frames(self) -> int:
        """Frames the codec decoded in all (sampled frames plus those decoded on the way)."""
        return sum(r.codec_frames for r in self.readers)

    # ------------------------------------------------------------------ FrameSource
    def begin_episodes(self, videos: torch.Tensor) -> None:
        for v in np.unique(torch.as_tensor(videos).cpu().numpy()).tolist():
            self._cache.pop(int(v), None)

    def gather(self, videos: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(videos).cpu().numpy().astype(np.int64).reshape(-1)
        f = torch.as_tensor(frames).cpu().numpy().astype(np.int64).reshape(-1)
        if v.shape != f.shape:
            raise ValueError(f"gather: videos {v.shape} and frames {f.shape} differ in shape")
        self.gather_calls += 1
        if len(v) == 0:
            return torch.zeros(0, self.feature_dim, device=self.device)
        V = len(self.lengths)
        if v.min() < 0 or v.max() >= V:
            raise IndexError(f"gather: video indices must lie in [0, {V}), "
                             f"got {v.min()}..{v.max()}")
        bad = (f < 0) | (f >= self.lengths[v])
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise IndexError(f"gather: frame {f[k]} outside 0..{self.lengths[v[k]] - 1} of video "
                             f"{self.video_ids[v[k]]!r} ({self.entries[v[k]].path})")
        # missing (video, frame) pairs, grouped per video, each frame once
        todo: list[tuple[int, np.ndarray]] = []
        for video in np.unique(v).tolist():
            cache = self._cache.get(video)
            wanted = np.unique(f[v == video])
            if cache is not None:
                self._cache.move_to_end(video)
                wanted = np.array([t for t in wanted.tolist() if t not in cache], dtype=np.int64)
            if len(wanted):
                todo.append((video, wanted))
        if todo:
            self._compute(todo)
        rows = [self._cache[video][frame] for video, frame in zip(v.tolist(), f.tolist(),
                                                                    strict=True)]
        out = torch.stack(rows)
        while len(self._cache) > self.max_cached_videos:  # least recently used first
            self._cache.popitem(last=False)
        return out

    # ------------------------------------------------------------------ work
    def _decode(self, item: tuple[int, np.ndarray]) -> np.ndarray:
        video, wanted = item
        return self.readers[video].frames_at(wanted, self.fps)

    def _compute(self, todo: list[tuple[int, np.ndarray]]) -> None:
        start = time.perf_counter()
        if self.workers > 1 and len(todo) > 1:
            with ThreadPoolExecutor(min(self.workers, len(todo))) as pool:
                decoded = list(pool.map(self._decode, todo))
        else:
            decoded = [self._decode(item) for item in todo]
        pixels = np.concatenate(decoded)
        self.frames_decoded += len(pixels)
        self.decode_seconds += time.perf_counter() - start
        start = time.perf_counter()
        step = self.extract_batch  # batched across all videos of the call, in bounded chunks
        feats = torch.cat([self.backbone.extract(pixels[i:i + step])
                           for i in range(0, len(pixels), step)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.frames_extracted += len(pixels)
        self.extract_seconds += time.perf_counter() - start
        feats = feats.to(self.device, torch.float32)
        if not torch.isfinite(feats).all():
            raise ValueError(f"backbone {self.backbone.name} produced non-finite features")
        row = 0
        for video, wanted in todo:
            cache = self._cache.setdefault(video, {})
            self._cache.move_to_end(video)
            for t in wanted.tolist():
                cache[t] = feats[row]
                row += 1

    def cached_frames(self, video: int) -> list[int]:
        """Frame indices of ``video`` currently cached (sorted)."""
        return sorted(self._cache.get(int(video), {}))
