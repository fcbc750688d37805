"""Run a module's part of the traced graph with torch's own operations: the oracle.

Validation and the reference trainer must not share the dual rules they check, so a module here
re-runs the fx operations its program nodes came from (``Node.source``): the model's own layers
(via ``functional_call``, with substituted weights), torch functions and tensor methods. Numbers
that depend on the batch size (``x.size(0)``) are taken from the traced runs at batch 2 and 3
(lockstep.at_batch), so a module can start anywhere in the graph.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from asyncfgd.runtime.dual.program import ModuleSpec, Node

from .lockstep import at_batch

#: (fx node name, program node, its torch inputs, its torch output) for each traced operation run
Observer = Callable[[str, list[Node], tuple, Any], None]
_TRACE_ATTR = "_asyncfgd_trace"


def remember(model: nn.Module, trace: Any) -> None:
    """Keep the model's latest trace (exporter.trace.Traced) on the model for the oracle: outside
    nn.Module's registries (no new submodule or state), and copied along with the model."""
    object.__setattr__(model, _TRACE_ATTR, trace)


def traced(model: nn.Module) -> Any:
    trace = model.__dict__.get(_TRACE_ATTR)
    if trace is None:
        raise ValueError("the model has not been traced (exporter.trace.trace) in this process")
    return trace


_observers: list[Observer] = []


@contextmanager
def observing(fn: Observer) -> Iterator[None]:
    """Call ``fn`` for every traced operation the oracle runs inside the block (validation's kink finder)."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


def run_segment(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``_run_segment`` with torch's attention in its composite form: the fused kernels (and the
    transformer layers' fast path) have no forward-mode derivative (torch.func.jvp fails on them)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            return _run_segment(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _run_segment(model: nn.Module, mod: ModuleSpec, x: torch.Tensor,
                params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None,
                masks: dict[str, torch.Tensor] | None = None,
                shift: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Module ``mod`` of ``model`` on x with ``params`` substituted; ``buffers`` are BatchNorm
    statistics (None: batch statistics, none updated; else updated in place in train mode),
    ``masks`` the dropout masks by program node name (none: dropout is the identity), and ``shift``
    values added to the outputs of the named program nodes (activity perturbation's δ)."""
    tr = traced(model)
    gm: fx.GraphModule = tr.graph
    by_source: dict[str, list[Node]] = {}
    for node in mod.nodes:
        by_source.setdefault(node.source, []).append(node)
    producer = next((n for m in [tr.program] for n in m if n.name == mod.input), None)
    start = "input" if producer is None else producer.source
    start_node = next((n for n in gm.graph.nodes if n.name == start), None)
    env: dict[str, Any] = {}
    n_batch = x.shape[0]
    layers = dict(model.named_modules())
    result: Any = None
    started = start == "input"
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        if n.name == start or (n.op == "placeholder" and start == "input"):
            env[n.name], started = x, True
            continue
        if n.name in tr.numbers:
            a, b = tr.numbers[n.name]
            env[n.name] = at_batch(a, b, n_batch)
            continue
        if n.op == "get_attr":
            env[n.name] = params.get(str(n.target), _attr(model, str(n.target)))
            continue
        if not started or not all(a.name in env for a in n.all_input_nodes):
            continue  # an earlier module's operation
        args = fx.node.map_arg(n.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
        nodes = by_source.get(n.name, [])
        if n.target is operator.getitem and n.args[0] == start_node and isinstance(args[0], torch.Tensor):
            out: Any = args[0]  # the module starts at a layer's first output (attention's (out, weights))
        else:
            out = _run(n, nodes, layers, args, kwargs, params, buffers, masks)
        if shift and nodes and nodes[-1].name in shift:
            out = out + shift[nodes[-1].name]
        for watch in _observers:
            if nodes:
                watch(n.name, nodes, args, out)
        env[n.name] = result = out
        if any(nd.name == mod.output for nd in nodes):
            break
    return result[0] if isinstance(result, tuple) else result


def _attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run(n: fx.Node, nodes: list[Node], layers: dict[str, nn.Module], args: tuple, kwargs: dict,
         params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None,
         masks: dict[str, torch.Tensor] | None) -> Any:
    drop = next((nd for nd in nodes if nd.op == "dropout"), None)
    if drop is not None:  # the runtime's mask, not torch's own draw
        mask = (masks or {}).get(drop.name)
        return args[0] if mask is None else args[0] * mask.to(args[0].dtype)
    if n.op == "call_module":
        qual = str(n.target)
        layer = layers[qual]
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            # the layer's own kernel, minus its num_batches_tracked counter (torch.func cannot
            # mutate captured tensors); buffers=None: train mode without touching running statistics
            bn = next(nd for nd in nodes if nd.op == "batchnorm2d")
            stats = (None, None) if buffers is None else (buffers[bn.buffers["running_mean"]],
                                                          buffers[bn.buffers["running_var"]])
            local = {r: params[q] for r, q in bn.params.items()}
            return torch.nn.functional.batch_norm(args[0], stats[0], stats[1], local.get("weight"), local.get("bias"),
                                                  layer.training or buffers is None, float(bn.attrs["momentum"]),
                                                  layer.eps)
        local = {q[len(qual) + 1:]: params[q] for nd in nodes for q in nd.params.values() if q.startswith(qual + ".")}
        return functional_call(layer, local, args, kwargs) if local else layer(*args, **kwargs)
    if n.op == "call_method":
        self_, *rest = args
        return getattr(self_, str(n.target))(*rest, **kwargs)
    return n.target(*args, **kwargs)  # type: ignore[operator]
