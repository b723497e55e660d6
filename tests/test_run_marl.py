"""benchmarks/run_marl.py end to end on the tiny preset; resume after an interruption."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC_POLICY_KEYS = {"name", "mAP", "top1", "frame_rate", "frames_per_video", "gflops_per_video"}
POLICIES = {"adaptive", "all", "uniform-25", "uniform-50", "random-25", "random-50", "initial",
            "open-loop", "open-loop@adaptive", "probe"}
# the seed peers run after ViMo (benchmarks.comparison)
PEERS = {"liteeval", "afnet", "adafocus", "nsnet"}
PEER_KEYS = SPEC_POLICY_KEYS | {"frames_glanced", "frames_focused"}


def _load_script():
    spec = importlib.util.spec_from_file_location("run_marl", ROOT / "benchmarks" / "run_marl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_marl():
    return _load_script()


@pytest.fixture(scope="module")
def full_run(run_marl, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("marl_full")
    # --data-dir: where the peers' synthetic glance stand-in of the --dataset file is cached
    payload = run_marl.main(["--dataset", str(tiny_dataset), "--budget", "tiny", "--out",
                             str(out), "--seed", "0", "--no-progress", "--data-dir",
                             str(tmp_path_factory.mktemp("marl_data"))])
    return out, payload


def _data_dir(payload: dict) -> str:
    """The full run's --data-dir (where its glance stand-in is cached)."""
    return str(Path(payload["peers"]["glance"]["path"]).parent)


def _fake_run_once(payload: dict, scale=lambda row, args: row):
    """A stand-in for run_marl.run_once that returns the full run's ViMo rows (no training)."""
    from agents.evaluate import EvalResult

    def fake(args, path, budget, sub_out):
        rows = [EvalResult(**scale(p, args), flops_unit=payload["flops_unit"])
                for p in payload["policies"] if p["name"] not in PEERS]
        extra = {k: payload[k] for k in ("stage1_health", "frame_cost", "open_loop_schedule")}
        return {"config": payload["config"], "rows": rows, "stages": [], "extra": extra,
                "trajectories": None}

    return fake


