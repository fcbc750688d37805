"""Dual rules of the layers with weights: linear, convolution, BatchNorm, LayerNorm.

Costs are kept near the 3× FLOP floor of a weight-perturbed dual step: for m = 1, a conv or
linear computes ∂f/∂x·ẋ + ∂f/∂θ·u as ONE product over channel-concatenated [ẋ, x] and [W, U].
The faster forms that depend on sizes (a dense conv, the conv–BN fold) are fusions
(``asyncfgd.runtime.dual.fusions``), chosen by the interpreter.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .core import RuleContext, RuleOut, add_opt, merge_m, primal, rule, split_m


def param_tangent_product(ops: Any, x: Any, u: Any, m: int, product: Callable[[Any, Any], Any],
                           groups: int = 1) -> Any:
    """∂f/∂θ·u for a layer linear in θ: all m tangents in one product over stacked outputs.

    ``product(x, W)`` is the layer's map; stacking the m tangents along the output-channel axis
    gives (N, m·C, ...) = (N, m, C, ...) in one call. Grouped convs stack group-major (to keep
    their channel groups) and move m before the groups afterwards.
    """
    shp = ops.shape(u)  # (m, C, ...)
    c, rest = shp[1], list(shp[2:])
    g = groups
    if g == 1 or m == 1:
        y = product(x, ops.reshape(u, [m * c, *rest]))
        return ops.reshape(y, [-1, m, c, *ops.shape(y)[2:]])
    w = ops.reshape(u, [m, g, c // g, *rest])
    w = ops.transpose(w, [1, 0, *range(2, len(rest) + 3)])
    y = product(x, ops.reshape(w, [g * m * (c // g), *rest]))  # (N, g·m·c/g, ...)
    ys = ops.shape(y)
    y = ops.transpose(ops.reshape(y, [-1, g, m, c // g, *ys[2:]]), [0, 2, 1, *range(3, len(ys) + 2)])
    return ops.reshape(y, [-1, m, c, *ys[2:]])


@rule("linear")
def linear(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """y = x·Wᵀ + b over the last axis; ẏ = ẋ·Wᵀ + x·Uᵀ + u_b. Leading per-sample axes (tokens)
    ride as rows of one GEMM."""
    (x,), (xd,) = xs, xds
    w, b = p["weight"], p.get("bias")
    lead = list(ops.shape(x)[1:-1])
    f_out, f_in = ops.shape(w)
    rows = ops.reshape(x, [-1, f_in]) if lead else x
    y = ops.gemm(rows, w, b)
    if lead:
        y = ops.reshape(y, [-1, *lead, f_out])
    if not ctx.dual:
        return y, None, {}
    uw, ub = u.get("weight"), u.get("bias")
    if uw is None:  # weights not perturbed (activity perturbation): ẏ = ẋ·Wᵀ
        yd = None if xd is None else ops.matmul(xd, ops.transpose(w, [1, 0]))
    elif xd is not None and ctx.m == 1:
        # one product: [ẋ, x] @ [W, U]ᵀ
        xx = ops.concat([ops.reshape(xd, [-1, f_in]), rows], 1)
        ww = ops.concat([w, ops.reshape(uw, [f_out, f_in])], 1)
        yd = ops.reshape(ops.gemm(xx, ww, None), [-1, 1, *lead, f_out])
    else:
        yd = param_tangent_product(ops, rows, uw, ctx.m, lambda a, k: ops.gemm(a, k, None))  # (N·L, m, out)
        if lead:
            k = len(lead)
            yd = ops.transpose(ops.reshape(yd, [-1, *lead, ctx.m, f_out]), [0, k + 1, *range(1, k + 1), k + 2])
        if xd is not None:
            yd = ops.add(yd, ops.matmul(xd, ops.transpose(w, [1, 0])))
    if ub is not None:
        yd = add_opt(ops, yd, ops.reshape(ub, [1, ctx.m, *([1] * len(lead)), f_out]))
    return y, yd, {}


def conv_dual(ops, node, x, xd, p, u, ctx: RuleContext, xd_conv: Callable[[Any, Any], Any] | None = None) -> RuleOut:
    """Conv2d's (y, ẏ); ``xd_conv`` computes W∗ẋ over the merged (N·m, ...) tangents, when a fusion
    has a faster form for it (fusions.dense_conv)."""
    a = node.attrs
    w, b = p["weight"], p.get("bias")
    conv = lambda inp, k, bias=None: ops.conv(inp, k, bias, a["stride"], a["padding"], a["dilation"], a["groups"])  # noqa: E731
    y = conv(x, w, b)
    if not ctx.dual:
        return y, None, {}
    uw, ub = u.get("weight"), u.get("bias")
    g = a["groups"]
    if uw is None:  # weights not perturbed (activity perturbation): ẏ = W∗ẋ
        yd = None if xd is None else split_m(ops, conv(merge_m(ops, xd), w), ctx.m)
    elif xd is not None and ctx.m == 1 and xd_conv is None:
        # one conv over channel-concatenated [ẋ, x] with [W, U] (interleaved per group)
        n_c = ops.shape(x)[1]
        hw = list(ops.shape(x)[2:])
        xx = ops.concat([ops.reshape(xd, [-1, g, n_c // g, *hw]), ops.reshape(x, [-1, g, n_c // g, *hw])], 2)
        xx = ops.reshape(xx, [-1, 2 * n_c, *hw])
        ww = ops.concat([w, ops.reshape(uw, list(ops.shape(w)))], 1)
        yd = ops.unsqueeze(conv(xx, ww), 1)
    else:
        yd = param_tangent_product(ops, x, uw, ctx.m, conv, groups=g)
        if xd is not None:
            if xd_conv is not None:
                yd = split_m(ops, xd_conv(merge_m(ops, xd), merge_m(ops, yd)), ctx.m)
            else:
                yd = ops.add(yd, split_m(ops, conv(merge_m(ops, xd), w), ctx.m))
    if ub is not None:
        yd = add_opt(ops, yd, ops.reshape(ub, [1, ctx.m, ops.shape(ub)[1], 1, 1]))
    return y, yd, {}


def im2col(ops, t, attrs: dict, kernel: tuple[int, int]) -> Any:
    """(B, Ci, H, W) -> (B, Ci·T, P): each input channel's values under the conv's T taps at its P
    output positions. One conv of each channel with one-hot tap kernels (slicing every tap costs
    ~20 graph nodes)."""
    kh, kw = kernel
    n_ci, h, w = ops.shape(t)[1:]
    taps = ops.const(np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw))
    cols = ops.conv(ops.reshape(t, [-1, 1, h, w]), taps, None, attrs["stride"], attrs["padding"], attrs["dilation"], 1)
    return ops.reshape(cols, [-1, n_ci * kh * kw, ops.shape(cols)[2] * ops.shape(cols)[3]])


def conv_correlation(ops, x, g, attrs: dict, kernel: tuple[int, int], groups: int = 1) -> Any:
    """Σ_{n,p} g[n,c,p]·x[n,ci,p+t] as (C, Ci/groups, kh, kw): a conv's transpose with respect to
    its weight, applied to g (the weight gradient when g is the output's gradient); each group
    correlates its own input and output channels. One (batched) GEMM over the (n, p) pairs of the
    im2col."""
    kh, kw = kernel
    n_ci = ops.shape(x)[1]
    c = ops.shape(g)[1]
    cols = im2col(ops, x, attrs, kernel)
    k, p = ops.shape(cols)[1:]
    if groups == 1:
        cols = ops.reshape(ops.transpose(cols, [0, 2, 1]), [-1, k])  # (N·P, Ci·T)
        rows = ops.reshape(ops.transpose(ops.reshape(g, [-1, c, p]), [1, 0, 2]), [c, -1])  # (C, N·P)
        return ops.reshape(ops.matmul(rows, cols), [c, n_ci, kh, kw])
    cols = ops.reshape(ops.transpose(ops.reshape(cols, [-1, groups, k // groups, p]), [1, 0, 3, 2]),
                       [groups, -1, k // groups])  # (groups, N·P, Ci/groups·T)
    rows = ops.reshape(ops.transpose(ops.reshape(g, [-1, groups, c // groups, p]), [1, 2, 0, 3]),
                       [groups, c // groups, -1])  # (groups, C/groups, N·P)
    return ops.reshape(ops.matmul(rows, cols), [c, n_ci // groups, kh, kw])


def _padded(ops, x, xd, pads: list[int], m: int) -> tuple[Any, Any]:
    """x and ẋ zero-padded by (top, left, bottom, right): 'same' padding with an even kernel."""
    if xd is not None:
        xd = split_m(ops, ops.pad(merge_m(ops, xd), pads, 0.0), m)
    return ops.pad(x, pads, 0.0), xd


@rule("conv2d")
def conv2d(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    (x,), (xd,) = xs, xds
    if "pads" in node.attrs:
        x, xd = _padded(ops, x, xd, node.attrs["pads"], ctx.m)
    return conv_dual(ops, node, x, xd, p, u, ctx)


@rule("conv1d")
def conv1d(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """A Conv1d is a Conv2d over a 1×L image: the same rule on reshaped values and weights."""
    (x,), (xd,) = xs, xds
    a = node.attrs
    c_in, length = ops.shape(x)[1:]
    x = ops.reshape(x, [-1, c_in, 1, length])
    xd = None if xd is None else ops.reshape(xd, [-1, ctx.m, c_in, 1, length])
    flat = {"stride": [1, *a["stride"]], "padding": [0, *a["padding"]], "dilation": [1, *a["dilation"]],
            "groups": a["groups"]}
    if "pads" in a:
        x, xd = _padded(ops, x, xd, [0, a["pads"][0], 0, a["pads"][1]], ctx.m)
    w4 = {"weight": ops.reshape(p["weight"], [*ops.shape(p["weight"])[:2], 1, ops.shape(p["weight"])[2]])}
    u4 = {"weight": None if u.get("weight") is None else ops.reshape(u["weight"], [*ops.shape(u["weight"])[:3], 1, -1])}
    if "bias" in p:
        w4["bias"], u4["bias"] = p["bias"], u.get("bias")
    y, yd, _ = conv_dual(ops, type(node)(node.name, "conv2d", node.inputs, flat), x, xd, w4, u4, ctx)
    c_out, _, l_out = ops.shape(y)[1:]
    return (ops.reshape(y, [-1, c_out, l_out]),
            None if yd is None else ops.reshape(yd, [-1, ctx.m, c_out, l_out]), {})


def channel_mean(ops, t):
    """Mean over the batch (first) and spatial (last two) axes, keeping the others: spatial first
    (contiguous, fast), then the batch axis. ONNX Runtime reduces non-adjacent axes in one pass
    far more slowly."""
    return ops.mean(ops.mean(t, [-2, -1]), [0])


def bn_primal(ops, node, x, p, s, ctx) -> tuple[Any, dict, Any, Any, Any, Any]:
    """BatchNorm's forward: (y, updated statistics, base, a, r, μ) with base = x − μ in train
    mode (x in frozen mode), r = (σ² + eps)^-½ and a = γ·r, as the tangent formulas use them."""
    eps, mom = node.attrs["eps"], node.attrs["momentum"]
    c = ops.shape(x)[1]
    chan = [1, c, 1, 1]
    gamma = ops.reshape(p["weight"], chan) if "weight" in p else None
    beta = ops.reshape(p["bias"], chan) if "bias" in p else None
    new: dict[str, Any] = {}
    if ctx.bn_train:
        mu = channel_mean(ops, x)
        base = ops.sub(x, mu)  # xc
        var = channel_mean(ops, ops.mul(base, base))
        r = ops.div(ops.const(1.0), ops.sqrt(ops.add(var, ops.const(eps))))
        n = ops.batch_count(x, ops.shape(x)[2] * ops.shape(x)[3])
        unbiased = ops.mul(ops.reshape(var, [c]), ops.div(n, ops.sub(n, ops.const(1.0))))
        keep = ops.const(1.0 - mom)
        new = {"running_mean": ops.add(ops.mul(s["running_mean"], keep), ops.mul(ops.reshape(mu, [c]), ops.const(mom))),
               "running_var": ops.add(ops.mul(s["running_var"], keep), ops.mul(unbiased, ops.const(mom)))}
    else:
        mu = ops.reshape(s["running_mean"], chan)
        r = ops.div(ops.const(1.0), ops.sqrt(ops.add(ops.reshape(s["running_var"], chan), ops.const(eps))))
        base = x
    a = r if gamma is None else ops.mul(gamma, r)
    y = ops.mul(base, a)
    if not ctx.bn_train:
        y = ops.sub(y, ops.mul(mu, a))
    if beta is not None:
        y = ops.add(y, beta)
    return y, new, base, a, r, mu


def bn_tangent_coefficients(ops, c: int, a, r, mu, u, ctx, pc=None, mean_xd=None) -> tuple[Any, Any]:
    """Per-tangent (coef, const), each (1, m, C, 1, 1) or None, with ẏ = a·ẋ + base·coef + const.

    Train mode needs p = mean(xc·ẋ) and mean(ẋ) (None when ẋ is zero)."""
    tchan = [1, ctx.m, c, 1, 1]
    ug = ops.reshape(u["weight"], tchan) if u.get("weight") is not None else None
    ub = ops.reshape(u["bias"], tchan) if u.get("bias") is not None else None
    coef = None if ug is None else ops.mul(ug, r)
    const = ub
    if ctx.bn_train and pc is not None:
        coef = add_opt(ops, coef, ops.neg(ops.mul(ops.mul(a, ops.mul(r, r)), pc)))
        const = add_opt(ops, const, ops.neg(ops.mul(a, mean_xd)))
    if not ctx.bn_train and coef is not None:
        const = add_opt(ops, const, ops.neg(ops.mul(mu, coef)))
    return coef, const


@rule("batchnorm2d")
def batchnorm2d(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    """BatchNorm with the tangent folded into per-channel coefficients (few full-tensor passes).

    Train mode, with xc = x − μ, r = (σ² + eps)^-½, a = γ·r and p = mean(xc·ẋ):
      y = a·xc + β,   ẏ = a·ẋ + xc·(r·u_γ − a·r²·p) + (u_β − a·mean(ẋ))
    (from x̂̇ = r·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))). Frozen mode uses running statistics:
      y = a·x + (β − a·μ_run),   ẏ = a·ẋ + x·(r·u_γ) + (u_β − μ_run·r·u_γ).
    """
    (x,), (xd,) = xs, xds
    y, new, base, a, r, mu = bn_primal(ops, node, x, p, s, ctx)
    if not ctx.dual:
        return y, None, new
    pc = mean_xd = None
    if ctx.bn_train and xd is not None:
        pc, mean_xd = channel_mean(ops, ops.mul(primal(ops, base), xd)), channel_mean(ops, xd)
    coef, const = bn_tangent_coefficients(ops, ops.shape(x)[1], a, r, mu, u, ctx, pc, mean_xd)
    yd = None if xd is None else ops.mul(xd, a)
    if coef is not None:
        yd = add_opt(ops, yd, ops.mul(primal(ops, base), coef))
    if const is not None:
        yd = add_opt(ops, yd, const)
    return y, yd, new


@rule("layernorm")
def layernorm(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    (x,), (xd,) = xs, xds
    k = len(node.attrs["normalized_shape"])
    axes = list(range(-k, 0))
    mu = ops.mean(x, axes)
    xc = ops.sub(x, mu)
    r = ops.div(ops.const(1.0), ops.sqrt(ops.add(ops.mean(ops.mul(xc, xc), axes), ops.const(node.attrs["eps"]))))
    xh = ops.mul(xc, r)
    xhd = None
    if ctx.dual and xd is not None:
        xdc = ops.sub(xd, ops.mean(xd, axes))
        xhp = primal(ops, xh)
        xhd = ops.mul(ops.sub(xdc, ops.mul(xhp, ops.mean(ops.mul(xhp, xdc), axes))), primal(ops, r))
    gamma, beta = p.get("weight"), p.get("bias")
    shape = list(node.attrs["normalized_shape"])
    y = xh if gamma is None else ops.mul(xh, gamma)
    if beta is not None:
        y = ops.add(y, beta)
    if not ctx.dual:
        return y, None, {}
    yd = None if xhd is None else (xhd if gamma is None else ops.mul(xhd, gamma))
    if gamma is not None and u.get("weight") is not None:
        uw = ops.reshape(u["weight"], [1, ctx.m, *([1] * (len(ops.shape(x)) - 1 - k)), *shape])
        yd = add_opt(ops, yd, ops.mul(primal(ops, xh), uw))
    if beta is not None and u.get("bias") is not None:
        yd = add_opt(ops, yd, ops.reshape(u["bias"], [1, ctx.m, *([1] * (len(ops.shape(x)) - 1 - k)), *shape]))
    return y, yd, {}
