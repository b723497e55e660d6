"""Distributed feature extraction on Ray: manifest shards -> part files -> one merged file.

    python -m features.extract --manifest FILE --out FILE.h5 --engine ray
        [--address ADDR] [--shards K] [--ray-workers N] [--shard-retries R] ...

The videos still to extract are cut into ``K`` contiguous shards (manifest order). A pool of
Ray actors (one per GPU when the cluster has GPUs, else one per ``threads`` CPUs) loads the
backbone once each and extracts shard after shard, decoding in-process; each shard writes
its own ``vimo-features`` part file ``<out>.parts/shard-XXXXX-of-YYYYY.h5`` through
``FeatureWriter`` (``.partial`` until complete, then renamed) with the same per-video loop as
the local engine. When every shard is complete the driver replays the parts, video by video
in manifest order, through a fresh ``FeatureWriter`` (into ``<out>.parts/merged.h5``, renamed
onto ``out``), so the merged file is byte-for-byte what ``features.extract.extract`` writes
for the same manifest (same device and torch thread count: float results depend on both).

Rerunning skips complete shards (part file and its ``.failed.json`` under their final names),
resumes unfinished ones from their ``.partial`` part (``FeatureWriter(resume=True)``), and
skips videos already in an existing ``out`` (those stay first, as with the local engine).
``<out>.parts/plan.json`` pins the shard layout, so a rerun uses the same shards even on a
cluster of another size. A shard whose worker process died is retried on a fresh actor up to
``retries`` times in the same run (resuming its part); shards that still fail are reported by
:class:`ShardFailure` after every other shard has run, their parts kept for the next run.
Videos that fail to decode are listed and written to ``<out>.failed.json`` as locally (a
complete shard's failures are carried over, not retried, until the merge; a rerun after the
merge retries them, as they are not in ``out``).

Cluster: ``address`` (or ``RAY_ADDRESS``) connects to a running cluster (``ray start --head``
on one node, ``ray start --address HEAD:6379`` on the others; every node needs this package
and must see the videos and the output folder at the same paths). Without one, a local cluster
is started in a short temporary folder (Ray's unix sockets must fit in 107 bytes), with no
dashboard and a per-process auth token held in the environment rather than written to
``~/.ray``; it is shut down and its folder removed at the end. An already initialized Ray
(``ray.is_initialized()``) is used as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.atomic import write_text_atomic
from features.backbones import BACKBONES, Backbone
from features.extract import (
    _STOP_AFTER_ENV,
    ExtractionSummary,
    _crash,
    _flush,
    _open_writer,
    _write_failed,
    extract,
    extract_videos,
)
from features.manifests import ManifestEntry, load_manifests
from features.ray_session import RaySession
from features.store import FeatureStore, FeatureStoreError, FeatureWriter

PLAN_FORMAT = "vimo-features-shards"
PLAN_VERSION = 1
#: default shards per extraction actor: enough to balance uneven videos, few enough that the
#: per-shard cost (a part file to open, close and merge) stays negligible
SHARDS_PER_WORKER = 4


class ShardFailure(RuntimeError):
    """Some shards could not be finished in this run; their parts are kept for a rerun."""

    def __init__(self, out: Path, problems: list[str]) -> None:
        self.out = out
        self.problems = problems
        super().__init__(f"{out}: {len(problems)} shard(s) not finished (rerun to resume "
                         "them):\n  " + "\n  ".join(problems))


@dataclass
class ShardResult:
    """What one actor did on one shard (returned to the driver)."""

    index: int
    written: int = 0
    skipped: int = 0
    frames: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: CPU time of the actor process during the shard (all its threads)
    cpu_seconds: float = 0.0
    pid: int = 0
    node: str = ""


@dataclass
class RayExtractionSummary(ExtractionSummary):
    """:class:`ExtractionSummary` plus the distribution: workers, shards and merge cost.

    ``seconds`` runs from the first shard dispatched (actors up, backbones loaded) to the
    merged file in place; ``merge_seconds`` is the merge's share of it.
    """

    workers: int = 0
    shards: int = 0
    shards_skipped: int = 0
    merge_seconds: float = 0.0
    startup_seconds: float = 0.0
    shard_results: list[ShardResult] = field(default_factory=list)

    def cpu_seconds_by_worker(self) -> dict[str, float]:
        """CPU seconds per actor process (``node:pid``) over the shards it ran."""
        totals: dict[str, float] = {}
        for r in self.shard_results:
            key = f"{r.node}:{r.pid}"
            totals[key] = totals.get(key, 0.0) + r.cpu_seconds
        return totals


# -- shards and plan ------------------------------------------------------------------------


def plan_shards(entries: Sequence[ManifestEntry], num_shards: int) -> list[list[ManifestEntry]]:
    """Contiguous shards of ``entries`` in order, sizes differing by at most one."""
    if num_shards < 1:
        raise ValueError(f"number of shards must be >= 1, got {num_shards}")
    bounds = np.linspace(0, len(entries), min(num_shards, max(len(entries), 1)) + 1)
    cuts = np.round(bounds).astype(int)
    return [list(entries[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def part_name(index: int, count: int) -> str:
    """File name of shard ``index`` of ``count`` inside the parts folder."""
    return f"shard-{index:05d}-of-{count:05d}.h5"


def _failed_path(part: Path) -> Path:
    return part.with_name(part.name + ".failed.json")


def _complete(part: Path) -> bool:
    """A shard is complete once its part file and its failure list are under final names."""
    return part.exists() and _failed_path(part).exists()


def _plan(parts: Path, settings: dict[str, Any], pending: list[ManifestEntry],
          num_shards: int | None, default_shards: int) -> list[list[ManifestEntry]]:
    """The shard layout: the stored plan when it matches this run, else a new one (stored)."""
    path = parts / "plan.json"
    by_id = {e.video_id: e for e in pending}
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            stored_settings, stored_shards = stored["settings"], stored["shards"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable shard plan ({exc}); delete {parts} or pass "
                             "resume=False (--no-resume)") from None
        for key, value in settings.items():
            if stored_settings.get(key) != value:
                raise ValueError(f"{path}: cannot resume: field '{key}' is "
                                 f"{stored_settings.get(key)!r}, this run uses {value!r} "
                                 f"(delete {parts} or pass --no-resume)")
        ids = [vid for shard in stored_shards for vid in shard]
        if ids != [e.video_id for e in pending]:
            raise ValueError(f"{path}: cannot resume: field 'shards' covers {len(ids)} videos, "
                             f"this run has {len(pending)} to do (the manifest or {parts.parent} "
                             f"changed); delete {parts} or pass --no-resume")
        if num_shards is not None and num_shards != len(stored_shards):
            raise ValueError(f"{path}: cannot resume: field 'shards' has {len(stored_shards)} "
                             f"shards, this run asks for {num_shards} (pass --shards "
                             f"{len(stored_shards)}, or --no-resume)")
        return [[by_id[vid] for vid in shard] for shard in stored_shards]
    shards = plan_shards(pending, num_shards or default_shards)
    shutil.rmtree(parts, ignore_errors=True)  # parts without a plan belong to no layout
    parts.mkdir(parents=True)
    plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "settings": settings,
            "shards": [[e.video_id for e in shard] for shard in shards]}
    write_text_atomic(path, json.dumps(plan, indent=1))
    return shards


# -- one shard (runs inside a Ray actor, or anywhere) ---------------------------------------


def extract_shard(
    net: Backbone,
    part: Path,
    index: int,
    entries: Sequence[ManifestEntry],
    class_names: Sequence[str],
    fps: float,
    batch_size: int,
    dtype: str,
    decode_workers: int = 0,
    stop_after: int = 0,
) -> ShardResult:
    """Extract ``entries`` into the part file ``part`` (resuming its ``.partial``).

    The local engine's per-video loop (:func:`features.extract.extract_videos`). The failure
    list is written (atomically) before the part is renamed to its final name, so a complete
    part always has one.
    ``stop_after`` > 0 is the test hook: hard-exit after writing that many videos.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    result = ShardResult(index=index, pid=os.getpid(), node=socket.gethostname())
    with _open_writer(part, net, list(class_names), fps, True, dtype) as writer:
        pending = [e for e in entries if e.video_id not in writer]
        result.skipped = len(entries) - len(pending)
        for frames, failure in extract_videos(writer, net, pending, fps, batch_size,
                                              decode_workers):
            if failure is not None:
                result.failed.append(failure)
                continue
            result.written += 1
            result.frames += frames
            if stop_after and result.written >= stop_after:
                _crash()
        write_text_atomic(_failed_path(part), json.dumps(result.failed, indent=1))
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    return result


