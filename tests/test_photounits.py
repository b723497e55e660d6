"""PhotoUnits: deterministic tiny builds, class/unit structure, bank-based features, MP4s whose
decoded frames are the dataset's frames, dataset card with licenses, cached builds."""

from __future__ import annotations

import itertools
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from features.photounits import (
    CARD_FILE,
    PHOTOS,
    PRESETS,
    PhotoUnitsConfig,
    PhotoUnitsWorld,
    build,
    build_glance,
    ensure_dataset,
    load_photo,
)
from features.store import FeatureStore

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory):
    return build(tmp_path_factory.mktemp("pu") / "a", "tiny", seed=0, device="cpu",
                 progress=False)


def _arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("features", "offsets", "labels", "splits", "video_ids",
                                      "class_names")}


def test_builds_deterministically(tiny_build, tmp_path) -> None:
    again = build(tmp_path / "b", "tiny", seed=0, device="cpu", progress=False)
    a, b = _arrays(tiny_build), _arrays(again)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the MP4 manifests name the same videos; another seed gives another dataset
    assert ((tiny_build.parent / "mp4/manifest.csv").read_text()
            == (again.parent / "mp4/manifest.csv").read_text())
    assert PRESETS["tiny"].key(0) != PRESETS["tiny"].key(1)


def test_file_is_a_valid_feature_store(tiny_build) -> None:
    store = FeatureStore(tiny_build, split=None)
    assert store.feature_dim == 1280 and store.backbone == "efficientnet_lite0"
    assert store.flops_unit == "MACs" and 0.3 < store.gflops_per_frame < 0.5
    assert len(store.lengths) == TINY.num_videos
    assert store.lengths.min() >= TINY.length[0] and store.lengths.max() <= TINY.length[1]
    assert sorted(set(store.labels.tolist())) == list(range(TINY.num_classes))
    assert set(store.split_counts()) <= {"train", "val", "test"}


def test_class_structure_follows_the_synthetic_rules(tiny_build) -> None:
    world = PhotoUnitsWorld(TINY, 0)
    units = world.class_units
    counts = np.bincount(units.ravel(), minlength=TINY.vocabulary)
    assert counts.min() >= 2  # no unit identifies a class on its own
    pairs = [tuple(p) for c in units for p in itertools.combinations(sorted(c), 2)]
    assert len(pairs) == len(set(pairs))  # any two units of a class identify it
    bank = np.load(tiny_build.parent / "bank.npz")["features"]
    store = FeatureStore(tiny_build, split=None)
    for v in range(6):
        plan = world.plan(v)
        assert plan.label == store.labels[v] and plan.split == store.splits[v]
        on_unit = plan.unit >= 0
        assert set(plan.unit[on_unit].tolist()) <= set(units[plan.label].tolist())
        assert np.array_equal(plan.photo[on_unit], plan.unit[on_unit])  # units film unit photos
        assert (plan.photo[~on_unit] >= TINY.vocabulary).all()  # background: textures/noise
        np.testing.assert_array_equal(np.asarray(store.video(v), np.float16),
                                      bank[plan.photo, plan.shot, plan.frame])


def test_mp4_frames_are_the_dataset_frames(tiny_build) -> None:
    from features.live import LiveFrameSource

    manifest = tiny_build.parent / "mp4" / "manifest.csv"
    live = LiveFrameSource(manifest, split="test", device="cpu")
    store = FeatureStore(tiny_build, split=None)
    index = {vid: i for i, vid in enumerate(store.video_ids)}
    assert len(live.video_ids) == TINY.mp4_videos
    for v, vid in enumerate(live.video_ids):
        row = index[vid]
        assert live.lengths[v] == store.lengths[row]
        assert live.class_names[live.labels[v]] == store.class_names[store.labels[row]]
    # a handful of frames: decoded MP4 features match the bank features of the same frames
    frames = torch.tensor([0, 3, 7, 11])
    got = torch.nn.functional.normalize(live.gather(torch.zeros(4, dtype=torch.long), frames))
    ref = np.asarray(store.video(index[live.video_ids[0]]), np.float32)
    ref = torch.nn.functional.normalize(torch.as_tensor(ref))
    sim = got @ ref.T  # [4, T]
    matched = sim[torch.arange(4), frames]
    assert matched.min() > 0.9  # compression changes little
    assert live.frames_extracted == 4


def test_glance_file_is_the_same_frames_at_112_px(tiny_build) -> None:
    """The peers' glance: the same videos, lengths, labels and splits as the focus file (a
    valid pair), seen by Lite0 at 112 px with its own measured cost; close to the focus
    features (same frames) but not equal; built once."""
    from features.pairs import FeaturePair

    glance = build_glance(tiny_build.parent, "tiny", 0, device="cpu", progress=False)
    pair = FeaturePair(glance, tiny_build)
    assert pair.glance_backbone == "efficientnet_lite0@112" and pair.glance_dim == 1280
    assert 0.2 < pair.glance_cost / pair.focus_cost < 0.3  # (112/224)^2 plus the head
    g, f = _arrays(glance), _arrays(tiny_build)
    for key in ("offsets", "labels", "splits", "video_ids", "class_names"):
        np.testing.assert_array_equal(g[key], f[key], err_msg=key)
    gx, fx = g["features"].astype(np.float32), f["features"].astype(np.float32)
    assert not np.allclose(gx, fx)


    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
                     .mean())

    # the same frame at two resolutions is far closer than two different frames
    other = np.random.default_rng(0).permutation(len(fx))
    assert cosine(gx, fx) > 2 * cosine(gx, fx[other])
    stamp = glance.stat().st_mtime_ns
    assert build_glance(tiny_build.parent, "tiny", 0, device="cpu", progress=False) == glance
    assert glance.stat().st_mtime_ns == stamp  # cached
    with pytest.raises(ValueError, match="needs the focus build of the same preset and seed"):
        build_glance(tiny_build.parent, "tiny", 1, device="cpu", progress=False)


