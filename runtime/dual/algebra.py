"""Graph values with arithmetic operators, so that dual rules read like the math they implement.

``T(ops, v)`` wraps a value of any op set (a torch tensor, or an ONNX value being recorded) and
maps ``+ - * / **`` and a few functions onto ``ops``; numbers become constants. A rule writes
``y * (1 - y)`` instead of ``ops.mul(y, ops.sub(ops.const(1.0), y))``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class T:
    """One graph value and the op set that computes with it."""

    __slots__ = ("ops", "v")

    def __init__(self, ops: Any, v: Any) -> None:
        self.ops, self.v = ops, v

    def _of(self, other: T | float) -> Any:
        return other.v if isinstance(other, T) else self.ops.const(float(other))

    def _new(self, v: Any) -> T:
        return T(self.ops, v)

    def __add__(self, o: T | float) -> T:
        return self._new(self.ops.add(self.v, self._of(o)))

    def __radd__(self, o: float) -> T:
        return self._new(self.ops.add(self._of(o), self.v))

    def __sub__(self, o: T | float) -> T:
        return self._new(self.ops.sub(self.v, self._of(o)))

    def __rsub__(self, o: float) -> T:
        return self._new(self.ops.sub(self._of(o), self.v))

    def __mul__(self, o: T | float) -> T:
        return self._new(self.ops.mul(self.v, self._of(o)))

    def __rmul__(self, o: float) -> T:
        return self._new(self.ops.mul(self._of(o), self.v))

    def __truediv__(self, o: T | float) -> T:
        return self._new(self.ops.div(self.v, self._of(o)))

    def __rtruediv__(self, o: float) -> T:
        return self._new(self.ops.div(self._of(o), self.v))

    def __neg__(self) -> T:
        return self._new(self.ops.neg(self.v))

    def __pow__(self, p: float) -> T:
        return self._new(self.ops.pow(self.v, float(p)))

    def __matmul__(self, o: T) -> T:
        return self._new(self.ops.matmul(self.v, o.v))

    def exp(self) -> T:
        return self._new(self.ops.exp(self.v))

    def log(self) -> T:
        return self._new(self.ops.log(self.v))

    def sqrt(self) -> T:
        return self._new(self.ops.sqrt(self.v))

    def tanh(self) -> T:
        return self._new(self.ops.tanh(self.v))

    def sigmoid(self) -> T:
        return self._new(self.ops.sigmoid(self.v))

    def erf(self) -> T:
        return self._new(self.ops.erf(self.v))

    def relu(self) -> T:
        return self._new(self.ops.relu(self.v))

    def clip(self, lo: float, hi: float) -> T:
        return self._new(self.ops.clip(self.v, lo, hi))

    def step(self, lo: float, hi: float | None = None) -> T:
        """1 where lo < x (< hi), else 0: the derivative of a piecewise-linear function."""
        return self._new(self.ops.step_mask(self.v, lo, hi))

    def sum(self, axes: Sequence[int], keepdims: bool = True) -> T:
        return self._new(self.ops.sum(self.v, axes, keepdims))

    def mean(self, axes: Sequence[int], keepdims: bool = True) -> T:
        return self._new(self.ops.mean(self.v, axes, keepdims))
