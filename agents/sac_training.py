"""Training CTDE SAC (:mod:`agents.ctde_sac`) with Tianshou 2's off-policy trainer:
seeding and RNG states, the collector and replay buffer, epochs that train exactly the env-step
budget, checkpoint-and-resume that loses nothing, and val selection of the best learner.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from tianshou.data import Collector, VectorReplayBuffer
from tianshou.utils import TensorboardLogger
from tqdm import tqdm

from agents.ctde_sac import (
    CREDIT_INFO_KEY,
    CTDESAC,
    SACConfig,
    build_ctde_sac,
    load_checkpoint,
    save_checkpoint,
)
from agents.tianshou_env import TianshouVectorEnvAdapter
from features.atomic import atomic_path
from features.validation import require_int


def seed_everything(seed: int) -> None:
    """Seed Python, numpy (Tianshou's buffer sampling) and torch (action sampling, init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Python's, numpy's global (Tianshou's buffer sampling) and torch's (action sampling,
    dropout) generator states, for a checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())  # a checkpoint loaded onto a GPU moved it


class CheckpointCountersLogger(TensorboardLogger):
    """Tianshou's TensorBoard logger whose ``restore_data`` (what ``resume_from_log`` continues
    from) returns the counters stored in ``checkpoint.pt``, not the log's: Tianshou writes the
    log's counters after the checkpoint, so a kill between the two would train an epoch twice."""

    def __init__(self, writer: Any, counters: tuple[int, int, int]) -> None:
        super().__init__(writer, save_interval=1)
        self.counters = counters  # (epoch, env step, update step) at the checkpoint

    def restore_data(self) -> tuple[int, int, int]:
        epoch, env_step, update_step = self.counters
        self.last_save_step = self.last_log_test_step = epoch
        self.last_log_update_step = update_step
        self.last_log_train_step = env_step
        return self.counters


@dataclass
class TrainResult:
    """What ``train_sac`` returns."""

    algorithm: CTDESAC  # the last learner, or the best-scoring one when score_fn was given
    env_steps: int
    update_steps: int  # Tianshou's update steps: one per collection of collect_env_steps
    gradient_steps: int  # minibatch updates: update_steps * round(ratio * collect_env_steps)
    checkpoint: Path | None  # the last state
    info: Any  # Tianshou's InfoStats
    best_checkpoint: Path | None = None  # with score_fn: the best-scoring learner (returned)
    best_score: float | None = None
    best_env_step: int | None = None  # when the best learner was scored (0: as given)


