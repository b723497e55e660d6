"""Synthetic dataset generator: determinism, structure, CLI."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from features.store import FeatureStore
from features.synthetic import PRESETS, SyntheticConfig, SyntheticWorld, frame_units, generate

ROOT = Path(__file__).resolve().parents[1]
SMALL = replace(PRESETS["tiny"], num_videos=30)


def _contents(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        out.update({f"attr:{k}": f.attrs[k] for k in f.attrs})
        for name in f:
            out[name] = f[name][:]
    return out


def test_same_seed_same_bytes(tmp_path):
    a = generate(SMALL, tmp_path / "a.h5", seed=3, progress=False)
    b = generate(SMALL, tmp_path / "b.h5", seed=3, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert not (tmp_path / "a.h5.partial").exists()


def test_different_seed_differs(tmp_path):
    a = _contents(generate(SMALL, tmp_path / "a.h5", seed=0, progress=False))
    b = _contents(generate(SMALL, tmp_path / "b.h5", seed=1, progress=False))
    assert not np.array_equal(a["offsets"], b["offsets"]) or not np.array_equal(
        a["features"], b["features"])
    assert a["features"].shape[1] == b["features"].shape[1] == SMALL.feature_dim


def test_tiny_fixture_is_a_valid_store(tiny_dataset):
    config = PRESETS["tiny"]
    with FeatureStore(tiny_dataset) as store:
        assert len(store) == config.num_videos
        assert store.feature_dim == config.feature_dim
        assert store.backbone == "synthetic" and store.flops_unit == "MACs"
        assert store.gflops_per_frame == pytest.approx(4.09)
        lo, hi = config.length
        assert store.lengths.min() >= lo and store.lengths.max() <= hi
        assert len(set(store.lengths.tolist())) > 5  # variable length
        assert np.bincount(store.labels, minlength=6).min() == config.num_videos // 6
        assert set(store.splits) == {"train", "val", "test"}
        x = store.video(0)
        assert x.shape == (store.lengths[0], config.feature_dim) and np.isfinite(x).all()


def test_class_structure_overlaps():
    for name in ("tiny", "default", "large"):
        config = PRESETS[name]
        world = SyntheticWorld(config, seed=0)
        units = world.class_units
        assert units.shape == (config.num_classes, config.units_per_class)
        assert all(len(set(row)) == config.units_per_class for row in units.tolist())
        # every unit type belongs to >= 2 classes: no single unit identifies a class
        counts = np.bincount(units.ravel(), minlength=config.vocabulary)
        assert counts.min() >= 2, name
        # any two distinct units of a class identify it: no pair shared by two classes
        pairs = [p for row in units.tolist() for p in itertools.combinations(sorted(row), 2)]
        assert len(pairs) == len(set(pairs)), name


def test_units_are_contiguous_spans_of_the_class():
    config = PRESETS["tiny"]
    world = SyntheticWorld(config, seed=0)
    lengths, on_unit = [], []
    for v in range(40):
        x, units, label, _ = world.video(v)
        assert len(units) == len(x)
        present = set(units[units >= 0].tolist())
        assert present <= set(world.class_units[label].tolist())
        on_unit.append(np.mean(units >= 0))
        # runs of one unit type: none longer than the maximum unit length
        change = np.flatnonzero(np.diff(np.r_[-2, units, -2]) != 0)
        runs = np.diff(change)
        values = units[change[:-1]]
        lengths += runs[values >= 0].tolist()
    assert max(lengths) <= config.unit_length[1]
    assert 0.2 < np.mean(on_unit) < 0.8  # units and background both common


def test_frames_within_a_unit_are_alike():
    config = replace(PRESETS["tiny"], feature_dim=64, noise_frame_prob=0.0)
    world = SyntheticWorld(config, seed=0)
    same, different = [], []
    for v in range(6):
        x, units, _, _ = world.video(v)
        for t in range(len(x) - 1):
            if units[t] == units[t + 1] >= 0:  # consecutive frames of one unit instance
                same.append(np.linalg.norm(x[t] - x[t + 1]))
        on = np.flatnonzero(units >= 0)
        a, b = on[:, None], on[None, :]
        pick = units[a] != units[b]
        different += np.linalg.norm(x[a] - x[b], axis=-1)[pick].tolist()
    assert len(same) > 20 and len(different) > 20
    assert np.mean(same) < 0.8 * np.mean(different)


def test_frame_units_matches_generation(tiny_dataset):
    with FeatureStore(tiny_dataset) as store:
        ann = frame_units("tiny", 0, store.video_ids[:5])
        assert [len(a) for a in ann] == store.lengths[:5].tolist()


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="units_per_class"):
        SyntheticConfig(units_per_class=1)
    with pytest.raises(ValueError, match="vocabulary"):
        SyntheticConfig(num_classes=20, units_per_class=3, vocabulary=40)  # units in < 2 classes
    with pytest.raises(ValueError, match="length"):
        SyntheticConfig(length=(50, 10))
    with pytest.raises(ValueError, match="preset"):
        generate("huge", "x.h5")


def test_cli(tmp_path):
    out = tmp_path / "cli.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "features.synthetic", "--preset", "tiny", "--out", str(out),
         "--seed", "5", "--num-videos", "12", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with FeatureStore(out) as store:
        assert len(store) == 12
    ref = generate(replace(PRESETS["tiny"], num_videos=12), tmp_path / "ref.h5", seed=5,
                   progress=False)
    assert out.read_bytes() == ref.read_bytes()


def test_ensure_dataset_caches_under_a_config_key(tmp_path):
    from features.synthetic import dataset_path, ensure_dataset

    first = ensure_dataset(tmp_path, "tiny", seed=0, progress=False)
    stamp = first.stat().st_mtime_ns
    assert ensure_dataset(tmp_path, "tiny", seed=0, progress=False) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert first == dataset_path(tmp_path, "tiny", 0)
    # another seed, preset or config is another file: a stale cache is never reused
    assert dataset_path(tmp_path, "tiny", 1) != first
    assert dataset_path(tmp_path, "default", 0) != first
    changed = replace(PRESETS["tiny"], noise=PRESETS["tiny"].noise + 0.1)
    assert dataset_path(tmp_path, changed, 0) != dataset_path(tmp_path, PRESETS["tiny"], 0)
