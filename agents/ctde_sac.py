"""CTDE discrete SAC for the locators (ViMo §3.3 Stage II, App. A, App. B) on Tianshou 2.0.x.

The joint env (``VideoLocators-v0`` or ``agents.toy``) is one Tianshou env with a
``MultiDiscrete([4]*N)`` action and a Dict observation ``{"observation": [N, obs_dim],
"alive": [N]}``. What Tianshou cannot express is written here, the rest is stock:

* actors (``LocatorActors``): one MLP per locator (4 x 512 by default), each sees only its own
  observation; optionally one parameter-shared MLP fed the locator id as a one-hot;
* centralized twin critics (``CentralCritic``, 5 x 512): input = global state (every locator's
  observation and the alive flags), the locator id, and the one-hot actions of the *other alive*
  locators; output = Q over the locator's own 4 actions. Both critics are built separately (own
  initialization) and each gets a Polyak-updated target copy (Tianshou's lagged networks);
* per-locator TD targets: ``y_i = r + gamma * alive_i(s') * V_i(s')`` with
  ``V_i(s') = pi_i(s')^T [min_j Q_j'(s', ., a'_-i) - alpha log pi_i(s')]``, ``a'_-i`` sampled
  from the current actors: a locator that stopped has no future value (Eq. 9, 10); with
  ``difference_credit = w > 0``, ``r`` becomes ``(1 - w) r + w D_i`` where ``D_i`` (the env's
  ``info["locator_credit"]``) is locator i's difference reward: the team reward minus the team
  reward had it alone stopped (ours; the paper uses the team reward for every locator);
* losses averaged over alive (locator, sample) pairs only: a stopped locator gets no gradient;
* automatic temperature (Eq. 11) toward ``target_entropy_ratio * ln 4`` per locator.

Tianshou supplies the replay buffer, the collector (fed by ``agents.tianshou_env``), n-step
returns (``compute_nstep_return`` handles the [batch, N] per-locator targets), Polyak updates,
optimizer factories, the off-policy trainer and its TensorBoard logger.

Paper values (App. A, App. E) and our reading of them are in ``SACConfig``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.vector import VectorEnv
from tianshou.algorithm import DiscreteSAC
from tianshou.algorithm.algorithm_base import Policy
from tianshou.algorithm.modelfree.discrete_sac import DiscreteSACTrainingStats
from tianshou.algorithm.modelfree.sac import AutoAlpha
from tianshou.algorithm.optim import AdamOptimizerFactory
from tianshou.data import Batch, Collector, VectorReplayBuffer
from tianshou.utils.torch_utils import policy_within_training_step
from torch import nn
from tqdm import tqdm

from agents.tianshou_env import TianshouVectorEnvAdapter
from features.atomic import atomic_path, torch_save_atomic
from features.validation import require_int

NUM_ACTIONS = 4
CREDIT_INFO_KEY = "locator_credit"


@dataclass
class SACConfig:
    """Hyper-parameters of CTDE discrete SAC and of its training loop.

    Paper values (ViMo App. A / App. E): Adam for everything; learning rates policy 1e-5,
    critic 5e-5, alpha 5e-4; batch size 8; Polyak factor "tau = 0.99" in Eq. 7 written as
    ``target = tau * local + (1 - tau) * target``. Taken literally that would make the target
    almost equal to the online critic, which defeats a target network; we read it as the
    momentum convention (the target *keeps* 0.99), i.e. Tianshou's ``tau = 0.01``. Not given in
    the paper (ours): gamma, n-step, target entropy, initial alpha, buffer size, update ratio.
    Discrete SAC (Christodoulou 2019) uses a target entropy of ``0.98 ln|A|``; that kept the
    locators' policies near uniform in our coordination toy, so the default here is ``0.3``.
    """

    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512, 512)
    shared_actor: bool = False  # one parameter-shared actor fed a one-hot locator id
    actor_lr: float = 1e-5
    critic_lr: float = 5e-5
    alpha_lr: float = 5e-4
    batch_size: int = 8
    tau: float = 0.01
    gamma: float = 0.99
    n_step: int = 1  # 1 = exactly Eq. 9; >1 also sums team rewards after a locator stopped
    target_entropy_ratio: float = 0.3  # target entropy per locator = ratio * ln 4
    init_alpha: float = 0.05
    auto_alpha: bool = True
    # training loop
    num_envs: int = 8  # rows of the batched env collected per step
    buffer_size: int = 100_000
    warmup_env_steps: int = 0  # uniformly random transitions collected before learning
    collect_env_steps: int = 64  # env transitions per training step (multiple of num_envs)
    updates_per_env_step: float = 0.25  # gradient steps per collected transition
    epoch_env_steps: int = 2048
    # gradient steps at the start of a run that fit only the critics (actor and alpha wait):
    # a learner continued on a new recognizer (Stage III) sees new observations and rewards,
    # and an actor following critics fitted to the old ones drifts away from a good policy
    critic_warmup_gradient_steps: int = 0
    # reward in locator i's critic target: (1 - w) * team reward + w * difference reward, the
    # team reward minus what it would have been had locator i alone stopped (the env's
    # info["locator_credit"]); w = 0 is the paper (team reward for all); w > 0 needs n_step = 1
    difference_credit: float = 0.0
    seed: int = 0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SACConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"SACConfig.tau must be in [0, 1], got {self.tau}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"SACConfig.gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.difference_credit <= 1.0:
            raise ValueError(f"SACConfig.difference_credit must be in [0, 1], got "
                             f"{self.difference_credit}")
        if self.difference_credit and self.n_step != 1:
            raise ValueError("SACConfig.difference_credit > 0 needs n_step=1 (the per-locator "
                             "credit enters the one-step target)")
        if self.critic_warmup_gradient_steps < 0:
            raise ValueError("SACConfig.critic_warmup_gradient_steps must be >= 0")
        if self.batch_size < 1 or self.n_step < 1 or self.num_envs < 1:
            raise ValueError("SACConfig.batch_size, n_step and num_envs must be >= 1")
        if self.collect_env_steps % self.num_envs:
            raise ValueError(
                f"SACConfig.collect_env_steps={self.collect_env_steps} must be a multiple of "
                f"num_envs={self.num_envs} (Tianshou steps all rows together)"
            )
        self.actor_hidden = tuple(self.actor_hidden)
        self.critic_hidden = tuple(self.critic_hidden)


# --- networks ------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """``N`` independent linear layers applied to ``[B, N, in]`` in one batched matmul."""

    def __init__(self, num_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_members, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, in] x [N, in, out] -> [B, N, out]
        return torch.einsum("bni,nio->bno", x, self.weight) + self.bias


def _mlp(layers: list[nn.Module]) -> nn.Sequential:
    seq: list[nn.Module] = []
    for i, layer in enumerate(layers):
        seq.append(layer)
        if i < len(layers) - 1:
            seq.append(nn.ReLU())
    return nn.Sequential(*seq)


class LocatorActors(nn.Module):
    """Decentralized actors: ``[B, N, obs_dim] -> logits [B, N, 4]``, locator i sees only obs i.

    ``shared=False``: one MLP per locator (batched as ensemble layers). ``shared=True``: one MLP
    for all, its input extended by a one-hot locator id.
    """

    def __init__(
        self, obs_dim: int, num_locators: int, hidden: tuple[int, ...], shared: bool = False
    ) -> None:
        super().__init__()
        self.obs_dim, self.num_locators, self.shared = obs_dim, num_locators, shared
        sizes = [obs_dim + (num_locators if shared else 0), *hidden, NUM_ACTIONS]
        if shared:
            self.net = _mlp([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        else:
            self.net = _mlp(
                [EnsembleLinear(num_locators, a, b) for a, b in zip(sizes[:-1], sizes[1:],
                                                                   strict=True)]
            )

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if observation.shape[1:] != (self.num_locators, self.obs_dim):
            raise ValueError(
                f"observation must have shape [B, {self.num_locators}, {self.obs_dim}], "
                f"got {tuple(observation.shape)}"
            )
        x = observation
        if self.shared:
            ids = torch.eye(self.num_locators, device=x.device, dtype=x.dtype)
            x = torch.cat([x, ids.expand(x.shape[0], -1, -1)], dim=-1)
        return self.net(x)


class CentralCritic(nn.Module):
    """Centralized critic: Q_i(s, a_i | a_-i) for every locator i, ``[B, N, 4]``.

    Input of locator i: global state (all observations flattened + alive flags), one-hot id i,
    one-hot actions of the other locators with stopped ones and i itself zeroed.
    """

    def __init__(self, obs_dim: int, num_locators: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.obs_dim, self.num_locators = obs_dim, num_locators
        in_dim = num_locators * obs_dim + num_locators + num_locators + num_locators * NUM_ACTIONS
        sizes = [in_dim, *hidden, NUM_ACTIONS]
        self.net = _mlp([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.register_buffer("others", 1.0 - torch.eye(num_locators), persistent=False)
        self.register_buffer("ids", torch.eye(num_locators), persistent=False)

    def forward(
        self, observation: torch.Tensor, alive: torch.Tensor, actions: torch.Tensor
    ) -> torch.Tensor:
        b, n = observation.shape[:2]
        alive = alive.to(observation.dtype)
        state = torch.cat([observation.reshape(b, -1), alive], dim=-1)
        onehot = F.one_hot(actions.long(), NUM_ACTIONS).to(observation.dtype) * alive[..., None]
        # others[i, j] = 1 for j != i: row i sees every other locator's (masked) action
        other_actions = (onehot[:, None, :, :] * self.others[None, :, :, None]).reshape(b, n, -1)
        local = torch.cat([self.ids.expand(b, -1, -1), other_actions], dim=-1)
        # first layer on [state, local] split in two: the state part, most of the input, is the
        # same for every locator, so it is multiplied once per sample instead of N times
        first, s = self.net[0], state.shape[-1]
        x = (F.linear(state, first.weight[:, :s], first.bias)[:, None, :]
             + F.linear(local, first.weight[:, s:]))
        return self.net[1:](x)


# --- policy and algorithm ------------------------------------------------------------------


def _obs_tensors(obs: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(observation float [B,N,D], alive bool [B,N]) from a Batch or dict observation."""
    observation = obs["observation"] if isinstance(obs, dict) else obs.observation
    alive = obs["alive"] if isinstance(obs, dict) else obs.alive
    observation = torch.as_tensor(observation, dtype=torch.float32, device=device)
    alive = torch.as_tensor(alive, device=device).bool()
    if not torch.isfinite(observation).all():
        raise ValueError("observation contains NaN or inf")
    return observation, alive