def test_tiny_run_writes_results_files(full_run, tiny_dataset):
    out, payload = full_run
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"dataset", "seed", "config", "policies", "stages", "flops_unit",
                          "wall_time_s"}
    assert saved["dataset"] == str(tiny_dataset) and saved["seed"] == 0
    assert saved["flops_unit"] in ("MACs", "FLOPs") and saved["wall_time_s"] > 0
    assert {p["name"] for p in saved["policies"]} == POLICIES | PEERS
    for p in saved["policies"]:
        assert set(p) == (PEER_KEYS if p["name"] in PEERS else SPEC_POLICY_KEYS)
        assert 0 <= p["mAP"] <= 100 and 0 <= p["top1"] <= 100 and 0 < p["frame_rate"] <= 100
    rows = {p["name"]: p for p in saved["policies"] if p["name"] not in PEERS}
    assert rows["all"]["frame_rate"] == pytest.approx(100.0)
    assert rows["initial"]["frames_per_video"] == 3.0
    # adaptive policies see at most N*(m+1) = 15 frames; cost grows with frames
    assert 3 <= rows["adaptive"]["frames_per_video"] <= 15
    for a in rows.values():
        for b in rows.values():
            if a["frames_per_video"] < b["frames_per_video"] - 1e-9:
                assert a["gflops_per_video"] < b["gflops_per_video"], (a, b)
    assert [s["stage"] for s in saved["stages"]] == ["I", "II", "III"]
    assert all(isinstance(s["improves"], bool) for s in saved["stages"][1:])
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["name"] for r in table if r["kind"] == "policy"} == POLICIES | PEERS
    assert sum(r["kind"].startswith("stage-") for r in table) == 3
    png = (out / "map_vs_gflops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    train = out / "train"
    for part in ("stage1/stage1_best.pt", "stage2/checkpoint.pt", "stage2/best.pt",
                 "stage2/done.json", "stage3/round0/recognizer.pt",
                 "stage3/round0/sac/checkpoint.pt", "stage3/round0/sac/best.pt"):
        assert (train / part).is_file(), part
    assert any((train / "stage2" / "tb").iterdir()) and any((train / "tb").iterdir())
    # replay buffers are only for resuming inside a part: gone once training is complete
    assert not list(train.rglob("buffer-*.h5"))


def test_tiny_run_compares_the_peers_on_the_same_features(full_run, tiny_dataset):
    """The peers ran on the cached synthetic glance stand-in (under --data-dir, not beside the
    --dataset file); their rows carry frames glanced / focused; the matched-uniform references
    stay out of policies, under "peers"."""
    out, payload = full_run
    saved = json.loads((out / "results.json").read_text())
    peers = saved["peers"]
    glance = Path(peers["glance"]["path"])
    assert glance.is_file() and glance.parent != Path(tiny_dataset).parent
    assert peers["glance"]["synthetic"] and peers["focus"]["path"] == str(tiny_dataset)
    assert peers["glance"]["gflops_per_frame"] == pytest.approx(
        0.32 / 4.09 * peers["focus"]["gflops_per_frame"])
    rows = {p["name"]: p for p in saved["policies"]}
    assert set(peers["methods"]) == PEERS
    for name, p in peers["methods"].items():
        assert p["row"] == rows[name] and not p["resumed"] and p["latency_ms"] > 0
        assert rows[name]["frames_glanced"] == 16  # the tiny budget's 16 TSN segments
        assert 0 <= rows[name]["frames_focused"] <= 16
        assert p["uniform"]["name"] not in rows  # references stay out of policies
        assert p["uniform"]["gflops_per_video"] >= rows[name]["gflops_per_video"]
        assert p["train"]["steps"] == 100 and "mAP" in p["val"]
        assert (out / "train" / "peers" / f"{name}.pt").is_file()
    assert peers["latency"]["vimo_ms"] > 0
    assert saved["machine"]["phases"]["peers"] > 0


def test_stage3_keeps_the_recognizer_that_scores_best_on_val(full_run, tiny_dataset,
                                                            tmp_path):
    """Fine-tuning may overfit the training videos: a round returns, of its epochs'
    recognizers, the one with the best val mAP under the current policy (early stopping)."""
    from dataclasses import replace

    from agents.trainer import ThreeStageTrainer, TrainerConfig
    from vimo_env.recognizer import Recognizer

    out, _ = full_run
    saved = json.loads((out / "train" / "trainer_config.json").read_text())
    config = replace(TrainerConfig(**saved["config"]), finetune_epochs=3)
    trainer = ThreeStageTrainer(tiny_dataset, config, tmp_path, progress=False)
    given = Recognizer.load(out / "train" / "stage1" / "stage1_best.pt").eval()
    actor = trainer.load_algorithm(given, out / "train" / "stage2" / "best.pt")
    given_state = {k: v.clone() for k, v in given.state_dict().items()}
    chosen = trainer.finetune(given, actor, tmp_path / "round0", 0, resume=False)
    last = Recognizer.load(out / "train" / "stage1" / "stage1_best.pt").eval()
    ckpt = torch.load(tmp_path / "round0" / "finetune_last.pt", weights_only=False)
    last.load_state_dict(ckpt["model"])
    assert ckpt["epoch"] == 2
    assert trainer.val_score(actor, chosen) == pytest.approx(ckpt["best_val_score"])
    assert ckpt["best_val_score"] >= trainer.val_score(actor, last)
    # the recognizer was fine-tuned (Stage III is never a no-op)
    assert any(not torch.equal(given_state[k], v) for k, v in chosen.state_dict().items())


def test_each_sac_part_keeps_the_policy_that_scores_best_on_val(full_run, tiny_dataset):
    """Stage II's result is the val-best of the policies it scored (before training and after
    each epoch), not simply the last one."""
    from agents.trainer import ThreeStageTrainer, TrainerConfig
    from vimo_env.recognizer import Recognizer

    out, _ = full_run
    saved = json.loads((out / "train" / "trainer_config.json").read_text())
    trainer = ThreeStageTrainer(tiny_dataset, TrainerConfig(**saved["config"]), out / "train",
                                progress=False)
    recognizer = Recognizer.load(out / "train" / "stage1" / "stage1_best.pt").eval()
    part = out / "train" / "stage2"
    best = trainer.val_score(trainer.load_algorithm(recognizer, part / "best.pt"), recognizer)
    last = trainer.val_score(trainer.load_algorithm(recognizer, part / "checkpoint.pt"), recognizer)
    done = json.loads((part / "done.json").read_text())
    # SAC's val-best, or the cloned best schedule when that scores higher on val
    assert best == pytest.approx(max(done["best_val_score"], done["prior_val_score"]))
    assert best >= last and 0 <= done["best_env_step"] <= trainer.config.stage2_env_steps
    assert done["gradient_steps"] > done["update_steps"] > 0


def test_stage3_rounds_start_with_a_critic_warmup(full_run):
    """Stage II trains actor and critics from the start; each Stage III round first fits only
    the critics for the budget's stage3_critic_warmup gradient steps."""
    out, _ = full_run
    warmup = json.loads((out / "train" / "trainer_config.json").read_text())["config"][
        "stage3_critic_warmup"]
    assert warmup == 8

    def sac_config(part: str) -> dict:
        ckpt = torch.load(out / "train" / part / "checkpoint.pt", weights_only=False)
        return ckpt["extra"]["config"]

    assert sac_config("stage2")["critic_warmup_gradient_steps"] == 0
    assert sac_config("stage3/round0/sac")["critic_warmup_gradient_steps"] == warmup


def test_stage2_keeps_the_better_of_sac_and_the_cloned_best_schedule(full_run, tiny_dataset,
                                                                     tmp_path):
    """Stage II's second candidate is the open-loop schedule with the best team return on val
    (mean P(true class) - lambda x frames), cloned into the actors: played deterministically,
    the clone visits the schedule's frames, and the part keeps whichever of it and SAC's
    val-best policy scores higher on val."""
    from agents.baselines import open_loop_selection, search_open_loop
    from agents.evaluate import evaluate_policy
    from agents.policies import CTDEActorPolicy
    from agents.sac_training import seed_everything
    from agents.trainer import ThreeStageTrainer, TrainerConfig
    from vimo_env.recognizer import Recognizer

    out, payload = full_run
    part = out / "train" / "stage2"
    prior = json.loads((part / "prior.json").read_text())
    done = json.loads((part / "done.json").read_text())
    assert payload["schedule_prior"]["schedule"] == prior["schedule"]
    assert payload["schedule_prior"]["stage2_kept"] == done["kept"]
    assert done["kept"] == ("schedule prior" if prior["val_score"] > done["best_val_score"]
                            else "sac")
    config = TrainerConfig(**json.loads((out / "train" / "trainer_config.json").read_text())[
        "config"])
    trainer = ThreeStageTrainer(tiny_dataset, config, out / "train", progress=False)
    trainer.stage1(resume=True)  # reads lambda from the finished Stage I
    recognizer = Recognizer.load(out / "train" / "stage1" / "stage1_selected.pt").eval()
    val = trainer.val_source
    _, table = search_open_loop(recognizer, val, max_moves=config.max_moves,
                                stride=config.stride)
    lam = payload["frame_cost"]["value"]
    returns = {tuple(r["schedule"]): r["p_gt"] - lam * r["frames_per_video"] for r in table}
    assert returns[tuple(prior["schedule"])] == pytest.approx(max(returns.values()))
    assert prior["val_objective"] == pytest.approx(max(returns.values()))

    seed_everything(0)
    algorithm = trainer.build_algorithm(recognizer)
    record = trainer.schedule_prior(recognizer, algorithm, tmp_path)
    assert record["schedule"] == prior["schedule"] and (tmp_path / "prior.json").is_file()
    result = evaluate_policy(CTDEActorPolicy(algorithm), val, recognizer,
                             max_moves=config.max_moves, stride=config.stride)
    frame_index, mask = open_loop_selection(np.asarray(val.lengths), config.num_locators,
                                            prior["schedule"], config.max_moves, config.stride)
    same = [list(frame_index[v, i][mask[v, i]]) == list(frames)
            for v, traj in enumerate(result.trajectories) for i, frames in enumerate(traj)]
    assert np.mean(same) > 0.9, (record["clone_accuracy"], np.mean(same))
    # the kept policy is the better candidate on val
    kept = trainer.val_score(trainer.load_algorithm(recognizer, part / "best.pt"), recognizer)
    assert kept == pytest.approx(max(prior["val_score"], done["best_val_score"]))
    assert record["val_score"] == pytest.approx(prior["val_score"])


def test_stage2_takes_the_cloned_schedule_when_it_wins_on_val(full_run, tiny_dataset, tmp_path):
    """When SAC's val-best score is below the clone's (here: SAC's recorded score lowered, as
    after a crash between the SAC part and the comparison), --resume puts the clone in
    best.pt and records it; a second resume changes nothing."""
    from agents.trainer import ThreeStageTrainer, TrainerConfig

    out, _ = full_run
    train = tmp_path / "train"
    shutil.copytree(out / "train", train)
    done_file = train / "stage2" / "done.json"
    done = json.loads(done_file.read_text())
    done.pop("kept", None)
    done["best_val_score"] = -1.0
    done_file.write_text(json.dumps(done))
    config = TrainerConfig(**json.loads((train / "trainer_config.json").read_text())["config"])
    trainer = ThreeStageTrainer(tiny_dataset, config, train, progress=False)
    stage2 = trainer.stage2(trainer.stage1(resume=True), resume=True)
    assert json.loads(done_file.read_text())["kept"] == "schedule prior"
    prior = torch.load(train / "stage2" / "prior.pt", weights_only=False)
    best = torch.load(stage2.sac, weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(prior), _tensors(best), strict=True))
    before = stage2.sac.stat().st_mtime_ns
    trainer.stage2(trainer.stage1(resume=True), resume=True)
    assert stage2.sac.stat().st_mtime_ns == before


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def test_selection_scores_are_mean_true_class_probability_or_map(full_run, tiny_dataset):
    """val_score is 100 x the mean final P(true class) of the deterministic policy on val by
    default (the reward's objective), or its mAP; other names are refused."""
    from dataclasses import replace

    import numpy as np

    from agents.evaluate import evaluate_policy
    from agents.policies import CTDEActorPolicy
    from agents.trainer import ThreeStageTrainer, TrainerConfig
    from vimo_env.recognizer import Recognizer

    out, _ = full_run
    saved = TrainerConfig(**json.loads((out / "train" / "trainer_config.json").read_text())
                          ["config"])
    assert saved.selection_metric == "p_gt"
    recognizer = Recognizer.load(out / "train" / "stage1" / "stage1_best.pt").eval()
    trainer = ThreeStageTrainer(tiny_dataset, saved, out / "train", progress=False)
    learner = trainer.load_algorithm(recognizer, out / "train" / "stage2" / "best.pt")
    result = evaluate_policy(CTDEActorPolicy(learner), trainer.val_source, recognizer,
                             max_moves=saved.max_moves, stride=saved.stride)
    labels = np.asarray(trainer.val_source.labels)
    p_gt = 100 * result.scores[np.arange(len(labels)), labels].mean()
    assert trainer.val_score(learner, recognizer) == pytest.approx(p_gt)
    by_map = ThreeStageTrainer(tiny_dataset, replace(saved, selection_metric="mAP"),
                               out / "train", progress=False)
    assert by_map.val_score(learner, recognizer) == pytest.approx(result.mAP)
    with pytest.raises(ValueError, match="selection_metric"):
        replace(saved, selection_metric="top1")
    with pytest.raises(ValueError, match="stage3_critic_warmup"):
        replace(saved, stage3_critic_warmup=-1)


