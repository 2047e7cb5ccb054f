"""The prior volume log P(f) (Zhang et al. 2021): kernels against Monte-Carlo over random
networks, EP against the exact orthant probability, the function-space invariance, errors."""

import itertools
import math

import pytest
import torch
from torch import nn

import famviz as fv
from famviz.measures import (
    CHANGES,
    INVARIANT,
    NOT_APPLICABLE,
    empirical_kernel,
    measure_all,
    nngp_kernel,
    prior_volume,
)
from famviz.measures._orthant import (
    log_orthant_ep,
    log_orthant_exact,
    log_orthant_mc,
)
from famviz.reparam import max_output_change, scale_layers, scale_neurons, shift_logits

from helpers import assert_call_leaves_caller_alone, tiny_mlp

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
X64 = _X.double()
BINARY = (_Y >= 5).long()

# ---------------------------------------------------------------------------------- kernels

#: three inputs in R^2: the first layer's pre-activations are visibly non-Gaussian when narrow
X2 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.5, 0.3]], dtype=torch.float64)


def random_outputs(widths, M, seed):
    """Outputs on X2 of M independent networks with PyTorch's default Linear init (weights and
    biases uniform on ±1/sqrt(fan_in)), all drawn at once."""
    g = torch.Generator().manual_seed(seed)
    h = X2.T.expand(M, -1, -1)
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        bound = 1 / math.sqrt(a)
        W = (2 * torch.rand(M, b, a, generator=g, dtype=torch.float64) - 1) * bound
        c = (2 * torch.rand(M, b, 1, generator=g, dtype=torch.float64) - 1) * bound
        h = W @ h + c
        if i < len(widths) - 2:
            h = torch.relu(h)
    return h[:, 0, :]


@pytest.mark.parametrize("width", [2, 16])
def test_nngp_kernel_is_the_output_covariance_of_random_networks(width):
    G = random_outputs([2, width, width, 1], 40000, seed=width)
    K_mc = G.T @ G / len(G)
    se = (G[:, :, None] * G[:, None, :]).std(0) / math.sqrt(len(G))
    K, sigmas = nngp_kernel(fv.models.mlp([2, width, width, 1]), X2)
    assert [s[0] for s in sigmas] == ["0", "2", "4"]
    assert float(((K_mc - K) / se).abs().max()) < 4.0  # measured: <= 1.9


def test_sign_patterns_of_random_networks_converge_to_the_gaussian_process():
    """The second moment matches at any width; the law of the signs (what the volume counts)
    becomes the GP's orthant probabilities as the width grows (the kernel depends on the width
    only through PyTorch's bias variance 1/(3 fan_in))."""

    def total_variation(width):
        K, _ = nngp_kernel(fv.models.mlp([2, width, width, 1]), X2)
        exact = {f: math.exp(log_orthant_exact(K, torch.tensor(f), 0.0)[0])
                 for f in itertools.product([-1.0, 1.0], repeat=3)}
        assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
        G = random_outputs([2, width, width, 1], 20000, seed=0)
        return sum(abs(p - float(((G * torch.tensor(f)) > 0).all(1).double().mean()))
                   for f, p in exact.items()) / 2

    narrow, wide = total_variation(1), total_variation(48)
    assert narrow > 0.025 and wide < 0.015 and wide < narrow / 2  # measured: 0.035, 0.007


