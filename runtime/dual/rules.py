"""Dual rules: for each layer type, (y, ẏ) = (f(x; θ), ∂f/∂x·ẋ + ∂f/∂θ·u) with plain ops.

A rule takes primal inputs ``xs`` (N, ...), their tangents ``xds`` (N, m, ...) or None (a zero
tangent: that work is skipped), the layer's weights ``p`` and weight tangents ``u`` (m, *shape)
or None, and BatchNorm statistics ``s``. It returns y, ẏ (or None when ẏ is identically zero)
and any updated statistics. With ``ctx.dual`` false the same rule is the plain forward, so the
forward, eval and dual graphs all come from one definition.

Costs are kept near the 3× FLOP floor of a weight-perturbed dual step: for m = 1, a conv or
linear computes ∂f/∂x·ẋ + ∂f/∂θ·u as ONE product over channel-concatenated [ẋ, x] and [W, U].

Tangents are sample-major inside a module, (N, m, ...), although the artifact contract (and
``run_program``'s interface) is (m, N, ...): a product with the m weight tangents stacked along
the output channels comes out as (N, m·C, ...), so in this layout it needs no transpose (one
pass over all m tangents per layer otherwise), while W·ẋ treats the N·m tangent-samples as one
batch in either order. A primal factor meets the tangents as (N, 1, ...) (``_primal``), a
per-tangent one as (1, m, ...).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ops import window_out
from .program import Node


@dataclass(frozen=True)
class RuleContext:
    m: int  # tangents riding in one pass (axis 1 of value tangents, axis 0 of weight tangents)
    dual: bool  # compute tangents at all
    bn_train: bool  # BatchNorm uses batch statistics and returns updated running statistics
    batch: int = 64  # the mini-batch size the graph's cost-based choices are tuned for (any size runs)


RuleOut = tuple[Any, Any, dict[str, Any]]
Rule = Callable[[Any, Node, list, list, dict, dict, dict, RuleContext], RuleOut]
RULES: dict[str, Rule] = {}


def rule(op: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[op] = fn
        return fn
    return register


def _add_opt(ops: Any, a: Any, b: Any) -> Any:
    """a + b where either may be None (a zero tangent)."""
    if a is None:
        return b
    return a if b is None else ops.add(a, b)


def merge_m(ops: Any, t: Any) -> Any:
    """(N, m, ...) -> (N·m, ...) so a batched op sees the tangents as a bigger batch."""
    return ops.reshape(t, [-1, *ops.shape(t)[2:]])


def split_m(ops: Any, t: Any, m: int) -> Any:
    """(N·m, ...) -> (N, m, ...)."""
    return ops.reshape(t, [-1, m, *ops.shape(t)[1:]])


def _primal(ops: Any, v: Any) -> Any:
    """A primal (N, ...) value as a factor of sample-major tangents: (N, 1, ...)."""
    return ops.unsqueeze(v, 1)


def swap_major(ops: Any, t: Any, m: int, to_samples: bool) -> Any:
    """(m, N, ...) -> (N, m, ...) (``to_samples``) or back: the contract's layout to the rules' and
    back; a reshape at m = 1."""
    if t is None:
        return None
    rest = list(ops.shape(t)[2:])
    if m == 1:
        return ops.reshape(t, [-1, 1, *rest] if to_samples else [1, -1, *rest])
    return ops.transpose(t, [1, 0, *range(2, len(rest) + 2)])


def _param_tangent_product(ops: Any, x: Any, u: Any, m: int, product: Callable[[Any, Any], Any],
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
    (x,), (xd,) = xs, xds
    w, b = p["weight"], p.get("bias")
    y = ops.gemm(x, w, b)
    if not ctx.dual:
        return y, None, {}
    uw, ub = u["weight"], u.get("bias")
    if xd is not None and ctx.m == 1:
        # one product: [ẋ, x] @ [W, U]ᵀ
        xx = ops.concat([ops.reshape(xd, [-1, ops.shape(x)[1]]), x], 1)
        ww = ops.concat([w, ops.reshape(uw, list(ops.shape(w)))], 1)
        yd = ops.unsqueeze(ops.gemm(xx, ww, None), 1)
    else:
        yd = _param_tangent_product(ops, x, uw, ctx.m, lambda a, k: ops.gemm(a, k, None))
        if xd is not None:
            yd = ops.add(yd, ops.matmul(xd, ops.transpose(w, [1, 0])))
    if ub is not None:
        yd = ops.add(yd, ops.reshape(ub, [1, ctx.m, ops.shape(ub)[1]]))
    return y, yd, {}


@rule("conv2d")
def conv2d(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    (x,), (xd,) = xs, xds
    a = node.attrs
    w, b = p["weight"], p.get("bias")
    conv = lambda inp, k, bias=None: ops.conv(inp, k, bias, a["stride"], a["padding"], a["dilation"], a["groups"])  # noqa: E731
    y = conv(x, w, b)
    if not ctx.dual:
        return y, None, {}
    uw, ub = u["weight"], u.get("bias")
    g = a["groups"]
    if xd is not None and ctx.m == 1:
        # one conv over channel-concatenated [ẋ, x] with [W, U] (interleaved per group)
        n_c = ops.shape(x)[1]
        hw = list(ops.shape(x)[2:])
        xx = ops.concat([ops.reshape(xd, [-1, g, n_c // g, *hw]), ops.reshape(x, [-1, g, n_c // g, *hw])], 2)
        xx = ops.reshape(xx, [-1, 2 * n_c, *hw])
        ww = ops.concat([w, ops.reshape(uw, list(ops.shape(w)))], 1)
        yd = ops.unsqueeze(conv(xx, ww), 1)
    else:
        yd = _param_tangent_product(ops, x, uw, ctx.m, conv, groups=g)
        if xd is not None:
            xd = merge_m(ops, xd)
            if pays_to_densify(ctx, ops.shape(x), ops.shape(w), a):
                yd = split_m(ops, dense_conv(ops, xd, w, a, acc=merge_m(ops, yd)), ctx.m)
            else:
                yd = ops.add(yd, split_m(ops, conv(xd, w), ctx.m))
    if ub is not None:
        yd = ops.add(yd, ops.reshape(ub, [1, ctx.m, ops.shape(ub)[1], 1, 1]))
    return y, yd, {}


DENSE_MAX_ELEMENTS = 1 << 18  # the dense matrix's size cap (1 MiB); larger ones lost to the conv


def pays_to_densify(ctx: RuleContext, x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: dict) -> bool:
    """Whether ``dense_conv`` beats ONNX Runtime's conv for W∗ẋ over the m·N tangent-samples.

    ORT's conv runs each sample as its own small GEMM, which on maps of a few pixels reaches ~20 G
    multiply-adds/s against ~50 G for one large GEMM (2 cores x86, 1 thread). The dense form does
    H·W/taps times the conv's multiply-adds (1.8x on 4×4 maps with 3×3 kernels, fewer than the conv
    on 2×2) and builds its matrix once per run. Measured, conv → dense: 16→32 channels on 4×4 maps,
    512 samples 1.96 → 1.53 ms, 256 samples 0.94 → 0.74 ms, 64 samples 0.24 → 0.28 ms (a loss);
    32→64 channels, 256 samples 2.47 → 3.08 ms (a loss: the matrix has 512 k entries, and the conv
    is more efficient with more channels); 2×2 maps 3-10x faster. Hence: at least 256 samples,
    at most 2× the conv's multiply-adds, a matrix of at most ``DENSE_MAX_ELEMENTS``, no groups.
    """
    if attrs["groups"] != 1:
        return False
    _, ci, h, w = x_shape
    co, _, kh, kw = w_shape
    ho, wo = _conv_out_hw((h, w), (kh, kw), attrs)
    return (ctx.m * ctx.batch >= 256 and h * w <= 2 * kh * kw
            and ci * h * w * co * ho * wo <= DENSE_MAX_ELEMENTS)


def _conv_out_hw(hw: tuple[int, int], kernel: tuple[int, int], attrs: dict) -> tuple[int, int]:
    ho, wo = (window_out(hw[i], kernel[i], attrs["stride"][i], attrs["padding"][i], attrs["dilation"][i], False)
              for i in range(2))
    return ho, wo


def _placement(hw: tuple[int, int], kernel: tuple[int, int], attrs: dict) -> np.ndarray:
    """P[t, o, i] = 1 where the conv's tap t reads input pixel i for output pixel o (zero padding
    drops the rest): (taps, Ho·Wo, H·W)."""
    (h, w), (kh, kw) = hw, kernel
    ho, wo = _conv_out_hw(hw, kernel, attrs)
    (sh, sw), (ph, pw), (dh, dw) = attrs["stride"], attrs["padding"], attrs["dilation"]
    p = np.zeros((kh * kw, ho * wo, h * w), np.float32)
    for t in range(kh * kw):
        for oi in range(ho):
            for oj in range(wo):
                i, j = oi * sh - ph + (t // kw) * dh, oj * sw - pw + (t % kw) * dw
                if 0 <= i < h and 0 <= j < w:
                    p[t, oi * wo + oj, i * w + j] = 1.0
    return p


def dense_conv(ops, x, w, attrs: dict, acc: Any = None) -> Any:
    """conv(x, W) (+ ``acc``, shaped like the result) for an ungrouped conv as ONE GEMM against W's
    dense (Toeplitz) matrix D[(co, o), (ci, i)] = Σ_t W[co, ci, t]·P[t, o, i]: a small MatMul and
    one transpose build D, and x (B, Ci, H, W) is already the (B, Ci·H·W) operand, so the result
    needs no layout change; ``acc`` enters as the GEMM's C (no separate pass to add it). Worth it
    only on tiny maps with many samples (``pays_to_densify``)."""
    _, ci, h, wd = ops.shape(x)
    co, _, kh, kw = ops.shape(w)
    ho, wo = _conv_out_hw((h, wd), (kh, kw), attrs)
    place = ops.const(_placement((h, wd), (kh, kw), attrs).reshape(kh * kw, -1))
    d = ops.matmul(ops.reshape(w, [co * ci, kh * kw]), place)  # (Co·Ci, Ho·Wo·H·W)
    d = ops.transpose(ops.reshape(d, [co, ci, ho * wo, h * wd]), [0, 2, 1, 3])
    c = None if acc is None else ops.reshape(acc, [-1, co * ho * wo])
    y = ops.gemm(ops.reshape(x, [-1, ci * h * wd]), ops.reshape(d, [co * ho * wo, ci * h * wd]), c)
    return ops.reshape(y, [-1, co, ho, wo])


def _channel_mean(ops, t):
    """Mean over the batch (first) and spatial (last two) axes, keeping the others: spatial first
    (contiguous, fast), then the batch axis. ONNX Runtime reduces non-adjacent axes in one pass
    far more slowly."""
    return ops.mean(ops.mean(t, [-2, -1]), [0])


def _bn_primal(ops, node, x, p, s, ctx) -> tuple[Any, dict, Any, Any, Any, Any]:
    """BatchNorm's forward: (y, updated statistics, base, a, r, μ) with base = x − μ in train
    mode (x in frozen mode), r = (σ² + eps)^-½ and a = γ·r, as the tangent formulas use them."""
    eps, mom = node.attrs["eps"], node.attrs["momentum"]
    c = ops.shape(x)[1]
    chan = [1, c, 1, 1]
    gamma = ops.reshape(p["weight"], chan) if "weight" in p else None
    beta = ops.reshape(p["bias"], chan) if "bias" in p else None
    new: dict[str, Any] = {}
    if ctx.bn_train:
        mu = _channel_mean(ops, x)
        base = ops.sub(x, mu)  # xc
        var = _channel_mean(ops, ops.mul(base, base))
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


def _bn_tangent_coefficients(ops, c: int, a, r, mu, u, ctx, pc=None, mean_xd=None) -> tuple[Any, Any]:
    """Per-tangent (coef, const), each (1, m, C, 1, 1) or None, with ẏ = a·ẋ + base·coef + const.

    Train mode needs p = mean(xc·ẋ) and mean(ẋ) (None when ẋ is zero)."""
    tchan = [1, ctx.m, c, 1, 1]
    ug = ops.reshape(u["weight"], tchan) if u.get("weight") is not None else None
    ub = ops.reshape(u["bias"], tchan) if u.get("bias") is not None else None
    coef = None if ug is None else ops.mul(ug, r)
    const = ub
    if ctx.bn_train and pc is not None:
        coef = _add_opt(ops, coef, ops.neg(ops.mul(ops.mul(a, ops.mul(r, r)), pc)))
        const = _add_opt(ops, const, ops.neg(ops.mul(a, mean_xd)))
    if not ctx.bn_train and coef is not None:
        const = _add_opt(ops, const, ops.neg(ops.mul(mu, coef)))
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
    y, new, base, a, r, mu = _bn_primal(ops, node, x, p, s, ctx)
    if not ctx.dual:
        return y, None, new
    pc = mean_xd = None
    if ctx.bn_train and xd is not None:
        pc, mean_xd = _channel_mean(ops, ops.mul(_primal(ops, base), xd)), _channel_mean(ops, xd)
    coef, const = _bn_tangent_coefficients(ops, ops.shape(x)[1], a, r, mu, u, ctx, pc, mean_xd)
    yd = None if xd is None else ops.mul(xd, a)
    if coef is not None:
        yd = _add_opt(ops, yd, ops.mul(_primal(ops, base), coef))
    if const is not None:
        yd = _add_opt(ops, yd, const)
    return y, yd, new


def pays_to_fold(ctx: RuleContext) -> bool:
    """Whether ``conv_bn_from_data`` is the faster form. Frozen BN folds for free. Train-mode BN
    pays for the moments G and S once (about one forward conv plus an im2col transpose), and saves
    six element-wise passes per tangent: measured on ORT, a loss at m = 1 (3×32×32 small CNN, batch
    64: module 0's profiled dual run 7.9 → 10.4 ms; neutral on 8×8 digits) and a gain at m = 8
    (digits: the dual run 5.6 → 5.0 ms; 3×32×32: 93 → 78 ms), docs/performance.md."""
    return ctx.dual and (ctx.m > 1 or not ctx.bn_train)


def conv_bn_from_data(ops, conv_node: Node, bn_node: Node, x, p_conv: dict, u_conv: dict, p_bn: dict,
                      u_bn: dict, s_bn: dict, ctx: RuleContext) -> RuleOut:
    """Conv → BatchNorm whose input tangent is zero (the data): the whole BN tangent folds into the
    tangent conv's kernel and bias, so the m tangents take no element-wise pass (six before).

    With ż_j = U_j∗x + u_b,j the tangent reaching BN and ẏ_j = a·ż_j + base·coef_j + const_j:
      ẏ_j = (a·U_j + coef_j·W)∗x + (a·u_b,j + coef_j·(b − μ) + const_j),
    μ being the batch mean in train mode (0 in frozen mode, whose base is z itself). The train-mode
    statistics of ż_j are linear in U_j: mean(ż_j) = ⟨U_j, S⟩ + u_b,j and mean(xc·ż_j) = ⟨U_j, G⟩
    (mean(xc) = 0), with S[ci,t] = mean of x shifted by tap t and G[c,ci,t] = mean(xc_c · x_ci
    shifted by t): one small im2col product of the primal values, shared by all m tangents
    (``_tap_moments``). Ungrouped convs with a weight tangent only. With a nonzero input tangent
    the same fold measured slower at m = 8 (the moments cost more than the passes they save).
    """
    a_ = conv_node.attrs
    w, b = p_conv["weight"], p_conv.get("bias")
    conv = lambda inp, k, bias=None: ops.conv(inp, k, bias, a_["stride"], a_["padding"],  # noqa: E731
                                              a_["dilation"], 1)
    z = conv(x, w, b)
    y, new, base, a, r, mu = _bn_primal(ops, bn_node, z, p_bn, s_bn, ctx)
    m = ctx.m
    c, _, kh, kw = ops.shape(w)
    uw = u_conv["weight"]  # (m, C, Ci, kh, kw)
    ub = ops.reshape(u_conv["bias"], [1, m, c, 1, 1]) if u_conv.get("bias") is not None else None
    pc = mean_zd = None
    if ctx.bn_train:
        g, s_mean = _tap_moments(ops, x, base, conv_node, (kh, kw))  # (C, Ci, kh, kw), (Ci, kh, kw)
        dot = lambda t: ops.reshape(ops.sum(ops.mul(uw, t), [2, 3, 4], keepdims=False), [1, m, c, 1, 1])  # noqa: E731
        pc, mean_zd = dot(g), _add_opt(ops, dot(s_mean), ub)
    coef, const = _bn_tangent_coefficients(ops, c, a, r, mu, u_bn, ctx, pc, mean_zd)
    kernel = ops.mul(uw, ops.reshape(a, [1, c, 1, 1, 1]))
    shift = ops.neg(mu) if ctx.bn_train else None  # base = z + b − μ (train) or z + b (frozen)
    bias = None if ub is None else ops.mul(ub, a)
    if coef is not None:
        kernel = ops.add(kernel, ops.mul(ops.reshape(coef, [m, c, 1, 1, 1]), w))
        offset = _add_opt(ops, shift, None if b is None else ops.reshape(b, [1, c, 1, 1]))
        bias = _add_opt(ops, bias, None if offset is None else ops.mul(coef, offset))
    bias = _add_opt(ops, bias, const)
    flat = None if bias is None else ops.reshape(bias, [m * c])
    yd = _param_tangent_product(ops, x, kernel, m, lambda inp, k: conv(inp, k, flat))
    return y, yd, new


def _tap_moments(ops, x, xc, conv_node: Node, kernel: tuple[int, int]) -> tuple[Any, Any]:
    """G[c,ci,t] = mean_{n,p}(xc[n,c,p]·x[n,ci,p+t]) and S[ci,t] = mean_{n,p} x[n,ci,p+t] over the
    conv's taps t (zero padding): the moments that make BN's tangent statistics linear in the conv's
    weight tangent (``conv_bn_from_data``). The im2col of x comes from one conv of each input
    channel with one-hot tap kernels (slicing every tap costs ~20 graph nodes); G is then one GEMM
    over (n, p) and S the same im2col of the batch-mean image (a batched product reduced over n
    ran 2x slower)."""
    a_ = conv_node.attrs
    kh, kw = kernel
    n_ci, h, w = ops.shape(x)[1:]
    c, ho, wo = ops.shape(xc)[1:]
    k, p = n_ci * kh * kw, ho * wo
    taps = ops.const(np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw))

    def im2col(t):  # (B, Ci, H, W) -> (B, Ci·T, P)
        cols = ops.conv(ops.reshape(t, [-1, 1, h, w]), taps, None, a_["stride"], a_["padding"], a_["dilation"], 1)
        return ops.reshape(cols, [-1, k, p])

    cols = ops.reshape(ops.transpose(im2col(x), [0, 2, 1]), [-1, k])  # (N·P, Ci·T)
    rows = ops.reshape(ops.transpose(ops.reshape(xc, [-1, c, p]), [1, 0, 2]), [c, -1])  # (C, N·P)
    count = ops.batch_count(x, p)
    g = ops.div(ops.matmul(rows, cols), count)
    s_mean = ops.mean(im2col(ops.mean(x, [0])), [2], keepdims=False)
    return ops.reshape(g, [c, n_ci, kh, kw]), ops.reshape(s_mean, [n_ci, kh, kw])


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
        xhp = _primal(ops, xh)
        xhd = ops.mul(ops.sub(xdc, ops.mul(xhp, ops.mean(ops.mul(xhp, xdc), axes))), _primal(ops, r))
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
        yd = _add_opt(ops, yd, ops.mul(_primal(ops, xh), uw))
    if beta is not None and u.get("bias") is not None:
        yd = _add_opt(ops, yd, ops.reshape(u["bias"], [1, ctx.m, *([1] * (len(ops.shape(x)) - 1 - k)), *shape]))
    return y, yd, {}


def _elementwise(y, xd, deriv_fn, ops, ctx):
    if not ctx.dual or xd is None:
        return y, None, {}
    return y, ops.mul(xd, _primal(ops, deriv_fn())), {}


@rule("relu")
def relu(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    y = ops.relu(xs[0])
    return _elementwise(y, xds[0], lambda: ops.step_mask(y, 0.0), ops, ctx)


@rule("relu6")
def relu6(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    x = xs[0]
    return _elementwise(ops.clip(x, 0.0, 6.0), xds[0], lambda: ops.step_mask(x, 0.0, 6.0), ops, ctx)


@rule("gelu")
def gelu(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    x = xs[0]
    if node.attrs.get("approximate", "none") == "tanh":
        # y = ½x(1 + tanh(k(x + 0.044715x³))), k = √(2/π)
        k = math.sqrt(2.0 / math.pi)
        x2 = ops.mul(x, x)
        inner = ops.mul(ops.const(k), ops.mul(x, ops.add(ops.const(1.0), ops.mul(ops.const(0.044715), x2))))
        t = ops.tanh(inner)
        y = ops.mul(ops.mul(ops.const(0.5), x), ops.add(ops.const(1.0), t))

        def deriv():
            sech2 = ops.sub(ops.const(1.0), ops.mul(t, t))
            dinner = ops.mul(ops.const(k), ops.add(ops.const(1.0), ops.mul(ops.const(3 * 0.044715), x2)))
            return ops.add(ops.mul(ops.const(0.5), ops.add(ops.const(1.0), t)),
                           ops.mul(ops.mul(ops.const(0.5), x), ops.mul(sech2, dinner)))
    else:
        # y = x·Φ(x); y' = Φ(x) + x·φ(x)
        phi_cdf = ops.mul(ops.const(0.5), ops.add(ops.const(1.0), ops.erf(ops.mul(x, ops.const(1 / math.sqrt(2))))))
        y = ops.mul(x, phi_cdf)

        def deriv():
            pdf = ops.mul(ops.const(1 / math.sqrt(2 * math.pi)), ops.exp(ops.mul(ops.mul(x, x), ops.const(-0.5))))
            return ops.add(phi_cdf, ops.mul(x, pdf))
    return _elementwise(y, xds[0], deriv, ops, ctx)


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
        picked = ops.mul(xd, _primal(ops, ops.mul(first, ops.const(float(kh * kw)))))
        return y, split_m(ops, ops.avgpool(merge_m(ops, picked), [kh, kw], [kh, kw], [0, 0], False, True), ctx.m), {}
    ph, pw = a["padding"]
    pads = [ph, pw, ph + _ceil_extra(h, kh, stride[0], ph, dil[0], a["ceil_mode"]),
            pw + _ceil_extra(w, kw, stride[1], pw, dil[1], a["ceil_mode"])]
    if any(pads):
        x = ops.pad(x, pads, -3.0e38)  # never the maximum of a window that holds a real element
        xd = split_m(ops, ops.pad(merge_m(ops, xd), pads, 0.0), ctx.m)
    size = ops.shape(y)[2:]
    offsets = [(i * dil[0], j * dil[1]) for i in range(kh) for j in range(kw)]
    return y, _first_maximum(ops, [ops.strided_hw(x, o, stride, size) for o in offsets], y,
                             [ops.strided_hw(xd, o, stride, size) for o in offsets]), {}


def _first_maximum(ops, x_off: list, y: Any, xd_off: list) -> Any:
    """Σ_i sel_i·ẋ_i, sel_i = 1 at the first window offset i where x_i == y, else 0 (exact:
    one term is selected, the others add zeros). ``rest`` is 1 where no earlier offset held y."""
    yd, rest = None, None
    for i, (xi, di) in enumerate(zip(x_off, xd_off, strict=False)):
        if i == len(x_off) - 1:
            sel = rest  # the maximum is somewhere in the window: if not before, here
        else:
            hit = ops.eq_mask(xi, y)
            sel = hit if rest is None else ops.mul(hit, rest)
            rest = ops.sub(ops.const(1.0), hit) if rest is None else ops.sub(rest, sel)
        term = di if sel is None else ops.mul(di, _primal(ops, sel))
        yd = term if yd is None else ops.add(yd, term)
    return yd


def _ceil_extra(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Extra bottom/right padding so explicit windows cover what ceil_mode pooling covers."""
    if not ceil_mode:
        return 0
    out = window_out(size, k, s, p, d, ceil_mode)
    return max(0, (out - 1) * s + d * (k - 1) + 1 - (size + 2 * p))


@rule("avgpool2d")
def avgpool2d(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    (x,), (xd,) = xs, xds
    a = node.attrs
    pool = lambda t: ops.avgpool(t, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])  # noqa: E731
    y = pool(x)
    if not ctx.dual or xd is None:
        return y, None, {}
    return y, split_m(ops, pool(merge_m(ops, xd)), ctx.m), {}


@rule("global_avgpool")
def global_avgpool(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    (x,), (xd,) = xs, xds
    y = ops.mean(x, [2, 3])
    yd = ops.mean(xd, [3, 4]) if (ctx.dual and xd is not None) else None
    return y, yd, {}


@rule("flatten")
def flatten(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    (x,), (xd,) = xs, xds
    flat = int(np.prod(ops.shape(x)[1:]))
    y = ops.reshape(x, [-1, flat])
    yd = ops.reshape(xd, [-1, ctx.m, flat]) if (ctx.dual and xd is not None) else None
    return y, yd, {}


@rule("add")
def add(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    y = ops.add(xs[0], xs[1])
    return y, (_add_opt(ops, xds[0], xds[1]) if ctx.dual else None), {}


@rule("identity")
def identity(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
    return xs[0], (xds[0] if ctx.dual else None), {}


def cross_entropy(ops, logits, logits_dot, onehot, dual: bool):
    """Mean cross-entropy from one-hot labels, and its directional derivative per tangent.

    Written with ReduceMax/Exp/Log/ReduceSum (no NLL/SoftmaxCrossEntropy ops, which TensorRT
    does not parse): loss = mean(lse(z) − Σ z·Y); dloss_j = mean(Σ (softmax(z) − Y)·ż_j).
    """
    zmax = ops.max(logits, [1])
    zc = ops.sub(logits, zmax)
    lse = ops.log(ops.sum(ops.exp(zc), [1]))  # (N, 1), relative to zmax
    per = ops.sub(lse, ops.sum(ops.mul(zc, onehot), [1]))
    loss = ops.mean(per, [0, 1], keepdims=False)
    if not dual or logits_dot is None:
        return loss, None
    probs = ops.exp(ops.sub(zc, lse))
    dloss = ops.mean(ops.sum(ops.mul(ops.sub(probs, onehot), logits_dot), [2], keepdims=False), [1], keepdims=False)
    return loss, dloss
