"""Plugging a policy into the evaluation harness: one protocol, adapters for common learners.

The harness (:func:`agents.evaluate.evaluate_policy`) drives the batched locator core and asks a
policy for the joint action of the rows whose episode is still running. Any of these works:

* **a plain callable** ``fn(obs) -> actions``: ``obs`` is the ``VideoLocators-v0`` observation
  batch ``{"observation": float32 [B, N, obs_dim], "alive": int8 [B, N], "action_mask": int8
  [B, N, 4]}`` (numpy; ``action_mask[b, i, a] = 1`` when action ``a`` is legal) and
  ``actions`` is an integer array ``[B, N]`` in ``{0, 1, 2, 3}`` (stop, move 1-3 strides);
  actions of stopped locators are ignored. Each observation row of locator ``i`` is
  ``[h_i, n_i / (m + 1), p_i / (T - 1), t / m]`` (see :mod:`vimo_env.core`);
* **a Tianshou policy** (``tianshou.algorithm.algorithm_base.Policy``, e.g. the CTDE actor of
  :mod:`agents.ctde_sac` or any policy trained on ``VideoLocators-v0``): its ``forward`` is
  called on a ``Batch(obs=...)`` in eval mode and ``.act`` is used;
* **a Stable-Baselines3 model** trained on ``VideoLocators-v0``: ``model.predict(obs,
  deterministic=True)``;
* **the CTDE SAC learner** (``CTDESAC``) or its ``CTDEPolicy``: argmax of each locator's actor,
  run on torch tensors without a numpy round trip;
* an :class:`OpenLoopPolicy`-like object (``agents.baselines``) that uses only the step index.

:func:`as_policy` turns any of these into a :class:`LocatorPolicy` (the harness does it for you).

Inference cost (:meth:`LocatorPolicy.inference_flops`, in FLOPs; the harness converts it to the
feature file's unit with :mod:`vimo_env.costs`): the CTDE actors are charged one actor pass per
alive locator decision; Tianshou policies and SB3 models are joint networks, charged one forward
(counted by ``FlopCounterMode`` on one observation row) per running video per step, whatever
number of locators are still alive. Plain callables and open-loop schedules are charged nothing:
their cost cannot be counted from outside (subclass :class:`LocatorPolicy` and override
``inference_flops`` to declare one).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vimo_env.costs import count_flops

ObsBatch = dict[str, np.ndarray]


@dataclass(frozen=True)
class PolicyFlops:
    """A policy's inference cost in FLOPs (torch's convention, 2 per multiply-accumulate).

    ``per_decision`` is charged for every alive locator at every step (per-locator networks);
    ``per_row_step`` for every running video at every step (one joint network for all N).
    """

    per_decision: float = 0.0
    per_row_step: float = 0.0


class LocatorPolicy(ABC):
    """What the harness calls. Subclass it, or pass any object :func:`as_policy` accepts.

    ``begin(batch_size)`` is called when a batch of episodes starts; ``act(observation, alive,
    step)`` gets torch tensors ``[K, N, obs_dim]`` / bool ``[K, N]`` of the K running rows at
    step ``step`` (0 = right after reset) and returns actions ``[K, N]`` (tensor or array).
    The harness calls :meth:`act_masked`, which also passes each locator's legal actions and
    by default calls ``act``. :meth:`inference_flops` is the policy's own inference cost (none
    unless overridden).
    """

    name: str = "policy"

    def begin(self, batch_size: int) -> None:  # noqa: B027 - optional hook
        """Episodes start (override to reset per-episode state)."""

    def inference_flops(self, observation: torch.Tensor, alive: torch.Tensor) -> PolicyFlops:
        """The policy's inference cost, counted on ``observation [1, N, obs_dim]`` /
        ``alive [1, N]`` (one row, every locator alive). Must not change the policy's state."""
        return PolicyFlops()

    @abstractmethod
    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> Any:
        """Actions ``[K, N]`` in {0, 1, 2, 3} for the K running rows."""

    def act_masked(self, observation: torch.Tensor, alive: torch.Tensor,
                   action_mask: torch.Tensor, step: int) -> Any:
        """``act`` with the legal actions ``bool [K, N, 4]`` (the env's ``action_mask``); the
        default ignores them (the env turns illegal moves into stops)."""
        return self.act(observation, alive, step)


