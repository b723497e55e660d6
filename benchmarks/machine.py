"""What a machine can do, printed next to every wall time so figures from different machines
compare: the best GFLOP/s of a dense fp32 matmul and the peak resident memory."""

from __future__ import annotations

import resource
import time

import torch


def dense_matmul_gflops(size: int = 2048, reps: int = 6) -> float:
    """Best-of GFLOP/s of a ``size x size`` fp32 matmul (2 size^3 FLOPs), with the current
    torch thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
