"""Exporter: dual rules against torch.func.jvp, export + validation of every zoo model, user
models, clear errors, the export/validate CLI and tamper detection.

Each rule runs on TorchOps(float64) inside a one-layer model and is compared with
``jvp_module`` (torch.func.jvp over the real nn.Module layer), the validator's own oracle.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from asyncfgd.app.bench.memory_model import graph_live
from asyncfgd.app.cli import app
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.exporter.reference_modules import jvp_module, segment_fn
from asyncfgd.exporter.split import SplitError, split_program
from asyncfgd.exporter.trace import UnsupportedLayerError, trace
from asyncfgd.exporter.validate import NA_SINGLE_VALUE, _judge, _kink_samples, validate_artifacts
from asyncfgd.runtime.artifacts import ArtifactError, load_artifacts
from asyncfgd.runtime.dual import fusions, rules
from asyncfgd.runtime.dual import interpreter as dual
from asyncfgd.runtime.dual.interpreter import run_program
from asyncfgd.runtime.dual.program import ModuleSpec
from asyncfgd.runtime.dual.rules import RuleContext
from asyncfgd.runtime.dual.torch_ops import TorchOps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- acceptance matrix


ZOO = {  # name: (per-sample input shape, small-width config)
    "mlp": ((1, 8, 8), {"hidden": [32, 16]}),
    "cnn": ((1, 8, 8), {"channels": [4, 8]}),
    "resnet18": ((3, 16, 16), {"width": 4}),
    "resnet18-imagenet": ((3, 16, 16), {"width": 4}),
    "mobilenetv2": ((3, 16, 16), {"width_mult": 0.25}),
}


def _zoo_export(name: str, out, k: int, bn: str, tangents: int = 1) -> dict:
    """Splits balanced for a large batch (per-sample compute): the conditioning expectations below
    (which train-mode BN layers normalise over a single value, or a few, at batch 1) depend on
    where the cuts fall; the balancing itself is tested on its own (test_split.py)."""
    shape, cfg = ZOO[name]
    torch.manual_seed(0)
    model = build_model(name, 10, shape, **cfg)
    return export_model(model, out, shape, 10, modules=k, bn_mode=bn, tangents=tangents, model_spec=model_spec(model),
                        balance_batch=1 << 20)


@pytest.mark.parametrize("bn", ["train", "frozen"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_exports_validate(name, k, bn, tmp_path):
    manifest = _zoo_export(name, tmp_path, k, bn)
    assert len(manifest["modules"]) == k
    report = validate_artifacts(tmp_path, batch_sizes=(1, 64))
    assert report.passed, report.table()
    assert not report.errors
    measured = [r for r in report.rows if r.status != NA_SINGLE_VALUE]
    assert all(r.err_y is None or r.err_y < 1e-4 for r in measured), report.table()
    assert {r.batch for r in measured} == {1, 64}
    assert sum(r.module == "all" for r in report.rows) == 2


def test_single_value_train_bn_is_reported_not_applicable(tmp_path):
    # resnet18-imagenet on 16x16 reaches 1x1 maps in layer3: at batch 1 train-mode BN is undefined
    _zoo_export("resnet18-imagenet", tmp_path, 2, "train")
    report = validate_artifacts(tmp_path, batch_sizes=(1,))
    na = {(r.module, r.role) for r in report.rows if r.status == NA_SINGLE_VALUE}
    assert na == {("1", "dual"), ("1", "dual_first"), ("1", "forward"), ("all", "e2e dloss")}
    assert report.passed and all(r.status == "pass" for r in report.rows if r.role == "eval")


def test_several_tangents_validate(tmp_path):
    _zoo_export("cnn", tmp_path, 2, "train", tangents=3)
    assert validate_artifacts(tmp_path, batch_sizes=(8,)).passed


@pytest.mark.parametrize("target, k, m, rows", [("rule", 4, 1, ("1", "dual")), ("folded", 2, 3, ("0", "dual_first"))])
def test_validation_catches_a_wrong_rule(tmp_path, monkeypatch, target, k, m, rows):
    """A BatchNorm tangent off by 0.1% must fail, at both batch sizes: the plain rule (K=4 puts the
    first BN alone in module 1) and the conv-BN pair folded on the data (K=2: both in module 0;
    folded at m > 1)."""
    def off(fn):
        def wrong(*args):
            y, yd, new = fn(*args)
            ops = args[0]
            return y, (None if yd is None else ops.mul(yd, ops.const(1.001))), new
        return wrong

    if target == "rule":
        monkeypatch.setitem(rules.RULES, "batchnorm2d", off(rules.RULES["batchnorm2d"]))
    else:
        monkeypatch.setattr(dual, "conv_bn_from_data", off(dual.conv_bn_from_data))
    _zoo_export("cnn", tmp_path, k, "train", tangents=m)
    report = validate_artifacts(tmp_path, batch_sizes=(1, 64))
    failed = {(r.module, r.role, r.batch) for r in report.rows if r.status == "FAIL"}
    assert {(*rows, 1), (*rows, 64)} <= failed
    assert all(r.status != "FAIL" for r in report.rows if r.role in ("forward", "eval"))  # primal outputs are right
    assert not report.passed


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.MaxPool2d(2, 1, dilation=2)])
def test_maxpool_tangent_takes_the_first_of_tied_maxima(pool):
    """Exact ties (ReLU zeros, repeated values) everywhere: ẏ must be ẋ at the first maximum in
    row-major window order, as torch's jvp picks it, in eager TorchOps and in the ONNX graph."""
    import onnxruntime as ort

    from asyncfgd.exporter.onnx_ops import OnnxOps

    torch.manual_seed(0)
    m, shape = 2, (3, 8, 8)
    x = torch.randint(-2, 3, (4, *shape)).double().relu()  # values in {0, 1, 2}: ties in most windows
    x_dot = torch.randn(m, 4, *shape, dtype=torch.float64)
    ref = torch.stack([torch.func.jvp(pool, (x,), (x_dot[j],))[1] for j in range(m)])
    node = trace(nn.Sequential(pool), shape)[0]
    ctx = RuleContext(m, True, False)
    x_dot = x_dot.transpose(0, 1).contiguous()  # the rules' layout: (N, m, ...)
    ref = ref.transpose(0, 1)
    _, yd, _ = rules.pooling.maxpool2d(TorchOps(torch.float64), node, [x], [x_dot], {}, {}, {}, ctx)
    torch.testing.assert_close(yd, ref, rtol=0, atol=0)
    ops = OnnxOps("maxpool")
    y_o, yd_o = rules.pooling.maxpool2d(ops, node, [ops.input("x", (-1, *shape))],
                                        [ops.input("x_dot", (-1, m, *shape))], {}, {}, {}, ctx)[:2]
    ops.output("y", y_o)
    ops.output("y_dot", yd_o)
    sess = ort.InferenceSession(ops.model().SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["y_dot"], {"x": x.float().numpy(), "x_dot": x_dot.float().numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), ref.float(), rtol=0, atol=0)