def test_nngp_kernel_closed_forms_and_prior_options():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    lin = nn.Sequential(nn.Linear(2, 1))
    K, _ = nngp_kernel(lin, X)  # PyTorch init: σ_w² = 1/3, σ_b² = 1/(3·2)
    expected = 1 / 6 + (1 / 3) * (X @ X.T) / 2
    torch.testing.assert_close(K, expected, rtol=1e-15, atol=0)
    # one ReLU layer, He init without bias: the diagonal is kept (2 x 1/2), θ = π/2 off it
    relu = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    K, sigmas = nngp_kernel(relu, X, sigma_w=math.sqrt(2), sigma_b=0.0)
    torch.testing.assert_close(torch.diagonal(K), torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert float(K[0, 1]) == pytest.approx(2 / math.pi, rel=1e-14)
    assert all(abs(w - 2) < 1e-12 and b == 0 for _, w, b in sigmas)
    # identity activations: a linear network's kernel
    ident = nn.Sequential(nn.Linear(2, 4), nn.Identity(), nn.Linear(4, 1))
    K, _ = nngp_kernel(ident, X, sigma_w=[1.0, 2.0], sigma_b=[0.5, 0.0])
    torch.testing.assert_close(K, 4.0 * (0.25 + X @ X.T / 2))


def test_empirical_kernel_agrees_with_nngp_for_a_relu_stack():
    model = fv.models.mlp([64, 32, 32, 1], seed=3)
    X = X64[:6]
    K_emp, G = empirical_kernel(model, X, samples=1500, seed=0)
    K, _ = nngp_kernel(model, X)
    se = (G[:, :, None] * G[:, None, :]).std(0) / math.sqrt(len(G))
    assert G.shape == (1500, 6)
    assert float(((K_emp - K) / se).abs().max()) < 4.0
    again, _ = empirical_kernel(model, X, samples=1500, seed=0)
    assert torch.equal(again, K_emp)  # seeded


# ------------------------------------------------------------------------------- integrals


def typical(K, seed):
    """A sign pattern drawn from the prior itself (a typical function)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(K + 1e-12 * torch.eye(len(K), dtype=torch.float64))
    return torch.where(L @ torch.randn(len(K), generator=g, dtype=torch.float64) > 0, 1.0, -1.0)


def random_kernel(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T / n + 0.5 * torch.ones(n, n, dtype=torch.float64)


def digits_kernel(n, seed):
    idx = torch.randperm(len(X64), generator=torch.Generator().manual_seed(seed))[:n]
    K, _ = nngp_kernel(fv.models.mlp([64, 32, 32, 1]), X64[idx], sigma_w=math.sqrt(2),
                       sigma_b=0.1)
    return K, torch.where(BINARY[idx] > 0, 1.0, -1.0).double()


def test_exact_routine_against_closed_forms_and_independence():
    # n = 4 through scipy: independent coordinates give 2^-4; two duplicated pairs give 1/4
    eye = torch.eye(4, dtype=torch.float64)
    f = torch.tensor([1.0, -1.0, 1.0, 1.0])
    value, err = log_orthant_exact(eye, f, 0.0)
    assert value == pytest.approx(-4 * math.log(2), abs=1e-6) and err < 1e-6
    pairs = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2)).double() + 1e-9 * eye
    assert log_orthant_exact(pairs, torch.ones(4), 0.0)[0] == pytest.approx(
        2 * math.log(0.5), abs=1e-4)
    # n = 3 closed form against scipy's routine (n = 3 plus an independent 4th coordinate)
    K = random_kernel(3, 0)
    f3 = torch.tensor([1.0, -1.0, 1.0])
    closed, zero = log_orthant_exact(K, f3, 0.5)
    assert zero == 0.0
    K4 = torch.block_diag(K, torch.ones(1, 1, dtype=torch.float64))
    scipy_value, err = log_orthant_exact(K4, torch.cat([f3, torch.ones(1)]), 0.5)
    assert scipy_value - math.log(0.5) == pytest.approx(closed, abs=max(5 * err, 1e-5))


#: |EP - exact| allowed for n <= 8 (issue goal 0.05 nats). Measured over n = 4, 6, 8 x 6 seeds:
#: probit noise 1 (the paper's likelihood) <= 0.003 nats; the step likelihood (noise 0) on the
#: strongly correlated digits kernels (correlations 0.7-0.9) up to 0.060: the goal is missed there
EP_TOLERANCE = {1.0: 0.01, 0.0: 0.08}


@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("source", ["random", "digits"])
def test_ep_against_the_exact_orthant_probability(source, noise):
    worst = 0.0
    for n, seed in [(2, 0), (3, 1), (5, 2), (8, 3), (8, 4)]:
        if source == "random":
            K = random_kernel(n, seed)
            f = typical(K, seed)
        else:
            K, f = digits_kernel(n, seed)
        exact, err = log_orthant_exact(K, f, noise)
        ep, report = log_orthant_ep(K, f, noise)
        assert report.converged
        worst = max(worst, abs(ep - exact) - 3 * err)
    assert worst < EP_TOLERANCE[noise]


def test_ep_and_monte_carlo_agree_for_larger_n():
    """n = 60 digits against the minimax-tilted GHK sampler: EP within its error plus 0.02 nats
    (noise 1; measured 0.008) or 1 % of log P (step likelihood: EP is low by 0.15 nats, 0.5 %;
    benchmarks/README.md has larger n)."""
    K, f = digits_kernel(60, 7)
    for noise in (1.0, 0.0):
        ep, _ = log_orthant_ep(K, f, noise)
        mc, se = log_orthant_mc(K, f, noise, samples=1000, seed=0)
        assert se < 0.06
        slack = 0.02 if noise else 0.01 * abs(mc)
        assert abs(ep - mc) < 4 * se + slack, (noise, ep, mc, se)


def test_tilting_tames_the_monte_carlo_weights():
    """The plain GHK sampler's error at n = 60 (step likelihood) is several times the tilted
    one's; both agree with the exact routine at n = 8."""
    K, f = digits_kernel(60, 7)
    plain = log_orthant_mc(K, f, 0.0, samples=1000, seed=0, tilt=False)
    tilted = log_orthant_mc(K, f, 0.0, samples=1000, seed=0)
    assert plain[1] > 2 * tilted[1]
    K, f = digits_kernel(8, 3)
    exact, err = log_orthant_exact(K, f, 0.0)
    for tilt in (True, False):
        value, se = log_orthant_mc(K, f, 0.0, samples=4000, seed=1, tilt=tilt)
        assert abs(value - exact) < 4 * se + 3 * err


def test_ep_is_exact_for_independent_coordinates():
    K = torch.diag(torch.tensor([0.1, 1.0, 10.0, 3.0], dtype=torch.float64))
    f = torch.tensor([1.0, -1.0, -1.0, 1.0])
    for noise in (0.0, 1.0):
        value, report = log_orthant_ep(K, f, noise)
        assert value == pytest.approx(-4 * math.log(2), abs=1e-10) and report.converged


# ------------------------------------------------------------------------------------ API


@pytest.fixture(scope="module")
def trained():
    """A small binary net trained on digits (digit >= 5), with two logits."""
    X, y = X64[:300], BINARY[:300]
    model = fv.models.mlp([64, 16, 12, 2], seed=0).double()
    trained, _ = fv.fam.train(model, (X, y), method="sgd", epochs=30, lr=0.1, batch_size=50,
                              seed=0, progress=False, track_kappa=False)
    return trained, X, y


def test_prior_volume_result_and_methods_agree():
    model = tiny_mlp([64, 8, 1], seed=1)
    X = X64[:7]
    ep = prior_volume(model, X, method="ep")
    exact = prior_volume(model, X, method="exact", seed=0)
    mc = prior_volume(model, X, method="mc", mc_samples=4000, seed=0)
    assert ep.kernel == "nngp" and ep.n == 7 and ep.ep.converged and math.isnan(ep.stderr)
    assert float(ep) == ep.log_volume and ep.bits == pytest.approx(-ep.log_volume / math.log(2))
    assert abs(ep.log_volume - exact.log_volume) < 0.05
    assert abs(mc.log_volume - exact.log_volume) < 4 * mc.stderr + 1e-3
    assert ep.cost.forward == 1 and ep.invariance["T5"] == NOT_APPLICABLE
    with torch.no_grad():
        predicted = torch.where(model(X)[:, 0] > 0, 1.0, -1.0)
    assert torch.equal(ep.labels, predicted.double())


def test_true_labels_have_a_larger_volume_than_shuffled_labels():
    model = fv.models.mlp([64, 32, 32, 1], seed=0)
    X, y = X64[:300], BINARY[:300]
    shuffled = y[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    for noise in (0.0, 1.0):
        true = prior_volume(model, X, y, noise=noise).log_volume
        other = prior_volume(model, X, shuffled, noise=noise).log_volume
        assert true > other, noise
    # labels in {0, 1} and in {-1, +1} are the same function
    pm = prior_volume(model, X[:50], 2 * y[:50] - 1).log_volume
    assert pm == prior_volume(model, X[:50], y[:50]).log_volume


def test_empirical_kernel_volume_with_its_sampling_error():
    model = fv.models.mlp([64, 32, 32, 1], seed=0)
    X, y = X64[:40], BINARY[:40]
    nngp = prior_volume(model, X, y, noise=0.0)
    emp = prior_volume(model, X, y, kernel="empirical", noise=0.0, samples=600, seed=0)
    assert emp.kernel == "empirical" and emp.samples == 600 and emp.cost.forward == 601
    assert 0 < emp.kernel_stderr < 0.1 and 0 < emp.stderr < 1.0
    assert abs(emp.log_volume - nngp.log_volume) < 4 * emp.stderr + 0.1
    same = prior_volume(model, X, y, kernel="empirical", noise=0.0, samples=600, seed=0)
    assert same.log_volume == emp.log_volume


def test_invariant_under_function_preserving_reparameterizations(trained):
    model, X, _ = trained
    base = prior_volume(model, X)
    emp_base = prior_volume(model, X[:40], kernel="empirical", samples=200, seed=1)
    g = torch.Generator().manual_seed(0)
    changed = {
        "T1": scale_layers(model, "0", "2", 25.0),
        "T2": scale_neurons(model, "0", "2", 10 ** (2 * torch.rand(16, generator=g) - 1)),
        "T3": scale_neurons(model, "2", "4", 10 ** (2 * torch.rand(12, generator=g) - 1)),
        "T5": shift_logits(model, "4", 3 * torch.randn(12, generator=g, dtype=torch.float64)),
    }
    for t, new in changed.items():
        if t != "T5":
            assert max_output_change(model, new, X) < 1e-9
        assert base.invariance[t] == INVARIANT
        r = prior_volume(new, X)
        assert torch.equal(r.labels, base.labels), t
        assert abs(r.log_volume - base.log_volume) <= 1e-10, t
        e = prior_volume(new, X[:40], kernel="empirical", samples=200, seed=1)
        assert abs(e.log_volume - emp_base.log_volume) <= 1e-10, t
    # and a measure that is not invariant moves under the same T1 (both ways)
    kappa = [fv.relative_flatness(m, (X, trained[2]), layer="2").value
             for m in (model, changed["T3"])]
    assert abs(kappa[0] - kappa[1]) / kappa[0] < 1e-8
    trace = [fv.hessian_trace(m, (X, trained[2])).value for m in (model, changed["T1"])]
    assert abs(trace[0] - trace[1]) / trace[0] > 1e-3


def test_measure_all_row_where_the_task_is_binary(trained):
    model, X, y = trained
    table = measure_all(model, (X[:100], y[:100]), seed=0,
                        measures=["prior_volume", "hessian_trace"])
    row = table["prior_volume"]
    assert row.value == prior_volume(model, X[:100]).log_volume
    assert row.invariance == {"T1": INVARIANT, "T2": INVARIANT, "T3": NOT_APPLICABLE,
                              "T5": INVARIANT}  # layer "4" is the output: no T3 around it
    assert table["hessian_trace"].invariance["T1"] == CHANGES
    ten = fv.models.mlp([64, 8, 10], seed=0)
    default = measure_all(ten, (X64[:50], _Y[:50]), seed=0, preset="fast",
                          options={"pac_bayes_flatness": {"samples": 1, "steps": 2}})
    assert "prior_volume" not in default.names


def test_caller_state_and_rng_untouched(trained):
    model, X, y = trained
    model = model.train()
    model[0].bias.requires_grad_(False)
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    for kernel in ("nngp", "empirical"):
        assert_call_leaves_caller_alone(
            lambda m, d: prior_volume(m, d[0][:30], kernel=kernel, samples=50, seed=0),
            model, (X, y))
    # hooks are part of the model's function (pruning, weight_norm): they run on famviz's
    # replica, while the caller's hook tables stay as they were (checked above)
    assert calls


def test_duplicate_and_degenerate_inputs():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    X = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # the step likelihood counts identical inputs once: the volume of the two distinct ones
    dup = prior_volume(model, X, [1, 1, 0], noise=0.0).log_volume
    assert dup == prior_volume(model, X[1:], [1, 0], noise=0.0).log_volume
    assert dup == pytest.approx(prior_volume(model, X, [1, 1, 0], noise=0.0, method="exact",
                                             seed=0).log_volume, abs=0.01)
    assert prior_volume(model, X, [1, 0, 0], noise=0.0).log_volume == -math.inf
    # an input whose output is 0 at every initialization (no biases, x = 0)
    flat = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
    Z = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert prior_volume(flat, Z, [1, 1], noise=1.0).log_volume == pytest.approx(
        2 * math.log(0.5), abs=1e-8)
    with pytest.raises(ValueError, match="zero prior variance .* use noise > 0"):
        prior_volume(flat, Z, [1, 1], noise=0.0)


class NoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(64, 1, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


class CustomInit(nn.Linear):
    def reset_parameters(self):
        nn.init.normal_(self.weight)


@pytest.mark.parametrize("call,error,match", [
    (lambda: prior_volume(fv.models.mlp([64, 5, 10]), X64[:5]), ValueError,
     "binary classification: the model's output must have one logit or two classes"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:11], method="exact"), ValueError,
     "method='exact' integrates n <= 10 dimensions; X has 11 inputs"),
    (lambda: prior_volume(NoReset(), X64[:5], kernel="empirical"), ValueError,
     r"parameters \['w'\] belong to modules without one"),
    (lambda: prior_volume(NoReset(), X64[:5], kernel="nngp"), ValueError,
     "kernel='nngp' needs an nn.Sequential"),
    (lambda: prior_volume(nn.Sequential(CustomInit(64, 1)), X64[:5]), ValueError,
     "cannot read its initialization variance; pass sigma_w= and sigma_b="),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:5], labels=[0, 1, 2, 0, 1]),
     ValueError, r"labels must be binary"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:5], labels=[0, 1]), ValueError,
     "labels has 2 entries for 5 inputs"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:5], kernel="gp"), ValueError,
     "unknown kernel 'gp'; valid: 'auto', 'nngp', 'empirical'"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:5], method="laplace"), ValueError,
     "unknown method 'laplace'; valid: 'ep', 'exact', 'mc'"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:5], noise=-1.0), ValueError,
     "noise is a variance and must be >= 0"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), (X64[:5], BINARY[:5])), TypeError,
     r"X must be a tensor of inputs .* pass X and labels=y"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:5], sigma_w=1.0), ValueError,
     "give both sigma_w and sigma_b"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:5], sigma_w=[1.0], sigma_b=0.0),
     ValueError, "sigma_w has 1 entries; the model has 2 Linear layers"),
    (lambda: prior_volume(fv.models.mlp([64, 5, 1]), X64[:50], kernel="empirical",
                          noise=0.0, samples=20), ValueError,
     "has rank <= 16 < n=50, .* use samples >= 63 or noise > 0"),
])
def test_bad_input_gives_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_progress_bar_of_the_empirical_kernel(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    X = torch.eye(3, dtype=torch.float64)
    quiet = fv.prior_volume(model, X, kernel="empirical", samples=40, seed=0)
    assert capsys.readouterr().err == ""
    shown = fv.prior_volume(model, X, kernel="empirical", samples=40, seed=0, progress=True)
    assert "empirical kernel" in capsys.readouterr().err
    assert shown.log_volume == quiet.log_volume
    with pytest.raises(TypeError, match="progress must be True or False"):
        fv.prior_volume(model, X, progress="yes")
