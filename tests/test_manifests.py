"""Manifests parse their real-layout fixtures; missing files and unknown labels are errors."""

import json
import shutil
from pathlib import Path

import pytest

from features.manifests import ManifestError, load_manifest, load_manifests

FIXTURES = Path(__file__).parent / "fixtures"


def test_activitynet_layout():
    entries, classes = load_manifest(FIXTURES / "activitynet_v1-3_mini.json", video_root="/videos")
    assert classes == ["Ballet", "Playing squash", "Vacuuming floor"]  # taxonomy leaves
    by_id = {e.video_id: e for e in entries}
    assert [e.video_id for e in entries] == ["sJFgo9H6zNo", "V1zhqaGFY2A", "JDg--pjY5gg",
                                             "KEVTc9PDd1c"]
    assert by_id["V1zhqaGFY2A"].label == 2  # two annotations of one label
    assert by_id["JDg--pjY5gg"].split == "val" and by_id["JDg--pjY5gg"].label == 1
    assert by_id["KEVTc9PDd1c"].label == -1 and by_id["KEVTc9PDd1c"].split == "test"
    assert by_id["sJFgo9H6zNo"].path == Path("/videos/v_sJFgo9H6zNo.mp4")


def test_activitynet_finds_existing_files_and_rejects_unknown_labels(tmp_path):
    data = json.loads((FIXTURES / "activitynet_v1-3_mini.json").read_text())
    (tmp_path / "sJFgo9H6zNo.mkv").write_bytes(b"x")
    manifest = tmp_path / "anet.json"
    manifest.write_text(json.dumps(data))
    entries, _ = load_manifest(manifest)
    assert entries[0].path == tmp_path / "sJFgo9H6zNo.mkv"
    for annotation in data["database"]["V1zhqaGFY2A"]["annotations"]:
        annotation["label"] = "Juggling"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="unknown label 'Juggling'"):
        load_manifest(manifest)
    data["database"]["V1zhqaGFY2A"]["annotations"][0]["label"] = "Ballet"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="several labels"):
        load_manifest(manifest)


def test_fcvid_layout():
    entries, classes = load_manifest(FIXTURES / "fcvid")
    assert classes == ["basketball", "makingCake", "weddingCeremony"]
    assert [(e.label, e.split) for e in entries] == [(0, "train"), (0, "test"), (1, "train"),
                                                     (2, "test")]
    assert entries[2].path == FIXTURES / "fcvid" / "making_cake" / "making_cake_0001.mp4"
    same, _ = load_manifest(FIXTURES / "fcvid" / "FCVID_VideoName_TrainTestSplit.txt")
    assert same == entries


def test_fcvid_label_rows_must_match(tmp_path):
    shutil.copytree(FIXTURES / "fcvid", tmp_path / "fcvid")
    (tmp_path / "fcvid" / "FCVID_Label.txt").write_text("1 0 0\n")
    with pytest.raises(ManifestError, match="FCVID_Label.txt: 1 label rows but 4 videos"):
        load_manifest(tmp_path / "fcvid")


def test_kinetics_sounds_layout_over_two_files():
    entries, classes = load_manifests([FIXTURES / "kinetics_sounds" / "train.csv",
                                       FIXTURES / "kinetics_sounds" / "validate.csv"])
    assert classes == ["dribbling basketball", "playing bagpipes"]
    assert [e.split for e in entries] == ["train"] * 3 + ["val"] * 2
    assert entries[0].video_id == "-0Ql5mQ4mBQ_000011_000021" and entries[0].label == 1
    assert entries[0].path.name == "-0Ql5mQ4mBQ_000011_000021.mp4"


def test_generic_layout_and_class_list(tmp_path):
    entries, classes = load_manifest(FIXTURES / "generic.csv")
    assert classes == ["running", "walking"]
    assert [(e.label, e.split) for e in entries] == [(1, "train"), (0, "train"), (1, "val"),
                                                     (-1, "test")]
    assert entries[0].path == FIXTURES / "videos" / "walk_01.mp4"
    with pytest.raises(ManifestError, match=r"row 2: unknown label 'walking'"):
        load_manifest(FIXTURES / "generic.csv", class_names=["running", "jumping"])
    with pytest.raises(ManifestError, match="video file"):
        load_manifest(FIXTURES / "generic.csv", require_files=True)


def test_missing_and_malformed_manifests(tmp_path):
    with pytest.raises(ManifestError, match="absent.csv: manifest not found"):
        load_manifest(tmp_path / "absent.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.mp4,x\n")
    with pytest.raises(ManifestError, match="lacks column"):
        load_manifest(bad)
    bad.write_text("path,label,split\na.mp4,x,holdout\n")
    with pytest.raises(ManifestError, match="row 2: unknown split 'holdout'"):
        load_manifest(bad)
    broken = tmp_path / "anet.json"
    broken.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(broken)
