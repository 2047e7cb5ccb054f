"""Known answers for the perturbation measures, PAC-Bayes, Fisher–Rao and the volume estimate:
a quadratic loss where the worst and average cases have closed forms, zero radii, the analytic
PAC-Bayes sigma, and the Fisher–Rao formula on a bias-free network."""

import math

import pytest
import torch
import torch.nn.functional as F

from famviz.curvature import generator
from famviz.measures import (
    adaptive_sharpness,
    average_flatness,
    basin_volume,
    eps_sharpness,
    fisher_rao_norm,
    pac_bayes_flatness,
    worst_case_flatness,
)

from helpers import tiny_mlp

D, C = 12, 1.5  # dimension, scale: X = C * I


def quadratic(w, y=None, seed=0):
    """L(w) = mean_i (C w_i - y_i)^2 = (1/d) ||C w - y||^2: a Linear(d, 1) without bias under
    MSE on X = C I (d = len(w)). Its Hessian is (2 C^2 / d) I."""
    d = len(w)
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w, dtype=torch.float64).reshape(1, d))
    if y is None:
        y = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    X = C * torch.eye(d, dtype=torch.float64)
    return model, (X, y)


def loss_of(model, data):
    X, y = data
    with torch.no_grad():
        return float(F.mse_loss(model(X), y))


def random_w(seed=1, d=D):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def residual(model, data):
    X, y = data
    with torch.no_grad():
        return (model(X) - y).reshape(-1)


def trained(model, X, y, steps=100, lr=0.5):
    """Full-batch gradient descent (plain: torch.optim's first use costs seconds here)."""
    params = list(model.parameters())
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(model(X), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return model


# ---------------------------------------------------------------------------------- Keskar


@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.3])
def test_eps_sharpness_closed_form(eps):
    """The box maximum of a separable convex quadratic is the corner that moves every
    coordinate away from its minimizer: (1/D) sum (|r_i| + C b_i)^2, b_i = eps (|w_i| + 1)."""
    model, data = quadratic(random_w())
    w = model.weight.detach().reshape(-1)
    L = loss_of(model, data)
    b = eps * (w.abs() + 1)
    worst = float(((residual(model, data).abs() + C * b) ** 2).mean())
    r = eps_sharpness(model, data, loss="mse", eps=eps)
    assert r.loss_perturbed == pytest.approx(worst, rel=1e-12)
    assert float(r) == pytest.approx(100 * (worst - L) / (1 + L), rel=1e-12)
    assert r.loss_at_centre == pytest.approx(L, rel=1e-14)
    assert r.cost.forward == 22 and r.cost.backward == 20  # loss0 + 20 steps + final
    assert math.isnan(r.stderr) and r.seed is None and r.kind == "worst"


def test_zero_radii_give_zero():
    model, data = quadratic(random_w())
    assert float(eps_sharpness(model, data, loss="mse", eps=0.0, restarts=3, seed=0)) == 0.0
    assert float(average_flatness(model, data, loss="mse", xi=0.0, seed=0)) == 0.0
    assert float(worst_case_flatness(model, data, loss="mse", xi=0.0, seed=0)) == 0.0
    for kind in ("worst", "average"):
        assert float(adaptive_sharpness(model, data, loss="mse", rho=0.0, kind=kind,
                                        restarts=2, seed=0)) == 0.0


# ---------------------------------------------------------------------------------- Stutz


@pytest.mark.parametrize("xi", [0.01, 0.3])
def test_average_flatness_closed_form(xi):
    """For an isotropic quadratic, every antithetic pair on the sphere ||nu|| = xi ||w|| raises
    the loss by exactly (C^2 / D) xi^2 ||w||^2."""
    model, data = quadratic(random_w())
    w = model.weight.detach()
    r = average_flatness(model, data, loss="mse", xi=xi, samples=5, seed=0)
    assert float(r) == pytest.approx(C**2 / D * xi**2 * float(w.pow(2).sum()), rel=1e-10)
    assert r.stderr < 1e-12
    assert r.cost.forward == 1 + 2 * 5 and r.cost.backward == 0


