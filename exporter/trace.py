"""Model → program (``asyncfgd.runtime.dual.program``): trace a torch model's operations into nodes.

torch.fx traces the model (exporter/tracing/graph.py); layers with their own dual rules stay
whole, everything else is traced down to functions and tensor methods, and each operation is
converted into program nodes (tracing/functions.py, tracing/layers.py). The traced graph also
runs at two batch sizes (tracing/lockstep.py), which tells per-sample values from weights and
catches operations that mix samples. Anything without a rule is reported with the operation, the
module path and the user's source line (``UnsupportedLayerError``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asyncfgd.runtime.dual.program import Node

from .tracing.builder import BatchSized, Builder, ParamRef, Site, UnsupportedLayerError, Val
from .tracing.functions import FUNCTIONS, METHODS
from .tracing.graph import DROP_PATH_CLASSES, source_line, trace_graph
from .tracing.layers import LAYER_TYPES, LAYERS, drop_path_layer
from .tracing.lockstep import is_batched, run_lockstep, same
from .tracing.replay import remember

__all__ = ["SUPPORTED_LAYERS", "SUPPORTED_OPS", "Traced", "UnsupportedLayerError", "trace", "trace_model"]

#: constants (buffers other than BatchNorm statistics) stored in the program up to this size
MAX_CONSTANT = 1 << 16


@dataclass
class Traced:
    """A traced model: its program, the fx graph it came from and the non-tensor values (sizes)
    the traced runs saw at both batch sizes (tracing/replay.py re-runs the graph with them)."""

    program: list[Node]
    graph: fx.GraphModule
    numbers: dict[str, tuple[Any, Any]]


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> list[Node]:
    """The model's program, with output shapes and per-sample FLOPs."""
    return trace_model(model, input_shape).program


