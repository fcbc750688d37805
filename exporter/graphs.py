"""Build one module role's graph as ONNX: the dual rules (``asyncfgd.runtime.dual``) run on the
ONNX builder, with weights, tangents and statistics as graph inputs, not initializers, and the
names of the artifact contract (runtime/contract.py, docs/artifacts.md)."""
from __future__ import annotations

import onnx

from asyncfgd.runtime import contract as c
from asyncfgd.runtime.dual.interpreter import GraphSpec, graph_tangent_names, graph_weight_names, run_module
from asyncfgd.runtime.dual.program import ModuleSpec, stat_names
from asyncfgd.runtime.masks import dropout_sites

from .onnx_ops import OnnxOps


def build_onnx(mod: ModuleSpec, spec: GraphSpec, is_last: bool, in_shape: list[int], num_classes: int,
               weight_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Emit the ONNX graph of one module role."""
    ops = OnnxOps(f"module{mod.index}_{spec.role}")
    x = ops.input(c.X, [-1, *in_shape])
    x_dot = ops.input(c.X_DOT, [spec.m, -1, *in_shape]) if spec.role == c.DUAL else None
    wn = graph_weight_names(mod, spec)
    params = {q: ops.input(c.weight_input(q), weight_shapes[q]) for q in wn}
    tangents = {q: ops.input(c.tangent_input(q), [spec.m, *weight_shapes[q]]) for q in graph_tangent_names(mod, spec)}
    stats = {q: ops.input(c.stat_input(q), weight_shapes[q]) for q in stat_names(mod.nodes)}
    wants_labels = (is_last and spec.role != c.EVAL) or spec.role in (c.LOCAL, c.ACTIVITY)
    labels = ops.input(c.LABELS, [-1, num_classes]) if wants_labels else None
    masks = {d.name: ops.input(c.mask_input(d.name), [-1, *d.mask_shape]) for d in dropout_sites(mod.nodes)
             } if spec.role in c.MASK_ROLES else {}
    noise = {s.node: ops.input(c.noise_input(s.node), [spec.m, -1, *s.shape]) for s in mod.activity.sites
             } if spec.role == c.ACTIVITY and mod.activity else {}
    for name, v in run_module(ops, mod, spec, is_last, x, x_dot, params, tangents, stats, labels, masks,
                              noise).items():
        ops.output(name, v)
    model = ops.model()
    onnx.checker.check_model(model, full_check=True)
    return model
