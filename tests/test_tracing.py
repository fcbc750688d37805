"""Op-level tracing (issue 15): every dual rule against float64 torch.func.jvp of the model's own
operations, the registry check that keeps it so, and the tracer's errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.reference_modules import jvp_module, set_bn_training
from asyncfgd.exporter.split import SplitError, cut_points, split_program
from asyncfgd.exporter.trace import UnsupportedLayerError, trace
from asyncfgd.runtime.dual import fusions
from asyncfgd.runtime.dual import interpreter as dual
from asyncfgd.runtime.dual.interpreter import run_program
from asyncfgd.runtime.dual.program import ModuleSpec, Node, stat_names, weight_names
from asyncfgd.runtime.dual.rules import RULES, RuleContext
from asyncfgd.runtime.dual.torch_ops import TorchOps


class Op(nn.Module):
    """``f(self, x)`` as a model, with the given tensors as parameters (``buffers`` as buffers)."""

    def __init__(self, f, buffers: dict | None = None, **params: torch.Tensor) -> None:
        super().__init__()
        self.f = f
        for k, v in params.items():
            setattr(self, k, nn.Parameter(v))
        for k, v in (buffers or {}).items():
            self.register_buffer(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self, x)


def _p(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _qkv_attention(m, x):
    b, length, d = x.shape
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, length, 2, d // 2).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, d)


def _with(module: nn.Module, f):
    m = Op(f)
    m.inner = module
    return m


OP_CASES = {  # name: (model factory, per-sample input shape, BatchNorm in train mode)
    "add_sub_param_broadcast": (lambda: Op(lambda m, x: (x + m.b) - m.c * x, b=_p(5), c=_p(3, 1)), (3, 5), False),
    "scalars_both_sides": (lambda: Op(lambda m, x: (1.5 - x) * 2.0 + x / 3.0 - 2.0 / (x * x + 1.0)), (3, 5), False),
    "mul_gate_div": (lambda: Op(lambda m, x: x * torch.sigmoid(x.mean(-1, keepdim=True)) / (x * x + 1.0)), (3, 5),
                     False),
    "elementwise_math": (lambda: Op(lambda m, x: torch.rsqrt(x * x + 1) + torch.sqrt(x * x + 2) - torch.log(
        torch.exp(-x) + 2) ** 3 + (-x).tanh() + x.exp() * 0.1), (3, 5), False),
    "view_size_arithmetic": (lambda: Op(lambda m, x: x.view(x.size(0), -1) @ m.w, w=_p(15, 4)), (3, 5), False),
    "permute_transpose_flatten": (lambda: Op(lambda m, x: x.permute(0, 2, 3, 1).transpose(1, 2).contiguous()
                                             .flatten(2) * m.s, s=_p(6)), (3, 2, 4), False),
    "index_slice_none": (lambda: Op(lambda m, x: x[:, 0] * 2 + x[:, 1:3].sum(1)
                                    + x[..., ::2].mean(-1, keepdim=True)[:, 0] + x[:, None, 2].squeeze(1)), (4, 5),
                         False),
    "expand_unsqueeze": (lambda: Op(lambda m, x: x[:, :1].expand(-1, 4, -1) * x + x.unsqueeze(1).mean(1)), (4, 5),
                         False),
    "cat_stack": (lambda: Op(lambda m, x: torch.stack([torch.cat([x, x * 2], 1), torch.cat([-x, x * x], 1)], 1)
                             .amax(1)), (3, 5), False),
    "split_chunk_unbind": (lambda: Op(lambda m, x: x.chunk(2, dim=-1)[0] * x.split([1, 3], -1)[1][..., :2]
                                      + torch.unbind(x, 1)[2][:, None, :2]), (3, 4), False),
    "reductions": (lambda: Op(lambda m, x: x.mean((1, 2)) + x.sum(-1).amax(-1) + torch.amax(x, (1, 2))), (3, 4),
                   False),
    "matmul_forms": (lambda: Op(lambda m, x: torch.bmm(x @ m.w, (x @ m.w).transpose(1, 2)).sum(-1) @ m.v,
                                w=_p(4, 6), v=_p(3, 2)), (3, 4), False),
    "einsum_forms": (lambda: Op(lambda m, x: torch.einsum("nij,jk->nik", x, m.w).sum(-1) + torch.einsum(
        "nij,nkj->nik", x, x).mean(-1) + torch.einsum("ij,nkj->nki", m.v, x).amax(1) + torch.einsum(
        "nij,j->ni", x, m.c), w=_p(4, 5), v=_p(3, 4), c=_p(4)), (3, 4), False),
    "clamp_abs": (lambda: Op(lambda m, x: x.clamp(-0.5, 1.0) + torch.clamp(x, min=0.2) + x.clamp(max=0.1)
                             + x.abs()), (3, 5), False),
    "var_std_normalize_max": (lambda: Op(lambda m, x: x.var(-1, keepdim=True)
                                         + torch.std(x, dim=1).mean(-1)[:, None, None]
                                         + x.var(dim=(1, 2), unbiased=False)[:, None, None] + F.normalize(x, dim=-1)
                                         + torch.max(x, 1).values[:, None] + x.max(dim=-1, keepdim=True)[0]),
                              (3, 5), False),
    "pad_fill": (lambda: Op(lambda m, x: F.pad(x, (1, 2), value=0.5)[..., 1:-2] + F.pad(x[:, None], (1, 0, 0, 2))[
        :, 0, :-2, 1:] + torch.zeros_like(x) + torch.ones_like(x) * 2 + torch.full_like(x, 0.25)), (3, 5), False),
    "matmul_weight_on_left": (lambda: Op(lambda m, x: torch.matmul(m.w, x), w=_p(2, 3)), (3, 4), False),
    "softmax_log_softmax": (lambda: Op(lambda m, x: F.softmax(x, -1) + F.log_softmax(x, dim=1) + x.softmax(1)),
                            (3, 5), False),
    "sdpa_handwritten_attention": (lambda: _with(nn.Linear(4, 12), lambda m, x: _qkv_attention(
        type("M", (), {"qkv": m.inner})(), x)), (3, 4), False),
    "class_token_position_embedding": (lambda: Op(lambda m, x: torch.cat([m.cls.expand(x.shape[0], -1, -1), x], 1)
                                                  + m.pos, cls=_p(1, 1, 4), pos=_p(1, 4, 4)), (3, 4), False),
    "weight_math_layer_scale": (lambda: Op(lambda m, x: x * m.g[:, None, None] + m.g.exp().sum() * x,
                                           g=_p(2)), (2, 3, 3), False),
    "buffer_constant_and_detach": (lambda: Op(lambda m, x: x * m.c + x * x.detach(), {"c": torch.randn(3, 5)}),
                                   (3, 5), False),
    "relu": (nn.ReLU, (4, 5), False),
    "relu6_hardtanh": (lambda: nn.Sequential(nn.ReLU6(), nn.Hardtanh(-2.0, 1.5)), (4, 5), False),
    "leaky_relu_elu": (lambda: nn.Sequential(nn.LeakyReLU(0.2), nn.ELU(0.7)), (4, 5), False),
    "silu_sigmoid_tanh": (lambda: nn.Sequential(nn.SiLU(), nn.Sigmoid(), nn.Tanh()), (4, 5), False),
    "hardswish_hardsigmoid": (lambda: nn.Sequential(nn.Hardswish(), nn.Hardsigmoid()), (4, 5), False),
    "softplus_mish": (lambda: nn.Sequential(nn.Softplus(beta=2.0), nn.Mish()), (4, 5), False),
    "gelu_both": (lambda: nn.Sequential(nn.GELU(), nn.GELU(approximate="tanh")), (4, 5), False),
    "functional_activations": (lambda: Op(lambda m, x: F.relu(x) + F.silu(x) + F.hardswish(x) + F.gelu(x)
                                          + F.leaky_relu(x, 0.1) + F.elu(x) + F.softplus(x) + F.mish(x)
                                          + F.hardsigmoid(x) + F.relu6(x) + F.hardtanh(x)), (4, 5), False),
    "linear_tokens": (lambda: nn.Linear(5, 3), (4, 5), False),
    "functional_linear_conv": (lambda: Op(lambda m, x: F.conv2d(F.linear(x, m.w, m.b), m.k, None, 1, 1),
                                          w=_p(4, 4), b=_p(4), k=_p(3, 2, 3, 3)), (2, 4, 4), False),
    "conv1d_same_even_valid_dilated_grouped": (lambda: nn.Sequential(
        nn.Conv1d(2, 4, 4, padding="same"), nn.Conv1d(4, 4, 3, stride=2, dilation=2, groups=2),
        nn.Conv1d(4, 3, 3, padding="valid", bias=False)), (2, 17), False),
    "conv2d_same_even": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 5, 6), False),
    "batchnorm1d_2d_train": (lambda: nn.Sequential(nn.BatchNorm1d(5)), (5,), True),
    "batchnorm1d_3d_train": (lambda: nn.Sequential(nn.BatchNorm1d(3)), (3, 6), True),
    "batchnorm1d_frozen": (lambda: nn.Sequential(nn.BatchNorm1d(3)), (3, 6), False),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 3, 3), False),
    "groupnorm_noaffine_functional": (lambda: Op(lambda m, x: F.group_norm(x, 3)), (6, 2, 2), False),
    "layernorm_functional": (lambda: Op(lambda m, x: F.layer_norm(x, (5,), m.w, m.b), w=_p(5), b=_p(5)), (3, 5),
                             False),
    "adaptive_avg_unequal_bins": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 7), False),
    "adaptive_avg_equal_max": (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.AdaptiveMaxPool2d((1, 1))),
                               (2, 4, 6), False),
    "functional_pools": (lambda: Op(lambda m, x: F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)
                                    + F.adaptive_avg_pool2d(x, 2) + F.adaptive_max_pool2d(x, 2)), (2, 4, 4), False),
    "upsample_interpolate": (lambda: Op(lambda m, x: nn.functional.interpolate(x, scale_factor=2) * 2), (2, 3, 2),
                             False),
    "upsample_module": (lambda: nn.Upsample(scale_factor=(2, 3)), (2, 3, 2), False),
    "multihead_attention": (lambda: _with(nn.MultiheadAttention(4, 2, batch_first=True),
                                          lambda m, x: m.inner(x, x, x, need_weights=False)[0]), (3, 4), False),
    "transformer_layer_post_norm_relu": (lambda: nn.Sequential(nn.TransformerEncoderLayer(
        4, 2, 6, dropout=0.0, batch_first=True)), (3, 4), False),
    "transformer_encoder_pre_norm_gelu": (lambda: nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(
        4, 2, 6, dropout=0.0, activation="gelu", batch_first=True, norm_first=True), 2, enable_nested_tensor=False)),
        (3, 4), False),
}

class Residual(nn.Module):
    """conv(x) + x: the `add` rule with two tangent-carrying inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


