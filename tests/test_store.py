"""The vimo-features v1 store: round trips, validation of every malformed field, selection,
preload, pickling, and writer resume after a real kill."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import features.store as store_module
from features.store import FeatureStore, FeatureStoreError, FeatureWriter

D = 8
CLASSES = ["apple", "banana", "cherry"]
SPLIT_OF = ["train", "train", "val", "test"]


def video_rows(v: int, length: int | None = None) -> np.ndarray:
    """Deterministic features of video ``v`` (also regenerated inside the kill subprocess)."""
    rng = np.random.default_rng(1000 + v)
    return rng.standard_normal((length or 3 + v % 5, D)).astype(np.float32)


def write_file(path: Path, num_videos: int = 12, dtype: str = "float32", **kwargs) -> Path:
    with FeatureWriter(path, feature_dim=D, class_names=CLASSES, backbone="synthetic", fps=1.0,
                       gflops_per_frame=4.09, flops_unit="MACs", dtype=dtype, **kwargs) as writer:
        for v in range(num_videos):
            writer.add(f"vid{v:03d}", video_rows(v), v % 3 if v != 5 else -1, SPLIT_OF[v % 4])
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_file(tmp_path / "good.h5")


# -- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    path = write_file(tmp_path / f"{dtype}.h5", dtype=dtype)
    assert not path.with_name(path.name + ".partial").exists()
    with FeatureStore(path) as store:
        assert len(store) == 12
        assert store.storage_dtype == np.dtype(dtype)
        assert (store.feature_dim, store.backbone, store.fps) == (D, "synthetic", 1.0)
        assert (store.gflops_per_frame, store.flops_unit) == (4.09, "MACs")
        assert store.class_names == CLASSES and store.num_classes == 3
        assert store.video_ids == [f"vid{v:03d}" for v in range(12)]
        assert store.labels.tolist() == [v % 3 if v != 5 else -1 for v in range(12)]
        assert store.splits.tolist() == [SPLIT_OF[v % 4] for v in range(12)]
        assert store.lengths.tolist() == [3 + v % 5 for v in range(12)]
        for v in range(12):
            got = store.video(v)
            assert got.dtype == np.float32 and got.shape == (3 + v % 5, D)
            np.testing.assert_array_equal(got, video_rows(v).astype(dtype).astype(np.float32))
        store.validate()
        np.testing.assert_array_equal(store.read_all(), np.concatenate(list(store)))
        with pytest.raises(IndexError, match="out of range"):
            store.video(12)


def test_large_write_is_chunked_along_rows(tmp_path: Path) -> None:
    path = write_file(tmp_path / "c.h5", num_videos=3, dtype="float16")
    with h5py.File(path) as f:
        chunks = f["features"].chunks
        assert chunks[1] == D and chunks[0] * D * 2 <= store_module.CHUNK_BYTES
        assert f["features"].maxshape == (None, D)


# -- validation on open: every malformed field -------------------------------------------------


def _replace(name: str, data) -> callable:
    def corrupt(f: h5py.File) -> None:
        del f[name]
        f[name] = data
    return corrupt


def _set_attr(name: str, value) -> callable:
    def corrupt(f: h5py.File) -> None:
        f.attrs[name] = value
    return corrupt


def _del_attr(name: str) -> callable:
    def corrupt(f: h5py.File) -> None:
        del f.attrs[name]
    return corrupt


def _del(name: str) -> callable:
    def corrupt(f: h5py.File) -> None:
        del f[name]
    return corrupt


def _offsets(edit) -> callable:
    def corrupt(f: h5py.File) -> None:
        offsets = f["offsets"][()]
        edit(offsets)
        f["offsets"][...] = offsets
    return corrupt


def _swap_offsets(o: np.ndarray) -> None:
    o[4], o[5] = o[5], o[4]


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=h5py.string_dtype("utf-8"))


def _ids_with_duplicate(f: h5py.File) -> None:
    ids = f["video_ids"].asstr()[()].tolist()
    ids[7] = ids[2]
    del f["video_ids"]
    f["video_ids"] = _strings(ids)


def _unknown_split(f: h5py.File) -> None:
    splits = f["splits"].asstr()[()].tolist()
    splits[9] = "training"
    del f["splits"]
    f["splits"] = _strings(splits)


def _label(value: int) -> callable:
    def corrupt(f: h5py.File) -> None:
        f["labels"][3] = value
    return corrupt


MALFORMED = {
    "wrong format": (_set_attr("format", "other-features"), "format", "expected"),
    "no format": (_del_attr("format"), "format", "missing"),
    "wrong version": (_set_attr("version", 2), "version", "unsupported version 2"),
    "float version": (_set_attr("version", 1.0), "version", "integer"),
    "no version": (_del_attr("version"), "version", "missing"),
    "no backbone": (_del_attr("backbone"), "backbone", "missing"),
    "numeric backbone": (_set_attr("backbone", 3), "backbone", "string"),
    "string feature_dim": (_set_attr("feature_dim", "8"), "feature_dim", "integer"),
    "no feature_dim": (_del_attr("feature_dim"), "feature_dim", "missing"),
    "string fps": (_set_attr("fps", "1"), "fps", "number"),
    "zero fps": (_set_attr("fps", 0.0), "fps", "positive"),
    "no gflops": (_del_attr("gflops_per_frame"), "gflops_per_frame", "missing"),
    "negative gflops": (_set_attr("gflops_per_frame", -1.0), "gflops_per_frame", ">= 0"),
    "bad flops_unit": (_set_attr("flops_unit", "GFLOPs"), "flops_unit", "expected one of"),
    "array attr": (_set_attr("fps", [1.0, 2.0]), "fps", "scalar"),
    **{f"no {name}": (_del(name), name, "dataset missing") for name in store_module.DATASETS},
    "features 1-D": (_replace("features", np.zeros(10, np.float32)), "features", "2-D"),
    "features int": (_replace("features", np.zeros((60, D), np.int32)), "features", "float"),
    "features wrong dim": (_replace("features", np.zeros((60, D + 1), np.float32)), "features",
                           "does not match attribute feature_dim"),
    "feature_dim attr mismatch": (_set_attr("feature_dim", D * 2), "features", "does not match"),
    "offsets float": (_replace("offsets", np.arange(13, dtype=np.float64)), "offsets",
                      "integers"),
    "offsets[0] != 0": (_offsets(lambda o: o.__setitem__(0, 1)), "offsets", "offsets[0]"),
    "offsets decreasing": (_offsets(_swap_offsets), "offsets", "not non-decreasing at index 5"),
    "offsets end": (_offsets(lambda o: o.__setitem__(-1, o[-1] - 1)), "offsets", "offsets[-1]"),
    "offsets too short": (_replace("offsets", np.zeros(5, np.int64)), "offsets",
                          "expected len(video_ids)+1 = 13"),
    "labels too short": (_replace("labels", np.zeros(11, np.int64)), "labels", "11 entries"),
    "splits too long": (_replace("splits", _strings(["train"] * 13)), "splits", "13 entries"),
    "labels float": (_replace("labels", np.zeros(12, np.float32)), "labels", "integers"),
    "ids not strings": (_replace("video_ids", np.arange(12)), "video_ids", "utf-8 strings"),
    "duplicate id": (_ids_with_duplicate, "video_ids", "duplicate video id 'vid002'"),
    "unknown split": (_unknown_split, "splits", "unknown split 'training' at index 9"),
    "label too large": (_label(3), "labels", "label 3 at index 3"),
    "label below -1": (_label(-2), "labels", "label -2 at index 3"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_names_file_and_field(good: Path, case: str) -> None:
    corrupt, field, problem = MALFORMED[case]
    with h5py.File(good, "a") as f:
        corrupt(f)
    with pytest.raises(FeatureStoreError) as info:
        FeatureStore(good)
    message = str(info.value)
    assert message.startswith(f"{good}: field '{field}': "), message
    assert problem in message, message
    assert info.value.field == field and info.value.path == str(good)


def test_missing_and_non_hdf5_files(tmp_path: Path) -> None:
    with pytest.raises(FeatureStoreError, match="no such file") as info:
        FeatureStore(tmp_path / "absent.h5")
    assert str(tmp_path / "absent.h5") in str(info.value)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(FeatureStoreError, match="not a readable HDF5 file") as info:
        FeatureStore(junk)
    assert info.value.field == "<file>" and str(junk) in str(info.value)


def test_fixed_length_strings_are_accepted(good: Path) -> None:
    """Files written elsewhere may store ids as fixed-length byte strings."""
    with h5py.File(good, "a") as f:
        ids = f["video_ids"].asstr()[()].tolist()
        del f["video_ids"]
        f["video_ids"] = np.array(ids, dtype="S10")
    with FeatureStore(good) as store:
        assert store.video_ids[:2] == ["vid000", "vid001"]


def test_non_finite_rows_found_lazily_and_by_validate(good: Path) -> None:
    with h5py.File(good, "a") as f:
        offsets = f["offsets"][()]
        f["features"][offsets[6] + 2, 5] = np.nan
        f["features"][offsets[9], 0] = np.inf
    with FeatureStore(good) as store:  # opening never scans /features
        np.testing.assert_array_equal(store.video(5), video_rows(5))
        with pytest.raises(FeatureStoreError, match="frame 2 of video 'vid006'") as info:
            store.video(6)
        assert info.value.field == "features" and str(good) in str(info.value)
        with pytest.raises(FeatureStoreError, match="frame 0 of video 'vid009'"):
            store.video(9)
        with pytest.raises(FeatureStoreError, match=f"row {offsets[6] + 2} .*'vid006'"):
            store.validate()
        with pytest.raises(FeatureStoreError, match="'vid006'"):
            store.read_all()
        with pytest.raises(FeatureStoreError, match="'vid009'"):
            store.select(split="train").validate()  # vid006 is val, vid009 is train
        store.select(split="test").validate()


# -- selection, read_all, preload ---------------------------------------------------------------


def test_split_and_label_selection(good: Path) -> None:
    with FeatureStore(good, split="train") as train:
        assert train.video_ids == ["vid000", "vid001", "vid004", "vid005", "vid008", "vid009"]
        assert set(train.splits.tolist()) == {"train"}
        np.testing.assert_array_equal(train.video(2), video_rows(4))
        view = train.select(labels=[1, -1])
        assert view.video_ids == ["vid001", "vid004", "vid005"]
        assert train.select(split="val").video_ids == []  # a view narrows, never widens
        assert view.index_of("vid005") == 2
        with pytest.raises(KeyError, match="vid002"):
            view.index_of("vid002")
        np.testing.assert_array_equal(view.video(1), video_rows(4))
        assert len(train) == 6  # the parent selection is unchanged
    with FeatureStore(good, split="test", labels=[0]) as store:
        assert store.video_ids == ["vid003"]
    with pytest.raises(FeatureStoreError, match="unknown split 'training'") as info:
        FeatureStore(good, split="training")
    assert info.value.field == "splits"
    with pytest.raises(FeatureStoreError, match="requested label 3 outside") as info:
        FeatureStore(good, labels=[0, 3])
    assert info.value.field == "labels"


@pytest.mark.parametrize("split", [None, "train", "val"])
def test_read_all_matches_videos(good: Path, split: str | None) -> None:
    with FeatureStore(good, split=split) as store:
        flat = store.read_all()
        assert flat.dtype == np.float32 and flat.shape == (store.num_frames, D)
        np.testing.assert_array_equal(flat, np.concatenate([store.video(i)
                                                            for i in range(len(store))]))


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    reads: list[tuple] = []
    original = h5py.Dataset.__getitem__

    def counting(self, key, *args, **kwargs):
        if self.name == "/features":
            reads.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    return reads


def test_read_all_reads_blocks_not_videos(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _count_reads(monkeypatch)
    expected = {v: video_rows(v) for v in range(12)}
    with FeatureStore(good) as store:  # contiguous: one read
        np.testing.assert_array_equal(store.read_all(), np.concatenate(list(expected.values())))
        assert len(reads) == 1
        reads.clear()
        train = store.select(split="train")  # videos 0,1 | 4,5 | 8,9: dense, one read
        np.testing.assert_array_equal(train.read_all(),
                                      np.concatenate([expected[v] for v in (0, 1, 4, 5, 8, 9)]))
        assert len(reads) == 1
        reads.clear()
        monkeypatch.setattr(store_module, "_READ_CALL_BYTES", 0)  # sparse: one read per run
        train.validate()
        assert len(reads) == 3
        reads.clear()
        monkeypatch.setattr(store_module, "_BLOCK_BYTES", 5 * D * 4)  # blocks of 5 rows
        np.testing.assert_array_equal(train.read_all(),
                                      np.concatenate([expected[v] for v in (0, 1, 4, 5, 8, 9)]))
        assert all(isinstance(key, slice) and key.stop - key.start <= 5 for key in reads)
        monkeypatch.setattr(store_module, "_READ_CALL_BYTES", 10**9)
        np.testing.assert_array_equal(train.read_all(),
                                      np.concatenate([expected[v] for v in (0, 1, 4, 5, 8, 9)]))


def test_non_finite_found_in_dense_blocks(good: Path) -> None:
    with h5py.File(good, "a") as f:
        f["features"][int(f["offsets"][8]) + 1, 3] = -np.inf
        f["features"][int(f["offsets"][2]), 3] = np.nan  # val video: not in the selection
    with FeatureStore(good, split="train") as store:
        with pytest.raises(FeatureStoreError, match="frame 1 of video 'vid008'"):
            store.read_all()
        with pytest.raises(FeatureStoreError, match="frame 1 of video 'vid008'"):
            store.validate()


def test_preload(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FeatureStore(good, split="val", preload=True) as store:
        assert store.preloaded
        store._index.file.close()  # preloaded reads never touch the file again
        for i, v in enumerate([2, 6, 10]):
            np.testing.assert_array_equal(store.video(i), video_rows(v))
        assert not store.video(0).flags.writeable
    with FeatureStore(good, preload="auto") as store:
        assert store.preloaded
    monkeypatch.setattr(store_module, "available_memory_bytes", lambda: 1000)
    with pytest.raises(FeatureStoreError, match=r"needs .* GiB but only .* available") as info:
        FeatureStore(good, preload=True)
    assert info.value.field == "features" and str(good) in str(info.value)
    with FeatureStore(good, preload="auto") as store:  # does not fit: stays lazy
        assert not store.preloaded
        np.testing.assert_array_equal(store.video(3), video_rows(3))
    with pytest.raises(ValueError, match="preload must be"):
        FeatureStore(good, preload="yes")


def test_pickle_reopens_by_path(good: Path) -> None:
    with FeatureStore(good) as store:
        view = store.select(split="train", labels=[0, 1])
        copy = pickle.loads(pickle.dumps(view))
        assert copy.video_ids == view.video_ids and not copy.preloaded
        for i in range(len(view)):
            np.testing.assert_array_equal(copy.video(i), view.video(i))
        copy.close()
        view.preload()
        copy = pickle.loads(pickle.dumps(view))
        assert copy.preloaded and len(pickle.dumps(view)) < 2000  # path, not data
        np.testing.assert_array_equal(copy.read_all(), view.read_all())
        copy.close()
    error = pickle.loads(pickle.dumps(FeatureStoreError("x.h5", "labels", "bad")))
    assert (str(error), error.field) == ("x.h5: field 'labels': bad", "labels")


# -- writer ------------------------------------------------------------------------------------


def _writer(path: Path, **kwargs) -> FeatureWriter:
    return FeatureWriter(path, feature_dim=D, class_names=CLASSES, backbone="synthetic", **kwargs)


BAD_ADDS = {
    "nan": (dict(features=np.full((3, D), np.nan)), "features", "'v': non-finite"),
    "inf": (dict(features=np.full((3, D), np.inf)), "features", "'v': non-finite"),
    "float16 overflow": (dict(features=np.full((3, D), 1e5)), "features", "too large for float16"),
    "wrong dim": (dict(features=np.zeros((3, D + 1))), "features", f"[T, {D}]"),
    "1-D": (dict(features=np.zeros(D)), "features", f"[T, {D}]"),
    "strings": (dict(features=np.full((3, D), "a")), "features", "real array"),
    "empty": (dict(features=np.zeros((0, D))), "features", "no frames"),
    "label high": (dict(label=3), "labels", "label 3"),
    "label low": (dict(label=-2), "labels", "label -2"),
    "label float": (dict(label=1.0), "labels", "label 1.0"),
    "split": (dict(split="dev"), "splits", "unknown split 'dev'"),
    "duplicate": (dict(video_id="dup"), "video_ids", "duplicate video id 'dup'"),
    "empty id": (dict(video_id=""), "video_ids", "non-empty string"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADDS))
def test_writer_rejects_bad_videos(tmp_path: Path, case: str) -> None:
    overrides, field, problem = BAD_ADDS[case]
    writer = _writer(tmp_path / "w.h5")
    writer.add("dup", video_rows(0), 0, "train")
    args = dict(video_id="v", features=video_rows(1), label=1, split="val") | overrides
    with pytest.raises(FeatureStoreError) as info:
        writer.add(**args)
    assert info.value.field == field and problem in str(info.value), str(info.value)
    assert str(tmp_path / "w.h5.partial") in str(info.value)
    writer.add("ok", video_rows(2), 2, "test")  # a rejected video leaves the writer usable
    writer.close()
    with FeatureStore(tmp_path / "w.h5") as store:
        assert store.video_ids == ["dup", "ok"]
        np.testing.assert_array_equal(store.video(1), video_rows(2).astype(np.float16))


def test_writer_rejects_bad_arguments(tmp_path: Path) -> None:
    cases = ((dict(flops_unit="GMACs"), "flops_unit"), (dict(dtype="int8"), "features"),
             (dict(fps=0.0), "fps"), (dict(gflops_per_frame=-1.0), "gflops_per_frame"))
    for kwargs, field in cases:
        with pytest.raises(FeatureStoreError) as info:
            _writer(tmp_path / "w.h5", **kwargs)
        assert info.value.field == field


def test_writer_accepts_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with _writer(tmp_path / "t.h5", dtype="float32") as writer:
        writer.add("t", torch.from_numpy(video_rows(3)), 0, "train")
    with FeatureStore(tmp_path / "t.h5") as store:
        np.testing.assert_array_equal(store.video(0), video_rows(3))


def test_exception_in_with_keeps_partial_for_resume(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    with pytest.raises(RuntimeError, match="boom"), _writer(path, flush_every=3) as writer:
        for v in range(5):
            writer.add(f"vid{v:03d}", video_rows(v), 0, "train")
        raise RuntimeError("boom")
    assert not path.exists() and path.with_name("r.h5.partial").exists()
    with _writer(path, flush_every=3, resume=True) as writer:
        assert len(writer) == 5 and "vid004" in writer and "vid005" not in writer
        writer.add("vid005", video_rows(5), 1, "val")
    with FeatureStore(path) as store:
        store.validate()
        assert len(store) == 6
        for v in range(6):
            np.testing.assert_array_equal(store.video(v), video_rows(v).astype(np.float16))


def test_resume_truncates_uncommitted_rows(tmp_path: Path) -> None:
    """A crash between writing rows/ids and writing the offset leaves extra rows: dropped."""
    path = tmp_path / "u.h5"
    writer = _writer(path, dtype="float32")
    for v in range(3):
        writer.add(f"vid{v:03d}", video_rows(v), 0, "train")
    writer.abort()
    with h5py.File(path.with_name("u.h5.partial"), "a") as f:  # half of a 4th video
        rows = len(f["features"])
        f["features"].resize(rows + 4, axis=0)
        f["features"][rows:] = 7.0
        f["video_ids"].resize(4, axis=0)
        f["video_ids"][3] = "vid003"
    with _writer(path, dtype="float32", resume=True) as writer:
        assert len(writer) == 3 and "vid003" not in writer
        writer.add("vid003", video_rows(3), 1, "test")
    with FeatureStore(path) as store:
        store.validate()
        for v in range(4):
            np.testing.assert_array_equal(store.video(v), video_rows(v))


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    _writer(path).abort()
    with pytest.raises(FeatureStoreError, match="cannot resume") as info:
        FeatureWriter(path, feature_dim=D + 1, class_names=CLASSES, backbone="synthetic",
                      resume=True)
    assert info.value.field == "feature_dim"
    with pytest.raises(FeatureStoreError, match="class names differ"):
        FeatureWriter(path, feature_dim=D, class_names=["x"], backbone="synthetic", resume=True)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from features.store import FeatureWriter
    from tests.test_store import CLASSES, D, video_rows
    writer = FeatureWriter({path!r}, feature_dim=D, class_names=CLASSES, backbone="synthetic",
                           dtype="float32", flush_every={flush_every}, resume=True)
    for v in range(len(writer), 1000):
        writer.add(f"vid{{v:03d}}", video_rows(v, 40), v % 3, "train")
        print(v, flush=True)
        if v == {suicide_at}:
            os.kill(os.getpid(), signal.SIGKILL)
""")


