"""One contiguous host buffer per module, seen as per-tensor views.

A small module's step is dominated by per-tensor numpy calls (a tangent draw, g = Σ d_j·u_j and
Adam's ~12 element-wise calls, each ~1 µs however small the tensor), and in the AsyncFGD pipeline
those Python phases serialise on the GIL. When a module's weights, tangents and optimizer state
each sit in one buffer, every such step is one call over the whole module (``contiguous_span``),
with the same element-wise arithmetic, so the same results.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def flat_views(shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Zeroed float32 arrays of ``shapes``, consecutive views of one buffer (in order)."""
    sizes = [math.prod(s) for s in shapes]
    flat = np.zeros(sum(sizes), np.float32)
    views, start = [], 0
    for shape, n in zip(shapes, sizes, strict=False):
        views.append(flat[start:start + n].reshape(shape))
        start += n
    return views


def contiguous_span(arrays: Sequence[Any]) -> np.ndarray | None:
    """The 1-D view covering ``arrays`` when they are consecutive C-contiguous pieces of one numpy
    buffer, in order; None otherwise (separate arrays, gaps, torch tensors)."""
    if not arrays or not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays):
        return None
    base = arrays[0].base if arrays[0].base is not None else arrays[0]
    if not (isinstance(base, np.ndarray) and base.ndim == 1 and base.dtype == arrays[0].dtype
            and base.flags.c_contiguous):
        return None
    item = base.itemsize
    start = (arrays[0].ctypes.data - base.ctypes.data) // item
    pos = arrays[0].ctypes.data
    for a in arrays:
        own = a.base if a.base is not None else a
        if own is not base or a.dtype != base.dtype or a.ctypes.data != pos:
            return None
        pos += a.nbytes
    return base[start:start + (pos - arrays[0].ctypes.data) // item]
