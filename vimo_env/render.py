"""Drawing one episode's locators on the video timeline, as text or as an RGB image.

Both take the same numbers: the video length ``T``, each locator's current position, the
frames it has observed (its trajectory) and whether it is still moving.

When the frames themselves can be had - the live source (``features.live.LiveFrameSource``)
or a cached feature file whose video files sit beside it with a manifest that names each
file's ``video_id`` (PhotoUnits writes ``mp4/manifest.csv``) - the ``rgb_array`` image also
shows a film strip per locator: thumbnails of the frames it observed, in order, decoded with
PyAV (:class:`FramePixels`), then grey slots for the moves it did not make.
"""

from __future__ import annotations

import csv
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Render modes of the single-episode envs; the vector env offers all but "human".
RENDER_MODES = ("ansi", "rgb_array", "human")


def check_render_mode(render_mode: str | None, modes: Sequence[str] = RENDER_MODES) -> None:
    """Reject a render mode the env does not offer (None = no rendering)."""
    if render_mode is not None and render_mode not in modes:
        raise ValueError(f"render_mode must be one of {tuple(modes)} or None, "
                         f"got {render_mode!r}")


_BACKGROUND = (235, 235, 235)
_TRACK = (200, 200, 200)
_VISITED = (60, 110, 220)
_MOVING = (220, 50, 40)
_STOPPED = (20, 20, 20)
_EMPTY_SLOT = (185, 185, 185)

#: Side (pixels) of a film-strip thumbnail in the ``rgb_array`` image.
THUMBNAIL_SIZE = 48


