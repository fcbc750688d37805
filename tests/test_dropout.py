"""Dropout as real dropout (issue 15): masks from the seeded counter-based stream, fed to the graphs,
the same for the primal and every tangent, for every backend, the reference and the bp baseline."""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import metrics
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.reference_modules import jvp_module
from asyncfgd.exporter.trace import trace
from asyncfgd.runtime import contract as c
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.dual.interpreter import run_program
from asyncfgd.runtime.dual.program import ModuleSpec
from asyncfgd.runtime.dual.rules import RuleContext
from asyncfgd.runtime.dual.torch_ops import TorchOps
from asyncfgd.runtime.masks import DropoutSite, draw_masks, dropout_sites


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))


def test_masks_are_keyed_by_sample_and_keep_one_minus_p():
    sites = [DropoutSite("a", 0, 0.5, False, (40, 3)), DropoutSite("b", 1, 0.25, True, (40, 3))]
    full = draw_masks(sites, seed=7, step=3, module=1, n=64)
    part = draw_masks(sites, seed=7, step=3, module=1, n=16, sample_offset=10)  # a data-parallel worker's rows
    for k in full:
        np.testing.assert_array_equal(full[k][10:26], part[k])
    assert full["a"].shape == (64, 40, 3) and full["b"].shape == (64, 1, 1)
    assert set(np.unique(full["a"])) == {0.0, 2.0} and set(np.unique(full["b"])) <= {0.0, np.float32(4 / 3)}
    assert abs((full["a"] == 0).mean() - 0.5) < 0.03
    for other in ({"seed": 8, "step": 3, "module": 1}, {"seed": 7, "step": 4, "module": 1},
                  {"seed": 7, "step": 3, "module": 0}):
        assert not np.array_equal(draw_masks(sites, n=64, **other)["a"], full["a"])
    assert not np.array_equal(full["a"][:32], full["a"][32:])  # samples differ


def test_dropout_rule_applies_one_mask_to_primal_and_every_tangent():
    model = dropout_mlp().double()
    nodes = trace(model, (1, 8, 8))
    (site,) = dropout_sites(nodes)
    mask = torch.from_numpy(draw_masks([site], 1, 0, 0, 5)[site.name]).double()
    params = {q: v.clone() for q, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=gen)
    u = {q: torch.randn(3, *p.shape, dtype=torch.float64, generator=gen) for q, p in params.items()}
    y, yd, _ = run_program(TorchOps(torch.float64), nodes, "input", x, None, params, u, {},
                           RuleContext(3, True, False), {site.name: mask})
    for j in range(3):
        y_ref, yd_ref = jvp_module(model, ModuleSpec(0, nodes, "input"), x, None, params,
                                   {q: t[j] for q, t in u.items()}, {}, {site.name: mask})
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(yd[j], yd_ref, rtol=1e-12, atol=1e-12)
    y_off, _, _ = run_program(TorchOps(torch.float64), nodes, "input", x, None, params, u, {},
                              RuleContext(3, True, False))
    assert not torch.allclose(y, y_off)  # the mask matters


def test_training_graphs_take_masks_and_eval_does_not(tmp_path):
    manifest = export_model(dropout_mlp(), tmp_path, (1, 8, 8), 10, modules=2, bn_mode="frozen")
    assert manifest["format_version"] == c.FORMAT_VERSION == 2
    arts = load_artifacts(tmp_path)
    (holder,) = [info for info in arts.modules if info.dropout]
    name = c.mask_input(holder.dropout[0].name)
    for role, graph in holder.graphs.items():
        assert (name in graph["inputs"]) == (role in c.MASK_ROLES), role


def test_format_1_artifacts_still_load(tmp_path):
    """Artifacts of format 1 (no dropout inputs) load and train; their manifests say version 1."""
    export_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path, (1, 8, 8), 10, modules=1)
    path = tmp_path / c.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1
    for mod in manifest["modules"]:
        mod.pop("dropout")
    path.write_text(json.dumps(manifest))
    arts = load_artifacts(tmp_path)
    assert arts.manifest["format_version"] == 1 and not arts.modules[0].dropout
    result = CliRunner().invoke(app, ["train", "--artifacts", str(tmp_path), "--epochs", "1", "--run-dir",
                                      str(tmp_path / "run")], env={"TQDM_DISABLE": "1"})
    assert result.exit_code == 0, result.output


def test_p_half_dropout_model_trains_on_digits(tmp_path):
    export_model(dropout_mlp(), tmp_path / "art", (1, 8, 8), 10, modules=2, bn_mode="frozen", tangents=8)
    result = CliRunner().invoke(app, ["train", "--artifacts", str(tmp_path / "art"), "--epochs", "12",
                                      "--run-dir", str(tmp_path / "run"), "--seed", "1"], env={"TQDM_DISABLE": "1"})
    assert result.exit_code == 0, result.output
    rows = metrics.read_csv(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["test_acc"] > 0.75 and rows[-1]["test_loss"] < rows[0]["test_loss"], rows


MODEL_FILE = """
import torch
from torch import nn


def make(num_classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, num_classes))
"""


def test_bp_baseline_draws_the_runtimes_masks(tmp_path):
    """The backprop baseline's training forward at step s equals the runtime's forward graphs fed
    the masks FGD draws at step s: both methods see the same dropout."""
    from asyncfgd.app.training.bp import BpLearner
    from asyncfgd.app.training.config import TrainConfig
    from asyncfgd.exporter.model_sources import build_any
    from asyncfgd.exporter.models import model_spec
    from asyncfgd.runtime.engine import load_runners

    (tmp_path / "net.py").write_text(MODEL_FILE)
    model = build_any(f"{tmp_path}/net.py:make", 10, (1, 8, 8))
    export_model(model, tmp_path / "art", (1, 8, 8), 10, modules=2, bn_mode="frozen", model_spec=model_spec(model))
    arts = load_artifacts(tmp_path / "art")
    bp = BpLearner(arts, TrainConfig(seed=5), steps_per_epoch=10)
    runners = load_runners(arts, "onnxruntime", threads=1)
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[np.arange(6)]
    for step in (0, 3):
        bp.step = step
        bp._mode(True)
        with torch.no_grad():
            want = bp._forward(torch.from_numpy(x)).numpy()
        h = x
        for r in runners:
            res = r.run(c.FORWARD, h, labels=labels if r.is_last else None,
                        masks=draw_masks(r.dropout, 5, step, r.index, len(x)))
            h = res.y if res.y is not None else res.logits
        np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, bp.evaluate(x), atol=1e-3)  # evaluation has no dropout
