"""Rules for tensor operations: arithmetic, shape and layout changes, reductions, products.

Axes in ``node.attrs`` are the values' own axes, batch first (the tracer translates torch's
dims); a tangent has the tangent axis m at 1, so a tangent rule that is not written through
``deflinear`` shifts axes past the batch by one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..algebra import T
from .core import RuleOut, add_opt, deflinear, merge_m, primal, rule, split_m, tangent_or_zeros


def _fit(ops, t: Any, y: Any) -> Any:
    """A tangent with the output's batch axis: one that came only from weights, (1, m, ...), is
    expanded to (N, m, ...) when the output is batched."""
    if t is None or ops.shape(t)[0] != 1 or ops.shape(y)[0] == 1:
        return t
    return ops.expand_batch(t, y)


@rule("param")
def param(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """A weight used directly (a class token, a layer scale): batch axis 1, tangent (1, m, ...)."""
    shape = list(ops.shape(p["value"]))
    y = ops.reshape(p["value"], [1, *shape])
    ud = u.get("value") if ctx.dual else None
    return y, None if ud is None else ops.reshape(ud, [1, ctx.m, *shape]), {}


@rule("constant")
def constant(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """A buffer or constant tensor of the model, stored in the program (no tangent)."""
    return ops.const(np.asarray(node.attrs["value"], np.float64).reshape(1, *node.shape)), None, {}


def _operands(ops, node, xs: list) -> tuple[T, T]:
    """The two operands as algebra values: a number in ``attrs["scalar"]`` stands in for one input."""
    vals = [T(ops, v) for v in xs]
    if "scalar" in node.attrs:
        k = T(ops, ops.const(float(node.attrs["scalar"])))
        return (k, vals[0]) if node.attrs.get("scalar_first") else (vals[0], k)
    return vals[0], vals[1]


def _tangents(node, xds: list) -> tuple[Any, Any]:
    if "scalar" in node.attrs:
        return (None, xds[0]) if node.attrs.get("scalar_first") else (xds[0], None)
    return xds[0], xds[1]


def _factor(ops, v: Any) -> Any:
    """A primal operand as a factor of tangents; a number stays a number."""
    return primal(ops, v) if ops.shape(v) else v


def _scaled(ops, t: Any, factor: T) -> Any:
    return None if t is None else ops.mul(t, _factor(ops, factor.v))


@rule("add")
def add(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    a, b = _operands(ops, node, xs)
    y = (a + b).v
    if not ctx.dual:
        return y, None, {}
    ad, bd = _tangents(node, xds)
    return y, _fit(ops, add_opt(ops, ad, bd), y), {}


@rule("sub")
def sub(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    a, b = _operands(ops, node, xs)
    y = (a - b).v
    if not ctx.dual:
        return y, None, {}
    ad, bd = _tangents(node, xds)
    return y, _fit(ops, add_opt(ops, ad, None if bd is None else ops.neg(bd)), y), {}


@rule("mul")
def mul(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = a·b, ẏ = ȧ·b + a·ḃ."""
    a, b = _operands(ops, node, xs)
    y = (a * b).v
    if not ctx.dual:
        return y, None, {}
    ad, bd = _tangents(node, xds)
    return y, _fit(ops, add_opt(ops, _scaled(ops, ad, b), _scaled(ops, bd, a)), y), {}