LAYER_CASES = {  # name: (layer, per-sample input shape, BatchNorm in train mode), each traced as nn.Sequential(layer)
    "linear": (lambda: nn.Linear(6, 5), (6,), False),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), (6,), False),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 7, 7), False),
    "conv2d_groups2_stride2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 7, 7), False),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False), (4, 7, 7), False),
    "batchnorm2d_train": (lambda: nn.BatchNorm2d(4), (4, 5, 5), True),
    # conv -> BN: on a zero input tangent the pair runs folded (conv_bn_from_data)
    "conv_bn_train": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)), (4, 7, 7), True),
    "conv_bn_frozen": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)), (4, 7, 7), False),
    "conv_bn_stride2_dilated_train": (lambda: nn.Sequential(nn.Conv2d(3, 5, 3, 2, 2, 2, bias=False), nn.BatchNorm2d(5)),
                                      (3, 9, 8), True),
    "conv_bn_noaffine_train": (lambda: nn.Sequential(nn.Conv2d(2, 3, (1, 3), padding=(0, 1)),
                                                     nn.BatchNorm2d(3, affine=False)), (2, 5, 6), True),
    "batchnorm2d_frozen": (lambda: nn.BatchNorm2d(4), (4, 5, 5), False),
    "layernorm_1d": (lambda: nn.LayerNorm(6), (6,), False),
    "layernorm_chw": (lambda: nn.LayerNorm([4, 5, 5]), (4, 5, 5), False),
    "relu": (nn.ReLU, (4, 5, 5), False),
    "relu6": (nn.ReLU6, (4, 5, 5), False),
    "gelu": (nn.GELU, (4, 5, 5), False),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), (4, 5, 5), False),
    "maxpool_k2s2": (lambda: nn.MaxPool2d(2), (4, 6, 6), False),
    "maxpool_k3s2p1": (lambda: nn.MaxPool2d(3, 2, 1), (4, 7, 7), False),
    "maxpool_ceil": (lambda: nn.MaxPool2d(3, 2, ceil_mode=True), (4, 8, 8), False),
    "avgpool": (lambda: nn.AvgPool2d(2), (4, 6, 6), False),
    "avgpool_k3s2p1_nopad_ceil": (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                                  (4, 8, 8), False),
    "global_avgpool": (lambda: nn.AdaptiveAvgPool2d(1), (4, 5, 5), False),
    "flatten": (nn.Flatten, (4, 5, 5), False),
    "add": (Residual, (4, 5, 5), False),
    "dropout": (lambda: nn.Dropout(0.5), (4, 5, 5), False),
}
OP_CASES.update({f"layer_{name}": ((lambda make=make: nn.Sequential(make())), shape, bn)
                 for name, (make, shape, bn) in LAYER_CASES.items()})

