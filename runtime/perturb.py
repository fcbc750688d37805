"""Weight tangents regenerated from seeds instead of stored.

AsyncFGD's pipeline applies module k's update K-k ticks after the tangent was drawn, so the
tangent must be re-creatable from integers alone. Every (run seed, step, module) tuple gets its
own counter-based Philox stream; no global RNG state is read or written, so a draw does not
depend on what was drawn before.

Philox mapping (numpy ``Philox4x64``; 128-bit key, 256-bit counter of four uint64 words,
word 0 lowest)::

    key     = seed                                  (0 <= seed < 2**128)
    counter = [0, 0, module, step]                  (each index in [0, 2**64))

A draw advances only word 0 (one increment per 256-bit block, carrying into word 1 only after
2**64 blocks = 2**70 bytes), so the streams of two different tuples never overlap. Putting an
index into word 0 instead (e.g. counter words ``[step, module, 0, 0]``) would be wrong: step s's
draw would run into step s+1's stream.

The stream fills the module's tangent buffers as ONE vector: their values concatenated in order
(each buffer C-order, (m, *weight shape)). One draw per module instead of one per tensor: the
per-call cost (re-keying, ~12 numpy calls) is paid once, and when the buffers are views of one
buffer (``buffers.flat_views``, the ONNX Runtime backend) the values land in place; separate
buffers get the same values through a temporary.

Gaussian tangents use the Box-Muller transform, vectorised over chunks of the vector, instead of
numpy's scalar ziggurat (2.3x faster on a small CNN's tangents at m = 8, 2.8x on ResNet-sized
tensors; docs/performance.md). A vector of n values reads p = ceil(n/2) 64-bit words of its
stream as 2p 32-bit words w_0..w_{2p-1}, takes u_j = ((w_j >> 8) + 0.5) / 2**24 (24-bit
uniforms, never 0 or 1), and sets, for j < p::

    r_j = sqrt(-2 ln u_j),  theta_j = 2 pi u_{p+j},
    value[j] = r_j cos theta_j,  value[p+j] = r_j sin theta_j   (the last one dropped if n is odd)

The float32 ``log``/``sin``/``cos`` come from numpy's SIMD loops, so the same tuple gives the
same tangents on one machine (all that resuming and the reference comparisons need) but may
differ in the last bits between CPU families (e.g. x86 AVX-512 and the Orin's ARM cores).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np

from .buffers import contiguous_span

MODES = ("gaussian", "rademacher", "orthogonal")

_U64 = 1 << 64
# Columns per block when orthogonalising: bounds the float64 scratch to m * _BLOCK * 8 bytes.
_BLOCK = 1 << 16


def noise_key(seed: int, step: int, module: int) -> tuple[int, tuple[int, int, int, int]]:
    """Return the Philox ``(key, counter words)`` of one module's stream (see module docstring)."""
    if not 0 <= seed < 1 << 128:
        raise ValueError(f"seed must be in [0, 2**128), got {seed}")
    for name, v in (("step", step), ("module", module)):
        if not 0 <= v < _U64:
            raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return seed, (0, 0, module, step)


_local = threading.local()  # one Philox per thread: modules fill their tangents concurrently


