"""Weight tangents regenerated from seeds instead of stored.

AsyncFGD's pipeline applies module k's update K-k ticks after the tangent was drawn, so the
tangent must be re-creatable from integers alone. Every (run seed, step, module, tensor) tuple
gets its own counter-based Philox stream; no global RNG state is read or written, so a draw
does not depend on what was drawn before or on the other tensors of the module.

Philox mapping (numpy ``Philox4x64``; 128-bit key, 256-bit counter of four uint64 words,
word 0 lowest)::

    key     = seed                                  (0 <= seed < 2**128)
    counter = [0, tensor, module, step]             (each index in [0, 2**64))

A draw advances only word 0 (one increment per 256-bit block, carrying into word 1 only after
2**64 blocks = 2**70 bytes), so the streams of two different tuples never overlap. Putting an
index into word 0 instead (e.g. counter words ``[step, module, tensor, 0]``) would be wrong:
step s's draw would run into step s+1's stream.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

MODES = ("gaussian", "rademacher", "orthogonal")

_U64 = 1 << 64
# Columns per block when orthogonalising: bounds the float64 scratch to m * _BLOCK * 8 bytes.
_BLOCK = 1 << 16


def noise_key(seed: int, step: int, module: int, tensor: int) -> tuple[int, tuple[int, int, int, int]]:
    """Return the Philox ``(key, counter words)`` of one tensor's stream (see module docstring)."""
    if not 0 <= seed < 1 << 128:
        raise ValueError(f"seed must be in [0, 2**128), got {seed}")
    for name, v in (("step", step), ("module", module), ("tensor", tensor)):
        if not 0 <= v < _U64:
            raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return seed, (0, tensor, module, step)


def tangent_rng(seed: int, step: int, module: int, tensor: int) -> np.random.Generator:
    """A fresh generator positioned at the start of the tensor's stream."""
    key, counter = noise_key(seed, step, module, tensor)
    return np.random.Generator(np.random.Philox(key=key, counter=np.array(counter, dtype=np.uint64)))


def fill_tangents(
    out: list[np.ndarray], seed: int, step: int, module: int, mode: str = "gaussian", scale: float = 1.0
) -> None:
    """Fill a module's tangent buffers (each ``(m, *weight_shape)`` float32) in place, times ``scale``.

    ``gaussian``: iid N(0, 1). ``rademacher``: iid +-1. ``orthogonal``: the m directions are
    orthonormalised jointly over all tensors (the module as one vector of dim D), then scaled to
    norm sqrt(D) so that E[u u^T] ~ I as for the gaussian. ``scale`` is the module's alpha;
    alpha = 0 zeroes the buffers without drawing.
    """
    if mode not in MODES:
        raise ValueError(f"unknown tangent mode {mode!r}; expected one of {MODES}")
    if not out:
        return  # a module without weights has nothing to perturb
    m = _check_buffers(out)
    if scale == 0.0:
        for buf in out:
            buf.fill(0.0)
        return
    if mode == "gaussian":
        for i, buf in enumerate(out):
            tangent_rng(seed, step, module, i).standard_normal(dtype=np.float32, out=buf)
            if scale != 1.0:
                buf *= np.float32(scale)
    elif mode == "rademacher":
        for i, buf in enumerate(out):
            # u in {k / 2**24}: u >= 0.5 holds for exactly half the values; copysign maps
            # u - 0.5 (with +0.0 at u = 0.5) to +-scale without a temporary.
            tangent_rng(seed, step, module, i).random(dtype=np.float32, out=buf)
            np.subtract(buf, np.float32(0.5), out=buf)
            np.copysign(np.float32(scale), buf, out=buf)
    else:
        dim = sum(buf[0].size for buf in out)
        if m > dim:
            raise ValueError(f"orthogonal tangents need m <= D, got m={m} directions in D={dim} dims")
        for i, buf in enumerate(out):
            tangent_rng(seed, step, module, i).standard_normal(dtype=np.float32, out=buf)
        _orthonormalise_rows(out, m)
        _orthonormalise_rows(out, m, factor=math.sqrt(dim) * scale)


def _check_buffers(out: list[np.ndarray]) -> int:
    """Validate the buffers and return the common number of tangents m."""
    m = out[0].shape[0] if out[0].ndim else 0
    for buf in out:
        if not isinstance(buf, np.ndarray) or buf.dtype != np.float32 or not buf.flags.c_contiguous:
            raise ValueError("tangent buffers must be C-contiguous float32 numpy arrays")
        if buf.ndim == 0 or buf.shape[0] != m or m == 0:
            raise ValueError(f"tangent buffers must share a leading dimension m >= 1, got {[b.shape for b in out]}")
    return m


def _blocks(out: list[np.ndarray], m: int) -> Iterator[np.ndarray]:
    """(m, <= _BLOCK) column views covering the concatenation of all buffers, in order."""
    for buf in out:
        rows = buf.reshape(m, -1)
        for start in range(0, rows.shape[1], _BLOCK):
            yield rows[:, start : start + _BLOCK]


def _orthonormalise_rows(out: list[np.ndarray], m: int, factor: float = 1.0) -> None:
    """One Cholesky-QR pass on the rows of A (m x D, spread over the buffers): A <- factor * L^-1 A.

    L L^T = A A^T, so L^-1 A has orthonormal rows (Gram-Schmidt in row order). The Gram matrix and
    the transform run in float64 block by block; two passes (CholeskyQR2) make the float32 result
    orthogonal to rounding level, without ever materialising the D-long vectors.
    """
    gram = np.zeros((m, m))
    for blk in _blocks(out, m):
        b64 = blk.astype(np.float64)
        gram += b64 @ b64.T
    transform = np.linalg.inv(np.linalg.cholesky(gram)) * factor
    for blk in _blocks(out, m):
        blk[...] = transform @ blk.astype(np.float64)