@pytest.mark.parametrize("big, small, widened", [
    ((3, -1, 8, 4, 4), (3, 1, 8, 1, 1), (3, 1, 8, 4, 4)),  # per-(tangent, channel) coefficient, 16-spans
    ((-1, 8, 4, 4), (1, 8, 1, 1), (1, 8, 4, 4)),  # per-channel BatchNorm scale
    ((-1, 8, 16, 16), (1, 8, 1, 1), None),  # 256-element spans: ORT's broadcast is fast enough
    ((3, -1, 8, 4, 4), (-1, 8, 1, 1), None),  # batch-sized operand: expanding would cost a pass
])
def test_small_operand_is_expanded_over_short_spans(big, small, widened):
    """OnnxOps expands a (…, C, 1, 1) operand over small H×W before the element-wise op (ORT's
    slow short-span broadcast); the result is bit-identical to plain broadcasting."""
    import onnxruntime as ort

    from asyncfgd.exporter.onnx_ops import OnnxOps

    ops = OnnxOps("widen")
    ops.output("y", ops.mul(ops.input("a", big), ops.input("b", small)))
    model = ops.model()
    expands = [n for n in model.graph.node if n.op_type == "Expand"]
    assert len(expands) == (widened is not None)
    rng = np.random.default_rng(0)
    a = rng.standard_normal([5 if d == -1 else d for d in big]).astype(np.float32)
    b = rng.standard_normal([5 if d == -1 else d for d in small]).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(["y"], {"a": a, "b": b})[0], a * b)


