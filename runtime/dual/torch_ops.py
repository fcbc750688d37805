"""The dual rules' op vocabulary (ops.Ops) run eagerly with torch: the torch backend, the
reference's "same dual functions" mode and validation. torch is imported when an instance is made,
so importing this module costs nothing on a torch-free device."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class TorchOps:
    """Eager torch implementation (imports torch lazily: the runtime may use this only when asked)."""

    def __init__(self, dtype: Any = None, device: Any = None) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.dtype = dtype or torch.float32  # float64 for validation references
        self.device = device

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def const(self, value: np.ndarray | float) -> Any:
        return self.torch.as_tensor(np.asarray(value), dtype=self.dtype, device=self.device)

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def sub(self, a: Any, b: Any) -> Any:
        return a - b

    def mul(self, a: Any, b: Any) -> Any:
        return a * b

    def div(self, a: Any, b: Any) -> Any:
        return a / b

    def neg(self, a: Any) -> Any:
        return -a

    def sqrt(self, a: Any) -> Any:
        return self.torch.sqrt(a)

    def exp(self, a: Any) -> Any:
        return self.torch.exp(a)

    def log(self, a: Any) -> Any:
        return self.torch.log(a)

    def erf(self, a: Any) -> Any:
        return self.torch.erf(a)

    def tanh(self, a: Any) -> Any:
        return self.torch.tanh(a)

    def sigmoid(self, a: Any) -> Any:
        return self.torch.sigmoid(a)

    def pow(self, a: Any, exponent: float) -> Any:
        return a**exponent

    def softmax(self, a: Any, axis: int) -> Any:
        return self.torch.softmax(a, axis)

    def log_softmax(self, a: Any, axis: int) -> Any:
        return self.torch.log_softmax(a, axis)

    def relu(self, a: Any) -> Any:
        return self.torch.relu(a)

    def clip(self, a: Any, lo: float, hi: float) -> Any:
        return self.torch.clamp(a, lo, hi)

    def step_mask(self, a: Any, lo: float, hi: float | None = None) -> Any:
        m = a > lo
        if hi is not None:
            m = m & (a < hi)
        return m.to(a.dtype)

    def mean(self, a: Any, axes: Sequence[int], keepdims: bool = True) -> Any:
        return a.mean(dim=tuple(axes), keepdim=keepdims)

    def sum(self, a: Any, axes: Sequence[int], keepdims: bool = True) -> Any:
        return a.sum(dim=tuple(axes), keepdim=keepdims)

    def max(self, a: Any, axes: Sequence[int], keepdims: bool = True) -> Any:
        return a.amax(dim=tuple(axes), keepdim=keepdims)

    def matmul(self, a: Any, b: Any) -> Any:
        return self.torch.matmul(a, b)

    def gemm(self, x: Any, w: Any, b: Any | None) -> Any:
        return self.F.linear(x, w, b)

    def conv(self, x: Any, w: Any, b: Any | None, stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], groups: int) -> Any:
        return self.F.conv2d(x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups)

    def maxpool(self, x: Any, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], ceil_mode: bool) -> Any:
        return self.F.max_pool2d(x, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode)

    def avgpool(self, x: Any, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                ceil_mode: bool, count_include_pad: bool) -> Any:
        return self.F.avg_pool2d(x, tuple(kernel), tuple(stride), tuple(padding), ceil_mode, count_include_pad)

    def pad(self, x: Any, pads_hw: Sequence[int], value: float) -> Any:
        top, left, bottom, right = pads_hw
        return self.F.pad(x, (left, right, top, bottom), value=value)

    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    def transpose(self, x: Any, perm: Sequence[int]) -> Any:
        return x.permute(*perm)

    def concat(self, xs: Sequence[Any], axis: int) -> Any:
        return self.torch.cat(list(xs), dim=axis)

    def unsqueeze(self, x: Any, axis: int) -> Any:
        return x.unsqueeze(axis)

    def slice(self, x: Any, axis: int, start: int, end: int, step: int) -> Any:
        index = [slice(None)] * x.dim()
        index[axis] = slice(start, end, step)
        return x[tuple(index)]

    def expand(self, x: Any, shape: Sequence[int]) -> Any:
        return x.expand(x.shape[0], *shape)

    def expand_batch(self, x: Any, like: Any) -> Any:
        return x.expand(like.shape[0], *x.shape[1:])

    def zeros_tangent(self, like: Any, m: int) -> Any:
        return self.torch.zeros((like.shape[0], m, *like.shape[1:]), dtype=like.dtype, device=like.device)

    def strided_hw(self, x: Any, start: Sequence[int], step: Sequence[int], size: Sequence[int]) -> Any:
        (h0, w0), (sh, sw), (nh, nw) = start, step, size
        return x[..., h0 : h0 + sh * (nh - 1) + 1 : sh, w0 : w0 + sw * (nw - 1) + 1 : sw]

    def eq_mask(self, a: Any, b: Any) -> Any:
        return (a == b).to(a.dtype)

    def upsample(self, x: Any, kh: int, kw: int) -> Any:
        return x.repeat_interleave(kh, dim=-2).repeat_interleave(kw, dim=-1)

    def batch_count(self, x: Any, per_sample: int) -> Any:
        return self.torch.tensor(float(x.shape[0] * per_sample), dtype=x.dtype, device=x.device)

    def expand_zeros(self, like: Any, m: int) -> Any:
        return self.torch.zeros((m, *like.shape), dtype=like.dtype, device=like.device)