def _numpy_obs(observation: torch.Tensor, alive: torch.Tensor,
               action_mask: torch.Tensor | None = None) -> ObsBatch:
    """The ``VideoLocators-v0`` observation batch; without ``action_mask``, every action of an
    alive locator counts as legal (positions are not known here)."""
    if action_mask is None:
        action_mask = alive.unsqueeze(-1).expand(*alive.shape, 4).clone()
        action_mask[..., 0] = True
    return {"observation": observation.detach().cpu().numpy().astype(np.float32, copy=False),
            "alive": alive.detach().cpu().numpy().astype(np.int8),
            "action_mask": action_mask.detach().cpu().numpy().astype(np.int8)}


class CallablePolicy(LocatorPolicy):
    """A plain callable ``fn(obs: dict of numpy) -> actions [B, N]`` (see the module doc)."""

    def __init__(self, fn: Callable[[ObsBatch], Any], name: str = "callable") -> None:
        if not callable(fn):
            raise TypeError(f"policy must be callable, got {type(fn).__name__}")
        self.fn, self.name = fn, name

    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> Any:
        return self.fn(_numpy_obs(observation, alive))

    def act_masked(self, observation: torch.Tensor, alive: torch.Tensor,
                   action_mask: torch.Tensor, step: int) -> Any:
        return self.fn(_numpy_obs(observation, alive, action_mask))


class TianshouPolicy(LocatorPolicy):
    """A Tianshou 2.x ``Policy`` over the ``VideoLocators-v0`` Dict observation (eval mode)."""

    def __init__(self, policy: Any, name: str = "tianshou") -> None:
        self.policy, self.name = policy, name

    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> Any:
        return self.act_masked(observation, alive, None, step)

    @torch.no_grad()
    def act_masked(self, observation: torch.Tensor, alive: torch.Tensor,
                   action_mask: torch.Tensor | None, step: int) -> Any:
        from tianshou.data import Batch

        was_training = self.policy.training
        self.policy.eval()
        try:
            obs = Batch(_numpy_obs(observation, alive, action_mask))
            out = self.policy(Batch(obs=obs, info=Batch()))
        finally:
            self.policy.train(was_training)
        act = out.act
        return act.cpu() if isinstance(act, torch.Tensor) else np.asarray(act)

    def inference_flops(self, observation: torch.Tensor, alive: torch.Tensor) -> PolicyFlops:
        """One forward of the joint policy on one row, charged per running row and step."""
        return PolicyFlops(per_row_step=count_flops(lambda: self.act(observation, alive, 0)))


class SB3Policy(LocatorPolicy):
    """A Stable-Baselines3 model trained on ``VideoLocators-v0`` (deterministic predictions)."""

    def __init__(self, model: Any, name: str = "sb3", deterministic: bool = True) -> None:
        self.model, self.name, self.deterministic = model, name, deterministic
        self._maskable = "action_masks" in inspect.signature(model.predict).parameters

    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> Any:
        return self.act_masked(observation, alive, None, step)

    def act_masked(self, observation: torch.Tensor, alive: torch.Tensor,
                   action_mask: torch.Tensor | None, step: int) -> Any:
        obs = _numpy_obs(observation, alive, action_mask)
        if self._maskable:  # sb3-contrib MaskablePPO: restrict to the legal actions
            actions, _ = self.model.predict(obs, deterministic=self.deterministic,
                                            action_masks=obs["action_mask"].reshape(
                                                len(obs["alive"]), -1).astype(bool))
        else:
            actions, _ = self.model.predict(obs, deterministic=self.deterministic)
        return np.asarray(actions).reshape(observation.shape[0], observation.shape[1])

    def inference_flops(self, observation: torch.Tensor, alive: torch.Tensor) -> PolicyFlops:
        """One ``predict`` of the joint model on one row, charged per running row and step."""
        return PolicyFlops(per_row_step=count_flops(lambda: self.act(observation, alive, 0)))