def _run_killed(tmp_path: Path, path: Path, flush_every: int, suicide_at: int = -1,
                kill_after: int | None = None) -> list[int]:
    """Run a writer in a subprocess until it is SIGKILLed; return the videos it reported."""
    script = KILL_SCRIPT.format(root=str(Path(__file__).parents[1]), path=str(path),
                                flush_every=flush_every, suicide_at=suicide_at)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
    done = []
    for line in child.stdout:
        done.append(int(line))
        if kill_after is not None and len(done) >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
    child.stdout.close()
    assert child.wait(timeout=60) == -signal.SIGKILL
    return done


def _finish_and_check(path: Path, expected_done: int, exact: bool) -> None:
    with FeatureWriter(path, feature_dim=D, class_names=CLASSES, backbone="synthetic",
                       dtype="float32", resume=True) as writer:
        kept = len(writer)
        assert kept == expected_done if exact else kept >= expected_done
        assert all(f"vid{v:03d}" in writer for v in range(kept))
        for v in range(kept, kept + 5):
            writer.add(f"vid{v:03d}", video_rows(v, 40), v % 3, "train")
    assert not path.with_name(path.name + ".partial").exists()
    with FeatureStore(path) as store:
        store.validate()
        assert store.video_ids == [f"vid{v:03d}" for v in range(kept + 5)]
        for v in range(kept + 5):  # every finished video intact
            np.testing.assert_array_equal(store.video(v), video_rows(v, 40))


