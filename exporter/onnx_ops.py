"""Records the dual rules' op vocabulary (``asyncfgd.runtime.dual.ops.Ops``) as ONNX nodes.

Emitting ONNX ourselves, instead of tracing torch, is what keeps the graphs correct and fast:
torch's ONNX exporters were measured to drop or corrupt forward-mode tangents silently, bake the
batch size in, and emit ops TensorRT rejects (docs/artifacts.md, "Why the graphs are emitted, not
traced"). The op set here is deliberately limited to ops TensorRT 10's ONNX parser supports.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from asyncfgd.runtime.contract import OPSET
from asyncfgd.runtime.dual.ops import window_out


@dataclass
class OnnxValue:
    """A tensor in the graph under construction: its name and its shape (-1 = batch / unknown)."""

    name: str
    shape: tuple[int, ...]


class OnnxOps:
    """Records the vocabulary as ONNX nodes (opset 17). Shapes are tracked so rules can reshape."""

    def __init__(self, graph_name: str) -> None:
        self.graph_name = graph_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._ids = itertools.count()
        self._consts: dict[tuple, OnnxValue] = {}
        self._widened: dict[tuple, OnnxValue] = {}
        self._exact: set[str] = set()  # masks: every element is 0 or 2^k with k >= 0
        self._masked: dict[str, tuple[OnnxValue, OnnxValue]] = {}  # Mul output -> (value, exact factor)
        self._computed: dict[tuple, OnnxValue] = {}  # (op, inputs, attributes) -> its output

    # -- graph plumbing -------------------------------------------------------------------
    def _fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def _node(self, op: str, inputs: Sequence[str], shape: tuple[int, ...], hint: str | None = None,
              **attrs: Any) -> OnnxValue:
        """One node, or the existing one that computes the same (rules may ask for a value twice)."""
        key = (op, tuple(inputs), repr(sorted(attrs.items())))
        if key in self._computed:
            return self._computed[key]
        out = self._fresh(hint or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        self._computed[key] = OnnxValue(out, tuple(shape))
        return self._computed[key]

    def input(self, name: str, shape: Sequence[int], dtype: int = TensorProto.FLOAT) -> OnnxValue:
        dims = ["N" if d == -1 else d for d in shape]
        self.inputs.append(helper.make_tensor_value_info(name, dtype, dims))
        return OnnxValue(name, tuple(shape))

    def initializer(self, name: str, value: np.ndarray) -> OnnxValue:
        """A named float32 constant (a weight baked into an inference graph)."""
        arr = np.asarray(value, dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return OnnxValue(name, tuple(arr.shape))

    def output(self, name: str, v: OnnxValue) -> None:
        """Expose ``v`` as graph output ``name``: renames the producer's output (an Identity would copy)."""
        producer = next((n for n in self.nodes if v.name in n.output), None)
        taken = {o.name for o in self.outputs} | {i.name for i in self.inputs}
        if producer is None or v.name in taken:
            self.nodes.append(helper.make_node("Identity", [v.name], [name], name=f"out_{name}"))
        else:
            for n in self.nodes:
                n.input[:] = [name if i == v.name else i for i in n.input]
                n.output[:] = [name if o == v.name else o for o in n.output]
        dims = ["N" if d == -1 else d for d in v.shape]
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))

    def model(self) -> onnx.ModelProto:
        self._prune()
        graph = helper.make_graph(self.nodes, self.graph_name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="asyncfgd")
        m.ir_version = 8  # readable by ORT >= 1.10 and TensorRT 10
        return m

    def _prune(self) -> None:
        """Drop nodes no output depends on (left behind when ``mul`` re-associates mask products)."""
        needed = {o.name for o in self.outputs}
        kept = []
        for n in reversed(self.nodes):
            if any(o in needed for o in n.output):
                kept.append(n)
                needed.update(n.input)
        self.nodes = kept[::-1]
        self.initializers = [t for t in self.initializers if t.name in needed]

    def _array_const(self, arr: np.ndarray, hint: str) -> OnnxValue:
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._fresh(hint)
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = OnnxValue(name, tuple(arr.shape))
        return self._consts[key]

    def _ints(self, values: Sequence[int]) -> OnnxValue:
        return self._array_const(np.asarray(values, dtype=np.int64), "ints")

    # -- the vocabulary ------------------------------------------------------------------
    def shape(self, x: OnnxValue) -> tuple[int, ...]:
        return x.shape

    def const(self, value: np.ndarray | float) -> OnnxValue:
        arr = np.asarray(value, dtype=np.float32)
        v = self._array_const(arr, "c")
        mant, expo = np.frexp(arr)
        if np.all((arr == 0) | ((mant == 0.5) & (expo >= 1))):  # 0 or 2^k, k >= 0: products stay exact
            self._exact.add(v.name)
        return v

    def _binary(self, op: str, a: OnnxValue, b: OnnxValue) -> OnnxValue:
        out = _broadcast(a.shape, b.shape)
        return self._node(op, [self._widen(a, out).name, self._widen(b, out).name], out)

    def _widen(self, v: OnnxValue, out: tuple[int, ...]) -> OnnxValue:
        """``v`` expanded over the short trailing axes it would be broadcast along, if that is cheap.

        ONNX Runtime broadcasts a per-channel (…, C, 1, 1) operand one H·W span at a time; for
        spans of 4–64 elements that runs 1.7–8× slower than a plain element-wise pass (measured
        in docs/performance.md). Expanding the small operand to (…, C, H, W) once, a few thousand
        elements, lets the big operation broadcast over contiguous C·H·W blocks instead. Values
        and rounding are unchanged.
        """
        shape = (1,) * (len(out) - len(v.shape)) + v.shape
        k = 0
        while k < len(out) and shape[-1 - k] == 1 and out[-1 - k] > 1:
            k += 1
        span = int(np.prod(out[len(out) - k:]))
        if k == 0 or span > _WIDEN_SPAN or -1 in shape:
            return v
        wide = (*shape[:len(out) - k], *out[len(out) - k:])
        if -1 not in out and 4 * int(np.prod(wide)) > int(np.prod(out)):
            return v  # not small next to the result: the expansion would cost a pass of its own
        key = (v.name, wide)
        if key not in self._widened:
            self._widened[key] = self._node("Expand", [v.name, self._ints(wide).name], wide)
        return self._widened[key]

    def add(self, a: OnnxValue, b: OnnxValue) -> OnnxValue:
        return self._binary("Add", a, b)

    def sub(self, a: OnnxValue, b: OnnxValue) -> OnnxValue:
        return self._binary("Sub", a, b)

    def mul(self, a: OnnxValue, b: OnnxValue) -> OnnxValue:
        """a·b; a value already multiplied by a mask and now by another one is multiplied once, by
        the product of the masks (ReLU's mask then max-pool's selection: one pass over the m
        tangents instead of two). Masks hold only 0s and powers of two, so the result is exact."""
        if a.name in self._exact and b.name not in self._exact:
            a, b = b, a
        if b.name not in self._exact:
            return self._binary("Mul", a, b)
        if a.name in self._exact:
            out = self._binary("Mul", a, b)
            self._exact.add(out.name)
            return out
        value, mask = self._masked.get(a.name, (a, None))
        mask = b if mask is None else self.mul(mask, b)
        out = self._binary("Mul", value, mask)
        self._masked[out.name] = (value, mask)
        return out

    def div(self, a: OnnxValue, b: OnnxValue) -> OnnxValue:
        return self._binary("Div", a, b)

    def _unary(self, op: str, a: OnnxValue) -> OnnxValue:
        return self._node(op, [a.name], a.shape)

    def neg(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Neg", a)

    def sqrt(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Sqrt", a)

    def exp(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Exp", a)

    def log(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Log", a)

    def erf(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Erf", a)

    def tanh(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Tanh", a)

    def sigmoid(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Sigmoid", a)

    def pow(self, a: OnnxValue, exponent: float) -> OnnxValue:
        if exponent == 2.0:
            return self._binary("Mul", a, a)
        return self._binary("Pow", a, self.const(exponent))

    def softmax(self, a: OnnxValue, axis: int) -> OnnxValue:
        return self._node("Softmax", [a.name], a.shape, axis=axis)

    def log_softmax(self, a: OnnxValue, axis: int) -> OnnxValue:
        return self._node("LogSoftmax", [a.name], a.shape, axis=axis)

    def relu(self, a: OnnxValue) -> OnnxValue:
        return self._unary("Relu", a)

    def clip(self, a: OnnxValue, lo: float, hi: float) -> OnnxValue:
        return self._node("Clip", [a.name, self.const(lo).name, self.const(hi).name], a.shape)

    def step_mask(self, a: OnnxValue, lo: float, hi: float | None = None) -> OnnxValue:
        m = self._node("Greater", [a.name, self.const(lo).name], a.shape)
        if hi is not None:
            m = self._node("And", [m.name, self._node("Less", [a.name, self.const(hi).name], a.shape).name], a.shape)
        return self._mask(self._node("Cast", [m.name], a.shape, to=TensorProto.FLOAT))

    def _mask(self, v: OnnxValue) -> OnnxValue:
        self._exact.add(v.name)
        return v

    def _reduce(self, op: str, a: OnnxValue, axes: Sequence[int], keepdims: bool) -> OnnxValue:
        axes = [ax % len(a.shape) for ax in axes]
        shape = tuple(1 if i in axes else d for i, d in enumerate(a.shape) if keepdims or i not in axes)
        if op == "ReduceSum":  # opset 13+: axes is an input
            return self._node(op, [a.name, self._ints(axes).name], shape, keepdims=int(keepdims))
        return self._node(op, [a.name], shape, axes=list(axes), keepdims=int(keepdims))

    def mean(self, a: OnnxValue, axes: Sequence[int], keepdims: bool = True) -> OnnxValue:
        return self._reduce("ReduceMean", a, axes, keepdims)

    def sum(self, a: OnnxValue, axes: Sequence[int], keepdims: bool = True) -> OnnxValue:
        return self._reduce("ReduceSum", a, axes, keepdims)

    def max(self, a: OnnxValue, axes: Sequence[int], keepdims: bool = True) -> OnnxValue:
        return self._reduce("ReduceMax", a, axes, keepdims)

    def matmul(self, a: OnnxValue, b: OnnxValue) -> OnnxValue:
        batch = _broadcast(a.shape[:-2], b.shape[:-2])
        return self._node("MatMul", [a.name, b.name], (*batch, a.shape[-2], b.shape[-1]))

    def gemm(self, x: OnnxValue, w: OnnxValue, b: OnnxValue | None) -> OnnxValue:
        ins = [x.name, w.name] + ([b.name] if b is not None else [])
        return self._node("Gemm", ins, (x.shape[0], w.shape[0]), transB=1)

    def conv(self, x: OnnxValue, w: OnnxValue, b: OnnxValue | None, stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], groups: int) -> OnnxValue:
        ins = [x.name, w.name] + ([b.name] if b is not None else [])
        h, wd = (window_out(x.shape[2 + i], w.shape[2 + i], stride[i], padding[i], dilation[i], False)
                 for i in range(2))
        return self._node("Conv", ins, (x.shape[0], w.shape[0], h, wd), kernel_shape=list(w.shape[2:]),
                          strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
                          dilations=list(dilation), group=groups)

    def maxpool(self, x: OnnxValue, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], ceil_mode: bool) -> OnnxValue:
        h, wd = (window_out(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode) for i in range(2))
        return self._node("MaxPool", [x.name], (*x.shape[:2], h, wd), kernel_shape=list(kernel), strides=list(stride),
                          pads=[padding[0], padding[1], padding[0], padding[1]], dilations=list(dilation),
                          ceil_mode=int(ceil_mode))

    def avgpool(self, x: OnnxValue, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                ceil_mode: bool, count_include_pad: bool) -> OnnxValue:
        h, wd = (window_out(x.shape[2 + i], kernel[i], stride[i], padding[i], 1, ceil_mode) for i in range(2))
        return self._node("AveragePool", [x.name], (*x.shape[:2], h, wd), kernel_shape=list(kernel),
                          strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
                          ceil_mode=int(ceil_mode), count_include_pad=int(count_include_pad))

    def pad(self, x: OnnxValue, pads_hw: Sequence[int], value: float) -> OnnxValue:
        top, left, bottom, right = pads_hw
        lead = [0] * (len(x.shape) - 2)
        pads = self._ints([*lead, top, left, *lead, bottom, right])
        shape = (*x.shape[:-2], x.shape[-2] + top + bottom, x.shape[-1] + left + right)
        return self._node("Pad", [x.name, pads.name, self.const(value).name], shape, mode="constant")

    def reshape(self, x: OnnxValue, shape: Sequence[int]) -> OnnxValue:
        known = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return self._node("Reshape", [x.name, self._ints(shape).name], _infer_reshape(x.shape, known))

    def transpose(self, x: OnnxValue, perm: Sequence[int]) -> OnnxValue:
        return self._node("Transpose", [x.name], tuple(x.shape[p] for p in perm), perm=list(perm))

    def concat(self, xs: Sequence[OnnxValue], axis: int) -> OnnxValue:
        shape = list(xs[0].shape)
        ax = axis % len(shape)
        shape[ax] = -1 if any(v.shape[ax] == -1 for v in xs) else sum(v.shape[ax] for v in xs)
        return self._node("Concat", [v.name for v in xs], tuple(shape), axis=axis)

    def unsqueeze(self, x: OnnxValue, axis: int) -> OnnxValue:
        shape = list(x.shape)
        shape.insert(axis % (len(shape) + 1), 1)
        out = self._node("Unsqueeze", [x.name, self._ints([axis]).name], tuple(shape))
        return self._mask(out) if x.name in self._exact else out  # a mask stays a mask

    def slice(self, x: OnnxValue, axis: int, start: int, end: int, step: int) -> OnnxValue:
        shape = list(x.shape)
        ax = axis % len(shape)
        if shape[ax] != -1:
            shape[ax] = len(range(*slice(start, end, step).indices(shape[ax])))
        ins = [x.name, self._ints([start]).name, self._ints([end]).name, self._ints([ax]).name, self._ints([step]).name]
        return self._node("Slice", ins, tuple(shape))

    def expand(self, x: OnnxValue, shape: Sequence[int]) -> OnnxValue:
        return self._node("Expand", [x.name, self._ints([1, *shape]).name], (x.shape[0], *shape))

    def _batch_shape(self, like: OnnxValue, rest: Sequence[int]) -> OnnxValue:
        n = self._node("Shape", [like.name], (1,), start=0, end=1)
        return self._node("Concat", [n.name, self._ints(list(rest)).name], (len(rest) + 1,), axis=0)

    def expand_batch(self, x: OnnxValue, like: OnnxValue) -> OnnxValue:
        return self._node("Expand", [x.name, self._batch_shape(like, x.shape[1:]).name], (like.shape[0], *x.shape[1:]))

    def zeros_tangent(self, like: OnnxValue, m: int) -> OnnxValue:
        shape = self._batch_shape(like, [m, *like.shape[1:]])
        return self._node("Expand", [self.const(0.0).name, shape.name], (like.shape[0], m, *like.shape[1:]))

    def strided_hw(self, x: OnnxValue, start: Sequence[int], step: Sequence[int], size: Sequence[int]) -> OnnxValue:
        ends = [b + s * (n - 1) + 1 for b, s, n in zip(start, step, size, strict=False)]
        ins = [x.name, self._ints(start).name, self._ints(ends).name, self._ints([-2, -1]).name, self._ints(step).name]
        return self._node("Slice", ins, (*x.shape[:-2], *size))

    def eq_mask(self, a: OnnxValue, b: OnnxValue) -> OnnxValue:
        shape = _broadcast(a.shape, b.shape)
        equal = self._node("Equal", [a.name, b.name], shape)
        return self._mask(self._node("Cast", [equal.name], shape, to=TensorProto.FLOAT))

    def upsample(self, x: OnnxValue, kh: int, kw: int) -> OnnxValue:
        scales = self.const(np.array([1.0] * (len(x.shape) - 2) + [kh, kw], dtype=np.float32))
        shape = (*x.shape[:-2], x.shape[-2] * kh, x.shape[-1] * kw)
        return self._node("Resize", [x.name, "", scales.name], shape, mode="nearest", nearest_mode="floor",
                          coordinate_transformation_mode="asymmetric")

    def batch_count(self, x: OnnxValue, per_sample: int) -> OnnxValue:
        shp = self._node("Shape", [x.name], (len(x.shape),), start=0, end=1)
        n = self._node("Cast", [shp.name], (1,), to=TensorProto.FLOAT)
        return self.mul(n, self.const(float(per_sample)))

    def expand_zeros(self, like: OnnxValue, m: int) -> OnnxValue:
        shp = self._node("Shape", [like.name], (len(like.shape),))
        full = self._node("Concat", [self._ints([m]).name, shp.name], (len(like.shape) + 1,), axis=0)
        return self._node("Expand", [self.const(0.0).name, full.name], (m, *like.shape))


# Broadcast spans (elements) up to which a small operand is expanded first (see OnnxOps._widen);
# at 256 (16×16 maps) ONNX Runtime's own broadcast is already as fast.
_WIDEN_SPAN = 64


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(y if x == 1 else x for x, y in zip(a, b, strict=False))


def _infer_reshape(src: tuple[int, ...], dst: list[int]) -> tuple[int, ...]:
    """Shape after Reshape; the batch (-1 in src) can be the inferred dim."""
    if -1 not in dst:
        return tuple(dst)
    known_src = [d for d in src if d != -1]
    if len(known_src) == len(src):
        total = int(np.prod(src))
        rest = int(np.prod([d for d in dst if d != -1]))
        return tuple(total // rest if d == -1 else d for d in dst)
    return tuple(dst)