class Interrupted(Exception):
    """Stands in for a crash (power loss, pre-emption) in the middle of a training part."""


def test_resume_after_interruption_continues_from_checkpoint(run_marl, full_run, tiny_dataset,
                                                             tmp_path, monkeypatch):
    """Stage II is interrupted after its first epoch (of two), at the moment its second epoch
    would be checkpointed; --resume must train the missing epoch from the epoch-1 checkpoint
    and end with the same counters as an uninterrupted run."""
    import agents.sac_training as sac_training  # where train_sac saves its checkpoints

    reference_dir, reference = full_run
    args = ["--dataset", str(tiny_dataset), "--budget", "tiny", "--out", str(tmp_path),
            "--seed", "0", "--no-progress", "--no-peers"]
    stage2 = tmp_path / "train" / "stage2"
    saves: list[tuple[str, int]] = []  # (part, epoch) of every checkpoint.pt written
    original = sac_training.save_checkpoint
    interrupt_at: tuple[str, int] | None = ("stage2", 2)

    def save_or_crash(algorithm, path, **extra):
        path = Path(path)
        if path.name == "checkpoint.pt":
            part = path.parent.name if path.parent.name != "sac" else path.parent.parent.name
            if (part, extra.get("epoch")) == interrupt_at:
                raise Interrupted(f"crash before {part} epoch {extra['epoch']} was saved")
            saves.append((part, extra.get("epoch")))
        return original(algorithm, path, **extra)

    monkeypatch.setattr(sac_training, "save_checkpoint", save_or_crash)
    with pytest.raises(Interrupted):
        run_marl.main(args)
    assert saves == [("stage2", 1)]  # Stage II stopped after its first of two epochs
    assert not (stage2 / "done.json").exists()
    # the checkpoint names the buffer it was saved with; the crashed epoch's newer buffer
    # (written just before its checkpoint) is not the one a resume reads
    saved = torch.load(stage2 / "checkpoint.pt", weights_only=False)["extra"]
    assert saved["buffer"] == f"buffer-{saved['env_step']}.h5"
    assert {b.name for b in stage2.glob("buffer-*.h5")} == {
        saved["buffer"], f"buffer-{2 * saved['env_step']}.h5"}
    assert not (tmp_path / "train" / "stage3").exists()
    interrupted = torch.load(stage2 / "checkpoint.pt", weights_only=False)["extra"]
    stage1 = tmp_path / "train" / "stage1" / "stage1_best.pt"
    stage1_bytes, stage1_mtime = stage1.read_bytes(), stage1.stat().st_mtime_ns

    interrupt_at, saves[:] = None, []
    resumed = run_marl.main(args + ["--resume"])
    # Stage I was not redone; Stage II trained exactly its missing second epoch, then Stage III
    assert stage1.stat().st_mtime_ns == stage1_mtime and stage1.read_bytes() == stage1_bytes
    assert saves[:2] == [("stage2", 2), ("stage2", 2)]  # the last epoch, then the final save
    assert [p for p, _ in saves[2:]] and all(p == "round0" for p, _ in saves[2:])
    done = json.loads((stage2 / "done.json").read_text())
    expected = json.loads((reference_dir / "train" / "stage2" / "done.json").read_text())
    for counter in ("env_steps", "update_steps", "gradient_steps"):
        assert done[counter] == expected[counter] > 0, counter
    assert done["env_steps"] == 2 * interrupted["env_step"]  # the second epoch really ran
    assert done["update_steps"] > interrupted["gradient_step"]
    assert (tmp_path / "train" / "stage3" / "round0" / "sac" / "checkpoint.pt").is_file()
    ref = {p["name"]: p for p in reference["policies"]}
    got = {p["name"]: p for p in resumed["policies"]}
    assert not PEERS & set(got) and "peers" not in resumed  # --no-peers
    # what does not depend on Stage II/III's learning matches the uninterrupted run
    for name in ("all", "uniform-50", "initial"):
        assert got[name]["frames_per_video"] == ref[name]["frames_per_video"]
    assert resumed["stages"][0] == reference["stages"][0]


