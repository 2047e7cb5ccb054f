"""Every public function leaves the caller's model, data and the global RNG exactly as they were
(DESIGN.md conventions 2 and 4)."""

import pytest
import torch
from torch import nn

import famviz as fv
from famviz import oracles, reparam

from helpers import assert_call_leaves_caller_alone

CALLS = {
    "relative_flatness/closed_form": lambda m, d: fv.relative_flatness(m, d, "fc2"),
    "relative_flatness/exact": lambda m, d: fv.relative_flatness(m, d, "fc2", method="exact"),
    "relative_flatness/hutchinson": lambda m, d: fv.relative_flatness(
        m, d, "fc2", method="hutchinson", probes=3, seed=0),
    "relative_flatness/normalized": lambda m, d: fv.relative_flatness(
        m, d, "fc2", normalize_features=True, variant="neuronwise_max"),
    "hessian_trace/gauss-newton": lambda m, d: fv.hessian_trace(m, d, params=["fc1", "fc2"]),
    "hessian_trace/hvp": lambda m, d: fv.hessian_trace(m, d, method="exact"),
    "hessian_trace/hutchinson": lambda m, d: fv.hessian_trace(m, d, method="hutchinson",
                                                              probes=4, seed=1),
    "hessian_trace/hutchpp": lambda m, d: fv.hessian_trace(m, d, method="hutchpp", probes=9),
    "hessian_top_eigenvalue/lanczos": lambda m, d: fv.hessian_top_eigenvalue(m, d, k=2),
    "hessian_top_eigenvalue/power": lambda m, d: fv.hessian_top_eigenvalue(
        m, d, method="power", max_iter=5),
    "hessian_frobenius/exact": lambda m, d: fv.hessian_frobenius(m, d, params="fc2"),
    "hessian_frobenius/hutchinson": lambda m, d: fv.hessian_frobenius(
        m, d, method="hutchinson", probes=3),
    "Objective": lambda m, d: fv.Objective(m, d, bn="train").loss(),
    "oracles.dense_hessian": lambda m, d: oracles.dense_hessian(m, d, params="fc2"),
    "oracles.relative_flatness_bruteforce": lambda m, d: oracles.relative_flatness_bruteforce(
        m, d, "fc2"),
    "reparam.scale_layers": lambda m, d: reparam.scale_layers(m, "fc1", "fc2", 3.0),
    "reparam.scale_neurons": lambda m, d: reparam.scale_neurons(m, "fc1", "fc2", [2.0] * 6),
    "reparam.shift_logits": lambda m, d: reparam.shift_logits(m, "fc2", torch.ones(6)),
    "reparam.normalize_features": lambda m, d: reparam.normalize_features(m, "fc2", d),
    "reparam.max_output_change": lambda m, d: reparam.max_output_change(m, m, d[0]),
}


def make_model():
    """A model with every kind of state: BatchNorm buffers, train mode, a frozen parameter and
    leftover gradients."""
    model = nn.Sequential()
    model.add_module("conv", fv.models.cnn(channels=(2,), hidden=6, num_classes=5)[:5])
    model.add_module("bn", nn.BatchNorm1d(32))
    model.add_module("fc1", nn.Linear(32, 6))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(6, 5))
    model = model.double()
    model.train()
    model.conv.conv1.bias.requires_grad_(False)
    X, y = DATA
    torch.nn.functional.cross_entropy(model(X), y).backward()  # leaves .grad (and BN stats)
    return model


(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
DATA = (_X[:40].double(), _Y[:40] % 5)


@pytest.mark.parametrize("name", list(CALLS))
def test_caller_state_untouched(name):
    assert_call_leaves_caller_alone(CALLS[name], make_model(), DATA)


@pytest.mark.parametrize("call", [
    lambda: fv.data.digits(seed=3),
    lambda: fv.data.moons(n_samples=50, label_noise=0.2, seed=3),
    lambda: fv.models.mlp([4, 5, 2], seed=1),
    lambda: fv.models.cnn(seed=1),
])
def test_data_and_models_do_not_touch_the_global_rng(call):
    rng = torch.get_rng_state()
    call()
    assert torch.equal(torch.get_rng_state(), rng)


def test_results_record_their_seed():
    model, data = make_model(), DATA
    r = fv.hessian_trace(model, data, method="hutchinson", probes=3)
    again = fv.hessian_trace(model, data, method="hutchinson", probes=3, seed=r.seed)
    assert isinstance(r.seed, int) and again.value == r.value
