"""Honest numerics (issue 11): eigenvalue solvers on scaled, zero and degenerate spectra;
PAC-Bayes without a finite sigma; closed forms free of cancellation in float32."""

import math

import pytest
import torch

import famviz as fv
from famviz import fam
from famviz.measures import pac_bayes_flatness

# ------------------------------------------------------------------------------ PAC-Bayes


def _always_wrong():
    """A 2-class linear model that misclassifies every sample: its error is 1 at the centre,
    so no noise can raise it by any target."""
    model = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.bias.zero_()
    X = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    return model, (X, torch.tensor([1, 0, 1]))


def test_pac_bayes_without_a_finite_sigma_says_so():
    model, data = _always_wrong()
    with pytest.warns(RuntimeWarning, match="no finite sigma"):
        r = pac_bayes_flatness(model, data, samples=2, steps=3, seed=0)
    assert r.centre == 1.0
    assert r.found is False and "no finite sigma" in r.message
    assert math.isnan(float(r)) and math.isnan(r.sigma) and math.isnan(r.stderr)
    assert r.bracket[1] == math.inf and r.bracket[0] > 1e20  # the largest sigma tried
    assert r.increase <= 0.1


def test_pac_bayes_found_when_a_sigma_exists():
    model, (X, _) = _always_wrong()
    r = pac_bayes_flatness(model, (X, torch.tensor([0, 1, 0])), samples=2, steps=3, seed=0)
    assert r.found is True and r.message == ""
    assert 0 < r.sigma < math.inf and float(r) == pytest.approx(1 / r.sigma**2)


def test_measure_table_shows_no_number_for_pac_bayes_without_sigma():
    model, data = _always_wrong()
    with pytest.warns(RuntimeWarning, match="no finite sigma"):
        table = fv.measure_all(model, data, measures=["pac_bayes_flatness"], seed=0,
                               preset="fast")
    row = table["pac_bayes_flatness"]  # an error row, not a number that reads as "flattest"
    assert not row.ok and "no finite sigma" in row.error and math.isnan(row.value)
    assert "pac_bayes_flatness" in table.errors() and "error" in table.to_text()


# ------------------------------------------------------- closed forms near zero cross-entropy


