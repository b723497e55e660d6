"""Per-dimension mean and standard deviation of a large ``[frames, D]`` feature matrix.

Used wherever train-split statistics normalize inputs (the recognizer's input normalization,
the peers' :class:`agents.peers.harness.Standardize`). Accumulates in float64, a chunk at a
time: converting a whole split to float64 first cost its size twice over in memory and, on
PhotoUnits' 1280-d focus features, about 20 s per call.
"""

from __future__ import annotations

import torch


def column_mean_std(flat: torch.Tensor, *, ddof: int = 0, chunk: int = 16384
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` over the rows of ``flat`` ``[N, D]``, float32 ``[D]`` each, on the CPU.

    ``ddof`` is the delta degrees of freedom of the variance (0: population, 1: sample, as
    ``torch.std``). One pass over deviations from the first chunk's mean, summed in float64:
    shifting by a value near the mean keeps a large mean from cancelling the variance away.
    """
    if flat.ndim != 2 or flat.shape[0] <= ddof:
        raise ValueError(f"column_mean_std needs a [N > {ddof}, D] matrix, got "
                         f"{tuple(flat.shape)}")
    shift = flat[:chunk].cpu().mean(0)
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for lo in range(0, flat.shape[0], chunk):
        deviation = flat[lo: lo + chunk].cpu().float() - shift
        total += deviation.sum(0, dtype=torch.float64)
        squares += deviation.square_().sum(0, dtype=torch.float64)
    n = flat.shape[0]
    mean = shift.double() + total / n
    variance = ((squares - total * total / n) / (n - ddof)).clamp_min(0)
    return mean.float(), variance.sqrt().float()
