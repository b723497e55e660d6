"""ViMo Table 7 in live mode: latency (batch 1) and throughput (batch 32) on PhotoUnits MP4s.

    python benchmarks/live_latency.py [--data-dir data] [--preset default] [--manifest CSV]
        [--run-dir DIR | --recognizer PT --actor PT] [--batch 32] [--repeats 2]
        [--device auto] [--out FILE.json]

Every policy runs straight on the video files through ``features.live.LiveFrameSource``: each
video's frames are decoded and passed through EfficientNet-Lite0 when (and only when) the
policy looks at them; caches are dropped before every measured pass, so nothing is reused
between passes. Policies:

* ``adaptive`` - the learned CTDE-SAC locators in the batched env core (``--actor``, or the
  latest Stage III round of a ``run_marl.py`` output ``--run-dir``: ``sac/best.pt``, or
  ``sac/checkpoint.pt`` in runs made without val selection).
  Without a checkpoint it falls back to ``heuristic``: a fixed *move-until-confident* rule
  (every alive locator moves one stride until the recognizer's top class probability reaches
  ``--confidence``), labelled as such in the table.
* ``all`` - every frame of the video (decode all, extract all, recognizer over all).
* ``uniform-25`` - 25% of each locator's segment, evenly spaced (``agents.selection``).

Latency = mean wall time per video at batch 1 (decode + extract + recognizer + policy);
throughput = videos per second with ``--batch`` videos processed together (one backbone call
per env step across the batch; rows beyond the number of MP4 files reuse files, each row with
its own cache). One untimed video warms up first. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.selection import select_frames  # noqa: E402
from agents.trainer import final_checkpoints  # noqa: E402
from features.atomic import write_text_atomic  # noqa: E402
from features.live import LiveFrameSource  # noqa: E402
from features.manifests import load_manifest  # noqa: E402
from vimo_env.core import LocatorCore  # noqa: E402
from vimo_env.recognizer import Recognizer, RecognizerConfig  # noqa: E402


def load_actor(path: str | os.PathLike, device: torch.device) -> torch.nn.Module:
    """The locators' actor network from a CTDE-SAC checkpoint (shapes read from the weights)."""
    from agents.ctde_nets import LocatorActors

    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != "vimo-ctde-sac":
        raise ValueError(f"{path}: field 'format' is not 'vimo-ctde-sac'")
    prefix = "policy.actor."
    weights = {k[len(prefix):]: v for k, v in state["algorithm"].items() if k.startswith(prefix)}
    layers = sorted({int(k.split(".")[1]) for k in weights if k.endswith("weight")})
    shapes = [weights[f"net.{i}.weight"].shape for i in layers]
    shared = len(shapes[0]) == 2  # nn.Linear [out, in]; ensemble layers are [N, in, out]
    if shared:
        raise ValueError(f"{path}: shared actors need num_locators; not supported here")
    num_locators, obs_dim = int(shapes[0][0]), int(shapes[0][1])
    hidden = tuple(int(s[2]) for s in shapes[:-1])
    actor = LocatorActors(obs_dim, num_locators, hidden, shared=False)
    actor.load_state_dict(weights)
    return actor.to(device).eval()


class Runner:
    """Runs one policy over a set of rows of a live source and times it."""

    def __init__(self, source: LiveFrameSource, recognizer: Recognizer, actor, args) -> None:
        self.source, self.recognizer, self.actor, self.args = source, recognizer, actor, args
        self.device = source.device
        self.N = recognizer.config.num_locators

    def run(self, policy: str, rows: np.ndarray) -> tuple[np.ndarray, int]:
        """Predictions for ``rows`` (video indices) and the frames the policy observed."""
        videos = torch.as_tensor(rows, device=self.device)
        self.source.begin_episodes(videos)
        if policy in ("adaptive", "heuristic"):
            return self._locators(videos)
        frame_index, mask = select_frames(self.source.lengths[rows], self.N, policy)
        idx = torch.as_tensor(frame_index, device=self.device)
        m = torch.as_tensor(mask, device=self.device)
        B, N, L = frame_index.shape
        flat_v = videos.view(B, 1, 1).expand(B, N, L)[m]
        feats = torch.zeros(B, N, L, self.source.feature_dim, device=self.device)
        feats[m] = self.source.gather(flat_v, idx[m])
        with torch.no_grad():
            logits = self.recognizer(feats, m)
        return logits.argmax(1).cpu().numpy(), int(mask.sum())

    def _locators(self, videos: torch.Tensor) -> tuple[np.ndarray, int]:
        core = LocatorCore(self.source, self.recognizer, num_locators=self.N,
                           max_moves=self.args.max_moves, stride=self.args.stride,
                           compute_rewards=False, device=self.device)
        obs = core.reset(videos)
        alive = obs.alive
        with torch.no_grad():
            while True:
                if self.actor is not None:
                    actions = self.actor(core.observation).argmax(-1)
                else:  # move one stride while the recognizer is not yet confident
                    confident = self.recognizer.probs(core.state).max(1).values
                    actions = (confident < self.args.confidence).long().unsqueeze(1)
                    actions = actions.expand(-1, self.N)
                out = core.step(torch.where(alive, actions, torch.zeros_like(actions)))
                alive = out.alive
                if bool(out.done.all()):
                    break
        frames = int(core.frames_observed.sum())
        predictions = self.recognizer.probs(core.state).argmax(1).cpu()
        return predictions.numpy(), frames