def test_resume_after_sigkill_at_a_known_point(tmp_path: Path) -> None:
    """Killed with 2 videos written after the last commit: exactly the committed 8 survive."""
    path = tmp_path / "k.h5"
    done = _run_killed(tmp_path, path, flush_every=4, suicide_at=9)
    assert done == list(range(10)) and not path.exists()
    _finish_and_check(path, expected_done=8, exact=True)


def test_resume_after_sigkill_from_outside(tmp_path: Path) -> None:
    """Killed by the parent while writing: every video reported finished survives."""
    path = tmp_path / "k.h5"
    done = _run_killed(tmp_path, path, flush_every=1, kill_after=30)
    _finish_and_check(path, expected_done=len(done), exact=False)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_has_non_finite_bit_test(dtype: str) -> None:
    info = np.finfo(dtype)
    finite = np.array([[0.0, -0.0, info.max, -info.max], [info.tiny, info.smallest_subnormal,
                                                          1.5, -2.0]], dtype=dtype)
    assert not store_module.has_non_finite(finite)
    assert not store_module.has_non_finite(finite[:, ::2])  # non-contiguous path
    for bad in (np.nan, np.inf, -np.inf):
        block = finite.copy()
        block[1, 2] = bad
        assert store_module.has_non_finite(block)
        assert store_module.has_non_finite(block[:, ::2])


