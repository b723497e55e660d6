"""ViMo's locators as a BenchMARL task: ``VideoLocators`` on the natively batched TorchRL env.

BenchMARL (1.5) trains its algorithms on any task described by a
:class:`benchmarl.environments.TaskClass`. :class:`VideoLocatorsClass` builds
``vimo_env.torchrl_env(...)`` directly (one batched ``EnvBase`` of ``num_envs`` rows; no
PettingZoo wrapper, no ``SerialEnv``) and tells BenchMARL where things are:

* group ``"locators"`` (agents ``locator_0 .. locator_{N-1}``), Categorical(4) actions given as
  an index (0 = stop, k = move k strides);
* ``observation_spec``: ``("locators", "observation")`` only (what the actors read);
* ``action_mask_spec``: ``("locators", "action_mask")``: BenchMARL's actors then sample from a
  ``MaskedCategorical`` and its Q-learners take the max over legal actions only;
* ``state_spec``: the root ``"state"`` (all observations and alive flags), the input of the
  centralized critics (MAPPO, MASAC, QMIX);
* no ``info`` entries; ``max_steps`` = ``max_moves`` (every episode ends within ``m`` steps).

Configuration: :class:`TaskConfig` (BenchMARL's convention: a dataclass of the task's options,
which validates a YAML file or a dict). ``recognizer`` is a Stage I checkpoint; rewards are
meaningless without a trained one. :func:`prepare` makes everything a task needs for a named
dataset (``"tiny"``: the synthetic tiny preset; ``"default"``: PhotoUnits default, what
``benchmarks/run_marl.py`` uses without flags) or any ``vimo-features`` file: the dataset
(built on first use, cached), a recognizer trained by the package's own Stage I
(:class:`agents.trainer.ThreeStageTrainer`, stopped after Stage I, cached and resumed under
``out_dir``) and lambda derived from the data after Stage I
(:func:`agents.trainer.frame_cost_rule`), exactly as the main job does.

Run an algorithm and score it on the test split::

    python -m agents.benchmarl_task --algorithm mappo --dataset tiny --env-steps 8192 \\
        --out results/benchmarl

or from Python::

    prepared = prepare("tiny", out_dir="results/benchmarl/tiny")
    task = VideoLocatorsTask.TINY.get_task(prepared.task_config())
    run = run_experiment(task, "mappo", env_steps=8192, save_folder="results/benchmarl/mappo")
    result = evaluate_on_split(run.policy, prepared, split="test")

The trained BenchMARL policy plugs into :func:`agents.evaluate.evaluate_policy` through
:class:`BenchMARLPolicy` (a :class:`agents.policies.LocatorPolicy`: the group's deterministic
actor, charged its own FLOPs per locator decision).

Limitations (BenchMARL's, not the env's): every locator contributes a sample at every step of
its row's episode, also after it stopped (its only legal action is then "stop", so a masked
actor's log-probability of it is 0 and its policy gradient vanishes, but value and Q losses
still fit those samples on the team reward); the CTDE SAC of :mod:`agents.ctde_sac` drops them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

try:  # BenchMARL is an optional dependency (`pip install --no-deps benchmarl==1.5.2`)
    from benchmarl.environments.common import Task, TaskClass
except ImportError as err:  # pragma: no cover - exercised only without BenchMARL
    raise ImportError("agents.benchmarl_task needs BenchMARL 1.5: pip install -e '.[benchmarl]' "
                      "then pip install --no-deps benchmarl==1.5.2") from err
from torchrl.data import Composite
from torchrl.envs import EnvBase

from agents.evaluate import EvalResult, evaluate_policy
from agents.policies import LocatorPolicy, PolicyFlops
from agents.trainer import (
    TINY_STAGE1,
    Stage1Unhealthy,
    ThreeStageTrainer,
    TrainerConfig,
    source_for,
)
from vimo_env.core import NUM_ACTIONS
from vimo_env.recognizer import Recognizer
from vimo_env.settings import EnvSettings

GROUP = "locators"
ENV_NAME = "vimo"
# BenchMARL algorithms that train on this task (discrete actions), by their config's name;
# all four are exercised by tests/test_benchmarl.py
ALGORITHMS = ("mappo", "ippo", "masac", "iql")
# torchrl 0.11's MaskedCategorical.log_prob calls cross_entropy(reduce=False), which warns
_SIZE_AVERAGE_WARNING = "size_average and reduce args will be deprecated"


# ----------------------------------------------------------------------------- the task
@dataclass
class TaskConfig:
    """Options of a ``VideoLocators`` task (the keywords of :func:`vimo_env.torchrl_env`, SPEC
    section 6, less those BenchMARL sets: ``num_envs``, ``seed``, ``device``).

    ``features``: a ``vimo-features`` HDF5 file; ``recognizer``: a checkpoint written by
    ``Recognizer.save`` (Stage I), or None for a fresh one (valid API, meaningless rewards);
    ``frame_cost``: lambda of Eq. 6 (use the value derived with the recognizer, see
    :func:`prepare`).
    """

    features: str  # required
    recognizer: str | None = None
    split: str = "train"
    num_locators: int = 3
    max_moves: int = 4
    stride: int = 3
    frame_cost: float = 0.1
    sampler: str = "random"
    locator_credit: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.features, (str, Path)):
            raise ValueError(f"TaskConfig.features must be the path of a vimo-features file, "
                             f"got {self.features!r}")
        self.features = str(self.features)
        if self.recognizer is not None:
            if not isinstance(self.recognizer, (str, Path)):
                raise ValueError(f"TaskConfig.recognizer must be a checkpoint path or None, got "
                                 f"{self.recognizer!r}")
            self.recognizer = str(self.recognizer)
        if isinstance(self.frame_cost, bool) or not isinstance(self.frame_cost, (int, float)) \
                or not self.frame_cost >= 0:
            raise ValueError(f"TaskConfig.frame_cost must be a number >= 0, got "
                             f"{self.frame_cost!r}")
        # the env's own keywords are checked where every front-end's are, with its messages
        try:
            settings = EnvSettings(**{f.name: getattr(self, f.name) for f in fields(self)})
        except (TypeError, ValueError) as err:
            raise ValueError(f"TaskConfig.{err}") from err
        for name in ("num_locators", "max_moves", "stride", "frame_cost"):
            setattr(self, name, getattr(settings, name))


def check_task_config(config: dict[str, Any], where: str = "task config") -> dict[str, Any]:
    """``config`` validated by :class:`TaskConfig` (unknown keys named), as a plain dict."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a mapping of TaskConfig fields, got "
                         f"{type(config).__name__}")
    known = {f.name for f in fields(TaskConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{where}: unknown TaskConfig fields {unknown}; expected some of "
                         f"{sorted(known)}")
    if "features" not in config:
        raise ValueError(f"{where}: TaskConfig.features (the vimo-features file) is required")
    try:
        return asdict(TaskConfig(**config))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


class VideoLocatorsClass(TaskClass):
    """The BenchMARL task: ``vimo_env.torchrl_env`` with this task's :class:`TaskConfig`."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        super().__init__(name, check_task_config(dict(config or {}), f"VideoLocators.{name}"))

    def get_env_fun(self, num_envs: int, continuous_actions: bool, seed: int | None,
                    device: Any) -> Callable[[], EnvBase]:
        """A factory of the batched env (``batch_size=[num_envs]``): BenchMARL needs no
        ``SerialEnv`` around it. ``seed`` seeds the video sampler (and a fresh recognizer)."""
        if continuous_actions:
            raise ValueError("VideoLocators has discrete actions only (stop, move 1-3 strides)")
        config = copy.deepcopy(self.config)

        def make() -> EnvBase:
            import vimo_env

            return vimo_env.torchrl_env(num_envs=num_envs, seed=seed, device=device, **config)

        return make

    def supports_continuous_actions(self) -> bool:
        return False

    def supports_discrete_actions(self) -> bool:
        return True

    def max_steps(self, env: EnvBase) -> int:
        """Every episode ends within ``max_moves`` steps (a locator stops after its m-th move)."""
        return int(self.config["max_moves"])

    def has_render(self, env: EnvBase) -> bool:
        return False

    def group_map(self, env: EnvBase) -> dict[str, list[str]]:
        return {GROUP: [f"locator_{i}" for i in range(int(self.config["num_locators"]))]}

    def _group_entry(self, env: EnvBase, key: str) -> Composite:
        spec = env.full_observation_spec_unbatched
        group = spec[GROUP]
        return Composite({GROUP: Composite({key: group[key].clone()}, shape=group.shape,
                                           device=group.device)})

    def observation_spec(self, env: EnvBase) -> Composite:
        """``("locators", "observation")`` ``[N, obs_dim]``: what an actor reads."""
        return self._group_entry(env, "observation")

    def action_mask_spec(self, env: EnvBase) -> Composite:
        """``("locators", "action_mask")`` bool ``[N, 4]``."""
        return self._group_entry(env, "action_mask")

    def state_spec(self, env: EnvBase) -> Composite:
        """The root ``"state"``: every locator's observation and alive flag."""
        return Composite({"state": env.full_observation_spec_unbatched["state"].clone()})

    def info_spec(self, env: EnvBase) -> None:
        return None

    def action_spec(self, env: EnvBase) -> Composite:
        return env.full_action_spec_unbatched

    @staticmethod
    def env_name() -> str:
        return ENV_NAME


class VideoLocatorsTask(Task):
    """BenchMARL task enum: one member per dataset preset of :data:`DATASETS`.

    Both need a config: ``VideoLocatorsTask.TINY.get_task(prepare("tiny", ...).task_config())``
    or ``VideoLocatorsTask.TINY.get_from_yaml("tiny.yaml")`` (a YAML file of
    :class:`TaskConfig` fields; BenchMARL's own ``conf/task`` folder has no entry for it).
    """

    TINY = None
    DEFAULT = None

    @staticmethod
    def associated_class() -> type[VideoLocatorsClass]:
        return VideoLocatorsClass

    def get_task(self, config: dict[str, Any] | None = None) -> VideoLocatorsClass:
        if config is None:
            raise ValueError(f"VideoLocatorsTask.{self.name} needs a config (the dataset and "
                             f"recognizer paths): get_task(prepare({self.name.lower()!r}, "
                             "out_dir=...).task_config()) or get_from_yaml(PATH)")
        return VideoLocatorsClass(name=self.name, config=config)

    def get_from_yaml(self, path: str | None = None) -> VideoLocatorsClass:
        """The task with the :class:`TaskConfig` of a YAML file (validated, naming the file)."""
        if path is None:
            return self.get_task(None)
        import yaml

        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read the task config: {err}") from None
        if isinstance(config, dict):
            config.pop("defaults", None)  # a Hydra header, as BenchMARL's own loader drops it
        return VideoLocatorsClass(name=self.name, config=check_task_config(config, str(path)))


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetPreset:
    """A named dataset: which generator builds it and the Stage I recipe used on it."""

    generator: str  # "synthetic" or "photounits"
    preset: str
    trainer: dict[str, Any] = field(default_factory=dict)  # TrainerConfig overrides


DATASETS: dict[str, DatasetPreset] = {
    "tiny": DatasetPreset("synthetic", "tiny", TINY_STAGE1),
    # what `python benchmarks/run_marl.py` uses without a dataset flag, with its one recipe
    "default": DatasetPreset("photounits", "default", {}),
}


def dataset_file(dataset: str | Path, data_dir: str | Path = "data", data_seed: int = 0,
                 progress: bool = False) -> Path:
    """The ``vimo-features`` file of a preset name in :data:`DATASETS` (built on first use and
    cached under ``data_dir``, as ``run_marl.py`` does) or of an existing path."""
    if str(dataset) in DATASETS:
        preset = DATASETS[str(dataset)]
        if preset.generator == "synthetic":
            from features.synthetic import ensure_dataset as ensure_synthetic

            return ensure_synthetic(data_dir, preset.preset, data_seed, progress=progress)
        from features.photounits import ensure_dataset

        return ensure_dataset(data_dir, preset.preset, data_seed, progress=progress)
    path = Path(dataset)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r}: neither a preset ({sorted(DATASETS)}) "
                                "nor an existing vimo-features file")
    return path


