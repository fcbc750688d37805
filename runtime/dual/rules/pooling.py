"""Pooling and resampling: max and average pooling (adaptive to any output size), upsampling.

All but max pooling are linear maps (``deflinear``): the tangent is the same pooling of ẋ.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..ops import window_out
from .core import RuleOut, deflinear, merge_m, primal, rule, split_m


@rule("maxpool2d")
def maxpool2d(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """ẏ = ẋ at the window's first maximum (row-major window order, as PyTorch's max-pool picks).

    MaxPool's ``Indices`` output would be simpler but TensorRT does not parse it. When the
    windows tile the input (kernel = stride, the common case) the argmax is found in the input's
    own layout: x == upsample(y) marks the maxima, each scored by its window position (k² for the
    first … 1 for the last) so that a second max-pool picks the first among ties; the resulting
    mask, times k², selects ẋ and an average pool sums each window: exact for power-of-two
    windows (one rounding of k²·ẋ otherwise). Only the mask multiply and the pool touch the m
    tangents. Other windows go through strided slices (``_first_maximum``). ArgMax + one-hot,
    Hardmax, Where chains, SpaceToDepth and window transposes were each measured 1.5-4x slower in
    ONNX Runtime (tiny innermost dimensions).
    """
    (x,), (xd,) = xs, xds
    a = node.attrs
    pool = lambda t: ops.maxpool(t, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])  # noqa: E731
    y = pool(x)
    if not ctx.dual or xd is None:
        return y, None, {}
    (kh, kw), stride, dil = a["kernel"], a["stride"], a["dilation"]
    h, w = ops.shape(x)[2:]
    if list(stride) == [kh, kw] and a["padding"] == [0, 0] and dil == [1, 1] and h % kh == 0 and w % kw == 0:
        rank = (kh * kw - np.arange(kh * kw, dtype=np.float32)).reshape(kh, kw)
        scored = ops.mul(ops.eq_mask(x, ops.upsample(y, kh, kw)), ops.const(np.tile(rank, (h // kh, w // kw))))
        first = ops.eq_mask(scored, ops.upsample(pool(scored), kh, kw))
        picked = ops.mul(xd, primal(ops, ops.mul(first, ops.const(float(kh * kw)))))
        return y, split_m(ops, ops.avgpool(merge_m(ops, picked), [kh, kw], [kh, kw], [0, 0], False, True), ctx.m), {}
    ph, pw = a["padding"]
    pads = [ph, pw, ph + _ceil_extra(h, kh, stride[0], ph, dil[0], a["ceil_mode"]),
            pw + _ceil_extra(w, kw, stride[1], pw, dil[1], a["ceil_mode"])]
    if any(pads):
        x = ops.pad(x, pads, -3.0e38)  # never the maximum of a window that holds a real element
        xd = split_m(ops, ops.pad(merge_m(ops, xd), pads, 0.0), ctx.m)
    size = ops.shape(y)[2:]
    offsets = [(i * dil[0], j * dil[1]) for i in range(kh) for j in range(kw)]
    windows = ((ops.strided_hw(x, o, stride, size), ops.strided_hw(xd, o, stride, size)) for o in offsets)
    return y, _first_maximum(ops, windows, len(offsets), y), {}


def _first_maximum(ops, windows: Iterator[tuple[Any, Any]], count: int, y: Any) -> Any:
    """Σ_i sel_i·ẋ_i, sel_i = 1 at the first window offset i where x_i == y, else 0 (exact:
    one term is selected, the others add zeros). ``rest`` is 1 where no earlier offset held y.

    The offsets' slices (x_i, ẋ_i) are emitted one pair at a time, each next to its use, so that a
    schedule in emission order holds one pair of slices, not all k² of them."""
    yd, rest = None, None
    for i, (xi, di) in enumerate(windows):
        if i == count - 1:
            sel = rest  # the maximum is somewhere in the window: if not before, here
        else:
            hit = ops.eq_mask(xi, y)
            sel = hit if rest is None else ops.mul(hit, rest)
            rest = ops.sub(ops.const(1.0), hit) if rest is None else ops.sub(rest, sel)
        term = di if sel is None else ops.mul(di, primal(ops, sel))
        yd = term if yd is None else ops.add(yd, term)
    return yd


def _ceil_extra(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Extra bottom/right padding so explicit windows cover what ceil_mode pooling covers."""
    if not ceil_mode:
        return 0
    out = window_out(size, k, s, p, d, ceil_mode)
    return max(0, (out - 1) * s + d * (k - 1) + 1 - (size + 2 * p))


def _avgpool(ops, x, a: dict) -> Any:
    return ops.avgpool(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])


def adaptive_matrix(size: int, out: int) -> np.ndarray:
    """P[o, i] = 1/len(bin o) for i in adaptive pooling's bin o = [⌊o·size/out⌋, ⌈(o+1)·size/out⌉)."""
    p = np.zeros((out, size))  # float64: the op set rounds it to its own precision
    for o in range(out):
        lo, hi = (o * size) // out, -(-((o + 1) * size) // out)
        p[o, lo:hi] = 1.0 / (hi - lo)
    return p


def _adaptive_avgpool(ops, x, a: dict) -> Any:
    """Average pooling into bins of unequal size: one product with the constant (H·W → Ho·Wo) matrix."""
    c, h, w = ops.shape(x)[1:]
    (ho, wo) = a["output_size"]
    mat = np.kron(adaptive_matrix(h, ho), adaptive_matrix(w, wo))  # (Ho·Wo, H·W)
    y = ops.matmul(ops.reshape(x, [-1, c, h * w]), ops.const(mat.T.copy()))
    return ops.reshape(y, [-1, c, ho, wo])


deflinear("avgpool2d", _avgpool)
deflinear("adaptive_avgpool2d", _adaptive_avgpool)
deflinear("global_avgpool", lambda ops, x, a: ops.mean(x, [2, 3]))  # (N, C, 1, 1), as torch
deflinear("upsample_nearest", lambda ops, x, a: ops.upsample(x, *a["scale"]))
deflinear("flatten", lambda ops, x, a: ops.reshape(x, [-1, int(np.prod(ops.shape(x)[1:]))]))