def module_stream(seed: int, step: int, module: int, domain: int = 0) -> np.random.Philox:
    """This thread's Philox bit generator, positioned at the start of the module's stream (with
    ``domain`` or-ed into counter word 2: another stream of the same module and step).

    Re-keying one generator costs ~1 us where constructing a new one costs ~8 us. The generator is
    shared by later calls on the same thread: use it before the next call.
    """
    key, (w0, w1, w2, w3) = noise_key(seed, step, module)
    counter = (w0, w1, domain | w2, w3)
    bg = getattr(_local, "philox", None)
    if bg is None:
        bg = _local.philox = np.random.Philox()
    bg.state = {"bit_generator": "Philox",
                "state": {"counter": np.array(counter, np.uint64),
                          "key": np.array([key & (_U64 - 1), key >> 64], np.uint64)},
                "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    return bg


_TWO_PI = np.float32(2 * math.pi)
_U24 = np.float32(2.0**-24)


#: pairs per chunk of the Gaussian draw: bounds its scratch to ~5 MB (the whole-buffer draw held 1.5x
#: the tangents in temporaries); a multiple of 64 keeps every value in the same SIMD lane position as
#: in one pass over the whole buffer, so chunked and unchunked draws are bit-identical
_CHUNK = 1 << 18


def _uniforms(bg: np.random.Philox, start: int, count: int) -> np.ndarray:
    """float32 uniforms (k + 0.5)·2⁻²⁴ from the 32-bit words [start, start + count) of ``bg``'s stream, read
    through a copy (Philox advances in blocks of four 64-bit words)."""
    g = np.random.Philox()
    g.state = bg.state
    first = start // 2
    g.advance(first // 4)
    if first % 4:
        g.random_raw(first % 4)
    w = g.random_raw((start + count + 1) // 2 - first).view(np.uint32)[start % 2:start % 2 + count]
    u = np.right_shift(w, np.uint32(8)).astype(np.float32)  # 24-bit integers: exact in float32
    u += np.float32(0.5)
    u *= _U24
    return u


def _box_muller(bg: np.random.Philox, flat: np.ndarray) -> None:
    """Fill the 1-D float32 ``flat`` with N(0, 1) values from ``bg`` (mapping: module docstring), in chunks."""
    n = flat.size
    p = (n + 1) // 2
    for a in range(0, p, _CHUNK):
        b = min(a + _CHUNK, p)
        r, theta = _uniforms(bg, a, b - a), _uniforms(bg, p + a, b - a)
        np.log(r, out=r)
        r *= np.float32(-2.0)
        np.sqrt(r, out=r)
        theta *= _TWO_PI
        sin = np.sin(theta)
        sin *= r
        np.cos(theta, out=theta)
        np.multiply(r, theta, out=flat[a:b])
        top = min(b, n - p)
        if top > a:
            flat[p + a:p + top] = sin[:top - a]


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
    dim = sum(buf[0].size for buf in out)
    if mode == "orthogonal" and m > dim:
        raise ValueError(f"orthogonal tangents need m <= D, got m={m} directions in D={dim} dims")
    span = contiguous_span(out)
    flat = span if span is not None else np.empty(m * dim, np.float32)
    bg = module_stream(seed, step, module)
    if mode == "rademacher":
        # u in {k / 2**24}: u >= 0.5 holds for exactly half the values; copysign maps
        # u - 0.5 (with +0.0 at u = 0.5) to +-scale without a temporary.
        np.random.Generator(bg).random(dtype=np.float32, out=flat)
        np.subtract(flat, np.float32(0.5), out=flat)
        np.copysign(np.float32(scale), flat, out=flat)
    else:
        _box_muller(bg, flat)
        if mode == "gaussian" and scale != 1.0:
            flat *= np.float32(scale)
    if span is None:
        start = 0
        for buf in out:
            buf.reshape(-1)[...] = flat[start:start + buf.size]
            start += buf.size
    if mode == "orthogonal":
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


#: counter word 2's domain bit for activity noise (dropout masks use the top bit: runtime/masks.py)
NOISE_DOMAIN = 1 << 62


def fill_signs(out: list[np.ndarray], seed: int, step: int, module: int) -> None:
    """Fill float32 buffers in place with iid ±1 (Rademacher) values: the local-activity method's ε.

    One stream per (seed, step, module), counter ``[0, 0, 2**62 | module, step]`` (disjoint from the
    weight tangents' and the dropout masks'), read as bits: value i of the buffers' concatenation is
    +1 where bit i % 8 (least significant first) of byte i // 8 of the stream is set, else −1. One
    bit per value instead of Box-Muller's 32 makes the draw of an activity-sized ε cheap
    (docs/performance.md); ±1 keeps the estimate unbiased (E[ε εᵀ] = I).
    """
    if not out:
        return
    _check_buffers(out)
    total = sum(b.size for b in out)
    bg = module_stream(seed, step, module, NOISE_DOMAIN)
    raw = bg.random_raw((total + 63) // 64).view(np.uint8)
    bits = np.unpackbits(raw, bitorder="little")[:total]
    start = 0
    for buf in out:
        flat = buf.reshape(-1)
        np.multiply(bits[start:start + flat.size], np.float32(2.0), out=flat, casting="unsafe")
        flat -= np.float32(1.0)
        start += flat.size

