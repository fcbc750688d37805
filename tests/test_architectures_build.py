"""The architecture fixtures in ``tests/architectures.py`` build, trace with torch.fx and run.

For every fixture: fx tracing succeeds (``DropPath`` and ``nn.TransformerEncoderLayer`` kept as
leaves), the traced graph keeps the batch at dim 0 and bakes in no batch size (it matches the eager
model at a batch size other than the one used elsewhere), a forward at batch 4 gives finite
``(4, 10)`` logits, and two builds give identical weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from architectures import FIXTURE_NAMES, FIXTURES, DropPath, drop_path
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp


class _LeafTracer(torch.fx.Tracer):
    """Default fx tracer that also keeps ``DropPath`` and ``nn.TransformerEncoderLayer`` as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (DropPath, nn.TransformerEncoderLayer)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    factory, shape = FIXTURES[name]
    return factory(), shape


def _input(batch: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen)


def test_registry() -> None:
    assert FIXTURE_NAMES == tuple(FIXTURES)
    assert len(FIXTURE_NAMES) == 12
    for factory, shape in FIXTURES.values():
        assert callable(factory)
        assert isinstance(shape, tuple) and all(isinstance(d, int) and d > 0 for d in shape)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_forward_shape_and_finite(name: str) -> None:
    model, shape = _build(name)
    model.eval()
    with torch.no_grad():
        out = model(_input(4, shape))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_deterministic_build(name: str) -> None:
    a, _ = _build(name)
    state = torch.get_rng_state()
    b, _ = _build(name)
    # building a fixture seeds inside fork_rng, so the caller's RNG stream is untouched
    assert torch.equal(state, torch.get_rng_state())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fx_trace_matches_eager(name: str) -> None:
    model, shape = _build(name)
    model.eval()
    gm = _trace(model)
    gm.eval()
    # batch 3 (not the batch 4 used above): a baked-in batch size would break the view/reshape/expand
    x = _input(3, shape, seed=2)
    with torch.no_grad():
        expected = model(x)
        got = gm(x)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batch_stays_at_dim0(name: str) -> None:
    """Every tensor computed from the input keeps the batch size at dim 0 (checked at batch 7)."""
    model, shape = _build(name)
    model.eval()
    gm = _trace(model)
    batch = 7
    with torch.no_grad():
        ShapeProp(gm).propagate(_input(batch, shape))
    depends_on_input: set[torch.fx.Node] = set()
    checked = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            depends_on_input.add(node)
        elif node.op != "output" and any(arg in depends_on_input for arg in node.all_input_nodes):
            depends_on_input.add(node)
        else:
            continue
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape"):  # x.size() / x.shape / chunk tuples / python ints
            continue
        assert meta.shape[0] == batch, f"{node.format_node()} has shape {tuple(meta.shape)}"
        checked += 1
    assert checked > 0


def test_drop_path_is_wrapped_leaf_in_training() -> None:
    """In training mode the plain fx tracer records ``drop_path`` as one call_function node."""
    factory, shape = FIXTURES["efficientnet_b0"]
    model = factory().train()
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert drop_path in targets
    drop_probs = {m.drop_prob for m in model.modules() if isinstance(m, DropPath)}
    assert drop_probs == {0.1}
    with torch.no_grad():
        out = gm(_input(4, shape))
    assert out.shape == (4, 10)


def test_drop_path_statistics() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3, 3)
    y = drop_path(x, 0.25)
    per_sample = y.flatten(1)
    # each sample is either all zero or all 1 / keep
    assert torch.all((per_sample == 0).all(1) | torch.isclose(per_sample, torch.tensor(1 / 0.75)).all(1))
    kept = (per_sample[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03
    module = DropPath(0.25).eval()
    assert module(x) is x