def trainer_config(dataset: str | Path, seed: int = 0, **overrides: Any) -> TrainerConfig:
    """The :class:`TrainerConfig` of a dataset preset (a path gets the one default recipe)."""
    preset = DATASETS.get(str(dataset))
    values: dict[str, Any] = copy.deepcopy(preset.trainer) if preset is not None else {}
    values.update(overrides)
    values["seed"] = seed
    return TrainerConfig(**values)


@dataclass
class Prepared:
    """What a task on one dataset needs: the data, the Stage I recognizer and lambda."""

    features: Path
    recognizer: Path
    frame_cost: float
    trainer: TrainerConfig
    stage1: dict[str, Any]  # Stage I's done.json (probe, self-check, lambda rule)

    def task_config(self, **overrides: Any) -> dict[str, Any]:
        """A validated :class:`TaskConfig` dict for this dataset and recognizer."""
        config = dict(features=str(self.features), recognizer=str(self.recognizer),
                      num_locators=self.trainer.num_locators, max_moves=self.trainer.max_moves,
                      stride=self.trainer.stride, frame_cost=self.frame_cost)
        config.update(overrides)
        return check_task_config(config)


def prepare(dataset: str | Path = "tiny", *, out_dir: str | Path, data_dir: str | Path = "data",
            data_seed: int = 0, seed: int = 0, progress: bool = False,
            trainer_overrides: dict[str, Any] | None = None) -> Prepared:
    """Dataset, Stage I recognizer and lambda for ``dataset`` (a :data:`DATASETS` name or a
    file), with the package's own Stage I (:class:`ThreeStageTrainer` stopped after Stage I,
    checkpoints under ``out_dir``; a second call with the same settings reuses them, other
    settings raise :class:`agents.trainer.SettingsMismatch`)."""
    features = dataset_file(dataset, data_dir, data_seed, progress)
    config = trainer_config(dataset, seed, **(trainer_overrides or {}))
    trainer = ThreeStageTrainer(features, config, out_dir, progress=progress)
    (stage1,) = trainer.run(resume=True, stop_after="I")
    return Prepared(features=features, recognizer=Path(stage1.recognizer),
                    frame_cost=float(trainer.frame_cost), trainer=config,
                    stage1=stage1.history)


