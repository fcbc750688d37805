"""The local-activity method: its estimator, graphs, runtime and oracle.

- the estimator is consistent: over 2000 tangents each block's mean estimate points along, and has
  the scale of, autograd's gradient of the same local loss (computed through the model's own layers);
- the runtime (ONNX Runtime and torch backends) trains step for step like the independent oracle
  (exporter/reference_activity.py: torch.func.jvp and per-layer autograd);
- validate and the TensorRT op check cover the new graph role; the plan follows its rule.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from asyncfgd.app.training.data import load_digits, one_hot
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.local_heads import aux_head, init_aux_weights
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.exporter.reference_activity import head_forward, run_local_activity_reference
from asyncfgd.exporter.split import split_program
from asyncfgd.exporter.trace import trace, trace_model
from asyncfgd.exporter.tracing.replay import run_segment
from asyncfgd.exporter.trt_check import check_trt_compat
from asyncfgd.exporter.validate import validate_artifacts
from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.dual import activity
from asyncfgd.runtime.dual.activity import (
    PlanError,
    cell_shape,
    channel_reader,
    groups,
    loss_groups,
    plan,
    site_groups,
    site_support,
    support_chain,
)
from asyncfgd.runtime.dual.interpreter import GraphSpec, run_module
from asyncfgd.runtime.dual.program import module_specs, weight_names
from asyncfgd.runtime.dual.rules.layers import conv_correlation
from asyncfgd.runtime.dual.torch_ops import TorchOps
from asyncfgd.runtime.engine import load_runners, make_scheduler
from asyncfgd.runtime.perturb import fill_signs, fill_tangents
from asyncfgd.runtime.scheduler import Perturbation

SHAPE = (1, 8, 8)


def _export(out: Path, tangents: int, perturb: dict[str, str] | None = None, bn_mode: str = "train",
            modules: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", 10, SHAPE, channels=(4, 8))
    export_model(model, out, SHAPE, 10, modules=modules, activity=True, tangents=tangents, perturb=perturb,
                 model_spec=model_spec(model), bn_mode=bn_mode)
    return model


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """Both kinds of perturbation: the first conv (and its BatchNorm) by weights, the rest by activity."""
    out = tmp_path_factory.mktemp("act") / "mixed"
    return out, _export(out, 2, {"features.0.0": "weight"})


def _local_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of a head's classifiers (one per channel group, logits side by side)."""
    heads = logits.shape[1] // 10
    return F.cross_entropy(logits.reshape(-1, 10), labels.repeat_interleave(heads))