class ShardExtractor:
    """Ray actor body: one backbone, loaded once, extracting the shards it is given."""

    def __init__(self, backbone: str, weights: str | None, device: str, threads: int,
                 settings: dict[str, Any]) -> None:
        import torch

        from features.backbones import build_backbone

        torch.set_num_threads(max(1, int(threads)))
        self.net = build_backbone(backbone, weights, device)
        _ = self.net.macs_per_frame  # measured once, as the local engine does
        self.settings = settings

    def ready(self) -> tuple[str, int, str]:
        """(node, pid, device): returns once the backbone is loaded."""
        return socket.gethostname(), os.getpid(), str(self.net.device)

    def run(self, part: str, index: int, entries: list[ManifestEntry], stop_after: int
            ) -> ShardResult:
        s = self.settings
        return extract_shard(self.net, Path(part), index, entries, s["class_names"], s["fps"],
                             s["batch_size"], s["dtype"], s["decode_workers"], stop_after)


# -- merge ----------------------------------------------------------------------------------

_SAME = ("backbone", "feature_dim", "fps", "gflops_per_frame", "flops_unit", "class_names",
         "storage_dtype")


def merge_parts(target: Path, sources: Sequence[Path], order: Sequence[str]) -> int:
    """Write the videos ``order`` (ids), taken from ``sources``, to ``target`` atomically.

    Each video goes through ``FeatureWriter.add`` and a flush exactly as in the local engine,
    so equal inputs give an identical file. Every source must agree on the attributes, class
    names and dtype. Returns the number of videos written.
    """
    stores = [FeatureStore(p, progress=False) for p in sources]
    try:
        first = stores[0]
        for store in stores[1:]:
            for name in _SAME:
                a, b = getattr(first, name), getattr(store, name)
                if a != b:
                    raise FeatureStoreError(store.path, name.replace("storage_dtype", "features"),
                                            f"{b!r} differs from {a!r} in {first.path}; parts "
                                            "of one output must come from one configuration")
        where = {vid: (store, i) for store in stores for i, vid in enumerate(store.video_ids)}
        missing = [vid for vid in order if vid not in where]
        if missing:
            raise FeatureStoreError(target, "video_ids", f"{len(missing)} video(s) in no part, "
                                    f"e.g. {missing[:3]}")
        writer = FeatureWriter(target, feature_dim=first.feature_dim,
                               class_names=first.class_names, backbone=first.backbone,
                               fps=first.fps, gflops_per_frame=first.gflops_per_frame,
                               flops_unit=first.flops_unit, dtype=str(first.storage_dtype))
        with writer:
            for vid in order:
                store, i = where[vid]
                writer.add(vid, store.video(i), int(store.labels[i]), str(store.splits[i]))
                _flush(writer)
    finally:
        for store in stores:
            store.close()
    return len(order)