@rule("div")
def div(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = a/b, ẏ = (ȧ − y·ḃ)/b."""
    a, b = _operands(ops, node, xs)
    y = a / b
    if not ctx.dual:
        return y.v, None, {}
    ad, bd = _tangents(node, xds)
    num = add_opt(ops, ad, None if bd is None else ops.neg(_scaled(ops, bd, y)))
    return y.v, _fit(ops, None if num is None else ops.div(num, _factor(ops, b.v)), y.v), {}


deflinear("neg", lambda ops, x, a: ops.neg(x))
deflinear("reshape", lambda ops, x, a: ops.reshape(x, [-1, *a["shape"]]))
deflinear("transpose", lambda ops, x, a: ops.transpose(x, a["perm"]))
deflinear("slice", lambda ops, x, a: ops.slice(x, a["axis"], a["start"], a["end"], a["step"]))
deflinear("expand", lambda ops, x, a: ops.expand(x, a["shape"]))
deflinear("mean", lambda ops, x, a: ops.mean(x, a["axes"], a["keepdims"]))
deflinear("sum", lambda ops, x, a: ops.sum(x, a["axes"], a["keepdims"]))
deflinear("identity", lambda ops, x, a: x)


@rule("pad")
def pad(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """Constant padding of the last two axes: y = pad(x, value), ẏ = pad(ẋ, 0)."""
    pads, value = node.attrs["pads"], node.attrs["value"]
    y = ops.pad(xs[0], pads, value)
    if not ctx.dual or xds[0] is None:
        return y, None, {}
    return y, split_m(ops, ops.pad(merge_m(ops, xds[0]), pads, 0.0), ctx.m), {}


@rule("fill")
def fill(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """A constant tensor of one value (``zeros_like``, ``ones_like``, ``full_like``): no tangent."""
    return ops.const(np.full((1, *node.shape), node.attrs["value"])), None, {}


@rule("detach")
def detach(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """The value without its tangent (``x.detach()``: no derivative flows through)."""
    return xs[0], None, {}


@rule("expand_batch")
def expand_batch(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """A weight-derived value (1, ...) repeated for every sample (``cls_token.expand(B, -1, -1)``);
    the second input is any batched value of the module, read for its batch size only."""
    v, like = xs
    y = ops.expand_batch(v, like)
    vd = xds[0] if ctx.dual else None
    return y, None if vd is None else ops.expand_batch(vd, like), {}


@rule("cat")
def cat(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    axis = node.attrs["axis"]
    y = ops.concat(xs, axis)
    if not ctx.dual or all(t is None for t in xds):
        return y, None, {}
    ts = [_fit(ops, tangent_or_zeros(ops, x, t, ctx.m), x) for x, t in zip(xs, xds, strict=True)]
    return y, ops.concat(ts, axis + 1), {}


@rule("amax")
def amax(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = max over axes; ẏ = the mean of ẋ over the maxima (torch's rule for ties)."""
    axes, keep = node.attrs["axes"], node.attrs["keepdims"]
    x = xs[0]
    y = ops.max(x, axes, keep)
    if not ctx.dual or xds[0] is None:
        return y, None, {}
    hit = ops.eq_mask(x, y if keep else ops.max(x, axes, True))
    t_axes = [a + 1 for a in axes]
    return y, ops.div(ops.sum(ops.mul(xds[0], primal(ops, hit)), t_axes, keep),
                      primal(ops, ops.sum(hit, axes, keep))), {}


@rule("matmul")
def matmul(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = a @ b, ẏ = ȧ @ b + a @ ḃ (operands of equal rank: the tracer aligns them)."""
    a, b = T(ops, xs[0]), T(ops, xs[1])
    y = (a @ b).v
    if not ctx.dual:
        return y, None, {}
    ad, bd = xds
    left = None if ad is None else ops.matmul(ad, primal(ops, b.v))
    right = None if bd is None else ops.matmul(primal(ops, a.v), bd)
    return y, _fit(ops, add_opt(ops, left, right), y), {}


@rule("softmax")
def softmax(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = softmax(x), ẏ = y·(ẋ − Σ y·ẋ) along the axis."""
    axis = node.attrs["axis"]
    y = ops.softmax(xs[0], axis)
    if not ctx.dual or xds[0] is None:
        return y, None, {}
    yp, xd = T(ops, primal(ops, y)), T(ops, xds[0])
    return y, (yp * (xd - (yp * xd).sum([axis + 1]))).v, {}


@rule("log_softmax")
def log_softmax(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = log softmax(x), ẏ = ẋ − Σ softmax(x)·ẋ along the axis."""
    axis = node.attrs["axis"]
    y = ops.log_softmax(xs[0], axis)
    if not ctx.dual or xds[0] is None:
        return y, None, {}
    sp, xd = T(ops, primal(ops, ops.softmax(xs[0], axis))), T(ops, xds[0])
    return y, (xd - (sp * xd).sum([axis + 1])).v, {}


@rule("dropout")
def dropout(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = x·mask, ẏ = ẋ·mask: the same mask for the primal and every tangent. The mask (0 or
    1/(1 − p), per element or per sample for drop-path) is a graph input the runtime draws; without
    one (evaluation) dropout is the identity."""
    mask = s.get("mask")
    if mask is None:
        return xs[0], xds[0] if ctx.dual else None, {}
    y = ops.mul(xs[0], mask)
    return y, None if not ctx.dual or xds[0] is None else ops.mul(xds[0], primal(ops, mask)), {}
