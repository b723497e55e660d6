"""ViMo against the seed peers on the same features (run_marl.py's ``peers`` phase).

The peers (``agents.peers``: LiteEval, AFNet-style, AdaFocus, NSNet) glance at many frames with
a cheap backbone and focus on a few with an expensive one, so they read a glance/focus pair of
feature files (:class:`features.pairs.FeaturePair`); ViMo reads the focus file alone. This
module

* finds the glance file: ``--glance FILE.h5``; PhotoUnits' real glance (Lite0 at 112 px,
  built by ``features.photounits.build_glance``; chosen by ``run_marl.py``); or the synthetic
  stand-in
  (:func:`features.pairs.make_glance_features`) built once and cached beside the generated
  dataset, or under ``--data-dir`` for a user's ``--dataset`` (never next to the user's file);
  the stand-in's per-frame cost keeps MobileNetV2 : ResNet-50 = 0.32 : 4.09 GMACs (1 : 12.8) of
  the focus file's cost;
* trains each peer (``run``: train split, val selection, test), or, under ``--resume``, loads
  a finished one (its checkpoint and record under ``DIR/train/peers``) and evaluates it;
* times each method at batch 1 on the cached features (the peers' forward, ViMo's env episode);
* turns the peers into Table 2 rows (``EvalResult`` with ``frames_glanced`` and
  ``frames_focused``, so they enter ``results.json``'s ``policies``), keeps the matched-uniform
  references under ``results.json["peers"]``, and prints a ViMo-Table-6-style table measured
  side by side, followed by a separate table of the papers' own ActivityNet numbers (as
  reported, never measured here, never in ``policies``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from agents.evaluate import EvalResult, evaluate_policy
from agents.peers import adafocus, afnet, liteeval, nsnet
from agents.peers.harness import (
    FrameCosts,
    PeerResult,
    gather_batch,
    matched_uniform,
    sample_frames,
)
from features.atomic import atomic_path, write_text_atomic
from features.pairs import GLANCE_GMACS_PER_FRAME, FeaturePair, make_glance_features
from features.synthetic import GMACS_PER_FRAME as RESNET50_GMACS_PER_FRAME

#: peer name -> (module with run / load / evaluate / save, its argument dataclass)
PEERS: dict[str, tuple[ModuleType, type]] = {
    "liteeval": (liteeval, liteeval.LiteEvalArgs),
    "afnet": (afnet, afnet.AFNetArgs),
    "adafocus": (adafocus, adafocus.AdaFocusArgs),
    "nsnet": (nsnet, nsnet.NSNetArgs),
}

#: ``--budget tiny``: small networks and step counts (smoke tests); "default" uses the peers'
#: own defaults (docs/peers.md)
TINY_PEER_ARGS: dict[str, dict] = {
    "liteeval": dict(embed_dim=32, coarse_hidden=16, fine_hidden=32, num_frames=16,
                     min_steps=100, max_steps=100, eval_every=25),
    "afnet": dict(hidden=32, num_frames=16, min_steps=100, max_steps=100, eval_every=25),
    "adafocus": dict(embed_dim=32, hidden=32, policy_dim=16, policy_hidden=16, num_frames=16,
                     min_steps=100, max_steps=100, eval_every=25),
    "nsnet": dict(d_model=32, heads=4, num_frames=16, min_steps=100, max_steps=100,
                  eval_every=25),
}

#: Each peer's budget knob (an argument of its dataclass) and the values ``--peer-sweep`` trains
#: it at, around its default: LiteEval's target focus usage gamma, NSNet's K frames, the focus
#: ratio of AdaFocus and AFNet-style. ViMo's own knobs are ``--sweep lambda|max_moves``.
BUDGET_KNOBS: dict[str, tuple[str, tuple[float, ...]]] = {
    "liteeval": ("gamma", (0.05, 0.1, 0.2)),
    "afnet": ("ratio", (0.125, 0.25, 0.5)),
    "adafocus": ("ratio", (0.125, 0.25, 0.5)),
    "nsnet": ("k", (3, 5, 8)),
}

#: glance : focus per-frame cost of the stand-in: MobileNetV2 vs ResNet-50 at 224x224
STAND_IN_COST_RATIO = GLANCE_GMACS_PER_FRAME / RESNET50_GMACS_PER_FRAME

#: batch-1 latency: peers, median over this many test videos; ViMo, mean over this many episodes
PEER_LATENCY_VIDEOS = 50
VIMO_LATENCY_VIDEOS = 20

#: The papers' own headline ActivityNet-v1.3 numbers (/work/shared/papers/*.md). Printed in a
#: table of their own, labelled as reported; never measured here, never in ``policies``.
REPORTED: list[dict[str, Any]] = [
    {"method": "LiteEval", "backbones": "MobileNetV2 (112 px) + ResNet-101", "mAP": 72.7,
     "gflops": 95.1, "source": "Wu et al., IJCV 2021, Table 1 (1 fps)"},
    {"method": "AdaFocus", "backbones": "MobileNetV2 + ResNet-50 (128 px patches)",
     "mAP": 75.0, "gflops": 26.6, "source": "Wang et al., ICCV 2021, Table 1"},
    {"method": "NSNet", "backbones": "MobileNetV2 + ResNet-50", "mAP": 76.8, "gflops": 26.0,
     "source": "Xia et al., ECCV 2022, Table 2"},
    {"method": "AFNet", "backbones": "AF-ResNet-50 (RT 0.8, RS 0.4)", "mAP": 75.6,
     "gflops": 24.6, "source": "Zhang et al., NeurIPS 2022, Table 4"},
    {"method": "ViMo (m=4)", "backbones": "ResNet-50 (no glance)", "mAP": 82.4, "gflops": 38.7,
     "source": "Tian et al., ViMo, Table 6"},
]


# -- options and the glance file -------------------------------------------------------------


def parse_peers(text: str) -> list[str]:
    """``--peers liteeval,afnet`` -> names, in the given order, each known."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if not names or unknown:
        raise ValueError(f"--peers {text!r}: expected a comma-separated list of "
                         f"{', '.join(PEERS)} (unknown: {', '.join(unknown) or 'none given'})")
    return list(dict.fromkeys(names))


