"""Named fusions: faster graph forms of rule combinations, chosen by cost, apart from the rules.

The interpreter (interpreter.py) asks ``FUSIONS`` before running a node's reference rule:
- ``dense_conv``: W∗ẋ over many tangent-samples on tiny maps as one GEMM (``pays_to_densify``);
- ``conv_bn_fold``: conv → BatchNorm fed by the data, the BN tangent folded into the tangent
  conv's kernel (``pays_to_fold``), with BN's tangent statistics from the primal ``tap moments``.
Each produces the same values as the reference rules (tests/test_exporter.py checks both).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .ops import window_out
from .program import Node, readers
from .rules.core import RuleContext, RuleOut, add_opt
from .rules.layers import bn_primal, bn_tangent_coefficients, conv_correlation, conv_dual, im2col, param_tangent_product

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
    ho, wo = conv_out_hw((h, w), (kh, kw), attrs)
    return (ctx.m * ctx.batch >= 256 and h * w <= 2 * kh * kw
            and ci * h * w * co * ho * wo <= DENSE_MAX_ELEMENTS)


def conv_out_hw(hw: tuple[int, int], kernel: tuple[int, int], attrs: dict) -> tuple[int, int]:
    ho, wo = (window_out(hw[i], kernel[i], attrs["stride"][i], attrs["padding"][i], attrs["dilation"][i], False)
              for i in range(2))
    return ho, wo


def _placement(hw: tuple[int, int], kernel: tuple[int, int], attrs: dict) -> np.ndarray:
    """P[t, o, i] = 1 where the conv's tap t reads input pixel i for output pixel o (zero padding
    drops the rest): (taps, Ho·Wo, H·W)."""
    (h, w), (kh, kw) = hw, kernel
    ho, wo = conv_out_hw(hw, kernel, attrs)
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
    ho, wo = conv_out_hw((h, wd), (kh, kw), attrs)
    place = ops.const(_placement((h, wd), (kh, kw), attrs).reshape(kh * kw, -1))
    d = ops.matmul(ops.reshape(w, [co * ci, kh * kw]), place)  # (Co·Ci, Ho·Wo·H·W)
    d = ops.transpose(ops.reshape(d, [co, ci, ho * wo, h * wd]), [0, 2, 1, 3])
    c = None if acc is None else ops.reshape(acc, [-1, co * ho * wo])
    y = ops.gemm(ops.reshape(x, [-1, ci * h * wd]), ops.reshape(d, [co * ho * wo, ci * h * wd]), c)
    return ops.reshape(y, [-1, co, ho, wo])


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
    y, new, base, a, r, mu = bn_primal(ops, bn_node, z, p_bn, s_bn, ctx)
    m = ctx.m
    c, _, kh, kw = ops.shape(w)
    uw = u_conv["weight"]  # (m, C, Ci, kh, kw)
    ub = ops.reshape(u_conv["bias"], [1, m, c, 1, 1]) if u_conv.get("bias") is not None else None
    pc = mean_zd = None
    if ctx.bn_train:
        g, s_mean = _tap_moments(ops, x, base, conv_node, (kh, kw))  # (C, Ci, kh, kw), (Ci, kh, kw)
        dot = lambda t: ops.reshape(ops.sum(ops.mul(uw, t), [2, 3, 4], keepdims=False), [1, m, c, 1, 1])  # noqa: E731
        pc, mean_zd = dot(g), add_opt(ops, dot(s_mean), ub)
    coef, const = bn_tangent_coefficients(ops, c, a, r, mu, u_bn, ctx, pc, mean_zd)
    kernel = ops.mul(uw, ops.reshape(a, [1, c, 1, 1, 1]))
    shift = ops.neg(mu) if ctx.bn_train else None  # base = z + b − μ (train) or z + b (frozen)
    bias = None if ub is None else ops.mul(ub, a)
    if coef is not None:
        kernel = ops.add(kernel, ops.mul(ops.reshape(coef, [m, c, 1, 1, 1]), w))
        offset = add_opt(ops, shift, None if b is None else ops.reshape(b, [1, c, 1, 1]))
        bias = add_opt(ops, bias, None if offset is None else ops.mul(coef, offset))
    bias = add_opt(ops, bias, const)
    flat = None if bias is None else ops.reshape(bias, [m * c])
    yd = param_tangent_product(ops, x, kernel, m, lambda inp, k: conv(inp, k, flat))
    return y, yd, new


def _tap_moments(ops, x, xc, conv_node: Node, kernel: tuple[int, int]) -> tuple[Any, Any]:
    """G[c,ci,t] = mean_{n,p}(xc[n,c,p]·x[n,ci,p+t]) and S[ci,t] = mean_{n,p} x[n,ci,p+t] over the
    conv's taps t (zero padding): the moments that make BN's tangent statistics linear in the conv's
    weight tangent (``conv_bn_from_data``). G is the conv's weight correlation (``conv_correlation``)
    of xc with x; S the same im2col of the batch-mean image (a batched product reduced over n ran
    2x slower)."""
    n_ci = ops.shape(x)[1]
    kh, kw = kernel
    ho, wo = ops.shape(xc)[2:]
    g = ops.div(conv_correlation(ops, x, xc, conv_node.attrs, kernel), ops.batch_count(x, ho * wo))
    s_mean = ops.mean(im2col(ops, ops.mean(x, [0]), conv_node.attrs, kernel), [2], keepdims=False)
    return g, ops.reshape(s_mean, [n_ci, kh, kw])


def dense_conv_rule(ops, node: Node, x: Any, xd: Any, p: dict, u: dict, ctx: RuleContext) -> RuleOut:
    """The conv rule with W∗ẋ as one GEMM against W's dense matrix (``dense_conv``)."""
    w = p["weight"]
    def w_conv(t: Any, acc: Any) -> Any:
        return dense_conv(ops, t, w, node.attrs, acc=acc)

    return conv_dual(ops, node, x, xd, p, u, ctx, xd_conv=w_conv)


def fold_pairs(nodes: list[Node]) -> dict[str, Node]:
    """Ungrouped conv name → the BatchNorm that is its only reader (a pair ``conv_bn_from_data`` can run)."""
    reads = readers(nodes)
    convs = {n.name for n in nodes if n.op == "conv2d" and n.attrs["groups"] == 1 and "pads" not in n.attrs}
    return {n.inputs[0]: n for n in nodes
            if n.op == "batchnorm2d" and n.inputs[0] in convs and len(reads[n.inputs[0]]) == 1}


def densifies(ops, node: Node, x: Any, xd: Any, p: dict, ctx: RuleContext) -> bool:
    """Whether a conv node's W∗ẋ runs as ``dense_conv``."""
    return (node.op == "conv2d" and "pads" not in node.attrs and xd is not None and ctx.m > 1
            and pays_to_densify(ctx, ops.shape(x), ops.shape(p["weight"]), node.attrs))
