"""Check an artifact directory against an independent float64 torch reference.

The graphs are emitted from our own dual rules, and a wrong rule yields plausible but wrong
tangents: training then degrades silently. So every graph is run in ONNX Runtime on random
inputs and compared with ``torch.func.jvp`` over the model's *own* nn.Module layers
(reference_modules), and the whole chain's ``loss_dot`` with the autograd gradient dotted with
the weight tangents. ``loss_dot`` is a sum of terms that cancel, so its error is measured
relative to the sum of the terms' magnitudes, not to its own value (shared/TOOLCHAIN.md).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.func import functional_call

from asyncfgd.runtime.artifacts import Artifacts, ModuleInfo, load_artifacts

from .export import module_specs
from .graphs import ROLES
from .models import build_model
from .reference_modules import cross_entropy, jvp_module, segment_fn, set_bn_training
from .split import ModuleSpec
from .trt_check import check_trt_compat

DUAL_ROLES = ("dual", "dual_first")
NA_SINGLE_VALUE = "n/a (train BN over 1 value)"


@dataclass
class ValidationRow:
    """One graph (or the end-to-end chain, module "all") at one batch size."""

    module: str
    role: str
    batch: int
    err_y: float | None  # max relative error of the primal outputs (y | logits, loss; s_new.*)
    err_dot: float | None  # max relative error of ẏ, or of loss_dot relative to Σ|terms|
    status: str  # "pass" | "FAIL" | NA_SINGLE_VALUE


@dataclass
class ValidationReport:
    rows: list[ValidationRow]
    tol: float
    errors: list[str] = field(default_factory=list)  # checker / TensorRT / naming-contract failures
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors and all(r.status != "FAIL" for r in self.rows)

    def table(self) -> str:
        """The report as text: one line per row, then errors and warnings."""
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.1e}"

        head = f"{'module':>6}  {'role':<10}  {'batch':>5}  {'rel err y':>9}  {'rel err ẏ/dloss':>15}  result"
        lines = [head, "-" * len(head)]
        lines += [f"{r.module:>6}  {r.role:<10}  {r.batch:>5}  {fmt(r.err_y):>9}  {fmt(r.err_dot):>15}  {r.status}"
                  for r in self.rows]
        lines += [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict} (tolerance {self.tol:g}; loss_dot relative to the sum of |terms|)")
        return "\n".join(lines)


def validate_artifacts(artifacts_dir: str | Path, model: torch.nn.Module | None = None,
                       batch_sizes: tuple[int, ...] = (1, 64), seed: int = 0, tol: float = 1e-4) -> ValidationReport:
    """Validate every graph of ``artifacts_dir`` and the end-to-end dloss at each batch size.

    ``model`` is needed only for user-defined ("custom") models; zoo models are rebuilt from
    the manifest. The artifact's weights are loaded into a float64 copy, never into ``model``.
    """
    arts = load_artifacts(artifacts_dir)
    ref = reference_model(arts, model)
    specs = module_specs(arts.manifest)
    report = ValidationReport([], tol)
    sessions: dict[tuple[int, str], ort.InferenceSession] = {}
    for info in arts.modules:
        for role in info.graphs:
            sessions[info.index, role] = _open_checked(arts, info, role, report)
    for info, mod in zip(arts.modules, specs):
        for role in info.graphs:
            for n in batch_sizes:
                report.rows.append(_module_row(arts, ref, info, mod, role, sessions[info.index, role], n, seed, tol))
    for n in batch_sizes:
        report.rows.append(_end_to_end_row(arts, ref, specs, sessions, n, seed, tol))
    return report


def reference_model(arts: Artifacts, model: torch.nn.Module | None) -> torch.nn.Module:
    """A float64 copy of the exported model holding the artifact's weights (dropout off)."""
    spec = arts.manifest["model"]
    if model is None:
        if spec["name"] == "custom":
            raise ValueError(f"{arts.root} holds a user-defined model: pass the nn.Module (model=...) to validate it")
        with torch.random.fork_rng():  # the init is overwritten; keep the caller's RNG stream
            model = build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["config"])
    else:
        model = copy.deepcopy(model)
    state = model.state_dict()
    missing = [k for k in state if k not in arts.weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"the model has tensors the artifact's weights lack (e.g. {missing[:3]}): wrong model?")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arts.weights.items() if k in state}, strict=False)
    return model.double().eval()


