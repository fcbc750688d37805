"""Artifacts + trained weights → one deployable ONNX graph: input → logits (→ probabilities).

Built from the artifact directory's programs and a weights dictionary (a run's checkpoint), not
from the Python model, so a run trained on a device without torch can be exported there. The
graph is every module's ``eval`` computation chained (BatchNorm on the trained running
statistics, dropout off), with the weights baked in as initializers and a dynamic batch; it
uses only the ops TensorRT imports (``trt_check``). ``to_fp16`` casts it to float16 inside,
keeping float32 at its input and outputs.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.dual.interpreter import GraphSpec, run_module
from asyncfgd.runtime.dual.program import module_specs, stat_names, weight_names

from .onnx_ops import OnnxOps

PROBABILITIES = "probabilities"


def build_inference(manifest: Mapping, weights: Mapping[str, np.ndarray], softmax: bool = False) -> onnx.ModelProto:
    """The whole network's inference graph from a manifest and weights by ``state_dict`` name."""
    ops = OnnxOps("inference")
    h = x = ops.input(c.X, [-1, *manifest["model"]["input_shape"]])
    specs = module_specs(dict(manifest))
    missing = sorted({q for mod in specs for q in weight_names(mod.nodes) + stat_names(mod.nodes)} - set(weights))
    if missing:
        raise ValueError(f"the weights lack {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    for mod in specs:
        params = {q: ops.initializer(c.weight_input(q), weights[q]) for q in weight_names(mod.nodes)}
        stats = {q: ops.initializer(c.stat_input(q), weights[q]) for q in stat_names(mod.nodes)}
        last = mod.index == len(specs) - 1
        out = run_module(ops, mod, GraphSpec(c.EVAL, 1, manifest.get("bn_mode", "train")), last, h, None,
                         params, {}, stats)
        h = out[c.LOGITS] if last else out[c.Y]
    assert h is not x
    probs = ops.softmax(h, 1) if softmax else None
    ops.output(c.LOGITS, h)
    if probs is not None:
        ops.output(PROBABILITIES, probs)
    model = ops.model()
    onnx.checker.check_model(model, full_check=True)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph computing in float16: float initializers and casts converted, a cast after the
    input and before each output (the interface stays float32). Resize's scales stay float32."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep32 = {n.input[2] for n in g.node if n.op_type == "Resize" and len(n.input) > 2}
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT and t.name not in keep32:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    name = g.input[0].name
    for n in g.node:
        n.input[:] = [f"{name}_fp16" if i == name else i for i in n.input]
    casts_in = [helper.make_node("Cast", [name], [f"{name}_fp16"], name="cast_input_fp16", to=TensorProto.FLOAT16)]
    casts_out = []
    for out in g.output:
        for n in g.node:
            n.output[:] = [f"{out.name}_fp16" if o == out.name else o for o in n.output]
            n.input[:] = [f"{out.name}_fp16" if i == out.name else i for i in n.input]
        casts_out.append(helper.make_node("Cast", [f"{out.name}_fp16"], [out.name], name=f"cast_{out.name}_fp32",
                                          to=TensorProto.FLOAT))
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


def export_inference(artifacts_dir: str | Path, out: str | Path, weights: Mapping[str, np.ndarray] | None = None,
                     softmax: bool = False, fp16: bool = False) -> onnx.ModelProto:
    """Write ``out`` (one .onnx file) for the artifacts' model with ``weights`` (default: the
    artifacts' initial weights; a run's are ``checkpoint.model_state``); returns the model."""
    arts = load_artifacts(artifacts_dir)
    model = build_inference(arts.manifest, arts.weights if weights is None else weights, softmax)
    if fp16:
        model = to_fp16(model)
    Path(out).write_bytes(model.SerializeToString())
    return model
