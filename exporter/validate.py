"""Check an artifact directory against an independent float64 torch reference.

The graphs are emitted from our own dual rules, and a wrong rule yields plausible but wrong
tangents: training then degrades silently. So every graph is run in ONNX Runtime on random
inputs and compared with ``torch.func.jvp`` over the model's *own* nn.Module layers
(reference_modules), and the chained ``loss_dot`` with the autograd gradient dotted with the
weight tangents. Errors are max|a − b| / max|b|, except ``loss_dot``, a sum of cancelling
terms, whose error is relative to the sum of the terms' magnitudes (in float32, dloss against
the autograd gradient·u was measured to differ by up to ~5e-4 relative through that cancellation).

Two float32 effects are not graph bugs and are told apart from them:

- Conditioning: train-mode BatchNorm over a handful of values (batch 1, 2×2 maps) amplifies
  rounding; PyTorch's own float32 is then off by 1e-3. Each quantity's threshold is
  max(tol, KAPPA × the error of the same model run in float32 PyTorch), taking the worst of
  FLOOR_DRAWS draws (the inputs, then the inputs jittered by an ulp); only computed when an
  error exceeds tol.
- Kinks: a ReLU input within rounding of 0 (or a MaxPool near-tie) can take the other branch
  in float32, changing one sample's tangent by O(1). A sample over its threshold is excused
  if a float32 pass met a kink within KINK_DELTA in it (at most a quarter of the batch);
  a row failing with kinks present is re-drawn (up to ATTEMPTS). A real bug hits every
  sample and every draw.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import Artifacts, ModuleInfo, load_artifacts
from asyncfgd.runtime.dual.program import ModuleSpec, Node, module_specs, weight_names
from asyncfgd.runtime.masks import draw_masks

from .model_sources import build_any
from .reference_activity import head_forward, module_step
from .reference_modules import cross_entropy, jvp_module, segment_fn, set_bn_training
from .trace import trace_model
from .tracing.replay import observing
from .trt_check import check_trt_compat

NA_SINGLE_VALUE = "n/a (train BN over 1 value)"
KAPPA = 10.0  # allowed multiple of float32 PyTorch's own error
KINK_DELTA = 1e-5  # a kink this close (relative to the layer's max |input|) may flip in float32
ATTEMPTS = 3
FLOOR_DRAWS = 3  # float32 rounding draws behind each floor: one draw alone can be 10x lucky
_PER_SAMPLE = (c.Y, c.Y_DOT, c.LOGITS)  # outputs with a batch axis (y_dot: axis 1)


@dataclass
class ValidationRow:
    """One graph (or the end-to-end chain, module "all") at one batch size."""

    module: str
    role: str
    batch: int
    err_y: float | None = None  # max relative error of the primal outputs (y | logits, loss; s_new.*)
    err_dot: float | None = None  # relative error of ẏ, or of loss_dot relative to Σ|terms|
    floor: float | None = None  # the same error of float32 PyTorch (ẏ / dloss)
    status: str = ""  # "pass[ (note)]" | "FAIL" | NA_SINGLE_VALUE


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

        head = f"{'module':>6}  {'role':<10}  {'batch':>5}  {'rel err y':>9}  {'rel err ẏ/dloss':>15}  " \
               f"{'f32 torch':>9}  result"
        lines = [head, "-" * (len(head) + 8)]
        lines += [f"{r.module:>6}  {r.role:<10}  {r.batch:>5}  {fmt(r.err_y):>9}  {fmt(r.err_dot):>15}  "
                  f"{fmt(r.floor):>9}  {r.status}" for r in self.rows]
        lines += [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict}: threshold max({self.tol:g}, {KAPPA:g} x float32 torch error); "
                     f"loss_dot relative to the sum of |terms|")
        return "\n".join(lines)


def validate_artifacts(artifacts_dir: str | Path, model: torch.nn.Module | None = None,
                       batch_sizes: tuple[int, ...] = (1, 64), seed: int = 0, tol: float = 1e-4) -> ValidationReport:
    """Validate every graph of ``artifacts_dir`` and the end-to-end dloss at each batch size.

    ``model`` is needed only for user-defined ("custom") models; zoo models are rebuilt from
    the manifest. The artifact's weights are loaded into float64/float32 copies, never into ``model``.
    """
    arts = load_artifacts(artifacts_dir)
    check = _Checker(arts, reference_model(arts, model), module_specs(arts.manifest), tol)
    report = ValidationReport([], tol)
    for info in arts.modules:
        for role in info.graphs:
            check.sessions[info.index, role] = _open_checked(arts, info, role, report)
    for info, mod in zip(arts.modules, check.specs, strict=False):
        for role in info.graphs:
            report.rows += [check.retrying(partial(check.module_row, info, mod, role, n), seed)
                            for n in batch_sizes]
    report.rows += [check.retrying(partial(check.end_to_end_row, n), seed) for n in batch_sizes]
    return report


def reference_model(arts: Artifacts, model: torch.nn.Module | None) -> torch.nn.Module:
    """A float64 copy of the exported model holding the artifact's weights (dropout off)."""
    spec = arts.manifest["model"]
    if model is None:
        if spec["name"] == "custom":
            raise ValueError(f"{arts.root} holds a user-defined model: pass the nn.Module (model=...) to validate it")
        with torch.random.fork_rng():  # the init is overwritten; keep the caller's RNG stream
            model = build_any(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), spec["config"])
    else:
        model = copy.deepcopy(model)
    state = model.state_dict()
    missing = [k for k in state if k not in arts.weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"the model has tensors the artifact's weights lack (e.g. {missing[:3]}): wrong model?")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arts.weights.items() if k in state}, strict=False)
    model = model.double().eval()
    trace_model(model, tuple(spec["input_shape"]))  # the oracle re-runs the traced operations
    return model


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
    # ORT's idle threads spin by default and starve the torch references that run in between
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- random inputs