@pytest.mark.parametrize("xi", [0.003, 0.2])
def test_worst_case_flatness_closed_form(xi):
    """max over ||nu|| <= xi ||w|| of (1/D)||r + C nu||^2 is (1/D)(||r|| + C xi ||w||)^2."""
    model, data = quadratic(random_w())
    w = model.weight.detach()
    L = loss_of(model, data)
    worst = (float(residual(model, data).norm()) + C * xi * float(w.norm())) ** 2 / D
    r = worst_case_flatness(model, data, loss="mse", xi=xi, restarts=3, seed=0)
    assert float(r) == pytest.approx(worst - L, rel=1e-9)
    assert r.cost.backward == 3 * 20


# ------------------------------------------------------------------------------ adaptive


def equal_magnitudes(seed=2, size=0.7):
    signs = torch.randint(0, 2, (D,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return size * signs.double()


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_adaptive_sharpness_closed_forms(eta):
    """With |w_i| all equal, T = t I: the worst case is (1/D)(||r|| + C rho t)^2 - L and every
    antithetic pair of the average case gives (C^2 / D) rho^2 t^2."""
    rho = 0.2
    model, data = quadratic(equal_magnitudes())
    t = 0.7 + eta
    L = loss_of(model, data)
    worst = adaptive_sharpness(model, data, loss="mse", rho=rho, eta=eta)
    expect = (float(residual(model, data).norm()) + C * rho * t) ** 2 / D - L
    assert float(worst) == pytest.approx(expect, rel=1e-9)
    avg = adaptive_sharpness(model, data, loss="mse", rho=rho, eta=eta, kind="average",
                             samples=4, seed=0)
    assert float(avg) == pytest.approx(C**2 / D * rho**2 * t**2, rel=1e-10)


def test_adaptive_average_converges_to_its_expectation():
    """Unequal |w_i|: E = (C^2 / D) rho^2 ||t||^2 / D for u uniform on the sphere; the estimate
    is within a few standard errors and the standard error shrinks like 1/sqrt(samples)."""
    rho, eta = 0.3, 0.01
    model, data = quadratic(random_w(5))
    t = model.weight.detach().reshape(-1).abs() + eta
    expect = C**2 / D * rho**2 * float(t.pow(2).sum()) / D
    small = adaptive_sharpness(model, data, loss="mse", rho=rho, kind="average", samples=50,
                               seed=1)
    big = adaptive_sharpness(model, data, loss="mse", rho=rho, kind="average", samples=800,
                             seed=2)
    assert abs(float(big) - expect) < 4 * big.stderr
    assert abs(float(small) - expect) < 4 * small.stderr
    assert big.stderr < small.stderr / 2.5


# ------------------------------------------------------------------------------ PAC-Bayes


def test_pac_bayes_recovers_the_analytic_sigma():
    """E[L(w + sigma eps)] - L(w) = (C^2 / d) sigma^2 E||eps||^2 = C^2 sigma^2, so the
    analytic sigma is sqrt(target) / C. With the draws the estimate uses (common random
    numbers), the bisection must hit sqrt(target d / (C^2 mean||eps_k||^2)) to its precision;
    that sits within Monte-Carlo error of the analytic value."""
    d, target, samples = 200, 0.05, 30
    model, data = quadratic(random_w(d=d))
    r = pac_bayes_flatness(model, data, loss="mse", criterion="loss", target=target,
                           samples=samples, steps=22, seed=4)
    gen = generator(4, torch.device("cpu"))
    sq = torch.stack([torch.randn(d, generator=gen, dtype=torch.float64).pow(2).sum()
                      for _ in range(samples)]).mean()
    assert r.sigma == pytest.approx(math.sqrt(target * d / (C**2 * float(sq))), rel=1e-6)
    # sd of mean ||eps||^2 / d over 30 draws: sqrt(2 / (200 * 30)) = 1.8 %, halved for sigma
    analytic = math.sqrt(target) / C
    assert r.sigma == pytest.approx(analytic, rel=0.04)
    assert float(r) == pytest.approx(1 / r.sigma**2)
    assert r.increase <= target and r.bracket[0] == r.sigma < r.bracket[1]
    assert r.bracket[1] / r.bracket[0] < 1 + 1e-6
    assert r.cost.forward == 1 + 2 * samples * r.evaluations


def test_pac_bayes_sigma_is_the_standard_deviation():
    """Doubling the scale of the problem's curvature halves sigma (not its square root):
    sigma enters as the std of the noise."""
    target = 0.05
    m1, d1 = quadratic(random_w())
    X, y = d1
    r1 = pac_bayes_flatness(m1, d1, loss="mse", criterion="loss", target=target, samples=20,
                            steps=20, seed=0)
    r2 = pac_bayes_flatness(m1, (2 * X, 2 * y), loss="mse", criterion="loss",
                            target=4 * target, samples=20, steps=20, seed=0)
    # L2(w) = 4 L1(w): the increase at sigma is 4x, so the target 4x gives the same sigma
    assert r2.sigma == pytest.approx(r1.sigma, rel=1e-12)
    r3 = pac_bayes_flatness(m1, (2 * X, 2 * y), loss="mse", criterion="loss", target=target,
                            samples=20, steps=20, seed=0)
    assert r3.sigma == pytest.approx(r1.sigma / 2, rel=1e-5)


def test_pac_bayes_error_criterion_on_a_trained_net(digits_small):
    X, y = digits_small
    model = trained(tiny_mlp([64, 16, 5], seed=0), X, y)
    r = pac_bayes_flatness(model, (X, y), samples=3, steps=6, seed=0)
    assert r.criterion == "error" and 0 <= r.centre < 0.2
    assert 0 < r.sigma < math.inf and r.increase <= 0.1
    assert r.cost.forward == 2 + 2 * 3 * r.evaluations and r.cost.backward == 0


# ------------------------------------------------------------------------------ Fisher-Rao


def test_fisher_rao_matches_the_logit_formula_on_a_bias_free_net(digits_small):
    """Liang et al.: for a bias-free ReLU net with L+1 layers, ||theta||_fr^2 =
    (L+1)^2 (1/N) sum_n <dl/dz_n, z_n>^2; with softmax CE dl/dz = softmax(z) - onehot(y)."""
    X, y = digits_small
    model = tiny_mlp([64, 9, 7, 5], seed=3, bias=False)
    with torch.no_grad():
        z = model(X)
    g = torch.softmax(z, 1) - F.one_hot(y, 5).double()
    formula = 9 * float(((g * z).sum(1) ** 2).mean())
    jvp = fisher_rao_norm(model, (X, y))
    logits = fisher_rao_norm(model, (X, y), method="logits")
    assert jvp.squared == pytest.approx(formula, rel=1e-10)
    assert logits.squared == pytest.approx(formula, rel=1e-12) and logits.depth == 3
    assert float(jvp) == pytest.approx(math.sqrt(formula), rel=1e-10)


def test_fisher_rao_jvp_is_the_definition_with_biases(digits_small):
    """<theta, grad l_n>^2 averaged, from per-sample autograd gradients (no forward mode)."""
    X, y = digits_small
    X, y = X[:30], y[:30]
    model = tiny_mlp([64, 6, 5], seed=1)
    params = list(model.parameters())
    dots = []
    for n in range(len(X)):
        loss = F.cross_entropy(model(X[n:n + 1]), y[n:n + 1])
        grads = torch.autograd.grad(loss, params)
        dots.append(sum(float((p.detach() * g).sum()) for p, g in zip(params, grads)))
    expect = sum(d * d for d in dots) / len(dots)
    r = fisher_rao_norm(model, [(X[:17], y[:17]), (X[17:], y[17:])])  # two batches
    assert r.squared == pytest.approx(expect, rel=1e-10)
    # with biases the logit formula is only an approximation
    assert fisher_rao_norm(model, (X, y), method="logits").squared != pytest.approx(expect)


# --------------------------------------------------------------------------------- volume


def test_basin_volume_radius_of_an_isotropic_bowl():
    """At the minimum of L = (C^2 / D) ||w - w*||^2 every ray leaves the threshold tau at
    r = sqrt(tau D) / C."""
    w_star = random_w()
    model, data = quadratic(w_star, y=(C * w_star).reshape(D, 1))
    tau = 0.03
    r = basin_volume(model, data, loss="mse", threshold=tau, samples=3, steps=25, seed=0)
    expect = math.sqrt(tau * D) / C
    assert all(abs(x - expect) < 1e-6 * expect for x in r.radii)
    assert float(r) == pytest.approx(expect, rel=1e-6) and r.capped == 0
    assert r.fraction(0.99 * expect) == (1.0, 0.0) and r.fraction(1.01 * expect)[0] == 0.0