def stand_in_path(dataset: Path, data_dir: str | Path, user_dataset: bool) -> Path:
    """Where the synthetic glance stand-in of ``dataset`` is cached: ``data_dir`` for a user's
    ``--dataset`` (never beside the user's file), the generated dataset's own folder
    otherwise (already under ``data_dir``)."""
    folder = Path(data_dir) if user_dataset else dataset.parent
    return folder / f"{dataset.stem}-glance.h5"


def check_glance(glance: str | Path, dataset: Path) -> FeaturePair:
    """A user's ``--glance`` file, checked against the focus file (``SystemExit`` naming both
    files and the field on a mismatch): run before any training."""
    glance = Path(glance)
    if not glance.is_file():
        raise SystemExit(f"--glance {glance}: file not found")
    try:
        return FeaturePair(glance, dataset)
    except ValueError as err:
        raise SystemExit(f"--glance: {err}") from None


def ensure_stand_in(dataset: Path, out: Path, seed: int, log: Any = print) -> tuple[Path, bool]:
    """Build (or reuse) the synthetic glance stand-in of ``dataset`` at ``out``.

    Reused when its record (``<out>.json``: the focus file, its size and modification time,
    the seed and the cost) matches; rebuilt otherwise. Returns (path, built now)."""
    from features.store import FeatureStore

    with FeatureStore(dataset) as store:
        cost = store.gflops_per_frame * STAND_IN_COST_RATIO
        unit = store.flops_unit
    stat = dataset.stat()
    key = {"focus": str(dataset.resolve()), "focus_size": stat.st_size,
           "focus_mtime_ns": stat.st_mtime_ns, "seed": int(seed), "gflops_per_frame": cost}
    record = out.with_suffix(".json")
    if out.is_file() and record.is_file():
        try:
            if json.loads(record.read_text()) == key:
                log(f"glance: reusing the synthetic stand-in {out}")
                return out, False
        except json.JSONDecodeError:
            pass
    log(f"glance: building the SYNTHETIC stand-in {out} from {dataset} (a degraded copy of the "
        f"focus features, {cost:.4g} G{unit}/frame = {STAND_IN_COST_RATIO:.4f} x the focus "
        "cost)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".partial.h5") as tmp:
        make_glance_features(dataset, tmp, gflops_per_frame=cost, seed=seed)
    write_text_atomic(record, json.dumps(key, indent=1))
    return out, True


# -- the peers -------------------------------------------------------------------------------


def peer_args(name: str, budget: str, seed: int) -> Any:
    """The peer's argument dataclass for a run_marl budget (``tiny``: small and short)."""
    _, kind = PEERS[name]
    return kind(seed=seed, **(TINY_PEER_ARGS[name] if budget == "tiny" else {}))


def _finished(name: str, folder: Path, args: Any, pair: FeaturePair) -> dict | None:
    """The record of a finished peer with these arguments and files, else None."""
    ckpt, record = folder / f"{name}.pt", folder / f"{name}.json"
    if not (ckpt.is_file() and record.is_file()):
        return None
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return None
    files = {"glance": str(pair.glance_path.resolve()), "focus": str(pair.focus_path.resolve())}
    if saved.get("args") != asdict(args) or any(saved.get(k) != v for k, v in files.items()):
        print(f"peers: {ckpt} was trained with other arguments or files: retraining {name}")
        return None
    return saved


def run_peer(name: str, pair: FeaturePair, args: Any, folder: Path, resume: bool,
             splits: dict | None = None) -> dict:
    """Train, select and score one peer (``module.run``), saving ``<name>.pt`` and
    ``<name>.json`` (its record) under ``folder``; under ``resume`` a finished peer is loaded
    and evaluated instead. Returns ``run``'s dict plus ``resumed`` and ``time_s``."""
    module, _ = PEERS[name]
    t0 = time.perf_counter()
    saved = _finished(name, folder, args, pair) if resume else None
    if saved is None:
        result = module.run(pair, args, out=folder)
        record = {k: v for k, v in result.items() if k not in ("model", "test")}
        write_text_atomic(folder / f"{name}.json", json.dumps(
            {**record, "glance": str(pair.glance_path.resolve()),
             "focus": str(pair.focus_path.resolve())}, indent=1))
        return {**result, "resumed": False, "time_s": time.perf_counter() - t0}
    model, _ = module.load(folder / f"{name}.pt")
    splits = splits or {s: pair.load(s) for s in ("train", "val", "test")}
    costs = FrameCosts.from_pair(pair)
    test = module.evaluate(model, splits["test"], costs, args)
    val = module.evaluate(model, splits["val"], costs, args)
    uniform = matched_uniform(splits["train"], splits["test"], test.gflops_per_video, costs)
    return {"row": test.row(), "uniform": uniform.row(), "val": val.summary(),
            "summary": test.summary(), "train": saved["train"], "args": asdict(args),
            "model": model, "test": test, "resumed": True, "time_s": time.perf_counter() - t0}


@torch.no_grad()
def peer_latency_ms(model: torch.nn.Module, split: Any, num_frames: int | None,
                    videos: int = PEER_LATENCY_VIDEOS) -> float:
    """Median wall ms of one video at batch 1: read its sampled frames' glance and focus
    features from the in-memory split and run the model's forward (after one warm-up)."""
    model.eval()
    times = []
    n = min(videos, split.num_videos)
    for v in [0, *range(n)]:  # the first is a warm-up
        t0 = time.perf_counter()
        frames, mask = sample_frames(split.lengths[v:v + 1], num_frames)
        glance, focus = gather_batch(split, torch.tensor([v]), frames)
        model(glance, focus, mask)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times[1:])


