"""The CTDE locator networks: decentralized actors and a centralized critic (ViMo App. B).

* ``LocatorActors``: one MLP per locator (batched as ensemble layers, ``EnsembleLinear``), each
  seeing only its own observation; or one parameter-shared MLP fed the locator id as a one-hot;
* ``CentralCritic``: Q_i(s, a_i | a_-i) for every locator from the global state, the locator id
  and the one-hot actions of the other alive locators.

The algorithm that trains them is :mod:`agents.ctde_sac`; its training loop
:mod:`agents.sac_training`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vimo_env.core import NUM_ACTIONS


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
