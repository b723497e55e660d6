"""Writing small videos with PyAV: test fixtures and generated datasets.

``write_video(path, frames)`` encodes uint8 RGB frames ``[T, H, W, 3]`` (H and W even) to an
H.264 MP4, with optional per-frame presentation times (variable frame rate), a keyframe
interval and rotation metadata (a display matrix, as phones write it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float = 25.0,
    *,
    times: Sequence[float] | None = None,
    keyframe_interval: int = 250,
    rotation: int = 0,
    codec: str = "libx264",
    crf: int = 18,
    audio_seconds: float = 0.0,
) -> Path:
    """Encode RGB frames to ``path``; returns the path.

    Args:
        frames: uint8 ``[T, H, W, 3]`` (or a sequence of ``[H, W, 3]``), H and W even.
        fps: nominal frame rate (used for timestamps when ``times`` is None).
        times: presentation time (s) of each frame, strictly increasing: gaps make a
            variable-frame-rate stream.
        keyframe_interval: GOP size in frames (``g`` of libx264).
        rotation: counter-clockwise display rotation written as a display matrix.
        crf: libx264 quality (lower is better).
        audio_seconds: also write a silent AAC track of this length (0: none).
    """
    path = Path(path)
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    height, width = frames[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: frame size {width}x{height} must be even for yuv420p")
    time_base = Fraction(1, 12800)
    if times is None:
        times = [i / fps for i in range(len(frames))]
    if len(times) != len(frames) or np.any(np.diff(times) <= 0):
        raise ValueError(f"{path}: times must be strictly increasing, one per frame")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.options = {"crf": str(crf), "g": str(keyframe_interval),
                          "keyint_min": str(keyframe_interval), "sc_threshold": "0"}
        if rotation:
            stream.set_display_rotation(rotation)
        audio = None
        if audio_seconds > 0:
            audio = container.add_stream("aac", rate=16000)
        for image, t in zip(frames, times, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = int(round(t / time_base))
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio is not None:
            _write_silence(container, audio, audio_seconds)
    return path


def write_audio_only(path: str | os.PathLike, seconds: float = 1.0) -> Path:
    """An M4A/MP4 file with a silent AAC track and no video stream."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        _write_silence(container, container.add_stream("aac", rate=16000), seconds)
    return path


def _write_silence(container: av.container.OutputContainer, stream, seconds: float) -> None:
    samples = int(seconds * stream.rate)
    chunk = 1024
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = stream.rate
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
