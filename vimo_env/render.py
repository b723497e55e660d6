"""Drawing one episode's locators on the video timeline, as text or as an RGB image.

Both take the same numbers: the video length ``T``, each locator's current position, the
frames it has observed (its trajectory) and whether it is still moving.
"""

from __future__ import annotations

from collections.abc import Sequence

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
) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 image: one lane per locator; blue ticks are observed frames,
    the red (moving) or black (stopped) block is the current position."""
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


def render_row(core: object, row: int, mode: str, title: str = "") -> str | np.ndarray:
    """Render batch row ``row`` of a :class:`vimo_env.core.LocatorCore` as ``"ansi"`` text
    or an ``"rgb_array"`` image."""
    if getattr(core, "batch_size", None) is None or not bool(core.active[row]):
        raise RuntimeError("render() before reset()")
    length = int(core.lengths[row])
    positions = core.positions[row].tolist()
    traj = [[p for p in lane if p >= 0] for lane in core.trajectories[row].tolist()]
    alive = core.alive[row].tolist()
    if mode == "rgb_array":
        return render_rgb(length, positions, traj, alive)
    if mode == "ansi":
        return render_ansi(length, positions, traj, alive, step=int(core.steps[row]),
                           max_moves=core.max_moves, title=title)
    raise ValueError(f"unknown render mode {mode!r}")