def _open_checked(arts: Artifacts, info: ModuleInfo, role: str, report: ValidationReport) -> ort.InferenceSession:
    """Load a graph (checksum-verified), run the ONNX checker and the TensorRT check, open it in ORT."""
    where = f"module {info.index} {role}"
    data = arts.graph_bytes(info.index, role)
    proto = onnx.load_from_string(data)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        report.errors.append(f"{where}: onnx checker: {exc}")
    for issue in check_trt_compat(proto):
        (report.errors if issue.severity == "error" else report.warnings).append(f"{where}: TensorRT: {issue}")
    declared = (info.graphs[role]["inputs"], info.graphs[role]["outputs"])
    actual = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if [sorted(v) for v in declared] != [sorted(v) for v in actual]:
        report.errors.append(f"{where}: graph inputs/outputs {actual} differ from the manifest's {declared}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- random inputs


@dataclass
class _Inputs:
    """One set of random graph inputs, float32 (what ORT sees); the reference uses them in float64."""

    x: np.ndarray
    x_dot: np.ndarray | None
    tangents: dict[str, np.ndarray]  # (m, *shape) per weight
    stats: dict[str, np.ndarray]
    labels: np.ndarray  # integer class per sample


def _random_inputs(arts: Artifacts, infos: list[ModuleInfo], in_shape: list[int], n: int, with_x_dot: bool,
                   rng: np.random.Generator) -> _Inputs:
    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    m = arts.tangents
    stats = {}
    for info in infos:
        for b in info.buffers:
            v = normal(*b["shape"])
            stats[b["name"]] = np.abs(v) + 0.5 if b["name"].endswith("var") else 0.5 * v
    return _Inputs(x=normal(n, *in_shape), x_dot=normal(m, n, *in_shape) if with_x_dot else None,
                   tangents={p["name"]: normal(m, *p["shape"]) for info in infos for p in info.params},
                   stats=stats, labels=rng.integers(0, arts.num_classes, n))


def _feeds(arts: Artifacts, info: ModuleInfo, role: str, x: np.ndarray, x_dot: np.ndarray | None,
           inp: _Inputs) -> dict[str, np.ndarray]:
    """Graph inputs by the naming contract (docs/artifacts.md)."""
    feeds = {"x": x, **{f"s.{q}": inp.stats[q] for q in info.buffer_names},
             **{f"w.{q}": arts.weights[q] for q in info.param_names}}
    if role in DUAL_ROLES:
        feeds.update({f"u.{q}": inp.tangents[q] for q in info.param_names})
    if role == "dual":
        feeds["x_dot"] = x_dot
    if info.is_last and role != "eval":
        feeds["labels"] = np.eye(arts.num_classes, dtype=np.float32)[inp.labels]
    return feeds


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A stream per (module, role, batch): a row's inputs do not depend on which rows ran before."""
    return np.random.default_rng([seed, *keys])


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).double()


# --------------------------------------------------------------------------- per-module rows


def _single_value_bn(mod: ModuleSpec, in_shape: list[int], n: int) -> bool:
    """True if a BatchNorm would normalise one value per channel (batch 1, 1×1 map): undefined in train mode."""
    shapes = {mod.input: in_shape, **{node.name: node.shape for node in mod.nodes}}
    return any(node.op == "batchnorm2d" and n * int(np.prod(shapes[node.inputs[0]][1:])) == 1 for node in mod.nodes)


def _rel(a: Any, b: torch.Tensor) -> float:
    """max|a − b| / max|b|: the error relative to the reference's scale."""
    a = _t(a)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _status(errs: list[float | None], tol: float) -> str:
    return "pass" if all(e is None or e <= tol for e in errs) else "FAIL"


