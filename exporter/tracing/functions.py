"""Converters for torch functions and tensor methods: each takes the call's own arguments (tensors
as program values) and emits the nodes that compute it (builder.Builder).

A converter's signature mirrors the torch function's, so arguments bind as torch binds them.
Shapes come from the traced run (``b.observed``) where torch's argument would name the batch
size, so nothing bakes in the batch.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from asyncfgd.runtime.dual.program import BATCH_REF

from .builder import BatchSized, Builder, UnsupportedLayerError, Val

Converter = Callable[..., Any]
FUNCTIONS: dict[Any, Converter] = {}
METHODS: dict[str, Converter] = {}


def converts(*targets: Any) -> Callable[[Converter], Converter]:
    """Register a converter for functions (callables) and tensor methods (names)."""
    def register(fn: Converter) -> Converter:
        for t in targets:
            (METHODS if isinstance(t, str) else FUNCTIONS)[t] = fn
        return fn
    return register


def _no_batch_arg(b: Builder, **named: Any) -> None:
    for k, v in named.items():
        if isinstance(v, BatchSized):
            raise b.fail(f"argument {k} depends on the batch size")


# ------------------------------------------------------------------ element-wise


def _unary(op: str, **fixed: Any) -> Converter:
    def convert(b: Builder, input: Any, *_: Any, **__: Any) -> Val:
        x = b.value(input)
        return b.emit(op, [x], x.shape, x.batched, fixed)
    return convert


for _op, _targets in {
    "relu": (F.relu, torch.relu, "relu", "relu_", F.relu_),
    "relu6": (F.relu6,),
    "silu": (F.silu,),
    "sigmoid": (torch.sigmoid, F.sigmoid, "sigmoid"),
    "tanh": (torch.tanh, F.tanh, "tanh"),
    "hardswish": (F.hardswish,),
    "hardsigmoid": (F.hardsigmoid,),
    "mish": (F.mish,),
    "exp": (torch.exp, "exp"),
    "log": (torch.log, "log"),
    "sqrt": (torch.sqrt, "sqrt"),
    "rsqrt": (torch.rsqrt, "rsqrt"),
    "detach": ("detach", torch.detach),
    "neg": (operator.neg, torch.neg, "neg"),
    "abs": (torch.abs, "abs", operator.abs),
}.items():
    converts(*_targets)(_unary(_op))


@converts("contiguous", "clone", "float", operator.pos)
def _same(b: Builder, input: Any, *_: Any, **__: Any) -> Val:
    """Copies and no-op conversions: the value itself."""
    return b.value(input)


@converts(F.hardtanh)
def _hardtanh(b: Builder, input: Any, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> Val:
    x = b.value(input)
    return b.emit("hardtanh", [x], x.shape, x.batched, {"min": float(min_val), "max": float(max_val)})


#: a bound larger than any float32, for a one-sided clamp
_UNBOUNDED = 3.0e38


@converts(torch.clamp, "clamp", "clip", torch.clip)
def _clamp(b: Builder, input: Any, min: Any = None, max: Any = None) -> Val:
    if not all(v is None or isinstance(v, (int, float)) for v in (min, max)) or (min is None and max is None):
        raise b.fail("clamp is supported with number bounds")
    x = b.value(input)
    lo = -_UNBOUNDED if min is None else float(min)
    hi = _UNBOUNDED if max is None else float(max)
    return b.emit("hardtanh", [x], x.shape, x.batched, {"min": lo, "max": hi})


@converts(F.leaky_relu)
def _leaky_relu(b: Builder, input: Any, negative_slope: float = 0.01, inplace: bool = False) -> Val:
    x = b.value(input)
    return b.emit("leaky_relu", [x], x.shape, x.batched, {"slope": float(negative_slope)})


@converts(F.elu)
def _elu(b: Builder, input: Any, alpha: float = 1.0, inplace: bool = False) -> Val:
    x = b.value(input)
    return b.emit("elu", [x], x.shape, x.batched, {"alpha": float(alpha)})


@converts(F.gelu)
def _gelu(b: Builder, input: Any, approximate: str = "none") -> Val:
    x = b.value(input)
    return b.emit("gelu", [x], x.shape, x.batched, {"approximate": approximate})


@converts(F.softplus)
def _softplus(b: Builder, input: Any, beta: float = 1.0, threshold: float = 20.0) -> Val:
    x = b.value(input)
    return b.emit("softplus", [x], x.shape, x.batched, {"beta": float(beta)})


@converts(operator.pow, torch.pow, "pow")
def _pow(b: Builder, input: Any, exponent: Any) -> Val:
    if not isinstance(exponent, (int, float)) or isinstance(input, (int, float)):
        raise b.fail("only a tensor raised to a constant number is supported")
    x = b.value(input)
    return b.emit("pow", [x], x.shape, x.batched, {"exponent": float(exponent)})


# ------------------------------------------------------------------ arithmetic


def binary(b: Builder, op: str, a: Any, c: Any) -> Val:
    """a ∘ c with torch's broadcasting; a number on either side becomes the node's ``scalar``."""
    _no_batch_arg(b, other=c, input=a)
    if isinstance(a, (int, float)) and isinstance(c, (int, float)):
        raise b.fail("an operation on two numbers is not a tensor operation")
    for k, s in (("scalar_first", a), ("scalar", c)):
        if isinstance(s, (int, float)):
            x = b.value(c if k == "scalar_first" else a)
            if op == "div" and k == "scalar":  # x / k as x · (1/k) would round differently: keep the division
                return b.emit(op, [x], x.shape, x.batched, {"scalar": float(s)})
            return b.emit(op, [x], x.shape, x.batched, {"scalar": float(s), "scalar_first": k == "scalar_first"})
    x, y = b.value(a), b.value(c)
    out = b.observed
    assert out is not None
    x, y = b.align(x, out.torch_rank, out.batched), b.align(y, out.torch_rank, out.batched)
    return b.emit(op, [x, y], out.shape, out.batched)


@converts(operator.add, operator.iadd, torch.add, "add", "add_")
def _add(b: Builder, input: Any, other: Any, alpha: float = 1) -> Val:
    if alpha != 1:
        raise b.fail("add with alpha != 1 is not supported; write a + alpha * b")
    return binary(b, "add", input, other)


@converts(operator.sub, operator.isub, torch.sub, "sub", "sub_")
def _sub(b: Builder, input: Any, other: Any, alpha: float = 1) -> Val:
    if alpha != 1:
        raise b.fail("sub with alpha != 1 is not supported; write a - alpha * b")
    return binary(b, "sub", input, other)


@converts(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def _mul(b: Builder, input: Any, other: Any) -> Val:
    return binary(b, "mul", input, other)


@converts(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def _div(b: Builder, input: Any, other: Any, rounding_mode: str | None = None) -> Val:
    if rounding_mode is not None:
        raise b.fail("division with rounding has no derivative")
    return binary(b, "div", input, other)


# ------------------------------------------------------------------ shapes and layout


def _view_like(b: Builder, input: Any, *_: Any, **__: Any) -> Val:
    """Any reshaping (view, reshape, flatten, squeeze, unsqueeze, unflatten): to the traced shape."""
    x, out = b.value(input), b.observed
    assert out is not None
    if out.batched != x.batched:
        raise b.fail("this reshape would tie the batch size to the weights")
    return b.reshape(x, out.shape)


converts("view", "reshape", torch.reshape, "flatten", torch.flatten, "squeeze", torch.squeeze, "unsqueeze",
         torch.unsqueeze, "unflatten", torch.unflatten, "view_as", "reshape_as")(_view_like)


@converts("permute", torch.permute)
def _permute(b: Builder, input: Any, *dims: Any) -> Val:
    x = b.value(input)
    order = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
    return _transpose_to(b, x, [d % x.torch_rank for d in order])


@converts("transpose", torch.transpose, "swapaxes", torch.swapaxes)
def _transpose(b: Builder, input: Any, dim0: int, dim1: int) -> Val:
    x = b.value(input)
    order = list(range(x.torch_rank))
    i, j = dim0 % x.torch_rank, dim1 % x.torch_rank
    order[i], order[j] = order[j], order[i]
    return _transpose_to(b, x, order)


def _transpose_to(b: Builder, x: Val, order: list[int]) -> Val:
    """Permute by torch dims ``order``; the batch axis must stay first."""
    if order == list(range(x.torch_rank)):
        return x
    if x.batched:
        if order[0] != 0:
            raise b.fail("this permutation moves the batch axis; keep the batch first "
                         "(e.g. transpose(1, 2) instead of permute(1, 0, 2))")
        perm = order
    else:
        perm = [0, *[d + 1 for d in order]]
    full = (1, *x.shape) if not x.batched else (-1, *x.shape)
    shape = tuple(full[p] for p in perm)[1:]
    return b.emit("transpose", [x], shape, x.batched, {"perm": perm})


@converts("expand", "expand_as", torch.broadcast_to)
def _expand(b: Builder, input: Any, *_: Any, **__: Any) -> Val:
    x, out = b.value(input), b.observed
    assert out is not None
    if not out.batched:
        return x if out.shape == x.shape else b.emit("expand", [x], out.shape, False, {"shape": list(out.shape)})
    if not x.batched:  # a weight repeated for every sample (a class token)
        x = b.align(x, out.torch_rank, True)
        if x.shape != out.shape:
            x = b.emit("expand", [x], out.shape, False, {"shape": list(out.shape)})
        return b.emit("expand_batch", [x, BATCH_REF], out.shape, True)
    return x if out.shape == x.shape else b.emit("expand", [x], out.shape, True, {"shape": list(out.shape)})


def slice_axis(b: Builder, x: Val, axis: int, start: int, stop: int, step: int = 1) -> Val:
    """x's layout ``axis`` sliced [start:stop:step] (normalised to the axis length)."""
    size = x.shape[axis - 1]
    start, stop, step = slice(start, stop, step).indices(size)
    if (start, stop, step) == (0, size, 1):
        return x
    shape = list(x.shape)
    shape[axis - 1] = len(range(start, stop, step))
    return b.emit("slice", [x], tuple(shape), x.batched, {"axis": axis, "start": start, "end": stop, "step": step})