class CTDEActorPolicy(LocatorPolicy):
    """The CTDE SAC actors (``CTDESAC``, ``CTDEPolicy`` or ``LocatorActors``) on torch tensors.

    ``deterministic=True`` takes each locator's argmax (evaluation); ``False`` samples (the
    Stage III rollouts). ``generator`` seeds the sampling.
    """

    def __init__(self, learner: Any, name: str = "adaptive", deterministic: bool = True,
                 generator: torch.Generator | None = None) -> None:
        actor = learner
        if hasattr(actor, "policy") and hasattr(actor.policy, "actor"):
            actor = actor.policy  # CTDESAC -> CTDEPolicy
        if hasattr(actor, "actor"):
            actor = actor.actor  # CTDEPolicy -> LocatorActors
        if not isinstance(actor, torch.nn.Module):
            raise TypeError(f"expected a CTDESAC, CTDEPolicy or LocatorActors, got "
                            f"{type(learner).__name__}")
        self.actor, self.name = actor, name
        self.deterministic, self.generator = deterministic, generator

    @torch.no_grad()
    def act(self, observation: torch.Tensor, alive: torch.Tensor, step: int) -> torch.Tensor:
        device = next(self.actor.parameters()).device
        was_training = self.actor.training
        self.actor.eval()
        try:
            logits = self.actor(observation.to(device, torch.float32))
        finally:
            self.actor.train(was_training)
        if self.deterministic:
            act = logits.argmax(-1)
        else:
            probs = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
            act = torch.multinomial(probs.cpu(), 1, generator=self.generator).reshape(
                logits.shape[:-1]).to(device)
        return torch.where(alive.to(device), act, torch.zeros_like(act))

    def inference_flops(self, observation: torch.Tensor, alive: torch.Tensor) -> PolicyFlops:
        """One pass of the actors on one row, split evenly over its N locator decisions (each
        locator's actor is its own network; a stopped locator's is not run)."""
        device = next(self.actor.parameters()).device
        flops = count_flops(lambda: self.actor(observation.to(device, torch.float32)))
        return PolicyFlops(per_decision=flops / observation.shape[1])


def as_policy(obj: Any, name: str | None = None) -> LocatorPolicy:
    """Wrap a plug-in policy (see the module doc) into a :class:`LocatorPolicy`."""
    if isinstance(obj, LocatorPolicy):
        if name is not None:
            obj.name = name
        return obj
    kind = type(obj).__name__
    if kind in ("CTDESAC", "CTDEPolicy", "LocatorActors"):
        return CTDEActorPolicy(obj, name=name or "adaptive")
    try:
        from tianshou.algorithm.algorithm_base import Policy as TianshouBase
    except ImportError:  # pragma: no cover - tianshou is a dependency
        TianshouBase = ()  # noqa: N806
    if TianshouBase and isinstance(obj, TianshouBase):
        return TianshouPolicy(obj, name=name or "tianshou")
    if hasattr(obj, "predict") and hasattr(obj, "policy") and hasattr(obj, "learn"):
        return SB3Policy(obj, name=name or "sb3")
    if callable(obj):
        return CallablePolicy(obj, name=name or getattr(obj, "__name__", "callable"))
    raise TypeError(f"cannot use a {kind} as a locator policy: pass a callable obs -> actions, "
                    "a Tianshou policy, a Stable-Baselines3 model or a CTDE SAC learner")
