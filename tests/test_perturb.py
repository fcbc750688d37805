"""Seeded tangents: reproducible, one stream per module, right distribution, filled in place."""
import numpy as np
import pytest

from asyncfgd.runtime.perturb import MODES, fill_tangents, noise_key

SHAPES = [(3, 4, 5), (3, 7), (3, 2, 3, 3)]  # m = 3 tangents for three weight tensors


def buffers(shapes=SHAPES) -> list[np.ndarray]:
    return [np.full(s, np.nan, dtype=np.float32) for s in shapes]


def filled(mode="gaussian", seed=7, step=11, module=2, scale=1.0, shapes=SHAPES) -> list[np.ndarray]:
    out = buffers(shapes)
    fill_tangents(out, seed, step, module, mode, scale)
    return out


def test_noise_key_mapping():
    assert noise_key(5, 9, 2) == (5, (0, 0, 2, 9))
    with pytest.raises(ValueError):
        noise_key(-1, 0, 0)
    with pytest.raises(ValueError):
        noise_key(0, 1 << 64, 0)


def _box_muller_float64(seed: int, step: int, module: int, n: int) -> np.ndarray:
    """The documented mapping, written independently in float64 from a freshly built Philox."""
    p = (n + 1) // 2
    bg = np.random.Philox(key=seed, counter=np.array([0, 0, module, step], np.uint64))
    w = bg.random_raw(p).view(np.uint32).astype(np.float64)
    u = (np.floor(w / 256) + 0.5) / 2**24
    r, theta = np.sqrt(-2 * np.log(u[:p])), 2 * np.pi * u[p:]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]


