"""Reparameterization invariance, both ways (docs/math.md §2), as property tests over random ReLU
networks: what must stay equal stays equal (rel. 1e-6), what must change does change."""


import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import famviz as fv
from famviz.oracles import dense_hessian
from famviz.reparam import (
    feature_std,
    max_output_change,
    normalize_features,
    scale_layers,
    scale_neurons,
    shift_logits,
)

from helpers import tiny_mlp

SAME = 1e-6
(X_ALL, Y_ALL), _ = fv.data.digits(test_size=0.25, seed=0)
X, Y = X_ALL[:120].double(), Y_ALL[:120] % 4
DATA = (X, Y)

nets = st.fixed_dictionaries(
    {
        "hidden": st.lists(st.integers(3, 9), min_size=2, max_size=3),
        "seed": st.integers(0, 10_000),
    }
)
# factors well away from 1, so "changes" is a real test, up to 50x either way
factors = st.one_of(st.floats(0.02, 0.6), st.floats(1.7, 50.0))
settings_ = settings(max_examples=15, deadline=None)


def uneven(values):
    """Per-neuron factors that are not all equal (equal ones would be a layer-wise T1)."""
    t = torch.tensor(values, dtype=torch.float64)
    if float(t.max() / t.min()) < 1.5:
        t[0] *= 3.0
    return t


def build(net):
    widths = [64, *net["hidden"], 4]
    return tiny_mlp(widths, seed=net["seed"]), [str(2 * i) for i in range(len(widths) - 1)]


def kappa(model, layer, **kw):
    return fv.relative_flatness(model, DATA, layer, **kw).value


def trace(model, params=None):
    return fv.hessian_trace(model, DATA, params=params).value


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def alive(model, layer):
    """Excludes degenerate draws: a network whose ReLUs around ``layer`` are all dead has a zero
    Hessian block there, and zero cannot "change"."""
    return trace(model, f"{layer}.weight") > 1e-10


def simplified(model, layer):
    """||W||_F^2 Tr(H_W): the layer-wise form that equals kappa only when d = 1."""
    W = model.get_submodule(layer).weight
    return float(W.detach().pow(2).sum()) * trace(model, f"{layer}.weight")


@settings_
@given(net=nets, alpha=factors, data=st.data())
def test_layerwise_T1(net, alpha, data):
    model, layers = build(net)
    i = data.draw(st.integers(0, len(layers) - 2))
    below, layer = layers[i], layers[i + 1]
    new = scale_layers(model, below, layer, alpha)
    assert max_output_change(model, new, X) < 1e-9
    # invariant: kappa of the feature layer (and of every other layer), the simplified form
    for name in layers:
        assert rel(kappa(model, name), kappa(new, name)) < SAME
    assert rel(simplified(model, layer), simplified(new, layer)) < SAME
    # changes exactly as docs/math.md says: Tr(H_W) x alpha^2, Tr(H_below) / alpha^2 (weight and
    # bias), every other block as it was
    old, now = (fv.hessian_trace(m, DATA).per_param for m in (model, new))
    assume(min(old[f"{layer}.weight"], old[f"{below}.weight"]) > 1e-10)  # not a dead network
    factor = {f"{layer}.weight": alpha**2, f"{below}.weight": alpha**-2,
              f"{below}.bias": alpha**-2}
    for name, value in old.items():
        assert now[name] == pytest.approx(value * factor.get(name, 1.0), rel=1e-6, abs=1e-300)
    assert rel(sum(old.values()), sum(now.values())) > 1e-6
    # the top eigenvalue of the feature layer's block scales by alpha^2
    lam = [fv.hessian_top_eigenvalue(m, DATA, params=f"{layer}.weight", tol=1e-9, seed=0).value
           for m in (model, new)]
    assert lam[1] / lam[0] == pytest.approx(alpha**2, rel=1e-5)