def test_dataset_card_lists_every_photo_and_license(tiny_build) -> None:
    card = (tiny_build.parent / CARD_FILE).read_text()
    for name in (*TINY.units, *TINY.textures):
        assert f"| {name} |" in card and PHOTOS[name].license in card
    assert TINY.key(0) in card


def test_all_photos_load_offline() -> None:
    for name in PHOTOS:
        image = load_photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) >= 100, name


def test_ensure_dataset_caches_by_config(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(PRESETS, "tiny_nomp4", replace(TINY, mp4_videos=0, num_videos=8))
    first = ensure_dataset(tmp_path, "tiny_nomp4", progress=False)
    assert first.name == "photounits.h5" and PRESETS["tiny_nomp4"].key(0) in first.parent.name
    stamp = first.stat().st_mtime_ns
    assert ensure_dataset(tmp_path, "tiny_nomp4", progress=False) == first
    assert first.stat().st_mtime_ns == stamp  # cached: not rebuilt
    assert not list(tmp_path.rglob("*.partial"))


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"PhotoUnitsConfig.units: unknown photos \['nope'\]"):
        PhotoUnitsConfig(units=("coffee", "nope"))
    with pytest.raises(ValueError, match="PhotoUnitsConfig.textures: overlaps units"):
        PhotoUnitsConfig(textures=("coffee",))
    with pytest.raises(ValueError, match="unknown PhotoUnits preset"):
        ensure_dataset("unused", "huge")


def test_bank_key_ignores_video_assembly_knobs() -> None:
    assembly = replace(TINY, num_videos=99, length=(30, 40), unit_length=(3, 5),
                       gap_length=(2, 9), noise_frame_prob=0.1, distractor_prob=0.2)
    assert assembly.bank_key(0) == TINY.bank_key(0)
    assert assembly.key(0) != TINY.key(0)
    for bank_change in (replace(TINY, shots_per_photo=3), replace(TINY, frames_per_shot=4),
                        replace(TINY, textures=("brick", "gravel")),
                        replace(TINY, frame_size=240)):
        assert bank_change.bank_key(0) != TINY.bank_key(0)
    assert TINY.bank_key(1) != TINY.bank_key(0)


def test_ensure_dataset_reuses_the_bank_across_assembly_changes(tmp_path, monkeypatch) -> None:
    import features.backbones

    monkeypatch.setitem(PRESETS, "tiny_a", replace(TINY, mp4_videos=0, num_videos=6))
    monkeypatch.setitem(PRESETS, "tiny_b", replace(TINY, mp4_videos=0, num_videos=8,
                                                   distractor_prob=0.3))
    first = ensure_dataset(tmp_path, "tiny_a", progress=False)
    banks = list(tmp_path.glob("photounits-bank-*.npz"))
    assert len(banks) == 1 and TINY.bank_key(0) in banks[0].name

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran again for an assembly-only change")

    monkeypatch.setattr(features.backbones, "build_backbone", no_backbone)
    second = ensure_dataset(tmp_path, "tiny_b", progress=False)
    assert second.parent != first.parent
    assert len(FeatureStore(second, split=None).lengths) == 8


def test_distractors_are_brief_glimpses_of_other_classes_units() -> None:
    config = replace(TINY, distractor_prob=0.2, distractor_length=(1, 2), noise_frame_prob=0.0)
    world = PhotoUnitsWorld(config, 0)
    glimpses = 0
    for v in range(config.num_videos):
        plan = world.plan(v)
        own = set(world.class_units[plan.label].tolist())
        is_unit_photo = plan.photo < config.vocabulary
        distractor = is_unit_photo & (plan.unit < 0)
        assert not own & set(plan.photo[distractor].tolist())  # never one of the class's units
        assert set(plan.unit[plan.unit >= 0].tolist()) <= own
        glimpses += int(distractor.sum())
    assert glimpses > 0
    with pytest.raises(ValueError, match="PhotoUnitsConfig.distractor_prob"):
        replace(TINY, distractor_prob=1.5)


def test_leadins_count_down_to_every_unit_instance() -> None:
    config = replace(TINY, textures=("brick", "grass", "page", "text"), gap_length=(4, 7),
                     leadin_textures=("page", "text"), leadin_length=(2, 2),
                     noise_frame_prob=0.0)
    world = PhotoUnitsWorld(config, 0)
    V = config.vocabulary
    far, near = V + config.textures.index("page"), V + config.textures.index("text")
    instances = 0
    for v in range(config.num_videos):
        plan = world.plan(v)
        is_unit = plan.unit >= 0
        starts = np.flatnonzero(is_unit & ~np.r_[False, is_unit[:-1]])
        leadin = np.isin(plan.photo, [far, near])
        expected = np.zeros_like(leadin)
        for t in starts.tolist():
            # far, far, near, near, unit (cut off at the video's start)
            for offset, photo in ((-4, far), (-3, far), (-2, near), (-1, near)):
                if t + offset >= 0:
                    assert plan.photo[t + offset] == photo, (v, t, offset)
                    expected[t + offset] = True
            instances += 1
        np.testing.assert_array_equal(leadin, expected)  # lead-in photos appear nowhere else
    assert instances > config.num_videos

    with pytest.raises(ValueError, match="PhotoUnitsConfig.leadin_textures"):
        replace(config, leadin_textures=("moon",))
    with pytest.raises(ValueError, match="PhotoUnitsConfig.leadin_length"):
        replace(config, leadin_length=(3, 3))  # 2 phases x 3 frames > shortest gap of 4