def test_resume_with_other_settings_is_refused(run_marl, full_run, tiny_dataset):
    out, _ = full_run
    before = (out / "train" / "trainer_config.json").read_text()
    with pytest.raises(SystemExit, match=r"frame_cost: None -> 0\.05"):
        run_marl.main(["--dataset", str(tiny_dataset), "--budget", "tiny", "--out", str(out),
                       "--seed", "0", "--no-progress", "--lambda", "0.05", "--resume"])
    assert (out / "train" / "trainer_config.json").read_text() == before


def test_sac_overrides_reach_the_learner_and_bad_ones_stop_early(run_marl):
    args = run_marl.parse_args(["--sac", "n_step=3", "--sac", "actor_hidden=32,16",
                                "--sac", "actor_lr=1e-5", "--sac", "difference_credit=0"])
    sac = run_marl.trainer_config(args, "default").sac_config()
    assert (sac.n_step, sac.actor_hidden, sac.actor_lr) == (3, (32, 16), 1e-5)
    assert sac.difference_credit == 0
    assert sac.target_entropy_ratio == 0.2  # the default is kept
    assert run_marl.trainer_config(run_marl.parse_args([]), "default").sac_config(
        ).difference_credit == 0.5
    for bad, match in ((["--sac", "nstep=3"], None), (["--sac", "n_step=three"], None),
                       (["--sac", "n_step=0"], "n_step"),
                       (["--sac", "n_step=3"], "difference_credit > 0 needs n_step=1")):
        with pytest.raises(SystemExit) as info:
            run_marl.trainer_config(run_marl.parse_args(bad), "default")
        if match is not None:
            assert match in str(info.value)


def test_same_seed_same_numbers(run_marl, full_run, tiny_dataset, tmp_path):
    _, reference = full_run
    again = run_marl.main(["--dataset", str(tiny_dataset), "--budget", "tiny", "--out",
                           str(tmp_path), "--seed", "0", "--no-progress", "--data-dir",
                           _data_dir(reference)])
    assert again["policies"] == reference["policies"]
    assert again["stages"] == reference["stages"]