def _activity_step(ops: TorchOps, mod, m: int, step: int, x: torch.Tensor, onehot: torch.Tensor,
                   params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One activity-role pass of ``mod`` (torch backend, float64) with step ``step``'s seeded noise."""
    eps = [np.empty((m, len(x), *s.shape), np.float32) for s in mod.activity.sites]
    fill_signs(eps, 0, step, mod.index)
    noise = {s.node: torch.tensor(e, dtype=torch.float64) for s, e in zip(mod.activity.sites, eps, strict=True)}
    with torch.no_grad():
        return run_module(ops, mod, GraphSpec(c.ACTIVITY, m, "train"), not mod.aux, x, None, params, {},
                          {q: v.clone() for q, v in params.items()}, onehot, None, noise)


def _local_gradient(model: torch.nn.Module, mod, x: torch.Tensor, labels: torch.Tensor,
                    params: dict[str, torch.Tensor], names: list[str]) -> tuple[torch.Tensor, ...]:
    """Autograd's gradient of the module's local loss (its head's, or the true loss) for ``names``."""
    w = {q: params[q].clone().requires_grad_() for q in weight_names(mod.nodes + mod.aux)}
    y = run_segment(model, mod, x, {q: w[q] for q in weight_names(mod.nodes)}, None)
    logits = head_forward(mod.aux, y, w, {}) if mod.aux else y
    return torch.autograd.grad(_local_loss(logits, labels), [w[q] for q in names])


def _modules(k: int) -> list:
    torch.manual_seed(0)
    return split_program(trace(build_model("cnn", 10, (1, 28, 28)), (1, 28, 28)), modules=k)


def test_plan_follows_the_variance_rule_and_overrides():
    """The 28x28 cnn: conv 1 has 16·28·28 activations per sample / 64 = 196 > its 144 + 32 weights (with its
    BatchNorm): weights, unless its grid head makes it a cell site (docs/algorithm.md); conv 2
    (32·14·14 / 64 = 98 < 4672) and the 10-logit linear layers: activity."""
    first, second = _modules(2)
    assert plan(first.nodes, [], 64, True).weight_perturbed == ["features.0.0.weight", "features.0.1.weight",
                                                                "features.0.1.bias"]
    p2 = plan(second.nodes, [], 64, True)
    assert [(s.node, s.layers) for s in p2.sites] == [("features.1.1", ["features.1.0", "features.1.1"]),
                                                      ("head", ["head"])] and not p2.weight_perturbed
    assert groups(p2) == ["features.1.1", "head"]
    forced = plan(first.nodes, [], 64, True, {"features.0.0": "activity"})
    assert [s.node for s in forced.sites] == ["features.0.1"] and not forced.weight_perturbed
    assert plan(first.nodes, [], 4096, True).weight_perturbed == []  # a larger batch averages more noise away
    head = aux_head(first, first.nodes[-1].shape, 10, grid=2, groups=16)
    cells = plan(first.nodes, head, 64, True)  # with its grid head conv 1 is a cell site: 16·2·2 / 64 = 1 < 176
    assert [s.node for s in cells.sites][0] == "features.0.1" and not cells.weight_perturbed
    (whole,) = _modules(1)
    coupled = plan(whole.nodes, [], 64, True)  # conv 1's samples meet again in BatchNorm 2: no site
    assert "features.0.0.weight" in coupled.weight_perturbed
    with pytest.raises(PlanError, match="couples the samples"):
        plan(whole.nodes, [], 64, True, {"features.0.0": "activity"})
    assert [s.node for s in plan(whole.nodes, [], 64, False, {"features.0.0": "activity"}).sites][0] == "features.0.1"
    with pytest.raises(PlanError, match="must be one of"):
        plan(first.nodes, [], 64, True, {"features.0.0": "both"})


def test_export_rejects_unknown_layers(tmp_path: Path):
    torch.manual_seed(0)
    with pytest.raises(PlanError, match="does not have: conv9.*features.0.0"):
        export_model(build_model("cnn", 10, SHAPE, channels=(4, 8)), tmp_path, SHAPE, 10, modules=2,
                     activity=True, perturb={"conv9": "weight"})


def test_noise_is_seeded_signs_apart_from_the_tangents():
    a = [np.empty((3, 5, 7), np.float32), np.empty((3, 5, 2), np.float32)]
    b = [np.empty_like(t) for t in a]
    fill_signs(a, 7, 11, 1)
    fill_signs(b, 7, 11, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert set(np.unique(np.concatenate([t.ravel() for t in a]))) == {-1.0, 1.0}
    fill_signs(b, 7, 11, 0)
    assert not np.array_equal(a[0], b[0])
    big = [np.empty(1 << 16, np.float32)]
    fill_signs(big, 0, 0, 0)
    assert abs(float(big[0].mean())) < 4 / np.sqrt(big[0].size)
    u = [np.empty(1 << 16, np.float32)]
    fill_tangents(u, 0, 0, 0, "rademacher")
    assert abs(float(np.mean(u[0] * big[0]))) < 4 / np.sqrt(big[0].size)  # not the tangents' stream


def test_estimator_is_consistent_with_autograd(tmp_path: Path, one_torch_thread: None):
    """Issue 16's check: 2000 tangents on a fixed model and batch (64 real digits); per block, the mean
    estimate's cosine with autograd's gradient of the block's local loss is >= 0.95 and its least-squares
    slope against it within 1 ± 0.1 (a lost 1/N or 1/m would give a slope of 64 or 1/250)."""
    chunk, chunks = 250, 8
    model = _export(tmp_path / "a", chunk)
    arts = load_artifacts(tmp_path / "a")
    model = model.double()
    trace_model(model, SHAPE)
    ops = TorchOps(dtype=torch.float64)
    ds = load_digits()
    x = torch.tensor(ds.train.images[:64], dtype=torch.float64)
    labels = torch.tensor(ds.train.labels[:64])
    onehot = F.one_hot(labels, 10).double()
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in arts.weights.items()}
    for mod in module_specs(arts.manifest):
        act = mod.activity
        assert act is not None and act.sites and not act.weight_perturbed  # the rule's choice on this model
        names = weight_names(mod.nodes + mod.aux)
        mean = {q: torch.zeros_like(params[q]) for q in names}
        for step in range(chunks):
            out = _activity_step(ops, mod, chunk, step, x, onehot, params)
            for q in names:
                mean[q] += out[c.grad_output(q)] / chunks
        grads = _local_gradient(model, mod, x, labels, params, names)
        est = torch.cat([mean[q].flatten() for q in names])
        true = torch.cat([g.flatten() for g in grads])
        cosine = float(est @ true / (est.norm() * true.norm()))
        slope = float(est @ true / (true @ true))
        assert cosine >= 0.95 and abs(slope - 1) <= 0.1, (mod.index, cosine, slope)
        x = out[c.Y] if c.Y in out else x


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """Frozen BatchNorm in one module: conv 1 is a site although BatchNorm 2 follows it in its module."""
    out = tmp_path_factory.mktemp("act") / "frozen"
    return out, _export(out, 2, bn_mode="frozen", modules=1)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """The rule's plan: block 1's conv a cell site, block 2's read apart by the classifier."""
    out = tmp_path_factory.mktemp("act") / "planned"
    return out, _export(out, 2)


@pytest.mark.parametrize("artifacts", ["mixed", "frozen", "planned"])
def test_runtime_matches_the_oracle_step_for_step(artifacts: str, request: pytest.FixtureRequest,
                                                  one_torch_thread: None):
    art, model = request.getfixturevalue(artifacts)
    arts = load_artifacts(art)
    if artifacts == "frozen":
        assert [s.node for s in arts.modules[0].activity.sites] == ["features.0.1", "features.1.1", "head"]
    if artifacts == "planned":
        assert [s.node for s in arts.modules[0].activity.sites] == ["features.0.1", "aux0.fc"]
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((16, *SHAPE)).astype(np.float32), rng.integers(0, 10, 16)) for _ in range(3)]
    heads = {k: v for k, v in arts.weights.items() if k.startswith("aux")}
    ref = run_local_activity_reference(model, module_specs(arts.manifest), batches, heads, seed=3,
                                       lr=lambda s: 0.05, optimizer="sgd", tangents=2, bn_mode=arts.bn_mode)
    moved = max(float(np.abs(ref.params[q].numpy() - arts.weights[q]).max()) for q in ref.params)
    assert moved > 0.01
    for backend in ("torch", "onnxruntime"):
        runners = load_runners(arts, backend, 1)
        sched = make_scheduler(runners, "local-activity", "sgd", lambda s: 0.05, lambda k, s: 1.0, Perturbation(3))
        outcomes = [o for x, y in batches for o in sched.feed(x, one_hot(y, 10))] + sched.drain()
        sched.close()
        assert [o.step for o in outcomes] == [0, 1, 2]
        assert len(outcomes[0].loss_dot) == 2 * len(groups(arts.modules[-1].activity))
        for o in outcomes:
            assert o.loss == pytest.approx(ref.loss[o.step], rel=1e-5)
            np.testing.assert_allclose(o.loss_dot, ref.loss_dot[o.step], rtol=1e-4, atol=1e-6)
        for r in runners:
            for q, p in r.params.items():
                np.testing.assert_allclose(r.to_host(p), ref.params[q].numpy(), rtol=0, atol=1e-6, err_msg=q)
            for q, s in r.buffers.items():
                np.testing.assert_allclose(r.to_host(s), ref.stats[q].numpy(), rtol=0, atol=1e-6, err_msg=q)