class CTDEPolicy(Policy):
    """The joint policy: every locator samples from its own actor (argmax outside training).

    ``forward`` returns ``logits [B, N, 4]`` and ``act [B, N]`` (stopped locators get 0, which
    the env ignores). No ``dist`` is returned: a (B, N) distribution breaks Tianshou's stats.
    """

    def __init__(
        self,
        *,
        actor: LocatorActors,
        action_space: gym.spaces.MultiDiscrete,
        observation_space: gym.Space | None = None,
        deterministic_eval: bool = True,
    ) -> None:
        if not isinstance(action_space, gym.spaces.MultiDiscrete) or np.any(
            action_space.nvec != NUM_ACTIONS
        ):
            raise ValueError(f"action_space must be MultiDiscrete([4]*N), got {action_space}")
        super().__init__(action_space=action_space, observation_space=observation_space)
        self.actor = actor
        self.deterministic_eval = deterministic_eval

    @property
    def device(self) -> torch.device:
        return next(self.actor.parameters()).device

    def forward(self, batch: Batch, state: Any = None, **kwargs: Any) -> Batch:
        observation, alive = _obs_tensors(batch.obs, self.device)
        logits = self.actor(observation)
        if self.deterministic_eval and not self.is_within_training_step:
            act = logits.argmax(dim=-1)
        else:
            act = torch.distributions.Categorical(logits=logits).sample()
        act = torch.where(alive, act, torch.zeros_like(act))
        return Batch(logits=logits, act=act, state=None)