def trace_model(model: nn.Module, input_shape: tuple[int, ...]) -> Traced:
    try:
        gm = trace_graph(model, LAYER_TYPES)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        raise UnsupportedLayerError(f"the model cannot be traced with torch.fx: {exc}") from exc
    try:
        runs = run_lockstep(gm, tuple(input_shape))
    except Exception as exc:
        raise UnsupportedLayerError(f"the model does not run on inputs of shape (batch, "
                                    f"{', '.join(map(str, input_shape))}): {exc}") from exc
    b = Builder()
    vals: dict[str, Any] = {}
    numbers: dict[str, tuple[Any, Any]] = {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    modules = dict(model.named_modules())
    output: Any = None
    for n in gm.graph.nodes:
        b.site = Site(n.name, [k for k in n.meta.get("nn_module_stack", {}) if k], source_line(n))
        if n.op == "placeholder":
            if vals:
                raise UnsupportedLayerError(f"the model's forward takes more than one input ({n.name})")
            vals[n.name] = Val("input", tuple(input_shape), True)
            continue
        if n.op == "output":
            output = _lookup(vals, n.args[0])
            continue
        a, c = runs[n.name]
        if n.op == "get_attr":
            vals[n.name] = _attribute(b, str(n.target), a, params, buffers)
            continue
        args = _lookup(vals, n.args)
        kwargs = _lookup(vals, n.kwargs)
        if not _has_tensor(a):  # sizes, shapes, asserts: numbers, kept for the oracle's replay
            vals[n.name] = a if same(a, c) else BatchSized(a, c)
            numbers[n.name] = (a, c)
            continue
        b.observed = _observed(b, n, a, c, args, kwargs)
        vals[n.name] = _convert(b, n, modules, args, kwargs)
        _check(b, n, vals[n.name], a)
    if not isinstance(output, Val) or not output.batched:
        raise UnsupportedLayerError("the model's forward must return one tensor computed from its input")
    if output.name == "input":
        raise UnsupportedLayerError("the model returns its input unchanged")
    program = _live(b.program, output.name)
    _annotate(program, tuple(input_shape), params)
    result = Traced(program, gm, numbers)
    remember(model, result)
    return result


def _lookup(vals: dict[str, Any], a: Any) -> Any:
    if isinstance(a, fx.Node):
        return vals[a.name]
    if isinstance(a, (list, tuple)):
        return type(a)(_lookup(vals, x) for x in a)
    if isinstance(a, dict):
        return {k: _lookup(vals, v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_lookup(vals, a.start), _lookup(vals, a.stop), _lookup(vals, a.step))
    return a


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (list, tuple)) and any(_has_tensor(x) for x in v)


def _attribute(b: Builder, target: str, a: Any, params: dict, buffers: dict) -> Any:
    if target in params:
        return ParamRef(target, tuple(params[target].shape))
    if isinstance(a, torch.Tensor):
        if a.numel() > MAX_CONSTANT:
            raise b.fail(f"the constant tensor '{target}' has {a.numel()} elements (at most {MAX_CONSTANT} are "
                         f"stored in the program)")
        if not a.is_floating_point():
            raise b.fail(f"the integer tensor '{target}' is not supported (index tensors have no rule)")
        return b.emit("constant", [], tuple(a.shape), False, {"value": a.detach().double().flatten().tolist()})
    return a


def _observed(b: Builder, n: fx.Node, a: Any, c: Any, args: Any, kwargs: Any) -> Val | None:
    """The operation's output as the traced runs saw it (the first tensor of a tuple output)."""
    if isinstance(a, (tuple, list)):
        return None
    if not isinstance(a, torch.Tensor):
        return None
    if is_batched(a, c):
        return Val("", tuple(a.shape[1:]), True)
    inputs_batched = _any_batched(args) or _any_batched(kwargs)
    if inputs_batched or a.shape != c.shape:
        raise b.fail(f"{_what(n)} mixes the samples of the batch (output {tuple(a.shape)} at batch 2, "
                     f"{tuple(c.shape)} at batch 3). A reshape that merges the batch axis into another one cannot "
                     f"be expressed per sample: keep the batch first, e.g. x.view(x.size(0), -1) or "
                     f"x.reshape(B, heads, L, d) instead of x.view(B * heads, L, d)")
    return Val("", tuple(a.shape), False)


def _any_batched(v: Any) -> bool:
    """Whether a call's arguments (nested lists, tuples, dicts) hold a per-sample value."""
    if isinstance(v, Val):
        return v.batched
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
    return any(_any_batched(x) for x in items)


def _what(n: fx.Node) -> str:
    if n.op == "call_method":
        return f"tensor method '.{n.target}()'"
    return f"'{getattr(n.target, '__name__', n.target)}'"


def _convert(b: Builder, n: fx.Node, modules: dict[str, nn.Module], args: Any, kwargs: Any) -> Any:
    if n.op == "call_module":
        m = modules[str(n.target)]
        conv: Any = LAYERS.get(type(m)) or (drop_path_layer if type(m).__name__ in DROP_PATH_CLASSES else None)
        if conv is None:
            line = f" ({b.site.line})" if b.site.line else ""
            raise UnsupportedLayerError(f"layer '{n.target}' ({type(m).__name__}){line} has no dual rule. Supported "
                                        f"layers: {', '.join(SUPPORTED_LAYERS)}")
        call = lambda: conv(b, m, str(n.target), *args, **kwargs)  # noqa: E731
    else:
        fn = METHODS.get(str(n.target)) if n.op == "call_method" else FUNCTIONS.get(n.target)
        if fn is None and n.op == "call_function" and getattr(n.target, "__name__", "") in ("drop_path",
                                                                                        "stochastic_depth"):
            fn = _wrapped_drop_path
        if fn is None:
            raise b.fail(f"{_what(n)} has no dual rule. Supported operations: {', '.join(SUPPORTED_OPS)}")
        call = lambda: fn(b, *args, **kwargs)  # noqa: E731
    try:
        return call()
    except TypeError as exc:
        raise b.fail(f"{_what(n)} is called with arguments its rule does not take ({exc})") from None


def _wrapped_drop_path(b: Builder, input: Any, p: Any = 0.0, *_: Any, **kw: Any) -> Val:
    from .tracing.layers import dropout_node

    prob = kw.get("drop_prob", kw.get("p", p))
    return dropout_node(b, b.value(input), float(prob), True, None)


def _check(b: Builder, n: fx.Node, v: Any, a: Any) -> None:
    """The converter's shape must be what torch computed: a converter bug fails here, not later."""
    if isinstance(v, Val) and isinstance(a, torch.Tensor):
        want = tuple(a.shape[1:]) if v.batched else tuple(a.shape)
        if v.shape != want:
            raise b.fail(f"internal: converted shape {v.shape} differs from torch's {want}")


def _live(program: list[Node], output: str) -> list[Node]:
    """The nodes the output depends on, in order (a weight read but unused leaves nothing behind)."""
    needed, kept = {output}, []
    for node in reversed(program):
        if node.name in needed:
            kept.append(node)
            needed.update(node.inputs)
    kept.reverse()
    if kept[-1].name != output:
        raise UnsupportedLayerError("the model's output must be its last operation")
    return kept


def _annotate(program: list[Node], input_shape: tuple[int, ...], params: Mapping[str, torch.Tensor]) -> None:
    """Per-sample forward multiply-adds of each node and its trainable elements."""
    shapes = {"input": input_shape, **{n.name: tuple(n.shape) for n in program}}
    for node in program:
        node.weights = sum(params[q].numel() for q in node.params.values())
        out = math.prod(node.shape)
        ins = [shapes[i] for i in node.inputs if i in shapes]
        if not node.batched:
            node.flops = 0
        elif node.op == "linear":
            node.flops = out * int(params[node.params["weight"]].shape[1])
        elif node.op in ("conv2d", "conv1d"):
            node.flops = out * math.prod(params[node.params["weight"]].shape[1:])
        elif node.op == "matmul":
            node.flops = out * int(ins[0][-1])
        else:
            node.flops = max([out, *(math.prod(s) for s in ins)])


SUPPORTED_LAYERS = ("Linear", "Conv1d", "Conv2d (any groups, stride, dilation, 'same'/'valid')", "BatchNorm1d",
                    "BatchNorm2d", "LayerNorm", "GroupNorm", "ReLU", "ReLU6", "Hardtanh", "LeakyReLU", "ELU", "GELU",
                    "SiLU", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Softplus", "Mish", "Softmax",
                    "LogSoftmax", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Upsample",
                    "Flatten", "Unflatten", "Dropout", "DropPath/StochasticDepth", "Identity",
                    "MultiheadAttention (self, batch_first)", "TransformerEncoderLayer (batch_first)",
                    "TransformerEncoder")
SUPPORTED_OPS = ("+ - * / ** neg abs", "relu/sigmoid/tanh/exp/log/sqrt/rsqrt/clamp and F.* activations",
                 "view/reshape/flatten",
                 "squeeze/unsqueeze", "permute/transpose", "expand", "indexing and slicing", "cat/stack",
                 "split/chunk/unbind", "mean/sum/amax/max(dim)/var/std", "matmul/bmm/@/two-operand einsum",
                 "softmax/log_softmax",
                 "scaled_dot_product_attention", "F.linear/conv1d/conv2d/layer_norm/group_norm/pooling/interpolate",
                 "F.dropout", "F.normalize", "F.pad (constant)", "zeros_like/ones_like/full_like",
                 "contiguous/clone/detach")
