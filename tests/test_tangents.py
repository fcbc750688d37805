"""Batched tangents: m tangents in one dual pass equal m separate single-tangent passes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.runtime.artifacts import load_artifacts
from asyncfgd.runtime.engine import load_runners
from asyncfgd.runtime.perturb import fill_tangents


@pytest.mark.parametrize("name,shape,bn", [("cnn", (1, 8, 8), "train"), ("cnn", (1, 8, 8), "frozen"),
                                           ("mlp", (1, 8, 8), "train")])
def test_batched_tangents_equal_separate_passes(tmp_path, name, shape, bn):
    m = 4
    torch.manual_seed(0)
    model = build_model(name, 10, shape)
    runs = {}
    for count in (1, m):
        out = tmp_path / f"m{count}"
        export_model(model, out, shape, 10, modules=2, bn_mode=bn, tangents=count, model_spec=model_spec(model))
        runs[count] = load_runners(load_artifacts(out), "onnxruntime", threads=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, *shape)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]

    def chain(runners):
        h = runners[0].run("dual_first", x)
        return h.y_dot.copy(), runners[1].run("dual", h.y, h.y_dot, labels).loss_dot.copy()

    for k, r in enumerate(runs[m]):
        fill_tangents(r.tangent_host(), 5, 0, k, "gaussian")
    batched_h, batched_d = chain(runs[m])
    for j in range(m):
        for k, r in enumerate(runs[1]):
            for name_, u in r.tangents.items():
                u[0] = runs[m][k].tangents[name_][j]
        single_h, single_d = chain(runs[1])
        np.testing.assert_allclose(batched_h[j], single_h[0], rtol=1e-5, atol=1e-5 * np.abs(single_h).max())
        np.testing.assert_allclose(batched_d[j], single_d[0], rtol=1e-4, atol=1e-6)
    assert not np.allclose(batched_d[0], batched_d[1])  # the m directions really differ
