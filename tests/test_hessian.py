"""Hessian trace, eigenvalues and Frobenius norm against the dense oracle (float64)."""

import numpy as np
import pytest
import torch
from torch import nn

import famviz as fv
from famviz.oracles import dense_hessian

from helpers import tiny_mlp

RTOL = 1e-5


@pytest.fixture(scope="module")
def relu_case(digits_small):
    model = tiny_mlp([64, 10, 8, 5], seed=1)
    H, names = dense_hessian(model, digits_small)
    return model, digits_small, H, names


def test_exact_trace_gauss_newton_backend(relu_case):
    model, data, H, names = relu_case
    r = fv.hessian_trace(model, data)
    assert r.method == "exact" and r.backend == "gauss-newton" and r.num_hvps == 0
    assert r.value == pytest.approx(float(H.trace()), rel=RTOL)
    # per-parameter traces are the diagonal blocks
    sizes = [model.get_parameter(n).numel() for n in names]
    blocks = torch.split(torch.diagonal(H), sizes)
    for name, block in zip(names, blocks):
        assert r.per_param[name] == pytest.approx(float(block.sum()), rel=RTOL, abs=1e-14)


@pytest.mark.parametrize("params", ["2", "4.weight", ["0.bias", "4"]])
def test_trace_of_selected_params(relu_case, params):
    model, data, _, _ = relu_case
    H, _ = dense_hessian(model, data, params=params)
    gn = fv.hessian_trace(model, data, params=params)
    hvp = fv.hessian_trace(model, data, params=params, method="exact",
                           dtype=torch.float64, bn="eval")
    assert gn.value == pytest.approx(float(H.trace()), rel=RTOL)
    assert hvp.value == pytest.approx(float(H.trace()), rel=RTOL)


def test_exact_trace_hvp_backend_for_tanh_and_cnn(digits_small):
    for model in (tiny_mlp([64, 6, 5], activation="tanh"),
                  fv.models.cnn(channels=(2, 2), hidden=5, num_classes=5).double()):
        H, _ = dense_hessian(model, digits_small)
        r = fv.hessian_trace(model, digits_small, method="exact")
        assert r.backend == "hvp-diagonal" and r.num_hvps == H.shape[0]
        assert r.value == pytest.approx(float(H.trace()), rel=RTOL)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_stochastic_trace_converges_with_covering_stderr(relu_case, method):
    model, data, H, _ = relu_case
    exact = float(H.trace())
    errors = []
    for budget in (30, 600):
        r = fv.hessian_trace(model, data, method=method, probes=budget, seed=0)
        assert r.num_hvps == budget and r.seed == 0 and r.stderr > 0
        assert abs(r.value - exact) <= 4 * r.stderr
        errors.append(abs(r.value - exact) / exact)
    assert errors[1] < 0.05
    # reproducible with a seed
    assert fv.hessian_trace(model, data, method=method, probes=30, seed=0).value == (
        fv.hessian_trace(model, data, method=method, probes=30, seed=0).value
    )


def test_hutchpp_beats_hutchinson_on_average(relu_case):
    model, data, H, _ = relu_case
    exact = float(H.trace())
    err = {m: np.mean([abs(fv.hessian_trace(model, data, method=m, probes=60, seed=s).value
                           - exact) for s in range(5)]) for m in ("hutchinson", "hutchpp")}
    assert err["hutchpp"] < err["hutchinson"]


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues(relu_case, method):
    model, data, H, _ = relu_case
    top = torch.linalg.eigvalsh(H).flip(0)[:3]
    r = fv.hessian_top_eigenvalue(model, data, k=3, method=method, tol=1e-8, max_iter=1000,
                                  seed=0)
    assert r.converged
    np.testing.assert_allclose(r.eigenvalues, top.numpy(), rtol=1e-4)
    assert float(r) == r.eigenvalues[0]
    # eigenvectors: unit norm over all parameters, and H v = lambda v
    for lam, vec in zip(r.eigenvalues, r.eigenvectors):
        v = torch.cat([vec[n].reshape(-1) for n in r.params])
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-10)
        assert float((H @ v - lam * v).norm()) < 1e-2 * abs(lam)


def test_lanczos_needs_fewer_hvps_than_power(relu_case):
    model, data, _, _ = relu_case
    lz = fv.hessian_top_eigenvalue(model, data, method="lanczos", tol=1e-4, seed=0)
    pw = fv.hessian_top_eigenvalue(model, data, method="power", tol=1e-4, seed=0)
    assert lz.value == pytest.approx(pw.value, rel=1e-3)
    assert lz.num_hvps < pw.num_hvps


def test_eigenvalue_of_layer_block(relu_case):
    model, data, _, _ = relu_case
    H, _ = dense_hessian(model, data, params="2")
    r = fv.hessian_top_eigenvalue(model, data, params="2", tol=1e-8, seed=1)
    assert r.params == ("2.weight", "2.bias")
    assert r.value == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_frobenius(relu_case):
    model, data, H, _ = relu_case
    exact = float(torch.linalg.matrix_norm(H))
    r = fv.hessian_frobenius(model, data, method="exact")
    assert r.value == pytest.approx(exact, rel=RTOL)
    est = fv.hessian_frobenius(model, data, method="hutchinson", probes=400, seed=0)
    assert abs(est.value - exact) <= 4 * est.stderr and abs(est.value - exact) < 0.05 * exact


def test_trace_least_squares_closed_form():
    X = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(30, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1)).double()
    # H_w = 2/N X^T X, H_b = 2
    expected = float(2 / 30 * X.pow(2).sum()) + 2.0
    assert fv.hessian_trace(model, (X, y), loss="mse").value == pytest.approx(expected, rel=1e-12)
    top = fv.hessian_top_eigenvalue(model, (X, y), loss="mse", seed=0, tol=1e-10)
    Xb = torch.cat([X, torch.ones(30, 1, dtype=torch.float64)], 1)
    assert top.value == pytest.approx(float(torch.linalg.eigvalsh(2 / 30 * Xb.T @ Xb)[-1]),
                                      rel=1e-8)


def test_batched_and_looped_hvps_agree(relu_case, monkeypatch):
    """Both routes of HessianOperator.matmat (batched for small blocks, a loop above
    BATCHED_HVP_MAX_DIM) give the same products."""
    import famviz.curvature as curv

    model, data, H, _ = relu_case
    op = fv.HessianOperator(fv.Objective(model, data), [n for n, _ in model.named_parameters()])
    V = torch.randn(5, op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = op.matmat(V)
    monkeypatch.setattr(curv, "BATCHED_HVP_MAX_DIM", 0)
    looped = op.matmat(V)
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(looped, V @ H, rtol=1e-8, atol=1e-10)
    assert op.num_hvps == 10
    r = fv.hessian_trace(model, data, method="hutchinson", probes=20, seed=0)
    monkeypatch.setattr(curv, "BATCHED_HVP_MAX_DIM", 4096)
    assert r.value == pytest.approx(
        fv.hessian_trace(model, data, method="hutchinson", probes=20, seed=0).value, rel=1e-10)


def test_trace_of_a_linear_stack_on_token_inputs():
    """A Linear on (N, T, F) shares its weight over tokens: no per-sample Gauss-Newton route,
    the trace from HVPs equals the dense oracle's."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    X = torch.randn(12, 4, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(12, 4, 2, generator=g, dtype=torch.float64)
    H, _ = dense_hessian(model, (X, Y), loss="mse")
    r = fv.hessian_trace(model, (X, Y), loss="mse")
    assert r.method == "exact" and r.value == pytest.approx(float(H.trace()), rel=1e-10)
