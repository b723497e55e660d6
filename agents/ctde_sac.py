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

Paper values (App. A, App. E) and our reading of them are in ``SACConfig``. As in Tianshou 2,
the algorithm is apart from its networks (:mod:`agents.ctde_nets`) and its training loop
(:mod:`agents.sac_training`: ``train_sac``, seeding, resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from tianshou.algorithm import DiscreteSAC
from tianshou.algorithm.algorithm_base import Policy
from tianshou.algorithm.modelfree.discrete_sac import DiscreteSACTrainingStats
from tianshou.algorithm.modelfree.sac import AutoAlpha
from tianshou.algorithm.optim import AdamOptimizerFactory
from tianshou.data import Batch
from tianshou.utils.torch_utils import policy_within_training_step

from agents.ctde_nets import NUM_ACTIONS, CentralCritic, LocatorActors
from features.atomic import torch_save_atomic
from features.validation import require_int

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


# --- policy and algorithm ------------------------------------------------------------------


def _obs_tensors(obs: Any, device: torch.device, check_finite: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(observation float [B,N,D], alive bool [B,N]) from a Batch or dict observation.
    ``check_finite=False`` in the gradient step, for replay-buffer samples: the env checks its
    features at load, and each sample's next observations are checked anyway when the target's
    policy call reads them (the check cost ~3% of Stage II's gradient steps)."""
    observation = obs["observation"] if isinstance(obs, dict) else obs.observation
    alive = obs["alive"] if isinstance(obs, dict) else obs.alive
    observation = torch.as_tensor(observation, dtype=torch.float32, device=device)
    alive = torch.as_tensor(alive, device=device).bool()
    if check_finite and not torch.isfinite(observation).all():
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
        observation, alive = _obs_tensors(obs_batch.obs, self.policy.device, check_finite=False)
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
        observation, alive = _obs_tensors(batch.obs, device, check_finite=False)
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


def update_once(algorithm: CTDESAC, buffer: Any, batch_size: int) -> DiscreteSACTrainingStats:
    """One gradient step on a sampled batch outside a trainer (tests, custom loops)."""
    with policy_within_training_step(algorithm.policy):
        return algorithm.update(buffer=buffer, sample_size=batch_size)