def measure(runner: Runner, policy: str, rows_list: list[np.ndarray], repeats: int) -> dict:
    """Mean seconds per call over ``repeats`` passes of ``rows_list`` (after a warm-up pass)."""
    source = runner.source
    runner.run(policy, rows_list[0][:1])  # warm-up (model, page cache, allocator); untimed
    source.reset_counters()
    calls, frames, start = 0, 0, time.perf_counter()
    for _ in range(repeats):
        for rows in rows_list:
            _, f = runner.run(policy, rows)
            calls += 1
            frames += f
    seconds = time.perf_counter() - start
    videos = calls * len(rows_list[0])
    return {"seconds": seconds, "calls": calls, "videos": videos,
            "frames_observed_per_video": frames / videos,
            "frames_decoded": source.frames_decoded, "frames_extracted": source.frames_extracted,
            "codec_frames": source.codec_frames, "decode_s": source.decode_seconds,
            "extract_s": source.extract_seconds}


def photounits_manifest(data_dir: str | os.PathLike, preset: str) -> Path:
    """The MP4 manifest of a PhotoUnits build: ``data_dir`` is one build folder, or the cache
    of builds (run_marl's ``--data-dir``) where the ``preset`` build is made if missing."""
    from features.photounits import MANIFEST_FILE, MP4_DIR, ensure_dataset

    build = Path(data_dir)
    if not (build / MP4_DIR / MANIFEST_FILE).is_file():
        build = ensure_dataset(data_dir, preset).parent
    return build / MP4_DIR / MANIFEST_FILE


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data",
                        help="PhotoUnits: the cache run_marl's --data-dir names (the "
                             "--preset build is made there if missing) or one build folder "
                             "in it; or give --manifest")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--manifest", default=None, help="MP4 manifest (default: PhotoUnits')")
    parser.add_argument("--run-dir", default=None, help="run_marl.py output with Stage III")
    parser.add_argument("--recognizer", default=None, help="recognizer checkpoint")
    parser.add_argument("--actor", default=None, help="CTDE-SAC checkpoint (actor)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-moves", type=int, default=4)
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--policies", default="adaptive,all,uniform-25")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.manifest is None:
        args.manifest = str(photounits_manifest(args.data_dir, args.preset))
    entries, class_names = load_manifest(args.manifest)
    if args.run_dir:
        args.recognizer, args.actor = map(str, final_checkpoints(Path(args.run_dir)))
    # batch rows: the MP4 files, repeated to fill the batch (each row its own cache)
    rows = [entries[i % len(entries)] for i in range(max(args.batch, len(entries)))]
    source = LiveFrameSource(rows, split=None, class_names=class_names, device=args.device)
    if args.recognizer:
        recognizer = Recognizer.load(args.recognizer, map_location=source.device)
        label = "adaptive"
    else:
        torch.manual_seed(0)
        recognizer = Recognizer(RecognizerConfig(feature_dim=source.feature_dim,
                                                 num_classes=len(class_names), num_locators=3))
        label = "heuristic"
    recognizer = recognizer.to(source.device).eval()
    actor = load_actor(args.actor, source.device) if args.actor else None
    if actor is None:
        label = "heuristic (move-until-confident" + ("" if args.recognizer else
                                                      ", untrained recognizer") + ")"
    runner = Runner(source, recognizer, actor, args)
    n_files = len(entries)
    single = [np.array([i]) for i in range(n_files)]
    batched = [np.arange(args.batch)]
    results = {"device": str(source.device), "manifest": args.manifest, "videos": n_files,
               "mean_length": float(source.lengths[:n_files].mean()), "policies": []}
    print(f"{n_files} MP4 videos, mean {results['mean_length']:.1f} frames at 1 fps; device "
          f"{source.device}; torch threads {torch.get_num_threads()}")
    for policy in args.policies.split(","):
        kind = policy if policy != "adaptive" else ("adaptive" if actor else "heuristic")
        lat = measure(runner, kind, single, args.repeats)
        thr = measure(runner, kind, batched, args.repeats)
        row = {"policy": label if policy == "adaptive" else policy,
               "frames_per_video": lat["frames_observed_per_video"],
               "latency_ms": 1000 * lat["seconds"] / lat["videos"],
               "throughput_videos_per_s": thr["videos"] / thr["seconds"],
               "gflops_per_video_backbone": lat["frames_extracted"] / lat["videos"]
               * source.gflops_per_frame,
               "batch1": lat, f"batch{args.batch}": thr}
        results["policies"].append(row)
        print(f"  {row['policy']:<48} frames/video {row['frames_per_video']:6.1f}  latency "
              f"{row['latency_ms']:8.1f} ms  throughput {row['throughput_videos_per_s']:7.2f} "
              f"videos/s  (extracted {lat['frames_extracted']}, decoded {lat['frames_decoded']}"
              f", codec {lat['codec_frames']})", flush=True)
    by = {r["policy"]: r for r in results["policies"]}
    if "all" in by and results["policies"][0]["policy"] != "all":
        first = results["policies"][0]
        ratio = first["latency_ms"] / by["all"]["latency_ms"]
        results["latency_ratio_vs_all"] = ratio
        print(f"latency {first['policy']} / all = {ratio:.3f}")
    print("GMACs per frame (Lite0):", round(source.gflops_per_frame, 4))
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
