"""Automatic split: the DP finds the best cuts under the step-cost model, checked by brute force."""
from __future__ import annotations

import itertools

import pytest
import torch

from asyncfgd.exporter.models import build_model
from asyncfgd.exporter.split import SplitError, StepCost, cut_points, split_program
from asyncfgd.exporter.trace import trace


def _program(name: str, shape: tuple[int, ...], **cfg):
    torch.manual_seed(0)
    return trace(build_model(name, 10, shape, **cfg), shape)


def _module_costs(cost: StepCost, modules) -> list[float]:
    return [cost.combine(sum(cost.per_sample(n) for n in m.nodes), sum(n.weights for n in m.nodes),
                         last=m.index == len(modules) - 1) for m in modules]


@pytest.mark.parametrize("batch", [1, 8, 64, 4096])
@pytest.mark.parametrize("k", [2, 3])
def test_split_is_the_brute_force_optimum(k, batch):
    program = _program("resnet18", (3, 16, 16), width=8)
    cost = StepCost(batch)
    got = max(_module_costs(cost, split_program(program, modules=k, cost=cost)))
    best = min(max(_module_costs(cost, split_program(program, at=[program[i].name for i in starts])))
               for starts in itertools.combinations(cut_points(program), k - 1))
    assert got == pytest.approx(best, rel=1e-12)


def test_small_batches_move_the_cut_towards_the_weight_heavy_end():
    """ResNet-18's layer4 holds most weights: per-weight work (draws, update) does not shrink with
    the batch, so at batch 8 the last module must give up layers it keeps at batch 64."""
    program = _program("resnet18", (3, 32, 32))
    names = [n.name for n in program]
    start = {b: names.index(split_program(program, modules=2, cost=StepCost(b))[1].nodes[0].name) for b in (8, 64)}
    assert start[8] > start[64]
    modules = split_program(program, modules=2, cost=StepCost(8))
    costs = _module_costs(StepCost(8), modules)
    assert max(costs) / min(costs) < 1.2  # balanced under the model
    weights = [sum(n.weights for n in m.nodes) for m in modules]
    flops = [sum(n.flops for n in m.nodes) for m in modules]
    assert weights[1] > 5 * weights[0] and flops[0] > flops[1]  # ... by trading FLOPs against weights


def test_every_module_holds_weights_when_the_model_allows():
    """On a tiny MLP per-weight work dominates; a weightless module (just the Flatten) would
    'balance' best but pipeline nothing."""
    program = _program("mlp", (1, 8, 8))
    for batch in (1, 64):
        modules = split_program(program, modules=2, cost=StepCost(batch))
        assert all(sum(n.weights for n in m.nodes) > 0 for m in modules)


def test_step_cost_rejects_nonsense():
    with pytest.raises(SplitError, match="batch >= 1"):
        StepCost(0)