#: torch's hardsigmoid derivative multiplies by 1/6 rounded to float32, also in float64
ROUGH = {"hardswish_hardsigmoid": 1e-7, "functional_activations": 1e-7}

#: rules kept for programs of format 1 (the tracer no longer emits them): tested on their own below
LEGACY_RULES = {"flatten", "identity"}


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t))


def _case(name: str) -> tuple[nn.Module, tuple[int, ...], bool, list[Node]]:
    make, shape, bn_train = OP_CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    _randomise(model)
    set_bn_training(model, bn_train)
    return model, shape, bn_train, trace(model, shape)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_rule_matches_torch_jvp(case, m, monkeypatch):
    """y and every ẏ_j of the traced program, run with the dual rules, equal torch.func.jvp over the
    model's own operations (float64), with and without an input tangent; BN statistics too. A conv
    read only by a BatchNorm runs as the folded pair (fusions.conv_bn_from_data) on a zero input
    tangent where that pays (m > 1, or frozen BN), and only there."""
    folded: list[int] = []
    monkeypatch.setattr(dual, "conv_bn_from_data", lambda *a: folded.append(1) or fusions.conv_bn_from_data(*a))
    model, shape, bn_train, nodes = _case(case)
    mod = ModuleSpec(0, nodes, "input")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    params = {q: sd[q] for q in weight_names(nodes)}
    stats = {q: sd[q] for q in stat_names(nodes)}
    gen = torch.Generator().manual_seed(1)
    n = 5
    x = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    x_dot = torch.randn(m, n, *shape, dtype=torch.float64, generator=gen)
    tangents = {q: torch.randn(m, *p.shape, dtype=torch.float64, generator=gen) for q, p in params.items()}
    for xd in (x_dot, None):
        if xd is None and not params:
            continue
        run_stats = {q: v.clone() for q, v in stats.items()}
        y, yd, new = run_program(TorchOps(torch.float64), nodes, "input", x, xd, params, tangents, run_stats,
                                 RuleContext(m, True, bn_train))
        for j in range(m):
            ref_stats = {q: v.clone() for q, v in stats.items()}
            y_ref, yd_ref = jvp_module(model, mod, x, None if xd is None else xd[j], params,
                                       {q: u[j] for q, u in tangents.items()}, ref_stats)
            torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(yd[j], yd_ref, rtol=ROUGH.get(case, 1e-9), atol=ROUGH.get(case, 1e-10))
            for q in new:
                torch.testing.assert_close(new[q], ref_stats[q], rtol=1e-10, atol=1e-12)
        assert bool(new) == bn_train
    assert len(folded) == (case.startswith("layer_conv_bn") and (m > 1 or not bn_train))


