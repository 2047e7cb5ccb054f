"""Relative flatness against the brute-force oracle (dense Hessian, float64)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import famviz as fv
from famviz.oracles import dense_hessian, relative_flatness_bruteforce

from helpers import tiny_mlp

RTOL = 1e-5


@pytest.mark.parametrize(
    "widths, layer",
    [
        ([64, 12, 8, 5], "4"),  # last layer, d < m
        ([64, 12, 8, 5], "2"),  # hidden, d < m
        ([64, 6, 9, 5], "2"),  # hidden, d > m
        ([64, 6, 9, 5], "0"),  # first layer, d < m
        ([64, 3, 8], "2"),  # last layer, d > m
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_exact_bruteforce_agree(digits_small, widths, layer, seed):
    X, y = digits_small
    model = tiny_mlp(widths, seed=seed)
    y = y % widths[-1]
    kappa, T = relative_flatness_bruteforce(model, (X, y), layer)
    for method in ("closed_form", "exact"):
        r = fv.relative_flatness(model, (X, y), layer, method=method)
        assert r.method == method
        assert r.value == pytest.approx(kappa, rel=RTOL)
        np.testing.assert_allclose(r.block_traces, T.numpy(), rtol=RTOL, atol=1e-12)
        assert r.shape == tuple(model.get_submodule(layer).weight.shape)


def test_auto_picks_closed_form_and_counts_no_hvps(digits_small):
    X, y = digits_small
    r = fv.relative_flatness(tiny_mlp([64, 12, 5]), (X, y), "2")
    assert r.method == "closed_form" and r.num_hvps == 0 and float(r) == r.value


def test_mse_closed_form_matches_formula_and_oracle(digits_small):
    X, _ = digits_small
    model = tiny_mlp([64, 7, 3], seed=3)
    Y = torch.randn(len(X), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kappa, _ = relative_flatness_bruteforce(model, (X, Y), "2", loss="mse")
    r = fv.relative_flatness(model, (X, Y), "2", loss="mse")
    assert r.method == "closed_form"
    assert r.value == pytest.approx(kappa, rel=RTOL)
    # linear output: kappa = ||W||_F^2 * 2/(N d) * sum_n ||phi_n||^2
    phi = torch.relu(model[0](X))
    W = model[2].weight
    expected = float(W.pow(2).sum() * 2 / (len(X) * 3) * phi.pow(2).sum())
    assert r.value == pytest.approx(expected, rel=1e-10)


def test_worked_example_cross_entropy():
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    data = (torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([1]))
    p = 1 / (1 + math.exp(-2))
    for method in ("closed_form", "exact"):
        assert fv.relative_flatness(model, data, "0", method=method).value == pytest.approx(
            4 * p * (1 - p), rel=1e-12
        )
    assert fv.hessian_trace(model, data, params="0.weight").value == pytest.approx(
        2 * p * (1 - p), rel=1e-12
    )


def test_worked_example_least_squares_is_ridge():
    # X = [[1,0],[0,2]], w = [1,1]: H = diag(1, 4), kappa = ||w||^2 Tr(H) = 10
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[0.3], [-1.0]], dtype=torch.float64)
    for method in ("closed_form", "exact"):
        assert fv.relative_flatness(model, (X, y), "0", loss="mse", method=method).value == (
            pytest.approx(10.0, rel=1e-12)
        )


def test_defective_slice_of_public_code_differs(digits_small):
    """docs/math.md §6: slicing the (out, in, out, in) Hessian as H[:, j, i, :] is not Tr(H_{j,i})."""
    X, y = digits_small
    model = tiny_mlp([64, 6, 5], seed=2)
    d, m = model[2].weight.shape
    H, _ = dense_hessian(model, (X, y), params="2.weight")
    H = H.reshape(d, m, d, m)
    correct = torch.einsum("ikjk->ij", H)
    defective = torch.stack(
        [torch.stack([H[:, j, i, :].trace() for i in range(d)]) for j in range(d)]
    )
    W = model[2].weight.detach()
    r = fv.relative_flatness(model, (X, y), "2")
    np.testing.assert_allclose(r.block_traces, correct.numpy(), rtol=RTOL, atol=1e-12)
    assert not torch.allclose(correct, defective, rtol=1e-2)
    assert abs(float(((W @ W.T) * defective).sum()) - r.value) > 1e-3 * r.value


def test_hutchinson_converges_and_stderr_covers(digits_small):
    X, y = digits_small
    model = tiny_mlp([64, 10, 5], seed=4)
    exact = fv.relative_flatness(model, (X, y), "2", method="exact")
    r = fv.relative_flatness(model, (X, y), "2", method="hutchinson", probes=200, seed=0)
    assert r.method == "hutchinson" and r.seed == 0 and r.num_hvps == 200 * 5
    assert r.stderr > 0
    assert abs(r.value - exact.value) <= 4 * r.stderr
    assert abs(r.value - exact.value) <= 0.15 * exact.value
    # the block traces are estimated too
    assert np.abs(r.block_traces - exact.block_traces).max() < 0.3 * np.abs(exact.block_traces).max()
    # the same seed gives the same number; another seed another one
    again = fv.relative_flatness(model, (X, y), "2", method="hutchinson", probes=200, seed=0)
    other = fv.relative_flatness(model, (X, y), "2", method="hutchinson", probes=200, seed=1)
    assert again.value == r.value and other.value != r.value


def test_neuronwise_variant_against_oracle(digits_small):
    X, y = digits_small
    model = tiny_mlp([64, 7, 6, 5], seed=5)
    H, _ = dense_hessian(model, (X, y), params="2.weight")
    d, m = model[2].weight.shape
    H = H.reshape(d, m, d, m)
    W = model[2].weight.detach()
    expected = sum(
        float(W[s].pow(2).sum() * torch.linalg.eigvalsh(H[s, :, s, :])[-1]) for s in range(d)
    )
    for method in ("closed_form", "exact"):
        r = fv.relative_flatness(model, (X, y), "2", method=method, variant="neuronwise_max")
        assert r.value == pytest.approx(expected, rel=RTOL)


def test_normalize_m_divides_by_inputs(digits_small):
    X, y = digits_small
    model = tiny_mlp([64, 12, 5])
    a = fv.relative_flatness(model, (X, y), "2")
    b = fv.relative_flatness(model, (X, y), "2", normalize="m")
    assert b.value == pytest.approx(a.value / 12, rel=1e-12) and b.normalize == "m"


class CustomNet(nn.Module):
    """Not an nn.Sequential: the closed form is only used where it is provably exact."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.hidden = nn.Linear(64, 8)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


