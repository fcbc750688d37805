"""bench-distributed's counters and link model: two gloo ranks on 127.0.0.1 (bounded, killed on exit)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from asyncfgd.app.bench.distributed import LinkModel, boundary_bytes, format_table, run_group
from asyncfgd.exporter.export import export_model
from asyncfgd.exporter.models import build_model, model_spec
from asyncfgd.runtime.artifacts import load_artifacts, param_numel

M, BATCH = 2, 16


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8), hidden=(24,))  # ddp-bp rebuilds it from the manifest's spec
    root = tmp_path_factory.mktemp("bench")
    for k in (1, 2):
        export_model(model, root / f"k{k}", (1, 8, 8), 10, modules=k, tangents=M, model_spec=model_spec(model))
    return root / "k1", root / "k2"


def test_ranks_hand_the_collective_m_plus_3_numbers_and_ddp_the_gradient(arts: tuple[Path, Path]) -> None:
    whole, split = arts
    weights = param_numel(load_artifacts(whole).modules[0].raw)
    fgd = run_group("fgd-data", whole, 2, BATCH, steps=3, warmup=1, threads=1, timeout_s=120)
    ddp = run_group("ddp-bp", whole, 2, BATCH, steps=3, warmup=1, threads=1, timeout_s=120)
    pipe = run_group("pipeline", split, 2, BATCH, steps=3, warmup=2, threads=1, timeout_s=120)
    assert fgd["sent_per_step"] == [8.0 * (M + 3)] * 2 and fgd["messages_per_step"] == [1.0, 1.0]
    assert ddp["sent_per_step"] == [4.0 * weights] * 2  # every gradient float, once per step
    # rank 0 sends y and its m tangents across the one boundary: (1 + m)·N·|boundary|·4 bytes
    assert pipe["sent_per_step"][0] == boundary_bytes(split, BATCH)[0] == (1 + M) * BATCH * 24 * 4
    assert pipe["sent_per_step"][1] == 0.0
    if fgd["wire_per_step"] is not None:  # Linux: the loopback carried at least what was handed over
        assert ddp["wire_per_step"] >= 2 * 4 * weights > fgd["wire_per_step"] > 0
    table = format_table([fgd, ddp, pipe], LinkModel(100e6, 2e-3), boundary_bytes(split, BATCH), weights)
    assert "fgd-data" in table and "pipeline" in table


def test_link_model_prices_bytes_and_latency() -> None:
    link = LinkModel(bits_per_s=100e6, latency_s=2e-3)
    # 2 ranks: one all_reduce = 2 latency-bound rounds; 12.5 MB at 100 Mbit/s = 1 s
    assert math.isclose(link.data_parallel(0.5, 12.5e6, world=2), 0.5 + 1.0 + 2 * 2e-3)
    assert math.isclose(link.data_parallel(0.5, 0.0, world=4, buckets=3), 0.5 + 6 * 3 * 2e-3)
    # the pipeline overlaps the transfer with compute: the slower of the two, plus two hops
    assert math.isclose(link.pipeline(0.5, 12.5e6), 1.0 + 4e-3)
    assert math.isclose(link.pipeline(2.0, 12.5e6), 2.0 + 4e-3)