def epoch_plan(env_steps: int, collect_env_steps: int, epoch_env_steps: int) -> tuple[int, int]:
    """``(epochs, env steps per epoch)`` that train exactly ``env_steps``, rounded up to whole
    collections (Tianshou collects ``collect_env_steps`` at a time), in epochs of at most
    ``epoch_env_steps`` (rounded up to one collection).

    Tianshou runs ``max_epochs x epoch_num_steps``; a plain ``ceil`` of epochs overshoots
    (10,000 steps in epochs of 4,096 would train 12,288). Here the epochs split the budget
    evenly: 10,000 at 256 per collection -> 40 collections -> 4 epochs of 2,560.
    """
    require_int(env_steps, "env_steps", minimum=1)
    collections = math.ceil(env_steps / collect_env_steps)
    per_epoch_max = max(1, epoch_env_steps // collect_env_steps)
    epochs = math.ceil(collections / per_epoch_max)
    while collections % epochs:  # the fewest epochs that split the collections evenly
        epochs += 1
    return epochs, collections // epochs * collect_env_steps


EnvFactory = Callable[[int, int], VectorEnv]
"""``env_factory(num_envs, seed) -> gymnasium VectorEnv`` with the locator Dict observation."""


def make_collector(
    algorithm: CTDESAC, env: VectorEnv | TianshouVectorEnvAdapter, buffer_size: int
) -> Collector:
    """A stock Tianshou collector over all rows of a batched env, with its replay buffer."""
    if not isinstance(env, TianshouVectorEnvAdapter):
        env = TianshouVectorEnvAdapter(env)
    buffer = VectorReplayBuffer(buffer_size, len(env))
    return Collector(algorithm, env, buffer, raise_on_nan_in_buffer=False)


def train_sac(
    env_factory: EnvFactory,
    config: SACConfig,
    *,
    env_steps: int,
    out_dir: str | Path | None = None,
    resume: bool = False,
    algorithm: CTDESAC | None = None,
    show_progress: bool = False,
    score_fn: Callable[[CTDESAC], float] | None = None,
    epoch_callback: Callable[[CTDESAC, int, Any], None] | None = None,
) -> TrainResult:
    """Train CTDE SAC for ``env_steps`` transitions with Tianshou's off-policy trainer.

    ``out_dir`` (optional) receives TensorBoard logs (``tb/``), ``checkpoint.pt`` (every epoch
    and at the end) and ``buffer-<env step>.h5`` (the replay buffer it was saved with).
    ``resume=True`` reloads both, the RNG states and the env's in-flight episodes (when the env
    can save them: ``episode_state``, as :class:`~vimo_env.gym_env.VideoLocatorsVectorEnv`
    does) and continues from the epoch and step counters stored in ``checkpoint.pt`` (never
    from the TensorBoard log, which a kill can leave behind the checkpoint, so that an epoch
    would train twice). On the CPU a run killed after any epoch and resumed then ends with the
    same weights, bit for bit, as one that was never interrupted. (An env without
    ``episode_state`` restarts its episodes on resume: the same budget and counters, not the
    same weights.) ``algorithm``
    continues training an existing learner (e.g. Stage III); otherwise one is built for the
    env's shapes.

    ``score_fn`` (needs ``out_dir``): a held-out score of a learner, higher is better (the
    trainer passes the val mAP of its deterministic policy). It scores the learner before
    training and after every epoch, and keeps the best one in ``best.pt``
    (``TrainResult.best_checkpoint`` / ``best_score``): the policy drifts from epoch to epoch
    and the last one is not always the best. ``checkpoint.pt`` stays the last state (resume).

    ``epoch_callback`` (needs ``out_dir``): called as ``epoch_callback(learner, env_step,
    writer)`` after every epoch (once per env step count), ``writer`` the run's TensorBoard
    ``SummaryWriter``, e.g. to log figures (``benchmarks.plots.trajectory_logger``).
    """
    from tianshou.trainer import OffPolicyTrainerParams
    from torch.utils.tensorboard import SummaryWriter

    seed_everything(config.seed)
    info_keys = (CREDIT_INFO_KEY,) if config.difference_credit else ()
    env = TianshouVectorEnvAdapter(env_factory(config.num_envs, config.seed), seed=config.seed,
                                   info_keys=info_keys)
    space = env.single_observation_space
    if not isinstance(space, gym.spaces.Dict) or "observation" not in space.spaces:
        raise ValueError(f"env observation space must be Dict with 'observation', got {space}")
    num_locators, obs_dim = space["observation"].shape
    if algorithm is None:
        algorithm = build_ctde_sac(obs_dim, num_locators, config, observation_space=space)
    collector = make_collector(algorithm, env, config.buffer_size)

    out = Path(out_dir) if out_dir is not None else None
    if score_fn is not None and out is None:
        raise ValueError("train_sac: score_fn needs out_dir (the best learner is saved there)")
    if epoch_callback is not None and out is None:
        raise ValueError("train_sac: epoch_callback needs out_dir (it logs to out_dir/tb)")
    checkpoint = out / "checkpoint.pt" if out else None
    best_file = out / "best.pt" if out else None
    best_score, scored_at = -math.inf, -1
    resumed = bool(resume and checkpoint is not None and checkpoint.is_file())
    if resume and not resumed:
        raise FileNotFoundError(f"{checkpoint}: nothing to resume from")
    epochs, per_epoch = epoch_plan(env_steps, config.collect_env_steps, config.epoch_env_steps)
    start_epoch = start_env_step = start_update_step = 0
    episodes = None  # the env's and collector's in-flight episodes at the checkpoint
    if resumed:
        extra = load_checkpoint(algorithm, checkpoint)
        for counter in ("epoch", "env_step", "gradient_step"):
            if counter not in extra:
                raise ValueError(f"{checkpoint}: no '{counter}' counter; it was not written by "
                                 "train_sac, so there is nothing to resume from")
        start_epoch = int(extra["epoch"])
        start_env_step = int(extra["env_step"])
        if start_epoch < 0 or start_epoch * per_epoch != start_env_step:
            # a final checkpoint written before epochs were stored (-1), or another budget's
            if start_env_step % per_epoch:
                raise ValueError(
                    f"{checkpoint}: saved at env step {start_env_step}, not a whole number of "
                    f"this budget's epochs ({per_epoch} env steps each): resume with the "
                    "env-step budget it was trained with")
            start_epoch = start_env_step // per_epoch
        start_update_step = int(extra.get("gradient_step", 0))  # Tianshou's update step
        best_score = float(extra.get("best_score", -math.inf))
        scored_at = start_env_step
        if "rng" in extra:
            restore_rng_states(extra["rng"])
        buffer_name = extra.get("buffer")  # the replay buffer saved with this checkpoint
        if buffer_name is not None:
            buffer_file = out / buffer_name
            if not buffer_file.is_file():
                raise FileNotFoundError(f"{buffer_file}: the replay buffer that {checkpoint} "
                                        "was saved with is missing")
            collector.buffer = VectorReplayBuffer.load_hdf5(str(buffer_file))
        episodes = extra.get("episodes")
    grads_per_update = round(config.updates_per_env_step * config.collect_env_steps)
    algorithm.critic_only_steps_left = max(
        0, config.critic_warmup_gradient_steps - start_update_step * grads_per_update)
    if out is not None and not env.saves_episodes:
        warnings.warn(f"{type(env.env).__name__} cannot save its in-flight episodes "
                      "(episode_state): a resumed run restarts them, so it trains the same "
                      "budget but not bit for bit the same weights", stacklevel=2)
    if episodes is not None and env.saves_episodes and env.same_device(episodes["env"]):
        env.load_episode_state(episodes["env"])
        _set_pre_collect(collector, episodes["collector"])
    else:  # no episodes saved, or saved on another device: new episodes
        episodes = None
        collector.reset(reset_buffer=not resumed)
    if config.warmup_env_steps and not resumed:
        collector.collect(n_step=config.warmup_env_steps, random=True)

    logger = None
    save_fn = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        logger = CheckpointCountersLogger(SummaryWriter(str(out / "tb")),
                                           (start_epoch, start_env_step, start_update_step))

        def keep_if_best(env_step: int) -> None:
            nonlocal best_score, scored_at
            if score_fn is None or env_step == scored_at:
                return
            score, scored_at = float(score_fn(algorithm)), env_step
            logger.write("val/env_step", env_step, {"score": score})  # -> val/score
            if score > best_score:
                best_score = score
                save_checkpoint(algorithm, best_file, env_step=env_step, score=score)

        if not resumed:
            keep_if_best(0)  # the learner as given (Stage III: the previous round's)
        called_at = -1

        def save_fn(epoch: int, env_step: int, gradient_step: int) -> str:
            nonlocal called_at
            keep_if_best(env_step)  # before the checkpoint that records best_score
            if epoch_callback is not None and env_step != called_at:
                called_at = env_step
                epoch_callback(algorithm, env_step, logger.writer)
            # the buffer first, under a name of its own; the checkpoint (weights, counters,
            # RNG states, the buffer's name) last, atomically; then older buffers go. A kill
            # anywhere leaves a checkpoint and the buffer it was saved with.
            buffer_name = f"buffer-{env_step}.h5"
            with atomic_path(out / buffer_name) as partial:
                collector.buffer.save_hdf5(str(partial))
            env_state = env.episode_state()
            in_flight = (None if env_state is None else
                         {"env": env_state, "collector": _pre_collect(collector)})
            save_checkpoint(algorithm, checkpoint, epoch=epoch, env_step=env_step,
                            gradient_step=gradient_step, config=asdict(config),
                            best_score=best_score, rng=rng_states(), buffer=buffer_name,
                            episodes=in_flight)
            for old in out.glob("buffer-*.h5"):
                if old.name != buffer_name:
                    old.unlink()
            return str(checkpoint)

    params = OffPolicyTrainerParams(
        training_collector=collector,
        test_collector=None,
        max_epochs=epochs,
        epoch_num_steps=per_epoch,
        collection_step_num_env_steps=config.collect_env_steps,
        update_step_num_gradient_steps_per_sample=config.updates_per_env_step,
        batch_size=config.batch_size,
        logger=logger,
        save_checkpoint_fn=save_fn,
        resume_from_log=resumed,
        verbose=False,
        show_progress=show_progress,
    )
    with _tianshou_bars(show_progress):
        # restored episodes go on: the trainer must not restart them
        info = algorithm.create_trainer(params).run(reset_collectors=episodes is None)
    # train_step counts this run's collector only; update_step continues the logged counter
    # (Tianshou passes it to save_fn as "gradient_step", but each update step runs
    # round(updates_per_env_step * collect_env_steps) gradient steps)
    total_env_steps = start_env_step + int(info.train_step)
    total_update_steps = max(int(info.update_step), start_update_step)
    if save_fn is not None:
        save_fn(max(epochs, start_epoch), total_env_steps, total_update_steps)
    best_env_step = None
    if score_fn is not None:
        best_env_step = int(load_checkpoint(algorithm, best_file)["env_step"])
    return TrainResult(
        algorithm=algorithm,
        env_steps=total_env_steps,
        update_steps=total_update_steps,
        gradient_steps=total_update_steps * grads_per_update,
        checkpoint=checkpoint,
        best_checkpoint=best_file if score_fn is not None else None,
        best_score=best_score if score_fn is not None else None,
        best_env_step=best_env_step,
        info=info,
    )


def _pre_collect(collector: Collector) -> dict[str, Any]:
    """The collector's view of the in-flight episodes: the last observations and infos it
    will act on (Tianshou 2.0's ``Collector`` keeps them between ``collect`` calls)."""
    return {"obs": copy.deepcopy(collector._pre_collect_obs_RO),
            "info": copy.deepcopy(collector._pre_collect_info_R),
            "hidden": copy.deepcopy(collector._pre_collect_hidden_state_RH)}


def _set_pre_collect(collector: Collector, state: dict[str, Any]) -> None:
    collector._pre_collect_obs_RO = copy.deepcopy(state["obs"])
    collector._pre_collect_info_R = copy.deepcopy(state["info"])
    collector._pre_collect_hidden_state_RH = copy.deepcopy(state["hidden"])


@contextmanager
def _tianshou_bars(show: bool) -> Iterator[None]:
    """Tianshou 2.0.1's gradient-update bar passes its own ``disable=`` (off below 20 steps per
    collection) over the trainer's ``show_progress``, so ``show_progress=False`` still printed
    it; while hidden, every bar the trainer makes is forced off."""
    from tianshou.trainer import Trainer

    if show:
        yield
        return

    def quiet_tqdm(*args: Any, **kwargs: Any) -> tqdm:
        return tqdm(*args, **{**kwargs, "disable": True})

    original = Trainer.__dict__["_pbar"]
    Trainer._pbar = property(lambda self: quiet_tqdm)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Trainer._pbar = original  # type: ignore[method-assign]