class CTDESAC(DiscreteSAC):
    """Discrete SAC with per-locator actors, centralized twin critics and alive masking."""

    policy: CTDEPolicy
    critic_only_steps_left: int = 0  # gradient steps that still skip the actor and alpha
    difference_credit: float = 0.0  # SACConfig.difference_credit

    def _preprocess_batch(self, batch: Any, buffer: Any, indices: np.ndarray) -> Any:
        batch = super()._preprocess_batch(batch, buffer, indices)
        if self.difference_credit:  # one-step target: mix the locator's credit into the reward
            info = batch.info
            if CREDIT_INFO_KEY not in info:
                raise KeyError(f"difference_credit > 0 needs info[{CREDIT_INFO_KEY!r}] in the "
                               "buffer: build the env with locator_credit=True")
            credit = torch.as_tensor(np.asarray(info[CREDIT_INFO_KEY]), dtype=batch.returns.dtype,
                                     device=batch.returns.device)
            if credit.shape != batch.returns.shape or not torch.isfinite(credit).all():
                raise ValueError(f"info[{CREDIT_INFO_KEY!r}] must hold one finite value per "
                                 f"locator, shape {tuple(batch.returns.shape)} for this batch; got "
                                 f"shape {tuple(credit.shape)}")
            rew = torch.as_tensor(np.asarray(batch.rew), dtype=batch.returns.dtype,
                                  device=batch.returns.device)
            batch.returns = batch.returns + self.difference_credit * (credit - rew[:, None])
        return batch

    def _target_q(self, buffer: Any, indices: np.ndarray) -> torch.Tensor:
        # The stock version builds a per-row info list we do not need; same semantics.
        obs_next_batch = Batch(obs=buffer[indices].obs_next)
        return self._target_q_compute_value(obs_next_batch, self.policy(obs_next_batch))

    def _target_q_compute_value(self, obs_batch: Batch, act_batch: Batch) -> torch.Tensor:
        """Per-locator soft value of s' ``[I, N]``; 0 for locators stopped in s'."""
        observation, alive = _obs_tensors(obs_batch.obs, self.policy.device)
        logits = act_batch.logits
        logp = F.log_softmax(logits, dim=-1)
        others = torch.distributions.Categorical(logits=logits).sample()
        q = torch.min(
            self.critic_old(observation, alive, others),
            self.critic2_old(observation, alive, others),
        )
        value = (logp.exp() * (q - self.alpha.value * logp)).sum(dim=-1)
        return value * alive.to(value.dtype)

    def _update_with_batch(self, batch: Batch) -> DiscreteSACTrainingStats:  # type: ignore[override]
        device = self.policy.device
        observation, alive = _obs_tensors(batch.obs, device)
        act = torch.as_tensor(batch.act, device=device).long()
        target = torch.as_tensor(batch.returns, dtype=torch.float32, device=device)
        weight = torch.as_tensor(batch.pop("weight", 1.0), dtype=torch.float32, device=device)
        weight = weight.reshape(-1, 1).expand_as(target)[alive]
        target = target[alive]
        count = int(alive.sum())
        if count == 0:  # every sampled transition comes from finished locators: nothing to learn
            return DiscreteSACTrainingStats(
                actor_loss=0.0, critic1_loss=0.0, critic2_loss=0.0, alpha=self.alpha.value,
                alpha_loss=None,
            )
        taken = act.unsqueeze(-1)

        q1 = self.critic(observation, alive, act).gather(-1, taken).squeeze(-1)[alive]
        td1 = q1 - target
        critic1_loss = (td1.pow(2) * weight).mean()
        self.critic_optim.step(critic1_loss)

        q2 = self.critic2(observation, alive, act).gather(-1, taken).squeeze(-1)[alive]
        td2 = q2 - target
        critic2_loss = (td2.pow(2) * weight).mean()
        self.critic2_optim.step(critic2_loss)

        # prioritized buffers: one priority per transition, mean |td| of its alive locators
        td_rows = torch.zeros(alive.shape, device=device)
        td_rows[alive] = ((td1 + td2) / 2.0).abs().detach()
        batch.weight = td_rows.sum(-1) / alive.sum(-1).clamp(min=1)

        if self.critic_only_steps_left > 0:  # critic warm-up: the actor and alpha wait
            self.critic_only_steps_left -= 1
            self._update_lagged_network_weights()
            return DiscreteSACTrainingStats(
                actor_loss=0.0, critic1_loss=critic1_loss.item(),
                critic2_loss=critic2_loss.item(), alpha=self.alpha.value, alpha_loss=None,
            )

        logits = self.policy.actor(observation)[alive]  # [count, 4]: stopped rows dropped
        logp = F.log_softmax(logits, dim=-1)
        probs = logp.exp()
        with torch.no_grad():
            q = torch.min(
                self.critic(observation, alive, act), self.critic2(observation, alive, act)
            )[alive]
        actor_loss = (probs * (self.alpha.value * logp - q)).sum(-1).mean()
        self.policy_optim.step(actor_loss)
        entropy = -(probs * logp).sum(-1)
        alpha_loss = self.alpha.update(entropy.detach())

        self._update_lagged_network_weights()
        return DiscreteSACTrainingStats(
            actor_loss=actor_loss.item(),
            critic1_loss=critic1_loss.item(),
            critic2_loss=critic2_loss.item(),
            alpha=self.alpha.value,
            alpha_loss=alpha_loss,
        )


