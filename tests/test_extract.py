"""Extraction CLI: output format, failures listed, resume after a crash equals a clean run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.extract import extract
from features.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(extract_clips):
    return extract_clips


def _cli(dataset: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "features.extract", "--manifest", str(dataset / "manifest.csv"),
         "--out", str(out), "--device", "cpu", "--workers", "1", "--threads", "1", "--quiet"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True, text=True, timeout=240,
    )


def test_extract_writes_store_and_lists_failures(dataset, tmp_path):
    out = tmp_path / "clean.h5"
    summary = extract(dataset / "manifest.csv", out, device="cpu", workers=0, progress=False)
    assert summary.videos_written == 5 and len(summary.failed) == 1
    assert "broken.mp4" in summary.failed[0]["error"]
    failed = json.loads((tmp_path / "clean.h5.failed.json").read_text())
    assert failed[0]["video_id"] == "videos/broken"
    with FeatureStore(out) as store:
        assert store.video_ids == [f"videos/v{i}" for i in range(5)]  # manifest order
        assert store.lengths.tolist() == [2, 3, 4, 2, 3]  # 1 fps over 2-4 s clips
        assert store.labels.tolist() == [0, 1, 0, 1, 0] and store.class_names == ["a", "b"]
        assert store.splits.tolist() == ["train"] * 4 + ["val"]
        assert store.feature_dim == 1280 and store.backbone == "efficientnet_lite0"
        assert store.flops_unit == "MACs" and store.gflops_per_frame == pytest.approx(0.385, 0.03)
        assert store.fps == 1.0
        assert np.abs(store.video(0)).sum() > 0


def test_resume_after_a_crash_matches_a_clean_run(dataset, tmp_path):
    clean = tmp_path / "clean.h5"
    assert _cli(dataset, clean).returncode == 0
    out = tmp_path / "resumed.h5"
    crashed = _cli(dataset, out, env={"VIMO_EXTRACT_STOP_AFTER": "2"})
    assert crashed.returncode == 3, crashed.stderr
    assert not out.exists() and (tmp_path / "resumed.h5.partial").exists()
    rerun = _cli(dataset, out)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 videos written, 2 already done, 1 failed" in rerun.stdout
    assert "broken.mp4" in rerun.stderr
    again = _cli(dataset, out)  # a finished file: nothing to redo, nothing lost
    assert "0 videos written, 5 already done" in again.stdout
    with FeatureStore(clean) as a, FeatureStore(out) as b:
        assert b.video_ids == a.video_ids and len(set(b.video_ids)) == 5
        for i in range(len(a)):
            np.testing.assert_array_equal(a.video(i), b.video(i))
        assert b.labels.tolist() == a.labels.tolist()