@dataclass
class _Inputs:
    """One set of random graph inputs, float32 (what ORT sees); the references convert them."""

    x: np.ndarray
    x_dot: np.ndarray | None
    tangents: dict[str, np.ndarray]  # (m, *shape) per weight
    stats: dict[str, np.ndarray]
    labels: np.ndarray  # integer class per sample
    masks: dict[str, np.ndarray]  # dropout masks by node name, drawn as the runtime draws them
    noise: dict[str, np.ndarray] = field(default_factory=dict)  # activity sites' ε (m, N, ...) by node

    def torch_masks(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=dtype) for k, v in self.masks.items()}


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
    seed = int(rng.integers(1 << 62))
    masks = {k: v for info in infos for k, v in draw_masks(info.dropout, seed, 0, info.index, n).items()}
    noise = {s.node: normal(m, n, *s.shape) for info in infos if info.activity for s in info.activity.sites}
    return _Inputs(x=normal(n, *in_shape), x_dot=normal(m, n, *in_shape) if with_x_dot else None,
                   tangents={p["name"]: normal(m, *p["shape"]) for info in infos for p in info.params},
                   stats=stats, labels=rng.integers(0, arts.num_classes, n), masks=masks, noise=noise)


def _draws(inp: _Inputs, seed: int) -> list[_Inputs]:
    """The inputs, then copies moved by about one float32 ulp: FLOOR_DRAWS draws of float32 rounding."""
    rng = np.random.default_rng([seed, 1])

    def jit(a: np.ndarray) -> np.ndarray:
        return (a * (1.0 + 2.0 ** -23 * rng.standard_normal(a.shape))).astype(np.float32)

    return [inp] + [_Inputs(jit(inp.x), None if inp.x_dot is None else jit(inp.x_dot),
                            {q: jit(v) for q, v in inp.tangents.items()}, {q: jit(v) for q, v in inp.stats.items()},
                            inp.labels, inp.masks, {q: jit(v) for q, v in inp.noise.items()})
                              for _ in range(FLOOR_DRAWS - 1)]


