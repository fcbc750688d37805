"""Model → artifact directory: manifest.json, one ONNX file per (module, role), weights.npz.

The directory layout and manifest are the contract with the device (docs/artifacts.md); the
runtime reads nothing else.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from asyncfgd.runtime import contract as c
from asyncfgd.runtime.dual.activity import PlanError, plan
from asyncfgd.runtime.dual.interpreter import GraphSpec, module_roles
from asyncfgd.runtime.dual.program import ModuleSpec, stat_names, weight_names
from asyncfgd.runtime.masks import dropout_sites

from .graphs import build_onnx
from .local_heads import aux_head, init_aux_weights
from .split import StepCost, split_program
from .trace import trace

#: local-activity heads pool a feature map to this grid and give each channel its own classifier and
#: loss (docs/convergence.md)
ACTIVITY_HEAD_GRID = 2


def _layer_of(qualified: str) -> str:
    return qualified.rsplit(".", 1)[0]


def export_model(model: Any, out_dir: str | Path, input_shape: tuple[int, int, int], num_classes: int,
                 modules: int | None = None, split_at: list[str] | None = None, bn_mode: str = "train",
                 tangents: int = 1, model_spec: dict[str, Any] | None = None, local_heads: bool = False,
                 seed: int = 0, balance_batch: int = 64, activity: bool = False,
                 perturb: dict[str, str] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Trace, split and export ``model``; returns the manifest written to ``out_dir``.

    ``model_spec`` ({"name", "config"}) lets tools rebuild a zoo model; user models get
    ``{"name": "custom"}`` and are still fully described by the stored programs.
    ``local_heads`` adds an auxiliary classifier to every non-last module and a ``local`` graph
    role (the experimental local-loss mode, local_heads.py); ``seed`` initialises those heads.
    ``activity`` adds local heads and the ``activity`` role (the local-activity method,
    runtime/dual/activity.py), each layer perturbed as ``perturb`` (layer name -> ``activity`` |
    ``weight``) says, else as the variance rule chooses for ``balance_batch``.
    ``balance_batch`` is the training mini-batch size: an automatic split (``modules``) is
    balanced for it (split.py: per-weight work weighs more at small batches), and the rules pick
    their faster graph forms for it (``tuned_batch`` in the manifest; any batch size still runs).
    """
    if bn_mode not in c.BN_MODES:
        raise ValueError(f"bn_mode must be one of {c.BN_MODES}, got {bn_mode!r}")
    if tangents < 1:
        raise ValueError("tangents must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    program = trace(model, tuple(input_shape))
    specs = split_program(program, modules=modules, at=split_at, cost=StepCost(balance_batch, tangents))
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    shapes = {k: list(v.shape) for k, v in state.items()}
    out_shapes = {n.name: n.shape for n in program}
    if perturb:
        unknown = sorted(set(perturb) - {n.name for n in program})
        if unknown:
            raise PlanError(f"--perturb names layers the model does not have: {', '.join(unknown)}; "
                            f"its layers with weights: {', '.join(n.name for n in program if n.params)}")
    if local_heads or activity:
        for mod in specs[:-1]:
            shape = out_shapes[mod.output]
            mod.aux = aux_head(mod, shape, num_classes, ACTIVITY_HEAD_GRID if activity else 1,
                               shape[0] if activity and len(shape) == 3 else 1)
            aux_w = init_aux_weights(mod.aux, num_classes, seed)
            state.update(aux_w)
            shapes.update({k: list(v.shape) for k, v in aux_w.items()})
    if activity:
        for mod in specs:
            mod.activity = plan(mod.nodes, mod.aux, balance_batch, bn_mode == "train", perturb)
    manifest_modules = []
    for mod in specs:
        is_last = mod.index == len(specs) - 1
        in_shape = list(input_shape) if mod.index == 0 else out_shapes[mod.input]
        graphs = {}
        for role in module_roles(mod):
            if progress:
                progress(f"module {mod.index} {role}")
            spec = GraphSpec(role, tangents, bn_mode, balance_batch)
            model_proto = build_onnx(mod, spec, is_last, in_shape, num_classes, shapes)
            fname = c.graph_file(mod.index, role)
            data = model_proto.SerializeToString()
            (out / fname).write_bytes(data)
            graphs[role] = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(),
                            "inputs": [i.name for i in model_proto.graph.input],
                            "outputs": [o.name for o in model_proto.graph.output]}
        manifest_modules.append(_module_entry(mod, is_last, in_shape, out_shapes[mod.output], shapes, graphs))
    np.savez(out / c.WEIGHTS_FILE, **state)
    manifest = {
        "format": c.FORMAT, "format_version": c.FORMAT_VERSION, "opset": c.OPSET,
        "model": {**(model_spec or {"name": "custom", "config": {}}), "num_classes": int(num_classes),
                  "input_shape": [int(d) for d in input_shape]},
        "bn_mode": bn_mode, "tangents": int(tangents), "weights_file": c.WEIGHTS_FILE,
        "balance_batch": None if split_at else int(balance_batch),
        "tuned_batch": int(balance_batch),
        "modules": manifest_modules,
    }
    (out / c.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _module_entry(mod: ModuleSpec, is_last: bool, in_shape: list[int], out_shape: list[int],
                  shapes: dict[str, list[int]], graphs: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": mod.index, "is_last": is_last, "input": mod.input, "output": mod.output,
        "in_shape": in_shape, "out_shape": out_shape, "cost_flops": mod.cost,
        "layers": [n.name for n in mod.nodes],
        "params": [{"name": q, "shape": shapes[q], "dtype": "float32", "layer": _layer_of(q)}
                   for q in weight_names(mod.nodes + mod.aux)],
        "buffers": [{"name": q, "shape": shapes[q], "dtype": "float32", "layer": _layer_of(q)}
                    for q in stat_names(mod.nodes)],
        "graphs": graphs,
        "dropout": [d.to_dict() for d in dropout_sites(mod.nodes)],
        "program": [n.to_dict() for n in mod.nodes],
        "aux_program": [n.to_dict() for n in mod.aux],
        "activity": None if mod.activity is None else mod.activity.to_dict(),
    }