def _check_axis(b: Builder, x: Val, dim: int) -> int:
    axis = x.axis(dim)
    if axis == 0:
        raise b.fail("this operation would work across the batch axis; operations must act per sample")
    return axis


@converts(operator.getitem)
def _getitem(b: Builder, obj: Any, index: Any) -> Any:
    """Tuples (chunk, split, a layer's outputs) pick an element; tensors take basic indexing."""
    if isinstance(obj, (tuple, list)):
        return obj[index]
    x = b.value(obj)
    idx = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        fill = x.torch_rank - (len(idx) - 1 - sum(i is None for i in idx))
        idx = idx[:k] + [slice(None)] * fill + idx[k + 1:]
    dim, squeeze = 0, False
    for i in idx:
        if i is None:
            continue
        if isinstance(i, BatchSized) or not isinstance(i, (int, slice)):
            raise b.fail(f"indexing with {type(i).__name__} is not supported (only ints, slices, None, ...)")
        axis = x.axis(dim)
        if axis == 0:
            if i != slice(None):
                raise b.fail("indexing the batch axis picks samples; index per sample (x[:, ...])")
        elif isinstance(i, int):
            x = slice_axis(b, x, axis, i, i + 1 if i != -1 else x.shape[axis - 1])
            squeeze = True
        else:
            x = slice_axis(b, x, axis, *_slice_bounds(i))
        dim += 1
    out = b.observed
    assert out is not None
    return b.reshape(x, out.shape) if squeeze or any(i is None for i in idx) else x


