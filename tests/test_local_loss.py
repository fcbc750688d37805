"""Local-loss mode: a module's d from its auxiliary head equals torch.func.jvp of that local loss."""
from __future__ import annotations

import numpy as np
import torch

from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.exporter.reference_modules import segment_fn, set_bn_training
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.dual.program import module_specs
from asyncfgd.runtime.engine import load_runners


def test_local_loss_derivative_matches_jvp(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8))
    export_model(model, tmp_path, (1, 8, 8), 10, modules=2, local_heads=True, model_spec=model_spec(model))
    art = load_artifacts(tmp_path)
    spec = module_specs(art.manifest)[0]
    runner = load_runners(art, "onnxruntime", threads=1)[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    for u in runner.tangents.values():
        u[...] = rng.standard_normal(u.shape)
    out = runner.run("local", x, labels=np.eye(10, dtype=np.float32)[labels])

    # float64 oracle: the model's own layers + an nn.Linear head, torch.func.jvp
    model.double()
    set_bn_training(model, True)
    head = torch.nn.Linear(*art.weights["aux0.fc.weight"].shape[::-1]).double()
    names = list(runner.params)
    w = {n: torch.from_numpy(art.weights[n]).double() for n in names}
    u = {n: torch.from_numpy(runner.tangents[n][0]).double() for n in names}
    seg = segment_fn(model, spec)
    y_int = torch.from_numpy(labels)

    def local_loss(*ws):
        p = dict(zip(names, ws, strict=False))
        h = seg(torch.from_numpy(x).double(), p, None).mean(dim=(2, 3))
        z = torch.func.functional_call(head, {"weight": p["aux0.fc.weight"], "bias": p["aux0.fc.bias"]}, (h,))
        return torch.nn.functional.cross_entropy(z, y_int)

    loss, dloss = torch.func.jvp(local_loss, tuple(w.values()), tuple(u.values()))
    params = [t.clone().requires_grad_() for t in w.values()]
    g = torch.autograd.grad(local_loss(*params), params)
    scale = sum(float((gi * ui).abs().sum()) for gi, ui in zip(g, u.values(), strict=False))
    assert abs(float(out.loss) - float(loss)) <= 1e-5 * abs(float(loss))
    assert abs(float(out.loss_dot[0]) - float(dloss)) <= 1e-4 * scale
    assert abs(float(dloss) - sum(float((gi * ui).sum())
                                  for gi, ui in zip(g, u.values(), strict=False))) <= 1e-9 * scale
