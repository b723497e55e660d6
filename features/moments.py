"""Per-dimension mean and standard deviation of a large ``[frames, D]`` feature matrix.

Used wherever train-split statistics normalize inputs (the recognizer's input normalization,
the peers' :class:`agents.peers.harness.Standardize`). Accumulates in float64, a chunk at a
time: converting a whole split to float64 first costs its size twice over in memory and, on
PhotoUnits' 1280-d focus features, about 20 s per call.
"""

from __future__ import annotations

import torch


def column_mean_std(flat: torch.Tensor, *, ddof: int = 0, chunk: int = 16384
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` over the rows of ``flat`` ``[N, D]``, float32 ``[D]`` each, on the CPU.

    ``ddof`` is the delta degrees of freedom of the variance (0: population, 1: sample, as
    ``torch.std``). Two passes (the mean, then squared deviations), so a large mean does not
    cancel the variance away.
    """
    if flat.ndim != 2 or flat.shape[0] <= ddof:
        raise ValueError(f"column_mean_std needs a [N > {ddof}, D] matrix, got "
                         f"{tuple(flat.shape)}")
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    for lo in range(0, flat.shape[0], chunk):
        total += flat[lo: lo + chunk].cpu().sum(0, dtype=torch.float64)
    mean = total / flat.shape[0]
    squares = torch.zeros_like(total)
    for lo in range(0, flat.shape[0], chunk):
        squares += (flat[lo: lo + chunk].to("cpu", torch.float64) - mean).square().sum(0)
    std = (squares / (flat.shape[0] - ddof)).sqrt()
    return mean.float(), std.float()