# ----------------------------------------------------------------------------- experiments
@dataclass
class Schedule:
    """How many env steps BenchMARL collects per iteration and how much it trains on them.

    An env step is one row of the batched env advanced by one step (one joint transition),
    the unit of BenchMARL's ``frames`` and of :func:`agents.sac_training.train_sac`'s env steps.
    Off-policy (MASAC, IQL): ``off_policy_frames`` per iteration, then
    ``round(updates_per_env_step * off_policy_frames)`` gradient steps of ``batch_size``.
    On-policy (MAPPO, IPPO): ``on_policy_frames`` per iteration, ``ppo_epochs`` passes over
    them in minibatches of ``minibatch_size``. ``hidden`` is the MLP of actors and critics;
    ``device`` runs the env, the collection and the training (BenchMARL's three devices).
    ``share_policy_params``: one actor for all locators (BenchMARL's default) or one each (as
    our CTDE SAC).
    """

    num_envs: int = 128
    off_policy_frames: int = 256
    updates_per_env_step: float = 0.15
    batch_size: int = 128
    buffer_size: int = 50_000
    warmup_env_steps: int = 1024
    on_policy_frames: int = 4096
    minibatch_size: int = 512
    ppo_epochs: int = 10
    lr: float = 3e-4
    gamma: float = 0.99
    hidden: tuple[int, ...] = (256, 256)
    device: str = "cpu"
    share_policy_params: bool = True

    @classmethod
    def like_sac(cls, trainer: TrainerConfig, **overrides: Any) -> Schedule:
        """The schedule of our CTDE SAC (``trainer.sac_config()``): same rows, collection size,
        update-to-data ratio, batch, buffer, random warm-up, gamma and network width; on-policy
        batches of 32 steps of every row."""
        sac = trainer.sac_config()
        values: dict[str, Any] = dict(
            num_envs=sac.num_envs, off_policy_frames=sac.collect_env_steps,
            updates_per_env_step=sac.updates_per_env_step, batch_size=sac.batch_size,
            buffer_size=sac.buffer_size, warmup_env_steps=sac.warmup_env_steps,
            on_policy_frames=32 * sac.num_envs, minibatch_size=4 * sac.batch_size,
            lr=sac.actor_lr, gamma=sac.gamma, hidden=tuple(sac.actor_hidden),
            device=sac.device)
        values.update(overrides)
        return cls(**values)

    def frames_per_batch(self, on_policy: bool) -> int:
        return self.on_policy_frames if on_policy else self.off_policy_frames