@pytest.mark.parametrize("artifacts", ["mixed", "planned"])  # planned: a cell site and channel passes
def test_validate_and_the_tensorrt_check_cover_the_role(artifacts: str, request: pytest.FixtureRequest):
    art, _ = request.getfixturevalue(artifacts)
    report = validate_artifacts(art, batch_sizes=(1, 16))
    rows = [r for r in report.rows if r.role == c.ACTIVITY]
    assert len(rows) == 4 and all(r.status.startswith("pass") for r in rows), report.table()
    arts = load_artifacts(art)
    for info in arts.modules:
        graph = onnx.load_from_string(arts.graph_bytes(info.index, c.ACTIVITY))
        assert check_trt_compat(graph) == [], info.index
        outputs = info.graphs[c.ACTIVITY]["outputs"]
        assert {c.grad_output(q) for q in info.param_names} <= set(outputs) and c.SAMPLE_DOT in outputs


def _cli(args: list[str], cache: Path):
    from typer.testing import CliRunner

    from asyncfgd.app.cli import app

    return CliRunner().invoke(app, args, env={"TQDM_DISABLE": "1", "ASYNCFGD_CACHE": str(cache)})


def test_train_cli_uses_the_methods_defaults_and_explains_mistakes(tmp_path: Path):
    run = tmp_path / "run"
    result = _cli(["train", "--method", "local-activity", "--model", "cnn", "--config", "channels=4,8",
                   "--epochs", "1", "--perturb", "features.0.0=weight", "--run-dir", str(run)], tmp_path / "cache")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["tangents"], config["lr"], config["perturb"]) == (4, 3e-3, {"features.0.0": "weight"})
    manifest = json.loads((Path(config["artifacts_dir"]) / "manifest.json").read_text())
    assert manifest["modules"][0]["activity"]["weight_perturbed"][0] == "features.0.0.weight"
    explicit = _cli(["train", "--method", "local-activity", "--tangents", "2", "--lr", "0.01", "--model", "cnn",
                     "--config", "channels=4,8", "--epochs", "0", "--run-dir", str(tmp_path / "r2")],
                    tmp_path / "cache")
    assert explicit.exit_code == 0, explicit.output
    config = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert (config["tangents"], config["lr"]) == (2, 0.01)
    wrong = _cli(["train", "--perturb", "features.0.0=weight", "--run-dir", str(tmp_path / "r3")], tmp_path / "cache")
    assert wrong.exit_code == 2 and "add --method local-activity" in wrong.output
    bad = _cli(["train", "--method", "local-activity", "--model", "cnn", "--perturb", "conv9=weight",
                "--run-dir", str(tmp_path / "r4")], tmp_path / "cache")
    assert bad.exit_code == 2 and "does not have: conv9" in bad.output and "Traceback" not in bad.output
    plain = tmp_path / "plain"
    torch.manual_seed(0)
    export_model(build_model("cnn", 10, SHAPE, channels=(4, 8)), plain, SHAPE, 10, modules=2)
    missing = _cli(["train", "--method", "local-activity", "--artifacts", str(plain), "--run-dir",
                    str(tmp_path / "r5")], tmp_path / "cache")
    assert missing.exit_code == 2 and "export --activity" in missing.output