def build_ctde_sac(
    obs_dim: int,
    num_locators: int,
    config: SACConfig | None = None,
    observation_space: gym.Space | None = None,
) -> CTDESAC:
    """Build actors, twin critics (separately initialized), alpha and the algorithm."""
    config = config or SACConfig()
    device = torch.device(config.device)
    actor = LocatorActors(obs_dim, num_locators, config.actor_hidden, config.shared_actor)
    policy = CTDEPolicy(
        actor=actor.to(device),
        action_space=gym.spaces.MultiDiscrete([NUM_ACTIONS] * num_locators),
        observation_space=observation_space,
    )
    # Two constructions = two independent initializations (critic2=None would deep-copy).
    critic1 = CentralCritic(obs_dim, num_locators, config.critic_hidden).to(device)
    critic2 = CentralCritic(obs_dim, num_locators, config.critic_hidden).to(device)
    if config.auto_alpha:
        alpha: float | AutoAlpha = AutoAlpha(
            target_entropy=config.target_entropy_ratio * math.log(NUM_ACTIONS),
            log_alpha=math.log(config.init_alpha),
            optim=AdamOptimizerFactory(lr=config.alpha_lr),
        ).to(device)
    else:
        alpha = float(config.init_alpha)
    algorithm = CTDESAC(
        policy=policy,
        policy_optim=AdamOptimizerFactory(lr=config.actor_lr),
        critic=critic1,
        critic_optim=AdamOptimizerFactory(lr=config.critic_lr),
        critic2=critic2,
        critic2_optim=AdamOptimizerFactory(lr=config.critic_lr),
        tau=config.tau,
        gamma=config.gamma,
        alpha=alpha,
        n_step_return_horizon=config.n_step,
    )
    algorithm.difference_credit = config.difference_credit
    return algorithm


