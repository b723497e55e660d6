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
from features.validation import require_int

TEMPORAL_VARIANTS = ("lstm", "meanpool", "maxpool", "sumpool")
INTEGRATION_VARIANTS = ("transformer", "meanpool", "maxpool", "forward")
CHECKPOINT_FORMAT = "vimo-recognizer"
CHECKPOINT_VERSION = 2  # 2: input normalization, pre-norm transformer, dataset identity


def _standardized(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with one new tensor instead of two (the same numbers): on the CPU a
    large fresh tensor costs page faults, and the second one made this 4x slower."""
    return torch.sub(x, mean).div_(std)


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
    # pre-norm encoder layers (LayerNorm before attention / feed-forward, one after the
    # stack): the post-norm 8-layer stack collapsed to one class at lr 1e-3 (see docs/)
    norm_first: bool = True
    # the LSTM's unit embedding: "mean" of its outputs over the observed frames, or its "last"
    # output (the paper). The last output forgets: on long segments all frames scored below a
    # quarter of them; the mean does not dilute (docs/experiments.md)
    lstm_readout: str = "mean"
    # dropout on the normalized input features, training only (a regularizer for small train
    # splits; 0 = off, the default)
    input_dropout: float = 0.0
    # a linear classifier on the mean of all observed (normalized) frames, added to F_M's
    # logits: the pooled linear probe as a residual path, which a small train split cannot
    # over-fit the way the deep path does (docs/experiments.md)
    pooled_linear: bool = True

    def __post_init__(self) -> None:
        if self.temporal not in TEMPORAL_VARIANTS:
            raise ValueError(f"temporal must be one of {TEMPORAL_VARIANTS}, got {self.temporal!r}")
        if self.lstm_readout not in ("mean", "last"):
            raise ValueError(f"lstm_readout must be 'mean' or 'last', got {self.lstm_readout!r}")
        if self.integration not in INTEGRATION_VARIANTS:
            raise ValueError(
                f"integration must be one of {INTEGRATION_VARIANTS}, got {self.integration!r}"
            )
        for name in ("feature_dim", "num_classes", "num_locators", "hidden_dim"):
            require_int(getattr(self, name), f"RecognizerConfig.{name}", minimum=1)


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

    def norm(t: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(t, (d,), ln.weight, ln.bias, ln.eps)

    def attend(t: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
        qkv = F.linear(t, attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3,
                                                                       attn.num_heads, -1)
        q, k, v = qkv.unbind(2)
        scores = torch.einsum("bihe,bjhe->bhij", q, k) * (q.shape[-1] ** -0.5)
        mixed = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v).reshape(B * L, d)
        return F.linear(mixed, attn.out_proj.weight, attn.out_proj.bias)

    def feed_forward(t: torch.Tensor, layer: nn.TransformerEncoderLayer) -> torch.Tensor:
        return F.linear(F.relu(F.linear(t, layer.linear1.weight, layer.linear1.bias)),
                        layer.linear2.weight, layer.linear2.bias)

    for layer in encoder.layers:
        if layer.norm_first:
            flat = flat + attend(norm(flat, layer.norm1), layer.self_attn)
            flat = flat + feed_forward(norm(flat, layer.norm2), layer)
        else:
            flat = norm(flat + attend(flat, layer.self_attn), layer.norm1)
            flat = norm(flat + feed_forward(flat, layer), layer.norm2)
    if encoder.norm is not None:
        flat = norm(flat, encoder.norm)
    return flat.view(B, L, d)


class Recognizer(nn.Module):
    """F_T (per locator) + F_M + linear classifier, with a batched, maskable step API."""

    def __init__(self, config: RecognizerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # Input normalization x <- (x - mean) / std, from train-split statistics
        # (:meth:`set_input_normalization`); identity until set. Buffers: they travel with the
        # state dict, so every user of a checkpoint (env, live source, evaluation) applies the
        # same statistics the recognizer was trained with.
        self.register_buffer("input_mean", torch.zeros(c.feature_dim))
        self.register_buffer("input_std", torch.ones(c.feature_dim))
        # what the recognizer was trained on (class names, backbone); checked by the env
        self.dataset: dict | None = None
        units = 1 if c.shared_temporal else c.num_locators
        H = c.hidden_dim
        if c.temporal == "lstm":
            # gates from [x, h] in one matmul; forget-gate bias 1 for stable early training
            self.cell = _StackedLinear(units, c.feature_dim + H, 4 * H)
            with torch.no_grad():
                self.cell.bias[:, H : 2 * H] += 1.0
            self.state_dim = 3 * H + 1  # h, cell, running sum of h, frame count
        else:
            self.project = _StackedLinear(units, c.feature_dim, H)
            self.state_dim = H + 1  # pooled value, frame count
        if c.pooled_linear:
            # shared by the locators; its state is the running sum of W x per locator (C
            # numbers), so the team's mean over all observed frames is exact and incremental
            self.pooled = nn.Linear(c.feature_dim, c.num_classes)
            self.state_dim += c.num_classes
        N = c.num_locators
        if c.integration == "transformer":
            d = c.transformer_dim
            self.to_model = nn.Linear(H, d) if H != d else nn.Identity()
            self.locator_embedding = nn.Parameter(torch.randn(N, d) * 0.02)
            layer = nn.TransformerEncoderLayer(
                d, c.transformer_heads, c.transformer_ff_dim, c.dropout, batch_first=True,
                norm_first=c.norm_first,
            )
            self.integrate = nn.TransformerEncoder(
                layer, c.transformer_layers, enable_nested_tensor=False,
                norm=nn.LayerNorm(d) if c.norm_first else None,
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

    # ------------------------------------------------------------------ data
    def set_input_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Normalize every observed frame by ``(x - mean) / std`` (``[D]`` each).

        Standard deviations below 1% of their mean over dimensions are raised to it, so a
        dimension that is (almost) constant on the train split (a dead ReLU unit) cannot blow
        up an unseen frame.
        """
        D = self.config.feature_dim
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != (D,) or std.shape != (D,):
            raise ValueError(f"input normalization: mean and std must be [{D}], got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("input normalization: mean and std must be finite")
        floor = max(float(std.mean()) * 0.01, 1e-12)
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp(min=floor))

    def check_source(self, source: object, what: str = "features") -> None:
        """Refuse a frame source from another dataset than the one this recognizer was trained
        on: feature dimension, then (when both know them) class names and backbone."""
        c = self.config
        dim = getattr(source, "feature_dim", None)
        if dim is not None and int(dim) != c.feature_dim:
            raise ValueError(f"{what}: feature dimension {dim} does not match the recognizer's "
                             f"{c.feature_dim}")
        known = self.dataset or {}
        names = getattr(source, "class_names", None)
        trained = known.get("class_names")
        if trained is not None and names is not None and list(names) != list(trained):
            names, trained = list(names), list(trained)
            if len(names) != len(trained):
                detail = f"{len(names)} classes in the features, {len(trained)} in the recognizer"
            else:
                i = next(i for i, (a, b) in enumerate(zip(names, trained, strict=True)) if a != b)
                detail = (f"class {i} is {names[i]!r} in the features, {trained[i]!r} in the "
                          "recognizer")
            raise ValueError(f"{what}: class names differ from the recognizer's training data "
                             f"({known.get('source', 'unknown file')}): {detail}")
        backbone = getattr(source, "backbone", None)
        if known.get("backbone") and backbone and backbone != known["backbone"]:
            raise ValueError(f"{what}: backbone {backbone!r} differs from the recognizer's "
                             f"training data ({known.get('source', 'unknown file')}): "
                             f"{known['backbone']!r}")

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
        frames = F.dropout(_standardized(frames, self.input_mean, self.input_std), c.input_dropout,
                           self.training)
        own = state[..., :-c.num_classes] if c.pooled_linear else state  # F_T's part
        if c.temporal == "lstm":
            h, cell, total, count = own.split([H, H, H, 1], dim=-1)
            gates = self.cell(torch.cat([frames, h], dim=-1))
            i, f, g, o = gates.chunk(4, dim=-1)
            cell_new = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(cell_new)
            new = torch.cat([h_new, cell_new, total + h_new, count + 1], dim=-1)
        else:
            x = self.project(frames)
            pooled, count = own[..., :H], own[..., H:]
            if c.temporal == "maxpool":
                pooled_new = torch.where(count > 0, torch.maximum(pooled, x), x)
            else:  # meanpool and sumpool keep a running sum
                pooled_new = pooled + x
            new = torch.cat([pooled_new, count + 1], dim=-1)
        if c.pooled_linear:
            linear_sum = state[..., -c.num_classes:] + F.linear(frames, self.pooled.weight)
            new = torch.cat([new, linear_sum], dim=-1)
        if mask is None:
            return new
        return torch.where(mask.unsqueeze(-1), new, state)

    def embeddings(self, state: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``h_i`` ``[B, N, H]``."""
        c = self.config
        H = c.hidden_dim
        if c.temporal == "lstm":
            if c.lstm_readout == "last":
                return state[..., :H]
            return state[..., 2 * H: 3 * H] / state[..., 3 * H: 3 * H + 1].clamp(min=1)
        pooled, count = state[..., :H], state[..., H: H + 1]
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
        """Class logits ``[B, C]`` from all locators' current embeddings (plus the pooled
        linear path: its weights applied to the mean of every frame the team observed)."""
        logits = self.logits_from_embeddings(self.embeddings(state))
        if self.config.pooled_linear:
            logits = logits + self.pooled_logits(state)
        return logits

    def pooled_logits(self, state: torch.Tensor) -> torch.Tensor:
        """The pooled linear path alone, ``[B, C]`` (``pooled_linear=True`` only)."""
        c = self.config
        count = self.frame_count(state).sum(dim=1)  # [B]
        total = state[..., -c.num_classes:].sum(dim=1)  # [B, C]
        return total / count.clamp(min=1).unsqueeze(-1) + self.pooled.bias

    def frame_count(self, state: torch.Tensor) -> torch.Tensor:
        """Frames each locator has observed, ``[B, N]``."""
        H = self.config.hidden_dim
        index = 3 * H if self.config.temporal == "lstm" else H
        return state[..., index]

    def probs(self, state: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]``."""
        return F.softmax(self.logits(state), dim=-1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits for padded frame sequences (Stage I and frame-selection baselines).

        Same as ``logits(fold(frames, mask))``.
        """
        return self.logits(self.fold(frames, mask))

    def fold(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The state ``[B, N, S]`` after observing padded frame sequences.

        Args:
            frames: ``[B, N, L, D]`` the frames each locator observes, in temporal order.
            mask: ``[B, N, L]`` bool, True for real (not padding) frames.

        Same result as folding the frames one by one with :meth:`observe`; for the LSTM the
        input half of every gate is computed for all ``L`` frames in one matmul first (the
        per-step work is then the ``H``-wide recurrence only: 4x less for D=768, H=256).
        """
        c = self.config
        state = self.initial_state(frames.shape[0], frames.device)
        if c.temporal != "lstm":
            for step in range(frames.shape[2]):
                state = self.observe(state, frames[:, :, step], mask[:, :, step])
            return state
        B, N, L, D = frames.shape
        H = c.hidden_dim
        x = F.dropout(_standardized(frames, self.input_mean, self.input_std), c.input_dropout,
                      self.training)
        weight, bias = self.cell.weight, self.cell.bias  # [U, D + H, 4H], [U, 4H]
        if weight.shape[0] == 1:
            gates_x = x @ weight[0, :D] + bias[0]  # [B, N, L, 4H]
            recurrent = weight[0, D:].expand(N, H, 4 * H)
        else:  # [N, B*L, D] @ [N, D, 4H]: one batched matmul over locators
            flat = x.transpose(0, 1).reshape(N, B * L, D)
            gates_x = torch.baddbmm(bias.unsqueeze(1), flat, weight[:, :D])
            gates_x = gates_x.view(N, B, L, 4 * H).transpose(0, 1)
            recurrent = weight[:, D:]
        h, cell, total, count = state[..., :3 * H + 1].split([H, H, H, 1], dim=-1)
        for step in range(L):
            gates = gates_x[:, :, step] + torch.bmm(h.transpose(0, 1), recurrent).transpose(0, 1)
            i, f, g, o = gates.chunk(4, dim=-1)
            cell_new = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(cell_new)
            keep = mask[:, :, step].unsqueeze(-1)
            h, cell = torch.where(keep, h_new, h), torch.where(keep, cell_new, cell)
            total, count = total + keep * h_new, count + keep
        parts = [h, cell, total, count]
        if c.pooled_linear:  # masked sum of W x over each locator's frames: [B, N, C]
            parts.append(torch.einsum("bnl,bnlc->bnc", mask.to(x.dtype),
                                      F.linear(x, self.pooled.weight)))
        return torch.cat(parts, dim=-1)

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
                "dataset": json.dumps(self.dataset),
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
                f"{path}: field 'version': expected {CHECKPOINT_VERSION}, got "
                f"{ckpt.get('version')} (version 1 predates input normalization: retrain)"
            )
        for key in ("config", "dataset", "state_dict"):
            if key not in ckpt:
                raise ValueError(f"{path}: field {key!r}: missing from the checkpoint")
        try:
            raw = json.loads(ckpt["config"])
            dataset = json.loads(ckpt["dataset"])
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: field 'config': not valid JSON ({exc})") from None
        known = {f.name for f in fields(RecognizerConfig)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: field 'config': unknown keys {sorted(unknown)}")
        try:
            model = cls(RecognizerConfig(**raw))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: field 'config': {exc}") from None
        try:
            missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
        except RuntimeError as exc:  # size mismatches
            raise ValueError(f"{path}: field 'state_dict': does not match its config "
                             f"({str(exc).splitlines()[-1].strip()})") from None
        if missing or unexpected:
            raise ValueError(
                f"{path}: field 'state_dict': does not match its config "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        model.dataset = dataset
        return model