def vimo_latency_ms(path: Path, trainer: Any, stages: list, config: Any,
                    videos: int = VIMO_LATENCY_VIDEOS) -> float | None:
    """Mean wall ms per test episode of the final adaptive policy at batch 1
    (``evaluate_policy(batch_size=1)`` over the first ``videos`` test videos, after one
    warm-up episode); None when no policy was trained (``--stop-after I``)."""
    from agents.policies import CTDEActorPolicy
    from agents.trainer import source_for
    from benchmarks.figure_data import SubsetSource
    from vimo_env.recognizer import Recognizer

    if stages[-1].sac is None:
        return None
    recognizer = Recognizer.load(stages[-1].recognizer, map_location=config.device).eval()
    policy = CTDEActorPolicy(trainer.load_algorithm(recognizer, stages[-1].sac), name="adaptive")
    test = source_for(path, "test", config.device)
    kw = dict(max_moves=config.max_moves, stride=config.stride, batch_size=1,
              device=config.device, keep_trajectories=False)
    evaluate_policy(policy, SubsetSource(test, [0]), recognizer, **kw)  # warm-up
    subset = SubsetSource(test, range(min(videos, test.num_videos)))
    t0 = time.perf_counter()
    evaluate_policy(policy, subset, recognizer, **kw)
    return 1000.0 * (time.perf_counter() - t0) / subset.num_videos