@pytest.mark.parametrize("shapes", [SHAPES, [(1, 5), (1, 1), (1, 3, 3), (1, 4)], [(1, 5), (1, 2)]])  # odd, even
def test_gaussian_is_box_muller_of_the_modules_philox_stream(shapes):
    """The module's buffers, concatenated, are Box-Muller of Philox(key=seed, counter [0, 0, module, step])."""
    out = filled(seed=7, step=11, module=2, shapes=shapes)
    flat = np.concatenate([b.ravel() for b in out])
    np.testing.assert_allclose(flat, _box_muller_float64(7, 11, 2, flat.size), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("mode", MODES)
def test_one_buffer_and_separate_buffers_get_the_same_values(mode):
    """Views of one buffer are filled in place, separate arrays through a temporary: same values."""
    from asyncfgd.runtime.buffers import contiguous_span, flat_views

    views = flat_views(SHAPES)
    assert contiguous_span(views) is not None and contiguous_span(buffers()) is None
    fill_tangents(views, 7, 11, 2, mode, 0.5)
    for a, b in zip(views, filled(mode, scale=0.5), strict=False):
        assert np.array_equal(a, b)


def test_concurrent_fills_match_sequential():
    """Each thread re-keys its own generator: modules filling at once do not disturb each other."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [dict(seed=s, step=t, module=k, shapes=[(2, 5000), (2, 301)])
            for s in (1, 2) for t in range(4) for k in range(2)]
    expected = [filled(**j) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: filled(**j), jobs * 3))
    for e, g in zip(expected * 3, got, strict=False):
        for a, b in zip(e, g, strict=False):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_regardless_of_history(mode):
    a = filled(mode)
    np.random.seed(123)
    np.random.standard_normal(1000)  # global RNG use must not matter
    filled("gaussian", seed=99)  # nor an unrelated draw
    b = filled(mode)
    for x, y in zip(a, b, strict=False):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("change", [dict(seed=8), dict(step=12), dict(module=3)])
def test_different_tuple_gives_different_noise(change):
    base = filled()
    other = filled(**change)
    for x, y in zip(base, other, strict=False):
        assert not np.allclose(x, y)


def test_tensors_of_one_module_differ():
    a, b = filled(shapes=[(3, 10_000), (3, 10_000)])
    assert np.abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.05  # std 1/sqrt(3e4)


def test_gaussian_moments():
    (u,) = filled(shapes=[(4, 250_000)])
    assert abs(u.mean()) < 0.005  # std of the mean: 1 / sqrt(1e6) = 0.001
    assert abs(u.var() - 1.0) < 0.01
    assert abs((u**4).mean() - 3.0) < 0.05  # normal kurtosis


def test_rademacher_values_and_balance():
    (u,) = filled("rademacher", shapes=[(4, 250_000)])
    assert set(np.unique(u)) == {-1.0, 1.0}
    assert abs(u.mean()) < 0.005


def test_scale_applied():
    for mode in MODES:
        base = filled(mode)
        scaled = filled(mode, scale=0.25)
        for x, y in zip(base, scaled, strict=False):
            np.testing.assert_allclose(y, 0.25 * x, rtol=1e-6, atol=1e-7)
    for buf in filled("orthogonal", scale=0.0):
        assert np.all(buf == 0.0)


def test_orthogonal_directions_are_orthogonal_over_the_module():
    out = filled("orthogonal")
    m = SHAPES[0][0]
    rows = np.concatenate([b.reshape(m, -1) for b in out], axis=1).astype(np.float64)
    dim = rows.shape[1]
    gram = rows @ rows.T
    np.testing.assert_allclose(np.diag(gram), dim, rtol=1e-5)
    off = gram[~np.eye(m, dtype=bool)]
    assert np.abs(off).max() < 1e-5 * dim
    # per-tensor blocks alone are not orthogonal: the constraint is joint
    first = out[0].reshape(m, -1).astype(np.float64)
    assert np.abs((first @ first.T)[~np.eye(m, dtype=bool)]).max() > 1e-3


def test_orthogonal_square_and_too_many_directions():
    out = filled("orthogonal", shapes=[(6, 2), (6, 4)])  # m = D = 6: a scaled orthogonal matrix
    q = np.concatenate(out, axis=1).astype(np.float64)
    np.testing.assert_allclose(q @ q.T, 6 * np.eye(6), atol=1e-4)
    with pytest.raises(ValueError, match="m <= D"):
        filled("orthogonal", shapes=[(7, 2), (7, 4)])


def test_orthogonal_first_direction_is_normalised_gaussian():
    """Gram-Schmidt order: direction 0 is the gaussian draw rescaled to norm sqrt(D)."""
    g = filled("gaussian")
    o = filled("orthogonal")
    d0 = np.concatenate([b[0].ravel() for b in g]).astype(np.float64)
    o0 = np.concatenate([b[0].ravel() for b in o])
    np.testing.assert_allclose(o0, d0 * np.sqrt(d0.size) / np.linalg.norm(d0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_fills_in_place(mode):
    out = buffers()
    ids = [id(b) for b in out]
    ptrs = [b.ctypes.data for b in out]
    fill_tangents(out, 1, 2, 3, mode, 0.5)
    assert [id(b) for b in out] == ids
    assert [b.ctypes.data for b in out] == ptrs
    assert all(np.isfinite(b).all() for b in out)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown tangent mode"):
        fill_tangents(buffers(), 0, 0, 0, "uniform")
    with pytest.raises(ValueError, match="float32"):
        fill_tangents([np.zeros((2, 3))], 0, 0, 0)
    with pytest.raises(ValueError, match="leading dimension"):
        fill_tangents([np.zeros((2, 3), np.float32), np.zeros((3, 3), np.float32)], 0, 0, 0)



def test_module_without_weights_is_a_no_op():
    """A lone pooling/activation module has nothing to perturb, and filling it leaves every other
    module's stream as it was (each module draws from its own counter)."""
    alone = buffers()
    fill_tangents(alone, 7, 3, 1)
    assert fill_tangents([], 7, 3, 0) is None
    after = buffers()
    fill_tangents(after, 7, 3, 1)
    for a, b in zip(alone, after, strict=True):
        assert np.array_equal(a, b) and np.any(a != 0)