def _confident_net(scale):
    """A ReLU MLP whose output layer is multiplied by ``scale`` and data it classifies with a
    margin (labels = its own predictions): scale 100 puts every 1 - p_max between ~1e-13
    and ~1e-30, far below float32's rounding of p_max."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    model = fv.models.mlp([8, 6, 3], seed=1).double()
    with torch.no_grad():
        top2 = model(X).topk(2, dim=1).values
        X = X[(top2[:, 0] - top2[:, 1]) > 0.3][:40]
        y = model(X).argmax(dim=1)
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    return model, (X, y)


def _output_layer_oracle(model, X):
    """κ, Tr(H_W) and T of the output layer with 50-digit mpmath arithmetic from the
    textbook forms (Σ p‖w‖² − ‖Σ p w‖², 1 − ‖p‖², diag p − ppᵀ): the cancellation the library
    avoids is harmless at this precision."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    with torch.no_grad():
        phi = model[:2](X)  # float64 features: exact inputs for the oracle
    W = [[mp.mpf(float(v)) for v in row] for row in model[2].weight]
    b = [mp.mpf(float(v)) for v in model[2].bias]
    d, m, N = len(W), len(W[0]), len(X)
    kappa = trace = mp.mpf(0)
    T = [[mp.mpf(0)] * d for _ in range(d)]
    for row in phi:
        f = [mp.mpf(float(v)) for v in row]
        z = [sum(W[s][k] * f[k] for k in range(m)) + b[s] for s in range(d)]
        e = [mp.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        f2 = sum(v * v for v in f)
        mean = [sum(p[s] * W[s][k] for s in range(d)) for k in range(m)]
        kappa += f2 * (sum(p[s] * sum(v * v for v in W[s]) for s in range(d))
                       - sum(v * v for v in mean))
        trace += f2 * (1 - sum(v * v for v in p))
        for s in range(d):
            for t in range(d):
                T[s][t] += f2 * ((p[s] if s == t else 0) - p[s] * p[t])
    T = torch.tensor([[float(v / N) for v in row] for row in T], dtype=torch.float64)
    return float(kappa / N), float(trace / N), T


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_output_layer_closed_forms_match_50_digits_in_float32_and_float64(scale):
    model, (X, y) = _confident_net(scale)
    kappa, trace, T = _output_layer_oracle(model, X)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        net = model.to(dtype)
        data = (X.to(dtype), y)
        r = fv.relative_flatness(net, data, "2", dtype=dtype)
        assert r.method == "closed_form"
        assert r.value > 0 and r.value == pytest.approx(kappa, rel=rtol), dtype
        assert torch.allclose(torch.from_numpy(r.block_traces), T, rtol=rtol, atol=0), dtype
        tr = fv.hessian_trace(net, data, params="2.weight", dtype=dtype)
        assert tr.backend == "gauss-newton"
        assert tr.value > 0 and tr.value == pytest.approx(trace, rel=rtol), dtype
        nm = fv.relative_flatness(net, data, "2", variant="neuronwise_max", dtype=dtype)
        assert nm.value > 0


@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_hidden_layer_closed_forms_float32_agree_with_float64(scale):
    """Through the backpropagated loss-Hessian factor (whose entry 1 - p_max is taken as the
    sum of the other probabilities)."""
    model, (X, y) = _confident_net(scale)
    k64 = fv.relative_flatness(model, (X, y), "0", dtype=torch.float64).value
    t64 = fv.hessian_trace(model, (X, y), params="0", dtype=torch.float64).value
    net, data = model.float(), (X.float(), y)
    k32 = fv.relative_flatness(net, data, "0", dtype=torch.float32).value
    t32 = fv.hessian_trace(net, data, params="0", dtype=torch.float32).value
    assert k32 > 0 and k32 == pytest.approx(k64, rel=1e-4)
    assert t32 > 0 and t32 == pytest.approx(t64, rel=1e-4)


def test_stable_kappa_equals_the_textbook_contraction():
    """Pullback.gram_and_kappa's κ (pairwise row distances) equals ⟨WWᵀ, T⟩ where nothing cancels."""
    from famviz.curvature import laplacian, row_distances, softmax_complement, softmax_coupling

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    W = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    w = torch.rand(30, generator=gen, dtype=torch.float64)
    p = torch.softmax(logits, dim=1)
    A = softmax_coupling(p, w)
    G = sum(wn * (torch.diag(pn) - torch.outer(pn, pn)) for wn, pn in zip(w, p))
    assert torch.allclose(laplacian(A), G, atol=1e-14)
    assert float((A * row_distances(W)).sum() / 2) == pytest.approx(float((W @ W.T * G).sum()),
                                                                    rel=1e-12)
    assert torch.allclose(softmax_complement(p), 1 - p, atol=1e-15)
    near_one = torch.softmax(torch.tensor([[40.0, 0.0, -3.0]]), dim=1)  # float32
    assert float(1 - near_one[0, 0]) == 0.0  # what the naive form sees
    assert float(softmax_complement(near_one)[0, 0]) == pytest.approx(
        math.exp(-40) + math.exp(-43), rel=1e-5)


# ------------------------------------------------------------------------- eigensolvers


class DenseOp:
    """A symmetric matrix posing as a HessianOperator (the solvers' whole interface)."""

    def __init__(self, H):
        self.H, self.dim, self.dtype = H, H.shape[0], H.dtype
        self.device, self.num_hvps = H.device, 0

    def matvec(self, v):
        self.num_hvps += 1
        return self.H @ v

    def matmat(self, V):
        self.num_hvps += len(V)
        return V @ self.H


def _spectrum_matrix(eigenvalues, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


SPECTRA = {
    "distinct": [3.0, 2.0, 1.5, 1.0, 0.7, 0.3, 0.1, 0.0, -0.2, -0.5],
    "repeated": [5.0, 5.0, 5.0, 2.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.1],
    "low_rank": [4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    "zero": [0.0] * 10,
}


@pytest.mark.parametrize("scale", [1e-20, 1e-8, 1.0, 1e8, 1e20])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_lanczos_k_values_on_scaled_spectra(spectrum, scale):
    from famviz.curvature import lanczos_top

    H = _spectrum_matrix(SPECTRA[spectrum]) * scale
    exact = torch.linalg.eigvalsh(H).flip(0)
    top = float(exact.abs().max())
    for k in range(1, 11):
        eig = lanczos_top(DenseOp(H), k, 1e-8, 200, seed=k)
        assert eig.values.shape == (k,) and eig.vectors.shape == (k, 10), (k, eig.values)
        assert torch.isfinite(eig.values).all()
        assert torch.allclose(eig.values, exact[:k], rtol=0, atol=1e-9 * top), (k, eig.values)
        assert eig.converged, k
        assert (eig.residuals <= 1e-7 * top).all()  # zero Hessian: exactly 0
        assert torch.allclose(eig.vectors.norm(dim=1), torch.ones(k, dtype=torch.float64))


@pytest.mark.parametrize("scale", [1e-15, 1.0, 1e15])
@pytest.mark.parametrize("spectrum", ["distinct", "repeated", "zero"])
def test_lanczos_in_float32(spectrum, scale):
    """float32 operators: tolerances at float32 precision, same relative accuracy at every
    scale (1e±15 keeps the squares inside float32's normal range)."""
    from famviz.curvature import lanczos_top

    H = _spectrum_matrix(SPECTRA[spectrum]) * scale
    exact = torch.linalg.eigvalsh(H).flip(0)
    top = float(exact.abs().max())
    for k in (1, 2, 4):
        eig = lanczos_top(DenseOp(H.float()), k, 1e-4, 200, seed=k)
        assert eig.values.shape == (k,) and eig.converged, (k, eig)
        assert torch.allclose(eig.values.double(), exact[:k], rtol=0, atol=1e-5 * top), k


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
@pytest.mark.parametrize("spectrum", ["distinct", "zero", "low_rank"])
def test_power_iteration_on_scaled_spectra(spectrum, scale):
    from famviz.curvature import power_iteration_top

    H = _spectrum_matrix(SPECTRA[spectrum]) * scale
    exact = torch.linalg.eigvalsh(H)
    dominant = exact[exact.abs().argsort(descending=True)][:2].sort(descending=True).values
    top = float(exact.abs().max())
    eig = power_iteration_top(DenseOp(H), 2, 1e-7, 2000, seed=0)
    assert torch.isfinite(eig.values).all() and eig.converged
    assert torch.allclose(eig.values, dominant, rtol=0, atol=1e-6 * top)
    if top == 0:
        assert (eig.values == 0).all() and (eig.residuals == 0).all()


def test_power_iteration_is_not_converged_when_max_iter_hits_a_large_residual():
    """Top eigenvalues 1.0 and 0.99: after 10 products the Rayleigh quotient barely moves
    (PyHessian's rule would stop), but the vector is far from an eigenvector."""
    from famviz.curvature import power_iteration_top

    H = _spectrum_matrix([1.0, 0.99, 0.5, 0.2, 0.1, 0.0])
    eig = power_iteration_top(DenseOp(H), 1, 1e-4, 10, seed=0)
    assert eig.converged is False
    assert float(eig.residuals[0]) > 1e-3  # the true residual, reported
    assert eig.iterations == 10
    more = power_iteration_top(DenseOp(H), 1, 1e-4, 5000, seed=0)
    assert more.converged and float(more.residuals[0]) <= 1e-4
    assert float(more.values[0]) == pytest.approx(1.0, abs=1e-6)


def test_lanczos_not_converged_when_max_iter_runs_out():
    from famviz.curvature import lanczos_top

    H = _spectrum_matrix(list(torch.linspace(1, 0, 60).tolist()))
    eig = lanczos_top(DenseOp(H), 3, 1e-10, 4, seed=0)
    assert eig.converged is False and eig.values.shape == (3,)
    assert float(eig.residuals.max()) > 1e-10


def _least_squares(loss_scale):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(5, 2).double()

    def loss(out, target):
        return loss_scale * torch.nn.functional.mse_loss(out, target)

    return model, (X, y), loss


@pytest.mark.parametrize("loss_scale", [1e-20, 1.0, 1e20])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_hessian_top_eigenvalue_on_a_scaled_loss(loss_scale, method):
    from famviz.oracles import dense_hessian

    model, data, loss = _least_squares(loss_scale)
    H, _ = dense_hessian(model, data, loss)
    exact = torch.linalg.eigvalsh(H).flip(0)
    k = 12 if method == "lanczos" else 2  # 12 = every parameter; rank 6 (repeated values)
    r = fv.hessian_top_eigenvalue(model, data, loss, k=k, method=method, seed=0, tol=1e-8,
                                  max_iter=2000)
    assert len(r.eigenvalues) == k and r.converged
    assert torch.allclose(torch.tensor(r.eigenvalues, dtype=torch.float64), exact[:k], rtol=0,
                          atol=1e-7 * float(exact[0]))


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_hessian_top_eigenvalue_of_a_zero_hessian_is_zero(method):
    model, (X, y), _ = _least_squares(1.0)
    r = fv.hessian_top_eigenvalue(model, (X, y), lambda out, t: (out * t).sum(), k=3,
                                  method=method, seed=0)
    assert r.eigenvalues == (0.0, 0.0, 0.0) and r.converged
    assert r.residuals == (0.0, 0.0, 0.0)


def test_lanczos_refuses_max_iter_below_k():
    model, data, loss = _least_squares(1.0)
    with pytest.raises(ValueError, match="max_iter=2 is below k=3"):
        fv.hessian_top_eigenvalue(model, data, loss, k=3, max_iter=2)


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("gradient", ["exact", "frozen"])
def test_fam_penalty_is_stable_near_zero_loss(scale, gradient):
    """The FAM penalty's softmax route: float32 agrees with the 50-digit κ, and is never
    negative, also where p is one-hot to far below float32's rounding."""
    model, (X, y) = _confident_net(scale)
    kappa, _, _ = _output_layer_oracle(model, X)
    net = model.float()
    value = float(fam.penalty(net, (X.float(), y), "2", gradient=gradient))
    assert value >= 0 and value == pytest.approx(kappa, rel=1e-4, abs=1e-30)