def clone_actor(algorithm: CTDESAC, observation: torch.Tensor, alive: torch.Tensor,
                actions: torch.Tensor, *, gradient_steps: int = 1000, batch_size: int = 256,
                lr: float = 1e-3, label_smoothing: float = 0.1, seed: int = 0) -> float:
    """Behaviour cloning: fit the actors to ``actions [M, N]`` taken in ``observation
    [M, N, D]`` (cross-entropy over alive locators only), e.g. to turn a fixed schedule into a
    policy of the actors' class (the trainer's Stage II candidate; Stage III continues SAC from
    it when it is kept). Label smoothing keeps the actors stochastic enough for SAC's entropy
    term to explore from. Returns the fraction of alive locators whose argmax matches, after
    fitting.
    """
    require_int(gradient_steps, "gradient_steps", minimum=0)
    require_int(batch_size, "batch_size", minimum=1)
    if observation.ndim != 3 or alive.shape != observation.shape[:2] \
            or actions.shape != alive.shape:
        raise ValueError(f"clone_actor: observation [M, N, D], alive and actions [M, N]; got "
                         f"{tuple(observation.shape)}, {tuple(alive.shape)}, "
                         f"{tuple(actions.shape)}")
    if not bool(((actions >= 0) & (actions < NUM_ACTIONS)).all()):
        raise ValueError(f"clone_actor: actions must be in 0..{NUM_ACTIONS - 1}")
    actor = algorithm.policy.actor
    device = algorithm.policy.device
    rows = torch.nonzero(alive.any(dim=1)).squeeze(1)  # transitions with someone to act
    if len(rows) == 0:
        raise ValueError("clone_actor: no transition has an alive locator")
    observation, alive, actions = (t[rows].to(device) for t in (observation, alive.bool(),
                                                                actions.long()))
    optimizer = torch.optim.Adam(actor.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(gradient_steps):
        pick = torch.randint(len(rows), (batch_size,), generator=gen).to(device)
        logits = actor(observation[pick])[alive[pick]]
        loss = F.cross_entropy(logits, actions[pick][alive[pick]],
                               label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hits = (actor(observation).argmax(-1) == actions)[alive]
    return float(hits.float().mean())


@torch.no_grad()
def policy_act(algorithm: CTDESAC | CTDEPolicy, obs: Any) -> np.ndarray:
    """Deterministic joint action (argmax per locator, 0 for stopped ones) ``[B, N]`` int64.

    ``obs`` is the env's Dict observation batch (``{"observation": [B,N,D], "alive": [B,N]}``)
    as a dict or Batch, numpy or torch.
    """
    policy = algorithm.policy if isinstance(algorithm, CTDESAC) else algorithm
    observation, alive = _obs_tensors(obs, policy.device)
    act = policy.actor(observation).argmax(dim=-1)
    return torch.where(alive, act, torch.zeros_like(act)).cpu().numpy().astype(np.int64)


# --- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(algorithm: CTDESAC, path: str | Path, **extra: Any) -> Path:
    """Save all networks (incl. targets), their optimizers and alpha (+ its optimizer).

    Written to ``<path>.partial`` and renamed, so a crash never leaves a half file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "vimo-ctde-sac",
        "version": 1,
        "algorithm": algorithm.state_dict(),
        "lagged": [net.state_dict() for net in (algorithm.critic_old, algorithm.critic2_old)],
        "alpha_optim": (
            algorithm.alpha._optim.state_dict() if isinstance(algorithm.alpha, AutoAlpha) else None
        ),
        "extra": extra,
    }
    torch_save_atomic(state, path)
    return path


def load_checkpoint(algorithm: CTDESAC, path: str | Path) -> dict[str, Any]:
    """Load a ``save_checkpoint`` file into ``algorithm`` (built with the same shapes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    state = torch.load(path, map_location=algorithm.policy.device, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != "vimo-ctde-sac":
        raise ValueError(f"{path}: field 'format' is not 'vimo-ctde-sac'")
    try:
        algorithm.load_state_dict(state["algorithm"])
        for net, sd in zip((algorithm.critic_old, algorithm.critic2_old), state["lagged"],
                           strict=True):
            net.load_state_dict(sd)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{path}: field 'algorithm' does not match this network: {err}") from err
    if isinstance(algorithm.alpha, AutoAlpha) and state["alpha_optim"] is not None:
        algorithm.alpha._optim.load_state_dict(state["alpha_optim"])
    return state.get("extra", {})


# --- training ------------------------------------------------------------------------------


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
    torch.set_rng_state(states["torch"])


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
    ``resume=True`` reloads both (and the RNG states) and lets
    the trainer continue from the logged epoch/step counters. ``algorithm`` continues training
    an existing learner (e.g. Stage III); otherwise one is built for the env's shapes.

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
    from tianshou.utils import TensorboardLogger
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
    start_env_step = start_update_step = 0
    if resumed:
        extra = load_checkpoint(algorithm, checkpoint)
        start_env_step = int(extra.get("env_step", 0))
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
    grads_per_update = round(config.updates_per_env_step * config.collect_env_steps)
    algorithm.critic_only_steps_left = max(
        0, config.critic_warmup_gradient_steps - start_update_step * grads_per_update)
    collector.reset(reset_buffer=not resumed)
    if config.warmup_env_steps and not resumed:
        collector.collect(n_step=config.warmup_env_steps, random=True)

    logger = None
    save_fn = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        logger = TensorboardLogger(SummaryWriter(str(out / "tb")), save_interval=1)

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
            save_checkpoint(algorithm, checkpoint, epoch=epoch, env_step=env_step,
                            gradient_step=gradient_step, config=asdict(config),
                            best_score=best_score, rng=rng_states(), buffer=buffer_name)
            for old in out.glob("buffer-*.h5"):
                if old.name != buffer_name:
                    old.unlink()
            return str(checkpoint)

    epochs, per_epoch = epoch_plan(env_steps, config.collect_env_steps, config.epoch_env_steps)
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
        info = algorithm.run_training(params)
    # train_step counts this run's collector only; update_step continues the logged counter
    # (Tianshou passes it to save_fn as "gradient_step", but each update step runs
    # round(updates_per_env_step * collect_env_steps) gradient steps)
    total_env_steps = start_env_step + int(info.train_step)
    total_update_steps = max(int(info.update_step), start_update_step)
    if save_fn is not None:
        save_fn(-1, total_env_steps, total_update_steps)
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


def update_once(algorithm: CTDESAC, buffer: Any, batch_size: int) -> DiscreteSACTrainingStats:
    """One gradient step on a sampled batch outside a trainer (tests, custom loops)."""
    with policy_within_training_step(algorithm.policy):
        return algorithm.update(buffer=buffer, sample_size=batch_size)