def _slice_bounds(s: slice) -> tuple[int, int, int]:
    return (0 if s.start is None else s.start, (1 << 62) if s.stop is None else s.stop, s.step or 1)


@converts(torch.cat, torch.concat, torch.concatenate)
def _cat(b: Builder, tensors: Sequence[Any], dim: int = 0) -> Val:
    xs = [b.value(t) for t in tensors]
    out = b.observed
    assert out is not None
    if len({x.batched for x in xs}) > 1:
        raise b.fail("cat of per-sample and weight-derived tensors; expand the weight to the batch first")
    axis = _check_axis(b, xs[0], dim)
    return xs[0] if len(xs) == 1 else b.emit("cat", xs, out.shape, out.batched, {"axis": axis})


@converts(torch.stack)
def _stack(b: Builder, tensors: Sequence[Any], dim: int = 0) -> Val:
    xs = [b.value(t) for t in tensors]
    out = b.observed
    assert out is not None
    axis = Val("", out.shape, out.batched).axis(dim)
    if axis == 0:
        raise b.fail("stack along the batch axis mixes samples")
    parts = [b.reshape(x, x.shape[:axis - 1] + (1,) + x.shape[axis - 1:]) for x in xs]
    return b.emit("cat", parts, out.shape, out.batched, {"axis": axis})


