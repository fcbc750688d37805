"""The rule table, the layout helpers every rule shares, and JAX-style rule constructors.

A rule takes primal inputs ``xs`` (N, ...), their tangents ``xds`` (N, m, ...) or None (a zero
tangent: that work is skipped), the node's weights ``p`` and weight tangents ``u`` (m, *shape)
or None, and BatchNorm statistics ``s``. It returns y, ẏ (or None when ẏ is identically zero)
and any updated statistics. With ``ctx.dual`` false the same rule is the plain forward, so the
forward, eval and dual graphs all come from one definition.

Tangents are sample-major inside a module, (N, m, ...), although the artifact contract (and
``run_program``'s interface) is (m, N, ...): a product with the m weight tangents stacked along
the output channels comes out as (N, m·C, ...), so in this layout it needs no transpose, while
W·ẋ treats the N·m tangent-samples as one batch in either order. A primal factor meets the
tangents as (N, 1, ...) (``primal``).

Values that do not depend on the data (weights used directly, constants and what is computed
from them: a class token, a position embedding, a layer scale) have a batch axis of 1: (1, ...),
tangents (1, m, ...). Broadcasting then combines them with batched values unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..algebra import T
from ..program import Node


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


def add_opt(ops: Any, a: Any, b: Any) -> Any:
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


def primal(ops: Any, v: Any) -> Any:
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


def tangent_or_zeros(ops: Any, x: Any, xd: Any, m: int) -> Any:
    """ẋ, or zeros of its shape (N, m, ...) where it is None: for ops that must see every input."""
    return ops.zeros_tangent(x, m) if xd is None else xd


def defelementwise(op: str, f: Callable[[T, dict], T], df: Callable[[T, T, dict], T]) -> None:
    """An element-wise op: y = f(x), ẏ = f′(x)·ẋ, with ``df(x, y, attrs)`` = f′(x)."""

    def elementwise(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
        x = T(ops, xs[0])
        y = f(x, node.attrs)
        if not ctx.dual or xds[0] is None:
            return y.v, None, {}
        return y.v, ops.mul(xds[0], primal(ops, df(x, y, node.attrs).v)), {}

    RULES[op] = elementwise


def deflinear(op: str, f: Callable[[Any, Any, dict], Any]) -> None:
    """A map that is linear in its one input and works sample by sample: ẏ = f(ẋ), with the m
    tangents of each sample riding as extra samples (``f(ops, x, attrs)`` sees axis 0 as the batch)."""

    def linear(ops, node, xs, xds, p, u, s, ctx) -> RuleOut:
        y = f(ops, xs[0], node.attrs)
        if not ctx.dual or xds[0] is None:
            return y, None, {}
        return y, split_m(ops, f(ops, merge_m(ops, xds[0]), node.attrs), ctx.m), {}

    RULES[op] = linear
