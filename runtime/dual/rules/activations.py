"""Element-wise activations, each one line of math: y = f(x) and f′(x) (``defelementwise``).

``df(x, y, a)`` may use the output y where that is cheaper (sigmoid: y·(1 − y)). Piecewise-linear
functions use ``step`` masks, which are exactly 0 or 1 (the ONNX builder multiplies masks once).
"""
from __future__ import annotations

import math

from ..algebra import T
from .core import defelementwise


def _softplus(x: T) -> T:
    """log(1 + eˣ) without overflow: relu(x) + log(1 + e^-|x|)."""
    return x.relu() + (1 + (-(x.relu() + (-x).relu())).exp()).log()


_K = math.sqrt(2.0 / math.pi)  # GELU's tanh form: ½x(1 + tanh(k(x + 0.044715x³)))


def _gelu(x: T, a: dict) -> T:
    if a.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + (_K * (x + 0.044715 * x * x * x)).tanh())
    return x * (0.5 * (1 + (x * (1 / math.sqrt(2))).erf()))


def _dgelu(x: T, y: T, a: dict) -> T:
    if a.get("approximate", "none") == "tanh":
        t = (_K * (x + 0.044715 * x * x * x)).tanh()
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * (_K * (1 + 3 * 0.044715 * x * x))
    cdf = 0.5 * (1 + (x * (1 / math.sqrt(2))).erf())
    return cdf + x * ((x * x * -0.5).exp() * (1 / math.sqrt(2 * math.pi)))


defelementwise("relu", lambda x, a: x.relu(), lambda x, y, a: y.step(0.0))
defelementwise("relu6", lambda x, a: x.clip(0.0, 6.0), lambda x, y, a: x.step(0.0, 6.0))
defelementwise("hardtanh", lambda x, a: x.clip(a["min"], a["max"]), lambda x, y, a: x.step(a["min"], a["max"]))
defelementwise("leaky_relu", lambda x, a: x.relu() - a["slope"] * (-x).relu(),
               lambda x, y, a: a["slope"] + (1 - a["slope"]) * x.step(0.0))
defelementwise("elu", lambda x, a: x.relu() + a["alpha"] * ((-(-x).relu()).exp() - 1),
               lambda x, y, a: x.step(0.0) + a["alpha"] * (-(-x).relu()).exp() * (1 - x.step(0.0)))
defelementwise("gelu", _gelu, _dgelu)
defelementwise("sigmoid", lambda x, a: x.sigmoid(), lambda x, y, a: y * (1 - y))
defelementwise("tanh", lambda x, a: x.tanh(), lambda x, y, a: 1 - y * y)
defelementwise("silu", lambda x, a: x * x.sigmoid(), lambda x, y, a: x.sigmoid() * (1 + x * (1 - x.sigmoid())))
defelementwise("hardswish", lambda x, a: x * (x + 3).clip(0.0, 6.0) / 6,
               lambda x, y, a: (x + 3).clip(0.0, 6.0) / 6 + x * x.step(-3.0, 3.0) / 6)
defelementwise("hardsigmoid", lambda x, a: (x / 6 + 0.5).clip(0.0, 1.0), lambda x, y, a: x.step(-3.0, 3.0) / 6)
defelementwise("softplus", lambda x, a: _softplus(x * a["beta"]) / a["beta"], lambda x, y, a: (x * a["beta"]).sigmoid())
defelementwise("mish", lambda x, a: x * _softplus(x).tanh(),
               lambda x, y, a: _softplus(x).tanh() + x * (1 - _softplus(x).tanh() ** 2) * x.sigmoid())
defelementwise("abs", lambda x, a: x.relu() + (-x).relu(), lambda x, y, a: 2 * x.step(0.0) - 1)
defelementwise("exp", lambda x, a: x.exp(), lambda x, y, a: y)
defelementwise("log", lambda x, a: x.log(), lambda x, y, a: 1 / x)
defelementwise("sqrt", lambda x, a: x.sqrt(), lambda x, y, a: 0.5 / y)
defelementwise("rsqrt", lambda x, a: 1 / x.sqrt(), lambda x, y, a: -0.5 * y / x)
defelementwise("pow", lambda x, a: x ** a["exponent"], lambda x, y, a: a["exponent"] * x ** (a["exponent"] - 1))
