"""In-place optimizers vs torch.optim (foreach=False), on numpy and torch buffers."""
import tracemalloc

import numpy as np
import pytest
import torch

from asyncfgd.runtime.optim import OPTIMIZERS, SGD, Adam, make_optimizer, to_host

SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.weight": (37, 19), "fc.bias": (19,)}
BACKENDS = {"numpy": np, "torch": torch}

# our name + kwargs, and the torch.optim reference with the same hyper-parameters
CASES = {
    "sgd": (dict(lr=0.05, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.01, foreach=False)),
    "momentum": (dict(lr=0.05, weight_decay=0.01),
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)),
    "adam": (dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
             lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.01, foreach=False)),
}


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


INIT = arrays(0)
GRADS = [arrays(100 + i) for i in range(20)]


def on(xp, host: dict[str, np.ndarray]) -> dict:
    """Fresh copies of host arrays as buffers of backend xp."""
    return {k: (v.copy() if xp is np else torch.tensor(v)) for k, v in host.items()}


def host(bufs: dict) -> dict[str, np.ndarray]:
    return {k: to_host(v) for k, v in bufs.items()}


def torch_reference(make, grads=GRADS, clip=None) -> dict[str, np.ndarray]:
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in INIT.items()}
    opt = make(list(params.values()))
    for g in grads:
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        opt.step()
    return {k: p.detach().numpy() for k, p in params.items()}


def run(name: str, xp, kw: dict, grads=GRADS) -> dict[str, np.ndarray]:
    params = on(xp, INIT)
    opt = make_optimizer(name, params, xp, **kw)
    for g in grads:
        opt.step(on(xp, g))
    return host(params)


