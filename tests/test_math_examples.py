"""The worked examples of docs/math.md, computed by famviz and by hand-derived closed forms (this
test states the values itself; it reads nothing from the document)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import famviz as fv
from famviz import oracles, reparam


def _linear(weight, bias=None) -> nn.Sequential:
    w = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return nn.Sequential(layer)


def test_cross_entropy_worked_example():
    """§1: one sample, φ = (1, 0), W = [[2, 0], [0, 0]], b = 0 → κ = 4σ(2)(1 − σ(2)) =
    0.419974…, Tr(H_W) = 2σ(2)(1 − σ(2)) = 0.209987…"""
    model = _linear([[2.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    data = (torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0]))
    p = 1 / (1 + math.exp(-2.0))
    assert 4 * p * (1 - p) == pytest.approx(0.419974, abs=5e-7)
    assert 2 * p * (1 - p) == pytest.approx(0.209987, abs=5e-7)
    kappa = float(fv.relative_flatness(model, data, layer="0", dtype=torch.float64))
    assert kappa == pytest.approx(4 * p * (1 - p), rel=1e-12)
    assert kappa == pytest.approx(
        oracles.relative_flatness_bruteforce(model, data, "0")[0], rel=1e-10)
    trace_w = fv.hessian_trace(model, data, params=["0.weight"], dtype=torch.float64)
    assert float(trace_w) == pytest.approx(2 * p * (1 - p), rel=1e-12)


def test_mse_worked_example():
    """§1: X = [[1, 0], [0, 2]], w = (1, 1), no bias → H = diag(1, 4), κ = 10."""
    model = _linear([[1.0, 1.0]])
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    data = (X, torch.tensor([[0.3], [-0.7]], dtype=torch.float64))  # targets do not enter H
    H, _ = oracles.dense_hessian(model, data, loss="mse")
    torch.testing.assert_close(H.reshape(2, 2), torch.diag(torch.tensor([1.0, 4.0],
                                                                        dtype=torch.float64)))
    kappa = float(fv.relative_flatness(model, data, layer="0", loss="mse",
                                       dtype=torch.float64))
    assert kappa == pytest.approx(10.0, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 10.0])
def test_t1_scales_the_block_traces_by_alpha_squared(alpha):
    """§2, T1: the layer below × α, W ÷ α → Tr(H_W) × α², Tr(H_below) ÷ α², κ unchanged."""
    model = fv.models.mlp([5, 4, 3], seed=1).double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(12, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (12,), generator=g))
    scaled = reparam.scale_layers(model, "0", "2", alpha)

    def traces(m):
        return (float(fv.hessian_trace(m, data, params=["2.weight"], dtype=torch.float64)),
                float(fv.hessian_trace(m, data, params="0", dtype=torch.float64)),
                float(fv.relative_flatness(m, data, layer="2", dtype=torch.float64)))

    (w0, b0, k0), (w1, b1, k1) = traces(model), traces(scaled)
    assert w1 == pytest.approx(w0 * alpha**2, rel=1e-9)
    assert b1 == pytest.approx(b0 / alpha**2, rel=1e-9)
    assert k1 == pytest.approx(k0, rel=1e-9)