def experiment_config(schedule: Schedule, env_steps: int, on_policy: bool,
                      save_folder: str | Path) -> Any:
    """BenchMARL's ``ExperimentConfig``: its base YAML with this schedule, ``env_steps`` rounded
    up to whole collections, no evaluation, loggers, JSON or checkpoints (we evaluate with
    :func:`agents.evaluate.evaluate_policy`); BenchMARL's folder goes to ``save_folder``."""
    from benchmarl.experiment import ExperimentConfig

    if isinstance(env_steps, bool) or not isinstance(env_steps, int) or env_steps < 1:
        raise ValueError(f"env_steps must be an integer >= 1, got {env_steps!r}")
    per_batch = schedule.frames_per_batch(on_policy)
    if per_batch % schedule.num_envs:
        kind = "on_policy_frames" if on_policy else "off_policy_frames"
        raise ValueError(f"Schedule.{kind}={per_batch} must be a multiple of "
                         f"Schedule.num_envs={schedule.num_envs} (every row steps together)")
    c = ExperimentConfig.get_from_yaml()
    c.sampling_device = c.train_device = c.buffer_device = schedule.device
    c.share_policy_params = schedule.share_policy_params
    c.max_n_iters = None
    c.max_n_frames = -(-env_steps // per_batch) * per_batch
    c.gamma, c.lr = schedule.gamma, schedule.lr
    c.on_policy_collected_frames_per_batch = schedule.on_policy_frames
    c.on_policy_n_envs_per_worker = schedule.num_envs
    c.on_policy_n_minibatch_iters = schedule.ppo_epochs
    c.on_policy_minibatch_size = min(schedule.minibatch_size, schedule.on_policy_frames)
    c.off_policy_collected_frames_per_batch = schedule.off_policy_frames
    c.off_policy_n_envs_per_worker = schedule.num_envs
    c.off_policy_n_optimizer_steps = max(
        1, round(schedule.updates_per_env_step * schedule.off_policy_frames))
    c.off_policy_train_batch_size = schedule.batch_size
    c.off_policy_memory_size = schedule.buffer_size
    c.off_policy_init_random_frames = schedule.warmup_env_steps
    c.evaluation = c.render = False
    c.loggers = []
    c.create_json = False
    c.checkpoint_interval = 0
    c.checkpoint_at_end = False
    c.save_folder = str(save_folder)
    return c


def algorithm_config(name: str) -> Any:
    """BenchMARL's config of algorithm ``name`` (its own YAML defaults)."""
    from benchmarl.algorithms import IppoConfig, IqlConfig, MappoConfig, MasacConfig

    configs = {"mappo": MappoConfig, "ippo": IppoConfig, "masac": MasacConfig, "iql": IqlConfig}
    if name not in configs:
        raise ValueError(f"algorithm {name!r}: expected one of {sorted(configs)}")
    return configs[name].get_from_yaml()


@contextmanager
def quiet_benchmarl(progress: bool) -> Iterator[None]:
    """Run BenchMARL without its progress bar (``progress=False``) and without the messages we
    know the cause of: torchrl 0.11's deprecation notice of the ``SyncDataCollector`` BenchMARL
    1.5 uses, its masked actors' ``cross_entropy(reduce=False)`` notice, and (``progress=False``)
    torchrl's INFO log lines."""
    import benchmarl.experiment.experiment as experiment_module

    original = experiment_module.tqdm
    torchrl_logger = logging.getLogger("torchrl")
    level = torchrl_logger.level
    if not progress:
        experiment_module.tqdm = partial(original, disable=True)
        torchrl_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*SyncDataCollector has been deprecated")
            warnings.filterwarnings("ignore", message=_SIZE_AVERAGE_WARNING)
            yield
    finally:
        experiment_module.tqdm = original
        torchrl_logger.setLevel(level)


@dataclass
class ExperimentRun:
    """A finished BenchMARL experiment: its ``Experiment``, the group's policy, counters."""

    algorithm: str
    experiment: Any
    policy: BenchMARLPolicy
    env_steps: int
    wall_s: float
    mean_return: float


def run_experiment(task: VideoLocatorsClass, algorithm: str, *, env_steps: int,
                   save_folder: str | Path, seed: int = 0, schedule: Schedule | None = None,
                   progress: bool = False, callbacks: list[Any] | None = None) -> ExperimentRun:
    """Train BenchMARL's ``algorithm`` on ``task`` for ``env_steps`` env steps (rounded up to
    whole collections). Its folder (``config.pkl``, nothing else: no loggers, no checkpoints)
    is created under ``save_folder``. ``callbacks``: BenchMARL ``Callback`` objects."""
    from benchmarl.experiment import Experiment
    from benchmarl.models.mlp import MlpConfig

    schedule = schedule or Schedule()
    algo = algorithm_config(algorithm)
    config = experiment_config(schedule, env_steps, algo.on_policy(), save_folder)
    Path(save_folder).mkdir(parents=True, exist_ok=True)
    model = MlpConfig.get_from_yaml()  # BenchMARL's MLP (Tanh), at the schedule's width
    model.num_cells = list(schedule.hidden)
    t0 = time.perf_counter()
    with quiet_benchmarl(progress):
        experiment = Experiment(task=task, algorithm_config=algo, model_config=model,
                                critic_model_config=copy.deepcopy(model), seed=seed,
                                config=config, callbacks=list(callbacks or []))
        experiment.run()
    wall = time.perf_counter() - t0
    policy = BenchMARLPolicy(experiment, name=algorithm)
    return ExperimentRun(algorithm=algorithm, experiment=experiment, policy=policy,
                         env_steps=int(experiment.total_frames), wall_s=wall,
                         mean_return=float(experiment.mean_return))


# ----------------------------------------------------------------------------- evaluation
class BenchMARLPolicy(LocatorPolicy):
    """A BenchMARL group policy as a :class:`agents.policies.LocatorPolicy`.

    Runs the group's actor (``Experiment.group_policies["locators"]``, or any TensorDict module
    reading ``("locators", "observation")`` / ``("locators", "action_mask")`` and writing
    ``("locators", "action")``) in deterministic mode: the mode of a masked categorical actor,
    the greedy legal action of a Q-learner. Its cost is one actor pass per locator decision
    (an MLP applied to each locator's observation).
    """

    def __init__(self, policy: Any, name: str = "benchmarl") -> None:
        if hasattr(policy, "group_policies"):  # a benchmarl Experiment
            policy = policy.group_policies[GROUP]
        if not callable(policy):
            raise TypeError(f"expected a BenchMARL Experiment or TensorDict module, got "
                            f"{type(policy).__name__}")
        self.policy, self.name = policy, name

    def _device(self) -> torch.device:
        params = list(self.policy.parameters()) if hasattr(self.policy, "parameters") else []
        return params[0].device if params else torch.device("cpu")

    @torch.no_grad()
    def act_masked(self, observation: torch.Tensor, alive: torch.Tensor,
                   action_mask: torch.Tensor, step: int) -> torch.Tensor:
        from torchrl.envs.utils import ExplorationType, set_exploration_type

        K, N = observation.shape[:2]
        device = self._device()
        td = TensorDict({GROUP: TensorDict(
            {"observation": observation.to(device, torch.float32),
             "action_mask": action_mask.to(device, torch.bool)}, batch_size=(K, N))},
            batch_size=(K,), device=device)
        was_training = getattr(self.policy, "training", False)
        if hasattr(self.policy, "eval"):
            self.policy.eval()
        try:
            with set_exploration_type(ExplorationType.DETERMINISTIC), \
                    warnings.catch_warnings():
                # torchrl 0.11's MaskedCategorical.log_prob calls cross_entropy(reduce=False)
                warnings.filterwarnings("ignore", message=_SIZE_AVERAGE_WARNING)
                out = self.policy(td)
        finally:
            if hasattr(self.policy, "train"):
                self.policy.train(was_training)
        action = out.get((GROUP, "action"))
        if action.shape == (K, N, NUM_ACTIONS):  # a one-hot spec: back to an index
            action = action.argmax(-1)
        return torch.where(alive.to(action.device), action, torch.zeros_like(action))

    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> torch.Tensor:
        """Without the env's mask: every action of an alive locator legal, stop for the rest."""
        mask = alive.unsqueeze(-1).expand(*alive.shape, NUM_ACTIONS).clone()
        mask[..., 0] = True
        return self.act_masked(observation, alive, mask, step)

    def inference_flops(self, observation: torch.Tensor, alive: torch.Tensor) -> PolicyFlops:
        """One pass on one row, split evenly over its N locator decisions."""
        flops = _count_flops(lambda: self.act(observation, alive, 0))
        return PolicyFlops(per_decision=flops / observation.shape[1])


class _GlobalOnlyTracker:
    """Stands in for ``FlopCounterMode``'s module tracker, attributing every count to
    "Global": torch's tracker looks each called module's children up in a weak dictionary,
    which compares them with ``==``, and BenchMARL's parameter containers (``TensorDictParams``,
    modules that are also TensorDicts) refuse to be turned into a bool."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalOnlyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn()`` (torch's ``FlopCounterMode``, 2 per multiply-accumulate,
    as :func:`vimo_env.costs.count_flops`), without gradients, the random stream forked."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnlyTracker()  # type: ignore[assignment]
    with torch.no_grad(), torch.random.fork_rng(devices=[]), counter:
        fn()
    return float(counter.get_total_flops())


def evaluate_on_split(policy: Any, prepared: Prepared, split: str = "test", *,
                      name: str | None = None, batch_size: int = 1024) -> EvalResult:
    """:func:`agents.evaluate.evaluate_policy` of ``policy`` on ``split`` of the prepared
    dataset, with its recognizer, ``max_moves`` and stride."""
    recognizer = Recognizer.load(prepared.recognizer, map_location="cpu").eval()
    source = source_for(prepared.features, split)
    return evaluate_policy(policy, source, recognizer, name=name,
                           max_moves=prepared.trainer.max_moves, stride=prepared.trainer.stride,
                           batch_size=batch_size, keep_trajectories=False)


# ----------------------------------------------------------------------------- CLI
def task_for(prepared: Prepared, dataset: str | Path) -> VideoLocatorsClass:
    """The task enum member of a preset (``TINY``/``DEFAULT``), or a ``CUSTOM`` task of a file."""
    member = str(dataset).upper()
    if member in VideoLocatorsTask.__members__:
        return VideoLocatorsTask[member].get_task(prepared.task_config())
    return VideoLocatorsClass("CUSTOM", prepared.task_config())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m agents.benchmarl_task",
        description="Train a BenchMARL algorithm on the VideoLocators task and score it on the "
                    "test split.")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="mappo")
    parser.add_argument("--dataset", default="tiny",
                        help=f"a preset ({', '.join(DATASETS)}) or a vimo-features file")
    parser.add_argument("--env-steps", type=int, default=8192,
                        help="training budget in env steps (rows x steps)")
    parser.add_argument("--out", default="results/benchmarl")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--allow-unhealthy-stage1", action="store_true",
                        help="train the locators even when Stage I fails its self-check "
                             "against the linear probe (default: stop with a diagnosis)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress and sys.stderr.isatty()
    out = Path(args.out)
    overrides = {"allow_unhealthy_stage1": True} if args.allow_unhealthy_stage1 else {}
    try:
        prepared = prepare(args.dataset, out_dir=out / "stage1", data_dir=args.data_dir,
                           seed=args.seed, progress=progress, trainer_overrides=overrides)
    except Stage1Unhealthy as err:
        # this CLI reuses its cached Stage I by itself: the flag alone goes on
        hint = str(err).replace("--allow-unhealthy-stage1 --resume", "--allow-unhealthy-stage1")
        raise SystemExit(f"agents.benchmarl_task: {hint}") from None
    run = run_experiment(task_for(prepared, args.dataset), args.algorithm,
                         env_steps=args.env_steps, save_folder=out / "benchmarl", seed=args.seed,
                         schedule=Schedule.like_sac(prepared.trainer), progress=progress)
    result = evaluate_on_split(run.policy, prepared, "test", name=args.algorithm)
    row = {**result.row(), "env_steps": run.env_steps, "train_wall_s": run.wall_s,
           "frame_cost": prepared.frame_cost}
    print(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()
