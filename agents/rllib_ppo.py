"""Multi-agent PPO on the locators with RLlib (new API stack), sampled by parallel EnvRunners.

    python -m agents.rllib_ppo --dataset FILE.h5 [--env-runners 2] [--policies shared|per_locator]
        [--critic local|central] [--iterations N] [--address ADDR] [--out DIR]

One file, read top to bottom (CleanRL style): the arguments (:class:`Args`), the recognizer
behind the env (Stage I, cached), the env as an RLlib ``MultiAgentEnv``, the RLModule (action
masking, optional centralized critic), the ``PPOConfig``, training, and the test-split
evaluation with :func:`agents.evaluate.evaluate_policy` beside a random policy.

**Recognizer.** ``--recognizer CKPT`` uses a checkpoint written by ``Recognizer.save`` (e.g.
``DIR/train/stage1/stage1_selected.pt`` of ``benchmarks/run_marl.py``). Without it Stage I
runs through the package's own trainer (:meth:`agents.trainer.ThreeStageTrainer.stage1`: the
same recipe, linear-probe self-check and data-derived lambda as ``run_marl.py``), written to
``OUT/recognizer/`` and reused by the next run with the same ``--out`` and settings (its
``done.json`` is the cache; other data or Stage I settings there raise). ``--budget tiny``
shrinks Stage I as ``run_marl.py --budget tiny`` does. lambda (Eq. 6) is ``--frame-cost``,
else the value Stage I derived (``frame_cost_rule``), else (``--recognizer`` without
``--frame-cost``) the env default 0.1.

**Env.** :class:`LocatorsMultiAgentEnv` is a native ``MultiAgentEnv`` over
:func:`vimo_env.parallel_env` (not RLlib's ``ParallelPettingZooEnv``: that wrapper keeps the
observation a plain Box, so the action mask, which the PettingZoo env gives in its infos, could
not reach the RLModule, and its agent order is a set). Each locator observes a Dict:
``observations`` (its own ``[h_i, n_i/(m+1), p_i/(T-1), t/m]``), ``action_mask`` (float ``[4]``,
1 = legal: stop always, moves only before the video's last frame) and ``critic`` (the env's
global ``state()``, all observations and alive flags, plus the locator's one-hot id). Every
locator that acted gets the team reward; a locator leaves the episode when it stops, the
episode ends when all have stopped (RLlib handles agents that stop at different steps). So a
locator's PPO return is the team reward summed over the steps it was alive: stopping early
forgoes the gains the others still make, which the frame cost ``lambda`` balances.

**RLModule.** :class:`LocatorModule` (a ``TorchRLModule`` with ``ValueFunctionAPI``): an MLP
actor on ``observations`` whose logits of illegal actions are pushed to -1e9 before the
Categorical (so masked actions are never sampled and carry no probability in the PPO ratio,
the KL or the entropy), and an MLP value head.

* ``--policies shared``: one module for every locator (parameter sharing, the default);
  ``per_locator``: one module per locator (module id = agent id), as the paper's ``F_T^i`` /
  ``F_P^i``.
* ``--critic local``: the value head reads the locator's own observation (independent PPO).
  ``--critic central``: it reads the ``critic`` entry (the global ``state()`` + locator id):
  centralized training, decentralized execution (MAPPO with an agent-specific global state);
  the actor still sees only its own observation, and evaluation never reads the state. With
  ``shared`` this is one centralized critic for all locators. With ``per_locator`` each
  locator's module has its own centralized critic; **one value head shared by separate
  per-locator policies is not offered**: in RLlib 2.60 each module of a MultiRLModule has its
  own optimizer and its own loss, and PPO's GAE connector computes values module by module.
  A value network shared by several modules needs a separate critic module plus a custom
  Learner (loss and optimizer for the critic) and a custom GAE connector (RLlib's MAPPO example
  on its master branch does this, not shipped in 2.60); that connector also stacks the modules'
  batches column-wise, which assumes every agent steps at every env step, false here since
  locators stop at different steps. Putting the same torch module into every per-locator
  module instead would have three Adam optimizers step the same weights. A shared critic is
  what ``--policies shared --critic central`` gives, within RLlib's own mechanisms.

**Distribution.** ``--env-runners K`` (default 2) sampling actors, each its own process with
one torch thread, on the Ray cluster ``ray.init`` joins: ``--address`` or ``RAY_ADDRESS`` (a
cluster started by ``ray start --head`` / ``ray start --address=HEAD:6379``), else a local one
started in a temporary directory (no dashboard, nothing under the home directory) and shut
down at the end. The learner runs in the driver. On a multi-node cluster the dataset (and
``--recognizer``) path must exist on every node and the package must be installed there.
Same seed, same run: the CLI re-runs itself with ``PYTHONHASHSEED=0`` and the EnvRunners get
it too (:data:`WORKER_ENV`); a driver of your own needs it set for bitwise repeats.

Results: ``OUT/rllib_ppo.json`` (arguments, per-iteration training metrics, the test rows of
the trained and the random policy), the trained modules as RLlib checkpoints in ``OUT/policy``
(``RLlibLocatorPolicy.load(OUT/policy)`` gives a policy for ``evaluate_policy``) and the
printed table; progress lines only on a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.evaluate import EvalResult, evaluate_policy
from agents.metrics import mean_true_class_probability
from agents.policies import LocatorPolicy, PolicyFlops, as_policy
from features.atomic import write_text_atomic
from features.ray_session import RaySession
from features.source import CachedFrameSource
from vimo_env.core import NUM_ACTIONS
from vimo_env.costs import count_flops
from vimo_env.recognizer import Recognizer

try:  # RLlib is part of the dev install; a clear error at use time otherwise
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
    from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
    from ray.rllib.env.multi_agent_env import MultiAgentEnv
except ImportError as _err:  # pragma: no cover - exercised only without ray
    raise ImportError("agents.rllib_ppo needs ray[rllib]==2.60.0 (pip install -e '.[rllib]')"
                      ) from _err

POLICY_MODES = ("shared", "per_locator")
CRITIC_MODES = ("local", "central")
SHARED_MODULE = "shared"
MASKED_LOGIT = -1e9  # logit of an illegal action: probability exp(-1e9) = 0, finite gradients
# Stage I budgets: "default" is the package's one recipe (agents.trainer.TrainerConfig);
# "tiny" is agents.trainer.TINY_STAGE1, as in benchmarks/run_marl.py --budget tiny
STAGE1_BUDGETS = ("default", "tiny")


@dataclass
class Args:
    """Every option of a run (the CLI flags are these names with dashes)."""

    dataset: str  # a vimo-features HDF5 file with train/val/test splits
    out: str = "runs/rllib_ppo"
    policies: str = "shared"  # "shared" | "per_locator"
    critic: str = "local"  # "local" | "central" (value head on the global state)
    env_runners: int = 2  # sampling processes (RLlib EnvRunner actors)
    envs_per_runner: int = 1
    iterations: int = 20  # PPO train() calls
    train_batch_size: int = 1024  # env steps per iteration (all runners together)
    minibatch_size: int = 256
    num_epochs: int = 6
    lr: float = 1e-3
    gamma: float = 1.0  # episodes last at most max_moves steps: the undiscounted team return
    gae_lambda: float = 0.95
    entropy_coeff: float = 0.01
    hidden: tuple[int, ...] = (64, 64)  # actor and critic MLP widths
    num_locators: int = 3
    max_moves: int = 4
    stride: int = 3
    frame_cost: float | None = None  # lambda; None: Stage I's data-derived value
    recognizer: str | None = None  # a Recognizer checkpoint; None: Stage I (cached under out)
    budget: str = "default"  # Stage I budget when it runs: "default" | "tiny"
    stage1_steps: int | None = None  # override of the budget's Stage I gradient steps
    allow_unhealthy_stage1: bool = False  # go on when Stage I fails its self-check
    seed: int = 0
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS, else a local cluster
    threads: int = 1  # torch threads of the driver (learner, evaluation)
    eval_batch_size: int = 256
    progress: bool | None = None  # per-iteration lines; None: only on a terminal

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        if self.policies not in POLICY_MODES:
            raise ValueError(f"Args.policies must be one of {POLICY_MODES}, got "
                             f"{self.policies!r}")
        if self.critic not in CRITIC_MODES:
            raise ValueError(f"Args.critic must be one of {CRITIC_MODES}, got {self.critic!r}")
        if self.budget not in STAGE1_BUDGETS:
            raise ValueError(f"Args.budget must be one of {STAGE1_BUDGETS}, got "
                             f"{self.budget!r}")
        for name, low in (("env_runners", 0), ("envs_per_runner", 1), ("iterations", 0),
                          ("train_batch_size", 1), ("minibatch_size", 1), ("num_epochs", 1),
                          ("num_locators", 1), ("max_moves", 1), ("stride", 1), ("threads", 1),
                          ("eval_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Args.{name} must be an integer >= {low}, got {value!r}")
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(f"Args.minibatch_size ({self.minibatch_size}) must be <= "
                             f"train_batch_size ({self.train_batch_size})")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                  for h in self.hidden):
            raise ValueError(f"Args.hidden must be positive integers, got {self.hidden!r}")
        if self.stage1_steps is not None and (isinstance(self.stage1_steps, bool) or not
                                              isinstance(self.stage1_steps, int)
                                              or self.stage1_steps < 1):
            raise ValueError(f"Args.stage1_steps must be None or an integer >= 1, got "
                             f"{self.stage1_steps!r}")
        if self.frame_cost is not None and not self.frame_cost >= 0:
            raise ValueError(f"Args.frame_cost must be None or >= 0, got {self.frame_cost}")
        for name in ("lr", "gamma", "gae_lambda", "entropy_coeff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Args.{name} must be >= 0, got {getattr(self, name)}")
        if not Path(self.dataset).is_file():
            raise FileNotFoundError(f"Args.dataset: no such file {self.dataset}")
        if self.recognizer is not None and not Path(self.recognizer).is_file():
            raise FileNotFoundError(f"Args.recognizer: no such file {self.recognizer}")


# ------------------------------------------------------------------ 1. the recognizer (Stage I)
def stage1_recognizer(args: Args, progress: bool = False) -> tuple[Path, float | None]:
    """The recognizer checkpoint behind the env and the lambda Stage I derived from the data.

    ``args.recognizer`` if given (lambda then unknown: None); else Stage I with the package's
    trainer in ``OUT/recognizer`` (``ThreeStageTrainer.run(resume=True, stop_after="I")``:
    reused when finished; other data or settings there raise ``SettingsMismatch``).
    """
    if args.recognizer is not None:
        return Path(args.recognizer), None
    from agents.trainer import TINY_STAGE1, ThreeStageTrainer, TrainerConfig

    values = dict(TINY_STAGE1) if args.budget == "tiny" else {}
    if args.stage1_steps is not None:
        values["stage1_steps"] = args.stage1_steps
    if args.allow_unhealthy_stage1:
        values["allow_unhealthy_stage1"] = True
    # frame_cost=None: Stage I derives lambda from the data (``--frame-cost`` overrides it later)
    config = TrainerConfig(num_locators=args.num_locators, max_moves=args.max_moves,
                           stride=args.stride, frame_cost=None, seed=args.seed, device="cpu",
                           **values)
    # the trainer's own resume check refuses a cached Stage I of other data or settings
    trainer = ThreeStageTrainer(args.dataset, config, Path(args.out) / "recognizer",
                                progress=progress)
    (stage1,) = trainer.run(resume=True, stop_after="I")
    return stage1.recognizer, trainer.frame_cost


# ------------------------------------------------------------------ 2. the env
class LocatorsMultiAgentEnv(MultiAgentEnv):
    """The PettingZoo env as an RLlib ``MultiAgentEnv`` with Dict observations (module doc).

    ``env_config`` keys: ``features``, ``recognizer`` (paths), ``num_locators``, ``max_moves``,
    ``stride``, ``frame_cost``, ``seed`` (offset by the EnvRunner's worker and vector index so
    every sampler draws its own videos). Infos are empty except at the end of an episode,
    where every agent's holds ``frames`` (F, all locators), ``correct`` and ``team_return``
    (the sum of the team rewards: RLlib's own episode return adds up every locator's copy).
    ``agents`` lists the agents of the latest step's dicts (the ones that just stopped
    included: RLlib's env checker compares the returned keys with it).
    """

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        import vimo_env

        if not config or "features" not in config:
            raise ValueError("LocatorsMultiAgentEnv: env_config['features'] (a vimo-features "
                             "file) is required")
        torch.set_num_threads(1)  # one thread per sampling process (small networks)
        seed = config.get("seed", 0)
        # an EnvContext (RLlib) carries which runner / sub-env this is
        seed += 1000 * getattr(config, "worker_index", 0) + getattr(config, "vector_index", 0)
        self.par_env = vimo_env.parallel_env(
            features=config["features"], recognizer=config.get("recognizer"), split="train",
            num_locators=config.get("num_locators", 3), max_moves=config.get("max_moves", 4),
            stride=config.get("stride", 3), frame_cost=config.get("frame_cost", 0.1),
            device="cpu", seed=seed)
        self.possible_agents = list(self.par_env.possible_agents)
        self.agents = []
        n = len(self.possible_agents)
        obs_space = self.par_env.observation_space(self.possible_agents[0])
        state_space = self.par_env.state_space
        critic_space = gym.spaces.Box(
            low=np.concatenate([state_space.low, np.zeros(n, np.float32)]),
            high=np.concatenate([state_space.high, np.ones(n, np.float32)]), dtype=np.float32)
        space = gym.spaces.Dict({
            "observations": obs_space,
            "action_mask": gym.spaces.Box(0.0, 1.0, (NUM_ACTIONS,), np.float32),
            "critic": critic_space,
        })
        self.observation_spaces = {a: space for a in self.possible_agents}
        self.action_spaces = {a: gym.spaces.Discrete(NUM_ACTIONS) for a in self.possible_agents}
        self._one_hot = {a: np.eye(n, dtype=np.float32)[i]
                         for i, a in enumerate(self.possible_agents)}

    def _dict_obs(self, obs: dict[str, np.ndarray], infos: dict[str, dict]) -> dict:
        state = self.par_env.state().astype(np.float32)
        return {a: {"observations": o,
                    "action_mask": infos[a]["action_mask"].astype(np.float32),
                    "critic": np.concatenate([state, self._one_hot[a]])}
                for a, o in obs.items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict, dict]:
        obs, infos = self.par_env.reset(seed=seed, options=options)
        self.agents = list(obs)
        self._team_return = 0.0
        return self._dict_obs(obs, infos), {a: {} for a in obs}

    def step(self, action_dict: dict) -> tuple[dict, dict, dict, dict, dict]:
        obs, rewards, terms, truncs, infos = self.par_env.step(
            {a: int(action_dict[a]) for a in self.par_env.agents})
        # the agents of this step's dicts (those that just stopped included), as RLlib's
        # env checker expects; the next step takes actions from the live ones only
        self.agents = list(obs)
        out_infos: dict[str, dict] = {a: {} for a in obs}
        self._team_return += next(iter(rewards.values()))  # the same for every locator
        done = not self.par_env.agents
        if done:  # the episode ended: its record, for the training metrics
            record = next(iter(infos.values()))["episode"]
            out_infos = {a: {"frames": int(record["frames"]), "correct": bool(record["correct"]),
                             "team_return": self._team_return} for a in obs}
        terms["__all__"] = done
        truncs["__all__"] = False
        return self._dict_obs(obs, infos), rewards, terms, truncs, out_infos


# ------------------------------------------------------------------ 3. the RLModule
def mlp(sizes: list[int]) -> torch.nn.Sequential:
    """Linear layers with tanh between them (none after the last)."""
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def masked_logits(logits: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """``logits`` with illegal actions (``action_mask`` 0) set to a huge negative number."""
    return torch.where(action_mask > 0.5, logits, torch.full_like(logits, MASKED_LOGIT))


class LocatorModule(TorchRLModule, ValueFunctionAPI):
    """Actor (own observation, masked logits) and value head (own observation, or the
    ``critic`` entry with ``model_config["critic"] == "central"``). ``model_config``:
    ``hidden`` (list of widths), ``critic`` ("local" | "central")."""

    def setup(self) -> None:
        hidden = list(self.model_config.get("hidden", (64, 64)))
        self.central = self.model_config.get("critic", "local") == "central"
        obs_dim = self.observation_space["observations"].shape[0]
        value_in = self.observation_space["critic"].shape[0] if self.central else obs_dim
        self.actor = mlp([obs_dim, *hidden, self.action_space.n])
        self.value = mlp([value_in, *hidden, 1])

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: masked_logits(self.actor(obs["observations"]),
                                                          obs["action_mask"])}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        obs = batch[Columns.OBS]
        return self.value(obs["critic"] if self.central else obs["observations"]).squeeze(-1)


# ------------------------------------------------------------------ 4. the PPO config
def module_ids(policies: str, num_locators: int) -> list[str]:
    """``["shared"]`` or one id per locator (the agent ids)."""
    if policies == "shared":
        return [SHARED_MODULE]
    return [f"locator_{i}" for i in range(num_locators)]


def policy_mapping(policies: str) -> Callable[..., str]:
    """RLlib's ``policy_mapping_fn`` for ``policies`` (a module-level function: picklable)."""
    return _map_shared if policies == "shared" else _map_own