def test_export_cli_writes_the_role_and_validate_checks_it(tmp_path: Path):
    out = tmp_path / "art"
    args = ["export", "--model", "cnn", "--config", "channels=4,8", "--num-classes", "10", "--input-shape", "1,8,8",
            "--modules", "2", "--tangents", "2", "--out", str(out)]
    lonely = _cli([*args, "--perturb", "features.0.0=weight"], tmp_path / "cache")
    assert lonely.exit_code == 2 and "add --activity" in lonely.output
    result = _cli([*args, "--activity", "--perturb", "features.0.0=weight"], tmp_path / "cache")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c.ACTIVITY in m["graphs"] for m in manifest["modules"]] == [True, True]
    assert manifest["modules"][0]["activity"]["weight_perturbed"][0] == "features.0.0.weight"
    checked = _cli(["validate", str(out), "--batch-sizes", "16"], tmp_path / "cache")
    assert checked.exit_code == 0 and checked.output.count(" activity ") == 2, checked.output


@pytest.mark.parametrize("act, pool, pooled", [(torch.nn.ReLU, 2, True), (torch.nn.ReLU6, 2, True),
                                               (torch.nn.ReLU, 3, False)])
def test_site_support_is_where_autograd_finds_the_site_reaching_the_output(act, pool, pooled):
    """conv -> BN -> activation -> max-pool: the support read off the site's readers equals the
    nonzero pattern of autograd's gradient (a tiled pool); an overlapping pool (3 x 3, stride 3 on 8 x 8
    drops a row and column) keeps only the activation's part, a superset of it."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), act(),
                                 torch.nn.MaxPool2d(pool)).double()
    nodes = trace(layers, (2, 8, 8))
    site = plan(nodes, [], batch=5, bn_train=True, choose={nodes[0].name: "activity"}).sites[0]
    chain = support_chain(site, nodes)
    assert [n.op for n in chain] == ([act().__class__.__name__.lower()] + (["maxpool2d"] if pooled else []))
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64) * 3  # ReLU6's upper flat part is reached too
    z = layers[1](layers[0](x)).detach().requires_grad_()
    y = layers[3](layers[2](z))
    reach, = torch.autograd.grad(y.sum(), z)
    ops = TorchOps(dtype=torch.float64)
    values = {chain[0].name: layers[2](z).detach(), site.node: z.detach()}
    if pooled:
        values[chain[1].name] = y.detach()
    support = site_support(ops, chain, z.detach(), values)
    if pooled:
        torch.testing.assert_close(support, (reach != 0).double(), rtol=0, atol=0)
    else:
        assert bool(((reach != 0) <= (support != 0)).all()) and support.sum() > (reach != 0).sum()


@pytest.mark.parametrize("module, conv, switch, bound", [
    (0, "features.0.0.weight", "cell_shape", 0.3),      # measured 3e-29 (exact: 4 tangents, 4 cells) vs 2.44
    (1, "features.1.0.weight", "site_support", 0.6),    # measured 0.28 vs 1.65
    (1, "features.1.0.weight", "channel_reader", 0.3),  # measured 0.28 vs 3.08
])
def test_each_variance_cut_removes_noise_not_signal(module: int, conv: str, switch: str, bound: float,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Cell tangents (first block), the support mask and the channel passes at the classifier (last
    block) remove noise, not signal: over 64 steps of 4 tangents, the block's conv estimate (64
    digits) has a smaller mean squared error with the true gradient with the cut than without it,
    and the same mean (unbiased either way, within the 64-step average's noise)."""
    model = _export(tmp_path / "a", 4)
    arts = load_artifacts(tmp_path / "a")
    mods = module_specs(arts.manifest)
    ops = TorchOps(dtype=torch.float64)
    ds = load_digits()
    x = torch.tensor(ds.train.images[:64], dtype=torch.float64)
    labels = torch.tensor(ds.train.labels[:64])
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in arts.weights.items()}
    onehot = F.one_hot(labels, 10).double()
    trace_model(model.double(), SHAPE)
    for mod in mods[:module]:
        x = _activity_step(ops, mod, 4, 0, x, onehot, params)[c.Y]
    mod = mods[module]
    true, = _local_gradient(model, mod, x, labels, params, [conv])

    def estimates() -> torch.Tensor:
        return torch.stack([_activity_step(ops, mod, 4, step, x, onehot, params)[c.grad_output(conv)]
                            for step in range(64)])

    cut = estimates()
    monkeypatch.setattr(activity, switch, lambda *args: None)
    plain = estimates()
    err = [float(((e - true) ** 2).sum(dim=(1, 2, 3, 4)).mean() / (true ** 2).sum()) for e in (cut, plain)]
    assert err[0] < bound * err[1], err
    spread = float(plain.std(dim=0).norm() / 8)  # the 64-step mean's standard error
    assert float((cut.mean(0) - plain.mean(0)).norm()) < 3 * spread