def test_bad_dataset_path_is_reported(run_marl, tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        run_marl.main(["--dataset", str(tmp_path / "missing.h5"), "--out", str(tmp_path)])


def test_default_data_is_photounits_and_synthetic_needs_a_flag(run_marl):
    args = run_marl.parse_args([])
    assert args.dataset is None and args.preset is None and args.photounits == "default"
    assert run_marl.parse_args(["--preset", "tiny"]).preset == "tiny"
    with pytest.raises(SystemExit):
        run_marl.parse_args(["--threads", "0"])
    with pytest.raises(SystemExit):  # one data source at a time
        run_marl.parse_args(["--preset", "tiny", "--photounits", "tiny"])


def test_photounits_run_end_to_end(run_marl, tmp_path, capsys):
    payload = run_marl.main(["--photounits", "tiny", "--data-dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "out"), "--no-progress"])
    assert "photounits-tiny-" in payload["dataset"]
    assert {p["name"] for p in payload["policies"]} == POLICIES | PEERS
    # PhotoUnits builds a real glance beside the dataset: the same frames through Lite0 at
    # 112 px, (112 / 224)^2 of the focus MACs up to the pooled head's share
    glance = payload["peers"]["glance"]
    assert Path(glance["path"]).parent == Path(payload["dataset"]).parent
    assert glance["backbone"] == "efficientnet_lite0@112" and not glance["synthetic"]
    assert glance["feature_dim"] == 1280
    ratio = glance["gflops_per_frame"] / payload["peers"]["focus"]["gflops_per_frame"]
    assert 0.22 < ratio < 0.30
    assert "SYNTHETIC" not in capsys.readouterr().out
    banks = sorted(p.name for p in (tmp_path / "data").glob("photounits-bank-*.npz"))
    assert len(banks) == 2 and sum(b.endswith("-112.npz") for b in banks) == 1  # + glance
    assert payload["flops_unit"] == "MACs"
    # live_latency finds the build's MP4 manifest from the cache folder or the build folder
    spec = importlib.util.spec_from_file_location("live_latency",
                                                  ROOT / "benchmarks" / "live_latency.py")
    live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live)
    build = Path(payload["dataset"]).parent
    manifest = live.photounits_manifest(tmp_path / "data", "tiny")
    assert manifest.is_file() and manifest.is_relative_to(build)
    assert live.photounits_manifest(build, "tiny") == manifest
    assert len(list((tmp_path / "data").glob("photounits-tiny-*"))) == 1  # nothing rebuilt
    # the bounds script drives the same actors and recognizer: its "learned" row is Table 2's
    spec = importlib.util.spec_from_file_location("bounds",
                                                  ROOT / "benchmarks" / "photounits_bounds.py")
    bounds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bounds)
    rows = {r["policy"]: r for r in bounds.main(["--run-dir", str(tmp_path / "out"),
                                                 "--preset", "tiny",
                                                 "--out", str(tmp_path / "bounds.json")])}
    saved = json.loads((tmp_path / "bounds.json").read_text())
    assert [r["policy"] for r in saved["policies"]] == list(bounds.POLICIES)
    adaptive = next(p for p in payload["policies"] if p["name"] == "adaptive")
    assert rows["learned"]["mAP"] == pytest.approx(adaptive["mAP"])
    assert rows["learned"]["frames_per_video"] == pytest.approx(adaptive["frames_per_video"])
    # at most 5 frames a locator; stopping on units only saves frames
    assert rows["countdown"]["frames_per_video"] <= 15.0
    assert rows["countdown+stop"]["frames_per_video"] <= rows["countdown"]["frames_per_video"]
    with pytest.raises(SystemExit, match="not PhotoUnits 'default'"):
        bounds.main(["--run-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no trainer_config.json"):
        bounds.main(["--run-dir", str(tmp_path / "data")])


def test_tiny_run_draws_its_figures_from_its_files(full_run, tmp_path):
    """trajectories.json (a few test videos of different classes, random-25 / uniform-25 /
    adaptive, then each peer's glanced and focused frames) and the figures; python -m
    benchmarks.plots redraws them without training."""
    import subprocess
    import sys

    from benchmarks import plots
    from benchmarks.figure_data import load_trajectories

    out, payload = full_run
    data = load_trajectories(out / "trajectories.json")
    names = [s["name"] for s in data["strategies"]]
    assert names == ["random-25", "uniform-25", "adaptive", *payload["peers"]["methods"]]
    labels = [v["label"] for v in data["videos"]]
    assert len(labels) == 4 and len(set(labels)) == 4
    assert data["unit_labels"] is not None  # the synthetic generator's units were found
    for k, video in enumerate(data["videos"]):
        assert len(video["colors"]) == len(video["units"]) == video["length"]
        for s in data["strategies"]:
            lanes = s["videos"][k]["frames"]
            assert len(lanes) == (2 if s["kind"] == "peer" else 3)
            assert all(lane == sorted(lane) and all(0 <= t < video["length"] for t in lane)
                       for lane in lanes)
            if s["kind"] == "peer":  # focused frames are glanced frames
                assert set(lanes[1]) <= set(lanes[0]) and lanes[0]
    for name in ("trajectories.png", "map_vs_gflops.png"):
        assert 5_000 < (out / name).stat().st_size < 300_000, name
    drawn = plots.draw_all(out, tmp_path)
    peers = len(payload["peers"]["methods"])
    assert drawn["trajectories.png"]["panels"] == 4 * (3 + peers)
    assert drawn["trajectories.png"]["peer_panels"] == 4 * peers > 0
    best = max(p["mAP"] for p in payload["policies"])
    far = any(p["mAP"] < best - plots.ZOOM_SPAN for p in payload["policies"])
    assert drawn["map_vs_gflops.png"]["panels"] == (2 if far else 1)
    assert "sweep_max_moves.png" not in drawn
    cli = subprocess.run([sys.executable, "-m", "benchmarks.plots", str(out), "--out",
                          str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert {p.name for p in (tmp_path / "cli").glob("*.png")} == {"trajectories.png",
                                                                  "map_vs_gflops.png"}
    assert any((out / "train" / "tb" / "hparams").iterdir())  # the run's hparams


def test_sweep_max_moves_runs_each_value_and_draws_figure_3(run_marl, full_run, tiny_dataset,
                                                          tmp_path, monkeypatch):
    """--sweep max_moves (default 3,4,5,6) reruns the pipeline per m and draws the sweep's
    mAP-GFLOPs curve with the baselines (the per-value runs are stood in for by the tiny run's
    rows, scaled, so that no more training runs here)."""
    out, payload = full_run
    seen: list[tuple[int, Path]] = []
    fake = _fake_run_once(payload, lambda p, args: {
        **p, "mAP": p["mAP"] - (4 - args.max_moves),
        "gflops_per_video": p["gflops_per_video"] * args.max_moves / 4})

    def fake_run_once(args, path, budget, sub_out):
        seen.append((args.max_moves, sub_out))
        if sub_out == tmp_path:  # the main run: its finished Stage I is the full run's
            shutil.copytree(out / "train" / "stage1", tmp_path / "train" / "stage1")
        else:  # a sweep run starts from a copy of it and resumes there
            assert args.resume
            assert (sub_out / "train" / "stage1" / "done.json").read_text() == (
                out / "train" / "stage1" / "done.json").read_text()
        return fake(args, path, budget, sub_out)

    monkeypatch.setattr(run_marl, "run_once", fake_run_once)
    assert run_marl.parse_args(["--sweep", "max_moves"]).sweep == "max_moves"
    swept = run_marl.main(["--dataset", str(tiny_dataset), "--budget", "tiny", "--out",
                           str(tmp_path), "--no-progress", "--sweep", "max_moves",
                           "--no-peers", "--data-dir", str(tmp_path / "data")])
    # --no-peers: no peer rows, no peers record, no glance stand-in built
    assert not PEERS & {p["name"] for p in swept["policies"]} and "peers" not in swept
    assert not (tmp_path / "data").exists() and not (tmp_path / "train" / "peers").exists()
    # m = 4 is the main run's own value: its row is the main run's, not trained again
    assert [m for m, _ in seen] == [4, 3, 5, 6]
    assert [p.name for _, p in seen[1:]] == [f"sweep-max_moves-{m}" for m in (3, 5, 6)]
    assert [s["value"] for s in swept["sweep"]] == [3, 4, 5, 6]
    main_adaptive = swept["policies"][0]
    assert main_adaptive["name"] == swept["sweep"][1]["name"]
    assert swept["sweep"][1]["mAP"] == main_adaptive["mAP"]
    assert all(s["sweep"] == "max_moves" for s in swept["sweep"])
    png = tmp_path / "sweep_max_moves.png"
    assert 5_000 < png.stat().st_size < 300_000
    from benchmarks import plots

    info = plots.draw_all(tmp_path, tmp_path / "again")["sweep_max_moves.png"]
    assert info["values"] == [3, 4, 5, 6] and info["panels"] in (1, 2)


def test_lambda_sweep_reuses_stage1_with_the_swept_lambda(run_marl, full_run, tmp_path):
    out, _ = full_run
    with pytest.raises(FileNotFoundError, match="not finished"):
        run_marl.reuse_stage1(tmp_path / "nothing", tmp_path / "sweep", frame_cost=0.5)
    run_marl.reuse_stage1(out / "train", tmp_path / "sweep" / "train", frame_cost=0.25)
    copied = json.loads((tmp_path / "sweep" / "train" / "stage1" / "done.json").read_text())
    original = json.loads((out / "train" / "stage1" / "done.json").read_text())
    assert copied["frame_cost"] == {"value": 0.25, "rule": "given"}
    assert {k: v for k, v in copied.items() if k != "frame_cost"} == {
        k: v for k, v in original.items() if k != "frame_cost"}
    assert not (tmp_path / "sweep" / "train" / "stage1.partial").exists()


def test_peer_sweep_adds_each_peers_operating_points(run_marl, full_run, tiny_dataset,
                                                     tmp_path, monkeypatch, capsys):
    """--peer-sweep: each peer trained again at another value of its budget knob; the points
    go to results.json peers.sweep, the printed table and map_vs_gflops.png (one curve per
    peer); the run's own peers are loaded (--resume), not retrained."""
    import shutil

    from benchmarks import comparison, plots

    out, payload = full_run
    shutil.copytree(out / "train" / "peers", tmp_path / "train" / "peers")
    monkeypatch.setattr(run_marl, "run_once", _fake_run_once(payload))
    one_more = {"liteeval": ("gamma", (0.3,)), "afnet": ("ratio", (0.5,)),
                "adafocus": ("ratio", (0.5,)), "nsnet": ("k", (3,))}
    monkeypatch.setattr(comparison, "BUDGET_KNOBS", one_more)
    swept = run_marl.main(["--dataset", str(tiny_dataset), "--budget", "tiny", "--out",
                           str(tmp_path), "--seed", "0", "--no-progress", "--resume",
                           "--peer-sweep", "--glance", payload["peers"]["glance"]["path"]])
    sweep = swept["peers"]["sweep"]
    assert set(sweep) == PEERS and "Peer operating points" in capsys.readouterr().out
    for name, entry in sweep.items():
        knob, (value,) = one_more[name]
        own = swept["peers"]["methods"][name]
        assert entry["knob"] == knob and own["resumed"]
        assert sorted(p["value"] for p in entry["points"]) == sorted(
            [value, own["args"][knob]])
        assert {p["mAP"] for p in entry["points"]} >= {own["row"]["mAP"]}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["peers"]["sweep"] == sweep
    assert plots.draw_all(tmp_path)["map_vs_gflops.png"]["peer_curves"] == len(PEERS)


def test_resume_loads_finished_peers(run_marl, full_run, tiny_dataset, tmp_path, monkeypatch):
    """--resume: a finished peer (checkpoint and record under DIR/train/peers) is loaded and
    evaluated, not retrained, and scores as the run that trained it; unknown peers are
    refused."""
    import shutil

    from benchmarks import comparison

    out, payload = full_run
    shutil.copytree(out / "train" / "peers", tmp_path / "train" / "peers")
    monkeypatch.setattr(run_marl, "run_once", _fake_run_once(payload))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished peer was retrained under --resume")

    for module, _ in comparison.PEERS.values():
        monkeypatch.setattr(module, "train", no_training)
    resumed = run_marl.main(["--dataset", str(tiny_dataset), "--budget", "tiny", "--out",
                             str(tmp_path), "--seed", "0", "--no-progress", "--resume",
                             "--glance", payload["peers"]["glance"]["path"]])  # (checked)
    ref = {p["name"]: p for p in payload["policies"] if p["name"] in PEERS}
    got = {p["name"]: p for p in resumed["policies"] if p["name"] in PEERS}
    assert got == ref
    for name, p in resumed["peers"]["methods"].items():
        before = payload["peers"]["methods"][name]
        assert p["resumed"] and p["uniform"] == before["uniform"]
        assert p["train"] == before["train"]  # the training record travels with the checkpoint
    assert resumed["peers"]["latency"]["vimo_ms"] is None  # (no ViMo policy in the stand-in)
    assert resumed["peers"]["glance"]["stand_in_built_now"] is None  # --glance given
    with pytest.raises(SystemExit, match="not found"):
        run_marl.main(["--dataset", str(tiny_dataset), "--glance", str(tmp_path / "no.h5")])
    for bad in ("notapeer", "liteeval,nope", ","):
        with pytest.raises(SystemExit):
            run_marl.parse_args(["--peers", bad])
    assert run_marl.parse_args(["--peers", "afnet"]).peers == ["afnet"]
    assert run_marl.parse_args(["--no-peers"]).peers == []


def test_trajectory_logger_logs_a_figure_per_epoch(full_run, tiny_dataset, tmp_path):
    """The SAC epoch callback (benchmarks.plots.trajectory_logger) draws 4 fixed val videos'
    trajectories under the learner's policy into TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from agents.trainer import ThreeStageTrainer, TrainerConfig
    from benchmarks import plots
    from vimo_env.recognizer import Recognizer

    out, _ = full_run
    saved = json.loads((out / "train" / "trainer_config.json").read_text())
    config = TrainerConfig(**saved["config"])
    trainer = ThreeStageTrainer(tiny_dataset, config, tmp_path / "t", progress=False)
    recognizer = Recognizer.load(out / "train" / "stage1" / "stage1_best.pt").eval()
    learner = trainer.load_algorithm(recognizer, out / "train" / "stage2" / "best.pt")
    factory = plots.trajectory_logger(max_moves=config.max_moves, stride=config.stride,
                                      dataset=tiny_dataset)
    callback = factory(recognizer, trainer.val_source)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        callback(learner, 128, writer)
        callback(learner, 256, writer)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    images = events.Images("trajectories/val")
    assert [i.step for i in images] == [128, 256] and images[0].height > 300


def _subprocess_command(tiny_dataset, out: Path) -> list[str]:
    import sys

    return [sys.executable, str(ROOT / "benchmarks" / "run_marl.py"), "--dataset",
            str(tiny_dataset), "--budget", "tiny", "--out", str(out), "--seed", "0",
            "--no-progress", "--no-peers", "--threads", "1"]


@pytest.fixture(scope="module")
def uninterrupted_subprocess_run(tiny_dataset, tmp_path_factory):
    """The kill -9 test's command run through once, in a subprocess of its own (the same
    threads and process set-up as the killed run, so weights can be compared bit for bit)."""
    import os
    import subprocess

    out = tmp_path_factory.mktemp("marl_uninterrupted")
    subprocess.run(_subprocess_command(tiny_dataset, out), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   check=True)
    return out


@pytest.mark.parametrize("part", ["stage2", "stage3/round0/sac"])
def test_kill_9_inside_a_sac_part_then_resume_finishes_the_same_budget(
        uninterrupted_subprocess_run, tiny_dataset, tmp_path, part):
    """A real crash: run_marl.py in a subprocess gets SIGKILL as soon as the SAC part has
    written its first checkpoint (wherever it then is: collecting, updating, writing the next
    buffer); --resume then finishes every stage with the same counters as an uninterrupted run
    of the same seed, the checkpoint's buffer is the one it names, and every learner and
    score is bit for bit the uninterrupted run's (the checkpoint holds the in-flight
    episodes; see agents/sac_training.py)."""
    import os
    import signal
    import subprocess
    import time

    reference_dir = uninterrupted_subprocess_run
    out = tmp_path / "run"
    cmd = _subprocess_command(tiny_dataset, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoint = out / "train" / part / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its SAC part checkpointed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(checkpoint, weights_only=False)["extra"]
    assert (checkpoint.parent / saved["buffer"]).is_file()
    assert not (out / "results.json").exists()
    done = subprocess.run(cmd + ["--resume"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "results.json").is_file()
    for counted in ("stage2/done.json", "stage3/round0/sac/done.json"):
        got = json.loads((out / "train" / counted).read_text())
        expected = json.loads((reference_dir / "train" / counted).read_text())
        for counter in ("env_steps", "update_steps", "gradient_steps"):
            assert got[counter] == expected[counter] > 0, (counted, counter)
    # and the same learners, bit for bit: every SAC part's result and the final scores
    for ckpt in ("stage2/checkpoint.pt", "stage2/best.pt", "stage3/round0/sac/checkpoint.pt",
                 "stage3/round0/sac/best.pt"):
        got = torch.load(out / "train" / ckpt, weights_only=False)["algorithm"]
        expected = torch.load(reference_dir / "train" / ckpt, weights_only=False)["algorithm"]
        assert got.keys() == expected.keys()
        for key in got:
            if isinstance(got[key], torch.Tensor):
                assert torch.equal(got[key], expected[key]), (ckpt, key)
    rows = json.loads((out / "results.json").read_text())["policies"]
    reference_rows = json.loads((reference_dir / "results.json").read_text())["policies"]
    assert [(r["name"], r["mAP"], r["frames_per_video"]) for r in rows
            if r["name"] not in PEERS] == [(r["name"], r["mAP"], r["frames_per_video"])
                                           for r in reference_rows if r["name"] not in PEERS]


def test_policy_generalization_script_plays_each_policy_on_train_and_val(full_run, tmp_path):
    """benchmarks/policy_generalization.py: per split, initial, uniform-25 and each checkpoint;
    the cloned schedule's val row matches what Stage II recorded for it."""
    spec = importlib.util.spec_from_file_location(
        "policy_generalization", ROOT / "benchmarks" / "policy_generalization.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, payload = full_run
    rows = script.main(["--run", str(out), "--checkpoints", "stage2/prior.pt",
                        "stage2/checkpoint.pt"])
    assert [(r["split"], r["policy"]) for r in rows] == [
        (split, policy) for split in ("train", "val")
        for policy in ("initial", "uniform-25", "stage2/prior.pt", "stage2/checkpoint.pt")]
    lam = payload["frame_cost"]["value"]
    for r in rows:
        assert 0 <= r["p_gt"] <= 1
        assert r["objective"] == pytest.approx(r["p_gt"] - lam * r["frames_per_video"])
    prior = json.loads((out / "train" / "stage2" / "prior.json").read_text())
    (val_clone,) = [r for r in rows if r["split"] == "val" and r["policy"] == "stage2/prior.pt"]
    assert val_clone["p_gt"] * 100 == pytest.approx(prior["val_score"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        script.measure(out, ["stage2/missing.pt"])
    (tmp_path / "train").mkdir()  # a run whose Stage I never finished: nothing is trained
    shutil.copy(out / "train" / "trainer_config.json", tmp_path / "train")
    with pytest.raises(FileNotFoundError, match="stage1/done.json"):
        script.measure(tmp_path, ["stage2/best.pt"])
    assert os.listdir(tmp_path / "train") == ["trainer_config.json"]


def test_a_stage1_cache_from_before_a_later_stage_setting_still_resumes(full_run, tiny_dataset,
                                                                        tmp_path):
    """A run saved before ``schedule_prior_steps`` existed: while it has no Stage II, settings
    only Stage II-III read may differ (Stage I caches of the RLlib and BenchMARL front-ends);
    once Stage II exists, the field counts with the value it had in effect then (0)."""
    from agents.trainer import SettingsMismatch, ThreeStageTrainer, TrainerConfig

    out, _ = full_run
    train = tmp_path / "train"
    shutil.copytree(out / "train" / "stage1", train / "stage1")
    saved = json.loads((out / "train" / "trainer_config.json").read_text())
    old_config = {k: v for k, v in saved["config"].items() if k != "schedule_prior_steps"}
    (train / "trainer_config.json").write_text(json.dumps({**saved, "config": old_config}))
    config = TrainerConfig(**{**old_config, "stage2_env_steps": 2048})
    (stage1,) = ThreeStageTrainer(tiny_dataset, config, train, progress=False).run(
        resume=True, stop_after="I")
    assert stage1.recognizer.is_file()

    (train / "trainer_config.json").write_text(json.dumps({**saved, "config": old_config}))
    (train / "stage2").mkdir()
    with pytest.raises(SettingsMismatch, match="schedule_prior_steps: 0 -> 200"):
        ThreeStageTrainer(tiny_dataset, TrainerConfig(**saved["config"]), train,
                          progress=False).run(resume=True, stop_after="I")
    legacy = TrainerConfig(**{**saved["config"], "schedule_prior_steps": 0})
    ThreeStageTrainer(tiny_dataset, legacy, train, progress=False).run(resume=True,
                                                                       stop_after="I")


def test_the_cloned_candidate_leaves_sac_untouched(full_run, tiny_dataset, tmp_path):
    """Building the candidate draws nothing from SAC's random streams: with and without it,
    Stage II's SAC ends in the same weights and the same val-best score."""
    from agents.trainer import ThreeStageTrainer, TrainerConfig

    out, _ = full_run
    saved = json.loads((out / "train" / "trainer_config.json").read_text())["config"]
    results = []
    for steps in (0, saved["schedule_prior_steps"]):
        train = tmp_path / f"prior{steps}"
        shutil.copytree(out / "train" / "stage1", train / "stage1")
        trainer = ThreeStageTrainer(tiny_dataset, TrainerConfig(**{
            **saved, "schedule_prior_steps": steps}), train, progress=False)
        trainer.stage2(trainer.stage1(resume=True), resume=False)
        done = json.loads((train / "stage2" / "done.json").read_text())
        last = torch.load(train / "stage2" / "checkpoint.pt", weights_only=False)
        results.append((done, last))
        assert (train / "stage2" / "prior.pt").is_file() == (steps > 0)
    (done0, last0), (done1, last1) = results
    assert done0["best_val_score"] == done1["best_val_score"] and "kept" not in done0
    weights = [list(_tensors(last["algorithm"])) for last in (last0, last1)]
    assert len(weights[0]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