def test_every_rule_has_a_test():
    """A rule registered without a case here fails this test."""
    covered: set[str] = set()
    for name in OP_CASES:
        covered |= {n.op for n in _case(name)[3]}
    covered |= {"dropout"}  # tests/test_dropout.py: masks come from the runtime
    missing = sorted(set(RULES) - covered - LEGACY_RULES)
    assert not missing, f"rules without a test case: {missing}"


def test_legacy_flatten_and_identity_rules():
    """Programs of format 1 name 'flatten' and 'identity' nodes; they still run."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    xd = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    ctx = RuleContext(1, True, False)
    for op, want in (("flatten", x.reshape(2, 12)), ("identity", x)):
        y, yd, _ = RULES[op](TorchOps(torch.float64), Node("n", op, ["input"]), [x], [xd], {}, {}, {}, ctx)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(yd, xd.reshape(2, 1, *want.shape[1:]))


# --------------------------------------------------------------------------- errors


class Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cumsum(self.body(x), 1))


class MergesBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        return self.fc(x.view(b * 4, 3)).view(b, 12)


def test_unsupported_op_names_op_module_line_and_the_supported_set():
    with pytest.raises(UnsupportedLayerError) as err:
        trace(Cumsum(), (4,))
    msg = str(err.value)
    assert "'cumsum'" in msg and "no dual rule" in msg and "test_tracing.py:" in msg
    assert "torch.cumsum(self.body(x), 1)" in msg and "Supported operations:" in msg and "matmul" in msg
    with pytest.raises(UnsupportedLayerError,
                       match=r"layer '1' \(PixelShuffle\).* has no dual rule.*Supported layers: Linear"):
        trace(nn.Sequential(nn.Conv2d(4, 4, 1), nn.PixelShuffle(2)), (4, 2, 2))


def test_batch_merging_reshape_names_the_line_and_suggests_batch_first():
    with pytest.raises(UnsupportedLayerError) as err:
        trace(MergesBatch(), (4, 3))
    msg = str(err.value)
    assert "mixes the samples" in msg and "x.view(b * 4, 3)" in msg and "keep the batch first" in msg


def test_batch_size_is_not_baked_in(tmp_path):
    """A model traced with x.view(x.size(0), -1) runs at any batch size (ONNX and rules)."""
    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(0)
    model = Op(lambda m, x: x.view(x.size(0), -1) @ m.w, w=_p(12, 3))
    export_model(model, tmp_path, (3, 4), 3, modules=1, bn_mode="frozen")
    sess = ort.InferenceSession(str(tmp_path / "module0.eval.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float32)
        got = sess.run(None, {"x": x, "w.w": model.w.detach().numpy()})[0]
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_too_few_single_value_cuts_name_the_candidates():
    torch.manual_seed(0)
    program = trace(nn.Sequential(nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)), (3, 4))
    with pytest.raises(SplitError, match=r"only 0 single-value cut point\(s\).*Candidate cuts: none"):
        split_program(program, modules=2)
    mlp = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (4,))
    with pytest.raises(SplitError, match=r"at most 3 modules.*Candidate cuts: 1, 2"):
        split_program(mlp, modules=4)


def test_weight_used_twice_is_never_cut_between():
    """A tied weight read in two places keeps both reads in one module."""
    torch.manual_seed(0)
    model = Op(lambda m, x: torch.relu(x @ m.w) @ m.w.transpose(0, 1) * 2.0, w=_p(4, 4))
    program = trace(model, (4,))
    reads = [i for i, n in enumerate(program) if n.params]
    assert len(reads) == 2
    points = cut_points(program)
    assert points and not [i for i in points if reads[0] < i <= reads[1]]
