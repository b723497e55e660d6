"""Every figure of a run, drawn from its results files only (no training, no model).

    python -m benchmarks.plots RUN_DIR [--out DIR] [--max-bytes N]

redraws, from ``RUN_DIR/results.json`` and ``RUN_DIR/trajectories.json``:

* ``map_vs_gflops.png``: mAP against GFLOPs per video of every strategy and of the training
  stages (ViMo Figure 3's axes); a legend names every point (no labels printed over each
  other) and, when some points sit far below the rest (e.g. ``initial`` at ~25 mAP), a second
  panel zooms on the region within :data:`ZOOM_SPAN` mAP of the best point;
* ``sweep_<name>.png`` when the run has a sweep (``--sweep max_moves|lambda|locators``): the
  adaptive policy's mAP-GFLOPs curve over the swept values with the run's baselines
  (``--sweep max_moves --sweep-values 3,4,5,6`` is ViMo Figure 3);
* ``trajectories.png`` (ViMo Figure 4): for a few test videos of different classes, one panel
  per strategy showing the video's timeline, each locator's observed frames in order and its
  stop, the ground-truth semantic units where the dataset knows them, a colour strip of the
  features (their first three principal components as RGB, so colour changes where content
  changes) and, where the video file exists, thumbnails of the observed frames (PyAV).

Each ``plot_*`` function takes the parsed results (or the file) and returns a small summary
(``panels`` drawn, file size) that tests check instead of pixels. PNGs are written atomically
with the Agg canvas (no pyplot state), palette-compressed and kept under ``max_bytes``.

TensorBoard: :func:`trajectory_logger` builds the SAC epoch callback that logs the trajectory
figure of a few fixed val videos; :func:`log_hparams` logs a run's hyper-parameters with its
final test metrics.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.atomic import atomic_path  # noqa: E402

#: Points within this many mAP of the best one get the zoomed panel.
ZOOM_SPAN = 10.0
#: Default size limit of a figure file (bytes).
MAX_BYTES = 300_000
#: Most thumbnails shown per locator and panel (the rest is counted as "+n").
MAX_THUMBNAILS = 8

SWEEP_SYMBOL = {"max_moves": "m", "lambda": "λ", "locators": "N"}

# name -> (marker, colour, size); unknown names get the fallback cycle
_STYLE: dict[str, tuple[str, str, float]] = {
    "adaptive": ("*", "#d62728", 220),
    "all": ("o", "#222222", 60),
    "uniform-50": ("s", "#1f77b4", 55),
    "uniform-25": ("s", "#9ecae1", 55),
    "random-50": ("^", "#ff7f0e", 60),
    "random-25": ("^", "#fdae6b", 60),
    "initial": ("v", "#7f7f7f", 60),
    "open-loop": ("P", "#2ca02c", 70),
    "open-loop@adaptive": ("P", "#98df8a", 70),
    "probe": ("h", "#9467bd", 60),
    "liteeval": ("d", "#8c564b", 60),
    "nsnet": ("p", "#e377c2", 65),
    "adafocus": ("X", "#17becf", 65),
    "afnet": ("8", "#bcbd22", 60),
}
_FALLBACK = [("D", "#393b79", 55), ("<", "#637939", 60), (">", "#8c6d31", 60),
             ("H", "#843c39", 60), ("d", "#7b4173", 60)]
_STAGE_MARKERS = {"I": "o", "II": "s", "III": "D"}


# ------------------------------------------------------------------------------ saving


def _canvas(fig: Any) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Any, path: str | os.PathLike, *, dpi: float = 110,
             max_bytes: int = MAX_BYTES) -> int:
    """Write ``fig`` to ``path`` atomically as a palette PNG (256 colours: line art and small
    thumbnails survive it, the file shrinks several-fold); lowers the resolution until the file
    is at most ``max_bytes``. Returns the size in bytes."""
    from PIL import Image

    data = b""
    for scale in (1.0, 0.85, 0.7, 0.6, 0.5, 0.4):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi * scale, facecolor="white")
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        out = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                       dither=Image.Dither.NONE).save(out, format="PNG", optimize=True)
        data = out.getvalue()
        if len(data) <= max_bytes:
            break
    with atomic_path(path, suffix=".partial.png") as tmp:
        Path(tmp).write_bytes(data)
    return len(data)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


# ------------------------------------------------------------------------------ trade-off


def _style(name: str, used: dict[str, tuple[str, str, float]]) -> tuple[str, str, float]:
    if name in _STYLE:
        return _STYLE[name]
    if name not in used:
        used[name] = _FALLBACK[len(used) % len(_FALLBACK)]
    return used[name]


def _zoom_range(values: Sequence[float]) -> tuple[float, float] | None:
    """The mAP range of the zoomed panel, or None when every point is near the best."""
    ys = [v for v in values if math.isfinite(v)]
    if len(ys) < 2:
        return None
    best = max(ys)
    top = [y for y in ys if y >= best - ZOOM_SPAN]
    if len(top) == len(ys) or len(top) < 2:
        return None
    pad = max(0.5, 0.12 * (best - min(top)))
    return min(top) - pad, best + pad


def _draw_tradeoff(ax: Any, policies: Sequence[dict], stages: Sequence[dict],
                   sweep: Sequence[dict], sweep_name: str | None, used: dict,
                   peer_sweeps: dict[str, dict] | None = None) -> None:
    from matplotlib import colormaps

    for name, entry in (peer_sweeps or {}).items():  # each peer's budget-knob curve
        points = sorted(entry["points"], key=lambda q: q["gflops_per_video"])
        marker, color, _ = _style(name, used)
        ax.plot([q["gflops_per_video"] for q in points], [q["mAP"] for q in points], "-",
                color=color, lw=1.1, alpha=0.6, zorder=3)
        ax.scatter([q["gflops_per_video"] for q in points], [q["mAP"] for q in points],
                   marker=marker, s=28, color=color, alpha=0.6, zorder=3)

    if stages:
        xs = [s["gflops_per_video"] for s in stages]
        ys = [s["mAP"] for s in stages]
        ax.plot(xs, ys, "--", color="0.55", lw=1.2, zorder=2)
        for s in stages:
            ax.scatter(s["gflops_per_video"], s["mAP"], marker=_STAGE_MARKERS.get(s["stage"], "o"),
                       s=150, facecolors="none", edgecolors="0.35", linewidths=1.4, zorder=2,
                       label=f"after stage {s['stage']}")
    if sweep:
        cmap = colormaps["viridis"]
        ax.plot([s["gflops_per_video"] for s in sweep], [s["mAP"] for s in sweep], "-",
                color="#d62728", lw=1.5, alpha=0.7, zorder=3)
        symbol = SWEEP_SYMBOL.get(sweep_name or "", sweep_name or "value")
        for k, s in enumerate(sweep):
            ax.scatter(s["gflops_per_video"], s["mAP"], marker="*", s=230, zorder=4,
                       color=cmap(k / max(1, len(sweep) - 1) * 0.9), edgecolors="black",
                       linewidths=0.6, label=f"adaptive, {symbol}={s['value']}")
    for p in policies:
        if sweep and p["name"] == "adaptive":
            continue  # the sweep's own point at the run's setting is on the curve
        marker, color, size = _style(p["name"], used)
        ax.scatter(p["gflops_per_video"], p["mAP"], marker=marker, s=size, color=color,
                   edgecolors="black", linewidths=0.5, zorder=5, label=p["name"])
    _log_x(ax)


def _log_x(ax: Any) -> None:
    """Log x axis with plain tick labels at 1, 2, 5 x 10^k (no overprinted minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)