def render_ansi(
    length: int,
    positions: Sequence[int],
    trajectories: Sequence[Sequence[int]],
    alive: Sequence[bool],
    *,
    step: int = 0,
    max_moves: int = 0,
    title: str = "",
    width: int = 60,
) -> str:
    """One line per locator: ``.`` unseen, ``*`` observed, ``>`` current (moving), ``|`` stopped.

    Long videos are compressed to ``width`` cells (a cell shows its most important mark).
    """
    cells = max(1, min(int(length), int(width)))

    def cell(frame: int) -> int:
        return min(cells - 1, int(frame) * cells // max(1, int(length)))

    lines = [f"{title} T={length} step {step}/{max_moves} "
             f"frames={sum(len(t) for t in trajectories)}".strip()]
    for i, (pos, traj, moving) in enumerate(zip(positions, trajectories, alive, strict=True)):
        row = ["."] * cells
        for frame in traj:
            row[cell(frame)] = "*"
        row[cell(pos)] = ">" if moving else "|"
        state = "moving" if moving else "stopped"
        lines.append(f"locator_{i} [{''.join(row)}] p={int(pos)} n={len(traj)} {state}")
    return "\n".join(lines)


def render_rgb(
    length: int,
    positions: Sequence[int],
    trajectories: Sequence[Sequence[int]],
    alive: Sequence[bool],
    *,
    width: int = 320,
    lane_height: int = 16,
    thumbnails: Sequence[Sequence[np.ndarray]] | None = None,
    slots: int = 0,
) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 image: one lane per locator; blue ticks are observed frames,
    the red (moving) or black (stopped) block is the current position.

    ``thumbnails[i]`` (optional): uint8 ``[s, s, 3]`` images of locator ``i``'s observed
    frames, in order; below the lanes each locator then gets a film strip of ``slots`` cells
    (``max_moves + 1``: the size stays fixed over an episode, as video recorders need), its
    thumbnails first, the latest framed red (moving) or black (stopped), grey cells after.
    """
    if thumbnails is not None:
        lanes = render_rgb(length, positions, trajectories, alive, width=width,
                           lane_height=lane_height)
        strip = _film_strips(thumbnails, alive, max(slots, *(len(t) for t in thumbnails)))
        out_w = max(lanes.shape[1], strip.shape[1])
        image = np.empty((lanes.shape[0] + strip.shape[0], out_w, 3), dtype=np.uint8)
        image[:] = _BACKGROUND
        image[: lanes.shape[0], : lanes.shape[1]] = lanes
        image[lanes.shape[0]:, : strip.shape[1]] = strip
        return image
    n = len(positions)
    margin = 4
    image = np.empty((margin * 2 + lane_height * n, width, 3), dtype=np.uint8)
    image[:] = _BACKGROUND
    usable = width - 2 * margin

    def x_of(frame: int) -> int:
        return margin + min(usable - 1, int(frame) * usable // max(1, int(length)))

    tick = max(1, usable // max(1, int(length)))
    for i, (pos, traj, moving) in enumerate(zip(positions, trajectories, alive, strict=True)):
        top = margin + i * lane_height
        mid = top + lane_height // 2
        image[mid - 1 : mid + 1, margin : margin + usable] = _TRACK
        for frame in traj:
            x = x_of(frame)
            image[top + 3 : top + lane_height - 3, x : x + tick] = _VISITED
        x = x_of(pos)
        image[top + 1 : top + lane_height - 1, max(margin, x - 1) : x + tick + 1] = (
            _MOVING if moving else _STOPPED
        )
    return image


def _film_strips(thumbnails: Sequence[Sequence[np.ndarray]], alive: Sequence[bool],
                 slots: int) -> np.ndarray:
    """One row of ``slots`` cells per locator: its thumbnails, then grey (not observed)."""
    size = next((int(t.shape[0]) for lane in thumbnails for t in lane), THUMBNAIL_SIZE)
    pad, margin = 3, 4
    cell = size + 2 * pad
    image = np.empty((margin * 2 + cell * len(thumbnails), margin * 2 + cell * max(1, slots), 3),
                     dtype=np.uint8)
    image[:] = _BACKGROUND
    for i, (lane, moving) in enumerate(zip(thumbnails, alive, strict=True)):
        top = margin + i * cell
        for j in range(slots):
            left = margin + j * cell
            if j < len(lane):
                if j == len(lane) - 1:  # the current frame: framed by the locator's state
                    image[top : top + cell, left : left + cell] = _MOVING if moving else _STOPPED
                image[top + pad : top + pad + size, left + pad : left + pad + size] = lane[j]
            else:
                image[top + pad : top + pad + size, left + pad : left + pad + size] = _EMPTY_SLOT
    return image


def decode_thumbnails(path: str | os.PathLike, frames: Sequence[int], fps: float = 1.0,
                      size: int = THUMBNAIL_SIZE) -> dict[int, np.ndarray]:
    """Frame ``t`` (the picture on screen at ``t / fps`` seconds, decoded with PyAV and
    center-cropped as in feature extraction) of a video file, for every ``t`` in ``frames``,
    shrunk to uint8 ``[size, size, 3]``; returns ``{t: image}``. Only the asked frames are
    decoded (keyframe-aware seeking)."""
    from PIL import Image

    from features.live import _LiveReader  # the reader that decodes chosen samples only

    wanted = sorted({int(t) for t in frames})
    if not wanted:
        return {}
    pixels = _LiveReader(path).frames_at(np.asarray(wanted, dtype=np.int64), fps)
    return {t: np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR))
            for t, p in zip(wanted, pixels, strict=True)}


class FramePixels:
    """Thumbnails of a frame source's frames, when its video files can be found.

    ``paths[v]`` is video ``v``'s file (or None), ``fps`` the feature sampling rate (frame
    ``t`` is the picture at ``t / fps`` s). Decoded thumbnails are cached per video (the
    videos of the last few episodes). Use :meth:`for_source`.
    """

    def __init__(self, paths: Sequence[Path | None], fps: float, size: int = THUMBNAIL_SIZE,
                 max_videos: int = 8) -> None:
        self.paths = list(paths)
        self.fps = float(fps)
        self.size = int(size)
        self.max_videos = int(max_videos)
        self._cache: dict[int, dict[int, np.ndarray]] = {}

    @classmethod
    def for_source(cls, source: object, size: int = THUMBNAIL_SIZE) -> FramePixels | None:
        """The pixels behind ``source``: a ``LiveFrameSource``'s files, or the video files of
        a cached feature file found through a manifest beside it (:func:`video_files`);
        None when no video of the source has a file."""
        from features.live import LiveFrameSource

        if isinstance(source, LiveFrameSource):
            return cls([e.path for e in source.entries], source.fps, size)
        store = getattr(source, "store", None)
        if store is None or getattr(store, "path", None) is None:
            return None
        files = video_files(store.path)
        paths = [files.get(v) for v in source.video_ids]
        if not any(p is not None for p in paths):
            return None
        return cls(paths, float(getattr(store, "fps", 1.0)), size)

    def available(self, video: int) -> bool:
        return self.paths[int(video)] is not None

    def thumbnails(self, video: int, frames: Sequence[int]) -> list[np.ndarray]:
        """uint8 ``[size, size, 3]`` thumbnails of ``frames`` of ``video`` (decoded once)."""
        video = int(video)
        path = self.paths[video]
        if path is None:
            raise ValueError(f"video {video} has no video file")
        cache = self._cache.setdefault(video, {})
        missing = [int(t) for t in frames if int(t) not in cache]
        if missing:
            cache.update(decode_thumbnails(path, missing, self.fps, self.size))
        while len(self._cache) > self.max_videos:
            self._cache.pop(next(iter(self._cache)))
        return [cache[int(t)] for t in frames]


def video_files(features_path: str | os.PathLike) -> dict[str, Path]:
    """``video_id -> file`` from a manifest beside a feature file: ``mp4/manifest.csv`` (the
    PhotoUnits layout) or ``manifest.csv`` in its folder, a CSV with columns ``path`` (relative
    to the CSV) and ``video_id`` (default: the file's stem). Files that do not exist are left
    out; ``{}`` when there is no such manifest."""
    folder = Path(features_path).parent
    for manifest in (folder / "mp4" / "manifest.csv", folder / "manifest.csv"):
        if not manifest.is_file():
            continue
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        found = {}
        for row in rows:
            if not row.get("path"):
                continue
            path = manifest.parent / row["path"]
            if path.is_file():
                found[row.get("video_id") or path.stem] = path
        return found
    return {}


# FramePixels per frame source (None: it has no video files), so render() looks once
_PIXELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def frame_pixels(source: object) -> FramePixels | None:
    """:meth:`FramePixels.for_source`, remembered per source object."""
    try:
        return _PIXELS[source]
    except KeyError:
        pixels = FramePixels.for_source(source)
    except TypeError:  # not weak-referenceable: look it up every time
        return FramePixels.for_source(source)
    _PIXELS[source] = pixels
    return pixels


def render_row(core: object, row: int, mode: str, title: str = "") -> str | np.ndarray:
    """Render batch row ``row`` of a :class:`vimo_env.core.LocatorCore` as ``"ansi"`` text
    or an ``"rgb_array"`` image (with film strips of thumbnails when the source's video files
    can be found, see :class:`FramePixels`)."""
    if getattr(core, "batch_size", None) is None or not bool(core.active[row]):
        raise RuntimeError("render() before reset()")
    length = int(core.lengths[row])
    positions = core.positions[row].tolist()
    traj = [[p for p in lane if p >= 0] for lane in core.trajectories[row].tolist()]
    alive = core.alive[row].tolist()
    if mode == "rgb_array":
        pixels = frame_pixels(core.source)
        video = int(core.videos[row])
        thumbs = None
        if pixels is not None and pixels.available(video):
            thumbs = [pixels.thumbnails(video, lane) for lane in traj]
        return render_rgb(length, positions, traj, alive, thumbnails=thumbs,
                          slots=core.max_moves + 1)
    if mode == "ansi":
        return render_ansi(length, positions, traj, alive, step=int(core.steps[row]),
                           max_moves=core.max_moves, title=title)
    raise ValueError(f"unknown render mode {mode!r}")