def test_mask_after_mask_is_one_pass_over_the_tangents():
    """ReLU's mask then max-pool's selection: OnnxOps multiplies the m tangents once, by the product
    of the two masks, and the graph's ẏ is bit-identical to the rules run eagerly (TorchOps)."""
    import onnxruntime as ort

    from asyncfgd.exporter.graphs import build_onnx
    from asyncfgd.runtime.dual.interpreter import GraphSpec

    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    mod = ModuleSpec(0, trace(model, (3, 4, 4)), "input")
    m = 4
    onnx_model = build_onnx(mod, GraphSpec("dual", m, "train"), False, [3, 4, 4], 10, {})
    import onnx

    inferred = onnx.shape_inference.infer_shapes(onnx_model).graph.value_info
    dims = {v.name: v.type.tensor_type.shape.dim for v in inferred}
    tangent_sized = {k for k, d in dims.items() if len(d) == 5 and d[1].dim_value == m}  # (N, m, C, H, W)
    assert len([n for n in onnx_model.graph.node if n.op_type == "Mul" and n.output[0] in tangent_sized]) == 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
    x_dot = rng.standard_normal((m, 5, 3, 4, 4)).astype(np.float32)
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["y_dot"], {"x": x, "x_dot": x_dot})[0]
    _, want, _ = run_program(TorchOps(), mod.nodes, "input", torch.from_numpy(x), torch.from_numpy(x_dot), {}, {}, {},
                             RuleContext(m, True, True))
    np.testing.assert_array_equal(got, want.numpy())


DENSE_CONVS = [  # (Ci, Co, per-sample H, W, conv attrs)
    (4, 6, 4, 4, dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))),
    (3, 5, 5, 4, dict(stride=(2, 1), padding=(1, 0), dilation=(1, 1))),
    (2, 3, 5, 5, dict(stride=(1, 1), padding=(2, 2), dilation=(2, 2))),
    (4, 2, 2, 2, dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))),
]


@pytest.mark.parametrize("ci, co, h, w, attrs", DENSE_CONVS)
def test_dense_conv_is_the_convolution(ci, co, h, w, attrs):
    """W's dense matrix times the flattened input is the convolution: eagerly in float64 against
    F.conv2d, and as an ONNX graph through ONNX Runtime against torch in float32."""
    import onnxruntime as ort

    from asyncfgd.exporter.onnx_ops import OnnxOps

    attrs = {**attrs, "groups": 1}
    torch.manual_seed(0)
    x, k = torch.randn(7, ci, h, w, dtype=torch.float64), torch.randn(co, ci, 3, 3, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, k, None, attrs["stride"], attrs["padding"], attrs["dilation"])
    torch.testing.assert_close(fusions.dense_conv(TorchOps(torch.float64), x, k, attrs), want, rtol=1e-12, atol=1e-12)
    ops = OnnxOps("dense")
    ops.output("y", fusions.dense_conv(ops, ops.input("x", (-1, ci, h, w)), ops.input("k", (co, ci, 3, 3)), attrs))
    sess = ort.InferenceSession(ops.model().SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["y"], {"x": x.float().numpy(), "k": k.float().numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, dense", [(128, True), (64, False)])
def test_conv_rule_goes_dense_only_where_it_pays(monkeypatch, batch, dense):
    """A conv on 4×4 maps with m = 3 tangents: the W·ẋ product runs dense for a tuned batch of 128
    (384 tangent-samples), as ORT's conv for 64 (192); either way ẏ is torch.func.jvp's."""
    used = []
    monkeypatch.setattr(fusions, "dense_conv", lambda *a, **kw: used.append(1) or DENSE_CONV(*a, **kw))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)).double()
    nodes = trace(model, (4, 4, 4))
    params = {q: v.clone() for q, v in model.state_dict().items()}
    m, n = 3, 5
    x, x_dot = torch.randn(n, 4, 4, 4, dtype=torch.float64), torch.randn(m, n, 4, 4, 4, dtype=torch.float64)
    tangents = {q: torch.randn(m, *p.shape, dtype=torch.float64) for q, p in params.items()}
    _, yd, _ = run_program(TorchOps(torch.float64), nodes, "input", x, x_dot, params, tangents, {},
                           RuleContext(m, True, False, batch=batch))
    assert len(used) == dense
    for j in range(m):
        _, want = jvp_module(model, ModuleSpec(0, nodes, "input"), x, x_dot[j], params,
                             {q: u[j] for q, u in tangents.items()}, {})
        torch.testing.assert_close(yd[j], want, rtol=1e-10, atol=1e-10)


DENSE_CONV = fusions.dense_conv


def test_kink_finder_flags_only_samples_near_a_branch():
    model = nn.Sequential(nn.ReLU6(), nn.MaxPool2d(2)).double()
    nodes = trace(model, (1, 2, 2))
    x = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]],  # clear of every kink
                      [[[1e-9, -2.0], [3.0, 4.0]]],  # ReLU6 input at 0
                      [[[1.0, 6.0 - 1e-9], [3.0, 4.0]]],  # ReLU6 input at 6
                      [[[1.0, 2.0], [3.0, 3.0 + 1e-9]]]], dtype=torch.float64)  # MaxPool near-tie
    oracle = segment_fn(model, ModuleSpec(0, nodes, "input"))  # the kink finder watches the oracle's operations
    assert _kink_samples(model, nodes, 4, lambda: oracle(x, {}, None)).tolist() == [False, True, True, True]


