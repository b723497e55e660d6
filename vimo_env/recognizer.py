"""The recognizer behind the environment (ViMo section 3.1): F_T per locator, F_M, classifier.

State is one tensor ``[B, N, S]`` per batch of videos x locators, so the environment can
hold it on a device and update it with a mask in one call:

    state = recognizer.initial_state(B, device)
    state = recognizer.observe(state, frames[B, N, D], mask[B, N])   # stopped -> unchanged
    probs = recognizer.probs(state)                                   # [B, C]

``F_T`` variants: ``lstm`` (default, hidden 256), ``meanpool``, ``maxpool``, ``sumpool``
(running pools over a learned projection of the observed frames). ``F_M`` variants:
``transformer`` (default: 8 encoder layers, 4 heads, d=256, learned locator-position
embedding), ``meanpool``, ``maxpool``, ``forward`` (2-layer MLP of 512 on the concatenation).
Per-locator ``F_T`` weights by default (the paper's ``F_T^i``); ``shared_temporal=True`` shares
one. All per-locator weights are stacked so that a step is one batched matmul, not a loop.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from features.atomic import torch_save_atomic

TEMPORAL_VARIANTS = ("lstm", "meanpool", "maxpool", "sumpool")
INTEGRATION_VARIANTS = ("transformer", "meanpool", "maxpool", "forward")
CHECKPOINT_FORMAT = "vimo-recognizer"
CHECKPOINT_VERSION = 1


@dataclass
class RecognizerConfig:
    """Architecture of a :class:`Recognizer` (stored as JSON in every checkpoint)."""

    feature_dim: int
    num_classes: int
    num_locators: int = 3
    temporal: str = "lstm"
    integration: str = "transformer"
    hidden_dim: int = 256
    shared_temporal: bool = False
    transformer_layers: int = 8
    transformer_heads: int = 4
    transformer_dim: int = 256
    transformer_ff_dim: int = 1024
    forward_dim: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.temporal not in TEMPORAL_VARIANTS:
            raise ValueError(f"temporal must be one of {TEMPORAL_VARIANTS}, got {self.temporal!r}")
        if self.integration not in INTEGRATION_VARIANTS:
            raise ValueError(
                f"integration must be one of {INTEGRATION_VARIANTS}, got {self.integration!r}"
            )
        for name in ("feature_dim", "num_classes", "num_locators", "hidden_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class _StackedLinear(nn.Module):
    """``U`` independent linear maps applied to ``x[..., u, :]``; U=1 broadcasts (shared)."""

    def __init__(self, units: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(units, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(units, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, N, in]
        if self.weight.shape[0] == 1:
            return x @ self.weight[0] + self.bias[0]
        # [N, B, in] @ [N, in, out] -> [N, B, out]: one batched matmul over locators
        return torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight).transpose(0, 1)


def _encoder_eval(encoder: nn.TransformerEncoder, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode ``encoder(x)`` for few tokens, same weights and result (no dropout).

    With N = 3 tokens the attention itself is tiny; PyTorch's fused path spends much of its
    time copying q/k/v into head-major layout. Here attention is two small einsums over the
    token axes and every projection is one matmul over all ``B * N`` tokens.
    """
    B, L, d = x.shape
    flat = x.reshape(B * L, d)
    for layer in encoder.layers:
        attn = layer.self_attn
        heads = attn.num_heads
        qkv = F.linear(flat, attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, heads, -1)
        q, k, v = qkv.unbind(2)
        scores = torch.einsum("bihe,bjhe->bhij", q, k) * (q.shape[-1] ** -0.5)
        mixed = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v).reshape(B * L, d)
        flat = F.layer_norm(flat + F.linear(mixed, attn.out_proj.weight, attn.out_proj.bias),
                            (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        hidden = F.relu(F.linear(flat, layer.linear1.weight, layer.linear1.bias))
        flat = F.layer_norm(flat + F.linear(hidden, layer.linear2.weight, layer.linear2.bias),
                            (d,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return flat.view(B, L, d)


class Recognizer(nn.Module):
    """F_T (per locator) + F_M + linear classifier, with a batched, maskable step API."""

    def __init__(self, config: RecognizerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        units = 1 if c.shared_temporal else c.num_locators
        H = c.hidden_dim
        if c.temporal == "lstm":
            # gates from [x, h] in one matmul; forget-gate bias 1 for stable early training
            self.cell = _StackedLinear(units, c.feature_dim + H, 4 * H)
            with torch.no_grad():
                self.cell.bias[:, H : 2 * H] += 1.0
            self.state_dim = 2 * H
        else:
            self.project = _StackedLinear(units, c.feature_dim, H)
            self.state_dim = H + 1  # pooled value, frame count
        N = c.num_locators
        if c.integration == "transformer":
            d = c.transformer_dim
            self.to_model = nn.Linear(H, d) if H != d else nn.Identity()
            self.locator_embedding = nn.Parameter(torch.randn(N, d) * 0.02)
            layer = nn.TransformerEncoderLayer(
                d, c.transformer_heads, c.transformer_ff_dim, c.dropout, batch_first=True
            )
            self.integrate = nn.TransformerEncoder(
                layer, c.transformer_layers, enable_nested_tensor=False
            )
            out_dim = d
        elif c.integration == "forward":
            self.integrate = nn.Sequential(
                nn.Linear(N * H, c.forward_dim), nn.ReLU(), nn.Dropout(c.dropout),
                nn.Linear(c.forward_dim, c.forward_dim), nn.ReLU(),
            )
            out_dim = c.forward_dim
        else:
            out_dim = H
        self.classifier = nn.Linear(out_dim, c.num_classes)

    # ------------------------------------------------------------------ step API
    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_dim

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Empty state ``[batch, N, S]`` (nothing observed)."""
        device = device if device is not None else self.classifier.weight.device
        return torch.zeros(batch, self.config.num_locators, self.state_dim, device=device,
                           dtype=self.classifier.weight.dtype)

    def observe(
        self, state: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fold one frame per locator into the state: ``h_i <- F_T^i(x_i, h_i)``.

        Args:
            state: ``[B, N, S]``.
            frames: ``[B, N, D]`` features of the frame each locator observes now.
            mask: ``[B, N]`` bool; where False the locator's state is returned unchanged.
        """
        c = self.config
        H = c.hidden_dim
        if c.temporal == "lstm":
            h, cell = state[..., :H], state[..., H:]
            gates = self.cell(torch.cat([frames, h], dim=-1))
            i, f, g, o = gates.chunk(4, dim=-1)
            cell_new = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(cell_new)
            new = torch.cat([h_new, cell_new], dim=-1)
        else:
            x = self.project(frames)
            pooled, count = state[..., :H], state[..., H:]
            if c.temporal == "maxpool":
                pooled_new = torch.where(count > 0, torch.maximum(pooled, x), x)
            else:  # meanpool and sumpool keep a running sum
                pooled_new = pooled + x
            new = torch.cat([pooled_new, count + 1], dim=-1)
        if mask is None:
            return new
        return torch.where(mask.unsqueeze(-1), new, state)

    def embeddings(self, state: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``h_i`` ``[B, N, H]``."""
        c = self.config
        H = c.hidden_dim
        if c.temporal == "lstm":
            return state[..., :H]
        pooled, count = state[..., :H], state[..., H:]
        if c.temporal == "meanpool":
            return pooled / count.clamp(min=1)
        return pooled  # maxpool: 0 until seen (initial state); sumpool: running sum

    def logits_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """F_M and classifier: ``[B, N, H]`` -> class logits ``[B, C]``."""
        c = self.config
        if c.integration == "transformer":
            tokens = self.to_model(emb) + self.locator_embedding
            if self.training:
                pooled = self.integrate(tokens).mean(dim=1)
            else:
                pooled = _encoder_eval(self.integrate, tokens).mean(dim=1)
        elif c.integration == "forward":
            pooled = self.integrate(emb.flatten(1))
        elif c.integration == "meanpool":
            pooled = emb.mean(dim=1)
        else:
            pooled = emb.amax(dim=1)
        return self.classifier(pooled)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` from all locators' current embeddings."""
        return self.logits_from_embeddings(self.embeddings(state))

    def probs(self, state: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]``."""
        return F.softmax(self.logits(state), dim=-1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits for padded frame sequences (Stage I and frame-selection baselines).

        Args:
            frames: ``[B, N, L, D]`` the frames each locator observes, in temporal order.
            mask: ``[B, N, L]`` bool, True for real (not padding) frames.
        """
        state = self.initial_state(frames.shape[0], frames.device)
        for step in range(frames.shape[2]):
            state = self.observe(state, frames[:, :, step], mask[:, :, step])
        return self.logits(state)

    # ---------------------------------------------------------------- cost
    def flops(self) -> dict[str, float | str]:
        """Per-part cost for one video, counted by ``torch.utils.flop_counter.FlopCounterMode``.

        Returns ``{"temporal_per_frame": F_T cost of folding one frame into one locator,
        "integration": F_M + classifier cost of one prediction from N embeddings,
        "unit": "FLOPs"}`` (FLOPs = 2 x multiply-adds; matmuls and convolutions only).
        Counted in training mode because the fused eval-mode transformer kernel is not counted;
        the global RNG is forked, so the dropout of that pass never shifts a caller's random
        stream (counting costs used to change the training that followed it).
        """
        from torch.utils.flop_counter import FlopCounterMode

        c = self.config
        was_training = self.training
        param = self.classifier.weight
        self.train()
        devices = [param.device] if param.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                state = self.initial_state(1, param.device)
                frames = torch.zeros(1, c.num_locators, c.feature_dim, device=param.device,
                                     dtype=param.dtype)
                with FlopCounterMode(display=False) as counter:
                    state = self.observe(state, frames)
                temporal = counter.get_total_flops() / c.num_locators
                with FlopCounterMode(display=False) as counter:
                    self.logits(state)
                integration = counter.get_total_flops()
        finally:
            self.train(was_training)
        return {"temporal_per_frame": float(temporal), "integration": float(integration),
                "unit": "FLOPs"}

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint (state dict + JSON config) atomically."""
        torch_save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": json.dumps(asdict(self.config)),
                "state_dict": self.state_dict(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Recognizer:
        """Load a checkpoint written by :meth:`save`; clear errors on anything else."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: recognizer checkpoint not found")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds
            raise ValueError(f"{path}: not a readable recognizer checkpoint ({exc})") from exc
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: field 'format': not a {CHECKPOINT_FORMAT} checkpoint")
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{path}: field 'version': expected {CHECKPOINT_VERSION}, got {ckpt.get('version')}"
            )
        raw = json.loads(ckpt["config"])
        known = {f.name for f in fields(RecognizerConfig)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: field 'config': unknown keys {sorted(unknown)}")
        model = cls(RecognizerConfig(**raw))
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: field 'state_dict': does not match its config "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return model
