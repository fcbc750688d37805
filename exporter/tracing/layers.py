"""Converters for layers that keep their own dual rules (conv, linear, norms, pooling, attention)
and for their functional forms. Attention layers are expanded here into per-sample operations:
tracing through torch's multi-head attention would merge the batch with the heads."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import nn

from .builder import Builder, ParamRef, Val
from .functions import attention, binary, converts, slice_axis

LayerConverter = Callable[..., Any]
LAYERS: dict[type, LayerConverter] = {}


def layer(*types: type) -> Callable[[LayerConverter], LayerConverter]:
    def register(fn: LayerConverter) -> LayerConverter:
        for t in types:
            LAYERS[t] = fn
        return fn
    return register


def _ints(v: Any, n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(t) for t in v]


def _params(qual: str, module: nn.Module, roles: Sequence[str]) -> dict[str, str]:
    return {r: f"{qual}.{r}" for r in roles if isinstance(getattr(module, r, None), nn.Parameter)}


# ------------------------------------------------------------------ linear and convolution


def linear_node(b: Builder, x: Val, weight: str | None, bias: str | None, shape: Sequence[int],
                name: str | None) -> Val:
    assert weight is not None
    params = {"weight": weight, **({"bias": bias} if bias else {})}
    return b.emit("linear", [x], (*x.shape[:-1], int(shape[0])), x.batched, params=params, name=name)


def conv_node(b: Builder, x: Val, weight: str | None, bias: str | None, wshape: Sequence[int], stride: Any,
              padding: Any, dilation: Any, groups: int, name: str | None) -> Val:
    """Conv1d/Conv2d with any groups, stride and dilation; 'same' padding with an even kernel pads
    unevenly, as torch does (``pads``)."""
    assert weight is not None
    dims = len(wshape) - 2
    if dims not in (1, 2) or not x.batched:
        raise b.fail("only Conv1d and Conv2d on per-sample inputs are supported")
    dil, kernel = _ints(dilation, dims), [int(k) for k in wshape[2:]]
    attrs: dict[str, Any] = {"stride": _ints(stride, dims), "dilation": dil, "groups": int(groups)}
    if padding == "valid":
        attrs["padding"] = [0] * dims
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
        lo, hi = [t // 2 for t in total], [t - t // 2 for t in total]
        attrs["padding"] = lo if lo == hi else [0] * dims
        if lo != hi:
            attrs["pads"] = [*lo, *hi] if dims == 2 else [lo[0], hi[0]]
    else:
        attrs["padding"] = _ints(padding, dims)
    out = b.observed
    assert out is not None
    params = {"weight": weight, **({"bias": bias} if bias else {})}
    return b.emit("conv2d" if dims == 2 else "conv1d", [x], out.shape, True, attrs, params, name=name)


@layer(nn.Linear)
def _linear(b: Builder, m: nn.Linear, qual: str, input: Val) -> Val:
    return linear_node(b, input, f"{qual}.weight", f"{qual}.bias" if m.bias is not None else None,
                       m.weight.shape, name=qual)


@layer(nn.Conv1d, nn.Conv2d)
def _conv(b: Builder, m: nn.Conv1d | nn.Conv2d, qual: str, input: Val) -> Val:
    if m.padding_mode != "zeros":
        raise b.fail(f"padding_mode={m.padding_mode!r} is not supported (zero padding is)")
    return conv_node(b, input, f"{qual}.weight", f"{qual}.bias" if m.bias is not None else None, m.weight.shape,
                     m.stride, m.padding, m.dilation, m.groups, name=qual)


# ------------------------------------------------------------------ normalisation


@layer(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(b: Builder, m: nn.BatchNorm2d, qual: str, input: Val) -> Val:
    """BatchNorm1d runs as BatchNorm2d on (C, L, 1) or (C, 1, 1) maps: the same statistics."""
    if not m.track_running_stats or m.momentum is None:
        raise b.fail(f"{type(m).__name__} needs track_running_stats=True and a numeric momentum")
    x = input
    shape = x.shape
    if isinstance(m, nn.BatchNorm1d):
        x = b.reshape(x, (shape[0], shape[1] if len(shape) > 1 else 1, 1))
    y = b.emit("batchnorm2d", [x], x.shape, True, {"eps": float(m.eps), "momentum": float(m.momentum)},
               _params(qual, m, ("weight", "bias")),
               {"running_mean": f"{qual}.running_mean", "running_var": f"{qual}.running_var"}, name=qual)
    return b.reshape(y, shape)


def layernorm_node(b: Builder, x: Val, normalized_shape: list[int], eps: float, params: dict[str, str],
                   name: str | None) -> Val:
    return b.emit("layernorm", [x], x.shape, x.batched, {"normalized_shape": normalized_shape, "eps": float(eps)},
                  params, name=name)


@layer(nn.LayerNorm)
def _layernorm(b: Builder, m: nn.LayerNorm, qual: str, input: Val) -> Val:
    return layernorm_node(b, input, list(m.normalized_shape), m.eps, _params(qual, m, ("weight", "bias")), qual)


def groupnorm_nodes(b: Builder, x: Val, groups: int, eps: float, weight: Any, bias: Any) -> Val:
    """GroupNorm = LayerNorm over each group's (C/G, ...) values, then the per-channel affine."""
    c, rest = x.shape[0], x.shape[1:]
    if c % groups:
        raise b.fail(f"{c} channels do not split into {groups} groups")
    per_group = (c // groups) * math.prod(rest)
    y = b.reshape(layernorm_node(b, b.reshape(x, (groups, per_group)), [per_group], eps, {}, None), x.shape)
    for op, p in (("mul", weight), ("add", bias)):
        if p is not None:
            w = b.reshape(b.value(p), (c, *[1] * len(rest)))
            y = binary(b, op, y, w)
    return y


@layer(nn.GroupNorm)
def _groupnorm(b: Builder, m: nn.GroupNorm, qual: str, input: Val) -> Val:
    ref = {r: ParamRef(f"{qual}.{r}", tuple(getattr(m, r).shape)) if getattr(m, r, None) is not None else None
           for r in ("weight", "bias")}
    return groupnorm_nodes(b, input, m.num_groups, m.eps, ref["weight"], ref["bias"])


# ------------------------------------------------------------------ activations


ACTIVATIONS: dict[type, Callable[[Any], tuple[str, dict[str, Any]]]] = {
    nn.ReLU: lambda m: ("relu", {}),
    nn.ReLU6: lambda m: ("relu6", {}),
    nn.Hardtanh: lambda m: ("hardtanh", {"min": float(m.min_val), "max": float(m.max_val)}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"slope": float(m.negative_slope)}),
    nn.ELU: lambda m: ("elu", {"alpha": float(m.alpha)}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.Hardswish: lambda m: ("hardswish", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
    nn.Softplus: lambda m: ("softplus", {"beta": float(m.beta)}),
    nn.Mish: lambda m: ("mish", {}),
}


@layer(*ACTIVATIONS)
def _activation(b: Builder, m: nn.Module, qual: str, input: Val) -> Val:
    op, attrs = ACTIVATIONS[type(m)](m)
    if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and (attrs["min"], attrs["max"]) == (0.0, 6.0)):
        op, attrs = "relu6", {}
    return b.emit(op, [input], input.shape, input.batched, attrs, name=qual)


@layer(nn.Identity)
def _identity(b: Builder, m: nn.Module, qual: str, input: Val, *_: Any, **__: Any) -> Val:
    return input


@layer(nn.Softmax, nn.LogSoftmax)
def _softmax(b: Builder, m: nn.Softmax, qual: str, input: Val) -> Val:
    dim = -1 if m.dim is None else m.dim
    op = "softmax" if isinstance(m, nn.Softmax) else "log_softmax"
    axis = input.axis(dim)
    if axis == 0:
        raise b.fail(f"{type(m).__name__} over the batch axis mixes samples")
    return b.emit(op, [input], input.shape, input.batched, {"axis": axis}, name=qual)


@layer(nn.Flatten, nn.Unflatten)
def _flatten(b: Builder, m: nn.Module, qual: str, input: Val) -> Val:
    out = b.observed
    assert out is not None
    if out.batched != input.batched:
        raise b.fail(f"{type(m).__name__} across the batch axis mixes samples")
    return b.reshape(input, out.shape, name=qual)


# ------------------------------------------------------------------ pooling and resampling


def maxpool_node(b: Builder, x: Val, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool,
                 name: str | None) -> Val:
    k = _ints(kernel, 2)
    attrs = {"kernel": k, "stride": _ints(stride or kernel, 2), "padding": _ints(padding, 2),
             "dilation": _ints(dilation, 2), "ceil_mode": bool(ceil_mode)}
    out = b.observed
    assert out is not None
    return b.emit("maxpool2d", [x], out.shape, True, attrs, name=name)


def avgpool_node(b: Builder, x: Val, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                 count_include_pad: bool, name: str | None, shape: tuple[int, ...] | None = None) -> Val:
    attrs = {"kernel": _ints(kernel, 2), "stride": _ints(stride or kernel, 2), "padding": _ints(padding, 2),
             "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad)}
    out = b.observed
    assert out is not None
    return b.emit("avgpool2d", [x], shape or out.shape, True, attrs, name=name)


def adaptive_node(b: Builder, x: Val, output_size: Any, kind: str, name: str | None) -> Val:
    """Adaptive pooling: a global pool, a plain pool where bins are equal, else (average only) a
    constant averaging matrix."""
    c, h, w = x.shape
    out = b.observed
    assert out is not None
    oh, ow = out.shape[1:]
    if kind == "avg" and (oh, ow) == (1, 1):
        return b.emit("global_avgpool", [x], out.shape, True, name=name)
    if h % oh == 0 and w % ow == 0:
        k = [h // oh, w // ow]
        if kind == "max":
            return maxpool_node(b, x, k, k, 0, 1, False, name)
        return avgpool_node(b, x, k, k, 0, False, True, name)
    if kind == "max":
        raise b.fail(f"adaptive max pooling from {h}x{w} to {oh}x{ow} (unequal bins) is not supported")
    return b.emit("adaptive_avgpool2d", [x], out.shape, True, {"output_size": [oh, ow]}, name=name)


@layer(nn.MaxPool2d)
def _maxpool(b: Builder, m: nn.MaxPool2d, qual: str, input: Val) -> Val:
    if m.return_indices:
        raise b.fail("MaxPool2d(return_indices=True) is not supported")
    return maxpool_node(b, input, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, qual)


@layer(nn.AvgPool2d)
def _avgpool(b: Builder, m: nn.AvgPool2d, qual: str, input: Val) -> Val:
    if m.divisor_override is not None:
        raise b.fail("AvgPool2d(divisor_override=...) is not supported")
    return avgpool_node(b, input, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, qual)


@layer(nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
def _adaptive(b: Builder, m: nn.Module, qual: str, input: Val) -> Val:
    if getattr(m, "return_indices", False):
        raise b.fail("AdaptiveMaxPool2d(return_indices=True) is not supported")
    return adaptive_node(b, input, m.output_size, "max" if isinstance(m, nn.AdaptiveMaxPool2d) else "avg", qual)


def upsample_node(b: Builder, x: Val, mode: str, name: str | None) -> Val:
    out = b.observed
    assert out is not None
    if mode != "nearest" or len(x.shape) != 3:
        raise b.fail(f"upsampling is supported in 'nearest' mode on (C, H, W) maps, not {mode!r}")
    (h, w), (oh, ow) = x.shape[1:], out.shape[1:]
    if oh % h or ow % w:
        raise b.fail(f"nearest upsampling from {h}x{w} to {oh}x{ow} is not by whole factors")
    return b.emit("upsample_nearest", [x], out.shape, True, {"scale": [oh // h, ow // w]}, name=name)


@layer(nn.Upsample)
def _upsample(b: Builder, m: nn.Upsample, qual: str, input: Val) -> Val:
    return upsample_node(b, input, m.mode, qual)


@converts(F.max_pool2d)
def _f_maxpool(b: Builder, input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False, return_indices: bool = False) -> Val:
    if return_indices:
        raise b.fail("max_pool2d(return_indices=True) is not supported")
    return maxpool_node(b, b.value(input), kernel_size, stride, padding, dilation, ceil_mode, None)


@converts(F.avg_pool2d)
def _f_avgpool(b: Builder, input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: Any = None) -> Val:
    if divisor_override is not None:
        raise b.fail("avg_pool2d(divisor_override=...) is not supported")
    return avgpool_node(b, b.value(input), kernel_size, stride, padding, ceil_mode, count_include_pad, None)


@converts(F.adaptive_avg_pool2d)
def _f_adaptive_avg(b: Builder, input: Any, output_size: Any) -> Val:
    return adaptive_node(b, b.value(input), output_size, "avg", None)


@converts(F.adaptive_max_pool2d)
def _f_adaptive_max(b: Builder, input: Any, output_size: Any, return_indices: bool = False) -> Val:
    return adaptive_node(b, b.value(input), output_size, "max", None)


@converts(F.interpolate)
def _f_interpolate(b: Builder, input: Any, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                   align_corners: Any = None, recompute_scale_factor: Any = None, antialias: bool = False) -> Val:
    return upsample_node(b, b.value(input), mode, None)


# ------------------------------------------------------------------ dropout


def dropout_node(b: Builder, x: Val, p: float, per_sample: bool, name: str | None) -> Val:
    """Dropout (or drop-path: one draw per sample) with a mask the runtime draws and feeds."""
    if not 0.0 <= p < 1.0:
        raise b.fail(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    if not x.batched:
        raise b.fail("dropout on a weight-derived value is not supported")
    return b.emit("dropout", [x], x.shape, True, {"p": float(p), "per_sample": per_sample}, name=name)


@layer(nn.Dropout)
def _dropout(b: Builder, m: nn.Dropout, qual: str, input: Val) -> Val:
    return dropout_node(b, input, float(m.p), False, qual)


@converts(F.dropout)
def _f_dropout(b: Builder, input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Val:
    x = b.value(input)
    return dropout_node(b, x, float(p), False, None) if training else x


def drop_path_layer(b: Builder, m: nn.Module, qual: str, input: Val) -> Val:
    """timm's DropPath (``drop_prob``) and torchvision's StochasticDepth (``p``, mode 'row')."""
    if getattr(m, "mode", "row") != "row":
        raise b.fail("StochasticDepth(mode='batch') drops whole batches; only mode='row' is supported")
    p = getattr(m, "drop_prob", getattr(m, "p", None))
    if p is None:
        raise b.fail(f"{type(m).__name__} has no drop_prob or p attribute")
    return dropout_node(b, input, float(p), True, qual)


# ------------------------------------------------------------------ attention


@layer(nn.MultiheadAttention)
def _mha(b: Builder, m: nn.MultiheadAttention, qual: str, query: Val, key: Val, value: Val,
         key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
         average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Val, None]:
    """Self-attention as per-sample operations; the attention weights output is not supported."""
    if not m.batch_first:
        raise b.fail("MultiheadAttention needs batch_first=True (the batch must be the first axis)")
    if not (query is key is value):
        raise b.fail("only self-attention (query is key is value) is supported")
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise b.fail("attention masks are not supported")
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise b.fail("MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn is not supported")
    if m.dropout:
        raise b.fail("attention dropout is not supported (dropout=0.0 is)")
    return self_attention(b, m, qual, query), None


def self_attention(b: Builder, m: nn.MultiheadAttention, qual: str, x: Val) -> Val:
    length, e = x.shape
    h = m.num_heads
    qkv = linear_node(b, x, f"{qual}.in_proj_weight", f"{qual}.in_proj_bias" if m.in_proj_bias is not None else None,
                      m.in_proj_weight.shape, name=f"{qual}.in_proj")
    heads = []
    for i in range(3):
        part = b.reshape(slice_axis(b, qkv, 2, i * e, (i + 1) * e), (length, h, e // h))
        heads.append(b.emit("transpose", [part], (h, length, e // h), True, {"perm": [0, 2, 1, 3]}))
    ctx = attention(b, heads[0], heads[1], heads[2], None)
    ctx = b.reshape(b.emit("transpose", [ctx], (length, h, e // h), True, {"perm": [0, 2, 1, 3]}), (length, e))
    out = m.out_proj
    return linear_node(b, ctx, f"{qual}.out_proj.weight", f"{qual}.out_proj.bias" if out.bias is not None else None,
                       out.weight.shape, name=f"{qual}.out_proj")


@layer(nn.TransformerEncoderLayer)
def _encoder_layer(b: Builder, m: nn.TransformerEncoderLayer, qual: str, src: Val, src_mask: Any = None,
                   src_key_padding_mask: Any = None, is_causal: bool = False) -> Val:
    if src_mask is not None or src_key_padding_mask is not None or is_causal:
        raise b.fail("TransformerEncoderLayer masks are not supported")
    return encoder_layer(b, m, qual, src)


def encoder_layer(b: Builder, m: nn.TransformerEncoderLayer, qual: str, x: Val) -> Val:
    """x + SA(LN(x)), x + FF(LN(x)) (norm_first) or LN(x + SA(x)), LN(x + FF(x))."""
    attn = m.self_attn
    if not attn.batch_first:
        raise b.fail("TransformerEncoderLayer needs batch_first=True (the batch must be the first axis)")
    if attn.dropout:
        raise b.fail(f"dropout inside the attention (TransformerEncoderLayer(dropout={attn.dropout})) is not "
                     f"supported: build the layer with dropout=0.0 (dropout before and after it, as nn.Dropout "
                     f"layers of your own, is)")
    if not attn._qkv_same_embed_dim or attn.bias_k is not None:
        raise b.fail("TransformerEncoderLayer attention with kdim/vdim or add_bias_kv is not supported")
    act = m.activation
    name = getattr(act, "__name__", type(act).__name__).lower()
    op = {"relu": "relu", "gelu": "gelu"}.get(name)
    if op is None:
        raise b.fail(f"TransformerEncoderLayer activation {name!r} is not supported (relu, gelu are)")

    def norm(v: Val, which: str) -> Val:
        ln = getattr(m, which)
        return layernorm_node(b, v, list(ln.normalized_shape), ln.eps,
                              _params(f"{qual}.{which}", ln, ("weight", "bias")), f"{qual}.{which}")

    def sa(v: Val) -> Val:
        return dropout_node(b, self_attention(b, attn, f"{qual}.self_attn", v), float(m.dropout1.p), False, None)

    def ff(v: Val) -> Val:
        l1, l2 = m.linear1, m.linear2
        hdn = linear_node(b, v, f"{qual}.linear1.weight", f"{qual}.linear1.bias" if l1.bias is not None else None,
                          l1.weight.shape, f"{qual}.linear1")
        hdn = dropout_node(b, b.emit(op, [hdn], hdn.shape, True, {"approximate": "none"} if op == "gelu" else {}),
                           float(m.dropout.p), False, None)
        out = linear_node(b, hdn, f"{qual}.linear2.weight", f"{qual}.linear2.bias" if l2.bias is not None else None,
                          l2.weight.shape, f"{qual}.linear2")
        return dropout_node(b, out, float(m.dropout2.p), False, None)

    def add(u: Val, v: Val) -> Val:
        return b.emit("add", [u, v], u.shape, True)

    if m.norm_first:
        x = add(x, sa(norm(x, "norm1")))
        return add(x, ff(norm(x, "norm2")))
    x = norm(add(x, sa(x)), "norm1")
    return norm(add(x, ff(x)), "norm2")


@layer(nn.TransformerEncoder)
def _encoder(b: Builder, m: nn.TransformerEncoder, qual: str, src: Val, mask: Any = None,
             src_key_padding_mask: Any = None, is_causal: Any = None) -> Val:
    if mask is not None or src_key_padding_mask is not None or is_causal:
        raise b.fail("TransformerEncoder masks are not supported")
    x = src
    for i, sub in enumerate(m.layers):
        x = encoder_layer(b, sub, f"{qual}.layers.{i}", x)
    norm = m.norm
    if isinstance(norm, nn.LayerNorm):
        x = layernorm_node(b, x, list(norm.normalized_shape), norm.eps,
                           _params(f"{qual}.norm", norm, ("weight", "bias")), f"{qual}.norm")
    elif norm is not None:
        raise b.fail(f"TransformerEncoder norm {type(norm).__name__} is not supported (LayerNorm is)")
    return x


# ------------------------------------------------------------------ layers called as functions


def layer_weight(b: Builder, w: Any, what: str) -> str | None:
    if w is None:
        return None
    if not isinstance(w, ParamRef):
        raise b.fail(f"the {what} must be a parameter of the model (a computed {what} has no layer rule)")
    return w.qualname


@converts(F.linear)
def _f_linear(b: Builder, input: Any, weight: Any, bias: Any = None) -> Val:
    return linear_node(b, b.value(input), layer_weight(b, weight, "weight"), layer_weight(b, bias, "bias"),
                       weight.shape, name=None)


@converts(F.conv1d, F.conv2d)
def _f_conv(b: Builder, input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
          dilation: Any = 1, groups: int = 1) -> Val:
    return conv_node(b, b.value(input), layer_weight(b, weight, "weight"), layer_weight(b, bias, "bias"),
                     weight.shape, stride, padding, dilation, groups, name=None)


@converts(F.layer_norm)
def _layer_norm(b: Builder, input: Any, normalized_shape: Sequence[int], weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> Val:
    params = {k: q for k, q in (("weight", layer_weight(b, weight, "weight")), ("bias", layer_weight(b, bias, "bias")))
              if q}
    return layernorm_node(b, b.value(input), list(normalized_shape), eps, params, name=None)


@converts(F.group_norm)
def _group_norm(b: Builder, input: Any, num_groups: int, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> Val:
    return groupnorm_nodes(b, b.value(input), num_groups, eps, weight, bias)


LAYER_TYPES: tuple[type, ...] = tuple(LAYERS)
