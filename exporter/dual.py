"""Run one module's program with the dual rules, on any op set (torch eager or ONNX builder)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from .program import Node
from .rules import RULES, RuleContext, conv_bn_from_data, pays_to_fold, swap_major


def run_program(ops: Any, nodes: list[Node], input_name: str, x: Any, x_dot: Any, params: dict[str, Any],
                tangents: dict[str, Any], stats: dict[str, Any], ctx: RuleContext) -> tuple[Any, Any, dict[str, Any]]:
    """Interpret ``nodes`` on (x, ẋ): returns (y, ẏ, updated BN statistics by qualified name).

    ``x_dot`` and ẏ are (m, N, ...), the artifact contract's layout; the rules work on (N, m, ...)
    (rules.py), one transpose each way when m > 1. ``tangents`` maps weight names to (m, *shape)
    tangents; a missing entry or ``x_dot=None`` means a zero tangent, whose work the rules skip.
    A conv fed by a zero tangent and read only by a BatchNorm runs as one folded pair
    (``conv_bn_from_data``) where that pays.
    """
    env: dict[str, tuple[Any, Any]] = {input_name: (x, swap_major(ops, x_dot, ctx.m, to_samples=True))}
    new_stats: dict[str, Any] = {}
    bn_of = _bn_after_conv(nodes)
    done: set[str] = set()
    for node in nodes:
        if node.name in done:
            continue
        xs = [env[i][0] for i in node.inputs]
        xds = [env[i][1] for i in node.inputs]
        p, u, s = _bind(node, params, tangents, stats)
        bn = bn_of.get(node.name)
        if bn is not None and xds[0] is None and u.get("weight") is not None and pays_to_fold(ctx):
            y, yd, upd = conv_bn_from_data(ops, node, bn, xs[0], p, u, *_bind(bn, params, tangents, stats), ctx)
            node = bn
            done.add(bn.name)
        else:
            y, yd, upd = RULES[node.op](ops, node, xs, xds, p, u, s, ctx)
        env[node.name] = (y, yd)
        new_stats.update({node.buffers[role]: v for role, v in upd.items()})
    y, yd = env[nodes[-1].name]
    return y, swap_major(ops, yd, ctx.m, to_samples=False), new_stats


def _bind(node: Node, params: dict[str, Any], tangents: dict[str, Any],
          stats: dict[str, Any]) -> tuple[dict, dict, dict]:
    """A node's weights, weight tangents (None where zero) and statistics by local role."""
    return ({role: params[q] for role, q in node.params.items()},
            {role: tangents.get(q) for role, q in node.params.items()},
            {role: stats[q] for role, q in node.buffers.items()})


def _bn_after_conv(nodes: list[Node]) -> dict[str, Node]:
    """Ungrouped conv name → the BatchNorm that is its only reader (a pair the folded rule can run)."""
    readers = Counter(i for n in nodes for i in n.inputs)
    convs = {n.name for n in nodes if n.op == "conv2d" and n.attrs["groups"] == 1}
    return {n.inputs[0]: n for n in nodes
            if n.op == "batchnorm2d" and n.inputs[0] in convs and readers[n.inputs[0]] == 1}