@pytest.mark.parametrize("groups, c_in, c_out, stride", [(1, 4, 6, 1), (2, 4, 6, 2), (8, 8, 80, 1)])
def test_grouped_conv_correlation_is_autograds_weight_gradient(groups, c_in, c_out, stride):
    """A grouped conv is a site (the grouped head's classifiers): its estimate pulls G back by the
    per-group correlation, which must equal autograd's weight gradient for the same G."""
    torch.manual_seed(0)
    x = torch.randn(3, c_in, 6, 6, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, 2, 2, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, stride=stride, groups=groups)
    g = torch.randn_like(y)
    ref, = torch.autograd.grad(y, w, g)
    attrs = {"stride": [stride, stride], "padding": [0, 0], "dilation": [1, 1]}
    got = conv_correlation(TorchOps(dtype=torch.float64), x, g, attrs, (2, 2), groups)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_sites_split_by_head_group_only_through_channelwise_layers():
    """With a grouped head, a site whose channels reach it through channelwise layers alone takes
    each group's own d; a site before another conv mixes channels and takes the whole loss's."""
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8), channels=(4, 8))
    mod = split_program(trace(model, (1, 8, 8)), at=["flatten"])[0]  # (conv, BN, ReLU, pool) twice
    mod.aux = aux_head(mod, mod.nodes[-1].shape, 10, grid=2, groups=4)
    p = plan(mod.nodes, mod.aux, batch=64, bn_train=False, choose={"features.0.0": "activity"})
    split = {s.node: site_groups(s, mod.nodes, mod.aux) for s in p.sites}
    assert split == {"features.0.1": 1, "features.1.1": 4, "aux0.fc": 4}
    assert loss_groups(mod.aux) == 4 and loss_groups([]) == 1