# -- driver ---------------------------------------------------------------------------------


def extract_ray(
    manifest: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    fps: float = 1.0,
    device: str = "auto",
    batch_size: int = 8,
    resume: bool = True,
    *,
    kind: str = "auto",
    video_root: str | os.PathLike | None = None,
    dtype: str = "float16",
    progress: bool = True,
    address: str | None = None,
    shards: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    decode_workers: int = 0,
    retries: int = 1,
) -> RayExtractionSummary:
    """Extract every manifest video into one ``vimo-features`` file with Ray actors.

    Arguments as :func:`features.extract.extract`, plus:

    Args:
        address: Ray cluster to join (default: ``RAY_ADDRESS``, else a local cluster).
        shards: number of shards (default: ``SHARDS_PER_WORKER`` per actor, or the stored
            plan's on a rerun).
        workers: extraction actors (default: one per GPU of the cluster, else one per
            ``threads`` CPUs).
        threads: torch threads per actor (default 1; byte-identical output with the local
            engine needs the same count there).
        decode_workers: decode processes per actor (0: decode in the actor, which keeps a
            CPU-only cluster's cores for actors).
        retries: reruns of a shard whose worker process died, in this run.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"{weights}: backbone weights file not found")
    paths = [manifest] if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    entries, class_names = load_manifests(paths, kind, video_root)
    # absolute paths: Ray workers do not share the driver's working directory
    entries = [ManifestEntry(Path(os.path.abspath(e.path)), e.label, e.split, e.video_id)
               for e in entries]
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    local_partial = out.with_name(out.name + ".partial")
    summary = RayExtractionSummary(out=str(out), videos_total=len(entries))
    if not resume:
        shutil.rmtree(parts, ignore_errors=True)
        local_partial.unlink(missing_ok=True)
    elif local_partial.exists():
        raise ValueError(f"{local_partial}: an unfinished local-engine run of this output; "
                         "finish it with --engine local, delete it, or pass --no-resume")
    threads = int(threads or 1)
    # threads and device are in the plan too: parts made with other ones would merge into a
    # file that is byte-identical to no single run
    settings = {"backbone": backbone, "weights": os.path.abspath(weights) if weights else None,
                "fps": float(fps), "dtype": str(np.dtype(dtype)), "class_names": class_names,
                "threads": threads, "device": str(device)}
    done = _existing_ids(out, settings) if resume and out.exists() else []
    if resume and parts.exists():
        _discard_if_merged(parts, set(done))
    pending = [e for e in entries if e.video_id not in set(done)]
    summary.videos_skipped = len(entries) - len(pending)
    if not pending:
        if not done:  # an empty manifest: the local engine writes the (empty) file
            return _local_empty(paths, out, backbone, weights, fps, kind, video_root, dtype)
        _write_failed(out, [])
        return summary

    plan: list[list[ManifestEntry]] | None = None
    if resume and (parts / "plan.json").exists():
        plan = _plan(parts, settings, pending, shards, 1)
    todo = [] if plan is None else _unfinished(parts, plan, summary)
    startup = time.perf_counter()
    if plan is not None and not todo:  # every shard finished before: merge only, no Ray
        start = time.perf_counter()
        _finish(out, parts, plan, pending, done, summary, start)
        return summary

    cpus_per_worker = threads + int(decode_workers)
    with RaySession(address, max(os.cpu_count() or 1, (workers or 1) * cpus_per_worker)):
        import ray

        gpus = float(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus >= 1 and (device == "auto" or device.startswith("cuda"))
        slots = int(gpus) if use_gpu else int(ray.cluster_resources().get("CPU", 1)
                                              // cpus_per_worker)
        if plan is None:
            plan = _plan(parts, settings, pending, shards,
                         max(1, workers or slots) * SHARDS_PER_WORKER)
            todo = _unfinished(parts, plan, summary)
        if workers and slots and workers > slots:
            warnings.warn(f"{workers} workers asked, the cluster has room for {slots} "
                          f"({'1 GPU' if use_gpu else f'{cpus_per_worker} CPU(s)'} each); "
                          f"using {slots}", stacklevel=2)
        num_workers = max(1, min(workers or slots, slots or 1, len(todo)))
        actor_settings = {"class_names": class_names, "fps": float(fps),
                          "batch_size": int(batch_size), "dtype": dtype,
                          "decode_workers": int(decode_workers)}
        options: dict[str, Any] = {"num_cpus": cpus_per_worker, "max_restarts": 0}
        if use_gpu:
            options["num_gpus"] = 1

        remote = ray.remote(ShardExtractor).options(**options)
        # a GPU actor sees its one GPU only (CUDA_VISIBLE_DEVICES), as "cuda"
        actor_device = "cuda" if use_gpu and device.startswith("cuda") else device

        def new_actor() -> Any:
            return remote.remote(backbone, settings["weights"], actor_device, threads,
                                 actor_settings)

        actors = [new_actor() for _ in range(num_workers)]
        ray.get([a.ready.remote() for a in actors])
        summary.workers = num_workers
        summary.startup_seconds = time.perf_counter() - startup
        start = time.perf_counter()
        problems = _run_shards(ray, actors, new_actor, plan, todo, parts, summary, retries,
                               progress, out.name)
        for actor in actors:
            ray.kill(actor)
    if problems:
        summary.seconds = time.perf_counter() - start
        raise ShardFailure(out, problems)
    _finish(out, parts, plan, pending, done, summary, start)
    return summary


def _run_shards(ray: Any, actors: list[Any], new_actor: Any, plan: list[list[ManifestEntry]],
                todo: list[int], parts: Path, summary: RayExtractionSummary, retries: int,
                progress: bool, label: str) -> list[str]:
    """Feed shards to idle actors until all ran; returns the shards left unfinished."""
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    stop_after = int(os.environ.get(_STOP_AFTER_ENV, "0") or 0)
    queue = deque(todo)
    attempts = dict.fromkeys(todo, 0)
    inflight: dict[Any, tuple[int, Any]] = {}
    problems: list[str] = []

    def submit(actor: Any) -> None:
        if queue:
            i = queue.popleft()
            # the hook kills the first shard's first attempt only: a rerun can then finish
            hook = stop_after if i == todo[0] and attempts[i] == 0 else 0
            attempts[i] += 1
            ref = actor.run.remote(str(parts / part_name(i, len(plan))), i, plan[i], hook)
            inflight[ref] = (i, actor)

    for actor in actors:
        submit(actor)
    with tqdm(total=len(todo), unit="shard", desc=f"extract {label}", disable=not progress,
              dynamic_ncols=True) as bar:
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, actor = inflight.pop(ref)
            try:
                result: ShardResult = ray.get(ref)
            except RayActorError as exc:  # the worker process died (killed, OOM, node lost)
                actors.remove(actor)
                if attempts[i] <= retries:
                    warnings.warn(f"{part_name(i, len(plan))}: worker died; retrying the "
                                  f"shard (attempt {attempts[i] + 1})", stacklevel=2)
                    queue.appendleft(i)
                else:
                    problems.append(f"{part_name(i, len(plan))}: worker died "
                                    f"({_first_line(exc)})")
                    bar.update(1)
                if not queue:
                    continue
                actor = new_actor()  # a fresh process takes the dead one's place
                actors.append(actor)
            except RayTaskError as exc:  # an error raised by the shard's own code
                problems.append(f"{part_name(i, len(plan))}: {_first_line(exc.cause or exc)}")
                bar.update(1)
            else:
                summary.shard_results.append(result)
                summary.videos_written += result.written
                summary.videos_skipped += result.skipped
                summary.frames += result.frames
                bar.update(1)
                bar.set_postfix(videos=summary.videos_written, frames=summary.frames)
            submit(actor)
    return problems


def _unfinished(parts: Path, plan: list[list[ManifestEntry]],
                summary: RayExtractionSummary) -> list[int]:
    """Indices of the shards still to run; complete shards' videos count as skipped."""
    todo = []
    for i in range(len(plan)):
        part = parts / part_name(i, len(plan))
        if _complete(part):
            summary.videos_skipped += len(_ids_in(part))
        else:
            todo.append(i)
    summary.shards, summary.shards_skipped = len(plan), len(plan) - len(todo)
    return todo


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _finish(out: Path, parts: Path, plan: list[list[ManifestEntry]],
            pending: list[ManifestEntry], done: list[str], summary: RayExtractionSummary,
            start: float) -> None:
    """Merge the complete parts (and ``out``'s videos) onto ``out``; list the failures."""
    count = len(plan)
    part_files = [parts / part_name(i, count) for i in range(count)]
    failed: list[dict[str, str]] = []
    for part in part_files:
        failed.extend(json.loads(_failed_path(part).read_text(encoding="utf-8")))
    failed_ids = {f["video_id"] for f in failed}
    new = [e.video_id for e in pending if e.video_id not in failed_ids]
    merge_start = time.perf_counter()
    # nothing new (only failures again): a finished file stays as it was; with no file yet
    # (every video failed) an empty one is written, as the local engine does
    if new or not out.exists():
        merged = parts / "merged.h5"
        sources = ([out] if done else []) + part_files
        merge_parts(merged, sources, done + new)
        os.replace(merged, out)
    _write_failed(out, failed)
    shutil.rmtree(parts, ignore_errors=True)
    summary.failed = failed
    summary.merge_seconds = time.perf_counter() - merge_start
    summary.seconds = time.perf_counter() - start


