"""Argument checks shared by every layer (``features`` and everything above it)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch


def require_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int when it is an integer (Python, numpy, or a 0-d numpy/torch
    integer array), at least ``minimum`` when given; anything else raises naming ``name``.

    Refuses what ``int()`` would silently truncate or reinterpret: floats (``2.9`` is not 2,
    and ``3.0`` is refused too, so a computed size is never taken by accident), bools, strings.
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not (
            value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype,
                                                                             np.integer):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
