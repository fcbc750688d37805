"""Build each module's graphs (dual, dual_first, forward, eval) as ONNX, and as torch callables.

Both come from ``run_program`` with the same rules, so the ONNX graph and the torch backend
compute the same thing; only the op set differs. Naming contract (docs/artifacts.md):
inputs ``x``, ``x_dot``, ``w.<weight>``, ``u.<weight>``, ``s.<bn stat>``, ``labels``;
outputs ``y``, ``y_dot`` | ``loss``, ``loss_dot``, ``logits``; ``s_new.<bn stat>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from .dual import run_program
from .ops import OnnxOps
from .program import Node
from .rules import RuleContext, cross_entropy
from .split import ModuleSpec

ROLES = ("dual", "dual_first", "forward", "eval")
LOCAL_ROLE = "local"  # non-last modules with an auxiliary head: (x, w, u, labels) -> (y, loss, loss_dot, logits)


@dataclass(frozen=True)
class GraphSpec:
    """What one graph computes: which role, how many tangents, and the BatchNorm mode."""

    role: str
    m: int
    bn_mode: str  # "train" | "frozen"
    batch: int = 64  # the mini-batch size cost-based graph forms are chosen for (rules.RuleContext)

    @property
    def dual(self) -> bool:
        return self.role in ("dual", "dual_first", LOCAL_ROLE)

    @property
    def bn_train(self) -> bool:
        return self.bn_mode == "train" and self.role != "eval"

    def context(self) -> RuleContext:
        return RuleContext(m=self.m, dual=self.dual, bn_train=self.bn_train, batch=self.batch)


def module_roles(mod: ModuleSpec) -> tuple[str, ...]:
    """The first module's input is data, whose tangent is always zero: it has no ``dual`` role."""
    roles = ROLES[1:] if mod.index == 0 else ROLES
    return (*roles, LOCAL_ROLE) if mod.aux else roles


def graph_weight_names(mod: ModuleSpec, spec: GraphSpec) -> list[str]:
    """Weights a graph takes: the module's, plus its auxiliary head's in the local role."""
    return weight_names(mod.nodes + (mod.aux if spec.role == LOCAL_ROLE else []))


def weight_names(nodes: list[Node]) -> list[str]:
    return [q for n in nodes for q in n.params.values()]


def stat_names(nodes: list[Node]) -> list[str]:
    return [q for n in nodes for q in n.buffers.values()]


def run_module(ops: Any, mod: ModuleSpec, spec: GraphSpec, is_last: bool, x: Any, x_dot: Any,
               params: dict[str, Any], tangents: dict[str, Any], stats: dict[str, Any],
               labels: Any = None) -> dict[str, Any]:
    """One graph's computation, returned by output name (the naming contract above)."""
    ctx = spec.context()
    y, yd, new_stats = run_program(ops, mod.nodes, mod.input, x, x_dot if spec.role == "dual" else None,
                                   params, tangents if spec.dual else {}, stats, ctx)
    out: dict[str, Any] = {}
    if spec.dual and yd is None:  # a module with no weights and a zero input tangent
        yd = ops.expand_zeros(y, spec.m)
    if spec.role == LOCAL_ROLE:
        z, zd, _ = run_program(ops, mod.aux, mod.output, y, yd, params, tangents, {}, ctx)
        out["y"] = y
        out["loss"], out["loss_dot"] = cross_entropy(ops, z, zd, labels, True)
        out["logits"] = z
    elif is_last and spec.role != "eval":
        loss, dloss = cross_entropy(ops, y, yd, labels, spec.dual)
        out["loss"] = loss
        if spec.dual:
            out["loss_dot"] = dloss
        out["logits"] = y
    elif is_last:
        out["logits"] = y
    else:
        out["y"] = y
        if spec.dual:
            out["y_dot"] = yd
    if ctx.bn_train:
        out.update({f"s_new.{k}": v for k, v in new_stats.items()})
    return out


def build_onnx(mod: ModuleSpec, spec: GraphSpec, is_last: bool, in_shape: list[int], num_classes: int,
               weight_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Emit the ONNX graph of one module role; weights and tangents are inputs, not initializers."""
    ops = OnnxOps(f"module{mod.index}_{spec.role}")
    x = ops.input("x", [-1, *in_shape])
    x_dot = ops.input("x_dot", [spec.m, -1, *in_shape]) if spec.role == "dual" else None
    wn = graph_weight_names(mod, spec)
    params = {q: ops.input(f"w.{q}", weight_shapes[q]) for q in wn}
    tangents = {q: ops.input(f"u.{q}", [spec.m, *weight_shapes[q]]) for q in wn} if spec.dual else {}
    stats = {q: ops.input(f"s.{q}", weight_shapes[q]) for q in stat_names(mod.nodes)}
    wants_labels = (is_last and spec.role != "eval") or spec.role == LOCAL_ROLE
    labels = ops.input("labels", [-1, num_classes]) if wants_labels else None
    for name, v in run_module(ops, mod, spec, is_last, x, x_dot, params, tangents, stats, labels).items():
        ops.output(name, v)
    model = ops.model()
    onnx.checker.check_model(model, full_check=True)
    return model