def _pieces(b: Builder, x: Val, axis: int, sizes: list[int]) -> tuple[Val, ...]:
    out, start = [], 0
    for n in sizes:
        out.append(slice_axis(b, x, axis, start, start + n))
        start += n
    return tuple(out)


@converts("chunk", torch.chunk)
def _chunk(b: Builder, input: Any, chunks: int, dim: int = 0) -> tuple[Val, ...]:
    x = b.value(input)
    axis = _check_axis(b, x, dim)
    size = x.shape[axis - 1]
    step = -(-size // chunks)
    return _pieces(b, x, axis, [min(step, size - s) for s in range(0, size, step)])


@converts("split", torch.split)
def _split(b: Builder, tensor: Any, split_size_or_sections: Any, dim: int = 0) -> tuple[Val, ...]:
    x = b.value(tensor)
    axis = _check_axis(b, x, dim)
    size = x.shape[axis - 1]
    if isinstance(split_size_or_sections, int):
        k = split_size_or_sections
        return _pieces(b, x, axis, [min(k, size - s) for s in range(0, size, k)])
    return _pieces(b, x, axis, list(split_size_or_sections))


@converts("unbind", torch.unbind)
def _unbind(b: Builder, input: Any, dim: int = 0) -> tuple[Val, ...]:
    x = b.value(input)
    axis = _check_axis(b, x, dim)
    shape = x.shape[:axis - 1] + x.shape[axis:]
    return tuple(b.reshape(p, shape) for p in _pieces(b, x, axis, [1] * x.shape[axis - 1]))


# ------------------------------------------------------------------ reductions and products


def _reduce(op: str) -> Converter:
    def convert(b: Builder, input: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Val:
        x = b.value(input)
        if dim is None or dim == ():
            if x.batched:
                raise b.fail(f"{op} over all axes includes the batch; give the per-sample dims")
            dims = list(range(x.torch_rank))
        else:
            dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
        axes = sorted(_check_axis(b, x, d) for d in dims)
        out = b.observed
        assert out is not None
        return b.emit(op, [x], out.shape, x.batched, {"axes": axes, "keepdims": bool(keepdim)})
    return convert


converts(torch.mean, "mean")(_reduce("mean"))
converts(torch.sum, "sum")(_reduce("sum"))
converts(torch.amax, "amax")(_reduce("amax"))


@converts(operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm")
def _matmul(b: Builder, input: Any, other: Any) -> Val:
    x, y = b.value(input), b.value(other)
    out = b.observed
    assert out is not None
    if any(not v.batched and len(v.shape) < 2 for v in (x, y)) or min(len(x.shape), len(y.shape)) < 1:
        raise b.fail("matmul with a vector operand is not supported; use a (…, 1, k) matrix")
    vector = x.batched and len(x.shape) == 1  # (N, k) @ W: each sample a row vector
    if y.batched and len(y.shape) == 1:
        raise b.fail("matmul whose right operand is (batch, k) treats the batch as a matrix axis")
    if vector:
        x = b.reshape(x, (1, *x.shape))
    rank = max(x.torch_rank, y.torch_rank)
    batched = x.batched or y.batched
    x, y = b.align(x, rank, batched), b.align(y, rank, batched)
    shape = (*[max(p, q) for p, q in zip(x.shape[:-2], y.shape[:-2], strict=True)], x.shape[-2], y.shape[-1])
    res = b.emit("matmul", [x, y], shape, batched)
    return b.reshape(res, out.shape) if vector else res


@converts(F.softmax, torch.softmax, "softmax")
def _softmax(b: Builder, input: Any, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Val:
    x = b.value(input)
    return b.emit("softmax", [x], x.shape, x.batched, {"axis": _check_axis(b, x, -1 if dim is None else dim)})


@converts(F.log_softmax, torch.log_softmax, "log_softmax")
def _log_softmax(b: Builder, input: Any, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Val:
    x = b.value(input)
    return b.emit("log_softmax", [x], x.shape, x.batched, {"axis": _check_axis(b, x, -1 if dim is None else dim)})


@converts(F.scaled_dot_product_attention)
def _sdpa(b: Builder, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Val:
    """softmax(q·kᵀ·scale)·v, as the nodes that compute it."""
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise b.fail("scaled_dot_product_attention is supported without masks, dropout or GQA")
    return attention(b, b.value(query), b.value(key), b.value(value), scale)


def attention(b: Builder, q: Val, k: Val, v: Val, scale: float | None) -> Val:
    """softmax(q·kᵀ·scale)·v over the last two axes (q, k, v batched alike)."""
    d, rank = q.shape[-1], len(k.shape) + 1  # the layout's rank, batched or not
    kt = b.emit("transpose", [k], (*k.shape[:-2], k.shape[-1], k.shape[-2]), k.batched,
                {"perm": [*range(rank - 2), rank - 1, rank - 2]})
    scores = b.emit("matmul", [q, kt], (*q.shape[:-1], k.shape[-2]))
    scores = b.emit("mul", [scores], scores.shape, attrs={"scalar": 1.0 / math.sqrt(d) if scale is None else scale,
                                                          "scalar_first": False})
    probs = b.emit("softmax", [scores], scores.shape, attrs={"axis": len(scores.shape)})
    return b.emit("matmul", [probs, v], (*q.shape[:-1], v.shape[-1]))


@converts(torch.einsum)
def _einsum(b: Builder, equation: str, *operands: Any) -> Val:
    """A two-operand einsum as transposes, reshapes and one batched matmul: letters in both
    operands and the output ride as batch axes, letters in both but not the output are contracted,
    letters in one operand only are summed first (not in the output) or kept."""
    ops_ = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else list(operands)
    if len(ops_) != 2 or "..." in equation or "->" not in equation:
        raise b.fail("einsum is supported with two operands and an explicit '->' output, without '...'")
    (sa, sb), out = equation.replace(" ", "").split("->")[0].split(","), equation.replace(" ", "").split("->")[1]
    x, y = b.value(ops_[0]), b.value(ops_[1])
    letters = []
    for v, s in ((x, sa), (y, sb)):
        if len(s) != v.torch_rank or len(set(s)) != len(s):
            raise b.fail(f"einsum operand '{s}' does not match a {v.torch_rank}-d tensor (or repeats a letter)")
        letters.append(s)
    batch = {s[0] for v, s in ((x, sa), (y, sb)) if v.batched}
    if len(batch) > 1 or (batch and out[:1] not in batch):
        raise b.fail("einsum must keep the batch letter first in the output (and name it alike in both operands)")
    n = next(iter(batch), "")
    x, sa = _einsum_sum_out(b, x, sa, sb + out)
    y, sb = _einsum_sum_out(b, y, sb, sa + out)
    shared = [c for c in out if c in sa and c in sb and c != n]
    contract = [c for c in sa if c in sb and c not in out]
    only_a = [c for c in sa if c not in sb and c != n]
    only_b = [c for c in sb if c not in sa and c != n]
    sizes = {c: d for v, s in ((x, sa), (y, sb)) for c, d in zip(s, ((-1,) if v.batched else ()) + v.shape,
                                                                  strict=True)}

    def prepared(v: Val, s: str, middle: list[str], last: list[str]) -> Val:
        order = ([n] if v.batched else []) + shared + middle + last
        v = _transpose_to(b, v, [s.index(c) for c in order])
        rows = math.prod(sizes[c] for c in middle)
        cols = math.prod(sizes[c] for c in last)
        return b.reshape(v, (*[sizes[c] for c in shared], rows, cols))

    xa = prepared(x, sa, only_a, contract)
    yb = prepared(y, sb, contract, only_b)
    batched = x.batched or y.batched
    rank = max(xa.torch_rank, yb.torch_rank)
    xa, yb = b.align(xa, rank, batched), b.align(yb, rank, batched)
    prod = b.emit("matmul", [xa, yb], (*[sizes[c] for c in shared], xa.shape[-2], yb.shape[-1]), batched)
    got = shared + only_a + only_b
    res = b.reshape(prod, tuple(sizes[c] for c in got))
    order = ([n] if n else []) + got
    return _transpose_to(b, res, [order.index(c) for c in out])


def _einsum_sum_out(b: Builder, v: Val, s: str, elsewhere: str) -> tuple[Val, str]:
    """Sum over the letters that appear nowhere else (einsum's implicit reduction)."""
    gone = [i for i, c in enumerate(s) if c not in elsewhere]
    if not gone:
        return v, s
    axes = [v.axis(i) for i in gone]
    if 0 in axes:
        raise b.fail("einsum would sum over the batch axis")
    shape = tuple(d for i, d in enumerate(v.shape, start=1) if i not in axes)
    return b.emit("sum", [v], shape, v.batched, {"axes": axes, "keepdims": False}), "".join(
        c for i, c in enumerate(s) if i not in gone)


# ------------------------------------------------------------------ composites of the rules above


def _keep_shape(x: Val, axes: list[int]) -> tuple[int, ...]:
    return tuple(1 if i + 1 in axes else d for i, d in enumerate(x.shape))


def _moments(b: Builder, x: Val, dim: Any) -> tuple[list[int], Val, Val]:
    """(axes, x − mean, mean of the squared deviations) over ``dim`` (kept axes)."""
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    axes = sorted(_check_axis(b, x, d) for d in dims)
    keep = _keep_shape(x, axes)
    mean = b.emit("mean", [x], keep, x.batched, {"axes": axes, "keepdims": True})
    dev = b.emit("sub", [x, mean], x.shape, x.batched)
    sq = b.emit("mul", [dev, dev], x.shape, x.batched)
    return axes, dev, sq


def _spread(std: bool) -> Converter:
    def convert(b: Builder, input: Any, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *,
                correction: Any = None) -> Val:
        return _var(b, input, dim, unbiased, keepdim, correction, std)
    return convert


def _var(b: Builder, input: Any, dim: Any, unbiased: Any, keepdim: bool, correction: Any, std: bool) -> Val:
    """var = mean((x − mean x)²)·n/(n − correction); std = √var (over per-sample axes)."""
    x = b.value(input)
    if isinstance(dim, bool):  # torch's legacy var(x, unbiased)
        dim, unbiased = None, dim
    if dim is None:
        raise b.fail("var/std over all axes includes the batch; give the per-sample dims")
    corr = float(correction) if correction is not None else (0.0 if unbiased is False else 1.0)
    axes, _, sq = _moments(b, x, dim)
    n = math.prod(x.shape[a - 1] for a in axes)
    out = b.observed
    assert out is not None
    v = b.emit("mean", [sq], out.shape, x.batched, {"axes": axes, "keepdims": bool(keepdim)})
    if corr:
        v = b.emit("mul", [v], v.shape, attrs={"scalar": n / (n - corr), "scalar_first": False})
    return b.emit("sqrt", [v], v.shape) if std else v


converts(torch.var, "var")(_spread(std=False))
converts(torch.std, "std")(_spread(std=True))


@converts(F.normalize)
def _normalize(b: Builder, input: Any, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Any = None) -> Val:
    """x / max(‖x‖₂, eps) along ``dim``."""
    if p != 2.0 or out is not None:
        raise b.fail("F.normalize is supported with p=2")
    x = b.value(input)
    axis = _check_axis(b, x, dim)
    keep = _keep_shape(x, [axis])
    sq = b.emit("mul", [x, x], x.shape, x.batched)
    norm = b.emit("sqrt", [b.emit("sum", [sq], keep, x.batched, {"axes": [axis], "keepdims": True})], keep)
    norm = b.emit("hardtanh", [norm], keep, attrs={"min": float(eps), "max": _UNBOUNDED})
    return b.emit("div", [x, norm], x.shape, x.batched)


class _MaxResult(tuple):
    """``torch.max(x, dim)``'s (values, indices): the values only (indices have no rule)."""

    @property
    def values(self) -> Val:
        return self[0]

    @property
    def indices(self) -> Any:
        raise UnsupportedLayerError("the indices of max(dim) are not supported (their values are)")


@converts(torch.max, "max")
def _max(b: Builder, input: Any, dim: Any = None, keepdim: bool = False) -> Any:
    if dim is None or not isinstance(dim, int):
        raise b.fail("max is supported as max(x, dim) (its values) or amax; the max of all elements or of two "
                     "tensors is not")
    x = b.value(input)
    axis = _check_axis(b, x, dim)
    shape = _keep_shape(x, [axis]) if keepdim else tuple(d for i, d in enumerate(x.shape) if i + 1 != axis)
    return _MaxResult((b.emit("amax", [x], shape, x.batched, {"axes": [axis], "keepdims": bool(keepdim)}), None))


@converts(getattr)
def _getattr(b: Builder, obj: Any, name: str) -> Any:
    if isinstance(obj, Val):
        raise b.fail(f"tensor attribute '.{name}' has no rule")
    return getattr(obj, name)


@converts(F.pad)
def _pad(b: Builder, input: Any, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Val:
    """Constant padding of the last one or two axes."""
    if mode != "constant" or len(pad) not in (2, 4) or any(p < 0 for p in pad):
        raise b.fail("F.pad is supported in 'constant' mode on the last one or two axes, without cropping")
    x = b.value(input)
    left, right, top, bottom = (*pad, 0, 0)[:4]
    if len(x.shape) < 2:
        x = b.reshape(x, (1, *x.shape))
    out = b.observed
    assert out is not None
    shape = (*x.shape[:-2], x.shape[-2] + top + bottom, x.shape[-1] + left + right)
    y = b.emit("pad", [x], shape, x.batched, {"pads": [top, left, bottom, right], "value": float(value or 0.0)})
    return b.reshape(y, out.shape)


def _filled(b: Builder, input: Any, value: float) -> Val:
    x = b.value(input)
    c = b.emit("fill", [], x.shape, False, {"value": float(value)})
    return b.emit("expand_batch", [c, BATCH_REF], x.shape, True) if x.batched else c


@converts(torch.zeros_like, "new_zeros")
def _zeros_like(b: Builder, input: Any, *_: Any, **__: Any) -> Val:
    return _filled(b, input, 0.0)


@converts(torch.ones_like)
def _ones_like(b: Builder, input: Any, *_: Any, **__: Any) -> Val:
    return _filled(b, input, 1.0)


@converts(torch.full_like)
def _full_like(b: Builder, input: Any, fill_value: float, *_: Any, **__: Any) -> Val:
    return _filled(b, input, fill_value)