def peer_rows(peers: dict) -> list[EvalResult]:
    """Table 2 / ``policies`` rows of the peers (test split)."""
    rows = []
    for name, p in peers["methods"].items():
        r = p["row"]
        rows.append(EvalResult(
            name=name, mAP=r["mAP"], top1=r["top1"], frame_rate=r["frame_rate"],
            frames_per_video=r["frames_per_video"], gflops_per_video=r["gflops_per_video"],
            flops_unit=peers["flops_unit"],
            extra={"frames_glanced": r["frames_glanced"], "frames_focused": r["frames_focused"]}))
    return rows


def run_peers(pair: FeaturePair, names: list[str], budget: str, seed: int, folder: Path,
              resume: bool, glance_info: dict,
              on_test: Callable[[str, PeerResult, list[str]], None] | None = None,
              splits: dict | None = None) -> dict:
    """Every named peer on ``pair``: the ``results.json["peers"]`` record (the models are
    dropped; their batch-1 latency is measured here). ``on_test(name, result, video_ids)``
    receives each peer's test :class:`PeerResult` (scores and frame selections, e.g. for the
    trajectory figure) with the test split's video ids. ``splits``: the pair's splits when
    the caller has read them already (as :func:`sweep_peers` can reuse them)."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = splits or {s: pair.load(s) for s in ("train", "val", "test")}
    methods = {}
    for name in names:
        args = peer_args(name, budget, seed)
        result = run_peer(name, pair, args, folder, resume, splits)
        latency = peer_latency_ms(result["model"], splits["test"], args.num_frames)
        if on_test is not None:
            on_test(name, result["test"], list(splits["test"].video_ids))
        train = {k: v for k, v in result["train"].items() if k != "history"}
        methods[name] = {"row": result["row"], "uniform": result["uniform"],
                         "val": result["val"], "train": train, "args": result["args"],
                         "latency_ms": latency, "resumed": result["resumed"],
                         "time_s": result["time_s"]}
        how = "loaded (--resume)" if result["resumed"] else f"trained {train['steps']} steps"
        print(f"peers: {name} {how} in {result['time_s']:.1f} s: test mAP "
              f"{result['row']['mAP']:.1f} at {result['row']['gflops_per_video']:.2f} GFLOPs")
    return {"glance": glance_info,
            "focus": {"path": str(pair.focus_path), "backbone": pair.focus_backbone,
                      "feature_dim": pair.focus_dim, "gflops_per_frame": pair.focus_cost},
            "flops_unit": pair.flops_unit, "methods": methods,
            "latency": {"threads": torch.get_num_threads(),
                        "peers": f"median over {PEER_LATENCY_VIDEOS} test videos of one "
                                 "forward at batch 1 on the cached features",
                        "vimo": f"mean over {VIMO_LATENCY_VIDEOS} test episodes at batch 1 "
                                "(evaluate_policy, batch_size=1)",
                        "vimo_ms": None}}


def sweep_peers(pair: FeaturePair, peers: dict, budget: str, seed: int, folder: Path,
                resume: bool, values: dict[str, Sequence[float]] | None = None,
                splits: dict | None = None) -> dict:
    """Each peer of ``peers["methods"]`` (a :func:`run_peers` record) trained again at the
    other values of its budget knob (:data:`BUDGET_KNOBS`, or ``values[name]``): its operating
    points on the mAP-GFLOPs plane, test split. The knob's default is the run's own point,
    taken from the record, not retrained. Each point is saved under ``folder/<name>-<knob>-
    <value>`` and, under ``resume``, loaded when finished. Returns ``{name: {"knob",
    "points": [{"value", <SPEC section 7 row>}, ...] (by value)}}``. ``splits`` as in
    :func:`run_peers`."""
    unknown = sorted(set(peers["methods"]) - set(BUDGET_KNOBS)) + sorted(
        set(values or {}) - set(peers["methods"]))
    if unknown:
        raise ValueError(f"sweep_peers: no budget sweep for {unknown}; the run's peers with a "
                         f"knob: {sorted(set(peers['methods']) & set(BUDGET_KNOBS))}")
    splits = splits or {s: pair.load(s) for s in ("train", "val", "test")}
    sweep = {}
    for name, method in peers["methods"].items():
        knob, default_values = BUDGET_KNOBS[name]
        base = peer_args(name, budget, seed)
        points = [{"value": getattr(base, knob), **method["row"]}]
        kind = type(getattr(base, knob))
        wanted = []
        for value in (values or {}).get(name, default_values):
            if kind is int and float(value) != int(value):
                raise ValueError(f"sweep_peers: {name}'s knob {knob} takes whole numbers, got "
                                 f"{value!r}")
            if kind(value) not in wanted:
                wanted.append(kind(value))
        for value in wanted:
            if value == getattr(base, knob):
                continue  # the run's own point
            args = replace(base, **{knob: value})
            result = run_peer(name, pair, args, folder / f"{name}-{knob}-{value:g}", resume,
                              splits)
            points.append({"value": value, **result["row"]})
            how = "loaded" if result["resumed"] else "trained"
            print(f"peers: {name} {knob}={value:g} {how} in {result['time_s']:.1f} s: test mAP "
                  f"{result['row']['mAP']:.1f} at {result['row']['gflops_per_video']:.2f} GFLOPs")
        sweep[name] = {"knob": knob, "points": sorted(points, key=lambda p: p["value"])}
    return sweep


def sweep_table(sweep: dict, unit: str) -> str:
    """The printed table of :func:`sweep_peers`' operating points."""
    lines = ["", f"Peer operating points (test split; GFLOPs per video in G{unit})",
             f"{'method':<10} {'knob':<11} {'mAP %':>6} {'GFLOPs':>7} {'glanced':>7} "
             f"{'focused':>7}"]
    for name, entry in sweep.items():
        for p in entry["points"]:
            lines.append(f"{name:<10} {entry['knob'] + '=' + format(p['value'], 'g'):<11} "
                         f"{p['mAP']:>6.1f} {p['gflops_per_video']:>7.2f} "
                         f"{p['frames_glanced']:>7.1f} {p['frames_focused']:>7.1f}")
    return "\n".join(lines)


