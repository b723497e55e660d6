"""The one cost rule of the package: every count is made in FLOPs, reported in the file's unit.

torch's ``FlopCounterMode`` counts FLOPs = 2 x multiply-accumulates (matmuls and convolutions).
A ``vimo-features`` file states the unit of its ``gflops_per_frame`` in ``flops_unit``:
``"MACs"`` (what the field reports as "FLOPs"; the default of our data) or ``"FLOPs"``. Every
cost the package adds to the backbone's - the recognizer's F_T / F_M / classifier, a policy's
inference - is counted in FLOPs with :func:`count_flops` and converted with
:func:`flops_in_unit`, so all terms of ``gflops`` share the file's unit. Any other unit is
refused: treating it as one of the two would silently scale the costs by 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

FLOPS_UNITS = ("MACs", "FLOPs")
_FLOPS_PER_UNIT = {"MACs": 2.0, "FLOPs": 1.0}  # one multiply-accumulate = 2 FLOPs


def check_flops_unit(unit: Any, where: str = "flops_unit") -> str:
    """``unit`` when it is ``"MACs"`` or ``"FLOPs"``; otherwise a ValueError naming ``where``
    (the file or source and its field)."""
    if unit not in _FLOPS_PER_UNIT:
        raise ValueError(f"{where}: field 'flops_unit' must be one of {FLOPS_UNITS}, got "
                         f"{unit!r}")
    return unit


def flops_in_unit(flops: float, unit: str, where: str = "flops_unit") -> float:
    """A FLOP count (torch's convention, 2 per multiply-accumulate) in ``unit``."""
    return float(flops) / _FLOPS_PER_UNIT[check_flops_unit(unit, where)]


def count_flops(fn: Callable[[], Any], devices: list[torch.device] | None = None) -> float:
    """FLOPs of one call of ``fn()``, counted by ``FlopCounterMode`` without gradients; the
    global torch random stream is forked (``devices``: CUDA devices to fork too), so counting
    a sampling policy never shifts the caller's random numbers."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), torch.random.fork_rng(devices=devices or []), \
            FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def recognizer_gflops(recognizer: Any, unit: str, where: str = "flops_unit"
                      ) -> tuple[float, float]:
    """(F_T cost per observed frame, F_M + classifier cost per prediction) of a
    :class:`vimo_env.recognizer.Recognizer`, in G``unit``."""
    cost = recognizer.flops()
    if cost.get("unit", "FLOPs") != "FLOPs":
        raise ValueError(f"Recognizer.flops() must count FLOPs, got unit {cost['unit']!r}")
    return (flops_in_unit(cost["temporal_per_frame"], unit, where) / 1e9,
            flops_in_unit(cost["integration"], unit, where) / 1e9)
