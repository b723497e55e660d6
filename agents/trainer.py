"""The three-stage ViMo trainer (SPEC sections 3-4; ViMo section 3.3, App. A).

* **Stage I** - :func:`agents.stage1.train_stage1`: F_T, F_M and classifier with cross-entropy
  on random 25% per-segment samples.
* **Stage II** - recognizer frozen; the locators learn with CTDE discrete SAC
  (:func:`agents.sac_training.train_sac`) in the batched env (``VideoLocatorsVectorEnv``). A second
  candidate, the best open-loop schedule on val cloned into the actors
  (:meth:`ThreeStageTrainer.schedule_prior`), is kept instead when it scores higher on val.
* **Stage III** - ``rounds`` alternations of (a) fine-tuning the recognizer for ``K`` epochs on
  the frames the current policy visits (the sampling policy rolled out over the training
  videos in the batched core; each locator's visited positions, in order, fed to
  ``Recognizer.forward``; cross-entropy), then (b) SAC on the frozen updated recognizer with
  fresh replay data (the observations ``h_i`` shifted with the recognizer).

Model selection (val split, never test): each SAC part keeps the policy with the best val score
among the one it started from and each epoch's (``<part>/best.pt``, ``select_on_val``); each
fine-tuning keeps the val-best of its epochs' recognizers (early stopping). The score
(``selection_metric``) is the mean final probability of the true class by default - the
quantity the team reward sums to, and far less noisy on a few hundred videos than mAP, which
moves when two videos swap ranks - or val mAP.

Checkpoints: Stage I writes ``stage1/stage1_last.pt`` every epoch; SAC writes
``<stage>/checkpoint.pt`` and ``buffer-<env step>.h5`` every epoch (the buffers, 0.6 GB each on
PhotoUnits, are deleted when all three stages are done: only a resume inside a part reads them);
fine-tuning
writes ``stage3/round<r>/finetune_last.pt`` every epoch; each finished part leaves a
``done.json``.
``resume=True`` skips finished parts and continues the unfinished one from its checkpoint.
TensorBoard: Tianshou's ``TensorboardLogger`` under ``<part>/tb`` (SAC) and ``tb/`` (recognizer
losses); tqdm progress bars throughout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from agents.augment import FeatureNoiseSource, calibrate_noise
from agents.baselines import best_schedule, search_open_loop
from agents.ctde_sac import (
    CTDESAC,
    SACConfig,
    build_ctde_sac,
    clone_actor,
    load_checkpoint,
    save_checkpoint,
)
from agents.evaluate import evaluate_policy
from agents.metrics import mean_true_class_probability
from agents.policies import CTDEActorPolicy
from agents.probe import linear_probe, stage1_health
from agents.sac_training import seed_everything, train_sac
from agents.selection import evaluate_selection, gather_padded
from agents.stage1 import LIGHT_RECOGNIZER, Stage1Config, train_stage1
from agents.stage1 import SELECTED as STAGE1_SELECTED
from features.atomic import atomic_path, torch_save_atomic, write_text_atomic
from features.source import CachedFrameSource, FrameSource
from vimo_env.core import observed_step
from vimo_env.gym_env import VideoLocatorsVectorEnv
from vimo_env.recognizer import Recognizer

SELECTION_METRICS = ("p_gt", "mAP")


# Stage I of the tiny smoke budget (small networks, a few hundred steps; on 72 train videos
# it may fall short of the probe, so the self-check reports but does not stop it). One recipe
# for benchmarks/run_marl.py --budget tiny and the RLlib / BenchMARL front-ends.
TINY_STAGE1: dict[str, Any] = dict(
    stage1_steps=300, stage1_lr=3e-3, allow_unhealthy_stage1=True,
    recognizer=dict(hidden_dim=32, transformer_layers=1, transformer_dim=32,
                    transformer_ff_dim=64, forward_dim=64),
)


@dataclass
class TrainerConfig:
    """Everything the three stages need. The defaults are one recipe for every dataset: nothing
    is chosen by a dataset's name (docs/experiments.md has the measurements behind them).

    ``recognizer``: RecognizerConfig options (``temporal``, ``integration``, ...). ``sac``:
    SACConfig overrides. ``frame_cost`` is lambda of Eq. 6; ``None`` (the default) derives it
    from the data after Stage I (:func:`frame_cost_rule`).
    """

    num_locators: int = 3
    max_moves: int = 4
    stride: int = 3
    frame_cost: float | None = None
    frame_cost_fraction: float = 0.1  # kappa of frame_cost_rule
    seed: int = 0
    device: str = "cpu"
    recognizer: dict = field(default_factory=dict)
    # Stage I (agents.stage1: a budget in gradient steps derived from the train split)
    stage1_steps: int | None = None
    stage1_lr: float = 3e-4
    stage1_batch_size: int = 32
    # recognizers trained beside ``recognizer`` in Stage I; the best on val is kept (default:
    # the paper's light mean-pool variant; [] = ``recognizer`` only)
    stage1_alternatives: list[dict] = field(
        default_factory=lambda: [dict(LIGHT_RECOGNIZER)])
    # the self-check after Stage I: Stage I's val mAP must reach this fraction of the linear
    # probe's; below it the run stops before SAC unless allow_unhealthy_stage1
    stage1_health_fraction: float = 0.9
    allow_unhealthy_stage1: bool = False
    # Stage II
    stage2_env_steps: int = 32_000
    # a second Stage II candidate: actors behaviour-cloned (this many gradient steps) to the
    # open-loop schedule with the best team return on val (mean P(true class) - lambda x
    # frames); with select_on_val it is kept instead of SAC's val-best policy when it scores
    # higher on val (0 = SAC alone, the paper; docs/experiments.md 2c)
    schedule_prior_steps: int = 1000
    sac: dict = field(default_factory=dict)
    # Gaussian noise on the frames SAC's env reads from the train split (agents.augment), in
    # units of the recognizer's input std: a number, or "auto" (calibrated on the data, per
    # SAC part); 0 = none
    sac_feature_noise: float | str = 0.0
    # SAC's training episodes start each locator up to this many frames into its segment
    # (LocatorCore.set_start_jitter; evaluation always starts on the segment's first frame)
    sac_start_jitter: int = 0
    # Stage III
    stage3_rounds: int = 2
    finetune_epochs: int = 2  # K: recognizer epochs before switching back to SAC
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    stage3_env_steps: int = 10_000  # SAC env steps per round
    # each round's SAC first fits only the critics to the fine-tuned recognizer's observations
    # and rewards for this many gradient steps (SACConfig.critic_warmup_gradient_steps)
    stage3_critic_warmup: int = 200
    rollout_batch_size: int = 1024
    # keep, in each SAC part, the policy with the best val score (scored every SAC epoch)
    select_on_val: bool = True
    selection_metric: str = "p_gt"  # "p_gt" (mean final P(true class), x100) or "mAP"

    def __post_init__(self) -> None:
        for name in ("num_locators", "max_moves", "stride", "finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainerConfig.{name} must be an integer >= 1, got {value!r}")
        if self.frame_cost is not None and not self.frame_cost >= 0:
            raise ValueError(f"TrainerConfig.frame_cost must be None or >= 0, got "
                             f"{self.frame_cost}")
        if self.selection_metric not in SELECTION_METRICS:
            raise ValueError(f"TrainerConfig.selection_metric must be one of {SELECTION_METRICS}, "
                             f"got {self.selection_metric!r}")
        noise = self.sac_feature_noise
        if not (noise == "auto" or (isinstance(noise, (int, float)) and not isinstance(noise, bool)
                                    and math.isfinite(noise) and noise >= 0)):
            raise ValueError(f"TrainerConfig.sac_feature_noise must be a number >= 0 or 'auto', "
                             f"got {noise!r}")
        for name in ("stage3_critic_warmup", "schedule_prior_steps", "sac_start_jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainerConfig.{name} must be an integer >= 0, got {value!r}")

    def sac_config(self, seed_offset: int = 0, **overrides: Any) -> SACConfig:
        values: dict[str, Any] = dict(
            actor_hidden=(256, 256), critic_hidden=(256, 256), actor_lr=3e-4, critic_lr=1e-3,
            alpha_lr=1e-3, batch_size=128, tau=0.02, gamma=0.99, n_step=1,
            target_entropy_ratio=0.2, init_alpha=0.02, num_envs=128, collect_env_steps=256,
            updates_per_env_step=0.15, epoch_env_steps=4096, warmup_env_steps=1024,
            buffer_size=50_000, difference_credit=0.5,
        )
        values.update(self.sac)
        values.update(overrides)
        values["seed"] = self.seed + seed_offset
        values["device"] = self.device
        return SACConfig(**values)


def _write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


@dataclass
class StageArtifacts:
    """Where the result of one stage lives: its recognizer and (II, III) its SAC checkpoint."""

    stage: str
    recognizer: Path
    sac: Path | None
    history: dict = field(default_factory=dict)


class ThreeStageTrainer:
    """Runs Stage I, II and III on a ``vimo-features`` file, writing under ``out_dir``."""

    def __init__(self, features_path: str | os.PathLike, config: TrainerConfig,
                 out_dir: str | os.PathLike, progress: bool = True,
                 sac_epoch_callback: Any = None) -> None:
        """``sac_epoch_callback``: optional factory ``(recognizer, val_source) -> callback``;
        each SAC part calls the callback after every epoch (``train_sac``'s
        ``epoch_callback``), e.g. to log trajectory figures to TensorBoard."""
        self.path = Path(features_path)
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.sac_epoch_callback = sac_epoch_callback
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_source = source_for(self.path, "train", config.device)
        self._val_source: FrameSource | None = None  # read on first use
        self._logger = None
        self.frame_cost = config.frame_cost  # lambda; resolved by stage1() when None
        self.phase_times: dict[str, float] = {}  # wall seconds of what run() ran

    # ------------------------------------------------------------ helpers
    @property
    def logger(self) -> Any:
        if self._logger is None:
            from tianshou.utils import TensorboardLogger
            from torch.utils.tensorboard import SummaryWriter

            self._logger = TensorboardLogger(SummaryWriter(str(self.out / "tb")))
        return self._logger

    def _env_factory(self, recognizer: Recognizer, locator_credit: bool | None = None,
                     noise: torch.Tensor | None = None, start_jitter: int = 0):
        c = self.config
        train = self.train_source
        # default: as the learner needs it (it reads info["locator_credit"])
        credit = (c.sac_config().difference_credit > 0 if locator_credit is None
                  else locator_credit)

        def factory(num_envs: int, seed: int) -> VideoLocatorsVectorEnv:
            source = train if noise is None else FeatureNoiseSource(train, noise, seed)
            env = VideoLocatorsVectorEnv(
                num_envs, features=source, recognizer=recognizer, split="train",
                num_locators=c.num_locators, max_moves=c.max_moves, stride=c.stride,
                frame_cost=self.frame_cost, device=c.device, seed=seed, locator_credit=credit)
            if start_jitter:
                env.core.set_start_jitter(start_jitter, seed)
            return env

        return factory

    def build_algorithm(self, recognizer: Recognizer, seed_offset: int = 0) -> CTDESAC:
        """A fresh CTDE SAC learner with this config's shapes."""
        obs_dim = recognizer.embedding_dim + 3
        config = self.config.sac_config(seed_offset)
        return build_ctde_sac(obs_dim, self.config.num_locators, config)

    def load_algorithm(self, recognizer: Recognizer, checkpoint: Path) -> CTDESAC:
        algorithm = self.build_algorithm(recognizer)
        load_checkpoint(algorithm, checkpoint)
        return algorithm

    @property
    def val_source(self) -> FrameSource:
        """The val split, read once per trainer on first use."""
        if self._val_source is None:
            self._val_source = source_for(self.path, "val", self.config.device)
        return self._val_source

    def val_score(self, algorithm: CTDESAC, recognizer: Recognizer) -> float:
        """Model-selection score of the deterministic policy on the val split, higher is
        better: ``selection_metric`` "p_gt" (100 x mean final P(true class)) or "mAP"."""
        c = self.config
        result = evaluate_policy(CTDEActorPolicy(algorithm), self.val_source, recognizer,
                                 max_moves=c.max_moves, stride=c.stride,
                                 batch_size=c.rollout_batch_size, device=c.device,
                                 keep_trajectories=False)
        if c.selection_metric == "mAP":
            return result.mAP
        return 100.0 * mean_true_class_probability(result.scores, self.val_source.labels)

    def _sac(self, part: Path, recognizer: Recognizer, env_steps: int, resume: bool,
             algorithm: CTDESAC | None, seed_offset: int, critic_warmup: int) -> Path:
        """SAC on the frozen ``recognizer``; returns the checkpoint that is this part's result
        (``best.pt``, the val-best policy, with ``select_on_val``; else the last state)."""
        done = part / "done.json"
        result_file = part / ("best.pt" if self.config.select_on_val else "checkpoint.pt")
        if resume and done.is_file():
            return result_file
        score_fn = None
        if self.config.select_on_val:
            def score_fn(learner: CTDESAC) -> float:
                return self.val_score(learner, recognizer)
        warmup = {"critic_warmup_gradient_steps": critic_warmup} if critic_warmup else {}
        sac_config = self.config.sac_config(seed_offset, **warmup)
        epoch_callback = (self.sac_epoch_callback(recognizer, self.val_source)
                          if self.sac_epoch_callback is not None else None)
        env_factory = self._env_factory(recognizer,
                                        noise=self._feature_noise(recognizer, part, resume),
                                        start_jitter=self.config.sac_start_jitter)
        result = train_sac(env_factory, sac_config,
                           env_steps=env_steps, out_dir=part,
                           resume=resume and (part / "checkpoint.pt").is_file(),
                           algorithm=algorithm, show_progress=self.progress, score_fn=score_fn,
                           epoch_callback=epoch_callback)
        _write_json_atomic({"env_steps": result.env_steps, "update_steps": result.update_steps,
                            "gradient_steps": result.gradient_steps,
                            "best_val_score": result.best_score,
                            # SAC's val-best (0: the policy it started from); stage2 may
                            # then keep the cloned schedule instead ("kept")
                            "best_env_step": result.best_env_step,
                            "selection_metric": self.config.selection_metric}, done)
        return result_file

    def _feature_noise(self, recognizer: Recognizer, part: Path, resume: bool
                       ) -> torch.Tensor | None:
        """The per-dimension noise std for this SAC part's env (None: none); "auto" calibrates
        it on train and val (:func:`agents.augment.calibrate_noise`) once per part, recorded
        in ``part/noise.json``."""
        setting = self.config.sac_feature_noise
        if setting == 0:
            return None
        record_file = part / "noise.json"
        if setting == "auto":
            if resume and record_file.is_file():
                record = json.loads(record_file.read_text())
            else:
                record = calibrate_noise(recognizer, self.train_source, self.val_source,
                                         seed=self.config.seed)
                part.mkdir(parents=True, exist_ok=True)
                _write_json_atomic(record, record_file)
            print(f"{part.name}: feature noise {record['scale']} x input std (train P "
                  f"{record['train_p']} against val P {record['val_p']:.3f})")
            scale = float(record["scale"])
        else:
            scale = float(setting)
        if scale == 0:
            return None
        return scale * recognizer.input_std.detach().to(self.train_source.device)

    # ------------------------------------------------------------ stages
    def stage1(self, resume: bool) -> StageArtifacts:
        """Stage I, then the linear probe, the self-check and lambda (all in ``done.json``).

        Raises :class:`Stage1Unhealthy` when Stage I's val mAP is below
        ``stage1_health_fraction`` of the probe's and ``allow_unhealthy_stage1`` is off: the SAC
        budget is not spent on a broken recognizer. ``done.json`` is written first, so
        ``--resume`` with the override continues from there.
        """
        c = self.config
        part = self.out / "stage1"
        done = part / "done.json"
        if not (resume and done.is_file()):
            t0 = time.perf_counter()
            cfg = Stage1Config(steps=c.stage1_steps, batch_size=c.stage1_batch_size,
                               lr=c.stage1_lr, seed=c.seed, num_locators=c.num_locators,
                               recognizer=dict(c.recognizer),
                               alternatives=tuple(c.stage1_alternatives), device=c.device,
                               out_dir=str(part), final_split="val")
            recognizer, history = train_stage1(self.path, cfg, resume=resume,
                                               progress=self.progress)
            for record in history["evaluations"]:
                self.logger.write("stage1/step", int(record["step"]),
                                  {"loss": record["loss"], "val_mAP": record["val_mAP"]})
            history["wall_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            probe = linear_probe(self.train_source, {"val": self.val_source,
                                                     "test": source_for(self.path, "test",
                                                                        c.device)},
                                 num_locators=c.num_locators, seed=c.seed)
            history["probe"] = probe
            # like with like: the recognizer on the probe's frames (uniform-25 of val); on
            # short videos random-25 alone trails uniform-25 by 10+ mAP whatever reads it
            same_frames = evaluate_selection(recognizer.eval(), self.val_source, probe["policy"],
                                             batch_size=c.rollout_batch_size, seed=c.seed)
            history["val_mAP_on_probe_frames"] = same_frames["mAP"]
            history["health"] = stage1_health(same_frames["mAP"], probe["val"]["mAP"],
                                              self.train_source.num_classes,
                                              c.stage1_health_fraction)
            history["frame_cost"] = self._frame_cost(recognizer, same_frames)
            history["calibration_wall_s"] = time.perf_counter() - t0
            _write_json_atomic({k: v for k, v in history.items() if k != "final"}, done)
        record = json.loads(done.read_text())
        self.frame_cost = float(record["frame_cost"]["value"])
        health = record["health"]
        if not health["healthy"] and not c.allow_unhealthy_stage1:
            if "val_mAP_on_probe_frames" in record:
                measured = (f"val mAP {record['val_mAP_on_probe_frames']:.1f} on the probe's "
                            f"frames ({record['probe']['policy']})")
            else:  # a run from before the like-with-like check
                measured = f"val mAP {record['best_val_mAP']:.1f}"
            raise Stage1Unhealthy(
                f"Stage I recognizer: {measured} is {100 * health['ratio']:.0f}% of the linear "
                f"probe's {record['probe']['val']['mAP']:.1f} (needs "
                f"{100 * c.stage1_health_fraction:.0f}%; chance {health['chance_mAP']:.1f}). "
                f"{health['diagnosis']} Stopping before Stage II; rerun with "
                "--allow-unhealthy-stage1 --resume to continue anyway.")
        return StageArtifacts("I", part / STAGE1_SELECTED, None, record)

    def _frame_cost(self, recognizer: Recognizer, uniform: dict) -> dict:
        """lambda: the configured value, or :func:`frame_cost_rule` on the val split
        (``uniform``: the Stage I recognizer's uniform-25 val evaluation, already made for the
        self-check)."""
        c = self.config
        if c.frame_cost is not None:
            return {"value": float(c.frame_cost), "rule": "given"}
        initial = evaluate_selection(recognizer, self.val_source, "initial",
                                     batch_size=c.rollout_batch_size, seed=c.seed)
        labels = self.val_source.labels
        points = {name: (mean_true_class_probability(r["scores"], labels),
                         r["frames_per_video"])
                  for name, r in (("initial", initial), ("uniform-25", uniform))}
        value = frame_cost_rule(points["initial"], points["uniform-25"], c.frame_cost_fraction)
        return {"value": value, "rule": f"{c.frame_cost_fraction} x val gain per frame of "
                "uniform-25 over initial", "points": points}

    def stage2(self, stage1: StageArtifacts, resume: bool) -> StageArtifacts:
        """SAC from scratch on the frozen Stage I recognizer; with ``schedule_prior_steps`` and
        ``select_on_val`` the cloned best schedule (:meth:`schedule_prior`) is a second
        candidate, kept when it scores higher on val than SAC's val-best policy."""
        c = self.config
        recognizer = Recognizer.load(stage1.recognizer, map_location=c.device)
        part = self.out / "stage2"
        done, prior_file = part / "done.json", part / "prior.pt"
        use_prior = bool(c.schedule_prior_steps and c.select_on_val)
        if not (resume and (prior_file.is_file() or done.is_file())):
            # a fresh part: no candidate of an earlier run in this folder may be compared
            prior_file.unlink(missing_ok=True)
            (part / "prior.json").unlink(missing_ok=True)
            if use_prior:
                seed_everything(c.seed)
                prior = self.build_algorithm(recognizer)
                record = self.schedule_prior(recognizer, prior, part)
                save_checkpoint(prior, prior_file, score=record["val_score"])  # atomic, last
        ckpt = self._sac(part, recognizer, c.stage2_env_steps, resume, None, 0, 0)
        if use_prior and prior_file.is_file():
            result = json.loads(done.read_text())
            if "kept" not in result:  # (idempotent: a crash here is redone on resume)
                # the score saved with the weights it belongs to
                prior_score = float(torch.load(prior_file, map_location="cpu",
                                               weights_only=False)["extra"]["score"])
                kept = "schedule prior" if prior_score > result["best_val_score"] else "sac"
                if kept == "schedule prior":
                    with atomic_path(ckpt) as tmp:
                        shutil.copyfile(prior_file, tmp)
                result.update(kept=kept, prior_val_score=prior_score)
                _write_json_atomic(result, done)
        return StageArtifacts("II", stage1.recognizer, ckpt)

    def schedule_prior(self, recognizer: Recognizer, algorithm: CTDESAC, part: Path) -> dict:
        """Behaviour-clone ``algorithm``'s actors to the open-loop schedule that maximizes the
        team return on val (mean final P(true class) - lambda x frames per video): a policy in
        SAC's own actor class that is as good as the best blind one. On a few hundred training
        videos SAC's locators fit the training videos and lose on val what they gain on train
        (docs/experiments.md 2c); with this candidate, val selection never keeps a policy that
        scores below that schedule's clone on val. The clone reads the step index from the
        observation (its last entry is ``step / max_moves``). Writes ``part/prior.json``
        (with the clone's val score, ``val_score``); returns its record."""
        c = self.config
        _, table = search_open_loop(recognizer, self.val_source, max_moves=c.max_moves,
                                    stride=c.stride, progress=self.progress)
        for row in table:
            row["objective"] = row["p_gt"] - self.frame_cost * row["frames_per_video"]
        chosen = best_schedule(table, score=lambda r: r["objective"]).schedule
        best = next(r for r in table if r["schedule"] == chosen)
        schedule = torch.tensor(chosen + [0] * (c.max_moves + 1 - len(chosen)))
        num_envs = min(256, self.train_source.num_videos)
        # the clone needs observations only: no per-locator credit pass in this env
        env = self._env_factory(recognizer, locator_credit=False)(num_envs, c.seed + 7)
        obs, _ = env.reset(seed=c.seed + 7)
        observations, alive, actions = [], [], []
        for _ in range(4 * (c.max_moves + 2)):  # ~4 episodes per row (autoreset)
            observation = torch.as_tensor(obs["observation"], dtype=torch.float32)
            action = schedule[observed_step(observation, c.max_moves)]
            observations.append(observation)
            alive.append(torch.as_tensor(obs["alive"]).bool())
            actions.append(action)
            obs, *_ = env.step(action.numpy())
        env.close()
        accuracy = clone_actor(algorithm, torch.cat(observations), torch.cat(alive),
                               torch.cat(actions), gradient_steps=c.schedule_prior_steps,
                               seed=c.seed)
        record = {"schedule": best["schedule"], "val_score": self.val_score(algorithm, recognizer),
                  "val_objective": best["objective"],
                  "val_p_gt": best["p_gt"], "val_mAP": best["mAP"],
                  "val_frames_per_video": best["frames_per_video"],
                  "frame_cost": self.frame_cost, "clone_accuracy": accuracy,
                  "clone_transitions": int(sum(len(a) for a in actions)),
                  "top5": sorted(table, key=lambda r: -r["objective"])[:5]}
        part.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(record, part / "prior.json")
        return record

    def rollout_selection(self, recognizer: Recognizer, algorithm: CTDESAC, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Frames the sampling policy visits on every training video: ``[V, N, m+1]`` + mask."""
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        policy = CTDEActorPolicy(algorithm, deterministic=False, generator=gen)
        result = evaluate_policy(policy, self.train_source, recognizer, max_moves=c.max_moves,
                                 stride=c.stride, batch_size=c.rollout_batch_size,
                                 device=c.device)
        V, N, L = self.train_source.num_videos, c.num_locators, c.max_moves + 1
        frame_index = np.zeros((V, N, L), dtype=np.int64)
        mask = np.zeros((V, N, L), dtype=bool)
        for v, traj in enumerate(result.trajectories):
            for i, frames in enumerate(traj):
                frame_index[v, i, : len(frames)] = frames
                frame_index[v, i, len(frames):] = frames[0]
                mask[v, i, : len(frames)] = True
        return frame_index, mask

    def finetune(self, recognizer: Recognizer, algorithm: CTDESAC, part: Path, round_: int,
                 resume: bool) -> Recognizer:
        """K epochs of cross-entropy on the current policy's sampled frames (fresh rollouts
        every epoch); checkpoint every epoch. Returns the epoch's recognizer that scores the
        best val score with the current policy (early stopping: fine-tuning on the policy's
        training-set frames can overfit; measured on PhotoUnits, a third round of two epochs
        cost 2 test mAP). The recognizer given is not a candidate: with a 450-video val split,
        "no fine-tuning" won on noise alone and made Stage III a no-op. (Its val score is in the
        log already: the SAC part before scored that policy with it.)"""
        c = self.config
        part.mkdir(parents=True, exist_ok=True)
        last, best_path = part / "finetune_last.pt", part / "finetune_best.pt"
        device = torch.device(c.device)
        recognizer = recognizer.to(device)
        optimizer = torch.optim.Adam(recognizer.parameters(), lr=c.finetune_lr)
        rng = np.random.default_rng(c.seed + 7919 * (round_ + 1))
        start = 0
        if resume and last.is_file():
            ckpt = torch.load(last, map_location=device, weights_only=False)
            recognizer.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            rng.bit_generator.state = ckpt["numpy_rng"]
            if "torch_rng" in ckpt:  # dropout draws from torch's global generator
                torch.set_rng_state(ckpt["torch_rng"])
            start, best = int(ckpt["epoch"]) + 1, float(ckpt["best_val_score"])
        else:
            best = -float("inf")
        labels = torch.as_tensor(self.train_source.labels, device=device)
        V = self.train_source.num_videos
        for epoch in tqdm(range(start, c.finetune_epochs), desc=f"stage III round {round_} "
                          "fine-tune", unit="epoch", disable=not self.progress,
                          initial=start, total=c.finetune_epochs):
            frame_index, mask = self.rollout_selection(
                recognizer, algorithm, seed=c.seed + 1000 * round_ + epoch)
            recognizer.train()
            order = rng.permutation(V)
            total = 0.0
            for lo in range(0, V, c.finetune_batch_size):
                batch = order[lo: lo + c.finetune_batch_size]
                frames = gather_padded(self.train_source, batch, frame_index[batch])
                logits = recognizer(frames.to(device), torch.as_tensor(mask[batch], device=device))
                loss = F.cross_entropy(logits, labels[torch.as_tensor(batch, device=device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(recognizer.parameters(), 1.0)
                optimizer.step()
                total += loss.item() * len(batch)
            recognizer.eval()
            score = self.val_score(algorithm, recognizer)
            self.logger.write("stage3/finetune_epoch", round_ * c.finetune_epochs + epoch,
                              {"finetune_loss": total / V, "val_score": score})
            if score > best:
                best = score
                recognizer.save(best_path)  # atomic, before the checkpoint that records it
            torch_save_atomic({"epoch": epoch, "model": recognizer.state_dict(),
                               "optimizer": optimizer.state_dict(),
                               "numpy_rng": rng.bit_generator.state,
                               "torch_rng": torch.get_rng_state(), "best_val_score": best},
                              last)
        return Recognizer.load(best_path, map_location=device).eval()

    def stage3(self, stage2: StageArtifacts, resume: bool) -> StageArtifacts:
        c = self.config
        recognizer = Recognizer.load(stage2.recognizer, map_location=c.device)
        algorithm = self.load_algorithm(recognizer, stage2.sac)
        rec_path, sac_path = stage2.recognizer, stage2.sac
        for r in range(c.stage3_rounds):
            part = self.out / "stage3" / f"round{r}"
            rec_path = part / "recognizer.pt"
            if resume and rec_path.is_file():
                recognizer = Recognizer.load(rec_path, map_location=c.device)
            else:
                recognizer = self.finetune(recognizer, algorithm, part, r, resume)
                recognizer.save(rec_path)  # atomic
            sac_path = self._sac(part / "sac", recognizer, c.stage3_env_steps, resume,
                                 algorithm, 1000 * (r + 1), c.stage3_critic_warmup)
            algorithm = self.load_algorithm(recognizer, sac_path)
        return StageArtifacts("III", rec_path, sac_path)

    def _timed(self, name: str, fn: Any, *args: Any) -> StageArtifacts:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.phase_times[name] = time.perf_counter() - t0

    def run(self, resume: bool = False, stop_after: str | None = None) -> list[StageArtifacts]:
        """All stages (or up to ``stop_after`` in {"I", "II"}); returns each stage's artifacts."""
        if stop_after not in (None, "I", "II", "III"):
            raise ValueError(f"stop_after must be 'I', 'II' or 'III', got {stop_after!r}")
        settings_file = self.out / "trainer_config.json"
        settings = json.loads(json.dumps({"features": str(self.path),
                                          "config": asdict(self.config)}))
        if resume and settings_file.is_file():
            # settings only Stage II-III read cannot conflict with a run that has not got there
            later = () if (self.out / "stage2").exists() else LATER_STAGE_SETTINGS
            _check_same_settings(json.loads(settings_file.read_text()), settings, settings_file,
                                 ignore=later)
        _write_json_atomic(settings, settings_file)
        self.phase_times = {}
        stages = [self._timed("stage1", self.stage1, resume)]
        if stop_after == "I":
            return stages
        stages.append(self._timed("stage2", self.stage2, stages[0], resume))
        if stop_after == "II":
            return stages
        stages.append(self._timed("stage3", self.stage3, stages[1], resume))
        for buffer in self.out.rglob("buffer-*.h5"):  # nothing is left to resume
            buffer.unlink()
        return stages