def max_rel_err(got: dict, ref: dict) -> float:
    """Largest |got - ref| relative to the tensor's largest |ref| (elementwise rel. blows up near 0)."""
    return max(float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_matches_torch_optim(name, backend):
    kw, make = CASES[name]
    ref = torch_reference(make)
    got = run(name, BACKENDS[backend], kw)
    assert max_rel_err(got, ref) <= 1e-6
    assert max_rel_err(got, INIT) > 1e-2  # the weights really moved


def test_not_bit_identical_because_torch_fuses_fma():
    """torch's ``add(alpha=)`` is one FMA; multiply-then-subtract rounds twice (documented)."""
    p, g = INIT["fc.weight"], GRADS[0]["fc.weight"]
    lr = np.float32(0.05)
    fused = (p.astype(np.float64) - g.astype(np.float64) * np.float64(lr)).astype(np.float32)
    torch_result = torch.tensor(p).add(torch.tensor(g), alpha=-0.05).numpy()
    assert np.array_equal(torch_result, fused)
    params = {"fc.weight": p.copy()}
    SGD(params, np, lr=0.05).step({"fc.weight": g.copy()})
    np.testing.assert_array_equal(params["fc.weight"], p - g * lr)
    assert not np.array_equal(params["fc.weight"], torch_result)


def test_sgd_first_steps_by_hand():
    """Momentum buffer starts at the first (decayed) gradient: b1 = g1 + wd*w0, b2 = 0.9*b1 + g2'."""
    w0, g1, g2 = np.float32([1.0, -2.0]), np.float32([0.5, 0.25]), np.float32([-1.0, 2.0])
    params = {"w": w0.copy()}
    opt = SGD(params, np, lr=0.1, momentum=0.9, weight_decay=0.5)
    opt.step({"w": g1.copy()})
    b1 = g1 + 0.5 * w0  # [1.0, -0.75]
    w1 = w0 - 0.1 * b1
    np.testing.assert_allclose(params["w"], [0.9, -1.925], rtol=1e-6)
    opt.step({"w": g2.copy()})
    b2 = 0.9 * b1 + (g2 + 0.5 * w1)
    np.testing.assert_allclose(params["w"], w1 - 0.1 * b2, rtol=1e-6)


def test_adam_first_step_is_lr_times_sign():
    """After one step m_hat / sqrt(v_hat) = g / |g|, so every weight moves by lr (up to eps)."""
    params = {"w": np.float32([1.0, 1.0, 1.0])}
    Adam(params, np, lr=0.01).step({"w": np.float32([3.0, -0.2, 1e-3])})
    np.testing.assert_allclose(params["w"], [0.99, 1.01, 0.99], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_norm_matches_torch(backend):
    big = [{k: 50 * v for k, v in g.items()} for g in GRADS[:5]]
    def make(p):
        return torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False)

    ref = torch_reference(make, big, clip=1.0)
    got = run("momentum", BACKENDS[backend], dict(lr=0.05, clip_norm=1.0), big)
    assert max_rel_err(got, ref) <= 1e-6
    unclipped = run("momentum", BACKENDS[backend], dict(lr=0.05), big)
    assert max_rel_err(unclipped, ref) > 0.1


def test_clip_norm_scales_the_module_gradient_jointly():
    params = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    opt = SGD(params, np, lr=1.0, clip_norm=1.0)
    opt.step({"a": np.float32([3.0, 0.0]), "b": np.float32([4.0])})  # norm 5 -> scaled by 1/5
    np.testing.assert_allclose(params["a"], [-0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(params["b"], [-0.8], rtol=1e-5)
    opt.step({"a": np.float32([0.3, 0.0]), "b": np.float32([0.4])})  # norm 0.5: untouched
    np.testing.assert_allclose(params["a"], [-0.9, 0.0], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_updates_in_place(name, backend):
    xp = BACKENDS[backend]
    params = on(xp, INIT)
    before = {k: (id(v), v.ctypes.data if xp is np else v.data_ptr()) for k, v in params.items()}
    opt = make_optimizer(name, params, xp, lr=0.1)
    for g in GRADS[:3]:
        opt.step(on(xp, g))
    after = {k: (id(v), v.ctypes.data if xp is np else v.data_ptr()) for k, v in params.items()}
    assert after == before
    assert not np.array_equal(host(params)["fc.weight"], INIT["fc.weight"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_allocates_nothing_param_sized(name):
    params = {"w": np.ones((512, 512), np.float32)}  # 1 MiB
    opt = make_optimizer(name, params, np, lr=0.1, weight_decay=0.01, clip_norm=1.0)
    grads = {"w": np.full((512, 512), 0.5, np.float32)}
    opt.step(grads)
    tracemalloc.start()
    opt.step(grads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name, backend):
    xp = BACKENDS[backend]
    kw = dict(lr=0.01, weight_decay=0.01)
    straight = run(name, xp, kw)

    params = on(xp, INIT)
    first = make_optimizer(name, params, xp, **kw)
    for g in GRADS[:10]:
        first.step(on(xp, g))
    state = first.state_dict()
    assert state["steps"] == 10
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if k != "steps")

    resumed_params = on(xp, host(params))
    second = make_optimizer(name, resumed_params, xp, **kw)
    buffers = {k: id(b) for k, b in second._state.get("exp_avg", second._state.get("momentum", {})).items()}
    second.load_state_dict(state)
    assert {k: id(b) for k, b in second._state.get("exp_avg", second._state.get("momentum", {})).items()} == buffers
    for g in GRADS[10:]:
        second.step(on(xp, g))
    got = host(resumed_params)
    for k in straight:
        np.testing.assert_array_equal(got[k], straight[k])


def test_state_dict_is_a_copy():
    params = on(np, INIT)
    opt = make_optimizer("adam", params, np, lr=0.1)
    opt.step(on(np, GRADS[0]))
    state = opt.state_dict()
    snapshot = state["exp_avg.fc.bias"].copy()
    opt.step(on(np, GRADS[1]))
    np.testing.assert_array_equal(state["exp_avg.fc.bias"], snapshot)


def test_lr_override_and_errors():
    a, b = on(np, INIT), on(np, INIT)
    make_optimizer("sgd", a, np, lr=0.1).step(on(np, GRADS[0]), lr=0.02)
    make_optimizer("sgd", b, np, lr=0.02).step(on(np, GRADS[0]))
    np.testing.assert_array_equal(a["fc.weight"], b["fc.weight"])
    with pytest.raises(ValueError, match="sgd.*momentum.*adam"):
        make_optimizer("rmsprop", a, np, lr=0.1)
    with pytest.raises(ValueError):
        SGD(a, np, lr=-1.0)
    with pytest.raises(ValueError):
        Adam(a, np, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        SGD(a, np, lr=0.1, clip_norm=0.0)
    with pytest.raises(ValueError, match="do not match"):
        make_optimizer("sgd", a, np, lr=0.1).step({"fc.weight": GRADS[0]["fc.weight"]})
    opt = make_optimizer("momentum", a, np, lr=0.1)
    with pytest.raises(ValueError, match="do not match"):
        opt.load_state_dict({"steps": 1})


def test_normalize_makes_sgd_steps_independent_of_the_noise_scale():
    """g divided by its running RMS: scaling every estimate by 1000 leaves the updates unchanged."""
    rng = np.random.default_rng(0)
    grads = [{"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
             for _ in range(6)]
    runs = []
    for scale in (1.0, 1000.0):
        params = {"a": np.ones((3, 4), np.float32), "b": np.zeros(5, np.float32)}
        opt = make_optimizer("sgd", params, np, lr=0.1, normalize=0.9)
        for g in grads:
            opt.step({k: v * np.float32(scale) for k, v in g.items()})
        runs.append((params, opt.state_dict()))
    for k in runs[0][0]:
        np.testing.assert_allclose(runs[0][0][k], runs[1][0][k], rtol=1e-5)
    # first step: the bias-corrected mean square is exactly mean(g²), so g / RMS has unit RMS
    params = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    opt = make_optimizer("sgd", params, np, lr=1.0, normalize=0.9)
    opt.step({k: v.copy() for k, v in grads[0].items()})
    step = np.concatenate([params["a"].ravel(), params["b"].ravel()])
    assert abs(float(np.sqrt(np.mean(step ** 2))) - 1.0) < 1e-5
    # the running statistic is checkpointed with the optimizer
    state = runs[1][1]
    assert "noise.mean_square" in state
    fresh = make_optimizer("sgd", {"a": np.ones((3, 4), np.float32), "b": np.zeros(5, np.float32)}, np, lr=0.1,
                           normalize=0.9)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["noise.mean_square"] == state["noise.mean_square"]


def test_normalize_rejects_bad_decay():
    with pytest.raises(ValueError, match="normalize"):
        make_optimizer("adam", {"a": np.zeros(2, np.float32)}, np, lr=0.1, normalize=1.0)


def _flat_copy(host_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from asyncfgd.runtime.buffers import flat_views

    views = dict(zip(host_arrays, flat_views([a.shape for a in host_arrays.values()]), strict=False))
    for k, v in views.items():
        v[...] = host_arrays[k]
    return views


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("extra", [{}, {"clip_norm": 0.5}, {"normalize": 0.9}])
def test_module_wide_buffers_update_in_one_group_with_the_same_results(name, extra):
    """Weights and gradients in one buffer each (as the ONNX Runtime backend keeps them): one group
    over the whole module, bit-identical to the per-tensor updates of separate arrays."""
    kw = {k: v for k, v in CASES[name][0].items() if k in ("lr", "weight_decay")} | extra
    sep, flat = on(np, INIT), _flat_copy(INIT)
    opt_sep, opt_flat = make_optimizer(name, sep, np, **kw), make_optimizer(name, flat, np, **kw)
    for g in GRADS:
        g_flat = _flat_copy(g)
        assert len(opt_flat._groups(g_flat)) == 1 and len(opt_sep._groups(on(np, g))) == len(SHAPES)
        opt_sep.step(on(np, g))
        opt_flat.step(g_flat)
    for k in SHAPES:
        assert np.array_equal(sep[k], flat[k])
    assert opt_flat.state_dict().keys() == opt_sep.state_dict().keys()
    # gradients that are not one buffer (e.g. the first of m tangents per weight) go tensor by tensor
    assert len(opt_flat._groups(on(np, GRADS[0]))) == len(SHAPES)


def test_contiguous_span_only_covers_consecutive_views_in_order():
    from asyncfgd.runtime.buffers import contiguous_span, flat_views

    a, b, c = flat_views([(2, 3), (4,), (5, 1)])
    span = contiguous_span([a, b, c])
    assert span is not None and span.shape == (15,) and np.shares_memory(span, a)
    assert contiguous_span([a, b]).shape == (10,) and contiguous_span([b, c]).shape == (9,)
    assert contiguous_span([a, c]) is None  # a gap
    assert contiguous_span([b, a]) is None  # out of order
    assert contiguous_span([a, np.zeros(4, np.float32)]) is None  # another buffer
    assert contiguous_span([torch.zeros(3)]) is None and contiguous_span([]) is None