def glance_record(pair: FeaturePair, built: bool | None) -> dict:
    """What ``results.json["peers"]["glance"]`` says about the glance file."""
    return {"path": str(pair.glance_path), "backbone": pair.glance_backbone,
            "feature_dim": pair.glance_dim, "gflops_per_frame": pair.glance_cost,
            "synthetic": pair.glance_backbone == "synthetic-glance",
            "stand_in_built_now": built}


# -- the tables ------------------------------------------------------------------------------


def comparison_table(peers: dict, rows: list[EvalResult]) -> str:
    """The measured side-by-side table (ViMo Table 6 style) and the papers' table."""
    unit = peers["flops_unit"]
    g, f = peers["glance"], peers["focus"]
    glance = f"{g['backbone']} ({g['gflops_per_frame']:.3g})"
    focus = f"{f['backbone']} ({f['gflops_per_frame']:.3g})"
    wg, wf = max(len(glance), 15), max(len(focus), 15)
    header = (f"{'method':<26} {'glance (G/frame)':<{wg}} {'focus (G/frame)':<{wf}} "
              f"{'mAP %':>6} {'top1 %':>6} {'GFLOPs':>7} {'glanced':>7} {'focused':>7} "
              f"{'latency ms':>10}")
    lat = peers["latency"]
    synthetic = (" -- a SYNTHETIC STAND-IN (a degraded copy of the focus features, "
                 "features.pairs.make_glance_features), not a real cheap backbone"
                 if g["synthetic"] else "")
    lines = ["", "Table 6 - ViMo and the peers, measured here on the same features (test split; "
             f"GFLOPs per video in G{unit}; frames glanced / focused per video)",
             f"glance file: {g['path']} (backbone {g['backbone']}, D={g['feature_dim']}, "
             f"{g['gflops_per_frame']:.4g} G{unit}/frame){synthetic}",
             f"focus file:  {f['path']} (backbone {f['backbone']}, D={f['feature_dim']}, "
             f"{f['gflops_per_frame']:.4g} G{unit}/frame; ViMo reads this file alone)",
             header]

    def line(name: str, gl: str, r: dict, glanced: float, focused: float,
             ms: float | None) -> str:
        latency = f"{ms:>10.2f}" if ms is not None else f"{'-':>10}"
        return (f"{name:<26} {gl:<{wg}} {focus:<{wf}} {r['mAP']:>6.1f} {r['top1']:>6.1f} "
                f"{r['gflops_per_video']:>7.2f} {glanced:>7.1f} {focused:>7.1f} {latency}")

    adaptive = next((r for r in rows if r.name == "adaptive"), None)
    if adaptive is not None:
        lines.append(line("ViMo (adaptive)", "-", adaptive.row(), 0.0,
                          adaptive.frames_per_video, lat.get("vimo_ms")))
    for name, p in peers["methods"].items():
        r, u = p["row"], p["uniform"]
        lines.append(line(name, glance, r, r["frames_glanced"], r["frames_focused"],
                          p["latency_ms"]))
        lines.append(line(f"  {u['name']} (>= {name})", "-", u, 0.0, u["frames_focused"], None))
    lines += [f"latency: wall ms per video at batch 1 on the cached features, {lat['threads']} "
              f"torch thread(s); peers: {lat['peers']};",
              f"  ViMo: {lat['vimo']}",
              "uniform-k (>= peer): k = ceil(peer GFLOPs / focus cost) uniformly spaced focus "
              "frames, mean-pooled, logistic regression fit on train",
              "  (a reference at no less cost than the peer; in results.json \"peers\", not "
              "\"policies\")",
              "", "As reported in the papers (ActivityNet-v1.3; NOT measured here: other data, "
              "backbones fine-tuned end to end, the papers' own GFLOPs accounting)",
              f"{'method':<12} {'backbones':<42} {'mAP %':>6} {'GFLOPs':>7}  source"]
    for p in REPORTED:
        lines.append(f"{p['method']:<12} {p['backbones']:<42} {p['mAP']:>6.1f} "
                     f"{p['gflops']:>7.1f}  {p['source']}")
    return "\n".join(lines)