def test_judge_excuses_kink_samples_and_float32_noise_but_not_bugs():
    n, off = 8, torch.zeros(8, dtype=torch.bool)
    ref, scales = {"y_dot": torch.ones(1, n, 3, dtype=torch.float64)}, {"y_dot": torch.tensor(1.0)}
    exact = lambda: [ref]  # noqa: E731  (float32 torch without error)
    got = {"y_dot": ref["y_dot"].clone()}
    got["y_dot"][0, 2, 0] += 0.5  # one sample took the other branch of a kink
    assert _judge(got, ref, scales, n, exact, lambda: off.clone().index_fill_(0, torch.tensor([2]), True),
                  1e-4)[2] == "pass (1 sample(s) at a kink excused)"
    assert _judge(got, ref, scales, n, exact, lambda: off.clone(), 1e-4)[2] == "FAIL"  # no kink there
    got["y_dot"][0, :, 0] += 0.5  # every sample off: a bug, even with kinks everywhere
    assert _judge(got, ref, scales, n, exact, lambda: ~off, 1e-4)[2] == "FAIL"
    one = torch.ones(1, dtype=torch.float64)  # loss_dot: float32 torch is itself 5e-4 off, the graph 1e-3
    ref, scales, got = {"loss_dot": one}, {"loss_dot": one}, {"loss_dot": one + 1e-3}
    errs, floors, status, _ = _judge(got, ref, scales, n, lambda: [{"loss_dot": one + 5e-4}], lambda: off, 1e-4)
    assert status == "pass" and floors["loss_dot"] == pytest.approx(5e-4) and errs["loss_dot"] == pytest.approx(1e-3)
    assert _judge(got, ref, scales, n, lambda: [{"loss_dot": one + 1e-5}], lambda: off, 1e-4)[2] == "FAIL"


# --------------------------------------------------------------------------- user models