def test_a_linear_reads_channels_apart_only_after_channelwise_layers():
    """The cnn's last block: its conv site reaches the classifier through BatchNorm, ReLU, pooling
    and the flatten, so the classifier reads its channels apart; the first block's site meets
    another conv first, and the classifier's own (vector) site has no channels."""
    mods = split_program(trace(build_model("cnn", 10, (1, 8, 8), channels=(4, 8)), (1, 8, 8)), modules=1)
    nodes = mods[0].nodes
    p = plan(nodes, [], batch=16, bn_train=False, choose={"features.0.0": "activity"})
    found = {s.node: channel_reader(s, nodes) for s in p.sites}
    assert {k: v and v.name for k, v in found.items()} == {"features.0.1": None, "features.1.1": "head",
                                                          "head": None}


@pytest.mark.parametrize("heads, m, exact", [(4, 4, True), (4, 2, False), (1, 16, True), (1, 8, False)])
def test_cell_tangents_give_the_exact_local_gradient_when_m_covers_the_cells(heads: int, m: int, exact: bool):
    """Block 1's conv (4 channels) reaches its 2 x 2 grid head through ReLU and a tiled max-pool: its
    local gradient is constant over each cell's support. With one classifier per channel each d
    moves 4 cells, with one classifier for all 16: when m is a multiple of that count the Hadamard
    cell tangents span them and the estimate is autograd's gradient (random inputs: no ties);
    with fewer tangents it is only an estimate."""
    torch.manual_seed(0)
    model = build_model("cnn", 10, SHAPE, channels=(4, 8)).double()
    mod = split_program(trace(model, SHAPE), modules=2)[0]
    mod.aux = aux_head(mod, mod.nodes[-1].shape, 10, grid=2, groups=heads)
    mod.activity = plan(mod.nodes, mod.aux, 16, True)
    site = mod.activity.sites[0]
    assert cell_shape(site, mod.nodes + mod.aux, support_chain(site, mod.nodes + mod.aux)) == (4, 4)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params.update({k: torch.tensor(v, dtype=torch.float64) for k, v in init_aux_weights(mod.aux, 10, 0).items()})
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.arange(16) % 10
    names = ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias"]
    out = _activity_step(TorchOps(dtype=torch.float64), mod, m, 0, x, F.one_hot(labels, 10).double(), params)
    for q, true in zip(names, _local_gradient(model, mod, x, labels, params, names), strict=True):
        if exact:
            torch.testing.assert_close(out[c.grad_output(q)], true, rtol=1e-9, atol=1e-12)
        else:
            assert float((out[c.grad_output(q)] - true).norm()) > 0.05 * float(true.norm()), q