class SettingsMismatch(ValueError):
    """A resume asked for other settings than the run it would continue."""


class Stage1Unhealthy(RuntimeError):
    """The Stage I recognizer is far below the linear probe: training stopped before SAC."""


def frame_cost_rule(initial: tuple[float, float], uniform: tuple[float, float],
                    fraction: float = 0.1) -> float:
    """lambda of Eq. 6 from the data: ``fraction`` of the mean gain in P(true class) per frame
    that uniform sampling buys over the initial frames alone.

    Args:
        initial, uniform: ``(mean final P(true class), frames per video)`` of the Stage I
            recognizer on the val split with the initial frames only and with uniform-25.
        fraction: kappa; a frame is worth observing when it is expected to gain more than
            kappa times what an average uniformly placed frame gains.

    The reward trades P (in [0, 1]) against frames; the same lambda means little on a dataset
    where frames are worth ten times more or less, so it is expressed in the data's own gain
    per frame. On PhotoUnits this gives ~0.002, the value tuned there by hand before.
    """
    (p0, f0), (p1, f1) = initial, uniform
    if f1 <= f0:
        return 0.0
    return float(max(fraction * (p1 - p0) / (f1 - f0), 0.0))


# TrainerConfig fields that only Stage II and III read (a Stage I cache is valid for any value)
LATER_STAGE_SETTINGS = ("stage2_env_steps", "schedule_prior_steps", "sac", "sac_feature_noise",
                        "sac_start_jitter", "stage3_rounds",
                        "finetune_epochs", "finetune_lr", "finetune_batch_size",
                        "stage3_env_steps", "stage3_critic_warmup", "select_on_val",
                        "selection_metric")
