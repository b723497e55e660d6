"""Ray extraction engine: the merged file is the local engine's byte for byte, a killed shard
resumes (in the same run or the next), finished shards are skipped, broken videos are listed.

One local Ray cluster (2 CPUs, short temp folder) serves the module; the engine reuses an
initialized Ray, and each run starts its own 2 extraction actors.
"""

import filecmp
import json
import os
from pathlib import Path

import pytest

from features.extract import extract, main  # noqa: E402
from features.extract_ray import (  # noqa: E402
    ShardFailure,
    extract_ray,
    part_name,
    plan_shards,
)
from features.manifests import ManifestEntry  # noqa: E402
from features.ray_session import RaySession, ray_init_kwargs  # noqa: E402
from features.store import FeatureStore  # noqa: E402


@pytest.fixture(scope="module")
def dataset(extract_clips):
    return extract_clips


@pytest.fixture(scope="module")
def local_reference(dataset, tmp_path_factory):
    """The local engine's output for the manifest (one torch thread, as the Ray actors)."""
    out = tmp_path_factory.mktemp("local") / "local.h5"
    summary = extract(dataset / "manifest.csv", out, device="cpu", workers=0, progress=False)
    assert summary.videos_written == 5 and len(summary.failed) == 1
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for the module, started as the engine starts its own."""
    import ray

    if ray.is_initialized():
        pytest.skip("another test left Ray initialized")
    session = RaySession(None, num_cpus=2)
    with session:
        assert session.temp_dir is not None and len(session.temp_dir) <= 40
        assert ray.cluster_resources()["CPU"] == 2
        yield session
        temp_dir = session.temp_dir
    assert not ray.is_initialized() and not Path(temp_dir).exists()  # shut down, cleaned


def _run(dataset, out, **kwargs):
    return extract_ray(dataset / "manifest.csv", out, device="cpu", workers=2, progress=False,
                       **kwargs)


def test_plan_shards_are_contiguous_and_balanced():
    entries = [ManifestEntry(Path(f"{i}.mp4"), 0, "train", str(i)) for i in range(7)]
    shards = plan_shards(entries, 3)
    assert [[e.video_id for e in s] for s in shards] == [["0", "1"], ["2", "3", "4"], ["5", "6"]]
    assert len(plan_shards(entries, 20)) == 7  # never an empty shard
    assert part_name(2, 12) == "shard-00002-of-00012.h5"


def test_ray_address_is_honoured():
    assert ray_init_kwargs(None, 2, {"RAY_ADDRESS": "10.0.0.1:6379"}) == {
        "address": "10.0.0.1:6379"}
    assert ray_init_kwargs("auto", 2, {"RAY_ADDRESS": "10.0.0.1:6379"}) == {"address": "auto"}
    assert ray_init_kwargs(None, 3, {}) == {"address": "local", "num_cpus": 3,
                                            "include_dashboard": False}


def test_merged_file_is_the_local_engines_byte_for_byte(dataset, local_reference, ray_cluster,
                                                        tmp_path):
    out = tmp_path / "ray.h5"
    summary = _run(dataset, out, shards=2)
    assert (summary.workers, summary.shards, summary.videos_written) == (2, 2, 5)
    assert filecmp.cmp(out, local_reference, shallow=False)
    # the broken video is listed, in the same words as the local engine's list
    assert [f["video_id"] for f in summary.failed] == ["videos/broken"]
    assert "broken.mp4" in summary.failed[0]["error"]
    failed_json = Path(f"{out}.failed.json").read_text()
    assert failed_json == Path(f"{local_reference}.failed.json").read_text()
    assert json.loads(failed_json)[0]["path"].endswith("broken.mp4")
    assert not Path(f"{out}.parts").exists()  # parts removed once merged
    with FeatureStore(out) as store:
        assert store.video_ids == [f"videos/v{i}" for i in range(5)]
        assert store.lengths.tolist() == [2, 3, 4, 2, 3]
    # both actors worked (per-process CPU time is reported per shard)
    assert len({r.pid for r in summary.shard_results}) == 2
    assert all(r.cpu_seconds > 0 for r in summary.shard_results)


def test_killed_shard_resumes_on_rerun_and_finished_shards_are_skipped(
        dataset, local_reference, ray_cluster, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ray.h5"
    parts = Path(f"{out}.parts")
    # shard 0 = v0 v1 broken, shard 1 = v2 v3 v4; shard 0's worker dies after writing v0
    monkeypatch.setenv("VIMO_EXTRACT_STOP_AFTER", "1")
    with pytest.raises(ShardFailure, match="shard-00000-of-00002.h5: worker died"):
        _run(dataset, out, shards=2, retries=0)
    assert not out.exists()
    assert (parts / "shard-00001-of-00002.h5").exists()  # finished
    assert (parts / "shard-00000-of-00002.h5.partial").exists()  # killed after v0
    assert not (parts / "shard-00000-of-00002.h5").exists()

    # The rerun, through the CLI, with the hook still set: shard 1 is skipped; shard 0 goes on
    # after v0, its worker is killed again after v1 and a fresh actor resumes it in this run
    # (the hook hits a shard's first attempt only).
    argv = ["--manifest", str(dataset / "manifest.csv"), "--out", str(out), "--device", "cpu",
            "--engine", "ray", "--ray-workers", "2", "--threads", "1", "--quiet"]
    with pytest.warns(UserWarning, match="shard-00000-of-00002.h5: worker died; retrying"):
        assert main(argv) == 0
    stdout = capsys.readouterr().out
    # counts are of the finished attempts: v1 was written by the killed one, then found done
    assert "0 videos written, 5 already done, 1 failed" in stdout
    assert "2 shards (1 already done)" in stdout
    assert filecmp.cmp(out, local_reference, shallow=False)
    assert json.loads(Path(f"{out}.failed.json").read_text())[0]["video_id"] == "videos/broken"
    assert not parts.exists()
    monkeypatch.delenv("VIMO_EXTRACT_STOP_AFTER")

    # a finished file and nothing new: no actor is started and nothing is rewritten
    good = dataset / "good.csv"
    good.write_text("".join(line for line in (dataset / "manifest.csv").open()
                            if "broken" not in line))
    before = out.stat().st_mtime_ns
    summary = extract_ray(good, out, device="cpu", progress=False)
    assert (summary.videos_written, summary.videos_skipped, summary.workers) == (0, 5, 0)
    assert out.stat().st_mtime_ns == before and not summary.failed
    assert not Path(f"{out}.failed.json").exists()  # no failures in this run, as locally
    assert filecmp.cmp(out, local_reference, shallow=False)


def test_a_changed_shard_count_is_refused_on_resume(dataset, tmp_path):
    out = tmp_path / "ray.h5"
    parts = Path(f"{out}.parts")
    parts.mkdir()
    plan = {"format": "vimo-features-shards", "version": 1,
            "settings": {"backbone": "efficientnet_lite0", "weights": None, "fps": 1.0,
                         "dtype": "float16", "class_names": ["a", "b"], "threads": 1,
                         "device": "cpu"},
            "shards": [["videos/v0", "videos/v1", "videos/broken"],
                       ["videos/v2", "videos/v3", "videos/v4"]]}
    (parts / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="plan.json: cannot resume: field 'shards' has 2"):
        _run(dataset, out, shards=3)
    # parts made with other torch threads would not merge into the local engine's bytes
    with pytest.raises(ValueError, match="plan.json: cannot resume: field 'threads' is 1, "
                                         "this run uses 2"):
        _run(dataset, out, shards=2, threads=2)
    plan["settings"]["fps"] = 2.0
    (parts / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="plan.json: cannot resume: field 'fps'"):
        _run(dataset, out, shards=2)
    assert os.listdir(parts) == ["plan.json"]  # nothing started


def test_a_finished_file_of_another_configuration_is_refused(dataset, local_reference,
                                                              tmp_path):
    out = tmp_path / "ray.h5"
    out.write_bytes(local_reference.read_bytes())
    with pytest.raises(ValueError, match=r"ray\.h5: cannot resume: field 'fps' is 1\.0"):
        _run(dataset, out, fps=2.0)
    with pytest.raises(ValueError, match=r"ray\.h5: cannot resume: field 'features'"):
        _run(dataset, out, dtype="float32")
    assert not Path(f"{out}.parts").exists()  # refused before any work


def test_all_videos_failing_still_writes_the_local_engines_empty_file(dataset, ray_cluster,
                                                                      tmp_path):
    """A manifest whose every video fails to decode gives the same (empty) file and failure
    list as the local engine, not a missing output."""
    lines = (dataset / "manifest.csv").read_text().splitlines()
    manifest = tmp_path / "broken.csv"
    manifest.write_text("\n".join([lines[0], *[x for x in lines[1:] if "broken" in x]]) + "\n")
    (tmp_path / "videos").symlink_to(dataset / "videos")  # relative paths resolve next to it
    local = extract(manifest, tmp_path / "local.h5", device="cpu", workers=0, progress=False)
    assert local.videos_written == 0 and len(local.failed) == 1
    out = tmp_path / "ray.h5"
    summary = extract_ray(manifest, out, device="cpu", workers=2, progress=False, shards=1)
    assert summary.videos_written == 0 and [f["video_id"] for f in summary.failed] == [
        "videos/broken"]
    assert filecmp.cmp(out, tmp_path / "local.h5", shallow=False)
    with FeatureStore(out) as store:
        assert store.video_ids == []