def test_custom_module_last_layer_closed_form_hidden_exact(digits_small):
    X, y = digits_small
    model = CustomNet().double()
    for layer, method in (("head", "closed_form"), ("hidden", "exact")):
        kappa, _ = relative_flatness_bruteforce(model, (X, y), layer)
        r = fv.relative_flatness(model, (X, y), layer)
        assert r.method == method
        assert r.value == pytest.approx(kappa, rel=RTOL)
    with pytest.raises(ValueError, match="no closed form"):
        fv.relative_flatness(model, (X, y), "hidden", method="closed_form")


def test_tanh_hidden_layer_is_not_closed_form(digits_small):
    X, y = digits_small
    model = tiny_mlp([64, 6, 6, 5], activation="tanh")
    kappa, _ = relative_flatness_bruteforce(model, (X, y), "2")
    r = fv.relative_flatness(model, (X, y), "2")
    assert r.method == "exact" and r.value == pytest.approx(kappa, rel=RTOL)


def test_cnn_feature_layers(digits_small):
    X, y = digits_small
    model = fv.models.cnn(channels=(2, 3), hidden=6, num_classes=5, seed=0).double()
    for layer in ("conv1", "conv2", "fc1", "fc2"):  # convolutions: tests/test_relative_conv.py
        kappa, _ = relative_flatness_bruteforce(model, (X, y), layer)
        r = fv.relative_flatness(model, (X, y), layer)
        assert r.method == "closed_form"
        assert r.value == pytest.approx(kappa, rel=RTOL)
    with pytest.raises(ValueError, match="only Linear/Conv2d layers are supported"):
        fv.relative_flatness(model, (X, y), "pool")


def test_batches_and_dataloader_give_the_full_data_loss(digits_small):
    X, y = digits_small
    model = tiny_mlp([64, 9, 5], seed=6)
    whole = fv.relative_flatness(model, (X, y), "2", method="exact")
    batches = [(X[i : i + 64], y[i : i + 64]) for i in range(0, len(X), 64)]  # uneven last batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=48)
    for data in (batches, loader):
        for method in ("closed_form", "exact"):
            r = fv.relative_flatness(model, data, "2", method=method)
            assert r.value == pytest.approx(whole.value, rel=1e-10)
            assert r.objective.num_samples == len(X)


def test_float32_model_in_float64(digits_small):
    X, y = digits_small
    model = fv.models.mlp([64, 9, 5], seed=7)  # float32
    r64 = fv.relative_flatness(model, (X.float(), y), "2", dtype=torch.float64)
    r32 = fv.relative_flatness(model, (X.float(), y), "2")
    assert r64.objective.dtype == "float64" and r32.objective.dtype == "float32"
    assert r32.value == pytest.approx(r64.value, rel=1e-4)
    assert next(model.parameters()).dtype == torch.float32