def test_file_written_elsewhere_with_plain_h5py(tmp_path: Path) -> None:
    """Drop-in files: contiguous (unchunked) float16 features, written without FeatureWriter."""
    path = tmp_path / "external.h5"
    rows = [video_rows(v).astype(np.float16) for v in range(4)]
    with h5py.File(path, "w") as f:
        f.attrs.update(format="vimo-features", version=1, backbone="resnet50", feature_dim=D,
                       fps=0.5, gflops_per_frame=8.18, flops_unit="FLOPs")
        f["features"] = np.concatenate(rows)
        f["offsets"] = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        f["video_ids"] = _strings(["a", "b", "c", "d"])
        f["labels"] = np.array([0, 2, -1, 1], dtype=np.int64)
        f["splits"] = _strings(["train", "test", "test", "val"])
        f["class_names"] = _strings(CLASSES)
    with FeatureStore(path, split="test") as store:
        assert store.video_ids == ["b", "c"] and store.flops_unit == "FLOPs" and store.fps == 0.5
        np.testing.assert_array_equal(store.video(1), rows[2].astype(np.float32))
        np.testing.assert_array_equal(store.read_all(), np.concatenate(rows[1:3]))


def test_empty_file_and_empty_selection(tmp_path: Path) -> None:
    path = write_file(tmp_path / "empty.h5", num_videos=0)
    with FeatureStore(path) as store:
        assert len(store) == 0 and store.read_all().shape == (0, D)
        store.validate()
        assert store.split_counts() == {"train": 0, "val": 0, "test": 0}
    with FeatureStore(write_file(tmp_path / "some.h5", num_videos=4), labels=[]) as store:
        assert len(store) == 0 and store.read_all().shape == (0, D)
        assert store.split_counts() == {"train": 2, "val": 1, "test": 1}
