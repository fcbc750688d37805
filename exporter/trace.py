"""Model → program (``asyncfgd.runtime.dual.program``): trace a torch model into layer nodes.

Tracing uses torch.fx: leaf modules of known types become nodes, residual ``+`` becomes an
``add`` node. Anything else is reported with the layer's name (see ``UnsupportedLayerError``).
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np

from asyncfgd.runtime.dual.program import Node


class UnsupportedLayerError(ValueError):
    """A layer or operation has no dual rule."""


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _convert_module(mod: Any) -> tuple[str, dict[str, Any], list[str], list[str]]:
    """(op, attrs, param roles, buffer roles) for a supported leaf module."""
    import torch.nn as nn

    if isinstance(mod, nn.Linear):
        return "linear", {}, ["weight", "bias"], []
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise UnsupportedLayerError("only zero padding given as numbers is supported for Conv2d")
        return "conv2d", {"stride": _pair(mod.stride), "padding": _pair(mod.padding),
                          "dilation": _pair(mod.dilation), "groups": int(mod.groups)}, ["weight", "bias"], []
    if isinstance(mod, nn.BatchNorm2d):
        if not mod.track_running_stats or mod.momentum is None:
            raise UnsupportedLayerError("BatchNorm2d needs track_running_stats=True and a numeric momentum")
        return "batchnorm2d", {"eps": float(mod.eps), "momentum": float(mod.momentum)}, ["weight", "bias"], \
            ["running_mean", "running_var"]
    if isinstance(mod, nn.LayerNorm):
        return ("layernorm", {"normalized_shape": list(mod.normalized_shape), "eps": float(mod.eps)},
                ["weight", "bias"], [])
    if isinstance(mod, nn.ReLU6):
        return "relu6", {}, [], []
    if isinstance(mod, nn.ReLU):
        return "relu", {}, [], []
    if isinstance(mod, nn.GELU):
        return "gelu", {"approximate": mod.approximate}, [], []
    if isinstance(mod, nn.MaxPool2d):
        if mod.return_indices:
            raise UnsupportedLayerError("MaxPool2d(return_indices=True) is not supported")
        return "maxpool2d", {"kernel": _pair(mod.kernel_size), "stride": _pair(mod.stride or mod.kernel_size),
                             "padding": _pair(mod.padding), "dilation": _pair(mod.dilation),
                             "ceil_mode": bool(mod.ceil_mode)}, [], []
    if isinstance(mod, nn.AvgPool2d):
        if mod.divisor_override is not None:
            raise UnsupportedLayerError("AvgPool2d(divisor_override=...) is not supported")
        return "avgpool2d", {"kernel": _pair(mod.kernel_size), "stride": _pair(mod.stride or mod.kernel_size),
                             "padding": _pair(mod.padding), "ceil_mode": bool(mod.ceil_mode),
                             "count_include_pad": bool(mod.count_include_pad)}, [], []
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        if _pair(mod.output_size) != [1, 1]:
            raise UnsupportedLayerError("AdaptiveAvgPool2d is supported only with output size 1")
        return "global_avgpool", {}, [], []
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise UnsupportedLayerError("Flatten is supported only with start_dim=1, end_dim=-1")
        return "flatten", {}, [], []
    if isinstance(mod, (nn.Dropout, nn.Identity)):
        # Dropout is the identity: a random mask would need its own seeded tangent bookkeeping.
        return "identity", {}, [], []
    raise UnsupportedLayerError(f"no dual rule for {type(mod).__name__}")


def _convert_function(node: Any) -> tuple[str, dict[str, Any]] | None:
    import torch

    if node.op == "call_function" and node.target in (operator.add, torch.add):
        return "add", {}
    if node.op == "call_function" and node.target is torch.flatten:
        if node.args[1:] not in ((1,),) or node.kwargs:
            return None
        return "flatten", {}
    if node.op == "call_method" and node.target == "flatten" and tuple(node.args[1:]) == (1,):
        return "flatten", {}
    return None


def trace(model: Any, input_shape: tuple[int, ...]) -> list[Node]:
    """Trace ``model`` into a program with output shapes and per-sample FLOPs.

    Shapes come from running the traced graph once (eval mode, batch 2, no effect on BN stats).
    """
    import torch.fx as fx
    import torch.nn as nn

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and (
                super().is_leaf_module(m, qualname) or not list(m.children()))

    try:
        graph = LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable python control flow
        raise UnsupportedLayerError(f"the model cannot be traced with torch.fx: {exc}") from exc
    gm = fx.GraphModule(model, graph)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    program: list[Node] = []
    rename: dict[str, str] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            if rename:
                raise UnsupportedLayerError(f"model forward takes more than one input ({n.name})")
            rename[n.name] = "input"
            continue
        if n.op == "output":
            if not isinstance(n.args[0], fx.Node):
                raise UnsupportedLayerError("model forward must return a single tensor")
            output = rename[n.args[0].name]
            continue
        args = [a for a in n.args if isinstance(a, fx.Node)]
        if n.op == "call_module":
            mod = modules[n.target]
            try:
                op, attrs, proles, broles = _convert_module(mod)
            except UnsupportedLayerError as exc:
                raise UnsupportedLayerError(f"layer '{n.target}' ({type(mod).__name__}): {exc}. "
                                            f"Supported layers: {', '.join(SUPPORTED)}") from None
            pmap = {r: f"{n.target}.{r}" for r in proles if f"{n.target}.{r}" in params}
            bmap = {r: f"{n.target}.{r}" for r in broles if f"{n.target}.{r}" in buffers}
            name = str(n.target)
        else:
            conv = _convert_function(n)
            if conv is None:
                what = getattr(n.target, "__name__", str(n.target))
                raise UnsupportedLayerError(f"operation '{what}' at '{n.name}' has no dual rule; write it with "
                                            f"supported layers ({', '.join(SUPPORTED)}) or residual '+'")
            scope = [k for k in n.meta.get("nn_module_stack", {}) if k]
            (op, attrs), pmap, bmap = conv, {}, {}
            name = _unique(f"{scope[-1]}.{op}" if scope else n.name, {p.name for p in program})
        scopes = [k for k in n.meta.get("nn_module_stack", {}) if k]
        program.append(Node(name=name, op=op, inputs=[rename[a.name] for a in args], attrs=attrs,
                            params=pmap, buffers=bmap, scopes=scopes))
        rename[n.name] = name
    if program and program[-1].name != output:
        raise UnsupportedLayerError("the model's output must be its last operation")
    _annotate(gm, program, input_shape)
    return program


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


SUPPORTED = ("Linear", "Conv2d (incl. grouped/depthwise)", "BatchNorm2d", "LayerNorm", "ReLU", "ReLU6", "GELU",
             "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d(1)", "Flatten", "Dropout", "Identity")


def _annotate(gm: Any, program: list[Node], input_shape: tuple[int, ...]) -> None:
    """Fill each node's output shape and per-sample forward FLOPs (multiply-adds)."""
    import torch
    import torch.fx as fx

    shapes: dict[str, tuple[int, ...]] = {}
    modes = {m: m.training for m in gm.modules()}  # restored per module: mixed modes (eval + train BN) survive
    gm.eval()
    with torch.no_grad():
        dtype = next((p.dtype for p in gm.parameters()), torch.float32)
        x = torch.zeros((2, *input_shape), dtype=dtype)

        class Rec(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if isinstance(out, torch.Tensor):
                    shapes[n.name] = tuple(out.shape[1:])
                return out

        Rec(gm).run(x)
    for m, training in modes.items():
        m.training = training
    shapes["input"] = tuple(input_shape)
    mods = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    by_name = {n.name: n for n in program}
    fx_names = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    for node, fx_name in zip(program, fx_names, strict=False):
        node.shape = list(shapes[fx_name])
        node.weights = sum(params[q].numel() for q in node.params.values())
        out = int(np.prod(node.shape))
        in_shape = tuple(by_name[node.inputs[0]].shape) if node.inputs[0] != "input" else tuple(input_shape)
        if node.op == "linear":
            node.flops = int(np.prod(mods[node.name].weight.shape))
        elif node.op == "conv2d":
            w = mods[node.name].weight
            node.flops = out * int(np.prod(w.shape[1:]))
        else:
            node.flops = max(out, int(np.prod(in_shape)) if in_shape else 0)
