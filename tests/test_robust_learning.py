"""Learning that works on features it was never tuned for (issue 12): input normalization that
travels with the checkpoint and is applied wherever the recognizer runs, the dataset identity of
a checkpoint, the linear probe, the Stage I self-check, the lambda rule and the reduced
robustness matrix."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.probe import linear_probe, stage1_health
from agents.stage1 import Stage1Config, frame_statistics, train_stage1
from agents.trainer import Stage1Unhealthy, ThreeStageTrainer, TrainerConfig, frame_cost_rule
from features.source import CachedFrameSource
from features.store import FeatureStore, FeatureWriter
from vimo_env.core import LocatorCore
from vimo_env.recognizer import Recognizer, RecognizerConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL_NET = {"hidden_dim": 32, "transformer_dim": 32, "transformer_layers": 1,
             "transformer_ff_dim": 64}


def _copy_with(src: Path, dst: Path, transform=None, class_names=None, labels=None) -> Path:
    """A copy of a vimo-features file with features, class names or labels changed."""
    store = FeatureStore(src, split=None)
    names = class_names if class_names is not None else list(store.class_names)
    with FeatureWriter(dst, feature_dim=store.feature_dim, class_names=names,
                       backbone=store.backbone, fps=1.0, gflops_per_frame=store.gflops_per_frame,
                       flops_unit=store.flops_unit, dtype="float32") as writer:
        for v in range(len(store)):
            x = store.video(v)
            label = int(store.labels[v]) if labels is None else int(labels[v])
            writer.add(store.video_ids[v], transform(x) if transform else x, label,
                       store.splits[v])
    return dst


def test_normalization_round_trips_and_is_applied_in_the_env(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    source = CachedFrameSource(tiny_dataset, split="val", device="cpu")
    mean, std = frame_statistics(CachedFrameSource(tiny_dataset, split="train", device="cpu"))
    config = RecognizerConfig(feature_dim=16, num_classes=6, **SMALL_NET)
    normalized = Recognizer(config).eval()
    normalized.set_input_normalization(mean, std)
    normalized.save(tmp_path / "rec.pt")
    loaded = Recognizer.load(tmp_path / "rec.pt").eval()
    assert torch.equal(loaded.input_mean, normalized.input_mean)
    assert torch.equal(loaded.input_std, normalized.input_std)
    # the same weights without normalization, on features normalized by hand: same P
    plain = Recognizer(config).eval()
    plain.load_state_dict({k: v for k, v in loaded.state_dict().items()
                           if not k.startswith("input_")}, strict=False)
    standardized = _copy_with(tiny_dataset, tmp_path / "std.h5",
                              lambda x: (x - mean.numpy()) / std.numpy())
    by_hand = CachedFrameSource(standardized, split="val", device="cpu")
    videos = torch.arange(6)
    actions = torch.tensor([[1, 2, 3]] * 6)
    outs = []
    for rec, src in ((loaded, source), (plain, by_hand)):
        core = LocatorCore(src, rec, num_locators=3, max_moves=2, stride=2, device="cpu")
        first = core.reset(videos)
        outs.append((first.p_gt, core.step(actions).p_gt))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain.input_std, loaded.input_std)  # the test is not vacuous


def test_normalization_applies_to_the_live_source_path(tiny_dataset):
    """Every source, live included, reaches the recognizer through ``observe``/``forward``:
    both normalize, and they agree (frame by frame and sequence at once)."""
    torch.manual_seed(1)
    rec = Recognizer(RecognizerConfig(feature_dim=16, num_classes=6, **SMALL_NET)).eval()
    rec.set_input_normalization(torch.randn(16), torch.rand(16) + 0.1)
    x = torch.randn(2, 3, 5, 16) * 50
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    state = rec.initial_state(2)
    for t in range(5):
        state = rec.observe(state, x[:, :, t], mask[:, :, t])
    torch.testing.assert_close(rec(x, mask), rec.logits(state), rtol=1e-4, atol=1e-5)
    shifted = rec.input_mean.clone()
    rec.set_input_normalization(shifted + 1.0, rec.input_std)
    assert not torch.allclose(rec(x, mask), rec.logits(state))


def test_a_checkpoint_from_another_dataset_is_refused(tiny_dataset, tmp_path):
    config = Stage1Config(steps=4, batch_size=16, recognizer=SMALL_NET, evaluations=1,
                          device="cpu", out_dir=str(tmp_path / "s1"), final_split="val")
    model, _ = train_stage1(tiny_dataset, config, progress=False)
    loaded = Recognizer.load(tmp_path / "s1" / "stage1_best.pt")
    assert loaded.dataset["class_names"] == list(FeatureStore(tiny_dataset).class_names)
    store = FeatureStore(tiny_dataset, split=None)
    names = list(store.class_names)
    swapped = names[1:2] + names[:1] + names[2:]
    other = _copy_with(tiny_dataset, tmp_path / "other.h5", class_names=swapped)
    source = CachedFrameSource(other, split="val", device="cpu")
    with pytest.raises(ValueError, match=r"class names differ.*class 0 is"):
        LocatorCore(source, loaded, num_locators=3, device="cpu")
    # the same file is fine
    LocatorCore(CachedFrameSource(tiny_dataset, split="val", device="cpu"), loaded,
                num_locators=3, device="cpu")


def test_checkpoint_errors_name_the_file_and_field(tmp_path):
    rec = Recognizer(RecognizerConfig(feature_dim=8, num_classes=3, **SMALL_NET))
    rec.save(tmp_path / "ok.pt")
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    del ckpt["dataset"]
    torch.save(ckpt, tmp_path / "nodata.pt")
    with pytest.raises(ValueError, match=r"nodata\.pt: field 'dataset'"):
        Recognizer.load(tmp_path / "nodata.pt")
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    ckpt["state_dict"]["classifier.weight"] = torch.zeros(5, 5)
    torch.save(ckpt, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape\.pt: field 'state_dict'"):
        Recognizer.load(tmp_path / "shape.pt")
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    ckpt["version"] = 1
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="version"):
        Recognizer.load(tmp_path / "old.pt")


def test_linear_probe_and_self_check(tiny_dataset):
    train = CachedFrameSource(tiny_dataset, split="train", device="cpu")
    val = CachedFrameSource(tiny_dataset, split="val", device="cpu")
    probe = linear_probe(train, {"val": val})
    assert probe["val"]["mAP"] > 60  # the tiny features separate the classes
    assert probe["val"]["frame_rate"] == pytest.approx(
        100 * np.mean(np.ceil(0.25 * (val.lengths / 3 - 1e-9)) * 3 / val.lengths), abs=3)
    healthy = stage1_health(0.95 * probe["val"]["mAP"], probe["val"]["mAP"], 6)
    assert healthy["healthy"]
    chance = stage1_health(18.0, probe["val"]["mAP"], 6)
    assert not chance["healthy"] and "near chance" in chance["diagnosis"]
    weak = stage1_health(0.7 * probe["val"]["mAP"], probe["val"]["mAP"], 6)
    assert not weak["healthy"] and "below a linear probe" in weak["diagnosis"]


def test_frame_cost_rule():
    # 0.1 x (0.8 - 0.25) / (30 - 3): a tenth of uniform sampling's gain per frame
    assert frame_cost_rule((0.25, 3.0), (0.8, 30.0), 0.1) == pytest.approx(0.1 * 0.55 / 27)
    assert frame_cost_rule((0.5, 3.0), (0.4, 30.0)) == 0.0  # frames hurt: no cost
    assert frame_cost_rule((0.5, 3.0), (0.6, 3.0)) == 0.0


def _trainer(path, tmp_path, **kw):
    kw = {"stage1_steps": 40, **kw}
    config = TrainerConfig(stage1_batch_size=16, recognizer=dict(SMALL_NET),
                           rollout_batch_size=64, **kw)
    return ThreeStageTrainer(path, config, tmp_path, progress=False)


def test_self_check_stops_a_recognizer_left_at_chance(tiny_dataset, tmp_path):
    """lr 0 leaves Stage I at its initialization: the run stops before Stage II, with the
    diagnosis, and the override lets it go on."""
    trainer = _trainer(tiny_dataset, tmp_path / "lr0", stage1_lr=0.0)
    with pytest.raises(Stage1Unhealthy, match="near chance"):
        trainer.run(stop_after="II")
    done = json.loads((tmp_path / "lr0" / "stage1" / "done.json").read_text())
    assert not done["health"]["healthy"] and done["probe"]["val"]["mAP"] > 60
    assert not (tmp_path / "lr0" / "stage2").exists()  # no SAC budget spent
    go_on = _trainer(tiny_dataset, tmp_path / "lr0", stage1_lr=0.0, allow_unhealthy_stage1=True)
    stages = go_on.run(resume=True, stop_after="I")
    assert stages[0].history["health"]["healthy"] is False


def test_self_check_fires_on_shuffled_labels_and_not_on_a_healthy_run(tiny_dataset, tmp_path):
    store = FeatureStore(tiny_dataset, split=None)
    labels = np.asarray(store.labels).copy()
    train = np.asarray(store.splits) == "train"
    labels[train] = np.random.default_rng(0).permutation(labels[train])
    shuffled = _copy_with(tiny_dataset, tmp_path / "shuffled.h5", labels=labels)
    with pytest.raises(Stage1Unhealthy):
        _trainer(shuffled, tmp_path / "shuffled", stage1_lr=3e-3).run(stop_after="I")
    healthy = _trainer(tiny_dataset, tmp_path / "ok", stage1_lr=3e-3, stage1_steps=200)
    history = healthy.run(stop_after="I")[0].history
    assert history["health"]["healthy"], history["health"]
    assert history["frame_cost"]["value"] > 0 and healthy.frame_cost == \
        history["frame_cost"]["value"]


def test_quick_robustness_matrix(tmp_path):
    """The reduced matrix: tiny variants at extreme scales run end to end with one set of
    defaults; Stage I learns far above chance on each."""
    spec = importlib.util.spec_from_file_location("robustness",
                                                  ROOT / "benchmarks" / "robustness.py")
    robustness = importlib.util.module_from_spec(spec)
    sys.modules["robustness"] = robustness  # its dataclasses look their module up
    spec.loader.exec_module(robustness)
    rows = robustness.main(["--quick", "--out", str(tmp_path / "out"), "--data-dir",
                            str(tmp_path / "data"), "--threads", "1"])
    assert [r["dataset"] for r in rows] == [v.name for v in robustness.QUICK]
    for r in rows:
        assert not r.get("failed"), r
        assert r["stage1"] > 2 * 100 / r["C"], r  # far above chance (mAP ~ 1/C)
        assert r["probe"] > 50 and set(r["checks"]) == {
            "stage1_vs_probe", "adaptive_above_open_loop_and_initial",
            "adaptive_above_open_loop_at_its_cost",
            "adaptive_at_most_15pct", "all_within_1_of_uniform25"}
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["matmul_gflops"] > 0
    assert "total wall time" in (tmp_path / "out" / "robustness.txt").read_text()


def test_synthetic_variants_change_what_they_say():
    from features.synthetic import PRESETS, SyntheticWorld

    base = PRESETS["tiny"]
    x_base = SyntheticWorld(base, 0).video(3)[0]
    relu = SyntheticWorld(dataclasses.replace(base, nonnegative=True, feature_scale=100.0),
                          0).video(3)[0]
    np.testing.assert_allclose(relu, 100.0 * np.maximum(x_base, 0), rtol=1e-5)
    distract = SyntheticWorld(dataclasses.replace(base, distractor_prob=0.9), 0)
    assert not np.allclose(distract.video(3)[0], x_base)
    with pytest.raises(ValueError, match="feature_scale"):
        dataclasses.replace(base, feature_scale=0.0)


@pytest.mark.parametrize("temporal", ["lstm", "meanpool"])
def test_pooled_linear_path_is_the_mean_of_every_observed_frame(temporal):
    """The recognizer's pooled linear path: W x averaged over all frames the team observed
    (normalized), the same whether folded at once (Stage I) or step by step (the env)."""
    from vimo_env.recognizer import Recognizer, RecognizerConfig

    torch.manual_seed(0)
    rec = Recognizer(RecognizerConfig(feature_dim=8, num_classes=5, temporal=temporal,
                                      hidden_dim=16, transformer_dim=16,
                                      transformer_layers=1, transformer_ff_dim=32)).eval()
    mean, std = torch.randn(8), torch.rand(8) + 0.5
    rec.set_input_normalization(mean, std)
    frames = torch.randn(2, 3, 6, 8)
    mask = torch.rand(2, 3, 6) > 0.4
    mask[:, :, 0] = True
    folded = rec.fold(frames, mask)
    state = rec.initial_state(2)
    for t in range(6):
        state = rec.observe(state, frames[:, :, t], mask[:, :, t])
    torch.testing.assert_close(rec.logits(folded), rec.logits(state))
    x = (frames - mean) / std
    pooled_mean = (x * mask[..., None]).sum((1, 2)) / mask.sum((1, 2))[:, None]
    torch.testing.assert_close(rec.pooled_logits(state), rec.pooled(pooled_mean))
    assert rec.frame_count(state).tolist() == mask.sum(-1).float().tolist()


def test_stage1_ablation_driver(tiny_dataset, capsys):
    """benchmarks/stage1_ablation.py: KEY=VALUE settings reach Stage1Config and the recognizer;
    one JSON line with the recognizer's and the probe's val / test mAP."""
    spec = importlib.util.spec_from_file_location(
        "stage1_ablation", ROOT / "benchmarks" / "stage1_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    fields, recognizer = ablation.parse(["steps=6", "alternatives=()", "lr=1e-3",
                                         "rec.temporal='meanpool'", "rec.hidden_dim=16"])
    assert fields == {"steps": 6, "alternatives": (), "lr": 1e-3}
    assert recognizer == {"temporal": "meanpool", "hidden_dim": 16}
    result = ablation.main([str(tiny_dataset), "steps=6", "evaluations=2", "alternatives=()",
                            "rec.temporal='meanpool'", "rec.integration='meanpool'"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["steps"] == 6 and [c[0] for c in result["curve"]] == [3, 6]
    assert result["chosen"]["temporal"] == "meanpool"
    assert 0 < result["probe_val_uniform-25"] <= 100 and 0 < result["test_all"] <= 100
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        ablation.parse(["steps"])
