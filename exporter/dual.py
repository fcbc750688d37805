"""Run one module's program with the dual rules, on any op set (torch eager or ONNX builder)."""
from __future__ import annotations

from typing import Any

from .program import Node
from .rules import RULES, RuleContext


def run_program(ops: Any, nodes: list[Node], input_name: str, x: Any, x_dot: Any, params: dict[str, Any],
                tangents: dict[str, Any], stats: dict[str, Any], ctx: RuleContext) -> tuple[Any, Any, dict[str, Any]]:
    """Interpret ``nodes`` on (x, ẋ): returns (y, ẏ, updated BN statistics by qualified name).

    ``tangents`` maps weight names to (m, *shape) tangents; a missing entry or ``x_dot=None``
    means a zero tangent, whose work the rules skip.
    """
    env: dict[str, tuple[Any, Any]] = {input_name: (x, x_dot)}
    new_stats: dict[str, Any] = {}
    for node in nodes:
        xs = [env[i][0] for i in node.inputs]
        xds = [env[i][1] for i in node.inputs]
        p = {role: params[q] for role, q in node.params.items()}
        u = {role: tangents.get(q) for role, q in node.params.items()}
        s = {role: stats[q] for role, q in node.buffers.items()}
        y, yd, upd = RULES[node.op](ops, node, xs, xds, p, u, s, ctx)
        env[node.name] = (y, yd)
        new_stats.update({node.buffers[role]: v for role, v in upd.items()})
    return (*env[nodes[-1].name], new_stats)