class UserNet(nn.Module):
    """A model outside the zoo: depthwise conv, GELU, residual add, avg-pool, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act = nn.GELU()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.norm = nn.LayerNorm(8 * 4 * 4)
        self.act2 = nn.GELU(approximate="tanh")
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.act(self.dw(x))
        x = self.flatten(self.pool(x))
        return self.head(self.act2(self.norm(x)))


def test_user_model_exports_and_validates(tmp_path):
    torch.manual_seed(0)
    model = UserNet()
    manifest = export_model(model, tmp_path, (3, 8, 8), 5, modules=2, bn_mode="frozen")
    assert manifest["model"]["name"] == "custom"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = validate_artifacts(tmp_path, model=model, batch_sizes=(1, 16))
    assert report.passed, report.table()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    with pytest.raises(ValueError, match="model="):
        validate_artifacts(tmp_path)


def test_unsupported_layer_is_named(tmp_path):
    with pytest.raises(UnsupportedLayerError, match=r"layer '1' \(PixelShuffle\).* has no dual rule.*Supported layers"):
        export_model(nn.Sequential(nn.Conv2d(4, 8, 1), nn.PixelShuffle(2)), tmp_path, (4, 2, 2), 4)


def test_split_inside_residual_block_is_refused():
    torch.manual_seed(0)
    program = trace(build_model("resnet18", 10, (3, 16, 16), width=4), (3, 16, 16))
    with pytest.raises(SplitError, match=r"layer1\.0\.conv2.*inside a residual block"):
        split_program(program, at=["layer1.0.conv2"])
    assert [m.nodes[0].name for m in split_program(program, at=["layer2"])][1] == "layer2.0.downsample.0"


# --------------------------------------------------------------------------- tampering


def test_tampered_graph_is_an_artifact_error(tmp_path):
    _zoo_export("mlp", tmp_path, 2, "frozen")
    path = tmp_path / "module1.dual.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    arts = load_artifacts(tmp_path)
    arts.graph_bytes(0, "dual_first")  # untouched files still load
    with pytest.raises(ArtifactError, match="module1.dual.onnx.*checksum"):
        arts.graph_bytes(1, "dual")
    with pytest.raises(ArtifactError, match="checksum"):
        validate_artifacts(tmp_path)
    result = CliRunner().invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 2 and "checksum" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- CLI


EXPORT_OPTIONS = ("--model", "--out", "--num-classes", "--input-shape", "--modules", "--split", "--weights", "--bn",
                  "--tangents", "--config", "--seed", "--balance-batch")


def test_cli_help_mentions_every_option():
    runner = CliRunner()
    text = runner.invoke(app, ["export", "--help"], terminal_width=200).output
    assert all(opt in text for opt in EXPORT_OPTIONS)
    text = runner.invoke(app, ["validate", "--help"], terminal_width=200).output
    assert all(opt in text for opt in ("--batch-sizes", "--tol", "--seed"))


def test_cli_export_then_validate(tmp_path):
    out = tmp_path / "art"
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--model", "resnet18", "--config", "width=4", "--num-classes", "10",
                                 "--input-shape", "3,16,16", "--split", "layer2,layer4", "--bn", "frozen",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["module", "layers", "params", "dual", "MFLOP/sample", "files"]
    assert lines[2].split()[1:4] == ["layer2.0.downsample.0", "..", "layer3.1.relu2"]
    assert load_artifacts(out).manifest["model"]["config"] == {"width": 4}
    result = runner.invoke(app, ["validate", str(out), "--batch-sizes", "2,8"])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout and "e2e dloss" in result.stdout


def test_cli_validate_exits_1_on_a_wrong_graph(tmp_path, monkeypatch):
    orig = rules.RULES["relu"]

    def no_mask(ops, node, xs, xds, p, u, s, ctx):  # forgets the ReLU derivative mask
        y, _, new = orig(ops, node, xs, xds, p, u, s, ctx)
        return y, (xds[0] if ctx.dual else None), new

    monkeypatch.setitem(rules.RULES, "relu", no_mask)
    _zoo_export("mlp", tmp_path, 1, "train")
    result = CliRunner().invoke(app, ["validate", str(tmp_path), "--batch-sizes", "4"])
    assert result.exit_code == 1 and "FAIL" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--model", "mlp", "--input-shape", "1,8"], "--input-shape must be 3"),
    (["--model", "mlp", "--input-shape", "1,x,8"], "--input-shape must be 3"),
    (["--model", "mlp", "--modules", "50"], "cannot split into 50 modules"),
    (["--model", "mlp", "--modules", "2", "--split", "layers.2"], "not both"),
    (["--model", "resnet18", "--config", "width=4", "--split", "layer1.0.conv2"], "inside a residual block"),
    (["--model", "mlp", "--split", "nope"], "no layer of that name"),
    (["--model", "mlp", "--bn", "sometimes"], "--bn must be one of"),
    (["--model", "mlp", "--config", "depth=3"], "unknown option"),
    (["--model", "mlp", "--config", "hidden"], "key=value"),
    (["--model", "mlp", "--weights", "missing.pth"], "not found"),
    (["--model", "mlp", "--tangents", "0"], "tangents must be"),
    (["--model", "mlp", "--modules", "2", "--balance-batch", "0"], "--balance-batch must be at least 1"),
])
def test_cli_export_errors_exit_2_with_a_message(tmp_path, args, message):
    base = {"--num-classes": "10", "--input-shape": "1,8,8", "--out": str(tmp_path / "a")}
    for opt, val in base.items():
        if opt not in args:
            args = [*args, opt, val]
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output


def test_cli_validate_missing_dir_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "none")])
    assert result.exit_code == 2 and "manifest.json is missing" in result.stderr


def test_resnet50_bottlenecks_export_and_validate(tmp_path):
    """The ResNet-50-style zoo entry (Bottleneck blocks, the depth benchmark's model) through the
    exporter: every dual graph of a K = 2 split against the float64 reference, at a width of 4."""
    torch.manual_seed(0)
    model = build_model("resnet50-imagenet", 10, (3, 32, 32), width=4)
    export_model(model, tmp_path, (3, 32, 32), 10, modules=2, model_spec=model_spec(model))
    report = validate_artifacts(tmp_path, batch_sizes=(4,))
    assert report.passed and not report.errors, report.table()


def test_maxpool_rule_emits_window_slices_next_to_their_use(tmp_path):
    """ResNet's stem pool (3x3, stride 2, padding 1) reads 9 strided slices of x and 9 of ẋ. Emitted
    one pair at a time, the dual graph's widest point in emission order holds less than those 18
    slices alone would (15 slices' worth, against 22.5 when all were emitted up front)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10))
    export_model(model, tmp_path, (3, 32, 32), 10, modules=1, tangents=1)
    live = graph_live(tmp_path, load_artifacts(tmp_path).manifest, batch=8)[0]
    assert live < 18 * (8 * 8 * 16 * 16 * 4)