def plot_tradeoff(results: dict[str, Any], path: str | os.PathLike, *,
                  sweep: Sequence[dict] | None = None, title: str | None = None,
                  max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """mAP vs GFLOPs per video of every policy in ``results`` (a parsed ``results.json``), the
    stages I -> II -> III, optionally a sweep's adaptive curve, and each peer's operating
    points along its budget knob when the run has them (``results["peers"]["sweep"]``,
    ``run_marl.py --peer-sweep``); a zoomed panel on the region within :data:`ZOOM_SPAN` mAP of
    the best point when others sit far below. Returns ``{"panels", "zoom", "bytes", "points",
    "peer_curves"}``."""
    policies = list(results.get("policies", []))
    stages = list(results.get("stages", []))
    sweep = list(sweep or [])
    sweep_name = sweep[0]["sweep"] if sweep else None
    peer_sweeps = dict((results.get("peers") or {}).get("sweep") or {})
    unit = results.get("flops_unit", "FLOPs")
    points = [*policies, *stages, *sweep,
              *(q for entry in peer_sweeps.values() for q in entry["points"])]
    zoom = _zoom_range([p["mAP"] for p in points])
    fig = _figure(11.0 if zoom else 7.0, 5.4)
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    used: dict[str, tuple[str, str, float]] = {}
    for ax in axes:
        _draw_tradeoff(ax, policies, stages, sweep, sweep_name, used, peer_sweeps)
        ax.set_xlabel(f"G{unit} per video (log scale)")
    axes[0].set_ylabel("mAP (%)")
    axes[0].set_title("all strategies" if zoom else (title or "mAP vs cost, test split"),
                      fontsize=11)
    if zoom:
        lo, hi = zoom
        inside = [p for p in points if lo <= p["mAP"] <= hi]
        xs = [p["gflops_per_video"] for p in inside]
        x_lo, x_hi = min(xs) / 1.25, max(xs) * 1.25
        axes[1].set_ylim(lo, hi)
        axes[1].set_xlim(x_lo, x_hi)
        axes[1].set_title(f"zoom: within {ZOOM_SPAN:g} mAP of the best", fontsize=11)
        from matplotlib.patches import Rectangle

        axes[0].add_patch(Rectangle((x_lo, lo), x_hi - x_lo, hi - lo, fill=False, ls=":",
                                    lw=1.2, edgecolor="0.3", zorder=1))
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(6, len(unique)),
               fontsize=9, frameon=False, markerscale=0.8, handletextpad=0.3,
               columnspacing=1.2)
    rows = math.ceil(len(unique) / min(6, max(1, len(unique))))
    if title and zoom:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.04, 1, 0.95 if title and zoom else 1))
    size = save_png(fig, path, max_bytes=max_bytes)
    return {"panels": len(axes), "zoom": zoom, "bytes": size, "points": len(points),
            "peer_curves": len(peer_sweeps)}