def _ids_in(path: Path) -> list[str]:
    with FeatureStore(path, progress=False) as store:
        return list(store.video_ids)


def _existing_ids(out: Path, settings: dict[str, Any]) -> list[str]:
    """Video ids of a finished ``out`` this run extends; refused (before any work) when it
    was made with another backbone, fps, dtype or class list."""
    with FeatureStore(out, progress=False) as store:
        found = {"backbone": store.backbone, "fps": store.fps,
                 "dtype": str(store.storage_dtype), "class_names": store.class_names}
        for key, value in found.items():
            if value != settings[key]:
                field = {"dtype": "features"}.get(key, key)
                raise ValueError(f"{out}: cannot resume: field '{field}' is {value!r}, this run "
                                 f"uses {settings[key]!r} (delete the file or pass --no-resume)")
        return list(store.video_ids)


def _discard_if_merged(parts: Path, done: set[str]) -> None:
    """Remove a parts folder a previous run already merged (it stopped before removing it):
    every video of its complete parts is in ``out`` already."""
    part_files = sorted(parts.glob("shard-*.h5"))
    if not part_files or not done or any(not _complete(p) for p in part_files):
        return
    if all(set(_ids_in(p)) <= done for p in part_files):
        shutil.rmtree(parts, ignore_errors=True)


def _local_empty(paths: list, out: Path, backbone: str, weights: Any, fps: float, kind: str,
                 video_root: Any, dtype: str) -> RayExtractionSummary:
    local = extract(paths, out, backbone=backbone, weights=weights, fps=fps, device="cpu",
                    workers=0, kind=kind, video_root=video_root, dtype=dtype, progress=False)
    return RayExtractionSummary(out=local.out, videos_total=0)
