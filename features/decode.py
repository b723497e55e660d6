"""Video decoding with PyAV: frames sampled at a fixed rate, resized and cropped for a backbone.

``sample_frames(path)`` returns the frames on screen at times ``0, 1/fps, 2/fps, ...`` (ViMo
App. D samples 1 fps), each resized so its short side is 256 and center-cropped to 224x224
(random crop + horizontal flip with ``train_aug=True``), as uint8 ``[T, 224, 224, 3]`` RGB.

Sampling semantics: the frame for time ``t`` is the last frame whose presentation time is
``<= t`` (the frame a player shows at ``t``); sample times run while ``t`` is before the end of
the last frame, so a video shorter than ``1/fps`` still gives one frame. Variable frame rates
are handled by this rule (a frame that stays on screen across a pts gap is repeated), and
rotation metadata (display matrix) is applied so frames come out upright.

Keyframe-aware seeking: a cheap demux pass (no decoding) lists the keyframes' presentation
times. While sampling, the reader seeks only when the next target lies past a keyframe that
is later than the decoder's position; otherwise it decodes on. Both paths yield bit-identical
frames (tested); ``seek="never"`` / ``"always"`` force one path for tests and benchmarks.

Every failure (missing file, no video stream, corrupt or truncated data, no decodable frame)
raises ``DecodeError(path, problem)`` so a batch job can record it and move on.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

RESIZE_SHORT_SIDE = 256
CROP_SIZE = 224
SEEK_MODES = ("auto", "never", "always")


class DecodeError(RuntimeError):
    """A video file cannot be decoded; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class SampledVideo:
    """Frames sampled from one video.

    Attributes:
        frames: uint8 ``[T, S, S, 3]`` RGB, upright, resized and cropped.
        timestamps: float64 ``[T]`` sample times ``k / fps`` in seconds from the first frame.
        frame_times: float64 ``[T]`` presentation time of the decoded frame used for each
            sample (``<= timestamps``; equal when a frame starts exactly at the sample time).
        rotation: counter-clockwise rotation (degrees) applied from the display matrix.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    frame_times: np.ndarray
    rotation: int = 0


@dataclass
class _Layout:
    """Where the resized frame is cropped (per video, so a clip stays spatially consistent)."""

    top: int
    left: int
    flip: bool


class VideoReader:
    """One video file opened for sampling.

    Opening runs a demux pass (packet headers only) to find the video stream's keyframes and
    end time; it raises ``DecodeError`` for a missing/empty/unreadable file or one without a
    video stream.

    Args:
        path: the video file.
        threads: decoder threads (``0`` lets FFmpeg choose; ``1`` when many workers run).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = int(threads)
        if not self.path.exists():
            raise DecodeError(self.path, "no such file")
        if self.path.stat().st_size == 0:
            raise DecodeError(self.path, "empty file (0 bytes)")
        container = self._open()
        try:
            stream = container.streams.video[0]
            self.time_base: Fraction = stream.time_base
            self.width = int(stream.codec_context.width)
            self.height = int(stream.codec_context.height)
            sar = stream.sample_aspect_ratio
            self.sample_aspect_ratio = float(sar) if sar else 1.0
            self._keyframes, self.start_pts, self.end_pts = self._scan(container, stream)
        finally:
            container.close()

    # -- opening and indexing ---------------------------------------------------------------

    def _open(self) -> av.container.InputContainer:
        try:
            container = av.open(str(self.path), mode="r")
        except av.FFmpegError as exc:
            raise DecodeError(self.path, f"cannot open as a video container ({exc})") from exc
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            container.close()
            raise DecodeError(self.path, f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if self.threads != 1 else "SLICE"
        stream.codec_context.thread_count = self.threads
        return container

    def _scan(
        self, container: av.container.InputContainer, stream: av.video.stream.VideoStream
    ) -> tuple[list[int], int, int]:
        """Keyframe pts (sorted), first pts and end pts (last pts + duration) of the stream."""
        keyframes: list[int] = []
        start, end, count = None, None, 0
        try:
            for packet in container.demux(stream):
                if packet.pts is None:  # flush packet or a packet without timestamp
                    continue
                count += 1
                pts = int(packet.pts)
                start = pts if start is None else min(start, pts)
                stop = pts + max(int(packet.duration or 0), 1)
                end = stop if end is None else max(end, stop)
                if packet.is_keyframe:
                    keyframes.append(pts)
        except av.FFmpegError as exc:
            raise DecodeError(
                self.path, f"corrupt container data after {count} packets ({exc})"
            ) from exc
        if count == 0 or start is None or end is None:
            raise DecodeError(self.path, "video stream has no packets")
        keyframes.sort()
        return keyframes, start, end

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last one."""
        return float((self.end_pts - self.start_pts) * self.time_base)

    @property
    def keyframe_times(self) -> np.ndarray:
        """Presentation times (s, from the first frame) of the keyframes."""
        return np.array([float((k - self.start_pts) * self.time_base) for k in self._keyframes])

    def sample_times(self, fps: float = 1.0) -> np.ndarray:
        """Sample times ``k / fps`` that fall before the end of the video (at least one)."""
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        count = max(1, int(np.ceil(self.duration * fps - 1e-9)))
        return np.arange(count, dtype=np.float64) / fps

    # -- sampling ---------------------------------------------------------------------------

    def sample(
        self,
        fps: float = 1.0,
        size: int = CROP_SIZE,
        *,
        resize: int = RESIZE_SHORT_SIDE,
        train_aug: bool = False,
        rng: np.random.Generator | None = None,
        seek: str = "auto",
    ) -> SampledVideo:
        """Decode the frames on screen at ``k / fps`` and return them resized and cropped.

        Args:
            fps: sampling rate (frames per second of video time).
            size: side of the square crop.
            resize: the short side is resized to this before cropping (``>= size``).
            train_aug: random crop position and horizontal flip (one draw per video).
            rng: random generator for ``train_aug`` (a fresh unseeded one if None).
            seek: ``"auto"`` (seek only past a later keyframe), ``"never"``, ``"always"``.
        """
        if seek not in SEEK_MODES:
            raise ValueError(f"seek must be one of {SEEK_MODES}, got {seek!r}")
        if resize < size:
            raise ValueError(f"resize ({resize}) must be >= crop size ({size})")
        times = self.sample_times(fps)
        targets = [self.start_pts + int(np.floor(t / self.time_base + 1e-6)) for t in times]
        chosen = self._decode_targets(targets, seek)
        rotation = _rotation_of(chosen[0])
        layout = self._layout(size, resize, rotation, train_aug, rng)
        frames = np.stack([self._to_rgb(f, size, resize, rotation, layout) for f in chosen])
        frame_times = np.array([float((f.pts - self.start_pts) * self.time_base) for f in chosen])
        return SampledVideo(frames, times, frame_times, rotation)

    def _decode_targets(self, targets: list[int], seek: str) -> list[av.VideoFrame]:
        """For each target pts, the last decoded frame with pts <= target."""
        container = self._open()
        stream = container.streams.video[0]
        chosen: list[av.VideoFrame] = []
        try:
            frames = self._frames(container, stream)
            previous: av.VideoFrame | None = None
            upcoming: av.VideoFrame | None = None  # decoded but past the last target
            position = self.start_pts  # pts the decoder will produce next (at least)
            for target in targets:
                keyframe = self._keyframe_before(target)
                seek_to = keyframe if self._should_seek(
                    seek, keyframe, position, target, upcoming
                ) else None
                while True:
                    if seek_to is not None:
                        container.seek(seek_to, stream=stream, backward=True, any_frame=False)
                        frames = self._frames(container, stream)
                        previous, upcoming = None, None
                    while True:
                        frame = upcoming if upcoming is not None else next(frames, None)
                        upcoming = None
                        if frame is None:  # end of stream: the last frame stays on screen
                            break
                        position = int(frame.pts) + 1
                        if frame.pts > target:
                            upcoming = frame
                            break
                        previous = frame
                    if previous is not None or seek_to is None or seek_to <= self.start_pts:
                        break
                    # the seek landed past the target (odd index): retry from an earlier keyframe
                    earlier = self._keyframe_before(seek_to - 1)
                    seek_to = earlier if earlier is not None else self.start_pts
                if previous is None:
                    raise DecodeError(
                        self.path,
                        f"no decodable frame at or before t={self._seconds(target):.3f}s",
                    )
                chosen.append(previous)
        except av.FFmpegError as exc:
            raise DecodeError(self.path, f"corrupt video data ({exc})") from exc
        finally:
            container.close()
        return chosen

    def _frames(
        self, container: av.container.InputContainer, stream: av.video.stream.VideoStream
    ):
        """Decoded frames in presentation order, skipping ones without a timestamp."""
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            yield frame

    def _keyframe_before(self, target: int) -> int | None:
        i = bisect.bisect_right(self._keyframes, target) - 1
        return self._keyframes[i] if i >= 0 else None

    @staticmethod
    def _should_seek(
        seek: str, keyframe: int | None, position: int, target: int, upcoming: object
    ) -> bool:
        if seek == "never" or keyframe is None:
            return False
        if upcoming is not None and upcoming.pts > target:  # type: ignore[attr-defined]
            return False  # the answer is the frame we hold: no decoding needed at all
        if seek == "always":
            return True
        return keyframe > position  # a later keyframe lies before the target: jump to it

    def _seconds(self, pts: int) -> float:
        return float((pts - self.start_pts) * self.time_base)

    def _layout(
        self,
        size: int,
        resize: int,
        rotation: int,
        train_aug: bool,
        rng: np.random.Generator | None,
    ) -> _Layout:
        height, width = self._display_size(resize, rotation)
        if not train_aug:
            return _Layout(top=(height - size) // 2, left=(width - size) // 2, flip=False)
        rng = rng if rng is not None else np.random.default_rng()
        return _Layout(
            top=int(rng.integers(0, height - size + 1)),
            left=int(rng.integers(0, width - size + 1)),
            flip=bool(rng.random() < 0.5),
        )

    def _display_size(self, resize: int, rotation: int) -> tuple[int, int]:
        """(height, width) of the upright frame after resizing its short side to ``resize``."""
        width, height = self.width * self.sample_aspect_ratio, float(self.height)
        if rotation % 180:
            width, height = height, width
        scale = resize / min(width, height)
        return max(resize, round(height * scale)), max(resize, round(width * scale))

    def _to_rgb(
        self, frame: av.VideoFrame, size: int, resize: int, rotation: int, layout: _Layout
    ) -> np.ndarray:
        height, width = self._display_size(resize, rotation)
        stored_w, stored_h = (height, width) if rotation % 180 else (width, height)
        rgb = frame.reformat(
            width=stored_w, height=stored_h, format="rgb24", interpolation="AREA"
        ).to_ndarray()
        if rotation:
            rgb = np.rot90(rgb, k=rotation // 90)
        crop = rgb[layout.top : layout.top + size, layout.left : layout.left + size]
        if layout.flip:
            crop = crop[:, ::-1]
        return np.ascontiguousarray(crop)


def _rotation_of(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation of a frame, snapped to a multiple of 90 degrees."""
    try:
        degrees = frame.rotation or 0
    except (AttributeError, ValueError):
        degrees = 0
    return int(round(degrees / 90.0)) * 90 % 360


def prepare_image(
    image: np.ndarray, size: int = CROP_SIZE, resize: int = RESIZE_SHORT_SIDE
) -> np.ndarray:
    """A still RGB (or grayscale) uint8 image through the same resize + center crop as frames."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] or [H, W], got {image.shape}")
    height, width = image.shape[:2]
    scale = resize / min(height, width)
    new_h, new_w = max(resize, round(height * scale)), max(resize, round(width * scale))
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    rgb = frame.reformat(width=new_w, height=new_h, interpolation="AREA").to_ndarray()
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


def sample_frames(
    path: str | os.PathLike,
    fps: float = 1.0,
    size: int = CROP_SIZE,
    train_aug: bool = False,
    rng: np.random.Generator | None = None,
    *,
    seek: str = "auto",
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames of ``path`` sampled at ``fps``: (uint8 ``[T, size, size, 3]``, times ``[T]`` s).

    See the module docstring for the sampling rule; raises ``DecodeError`` on any failure.
    """
    sampled = VideoReader(path, threads=threads).sample(
        fps, size, train_aug=train_aug, rng=rng, seek=seek
    )
    return sampled.frames, sampled.timestamps
