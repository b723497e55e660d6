"""Device selection shared by every layer."""

from __future__ import annotations

import torch

#: "auto" puts a batched env on CUDA from this many rows: below it, a step's kernel launches
#: and host transfers cost more than the work (a batch-1 PettingZoo or Gymnasium env is
#: faster on the CPU).
AUTO_CUDA_MIN_BATCH = 64


def resolve_device(device: str | torch.device = "auto",
                   batch_size: int | None = None) -> torch.device:
    """``"auto"`` -> CUDA when available (and, when ``batch_size`` is given, at least
    :data:`AUTO_CUDA_MIN_BATCH` rows), else CPU; anything else as given (validated)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        small = batch_size is not None and batch_size < AUTO_CUDA_MIN_BATCH
        return torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev
