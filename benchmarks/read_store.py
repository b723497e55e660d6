"""Read speed and memory of the ``vimo-features`` store on the ``large`` synthetic preset.

Prints and saves (JSON) the figures the feature store promises:

* opening the file (validating its whole index) in < 1 s;
* random access to single videos from a warm file at >= 5,000 videos/s;
* resident memory below 1 GB while iterating every video;

and, for reference, the validate() scan rate and FeatureWriter's write rate.

The dataset is generated with ``features.synthetic`` (in a subprocess, so that its memory does
not count here) when the file is missing, and cached under ``data/``.

Usage::

    python benchmarks/read_store.py [--file FILE.h5] [--reads 20000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.store import FeatureStore, FeatureWriter  # noqa: E402
from features.synthetic import dataset_path  # noqa: E402


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def ensure_dataset(path: Path | None, preset: str, seed: int) -> Path:
    """``path``, or the cached synthetic preset (generated in a subprocess when missing)."""
    path = path if path is not None else dataset_path(ROOT / "data", preset, seed)
    if path.exists():
        return path
    print(f"{path} missing: generating the '{preset}' preset (resumable) ...", flush=True)
    subprocess.run([sys.executable, "-m", "features.synthetic", "--preset", preset, "--out",
                    str(path), "--seed", str(seed), "--resume"], check=True, cwd=ROOT)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=None,
                        help="a vimo-features file (default: the cached synthetic preset)")
    parser.add_argument("--preset", default="large",
                        help="preset to generate when --file is missing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reads", type=int, default=20_000, help="random single-video reads")
    parser.add_argument("--write-videos", type=int, default=5000,
                        help="videos written to a temporary file to time FeatureWriter")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: results/read_store.json)")
    args = parser.parse_args()
    out = args.out or ROOT / "results" / "read_store.json"
    args.file = ensure_dataset(args.file, args.preset, args.seed)
    results: dict = {"file": str(args.file), "file_bytes": args.file.stat().st_size,
                     "python": platform.python_version(), "machine": platform.machine()}

    # Opening: validates attributes and the whole index (ids, labels, splits, offsets).
    open_times = []
    for _ in range(5):
        start = time.perf_counter()
        store = FeatureStore(args.file, progress=False)
        open_times.append(time.perf_counter() - start)
        if _ < 4:
            store.close()
    results |= {"videos": len(store), "frames": store.num_frames, "feature_dim": store.feature_dim,
                "storage_dtype": str(store.storage_dtype),
                "chunk_rows": store._index.features.chunks[0],
                "open_s_first": open_times[0], "open_s_median": statistics.median(open_times)}
    print(f"{args.file}: {len(store):,} videos, {store.num_frames:,} frames, D={store.feature_dim},"
          f" {store.storage_dtype}, {results['file_bytes'] / 2**30:.2f} GiB")
    print(f"open + validate index: first {open_times[0] * 1e3:.0f} ms, "
          f"median {results['open_s_median'] * 1e3:.0f} ms")

    # Full NaN/Inf scan; also brings the file into the page cache ("warm file").
    start = time.perf_counter()
    store.validate()
    scan_s = time.perf_counter() - start
    results |= {"validate_s": scan_s, "validate_rows_per_s": store.num_frames / scan_s}
    print(f"validate() full scan: {scan_s:.1f} s ({store.num_frames / scan_s / 1e6:.1f} M rows/s)")

    # Random single-video access, warm file.
    rng = np.random.default_rng(args.seed)
    order = rng.integers(0, len(store), size=args.reads).tolist()
    for i in order[:1000]:  # warm-up of the code path
        store.video(i)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for i in order:
            store.video(i)
        rates.append(args.reads / (time.perf_counter() - start))
    rate = statistics.median(rates)
    mean_len = float(store.lengths.mean())
    results |= {"random_reads": args.reads, "random_videos_per_s": rate,
                "random_videos_per_s_runs": rates, "random_us_per_video": 1e6 / rate,
                "mean_frames_per_video": mean_len}
    print(f"random single-video reads: {rate:,.0f} videos/s ({1e6 / rate:.0f} us/video, "
          f"{mean_len:.0f} frames each; runs {', '.join(f'{r:,.0f}' for r in rates)})")

    # Memory while iterating every video.
    peak_reset = reset_peak_rss()
    rss_before = proc_status_kib("VmRSS")
    max_sampled = rss_before
    start = time.perf_counter()
    for i, _video in enumerate(store):
        if i % 1000 == 0:
            max_sampled = max(max_sampled, proc_status_kib("VmRSS"))
    iterate_s = time.perf_counter() - start
    peak = proc_status_kib("VmHWM") if peak_reset else max_sampled
    results |= {"iterate_s": iterate_s, "iterate_videos_per_s": len(store) / iterate_s,
                "rss_before_iterating_mib": rss_before / 1024,
                "rss_peak_iterating_mib": peak / 1024, "rss_peak_is_exact": peak_reset}
    print(f"iterate all videos: {iterate_s:.1f} s ({len(store) / iterate_s:,.0f} videos/s); "
          f"RSS {rss_before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB "
          f"({'VmHWM' if peak_reset else 'sampled VmRSS'})")
    # One split (interleaved with the others in the file) read as one float32 array, as
    # CachedFrameSource does; measured after the memory figure, which it would dominate.
    val = store.select(split="val")
    start = time.perf_counter()
    flat = val.read_all()
    read_all_s = time.perf_counter() - start
    results |= {"read_all_val_videos": len(val), "read_all_val_rows": len(flat),
                "read_all_val_s": read_all_s, "read_all_val_rows_per_s": len(flat) / read_all_s}
    print(f"read_all() of split 'val' ({len(val):,} videos, {len(flat):,} rows, "
          f"{flat.nbytes / 2**20:.0f} MiB float32): {read_all_s:.1f} s "
          f"({len(flat) / read_all_s / 1e6:.1f} M rows/s)")
    del flat
    store.close()

    # Writing: FeatureWriter throughput with a commit after every video and every 32 videos.
    rng = np.random.default_rng(args.seed)
    sample = [rng.standard_normal((int(n), results["feature_dim"])).astype(np.float16)
              for n in rng.integers(60, 181, size=args.write_videos)]
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        for flush_every in (1, 32):
            start = time.perf_counter()
            with FeatureWriter(Path(tmp) / f"w{flush_every}.h5",
                               feature_dim=results["feature_dim"], class_names=["a", "b"],
                               backbone="benchmark", flush_every=flush_every) as writer:
                for v, rows in enumerate(sample):
                    writer.add(f"v{v}", rows, v % 2, "train")
            write_rate = len(sample) / (time.perf_counter() - start)
            results[f"write_videos_per_s_flush_every_{flush_every}"] = write_rate
            print(f"write {len(sample):,} videos (flush_every={flush_every}): "
                  f"{write_rate:,.0f} videos/s")

    targets = {"open_below_1s": results["open_s_median"] < 1.0,
               "random_at_least_5000_per_s": rate >= 5000,
               "rss_below_1gb": peak * 1024 < 1e9}
    results["targets_met"] = targets
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("targets:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items()))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