def _feeds(arts: Artifacts, info: ModuleInfo, role: str, x: np.ndarray, x_dot: np.ndarray | None,
           inp: _Inputs) -> dict[str, np.ndarray]:
    """The graph's declared inputs, filled by the naming contract (docs/artifacts.md)."""
    values = {c.X: x, c.X_DOT: x_dot, c.LABELS: np.eye(arts.num_classes, dtype=np.float32)[inp.labels],
              **{c.stat_input(q): v for q, v in inp.stats.items()},
              **{c.tangent_input(q): v for q, v in inp.tangents.items()},
              **{c.weight_input(q): arts.weights[q] for q in info.param_names},
              **{c.mask_input(k): v for k, v in inp.masks.items()},
              **{c.noise_input(k): v for k, v in inp.noise.items()}}
    return {name: values[name] for name in info.graphs[role]["inputs"]}


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=False))


# --------------------------------------------------------------------------- references


def _reference(model: torch.nn.Module, arts: Artifacts, mod: ModuleSpec, info: ModuleInfo, role: str,
               bn_train: bool, inp: _Inputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A graph's outputs (contract names) computed by the model's own layers, in the model's dtype.

    Also returns each output's error scale: max|output|, or for loss_dot the per-tangent
    mean over the batch of Σ_c |(softmax − onehot)_c · ż_c|.
    """
    dtype = next(model.parameters()).dtype

    def cv(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=dtype)  # a copy: train-mode BN updates statistics in place

    set_bn_training(model, bn_train)
    if role == c.ACTIVITY:
        return _activity_reference(model, arts, mod, info, bn_train, inp)
    state = model.state_dict()  # the artifact's weights, in the model's dtype
    names = weight_names(mod.nodes)
    x, params = cv(inp.x), {q: state[q] for q in names}
    stats = {q: cv(inp.stats[q]) for q in info.buffer_names}  # train-mode BN updates them: s_new
    y_dot = None
    masks = inp.torch_masks(dtype) if role in c.MASK_ROLES else None
    if role in c.TANGENT_ROLES:
        pairs = [jvp_module(model, mod, x, None if inp.x_dot is None else cv(inp.x_dot[j]), params,
                            {q: cv(inp.tangents[q][j]) for q in names},
                            stats if j == 0 else {q: v.clone() for q, v in stats.items()}, masks)
                 for j in range(arts.tangents)]
        y, y_dot = pairs[0][0], torch.stack([yd for _, yd in pairs])
    else:
        with torch.no_grad():
            y = segment_fn(model, mod, masks)(x, params, stats)
    out = {c.stat_output(q): v for q, v in stats.items()} if bn_train else {}
    scales: dict[str, torch.Tensor] = {}
    if role == c.LOCAL:  # the module's output y, and the auxiliary head's loss
        fc = next(n for n in mod.aux if n.params).params
        head = [(cv(arts.weights[q]), cv(inp.tangents[q])) for q in (fc["weight"], fc["bias"])]
        out[c.Y] = y
        assert y_dot is not None  # LOCAL is a tangent role: y_dot was computed above
        y, y_dot = _aux_head(mod.aux, y, y_dot, head)
    if not info.is_last and role != c.LOCAL:
        out.update({c.Y: y} if y_dot is None else {c.Y: y, c.Y_DOT: y_dot})
    else:
        out[c.LOGITS] = y
        if role != c.EVAL:
            labels = torch.from_numpy(inp.labels)
            if role == c.LOCAL:  # a grouped head's classifiers side by side: the mean of their losses
                heads = y.shape[1] // arts.num_classes
                y, labels = y.reshape(-1, arts.num_classes), labels.repeat_interleave(heads)
                y_dot = None if y_dot is None else y_dot.reshape(len(y_dot), -1, arts.num_classes)
            out[c.LOSS] = cross_entropy(y, labels)
            if y_dot is not None:
                out[c.LOSS_DOT] = _loss_dot(y, y_dot, labels)
                resid = torch.softmax(y, 1) - F.one_hot(labels, y.shape[1]).to(dtype)
                scales[c.LOSS_DOT] = (resid * y_dot).abs().sum(2).mean(1)
    out = {k: v.detach().double() for k, v in out.items()}
    scales = {k: scales[k].detach().double() if k in scales else v.abs().max() for k, v in out.items()}
    return out, scales


def _activity_reference(model: torch.nn.Module, arts: Artifacts, mod: ModuleSpec, info: ModuleInfo,
                        bn_train: bool, inp: _Inputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The activity role's outputs from the local-activity oracle (reference_activity.py): jvp along
    (ε, u) through the model's own layers, autograd for each site's pull-back to its weights."""
    dtype = next(model.parameters()).dtype
    plan = mod.activity
    assert plan is not None  # the role exists only with a plan

    def cv(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=dtype)

    state = model.state_dict()
    weights = {q: state[q] if q in state else cv(arts.weights[q]) for q in info.param_names}
    stats = {q: cv(inp.stats[q]) for q in info.buffer_names}
    out = module_step(model, mod, cv(inp.x), torch.from_numpy(inp.labels), weights, stats,
                      {k: cv(v) for k, v in inp.noise.items()}, {q: cv(inp.tangents[q]) for q in plan.weight_perturbed},
                      inp.torch_masks(dtype), bn_train)
    if bn_train:
        out.update({c.stat_output(q): v for q, v in stats.items()})
    out = {k: v.detach().double() for k, v in out.items()}
    return out, {k: v.abs().max() for k, v in out.items()}


def _loss_dot(logits: torch.Tensor, logits_dots: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d loss along each tangent ż_j (m, N, C) of the logits, by torch.func.jvp of the loss."""
    return torch.stack([torch.func.jvp(lambda z: cross_entropy(z, labels), (logits,), (zd,))[1] for zd in logits_dots])


def _aux_head(aux: list[Node], y: torch.Tensor, y_dot: torch.Tensor, head: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and their tangents of a local-loss head (local_heads.py) by jvp over (y, its weights)."""
    (w, uw), (b, ub) = head
    fc = next(n for n in aux if n.params).params

    def f(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return head_forward(aux, z, {fc["weight"]: w, fc["bias"]: b}, {})

    # without has_aux, jvp returns (output, jvp_out); its annotation also allows the has_aux triple
    pairs = [cast(tuple[torch.Tensor, torch.Tensor], torch.func.jvp(f, (y, w, b), (y_dot[j], uw[j], ub[j])))
             for j in range(len(y_dot))]
    return pairs[0][0], torch.stack([zd for _, zd in pairs])


def _chain(model: torch.nn.Module, specs: list[ModuleSpec], x: torch.Tensor, params: dict[str, torch.Tensor],
           buffers: dict[str, torch.Tensor], inp: _Inputs) -> torch.Tensor:
    """The whole model, module after module, as the oracle runs it (with the inputs' dropout masks)."""
    for mod in specs:
        x = segment_fn(model, mod, inp.torch_masks(x.dtype))(x, params, buffers)
    return x


def _grad_dot(model: torch.nn.Module, arts: Artifacts, specs: list[ModuleSpec],
              inp: _Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇L·u_j, Σ_i |∇L_i·u_ij|) per tangent j, by float64 autograd through the model's own operations."""
    names = [q for mod in specs for q in weight_names(mod.nodes)]
    state = model.state_dict()
    params = {q: state[q].detach().clone().requires_grad_() for q in names}
    buffers = {q: torch.tensor(v, dtype=torch.float64) for q, v in inp.stats.items()}  # copies: BN updates them
    logits = _chain(model, specs, torch.tensor(inp.x, dtype=torch.float64), params, buffers, inp)
    grads = torch.autograd.grad(cross_entropy(logits, torch.from_numpy(inp.labels)), list(params.values()))
    dots: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    for j in range(arts.tangents):
        terms = [g * torch.tensor(inp.tangents[q][j], dtype=torch.float64) for g, q in zip(grads, names, strict=False)]
        # sums of tensors (one term per weight; sum's annotation allows its start value 0)
        dots.append(cast(torch.Tensor, sum(t.sum() for t in terms)))
        scales.append(cast(torch.Tensor, sum(t.abs().sum() for t in terms)))
    return torch.stack(dots), torch.stack(scales)


# --------------------------------------------------------------------------- kinks


#: element-wise ops whose derivative jumps, and where (attrs → input values)
KINKS: dict[str, Callable[[dict], list[float]]] = {
    "relu": lambda a: [0.0], "relu6": lambda a: [0.0, 6.0], "hardtanh": lambda a: [a["min"], a["max"]],
    "leaky_relu": lambda a: [0.0], "elu": lambda a: [0.0], "hardswish": lambda a: [-3.0, 3.0], "abs": lambda a: [0.0],
    "hardsigmoid": lambda a: [-3.0, 3.0],
}


def _kink_samples(model: torch.nn.Module, nodes: list[Node], n: int, run: Callable[[], Any]) -> torch.Tensor:
    """Per sample: did ``run()``, a primal pass of ``model``, meet a kink (ReLU's 0, ReLU6's 0 and 6,
    ...) or a MaxPool near-tie? The traced operations are watched as the oracle runs them."""
    flags = torch.zeros(n, dtype=torch.bool)

    def near(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (v.abs() <= KINK_DELTA * scale).flatten(1).any(1)

    def watch(fx_name: str, ops: list[Node], args: tuple, out: Any) -> None:
        if len(ops) != 1 or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != n:
            return  # an expanded layer (its inner values are not seen) or a weight
        node, x = ops[0], args[0].detach()
        s = x.abs().max()
        if node.op in KINKS:
            for at in KINKS[node.op](node.attrs):
                flags.logical_or_(near(x - at, s))
        elif node.op == "maxpool2d":
            flags.logical_or_(near(_maxpool_gap(x, node, out.shape[-2:]), s))

    with torch.no_grad(), observing(watch):
        run()
    return flags


def _maxpool_gap(x: torch.Tensor, node: Node, out_hw: torch.Size) -> torch.Tensor:
    """Gap between the largest and second-largest value of each pooling window (inf if exact tie or k=1)."""
    a = node.attrs
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel"], a["stride"], a["padding"], a["dilation"]
    if kh * kw < 2:
        return torch.full_like(x, float("inf"))
    # bottom/right padding for ceil_mode windows, read off the layer's actual output size
    eh = max(0, (out_hw[0] - 1) * sh + dh * (kh - 1) + 1 - (x.shape[2] + 2 * ph))
    ew = max(0, (out_hw[1] - 1) * sw + dw * (kw - 1) + 1 - (x.shape[3] + 2 * pw))
    v = F.pad(x, (pw, pw + ew, ph, ph + eh), value=float("-inf"))
    cols = F.unfold(v, (kh, kw), dilation=(dh, dw), stride=(sh, sw)).view(x.shape[0], x.shape[1], kh * kw, -1)
    top = cols.topk(2, dim=2).values
    gap = top[:, :, 0] - top[:, :, 1]
    return torch.where(gap > 0, gap, torch.full_like(gap, float("inf")))  # exact ties break alike


# --------------------------------------------------------------------------- comparison


def _error(name: str, a: Any, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|a − b| / scale, reduced to one value per sample for batch outputs, else to a scalar."""
    d = (torch.as_tensor(a).double() - b).abs() / scale.clamp_min(1e-30)
    if name == c.Y_DOT:
        return d.transpose(0, 1).flatten(1).amax(1)
    if name in _PER_SAMPLE:
        return d.flatten(1).amax(1)
    return d.max()


def _judge(got: dict[str, Any], ref: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], n: int,
           float32_draws: Callable[[], list[dict[str, torch.Tensor]]], find_kinks: Callable[[], torch.Tensor],
           tol: float) -> tuple[dict[str, float], dict[str, float] | None, str, bool]:
    """Errors of ``got`` (after excusing kink samples), float32 torch's (worst draw, median sample), the
    verdict, and whether kinks were found. Floors and kinks are only computed when an error exceeds tol.
    """
    errs = {k: _error(k, got[k], ref[k], scales[k]) for k in ref}
    floors = None
    if any(bool((e > tol).any()) for e in errs.values()):
        draws = float32_draws()
        floors = {k: float(torch.stack([_error(k, f[k], ref[k], scales[k]) for f in draws]).amax(0).median())
                  for k in ref}
    limits = {k: max(tol, KAPPA * floors[k]) if floors else tol for k in ref}
    over = torch.zeros(n, dtype=torch.bool)
    for k in ref:
        if k in _PER_SAMPLE:
            over |= errs[k] > limits[k]
    failing = any(bool((errs[k] > limits[k]).any()) for k in ref)
    kinks = find_kinks() if failing else torch.zeros(n, dtype=torch.bool)
    excused = over & kinks
    if int(excused.sum()) > n // 4:
        excused[:] = False
    worst = {k: float(e[~excused].max() if k in _PER_SAMPLE else e) for k, e in errs.items()}
    ok = all(worst[k] <= limits[k] for k in ref)
    note = f" ({int(excused.sum())} sample(s) at a kink excused)" if excused.any() else ""
    return worst, floors, ("pass" + note) if ok else "FAIL", bool(kinks.any())


class _Checker:
    """Everything one validation shares: artifacts, float64/float32 references, ORT sessions."""

    def __init__(self, arts: Artifacts, ref: torch.nn.Module, specs: list[ModuleSpec], tol: float) -> None:
        self.arts, self.ref, self.ref32, self.specs, self.tol = arts, ref, copy.deepcopy(ref).float(), specs, tol
        self.sessions: dict[tuple[int, str], ort.InferenceSession] = {}

    def retrying(self, row_fn: Callable[[int], tuple[ValidationRow, bool]], seed: int) -> ValidationRow:
        """A row failing where float32 may have taken the other branch of a kink gets fresh inputs."""
        for attempt in range(ATTEMPTS):
            row, kinked = row_fn(seed + 1000 * attempt)
            if row.status != "FAIL" or not kinked:
                break
        if attempt and row.status != "FAIL":
            row.status += f" (inputs redrawn {attempt}x: kink)"
        return row

    def module_row(self, info: ModuleInfo, mod: ModuleSpec, role: str, n: int, seed: int) -> tuple[ValidationRow, bool]:
        arts = self.arts
        row = ValidationRow(str(info.index), role, n)
        bn_train = arts.bn_mode == "train" and role != c.EVAL
        if bn_train and _single_value_bn(mod, info.in_shape, n):
            row.status = NA_SINGLE_VALUE
            return row, False
        inp = _random_inputs(arts, [info], info.in_shape, n, role == c.DUAL,
                             np.random.default_rng([seed, info.index, list(info.graphs).index(role), n]))
        got = _run(self.sessions[info.index, role], _feeds(arts, info, role, inp.x, inp.x_dot, inp))
        ref, scales = _reference(self.ref, arts, mod, info, role, bn_train, inp)
        # kinks: a float32 primal pass ("forward": no tangents) in the row's BN mode, watched
        errs, floors, row.status, kinked = _judge(
            got, ref, scales, n,
            lambda: [_reference(self.ref32, arts, mod, info, role, bn_train, draw)[0] for draw in _draws(inp, seed)],
            lambda: _kink_samples(self.ref32, mod.nodes, n,
                                  lambda: _reference(self.ref32, arts, mod, info, c.FORWARD, bn_train, inp)), self.tol)
        dot = next((k for k in (c.Y_DOT, c.LOSS_DOT, c.SAMPLE_DOT) if k in errs), None)
        row.err_y = max(e for k, e in errs.items() if k != dot)
        row.err_dot = errs[dot] if dot else None
        row.floor = floors[dot] if dot and floors else None
        return row, kinked

    def end_to_end_row(self, n: int, seed: int) -> tuple[ValidationRow, bool]:
        """Chain all dual graphs in ORT; loss_dot_j vs ∇L·u_j (float64 autograd), relative to Σ_i |∇L_i·u_ij|."""
        arts = self.arts
        row = ValidationRow("all", "e2e dloss", n)
        bn_train = arts.bn_mode == "train"
        if bn_train and any(_single_value_bn(mod, info.in_shape, n)
                            for info, mod in zip(arts.modules, self.specs, strict=False)):
            row.status = NA_SINGLE_VALUE
            return row, False
        inp = _random_inputs(arts, arts.modules, list(arts.input_shape), n, False, np.random.default_rng([seed, n]))
        x: np.ndarray | None = inp.x
        x_dot = None
        for info in arts.modules:
            role = c.DUAL if x_dot is not None else c.DUAL_FIRST
            assert x is not None  # every module but the last outputs y, the next one's input
            outs = _run(self.sessions[info.index, role], _feeds(arts, info, role, x, x_dot, inp))
            x, x_dot = outs.get(c.Y), outs.get(c.Y_DOT)
        set_bn_training(self.ref, bn_train)
        ref, scale = _grad_dot(self.ref, arts, self.specs, inp)
        nodes = [nd for mod in self.specs for nd in mod.nodes]
        errs, floors, row.status, kinked = _judge(
            {c.LOSS_DOT: outs[c.LOSS_DOT]}, {c.LOSS_DOT: ref}, {c.LOSS_DOT: scale}, n,
            lambda: [{c.LOSS_DOT: self.chained_loss_dot(draw, bn_train)} for draw in _draws(inp, seed)],
            lambda: _kink_samples(self.ref32, nodes, n, lambda: _chain(  # BN mode set by chained_loss_dot
                self.ref32, self.specs, torch.from_numpy(inp.x), dict(self.ref32.state_dict()),
                {q: torch.tensor(v) for q, v in inp.stats.items()}, inp)), self.tol)
        row.err_dot, row.floor = errs[c.LOSS_DOT], floors[c.LOSS_DOT] if floors else None
        return row, kinked


    def chained_loss_dot(self, inp: _Inputs, bn_train: bool) -> torch.Tensor:
        """loss_dot_j of float32 PyTorch computed like the graphs: module by module in forward mode."""
        set_bn_training(self.ref32, bn_train)
        state = self.ref32.state_dict()
        out = []
        for j in range(self.arts.tangents):
            x, x_dot = torch.from_numpy(inp.x), None
            for info, mod in zip(self.arts.modules, self.specs, strict=False):
                names = weight_names(mod.nodes)
                x, x_dot = jvp_module(self.ref32, mod, x, x_dot, {q: state[q] for q in names},
                                      {q: torch.from_numpy(inp.tangents[q][j]) for q in names},
                                      {q: torch.tensor(inp.stats[q]) for q in info.buffer_names},
                                      inp.torch_masks(torch.float32))
            assert x_dot is not None  # set by the first module's jvp (there is at least one module)
            out.append(_loss_dot(x, x_dot[None], torch.from_numpy(inp.labels))[0])
        return torch.stack(out).double()


def _single_value_bn(mod: ModuleSpec, in_shape: list[int], n: int) -> bool:
    """True if a BatchNorm would normalise one value per channel (batch 1, 1×1 map): undefined in train mode."""
    shapes = {mod.input: in_shape, **{node.name: node.shape for node in mod.nodes}}
    return any(node.op == "batchnorm2d" and n * int(np.prod(shapes[node.inputs[0]][1:])) == 1 for node in mod.nodes)