def _module_row(arts: Artifacts, ref: torch.nn.Module, info: ModuleInfo, mod: ModuleSpec, role: str,
                sess: ort.InferenceSession, n: int, seed: int, tol: float) -> ValidationRow:
    bn_train = arts.bn_mode == "train" and role != "eval"
    row = ValidationRow(str(info.index), role, n, None, None, "")
    if bn_train and _single_value_bn(mod, info.in_shape, n):
        row.status = NA_SINGLE_VALUE
        return row
    inp = _random_inputs(arts, [info], info.in_shape, n, role == "dual", _rng(seed, info.index, ROLES.index(role), n))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feeds(arts, info, role, inp.x, inp.x_dot, inp))))
    set_bn_training(ref, bn_train)
    stats = {q: _t(v) for q, v in inp.stats.items()}  # train-mode BN updates them: the reference s_new
    params = {q: _t(arts.weights[q]) for q in info.param_names}
    x = _t(inp.x)
    if role in DUAL_ROLES:
        pairs = [jvp_module(ref, mod, x, None if inp.x_dot is None else _t(inp.x_dot[j]), params,
                            {q: _t(u[j]) for q, u in inp.tangents.items()},
                            stats if j == 0 else {q: v.clone() for q, v in stats.items()})
                 for j in range(arts.tangents)]
        y, y_dots = pairs[0][0], torch.stack([yd for _, yd in pairs])
    else:
        with torch.no_grad():
            y, y_dots = segment_fn(ref, mod)(x, params, stats), None
    errs_y = [_rel(outs[f"s_new.{q}"], v) for q, v in stats.items() if bn_train]
    if not info.is_last:
        errs_y.append(_rel(outs["y"], y))
        row.err_dot = None if y_dots is None else _rel(outs["y_dot"], y_dots)
    else:
        errs_y.append(_rel(outs["logits"], y))
        if role != "eval":
            labels = torch.from_numpy(inp.labels)
            loss = cross_entropy(y, labels)
            errs_y.append(_rel(outs["loss"], loss.detach()))
            if y_dots is not None:
                row.err_dot = _loss_dot_error(outs["loss_dot"], y, y_dots, labels)
    row.err_y = max(errs_y)
    row.status = _status([row.err_y, row.err_dot], tol)
    return row


def _loss_dot_error(loss_dot: np.ndarray, logits: torch.Tensor, logits_dots: torch.Tensor,
                    labels: torch.Tensor) -> float:
    """Worst |Δ loss_dot_j| relative to mean_n Σ_c |(softmax − onehot)·ż_j| (the terms' scale)."""
    errs = []
    resid = torch.softmax(logits.detach(), 1) - torch.nn.functional.one_hot(labels, logits.shape[1]).double()
    for j, zd in enumerate(logits_dots.detach()):
        _, ref = torch.func.jvp(lambda z: cross_entropy(z, labels), (logits.detach(),), (zd,))
        scale = (resid * zd).abs().sum(1).mean()
        errs.append(float(abs(float(loss_dot[j]) - ref) / scale.clamp_min(1e-30)))
    return max(errs)


# --------------------------------------------------------------------------- end to end


def _end_to_end_row(arts: Artifacts, ref: torch.nn.Module, specs: list[ModuleSpec],
                    sessions: dict[tuple[int, str], ort.InferenceSession], n: int, seed: int, tol: float) -> ValidationRow:
    """Chain all dual graphs in ORT; compare loss_dot_j with ∇L·u_j (autograd, float64), relative to Σ|∇L_i·u_ij|."""
    row = ValidationRow("all", "e2e dloss", n, None, None, "")
    bn_train = arts.bn_mode == "train"
    if bn_train and any(_single_value_bn(mod, info.in_shape, n) for info, mod in zip(arts.modules, specs)):
        row.status = NA_SINGLE_VALUE
        return row
    inp = _random_inputs(arts, arts.modules, list(arts.input_shape), n, False, _rng(seed, 10_000, n))
    x, x_dot = inp.x, None
    for info in arts.modules:
        role = "dual" if x_dot is not None else "dual_first"
        sess = sessions[info.index, role]
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feeds(arts, info, role, x, x_dot, inp))))
        x, x_dot = outs.get("y"), outs.get("y_dot")
    loss_dot = outs["loss_dot"]

    set_bn_training(ref, bn_train)
    names = [q for info in arts.modules for q in info.param_names]
    params = {q: _t(arts.weights[q]).requires_grad_() for q in names}
    buffers = {q: _t(v) for q, v in inp.stats.items()}
    loss = cross_entropy(functional_call(ref, {**params, **buffers}, (_t(inp.x),)), torch.from_numpy(inp.labels))
    grads = dict(zip(names, torch.autograd.grad(loss, list(params.values()))))
    errs = []
    for j in range(arts.tangents):
        terms = [grads[q] * _t(inp.tangents[q][j]) for q in names]
        gu, scale = sum(t.sum() for t in terms), sum(t.abs().sum() for t in terms)
        errs.append(float(abs(float(loss_dot[j]) - gu) / scale))
    row.err_dot = max(errs)
    row.status = _status([row.err_dot], tol)
    return row