@settings_
@given(net=nets, data=st.data())
def test_rows_of_feature_layer_T3(net, data):
    model, layers = build(net)
    i = data.draw(st.integers(0, len(layers) - 2))
    layer, above = layers[i], layers[i + 1]
    d = model.get_submodule(layer).out_features
    r = uneven(data.draw(st.lists(factors, min_size=d, max_size=d)))
    assume(alive(model, layer))
    new = scale_neurons(model, layer, above, r)
    assert max_output_change(model, new, X) < 1e-9
    assert rel(kappa(model, layer), kappa(new, layer)) < SAME
    assert rel(simplified(model, layer), simplified(new, layer)) > 1e-4
    # T3 is diagonal, theta' = D theta, so H' = D^-1 H D^-1: every diagonal entry of the two
    # layers' blocks is divided by D^2 exactly (rows of `layer` by r^2, columns of `above` by r^-2)
    W, W_up = model.get_submodule(layer).weight, model.get_submodule(above).weight
    D = torch.cat([r[:, None].expand(W.shape).reshape(-1), r,
                   (1 / r)[None, :].expand(W_up.shape).reshape(-1),
                   torch.ones(W_up.shape[0], dtype=torch.float64)])
    diag = [dense_hessian(m, DATA, params=[layer, above])[0].diagonal() for m in (model, new)]
    torch.testing.assert_close(diag[1], diag[0] / D**2, rtol=1e-6, atol=1e-14)
    assert rel(float(diag[0].sum()), float(diag[1].sum())) > 1e-9


@settings_
@given(net=nets, data=st.data())
def test_softmax_shift_T5(net, data):
    model, layers = build(net)
    last = layers[-1]
    m = model.get_submodule(last).in_features
    v = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=m, max_size=m)),
                     dtype=torch.float64)
    if float(v.abs().max()) < 0.3:
        v[0] = 1.0
    assume(alive(model, last))
    new = shift_logits(model, last, v)
    with torch.no_grad():
        probs = [torch.softmax(mm(X), 1) for mm in (model, new)]
    assert float((probs[0] - probs[1]).abs().max()) < 1e-12
    assert rel(kappa(model, last), kappa(new, last)) < SAME
    assert rel(trace(model), trace(new)) < SAME  # the Hessian does not move either
    assert rel(simplified(model, last), simplified(new, last)) > 1e-4


@settings_
@given(net=nets, data=st.data())
def test_neurons_below_T2_only_after_std_normalization(net, data):
    model, layers = build(net)
    i = data.draw(st.integers(1, len(layers) - 1))
    below, layer = layers[i - 1], layers[i]
    m = model.get_submodule(layer).in_features
    c = uneven(data.draw(st.lists(factors, min_size=m, max_size=m)))
    # a dead or constant feature cannot be normalized (sigma = 0), and its column of W still
    # counts in kappa: the canonical form only identifies networks without such features
    assume(float(feature_std(model, layer, DATA).min()) > 1e-8 and alive(model, layer))
    new = scale_neurons(model, below, layer, c)
    assert max_output_change(model, new, X) < 1e-9
    assert rel(kappa(model, layer), kappa(new, layer)) > 1e-4
    a = kappa(model, layer, normalize_features=True)
    b = kappa(new, layer, normalize_features=True)
    assert rel(a, b) < SAME


def test_normalize_features_is_the_canonical_form():
    model = tiny_mlp([64, 8, 6, 4], seed=3)
    via_option = fv.relative_flatness(model, DATA, "4", normalize_features=True)
    by_hand = fv.relative_flatness(normalize_features(model, "4", DATA), DATA, "4")
    assert via_option.value == pytest.approx(by_hand.value, rel=1e-12)
    assert via_option.normalize_features and not by_hand.normalize_features


def test_whole_network_sharpness_moves_under_T1():
    """Dinh et al.'s point on one network: the function and kappa stay, Tr(H) and lambda_max of
    the whole Hessian move by orders of magnitude."""
    model = tiny_mlp([64, 16, 8, 4], seed=0)
    new = scale_layers(model, "0", "2", 1 / 30)
    assert max_output_change(model, new, X) < 1e-9
    assert rel(kappa(model, "2"), kappa(new, "2")) < SAME
    assert trace(new) > 10 * trace(model)
    lam = [fv.hessian_top_eigenvalue(m, DATA, tol=1e-6, seed=0).value for m in (model, new)]
    assert lam[1] > 10 * lam[0]