def _map_shared(agent_id: str, episode: Any = None, **kwargs: Any) -> str:
    return SHARED_MODULE


def _map_own(agent_id: str, episode: Any = None, **kwargs: Any) -> str:
    return agent_id


def _on_episode_end(*, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
    """Log the team return and the frames observed per video as training metrics."""
    if metrics_logger is None:
        return
    for infos in episode.get_infos(-1).values():
        if "frames" in infos:
            metrics_logger.log_value("frames_per_video", infos["frames"], window=100)
            metrics_logger.log_value("team_return", infos["team_return"], window=100)
            return


def build_config(args: Args, recognizer: str | os.PathLike, frame_cost: float) -> Any:
    """The ``PPOConfig`` of a run (RLlib's default new API stack: RLModules, EnvRunners)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    env_config = {"features": str(Path(args.dataset).resolve()),
                  "recognizer": str(Path(recognizer).resolve()),
                  "num_locators": args.num_locators, "max_moves": args.max_moves,
                  "stride": args.stride, "frame_cost": float(frame_cost), "seed": args.seed}
    model_config = {"hidden": list(args.hidden), "critic": args.critic}
    ids = module_ids(args.policies, args.num_locators)
    runners = args.env_runners
    # each runner samples an equal share of the batch per iteration (synchronous PPO)
    fragment = max(1, args.train_batch_size // (max(runners, 1) * args.envs_per_runner))
    return (
        PPOConfig()
        .environment(LocatorsMultiAgentEnv, env_config=env_config)
        .framework("torch")
        .env_runners(num_env_runners=runners, num_envs_per_env_runner=args.envs_per_runner,
                     num_cpus_per_env_runner=1, rollout_fragment_length=fragment,
                     create_env_on_local_worker=runners == 0,
                     # RLlib 2.60's MultiAgentEnvRunner re-runs to_numpy() on every episode
                     # finished so far at every env step of a sample() call: quadratic in
                     # the episodes per call, and ours last <= max_moves steps (2x slower
                     # at 256 steps per call, worse beyond). List episodes work unchanged
                     # (ray-project/ray#50077 proposed this as the default).
                     episodes_to_numpy=False)
        .learners(num_learners=0)
        .multi_agent(policies=set(ids), policy_mapping_fn=policy_mapping(args.policies))
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs={
            mid: RLModuleSpec(module_class=LocatorModule, model_config=model_config)
            for mid in ids}))
        .training(train_batch_size_per_learner=args.train_batch_size,
                  minibatch_size=args.minibatch_size, num_epochs=args.num_epochs, lr=args.lr,
                  gamma=args.gamma, lambda_=args.gae_lambda, entropy_coeff=args.entropy_coeff,
                  vf_loss_coeff=0.5, clip_param=0.2, use_kl_loss=False, grad_clip=0.5)
        .callbacks(on_episode_end=_on_episode_end)
        .debugging(seed=args.seed, log_level="ERROR")
        .reporting(metrics_num_episodes_for_smoothing=100)
    )


# ------------------------------------------------------------------ 5. Ray
# Ray worker processes (EnvRunners): one thread each, and a fixed string hash seed, since
# RLlib 2.60 orders the agents of a step by iterating a set of their ids (so the pairing of
# sampled actions with agents follows the process's hash seed); the driver's learner does the
# same when it builds the train batch, which is why the CLI re-runs itself with one
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def init_ray(address: str | None = None, log_to_driver: bool = False,
             num_cpus: int | None = None) -> RaySession:
    """Ray up for training (:class:`features.ray_session.RaySession`: the cluster at
    ``address`` / ``RAY_ADDRESS``, else a private local one with ``num_cpus`` logical CPUs,
    default the machine's; each EnvRunner asks for one, so ask for at least ``--env-runners``
    to run more runners than cores), its workers started with :data:`WORKER_ENV`. Undo it with
    :func:`shutdown_ray`."""
    return RaySession(address, num_cpus, log_to_driver=log_to_driver,
                      runtime_env={"env_vars": WORKER_ENV}, configure_logging=False).start()


def shutdown_ray(session: RaySession) -> None:
    """Shut down what :func:`init_ray` started; remove its folder and token."""
    session.stop()


def build_algorithm(config: Any, out: str | os.PathLike) -> Any:
    """``config.build_algo()`` with RLlib's log directory under ``OUT/rllib`` instead of
    ``~/ray_results``: RLlib 2.60's ``Algorithm`` (a Tune ``Trainable``) creates its logdir in
    ``ray.tune.trainable.trainable.DEFAULT_STORAGE_PATH`` when not run by Tune and has no
    argument for it, so that module global is pointed at ``OUT/rllib`` during the build."""
    from ray.tune.trainable import trainable

    logdir = Path(out).resolve() / "rllib"
    logdir.mkdir(parents=True, exist_ok=True)
    saved = trainable.DEFAULT_STORAGE_PATH
    trainable.DEFAULT_STORAGE_PATH = str(logdir)
    try:
        return config.build_algo()
    finally:
        trainable.DEFAULT_STORAGE_PATH = saved


# ------------------------------------------------------------------ 6. the trained policy
class RLlibLocatorPolicy(LocatorPolicy):
    """Trained RLlib modules as a :class:`LocatorPolicy` for the evaluation harness: each
    locator's argmax of its module's masked logits (decentralized: own observation only)."""

    def __init__(self, modules: dict[str, LocatorModule], policies: str,
                 name: str = "rllib-ppo") -> None:
        self.modules, self.policies, self.name = modules, policies, name
        self.actors = {mid: m.actor.cpu().eval() for mid, m in modules.items()}

    def _actor(self, i: int) -> torch.nn.Module:
        return self.actors[SHARED_MODULE if self.policies == "shared" else f"locator_{i}"]

    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> torch.Tensor:
        mask = torch.ones(*alive.shape, NUM_ACTIONS)
        return self.act_masked(observation, alive, mask, step)

    @torch.no_grad()
    def act_masked(self, observation: torch.Tensor, alive: torch.Tensor,
                   action_mask: torch.Tensor, step: int) -> torch.Tensor:
        obs = observation.float().cpu()
        mask = action_mask.float().cpu()
        if self.policies == "shared":  # one batched pass over [B, N, D]
            logits = self.actors[SHARED_MODULE](obs)
        else:  # one module per locator
            logits = torch.stack([self._actor(i)(obs[:, i]) for i in range(obs.shape[1])], 1)
        actions = masked_logits(logits, mask).argmax(-1)
        return torch.where(alive.cpu(), actions, torch.zeros_like(actions))

    def inference_flops(self, observation: torch.Tensor, alive: torch.Tensor) -> PolicyFlops:
        """One actor pass per alive locator decision (the value head is not run)."""
        row = observation[:, 0].float().cpu()
        return PolicyFlops(per_decision=count_flops(lambda: self._actor(0)(row)))

    def save(self, path: str | os.PathLike) -> Path:
        """Each module as an RLlib checkpoint (``RLModule.save_to_path``) in ``path/<module
        id>``, plus ``path/policy.json``; :meth:`load` restores the policy."""
        path = Path(path)
        for mid, module in self.modules.items():
            module.save_to_path(str((path / mid).resolve()))
        write_text_atomic(path / "policy.json", json.dumps({"policies": self.policies,
                                                            "modules": sorted(self.modules)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RLlibLocatorPolicy:
        """The policy :meth:`save` wrote (``RLModule.from_checkpoint`` per module)."""
        from ray.rllib.core.rl_module.rl_module import RLModule

        path = Path(path)
        index = path / "policy.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: not a saved RLlib locator policy")
        meta = json.loads(index.read_text())
        modules = {mid: RLModule.from_checkpoint(str((path / mid).resolve()))
                   for mid in meta["modules"]}
        return cls(modules, meta["policies"])


def trained_policy(algo: Any, policies: str, num_locators: int) -> RLlibLocatorPolicy:
    """The trained modules (the driver's copy, synced with the learner after every update),
    copied for evaluation."""
    import copy

    modules = {mid: copy.deepcopy(algo.get_module(mid)).cpu()
               for mid in module_ids(policies, num_locators)}
    return RLlibLocatorPolicy(modules, policies)


def random_policy(seed: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Uniform over each locator's legal actions (the comparison row)."""
    rng = np.random.default_rng(seed)

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        mask = obs["action_mask"].astype(np.float64)
        p = mask / mask.sum(-1, keepdims=True)
        u = rng.random(p.shape[:-1] + (1,))
        return (u > np.cumsum(p, -1)).sum(-1).clip(0, NUM_ACTIONS - 1)

    act.__name__ = "random"
    return act


def team_objective(result: EvalResult, labels: np.ndarray, frame_cost: float) -> float:
    """Mean over videos of ``P_final(true class) - lambda * frames``: the team return plus
    constants shared by every policy (``P_0`` and the initial frames' cost)."""
    return mean_true_class_probability(result.scores, labels) - frame_cost * \
        result.frames_per_video


# ------------------------------------------------------------------ 7. train and evaluate
def train(args: Args, recognizer: str | os.PathLike, frame_cost: float,
          progress: bool = False) -> tuple[Any, list[dict]]:
    """Build the algorithm and run ``args.iterations`` PPO iterations (Ray must be up).
    Returns the algorithm (the caller stops it) and one metrics dict per iteration."""
    # the learner builds the modules in this process: their initial weights must not depend
    # on what ran here before (e.g. Stage I, or nothing when its checkpoint was cached)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    algo = build_algorithm(build_config(args, recognizer, frame_cost), args.out)
    history = []
    for it in range(args.iterations):
        t0 = time.perf_counter()
        result = algo.train()
        runners = result.get("env_runners", {})
        row = {"iteration": it + 1, "wall_s": time.perf_counter() - t0,
               "env_steps": int(result.get("num_env_steps_sampled_lifetime", 0)),
               "team_return": float(runners.get("team_return", np.nan)),
               "frames_per_video": float(runners.get("frames_per_video", np.nan))}
        history.append(row)
        if progress:
            print(f"iter {row['iteration']:3d}  env steps {row['env_steps']:7d}  "
                  f"team return {row['team_return']:+.4f}  frames/video "
                  f"{row['frames_per_video']:5.2f}  ({row['wall_s']:.1f} s)", flush=True)
    return algo, history


def evaluate(policy: Any, args: Args, recognizer: Recognizer, frame_cost: float,
             source: CachedFrameSource, name: str) -> dict:
    """One test-split row: mAP, top-1, frames/video, GFLOPs and the team objective."""
    result = evaluate_policy(as_policy(policy, name), source, recognizer, max_moves=args.max_moves,
                             stride=args.stride, batch_size=args.eval_batch_size,
                             keep_trajectories=False)
    return {**result.row(), "team_objective": team_objective(result, source.labels, frame_cost)}


def run(args: Args) -> dict:
    """Stage I (or the given recognizer), PPO, and the test rows; writes ``OUT/rllib_ppo.json``."""
    progress = sys.stdout.isatty() if args.progress is None else args.progress
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checkpoint, derived = stage1_recognizer(args, progress)
    frame_cost = args.frame_cost if args.frame_cost is not None else (
        derived if derived is not None else 0.1)
    session = init_ray(args.address, log_to_driver=progress,
                       num_cpus=max(os.cpu_count() or 1, args.env_runners))
    try:
        algo, history = train(args, checkpoint, frame_cost, progress)
        try:
            policy = trained_policy(algo, args.policies, args.num_locators)
        finally:
            algo.stop()
        policy.save(out / "policy")
    finally:
        shutdown_ray(session)
    recognizer = Recognizer.load(checkpoint).eval()
    test = CachedFrameSource(args.dataset, split="test", device="cpu")
    rows = [evaluate(policy, args, recognizer, frame_cost, test, "rllib-ppo"),
            evaluate(random_policy(args.seed), args, recognizer, frame_cost, test, "random")]
    payload = {"args": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in dataclasses.asdict(args).items()},
               "recognizer": str(checkpoint), "frame_cost": frame_cost,
               "ray": {"address": args.address or os.environ.get("RAY_ADDRESS"),
                       "local_temp_dir": session.temp_dir},
               "training": history, "test": rows, "wall_time_s": time.perf_counter() - t0}
    write_text_atomic(out / "rllib_ppo.json", json.dumps(payload, indent=2))
    return payload


def print_rows(payload: dict) -> None:
    print(f"test split, lambda = {payload['frame_cost']:.5g} ({payload['args']['policies']} "
          f"policies, {payload['args']['critic']} critic, {payload['args']['env_runners']} env "
          "runners)")
    print(f"{'policy':<10} {'mAP %':>7} {'top-1 %':>8} {'frames/video':>13} {'GFLOPs':>8} "
          f"{'P_gt - lambda*F':>16}")
    for r in payload["test"]:
        print(f"{r['name']:<10} {r['mAP']:>7.1f} {r['top1']:>8.1f} {r['frames_per_video']:>13.2f}"
              f" {r['gflops_per_video']:>8.3f} {r['team_objective']:>16.4f}")


def parse_args(argv: list[str] | None = None) -> Args:
    """The CLI flags (the :class:`Args` fields with dashes); bad values exit naming the flag."""
    f = {x.name: x.default for x in dataclasses.fields(Args) if x.name != "dataset"}
    p = argparse.ArgumentParser(prog="python -m agents.rllib_ppo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="a vimo-features HDF5 file")
    p.add_argument("--out", default=f["out"], help="results and Stage I cache (%(default)s)")
    p.add_argument("--policies", choices=POLICY_MODES, default=f["policies"])
    p.add_argument("--critic", choices=CRITIC_MODES, default=f["critic"])
    p.add_argument("--env-runners", type=int, default=f["env_runners"],
                   help="sampling processes (%(default)s)")
    p.add_argument("--envs-per-runner", type=int, default=f["envs_per_runner"])
    p.add_argument("--iterations", type=int, default=f["iterations"])
    p.add_argument("--train-batch-size", type=int, default=f["train_batch_size"],
                   help="env steps per iteration (%(default)s)")
    p.add_argument("--minibatch-size", type=int, default=f["minibatch_size"])
    p.add_argument("--num-epochs", type=int, default=f["num_epochs"])
    p.add_argument("--lr", type=float, default=f["lr"])
    p.add_argument("--gamma", type=float, default=f["gamma"])
    p.add_argument("--gae-lambda", type=float, default=f["gae_lambda"])
    p.add_argument("--entropy-coeff", type=float, default=f["entropy_coeff"])
    p.add_argument("--hidden", type=_widths, default=f["hidden"], help="MLP widths, e.g. 64,64")
    p.add_argument("-N", "--num-locators", type=int, default=f["num_locators"])
    p.add_argument("-m", "--max-moves", type=int, default=f["max_moves"])
    p.add_argument("--stride", type=int, default=f["stride"])
    p.add_argument("--frame-cost", "--lambda", type=float, default=None,
                   help="lambda of Eq. 6 (default: Stage I's data-derived value)")
    p.add_argument("--recognizer", default=None, help="a Recognizer checkpoint (.pt); "
                   "default: Stage I, cached under OUT/recognizer")
    p.add_argument("--budget", choices=STAGE1_BUDGETS, default=f["budget"],
                   help="Stage I budget when it runs")
    p.add_argument("--stage1-steps", type=int, default=None)
    p.add_argument("--allow-unhealthy-stage1", action="store_true",
                   help="train the locators even when Stage I fails its self-check against "
                        "the linear probe (default: stop with a diagnosis)")
    p.add_argument("--seed", type=int, default=f["seed"])
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--threads", type=int, default=f["threads"], help="torch threads, driver")
    p.add_argument("--eval-batch-size", type=int, default=f["eval_batch_size"])
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="per-iteration lines (default: only on a terminal)")
    ns = p.parse_args(argv)
    try:
        return Args(**vars(ns))
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
        raise  # unreachable: p.error exits


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def main(argv: list[str] | None = None) -> dict:
    from agents.trainer import Stage1Unhealthy

    try:
        payload = run(parse_args(argv))
    except Stage1Unhealthy as err:
        # this CLI reuses its cached Stage I by itself: the flag alone goes on
        hint = str(err).replace("--allow-unhealthy-stage1 --resume", "--allow-unhealthy-stage1")
        raise SystemExit(f"agents.rllib_ppo: {hint}") from None
    print_rows(payload)
    return payload


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") is None:  # reproducible runs (see WORKER_ENV)
        os.execve(sys.executable, [sys.executable, "-m", "agents.rllib_ppo", *sys.argv[1:]],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    # run through the importable module, so RLlib pickles LocatorsMultiAgentEnv and the
    # mapping functions by reference (``agents.rllib_ppo.*``), not as ``__main__`` objects
    from agents.rllib_ppo import main as _main

    _main()