# the value a field added later had in effect in runs saved before it existed
LEGACY_DEFAULTS = {"schedule_prior_steps": 0, "sac_feature_noise": 0.0, "sac_start_jitter": 0}


def _check_same_settings(saved: dict, current: dict, path: Path,
                         ignore: tuple[str, ...] = ()) -> None:
    """A resume must continue the run it resumes: the same data and the same settings (the
    device may change; ``ignore`` lists more fields that may). Mixing settings would silently
    give a run that no config describes."""
    ignore = {"device", "allow_unhealthy_stage1", *ignore}
    old = {**LEGACY_DEFAULTS, **saved.get("config", {})}
    new = current["config"]
    changed = sorted(k for k in old.keys() | new.keys()
                     if k not in ignore and old.get(k) != new.get(k))
    if saved.get("features") != current["features"]:
        changed.insert(0, "features")
    if changed:
        detail = "; ".join(f"{k}: {old.get(k, saved.get(k))!r} -> "
                           f"{new.get(k, current.get(k))!r}" for k in changed)
        raise SettingsMismatch(f"{path}: --resume with other settings than the run it "
                               f"resumes ({detail}); resume with the same options or start a "
                               "new --out")


def source_for(path: str | os.PathLike, split: str, device: str = "cpu") -> FrameSource:
    """The frame source of one split of a feature file, held in memory in the file's own
    precision (float16 files stay float16: half the memory, the same values)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            half = f["features"].dtype == np.float16
    except (OSError, KeyError):
        half = False  # CachedFrameSource reports what is wrong with the file
    dtype = torch.float16 if half else torch.float32
    return CachedFrameSource(path, split=split, device=device, dtype=dtype)


def final_checkpoints(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(recognizer, SAC checkpoint) of the last finished Stage III round of a run.

    Accepts run_marl.py's ``--out`` folder (checkpoints under ``train/``) or the trainer's own.
    The SAC checkpoint is the round's result: ``best.pt`` (the val-best policy) when the run
    selected on val, else the last state ``checkpoint.pt``.
    """
    run_dir = Path(run_dir)
    if (run_dir / "train" / "stage3").is_dir():
        run_dir = run_dir / "train"
    rounds = sorted((run_dir / "stage3").glob("round*"), key=lambda p: int(p.name[5:]))
    for part in reversed(rounds):
        rec = part / "recognizer.pt"
        for sac in (part / "sac" / "best.pt", part / "sac" / "checkpoint.pt"):
            if rec.is_file() and sac.is_file():
                return rec, sac
    raise FileNotFoundError(f"{run_dir}: no stage3/round*/recognizer.pt with a sac/best.pt or "
                            "sac/checkpoint.pt")