def plot_sweep(results: dict[str, Any], path: str | os.PathLike, *,
               max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """The sweep figure of a run with ``results["sweep"]``: the adaptive policy's
    mAP-GFLOPs curve over the swept values drawn with the run's baselines (ViMo Figure 3 for
    ``max_moves``)."""
    sweep = list(results.get("sweep") or [])
    if not sweep:
        raise ValueError("results have no sweep")
    name = sweep[0]["sweep"]
    values = ", ".join(str(s["value"]) for s in sweep)
    symbol = SWEEP_SYMBOL.get(name, name)
    info = plot_tradeoff({**results, "stages": []}, path, sweep=sweep, max_bytes=max_bytes,
                         title=f"adaptive policy for {symbol} in {{{values}}} vs baselines "
                               "(test split)")
    return {**info, "sweep": name, "values": [s["value"] for s in sweep]}


# ------------------------------------------------------------------------------ trajectories


def _runs(codes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(start, stop, code)`` of the maximal runs of equal non-negative codes."""
    out, start = [], 0
    for t in range(1, len(codes) + 1):
        if t == len(codes) or codes[t] != codes[start]:
            if codes[start] >= 0:
                out.append((start, t, int(codes[start])))
            start = t
    return out


def _unit_colors(labels: Sequence[dict] | None) -> dict[int, tuple]:
    from matplotlib import colormaps

    if not labels:
        return {}
    units = [k for k, lab in enumerate(labels) if lab["kind"] == "unit"]
    # qualitative colours without tab's greys (grey means a build-up cue here)
    palette = [c for i, c in enumerate(colormaps["tab20" if len(units) > 9 else "tab10"].colors)
               if i not in ((14, 15) if len(units) > 9 else (7,))]
    colors = {k: (*palette[j % len(palette)], 1.0) for j, k in enumerate(units)}
    greys = [k for k, lab in enumerate(labels) if lab["kind"] != "unit"]
    for j, k in enumerate(greys):  # build-up cues: light to dark grey, far to near
        g = 0.82 - 0.5 * j / max(1, len(greys))
        colors[k] = (g, g, g, 1.0)
    return colors


def _thumbnails(video: dict, frames: Sequence[int], size: int) -> dict[int, np.ndarray]:
    from vimo_env.render import decode_thumbnails

    path = video.get("video_file")
    if not path or not Path(path).is_file() or not frames:
        return {}
    try:
        return decode_thumbnails(path, frames, float(video.get("fps", 1.0)), size)
    except Exception as err:  # a broken file must not cost the figure
        warnings.warn(f"{path}: no thumbnails ({err})", stacklevel=2)
        return {}


def trajectory_figure(data: dict[str, Any], *, thumbnails: bool = True,
                      thumb_size: int = 64) -> tuple[Any, dict[str, Any]]:
    """The trajectory figure of a ``vimo-trajectories`` record, and its summary
    (``panels`` = videos x strategies timeline panels, ``thumbnail_panels``, ``thumbnails``).

    Per video a block of one row per strategy: left the timeline (x: frame), with the feature
    colour strip on top, ground-truth units shaded, dashed segment bounds, each locator's lane
    with its observed frames joined in order and a red bar where it stopped; right (video file
    available) a film strip per locator: its frames in order, grey cells for moves a learned
    policy did not make. A glance/focus peer's row (kind ``peer``) has two lanes instead, the
    frames it glanced (grey ticks) and those it focused (dots), and its film strip shows the
    focused frames.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    videos = data["videos"]
    strategies = data["strategies"]
    N = int(data["num_locators"])
    m = int(data["max_moves"])
    labels = data.get("unit_labels")
    colors = _unit_colors(labels)
    # thumbnails per video: every frame a film strip shows, decoded once
    thumbs: list[dict[int, np.ndarray]] = []
    for k, video in enumerate(videos):
        frames = sorted({t for s in strategies for lane in _strip_lanes(s, k)
                         for t in lane[:MAX_THUMBNAILS]})
        thumbs.append(_thumbnails(video, frames, thumb_size) if thumbnails else {})
    lane_hs = [0.44 if t else 0.2 for t in thumbs]  # lanes as tall as a thumbnail
    row_hs = [lane_h * N + 0.3 for lane_h in lane_hs]
    title_h, gap_h, legend_h, width = 0.32, 0.36, 0.75, 11.0
    height = legend_h + sum(title_h + row_h * len(strategies) + gap_h for row_h in row_hs)
    fig = _figure(width, height)
    left, right = 1.55, 0.15
    content = width - left - right
    y = height - legend_h
    panels = thumb_panels = thumb_count = 0
    used_codes: set[int] = set()
    for k, video in enumerate(videos):
        T = int(video["length"])
        y -= title_h + (gap_h if k else 0.0)
        fig.text(0.12 / width, (y + 0.08) / height,
                 f"{video['video_id']}  ·  {video['class_name']}  ·  T = {T} frames"
                 + ("" if thumbs[k] else "  (no video file: features as colour)"),
                 fontsize=10, fontweight="bold", va="bottom")
        has_thumbs = bool(thumbs[k])
        lane_h, row_h = lane_hs[k], row_hs[k]
        slots = max(1, min(MAX_THUMBNAILS, max(
            max((len(lane) for lane in _strip_lanes(s, k)), default=1) for s in strategies)))
        if any(s["kind"] == "policy" for s in strategies):
            slots = max(slots, min(MAX_THUMBNAILS, m + 1))
        strip_w = min(content * 0.48, slots * lane_h * 1.06) if has_thumbs else 0.0
        line_w = content - strip_w - (0.15 if has_thumbs else 0.0)
        for j, strat in enumerate(strategies):
            y -= row_h
            entry = strat["videos"][k]
            lanes = entry["frames"]
            peer = strat["kind"] == "peer"
            lane_names = strat.get("lanes") or [f"L{i}" for i in range(len(lanes))]
            ax = fig.add_axes((left / width, (y + 0.06) / height, line_w / width,
                               (row_h - 0.12) / height))
            panels += 1
            ax.set_xlim(0, T + 0.9)  # room for a stop after the last frame
            ax.set_ylim(max(N, len(lanes)) - 0.5, -1.05)
            ax.imshow(np.asarray(video["colors"], dtype=float)[None], aspect="auto",
                      extent=(0, T, -0.62, -0.98), interpolation="nearest", zorder=1)
            ax.set_xlim(0, T + 0.9)  # (imshow resets the limits)
            units = video.get("units")
            if units:
                for start, stop, code in _runs(units):
                    used_codes.add(code)
                    ax.axvspan(start, stop, ymin=0.0, ymax=(N - 0.5 + 0.55) / (N + 0.55),
                               color=colors.get(code, "0.8"), alpha=0.45, lw=0, zorder=0)
            for bound in video["segments"][1:-1]:
                ax.axvline(bound, color="0.45", ls="--", lw=0.8, zorder=1)
            for i, lane in enumerate(lanes):
                ax.axhline(i, color="0.75", lw=0.6, zorder=1)
                xs = [t + 0.5 for t in lane]
                if peer:  # no order and no stops: one pass over the sampled frames
                    style = (dict(marker="|", ms=7, mew=1.2, color="0.35") if i == 0 else
                             dict(marker="o", ms=4.2, color="#08306b", mec="white", mew=0.6))
                    ax.plot(xs, [i] * len(xs), ls="none", zorder=4, **style)
                    continue
                ax.plot(xs, [i] * len(xs), "-", color="#08306b", lw=1.0, zorder=3)
                ax.plot(xs, [i] * len(xs), "o", ms=4.2, color="#08306b", mec="white",
                        mew=0.6, zorder=4)
                if xs:
                    ax.plot([xs[-1] + 0.5], [i], marker="|", ms=12, mew=2.2,
                            color="#d62728", zorder=5)
            ax.set_yticks(range(len(lanes)), lane_names, fontsize=7)
            ax.tick_params(axis="y", length=0, pad=2)
            ax.tick_params(axis="x", labelsize=7, length=2)
            if j < len(strategies) - 1:
                ax.set_xticklabels([])
            else:
                ax.set_xlabel("frame", fontsize=8, labelpad=1)
            if peer:
                note = f"{len(lanes[0])} glanced\n{len(lanes[1])} focused"
            else:
                note = f"{sum(len(lane) for lane in lanes)} frames"
            if "p_true" in entry:
                ok = entry.get("predicted") == video["label"]
                note += f"\nP(y) = {entry['p_true']:.2f} {'✓' if ok else '✗'}"
            fig.text(0.12 / width, (y + row_h / 2 + 0.05) / height, strat["name"],
                     fontsize=9.5, fontweight="bold", va="bottom")
            fig.text(0.12 / width, (y + row_h / 2 + 0.02) / height, note, fontsize=8,
                     va="top", color="0.2")
            if has_thumbs:
                thumb_panels += 1
                thumb_count += _film_strip(fig, (left + line_w + 0.15) / width,
                                           (y + 0.06) / height, strip_w / width,
                                           (row_h - 0.12) / height, _strip_lanes(strat, k),
                                           thumbs[k], slots,
                                           strat["kind"] == "policy" and m + 1 <= slots,
                                           m + 1, thumb_size)
    handles = [Line2D([], [], color="#08306b", marker="o", ms=5, mec="white",
                      label="observed frame (joined in order)"),
               Line2D([], [], color="#d62728", marker="|", ms=11, mew=2.2, ls="none",
                      label="stop"),
               Line2D([], [], color="0.45", ls="--", label="segment bound"),
               Patch(facecolor=(0.55, 0.45, 0.65), label="top strip: features (PCA → RGB)")]
    if any(s["kind"] == "peer" for s in strategies):
        handles.insert(2, Line2D([], [], color="0.35", marker="|", ms=7, mew=1.2, ls="none",
                                 label="peer: glanced frame (its strip: focused frames)"))
    if labels:
        for code in sorted(used_codes):
            handles.append(Patch(facecolor=colors.get(code, "0.8"), alpha=0.6,
                                 label=labels[code]["name"]))
    fig.legend(handles=handles, loc="upper center", ncol=min(6, len(handles)), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0 - 0.05 / height),
               title=f"{data.get('split', 'test')} videos · shaded: ground-truth units"
                     if labels else f"{data.get('split', 'test')} videos",
               title_fontsize=9)
    return fig, {"panels": panels, "thumbnail_panels": thumb_panels,
                 "peer_panels": len(videos) * sum(s["kind"] == "peer" for s in strategies),
                 "thumbnails": thumb_count, "videos": len(videos),
                 "strategies": [s["name"] for s in strategies]}


def _strip_lanes(strategy: dict[str, Any], video: int) -> list[list[int]]:
    """The lanes a strategy's film strip shows on one video: every locator's frames, or a
    peer's focused frames (its glanced frames are the cheap low-resolution views)."""
    lanes = strategy["videos"][video]["frames"]
    return [lanes[1]] if strategy["kind"] == "peer" else lanes


def _film_strip(fig: Any, x: float, y: float, w: float, h: float, lanes: Sequence[Sequence[int]],
                thumbs: dict[int, np.ndarray], slots: int, grey_after: bool, grey_until: int,
                size: int) -> int:
    """Draw one strategy's film strips (one row per locator) in a new axes; returns the
    number of thumbnails drawn."""
    pad = max(2, size // 16)
    cell = size + 2 * pad
    canvas = np.full((cell * len(lanes), cell * slots, 3), 255, dtype=np.uint8)
    drawn = 0
    ax = fig.add_axes((x, y, w, h))
    for i, lane in enumerate(lanes):
        for j in range(slots):
            top, left = i * cell + pad, j * cell + pad
            if j < len(lane) and lane[j] in thumbs:
                canvas[top:top + size, left:left + size] = thumbs[lane[j]]
                drawn += 1
            elif j >= len(lane) and grey_after and j < grey_until:
                canvas[top:top + size, left:left + size] = 190  # not observed: stopped
    ax.imshow(canvas, interpolation="nearest", aspect="equal")
    for i, lane in enumerate(lanes):
        for j, t in enumerate(lane[:slots]):
            ax.text(j * cell + pad + 1, i * cell + pad + 1, str(t), fontsize=6, va="top",
                    ha="left", color="black",
                    bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.75))
        if len(lane) > slots:
            ax.text(slots * cell - pad - 1, i * cell + cell - pad - 1,
                    f"+{len(lane) - slots}", fontsize=6.5, ha="right", va="bottom",
                    color="white", bbox=dict(boxstyle="square,pad=0.1", fc="black", ec="none"))
    ax.set_anchor("W")
    ax.axis("off")
    return drawn


def plot_trajectories(data: dict[str, Any] | str | os.PathLike, path: str | os.PathLike, *,
                      thumbnails: bool = True, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """Write the trajectory figure (ViMo Figure 4) of a ``vimo-trajectories`` record (or its
    file) to ``path``; returns the summary of :func:`trajectory_figure` plus ``bytes``."""
    from benchmarks.figure_data import load_trajectories

    if not isinstance(data, dict):
        data = load_trajectories(data)
    fig, info = trajectory_figure(data, thumbnails=thumbnails)
    info["bytes"] = save_png(fig, path, dpi=100, max_bytes=max_bytes)
    return info


# ------------------------------------------------------------------------------ a run


def draw_all(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
             max_bytes: int = MAX_BYTES) -> dict[str, dict[str, Any]]:
    """Redraw every figure a finished run's files allow: ``map_vs_gflops.png`` (from
    ``results.json``), ``sweep_<name>.png`` (its sweep, if any) and ``trajectories.png`` (from
    ``trajectories.json``, if present). Returns ``{file name: summary}``."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run
    results_file = run / "results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file}: no results.json (is {run} a finished run?)")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    drawn = {"map_vs_gflops.png": plot_tradeoff(results, out / "map_vs_gflops.png",
                                                max_bytes=max_bytes)}
    if results.get("sweep"):
        name = f"sweep_{results['sweep'][0]['sweep']}.png"
        drawn[name] = plot_sweep(results, out / name, max_bytes=max_bytes)
    if (run / "trajectories.json").is_file():
        drawn["trajectories.png"] = plot_trajectories(run / "trajectories.json",
                                                      out / "trajectories.png",
                                                      max_bytes=max_bytes)
    return drawn


# ------------------------------------------------------------------------------ TensorBoard


EpochCallback = Callable[[Any, int, Any], None]


def trajectory_logger(*, max_moves: int, stride: int, count: int = 4, device: str = "cpu",
                      dataset: str | os.PathLike | None = None,
                      tag: str = "trajectories/val") -> Callable[[Any, Any], EpochCallback]:
    """A factory of SAC epoch callbacks that log the trajectory figure of ``count`` fixed val
    videos (of different classes) to TensorBoard.

    ``factory(recognizer, val_source)`` returns ``callback(learner, env_step, writer)``
    (``agents.sac_training.train_sac``'s ``epoch_callback``): it runs the learner's deterministic
    policy on those videos and adds the figure as image ``tag`` at ``env_step``.
    """

    def factory(recognizer: Any, source: Any) -> EpochCallback:
        from agents.evaluate import evaluate_policy
        from agents.policies import CTDEActorPolicy
        from benchmarks.figure_data import (
            SubsetSource,
            choose_videos,
            strategy_rows,
            video_records,
        )

        indices = choose_videos(source, count)
        subset = SubsetSource(source, indices)
        local = list(range(len(indices)))
        num_locators = int(recognizer.config.num_locators)
        static = video_records(subset, local, num_locators=num_locators, max_moves=max_moves,
                               stride=stride, dataset=dataset, split="val")

        def callback(learner: Any, env_step: int, writer: Any) -> None:
            res = evaluate_policy(CTDEActorPolicy(learner, name="adaptive"), subset,
                                  recognizer, max_moves=max_moves, stride=stride,
                                  device=device, batch_size=len(local))
            data = {**static, "strategies": strategy_rows(subset, [res], local,
                                                          num_locators=num_locators,
                                                          strategies=["adaptive"])}
            fig, _ = trajectory_figure(data, thumbnails=False)
            fig.set_dpi(72)
            writer.add_image(tag, _canvas(fig), global_step=int(env_step), dataformats="HWC")

        return callback

    return factory


def _scalar(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "None"
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sac": {"actor_lr": 1e-5}}`` -> ``{"sac.actor_lr": 1e-5}``; values TensorBoard's
    hparams accept (bool, int, float, str; lists as JSON)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = _scalar(value)
    return flat


def log_hparams(log_dir: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Log a run's hyper-parameters (``results["config"]``, flattened, with dataset and seed)
    and its final test metrics (adaptive policy: mAP, top1, frame rate, GFLOPs) to TensorBoard
    under ``log_dir/hparams``; returns that folder."""
    from torch.utils.tensorboard import SummaryWriter

    hparams = flatten_config(dict(results.get("config", {})))
    hparams.update(dataset=str(results.get("dataset", "")), seed=int(results.get("seed", 0)))
    adaptive = next((p for p in results.get("policies", []) if p["name"] == "adaptive"), None)
    metrics = {}
    if adaptive is not None:
        metrics = {f"hparam/test_{k}": float(adaptive[k])
                   for k in ("mAP", "top1", "frame_rate", "gflops_per_video")}
    folder = Path(log_dir) / "hparams"
    with SummaryWriter(str(folder)) as writer:
        writer.add_hparams(hparams, metrics, run_name=".")
    return folder


# ------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots",
                                     description="Redraw a finished run's figures from its "
                                                 "results files.")
    parser.add_argument("run_dir", help="a run_marl.py --out folder (holds results.json)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: run_dir)")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                        help="largest PNG size (resolution is lowered to fit)")
    args = parser.parse_args(argv)
    try:
        drawn = draw_all(args.run_dir, args.out, max_bytes=args.max_bytes)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"benchmarks.plots: {err}") from None
    for name, info in drawn.items():
        print(f"{Path(args.out or args.run_dir) / name}: {info['panels']} panel(s), "
              f"{info['bytes'] / 1000:.0f} kB")
    return drawn


if __name__ == "__main__":
    main()
