"""What the exporter makes of a model, without exporting it (``asyncfgd-app export --check``).

``check(model, input_shape)`` traces the model (``trace.trace_model``) and reports the program's
operations, its size, its trainable parameters and where it can be cut into pipeline modules
(``split.cut_points``); when the trace fails, it keeps the tracer's message (operation, module path,
source line) and also lists **every** operation of the model that has no dual rule, not only the
first one the tracer stopped at, so one check shows all that a model needs. ``format_report``
turns it into the text the command prints.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asyncfgd.runtime.dual.rules import RULES

from .split import cut_points
from .trace import UnsupportedLayerError, trace_model
from .tracing.functions import FUNCTIONS, METHODS
from .tracing.graph import DROP_PATH_CLASSES, source_line, trace_graph
from .tracing.layers import LAYER_TYPES, LAYERS
from .tracing.lockstep import run_lockstep

#: cut names shown by ``format_report`` (``Report.cuts`` holds them all)
SHOWN_CUTS = 8
#: functions the tracer handles by name (timm's and torchvision's drop-path)
_DROP_PATH_FUNCTIONS = ("drop_path", "stochastic_depth")


@dataclass(frozen=True)
class Missing:
    """One operation of the model without a dual rule: what it is, where, and how often it runs."""

    what: str  # as the tracer names it: 'cumsum', tensor method '.cumprod()', layer 'rnn' (LSTM)
    scope: str  # the innermost module path it runs in ("" at the top level)
    line: str  # file:line: code of the user's source ("" when fx recorded none)
    count: int = 1


@dataclass
class Report:
    """The outcome of ``check``: ``error`` is None when every operation has a dual rule."""

    input_shape: tuple[int, ...]
    parameters: int  # trainable elements of the model (requires_grad)
    ops: dict[str, int] = field(default_factory=dict)  # program node op -> count, in program order
    nodes: int = 0
    program_weights: int = 0  # trainable elements the program reads (the ones FGD trains)
    cuts: list[str] = field(default_factory=list)  # names of the nodes a pipeline module may start at
    error: str | None = None
    missing: list[Missing] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def max_modules(self) -> int:
        """The largest K for ``--modules K`` (each module boundary is one single-value cut)."""
        return len(self.cuts) + 1


def check(model: nn.Module, input_shape: tuple[int, ...]) -> Report:
    """Trace ``model`` for per-sample inputs of ``input_shape`` and report what the exporter can do with it."""
    shape = tuple(input_shape)
    report = Report(shape, sum(p.numel() for p in model.parameters() if p.requires_grad))
    try:
        program = trace_model(model, shape).program
    except UnsupportedLayerError as exc:
        report.error = str(exc)
        report.missing = missing_rules(model, shape)
        return report
    for node in program:
        report.ops[node.op] = report.ops.get(node.op, 0) + 1
    report.nodes = len(program)
    report.program_weights = sum(node.weights for node in program)
    report.cuts = [program[i].name for i in cut_points(program)]
    unknown = [op for op in report.ops if op not in RULES]
    if unknown:  # a tracer converter that emits an op the runtime cannot run: an exporter bug
        report.error = (f"internal: the traced program uses operation(s) {', '.join(unknown)} that the runtime's "
                        f"dual rules (runtime/dual/rules) do not define; please report this")
    return report


def missing_rules(model: nn.Module, input_shape: tuple[int, ...]) -> list[Missing]:
    """Every operation in the model's fx graph that returns a tensor and has no converter, grouped by
    operation and source line; empty when the model cannot even be traced or run."""
    try:
        gm = trace_graph(model, LAYER_TYPES)
        runs = run_lockstep(gm, tuple(input_shape))
    except Exception:  # the tracer's own message already says why
        return []
    modules = dict(model.named_modules())
    found: dict[tuple[str, str], Missing] = {}
    unsupported: set[str] = set()  # fx names of the operations found, and of the parts taken of their results
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method") or _has_rule(n, modules):
            continue
        if not _has_tensor(runs.get(n.name, (None, None))[0]):
            continue  # sizes and shapes need no rule
        if n.target in (getattr, operator.getitem) and isinstance(n.args[0], fx.Node) \
                and n.args[0].name in unsupported:
            unsupported.add(n.name)  # torch.max(x, 1).values: max is the problem, not getattr
            continue
        unsupported.add(n.name)
        what = _what(n, modules)
        scopes = [k for k in n.meta.get("nn_module_stack", {}) if k]
        line = source_line(n)
        key = (what, line)
        if key in found:
            prev = found[key]
            found[key] = Missing(prev.what, prev.scope, prev.line, prev.count + 1)
        else:
            found[key] = Missing(what, scopes[-1] if scopes else "", line)
    return list(found.values())


def _has_rule(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        m = modules.get(str(n.target))
        return m is not None and (type(m) in LAYERS or type(m).__name__ in DROP_PATH_CLASSES)
    if n.op == "call_method":
        return str(n.target) in METHODS
    try:
        if n.target in FUNCTIONS:
            return True
    except TypeError:  # an unhashable target
        pass
    return getattr(n.target, "__name__", "") in _DROP_PATH_FUNCTIONS


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (list, tuple)) and any(_has_tensor(x) for x in v)


def _what(n: fx.Node, modules: dict[str, nn.Module]) -> str:
    if n.op == "call_module":
        m = modules.get(str(n.target))
        return f"layer '{n.target}' ({type(m).__name__})"
    if n.op == "call_method":
        return f"tensor method '.{n.target}()'"
    return f"'{getattr(n.target, '__name__', n.target)}'"


def format_report(report: Report, model: str = "the model") -> str:
    """The text ``export --check`` prints: the op table and summary, then OK or what is missing."""
    shape = ",".join(map(str, report.input_shape))
    lines = [f"{model}, input {shape}: {report.parameters:,} trainable parameters"]
    if report.ops:
        width = max(len("operation"), *(len(op) for op in report.ops))
        lines += ["", f"{'operation'.ljust(width)}  count"]
        lines += [f"{op.ljust(width)}  {count:5d}" for op, count in sorted(report.ops.items(),
                                                                          key=lambda kv: (-kv[1], kv[0]))]
        lines.append("")
        unused = report.parameters - report.program_weights
        lines.append(f"program nodes: {report.nodes}" + (f" ({report.program_weights:,} of the parameters are "
                                                          f"used; {unused:,} are not)" if unused else ""))
        shown = ", ".join(report.cuts[:SHOWN_CUTS]) + (f", ... (+{len(report.cuts) - SHOWN_CUTS} more)"
                                                       if len(report.cuts) > SHOWN_CUTS else "")
        lines.append(f"cut points: {len(report.cuts)} single-value cuts, so --modules up to {report.max_modules}"
                     + (f"; a module may start at: {shown}" if report.cuts else ""))
    if report.ok:
        lines += ["", "OK: every operation has a dual rule"]
        return "\n".join(lines)
    if len(report.missing) > 1:
        lines += ["", f"operations without a dual rule ({len(report.missing)}):"]
        for m in report.missing:
            where = f" in '{m.scope}'" if m.scope else ""
            times = f" x{m.count}" if m.count > 1 else ""
            lines.append(f"  {m.what}{times}{where}" + (f": {m.line}" if m.line else ""))
    return "\n".join(lines)
