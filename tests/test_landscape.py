"""Loss-surface slices: exact against independent single-point evaluations (float64), the
centre on the grid, filter normalization, invariance, files, and bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import famviz as fv
from famviz import landscape as ls
from famviz.reparam import scale_layers

from helpers import assert_same_state, model_state, tiny_mlp


@pytest.fixture(scope="module")
def setup():
    (X, y), (Xt, yt) = fv.data.digits(test_size=0.25, seed=0)
    data = (X[:150].double(), y[:150] % 5)
    test = (Xt[:60].double(), yt[:60] % 5)
    model = tiny_mlp([64, 12, 8, 5], seed=0)
    return model, data, test


def point_loss(model, data, coords, dirs):
    """Independent reference: functional_call at theta + sum c_i d_i, plain F.cross_entropy."""
    X, y = data
    params = {n: p.detach() + sum(c * d[n] for c, d in zip(coords, dirs))
              for n, p in model.named_parameters()}
    out = functional_call(model, params, (X,))
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


class Custom(nn.Module):  # not Sequential: the generic vmap engine
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 7), nn.Linear(7, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kind", ["sequential", "custom", "cnn", "batched-data"])
def test_grid_equals_single_point_evaluation(setup, kind):
    model, data, test = setup
    if kind == "custom":
        model = Custom().double()
    elif kind == "cnn":
        model = fv.models.cnn(channels=(2, 2), hidden=6, num_classes=5, seed=1).double()
    d1, d2 = ls.random_direction(model, seed=1), ls.random_direction(model, seed=2)
    train = data
    if kind == "batched-data":
        X, y = data
        train = [(X[i : i + 40], y[i : i + 40]) for i in range(0, len(X), 40)]
    s = ls.slice_2d(model, train, d1, d2, span=((-1, 1), (-0.5, 1.5)), steps=(7, 5),
                    test_data=test)
    assert s.values.shape == (7, 5) and s.accuracy.shape == (7, 5)
    assert s.meta["engine"] == {"sequential": "linear-stack", "batched-data": "linear-stack",
                                "custom": "vmap", "cnn": "vmap"}[kind]
    gen = np.random.default_rng(0)
    for i, j in [(0, 0), (6, 4), (2, 3), (5, 1), *zip(gen.integers(0, 7, 4), gen.integers(0, 5, 4))]:
        loss, acc = point_loss(model, data, (s.x[i], s.y[j]), (d1, d2))
        assert s.values[i, j] == pytest.approx(loss, rel=1e-6, abs=1e-9)
        assert s.accuracy[i, j] == pytest.approx(acc, abs=1e-12)
        tloss, tacc = point_loss(model, test, (s.x[i], s.y[j]), (d1, d2))
        assert s.test_values[i, j] == pytest.approx(tloss, rel=1e-6)
        assert s.test_accuracy[i, j] == pytest.approx(tacc, abs=1e-12)


def test_mse_grid_equals_single_point_evaluation(setup):
    model, (X, _), _ = setup
    Y = torch.randn(len(X), 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d1, d2 = ls.random_direction(model, seed=1), ls.random_direction(model, seed=2)
    s = ls.slice_2d(model, (X, Y), d1, d2, steps=(5, 3), loss="mse")
    assert s.accuracy is None and s.meta["engine"] == "linear-stack"
    for i, j in [(0, 0), (4, 2), (1, 1)]:
        params = {n: p.detach() + s.x[i] * d1[n] + s.y[j] * d2[n]
                  for n, p in model.named_parameters()}
        ref = float(F.mse_loss(functional_call(model, params, (X,)), Y))
        assert s.values[i, j] == pytest.approx(ref, rel=1e-10)


def test_centre_is_the_unperturbed_loss_and_model_untouched(setup):
    model, data, _ = setup
    before = model_state(model)
    d = ls.random_direction(model, seed=0)
    s1 = ls.slice_1d(model, data, d, span=(-2, 2), steps=9)
    s2 = ls.slice_2d(model, data, d, ls.random_direction(model, seed=5), steps=5)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(data[0]), data[1]))
    assert s1.x[s1.centre_index] == 0.0 and s1.centre_loss == pytest.approx(loss, rel=1e-12)
    assert s2.centre_index == (2, 2) and s2.centre_loss == pytest.approx(loss, rel=1e-12)
    assert_same_state(before, model_state(model))
    # 1-D slice agrees with the 2-D one along its axis
    assert s1.meta["directions"][0] == {"kind": "random", "norm": "filter", "ignore": "biasbn",
                                         "seed": 0}


def test_filter_normalization(setup):
    model, _, _ = setup
    d = ls.random_direction(model, norm="filter", seed=3)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            torch.testing.assert_close(d[name].norm(dim=1), p.detach().norm(dim=1))
        else:
            assert torch.count_nonzero(d[name]) == 0  # ignore="biasbn"
    d_all = ls.random_direction(model, norm="filter", ignore=None, seed=3)
    assert torch.equal(d_all["0.bias"].abs(), model[0].bias.detach().abs())
    d_layer = ls.random_direction(model, norm="layer", ignore=None, seed=3)
    for name, p in model.named_parameters():
        assert float(d_layer[name].norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
    raw = ls.random_direction(model, norm="none", ignore=None, seed=3)
    assert float(raw["0.weight"].std()) == pytest.approx(1.0, rel=0.1)  # N(0, 1), not U[0, 1]
    assert float(raw["0.weight"].mean()) == pytest.approx(0.0, abs=0.05)


def test_filter_normalized_slice_invariant_under_T1_unnormalized_changes(setup):
    model, data, _ = setup
    new = scale_layers(model, "0", "2", 7.0)
    kw = dict(span=(-1, 1), steps=7)
    a = ls.slice_1d(model, data, ls.random_direction(model, "filter", seed=4), **kw)
    b = ls.slice_1d(new, data, ls.random_direction(new, "filter", seed=4), **kw)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-9)
    a = ls.slice_1d(model, data, ls.random_direction(model, "none", seed=4), **kw)
    b = ls.slice_1d(new, data, ls.random_direction(new, "none", seed=4), **kw)
    assert np.abs(a.values - b.values).max() > 1e-3


def test_interpolation_and_directions(setup):
    model, data, test = setup
    other = tiny_mlp([64, 12, 8, 5], seed=9)
    s = ls.interpolate(model, other, data, steps=11, test_data=test)
    assert s.x[0] == 0 and s.x[-1] == 1
    with torch.no_grad():
        ends = [float(F.cross_entropy(m(data[0]), data[1])) for m in (model, other)]
    assert s.values[0] == pytest.approx(ends[0], rel=1e-10)
    assert s.values[-1] == pytest.approx(ends[1], rel=1e-10)
    # Hessian directions: unit eigenvectors, eigenvalue recorded
    h1, h2 = ls.hessian_directions(model, data, k=2, seed=0, tol=1e-8)
    assert h1.norm_total() == pytest.approx(1.0, rel=1e-8)
    assert h1.info["eigenvalue"] >= h2.info["eigenvalue"]
    dot = sum(float((h1[n] * h2[n]).sum()) for n in h1)
    assert abs(dot) < 1e-6
    # orthogonalization keeps the norm
    d1, d2 = ls.random_direction(model, seed=0), ls.random_direction(model, seed=1)
    o = ls.orthogonalize(d1, d2)
    assert abs(sum(float((d1[n] * o[n]).sum()) for n in d1)) < 1e-9
    assert o.norm_total() == pytest.approx(d2.norm_total(), rel=1e-12)


def test_trajectory_pca():
    model = tiny_mlp([4, 3, 2], seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    u = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in base.items()}
    states = [{n: base[n] + (5 - t) * u[n] + 0.01 * (t % 2) * torch.ones_like(base[n])
               for n in base} for t in range(6)]
    tr = ls.trajectory_directions(states, k=2, model=model)
    assert tr.explained_variance_ratio[0] > 0.99
    assert tr.coords.shape == (6, 2) and np.allclose(tr.coords[-1], 0)
    unit = torch.cat([u[n].reshape(-1) for n in base])
    v = torch.cat([tr.directions[0][n].reshape(-1) for n in base])
    assert abs(float(v @ unit / unit.norm())) == pytest.approx(1.0, rel=1e-4)


def test_bn_reestimation_interpolation():
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    model = model.double()
    (X, y), _ = fv.data.digits(seed=0)
    data = (X[:100].double(), y[:100] % 5)
    model.train()
    model(data[0])  # running statistics of the data
    model.eval()
    other = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)).double()
    before = model_state(model)
    plain = ls.interpolate(model, other, data, steps=5)
    re = ls.interpolate(model, other, data, steps=5, bn_reestimate=True)
    assert re.meta["bn"] == "reestimated" and plain.meta["bn"] == "eval"
    assert not np.allclose(plain.values[1:-1], re.values[1:-1])
    assert_same_state(before, model_state(model))


def test_progressive_refines_and_matches_direct(setup):
    model, data, _ = setup
    d1, d2 = ls.random_direction(model, seed=1), ls.random_direction(model, seed=2)
    levels = list(ls.slice_2d_progressive(model, data, d1, d2, levels=(3, 5, 9)))
    assert [s.values.shape for s in levels] == [(3, 3), (5, 5), (9, 9)]
    direct = ls.slice_2d(model, data, d1, d2, steps=9)
    np.testing.assert_allclose(levels[-1].values, direct.values, rtol=1e-12)
    np.testing.assert_allclose(levels[0].values, direct.values[::4, ::4], rtol=1e-12)


def test_save_load_round_trip_and_refusals(setup, tmp_path):
    model, data, test = setup
    s = ls.slice_2d(model, data, ls.random_direction(model, seed=1),
                    ls.random_direction(model, seed=2), steps=(5, 3), test_data=test)
    path = ls.save(s, tmp_path / "surface")
    back = ls.load(path)
    for key in ("x", "y", "values", "accuracy", "test_values", "test_accuracy"):
        assert np.array_equal(getattr(back, key), getattr(s, key))
    assert back.meta == json.loads(json.dumps(s.meta)) and back.centre_loss == s.centre_loss
    one = ls.slice_1d(model, data, ls.random_direction(model, seed=1), steps=5, loss="cross_entropy")
    assert np.array_equal(ls.load(ls.save(one, tmp_path / "line.npz")).values, one.values)
    # a pickled object is never loaded
    np.savez(tmp_path / "evil.npz", x=np.array([0.0]), values=np.array([object()], dtype=object),
             header=np.array(json.dumps({"format": "famviz.slice/1", "kind": "Slice1D"})))
    with pytest.raises(ValueError, match="unpickling"):
        ls.load(tmp_path / "evil.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="no JSON header"):
        ls.load(tmp_path / "foreign.npz")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "values"}
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match=r"missing arrays \['values'\]"):
        ls.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        ls.load(tmp_path / "text.npz")


def test_bad_input(setup):
    model, data, _ = setup
    d = ls.random_direction(model, seed=0)
    with pytest.raises(ValueError, match=r"missing \['4.bias'\]"):
        ls.slice_1d(model, data, {k: v for k, v in d.items() if k != "4.bias"})
    with pytest.raises(ValueError, match="has shape"):
        ls.slice_1d(model, data, {**d, "0.weight": d["0.weight"].T})
    with pytest.raises(ValueError, match="min < max"):
        ls.slice_1d(model, data, d, span=(1, -1))
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        ls.slice_1d(model, data, d, steps=1)
    with pytest.raises(ValueError, match="odd number of steps"):
        ls.slice_2d(model, data, d, d, steps=10)
    with pytest.raises(ValueError, match="must contain 0"):
        ls.slice_1d(model, data, d, span=(0.5, 1))
    with pytest.raises(ValueError, match="more than memory_budget"):
        ls.slice_1d(model, data, d, steps=5, memory_budget=10_000)
    with pytest.raises(ValueError, match="results, more than memory_budget"):
        ls.slice_2d(model, data, d, d, steps=2001, memory_budget=50 << 20)
    with pytest.raises(ValueError, match="unknown norm 'unit'"):
        ls.random_direction(model, norm="unit")


def test_models_with_large_activations_are_evaluated_point_by_point():
    """A CNN on images (activations far above VMAP_MAX_ACTIVATIONS per grid point) runs one
    point at a time, like a hand-written loop, with the exact numbers of single-point
    evaluations (float64, BatchNorm with running statistics, two data batches); the small
    digits CNN keeps vmap. Chunks never exceed the per-mode caps."""
    model = fv.models.resnet((1, 1), (4, 8), seed=0).double().eval()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(48, 3, 24, 24, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (48,), generator=gen)
    batches = [(X[:32], y[:32]), (X[32:], y[32:])]
    d1, d2 = ls.random_direction(model, seed=1), ls.random_direction(model, seed=2)
    engine = ls.slices._prepare(model, batches, None, [d1, d2], "cross_entropy", None, None,
                                "eval", ls.DEFAULT_MEMORY_BUDGET)[0]
    assert engine.activations > ls.slices.VMAP_MAX_ACTIVATIONS and engine.mode == "loop"
    s = ls.slice_2d(model, batches, d1, d2, span=(-0.5, 0.5), steps=3)
    assert s.meta["engine"] == "loop"
    for i, j in [(0, 0), (1, 1), (2, 1), (0, 2)]:
        loss, acc = point_loss(model, (X, y), (s.x[i], s.y[j]), (d1, d2))
        assert s.values[i, j] == pytest.approx(loss, rel=1e-12)
        assert s.accuracy[i, j] == pytest.approx(acc, abs=1e-12)
    small = fv.models.cnn(channels=(2, 2), hidden=6, num_classes=5, seed=1).double()
    Xs = torch.randn(40, 64, generator=gen, dtype=torch.float64)
    e = ls.slices._prepare(small, (Xs, torch.arange(40) % 5), None,
                           [ls.random_direction(small, seed=1)], "cross_entropy", None, None,
                           "eval", ls.DEFAULT_MEMORY_BUDGET)[0]
    assert e.mode == "vmap" and e.activations <= ls.slices.VMAP_MAX_ACTIVATIONS
    assert 1 <= e.chunk <= ls.slices.VMAP_CHUNK
