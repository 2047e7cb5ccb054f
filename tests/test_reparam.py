"""Tests of famviz.reparam: function-preserving reparameterizations (docs/math.md §2)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from famviz import reparam
from famviz.data import digits
from famviz.models import cnn, mlp
from famviz.reparam import (
    MIN_FEATURE_STD,
    consecutive_pairs,
    feature_std,
    max_output_change,
    normalize_features,
    scale_layers,
    scale_neurons,
    shift_logits,
)

REL_TOL = 1e-10  # float64: output change relative to the output scale


# ------------------------------------------------------------------------------------- helpers


def _fill_(model: nn.Module, seed: int) -> nn.Module:
    """Initialize every Linear from a seeded generator (the global RNG is not used)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features**0.5
                m.weight.uniform_(-bound, bound, generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=gen)
    return model


def _linear(i, o, bias=True):
    return nn.utils.skip_init(nn.Linear, i, o, bias=bias)  # no global-RNG initialization


class FNet(nn.Module):
    """Not a Sequential: the forward calls functional activations."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.fc1 = _linear(64, 32)
        self.fc2 = _linear(32, 16)
        self.out = _linear(16, 10)
        _fill_(self, seed)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.leaky_relu(self.fc2(x), 0.1)
        return self.out(x)


class Residual(nn.Module):
    """fc1's output is used twice (a skip connection)."""

    def __init__(self):
        super().__init__()
        self.fc1 = _linear(4, 4)
        self.fc2 = _linear(4, 4)
        _fill_(self, 0)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.relu(h)) + h


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = _linear(4, 4)
        self.fc2 = _linear(4, 2)
        _fill_(self, 0)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace this
            h = h * 1.0
        return self.fc2(h)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = _linear(4, 4)
        self.fc2 = _linear(4, 4)
        _fill_(self, 0)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.fc1(x)))))


class LogSoftmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = _linear(4, 8)
        self.fc2 = _linear(8, 3)
        _fill_(self, 0)

    def forward(self, x):
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


class MyLinear(nn.Linear):
    """A user's subclass of nn.Linear: still a Linear layer for reparam."""


def _model(kind: str) -> nn.Module:
    if kind == "mlp_relu":
        return mlp([64, 32, 16, 10], seed=1)
    if kind == "mlp_leaky":
        return mlp([64, 32, 16, 10], activation="leaky_relu", seed=2)
    if kind == "fnet":
        return FNet(seed=3)
    if kind == "cnn":
        return cnn(seed=4)
    if kind == "dropout":
        return _fill_(nn.Sequential(_linear(64, 32), nn.ReLU(), nn.Dropout(0.5),
                                    _linear(32, 10)), 5)
    if kind == "prelu":
        return _fill_(nn.Sequential(_linear(64, 32), nn.PReLU(32), nn.Flatten(),
                                    nn.Identity(), _linear(32, 10)), 6)
    if kind == "sublinear":
        return _fill_(nn.Sequential(MyLinear(64, 32), nn.ReLU(), MyLinear(32, 10)), 7)
    raise AssertionError(kind)


# (model kind, first, second): every consecutive pair the tests reparameterize
PAIRS = [
    ("mlp_relu", "0", "2"),
    ("mlp_relu", "2", "4"),
    ("mlp_leaky", "0", "2"),
    ("mlp_leaky", "2", "4"),
    ("fnet", "fc1", "fc2"),
    ("fnet", "fc2", "out"),
    ("cnn", "fc1", "fc2"),
    ("dropout", "0", "3"),
    ("prelu", "0", "4"),
    ("sublinear", "0", "2"),
]
OUTPUT_LAYER = {"mlp_relu": "4", "mlp_leaky": "4", "fnet": "out", "cnn": "fc2"}


@pytest.mark.parametrize("kind", sorted({k for k, _, _ in PAIRS}))
def test_consecutive_pairs_finds_exactly_the_pairs_that_can_be_rescaled(kind):
    model = _model(kind)
    assert consecutive_pairs(model) == [(a, b) for k, a, b in PAIRS if k == kind]


@pytest.mark.parametrize("model", [Residual(), Shared(), LogSoftmaxNet()],
                         ids=["residual", "shared", "logsoftmax"])
def test_consecutive_pairs_leaves_out_what_scale_layers_refuses(model):
    found = consecutive_pairs(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for a in linear:
        for b in linear:
            if a == b:
                continue
            try:
                scale_layers(model, a, b, 2.0)
                accepted = True
            except ValueError:
                accepted = False
            assert accepted == ((a, b) in found), (a, b)


def test_consecutive_pairs_refuses_untraceable_models():
    with pytest.raises(ValueError, match="could not trace"):
        consecutive_pairs(Untraceable())


@pytest.fixture(scope="module")
def digits_data():
    (X, y), _ = digits(test_size=0.25, seed=0)
    return X[:300].double(), y[:300]


def _rel_change(a: nn.Module, b: nn.Module, X) -> float:
    """max |f_a - f_b| relative to max |f_a| (evaluated on a copy in eval mode)."""
    with torch.no_grad():
        scale = copy.deepcopy(a).eval()(X).abs().max().item()
    return max_output_change(a, b, X) / scale


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grad": [(n, p.grad is None) for n, p in model.named_parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def _assert_untouched(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    assert [(n, m.training) for n, m in model.named_modules()] == snap["training"]
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == snap["requires_grad"]
    assert [(n, p.grad is None) for n, p in model.named_parameters()] == snap["grad"]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert hooks == snap["hooks"]


def _features(model: nn.Module, layer: str, X) -> torch.Tensor:
    """Input of ``layer`` (eval mode), through a temporary hook on this test's own model."""
    store = {}
    module = dict(model.named_modules())[layer]

    def hook(mod, inputs, output):
        store["phi"] = inputs[0]

    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        with torch.no_grad():
            model(X)
    finally:
        handle.remove()
    return store["phi"]


# ---------------------------------------------------------------------- function is preserved


@pytest.mark.parametrize("kind,first,second", PAIRS)
def test_scale_layers_preserves_function(kind, first, second, digits_data):
    model = _model(kind).double()
    X, _ = digits_data
    for alpha in (1e-3, 0.37, 2.0, 1e3):
        new = scale_layers(model, first, second, alpha)
        assert _rel_change(model, new, X) <= REL_TOL, alpha
        # and the weights did change
        assert not torch.equal(dict(new.named_modules())[second].weight,
                               dict(model.named_modules())[second].weight)


@pytest.mark.parametrize("kind,first,second", PAIRS)
def test_scale_neurons_preserves_function(kind, first, second, digits_data):
    model = _model(kind).double()
    X, _ = digits_data
    n = dict(model.named_modules())[first].out_features
    gen = torch.Generator().manual_seed(11)
    scales = torch.exp(4 * torch.rand(n, generator=gen, dtype=torch.float64) - 2)  # e^-2..e^2
    new = scale_neurons(model, first, second, scales)
    assert _rel_change(model, new, X) <= REL_TOL


@pytest.mark.parametrize("kind,first,second", PAIRS)
def test_normalize_features_preserves_function(kind, first, second, digits_data):
    model = _model(kind).double()
    X, _ = digits_data
    new = normalize_features(model, second, digits_data)
    assert _rel_change(model, new, X) <= REL_TOL


@pytest.mark.parametrize("kind", sorted(OUTPUT_LAYER))
def test_shift_logits_preserves_softmax_and_cross_entropy(kind, digits_data):
    model = _model(kind).double()
    X, y = digits_data
    layer = OUTPUT_LAYER[kind]
    d = dict(model.named_modules())[layer].in_features
    v = torch.linspace(-1.0, 2.0, d, dtype=torch.float64)
    new = shift_logits(model, layer, v, bias_shift=0.75)
    model.eval()
    new.eval()
    with torch.no_grad():
        za, zb = model(X), new(X)
    assert (za - zb).abs().max() > 1e-2  # the logits moved
    diff = zb - za  # ... by the same amount for every class of a sample
    assert (diff - diff[:, :1]).abs().max() <= REL_TOL * za.abs().max()
    assert (za.softmax(1) - zb.softmax(1)).abs().max() <= REL_TOL
    ce_a, ce_b = F.cross_entropy(za, y), F.cross_entropy(zb, y)
    assert abs(float(ce_a - ce_b)) <= REL_TOL * float(ce_a)


# ------------------------------------------------------------------- weights are as specified


def test_scale_layers_weights_exact():
    model = mlp([5, 7, 6, 3], seed=0).double()
    alpha = 3.7
    new = scale_layers(model, "2", "4", alpha)
    assert torch.equal(new[2].weight, model[2].weight * alpha)
    assert torch.equal(new[2].bias, model[2].bias * alpha)
    assert torch.equal(new[4].weight, model[4].weight / alpha)
    assert torch.equal(new[4].bias, model[4].bias)
    assert torch.equal(new[0].weight, model[0].weight)
    assert torch.equal(new[0].bias, model[0].bias)


def test_scale_layers_float32_close_and_alpha_types():
    model = mlp([5, 7, 3], seed=0)
    for alpha in (2, 2.0, np.float32(2.0), torch.tensor(2.0)):
        new = scale_layers(model, "0", "2", alpha)
        assert new[0].weight.dtype == torch.float32
        torch.testing.assert_close(new[0].weight, 2 * model[0].weight)
        torch.testing.assert_close(new[2].weight, model[2].weight / 2)


def test_scale_neurons_weights_exact():
    model = mlp([5, 7, 6, 3], seed=0).double()
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(7, generator=gen, dtype=torch.float64) + 0.1
    for scales in (s, s.numpy(), s.tolist()):
        new = scale_neurons(model, "0", "2", scales)
        assert torch.equal(new[0].weight, model[0].weight * s[:, None])
        assert torch.equal(new[0].bias, model[0].bias * s)
        for k in range(7):
            assert torch.equal(new[2].weight[:, k], model[2].weight[:, k] / s[k])
        assert torch.equal(new[2].bias, model[2].bias)
        assert torch.equal(new[4].weight, model[4].weight)


def test_shift_logits_weights_exact():
    model = mlp([5, 7, 3], seed=0).double()
    v = torch.arange(7, dtype=torch.float64)
    new = shift_logits(model, "2", v)
    for i in range(3):
        assert torch.equal(new[2].weight[i], model[2].weight[i] + v)
    assert torch.equal(new[2].bias, model[2].bias)  # bias_shift defaults to 0
    new = shift_logits(model, "2", v.tolist(), bias_shift=-1.5)
    assert torch.equal(new[2].bias, model[2].bias - 1.5)
    assert torch.equal(new[0].weight, model[0].weight)


def test_bias_free_layers():
    model = mlp([5, 7, 3], bias=False, seed=0).double()
    X = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert max_output_change(model, scale_layers(model, "0", "2", 5.0), X) < 1e-12
    assert max_output_change(model, scale_neurons(model, "0", "2", [2.0] * 7), X) < 1e-12
    new = shift_logits(model, "2", torch.ones(7))
    assert torch.equal(new[2].weight, model[2].weight + 1)
    with pytest.raises(ValueError, match="no bias"):
        shift_logits(model, "2", torch.ones(7), bias_shift=1.0)


# -------------------------------------------------------------------------- canonical form


def test_feature_std_matches_direct_computation_and_batching(digits_data):
    model = mlp([64, 32, 10], seed=0).double()
    X, y = digits_data
    phi = _features(model, "2", X)
    expected = phi.std(0, unbiased=False)
    sigma = feature_std(model, "2", (X, y))
    assert sigma.dtype == torch.float64 and sigma.shape == (32,)
    torch.testing.assert_close(sigma, expected, rtol=1e-12, atol=1e-14)
    batches = [(X[i : i + 37], y[i : i + 37]) for i in range(0, len(X), 37)]
    torch.testing.assert_close(feature_std(model, "2", batches), expected, rtol=1e-10,
                               atol=1e-14)


def test_feature_std_float32_model_evaluates_in_float64(digits_data):
    model = mlp([64, 32, 10], seed=0)
    X, y = digits_data
    sigma = feature_std(model, "2", (X.float(), y))
    assert sigma.dtype == torch.float64
    expected = feature_std(model.double(), "2", (X, y))
    torch.testing.assert_close(sigma, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind,first,second", PAIRS)
def test_normalize_features_gives_unit_std(kind, first, second, digits_data):
    model = _model(kind).double()
    X, y = digits_data
    before = feature_std(model, second, (X, y))
    new = normalize_features(model, second, (X, y))
    after = feature_std(new, second, (X, y))
    live = before >= MIN_FEATURE_STD
    assert live.any()
    torch.testing.assert_close(after[live], torch.ones_like(after[live]), rtol=0, atol=1e-10)
    # dead features keep scale 1: their std is still (about) zero
    assert (after[~live] < 1e-10).all()
    f_old = dict(model.named_modules())[first]
    f_new = dict(new.named_modules())[first]
    sigma = torch.where(live, before, torch.ones_like(before))
    torch.testing.assert_close(f_new.weight, f_old.weight / sigma[:, None], rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind,first,second", [p for p in PAIRS if p[0] != "prelu"])
def test_normalize_features_is_a_canonical_form(kind, first, second, digits_data):
    model = _model(kind).double()
    X, y = digits_data
    n = dict(model.named_modules())[first].out_features
    gen = torch.Generator().manual_seed(5)
    c = torch.exp(6 * torch.rand(n, generator=gen, dtype=torch.float64) - 3)
    other = scale_neurons(model, first, second, c)
    assert max_output_change(model, other, X) <= 1e-9
    n1 = normalize_features(model, second, (X, y))
    n2 = normalize_features(other, second, (X, y))
    live = feature_std(model, second, (X, y)) >= MIN_FEATURE_STD
    w1 = dict(n1.named_modules())[second].weight
    w2 = dict(n2.named_modules())[second].weight
    torch.testing.assert_close(w1[:, live], w2[:, live], rtol=1e-10, atol=1e-12)
    b1 = dict(n1.named_modules())[first]
    b2 = dict(n2.named_modules())[first]
    torch.testing.assert_close(b1.weight[live], b2.weight[live], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b1.bias[live], b2.bias[live], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_features(n1, second, X), _features(n2, second, X), rtol=1e-10,
                               atol=1e-12)
    # before normalization the two differ
    w_a = dict(model.named_modules())[second].weight
    w_b = dict(other.named_modules())[second].weight
    assert (w_a - w_b).abs().max() > 1e-3


def test_normalize_features_dead_neuron_keeps_scale_one():
    model = mlp([3, 4, 2], seed=0).double()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = -1.0  # neuron 1 is always 0 after the ReLU
    X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = (X, torch.zeros(50, dtype=torch.long))
    sigma = feature_std(model, "2", data)
    assert sigma[1] == 0
    new = normalize_features(model, "2", data)
    assert torch.equal(new[0].weight[1], model[0].weight[1])
    assert torch.equal(new[0].bias[1], model[0].bias[1])
    assert torch.equal(new[2].weight[:, 1], model[2].weight[:, 1])
    assert torch.isfinite(new[0].weight).all() and torch.isfinite(new[2].weight).all()
    assert max_output_change(model, new, X) < 1e-12


def test_normalize_features_evaluates_with_dropout_off(digits_data):
    model = _model("dropout").double().train()
    X, y = digits_data
    s1 = feature_std(model, "3", (X, y))
    s2 = feature_std(model, "3", (X, y))
    assert torch.equal(s1, s2)  # deterministic: dropout off
    model.eval()
    assert torch.equal(feature_std(model, "3", (X, y)), s1)


# ---------------------------------------------------------------------- the caller's model


def _all_calls():
    X = torch.randn(30, 64, generator=torch.Generator().manual_seed(0))
    data = (X, torch.zeros(30, dtype=torch.long))
    other = mlp([64, 32, 16, 10], seed=9)  # built here: nn.Linear() itself uses the global RNG
    return [
        lambda m: scale_layers(m, "0", "2", 3.0),
        lambda m: scale_neurons(m, "0", "2", torch.full((32,), 2.0)),
        lambda m: shift_logits(m, "4", torch.ones(16), bias_shift=1.0),
        lambda m: normalize_features(m, "2", data),
        lambda m: feature_std(m, "2", data),
        lambda m: max_output_change(m, other, X),
    ]


@pytest.mark.parametrize("call", range(6))
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
@pytest.mark.parametrize("frozen", [False, True])
def test_caller_model_untouched(call, mode, frozen):
    model = mlp([64, 32, 16, 10], seed=0)
    if mode == "train":
        model.train()
    elif mode == "eval":
        model.eval()
    else:
        model.train()
        model[1].eval()
        model[2].eval()
    if frozen:
        model[0].bias.requires_grad_(False)
        model[4].weight.requires_grad_(False)
    fn = _all_calls()[call]
    snap = _snapshot(model)
    rng = torch.random.get_rng_state()
    result = fn(model)
    _assert_untouched(model, snap)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG was not used
    if isinstance(result, nn.Module):
        assert result is not model
        # the new model keeps modes and requires_grad flags, and has no grads
        assert [(n, m.training) for n, m in result.named_modules()] == snap["training"]
        flags = [(n, p.requires_grad) for n, p in result.named_parameters()]
        assert flags == snap["requires_grad"]
        assert all(p.grad is None for p in result.parameters())
        # and shares no storage with the caller's model
        ptrs = {p.data_ptr() for p in model.parameters()}
        assert not any(p.data_ptr() in ptrs for p in result.parameters())


def test_existing_grads_are_left_alone_and_not_copied():
    model = mlp([64, 32, 16, 10], seed=0)
    X = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    model(X).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    new = scale_layers(model, "0", "2", 2.0)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])
    assert all(p.grad is None for p in new.parameters())


def test_max_output_change_restores_modes_and_accepts_data_forms():
    model = _model("dropout").train()
    model[2].eval()
    other = scale_layers(model, "0", "3", 4.0)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 64, generator=gen)
    y = torch.zeros(40, dtype=torch.long)
    modes = [m.training for m in model.modules()]
    value = max_output_change(model, other, X)  # dropout off: deterministic, tiny
    assert value < 1e-5
    assert [m.training for m in model.modules()] == modes
    assert [m.training for m in other.modules()] == modes
    assert max_output_change(model, other, (X, y)) == value
    batches = [(X[:15], y[:15]), (X[15:], y[15:])]
    assert max_output_change(model, other, batches) == value
    assert max_output_change(model, other, X.numpy()) == value
    assert max_output_change(model, other, X.double()) == value  # cast to the model's dtype
    # float64 model vs float32 model
    assert max_output_change(model.double(), other, X) < 1e-5


def test_max_output_change_detects_change_and_nan():
    model = mlp([4, 8, 3], seed=0)
    other = mlp([4, 8, 3], seed=1)
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (model(X) - other(X)).abs().max().item()
    assert max_output_change(model, other, X) == pytest.approx(expected, rel=1e-6)
    bad = mlp([4, 8, 3], seed=0)
    with torch.no_grad():
        bad[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match="model_b's output contains NaN"):
        max_output_change(model, bad, X)
    with pytest.raises(ValueError, match="shape"):
        max_output_change(model, mlp([4, 8, 2], seed=0), X)
    with pytest.raises(ValueError, match="empty"):
        max_output_change(model, other, X[:0])


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        scale_layers(mlp([4, 8, 3]), "0", "2", alpha)


@pytest.mark.parametrize("alpha", ["2", None, True, torch.ones(2), 1j])
def test_alpha_of_wrong_type(alpha):
    with pytest.raises(TypeError, match="alpha must be a real number"):
        scale_layers(mlp([4, 8, 3]), "0", "2", alpha)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: scale_layers(m, "fc9", "2", 2.0),
        lambda m: scale_layers(m, "0", "7", 2.0),
        lambda m: scale_neurons(m, "x", "2", [1.0] * 8),
        lambda m: shift_logits(m, "5", torch.ones(8)),
        lambda m: normalize_features(m, "99", (torch.ones(3, 4), torch.zeros(3))),
        lambda m: feature_std(m, "99", (torch.ones(3, 4), torch.zeros(3))),
    ],
)
def test_unknown_layer_lists_valid_names(call):
    model = mlp([4, 8, 8, 3])
    with pytest.raises(ValueError, match=r"unknown layer .*\['0', '2', '4'\]"):
        call(model)


def test_layer_given_by_position_is_refused():
    with pytest.raises(TypeError, match="module name"):
        scale_layers(mlp([4, 8, 3]), 0, 2, 2.0)


def test_not_consecutive():
    model = mlp([4, 8, 8, 3])
    with pytest.raises(ValueError, match=r"not consecutive.*'2' \(Linear\)"):
        scale_layers(model, "0", "4", 2.0)
    with pytest.raises(ValueError, match="not consecutive"):
        scale_neurons(model, "0", "4", [1.0] * 8)
    with pytest.raises(ValueError, match="not consecutive"):  # wrong order
        scale_layers(model, "2", "0", 2.0)
    with pytest.raises(ValueError, match="two different layers"):
        scale_layers(model, "2", "2", 2.0)


@pytest.mark.parametrize("activation,name", [("tanh", "Tanh"), ("sigmoid", "Sigmoid"),
                                             ("gelu", "GELU")])
def test_non_homogeneous_activation_between(activation, name):
    model = mlp([4, 8, 3], activation=activation)
    with pytest.raises(ValueError, match=f"not consecutive.*{name}"):
        scale_layers(model, "0", "2", 2.0)
    with pytest.raises(ValueError, match=name):
        scale_neurons(model, "0", "2", [1.0] * 8)
    with pytest.raises(ValueError, match=name):
        normalize_features(model, "2", (torch.ones(3, 4), torch.zeros(3)))


def test_batchnorm_between_is_refused():
    model = nn.Sequential(_linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), _linear(8, 3))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        scale_layers(model, "0", "3", 2.0)


def test_identity_activation_is_fine():
    model = mlp([4, 8, 3], activation="identity", seed=0).double()
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert max_output_change(model, scale_layers(model, "0", "2", 9.0), X) < 1e-12


def test_non_linear_layer():
    model = cnn()
    valid = r"\['conv1', 'conv2', 'fc1', 'fc2'\]"
    with pytest.raises(ValueError, match=r"'pool' is MaxPool2d.*" + valid):
        scale_layers(model, "pool", "fc1", 2.0)
    with pytest.raises(ValueError, match="not consecutive.*'conv2' \\(Conv2d\\)"):
        scale_layers(model, "conv1", "fc1", 2.0)
    with pytest.raises(ValueError, match="Conv2d fed by the Linear layer 'fc1'"):
        scale_neurons(model, "fc1", "conv2", [1.0] * 64)
    with pytest.raises(ValueError, match="Conv2d"):  # fc1's input comes from a conv
        normalize_features(model, "fc1", (torch.ones(3, 64), torch.zeros(3)))


def test_output_used_elsewhere_is_refused():
    with pytest.raises(ValueError, match="used by 2 operations"):
        scale_layers(Residual(), "fc1", "fc2", 2.0)


def test_shared_layer_is_refused():
    with pytest.raises(ValueError, match="called 2 times"):
        scale_layers(Shared(), "fc1", "fc2", 2.0)


def test_tied_weights_are_refused():
    model = mlp([4, 4, 4, 3])
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match="shared"):
        scale_layers(model, "0", "2", 2.0)


def test_untraceable_model():
    with pytest.raises(ValueError, match="could not trace.*nn.Sequential"):
        scale_layers(Untraceable(), "fc1", "fc2", 2.0)


@pytest.mark.parametrize(
    "scales,match",
    [
        ([1.0] * 7, r"shape \(7,\).*\(8,\)"),
        ([1.0] * 9, r"shape \(9,\)"),
        ([[1.0] * 8], r"shape \(1, 8\)"),
        ([1.0] * 7 + [0.0], "> 0"),
        ([1.0] * 7 + [-2.0], "> 0"),
        ([1.0] * 7 + [float("nan")], "NaN or inf"),
        ([1.0] * 7 + [float("inf")], "NaN or inf"),
    ],
)
def test_bad_scales(scales, match):
    with pytest.raises(ValueError, match=match):
        scale_neurons(mlp([4, 8, 3]), "0", "2", scales)


def test_shift_logits_on_hidden_layer():
    with pytest.raises(ValueError, match=r"not the model's output layer.*output layer is '4'"):
        shift_logits(mlp([4, 8, 8, 3]), "2", torch.ones(8))
    with pytest.raises(ValueError, match="not the model's output layer"):
        shift_logits(LogSoftmaxNet(), "fc2", torch.ones(8))


@pytest.mark.parametrize("v", [torch.ones(7), torch.ones(9), torch.ones(3, 8), [1.0] * 3])
def test_shift_logits_bad_v(v):
    with pytest.raises(ValueError, match=r"v has shape .*\(8,\)"):
        shift_logits(mlp([4, 8, 3]), "2", v)


def test_shift_logits_bad_bias_shift():
    with pytest.raises(ValueError, match="bias_shift must be finite"):
        shift_logits(mlp([4, 8, 3]), "2", torch.ones(8), bias_shift=float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        shift_logits(mlp([4, 8, 3]), "2", [float("inf")] + [0.0] * 7)


def test_normalize_features_needs_a_linear_below():
    with pytest.raises(ValueError, match="does not come from a Linear layer"):
        normalize_features(mlp([4, 8, 3]), "0", (torch.ones(3, 4), torch.zeros(3)))


def test_normalize_features_bad_data():
    model = mlp([4, 8, 3])
    with pytest.raises(ValueError, match="NaN or inf"):
        normalize_features(model, "2", (torch.full((3, 4), float("nan")), torch.zeros(3)))
    with pytest.raises(ValueError, match="empty"):
        normalize_features(model, "2", [])


# --------------------------------------------------------------------------- property tests


@st.composite
def _mlp_case(draw):
    widths = draw(st.lists(st.integers(1, 6), min_size=3, max_size=5))
    activation = draw(st.sampled_from(["relu", "leaky_relu", "identity"]))
    bias = draw(st.booleans())
    pair = draw(st.integers(0, len(widths) - 3))
    seed = draw(st.integers(0, 2**16))
    return widths, activation, bias, pair, seed


@settings(max_examples=25, deadline=None)
@given(case=_mlp_case(), alpha=st.floats(1e-2, 1e2), log_scales=st.lists(
    st.floats(-3.0, 3.0), min_size=6, max_size=6))
def test_property_reparams_preserve_function(case, alpha, log_scales):
    widths, activation, bias, pair, seed = case
    model = mlp(widths, activation=activation, bias=bias, seed=seed).double()
    first, second = str(2 * pair), str(2 * pair + 2)
    X = torch.randn(32, widths[0], generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    with torch.no_grad():
        scale = model(X).abs().max().item() + 1e-300
    new = scale_layers(model, first, second, alpha)
    assert max_output_change(model, new, X) <= REL_TOL * max(scale, 1e-3)
    n = widths[pair + 1]
    scales = torch.tensor(log_scales[:n], dtype=torch.float64).exp()
    new = scale_neurons(model, first, second, scales)
    assert max_output_change(model, new, X) <= REL_TOL * max(scale, 1e-3)


def test_module_exports():
    for name in reparam.__all__:
        assert hasattr(reparam, name)
    assert MIN_FEATURE_STD > 0


# ------------------------------------------------------------------------- Conv2d channels


def _digits64(n=20):
    return torch.rand(n, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_conv_channels_to_conv_through_relu_and_pooling():
    model = cnn(channels=(3, 4), hidden=6, num_classes=5, seed=1).double()
    c = torch.tensor([2.0, 0.5, 7.0], dtype=torch.float64)
    new = scale_neurons(model, "conv1", "conv2", c)
    assert max_output_change(model, new, _digits64()) < 1e-12
    torch.testing.assert_close(new.conv1.weight, model.conv1.weight * c[:, None, None, None])
    torch.testing.assert_close(new.conv1.bias, model.conv1.bias * c)
    torch.testing.assert_close(new.conv2.weight, model.conv2.weight / c[None, :, None, None])
    torch.testing.assert_close(new.conv2.bias, model.conv2.bias)
    # a non-uniform factor that is not compensated changes the function: the check can fail
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.conv1.weight.mul_(c[:, None, None, None])
    assert max_output_change(model, broken, _digits64()) > 1e-3


def test_conv_channels_to_a_flattened_linear():
    model = cnn(channels=(3, 4), hidden=6, num_classes=5, seed=2).double()  # conv2: 4 x 4 x 4
    c = torch.tensor([3.0, 0.25, 1.0, 9.0], dtype=torch.float64)
    new = scale_neurons(model, "conv2", "fc1", c)
    assert max_output_change(model, new, _digits64()) < 1e-12
    torch.testing.assert_close(new.fc1.weight, model.fc1.weight / c.repeat_interleave(16))


def test_conv_layerwise():
    model = cnn(channels=(3, 4), hidden=6, num_classes=5, seed=3).double()
    for first, second in (("conv1", "conv2"), ("conv2", "fc1")):
        new = scale_layers(model, first, second, 5.0)
        assert max_output_change(model, new, _digits64()) < 1e-12
        torch.testing.assert_close(new.get_submodule(second).weight,
                                   model.get_submodule(second).weight / 5.0)


class _ConvThen(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(16 if how == "flatten 2" else 48, 2)

    def forward(self, x):
        z = self.conv(x)
        if self.how == "flatten 2":  # (N, 3, 16): positions of a Linear, not channels
            return self.fc(torch.relu(z).flatten(2)).sum(1)
        if self.how == "batchnorm":
            return self.fc(torch.relu(self.bn(z)).flatten(1))
        return self.fc(torch.relu(z).flatten(1))


@pytest.mark.parametrize("how, fragment", [
    ("flatten 2", "one\\s+flatten from axis 1"),
    ("batchnorm", "BatchNorm2d"),
])
def test_conv_rescalings_refused(how, fragment):
    model = _ConvThen(how).double()
    model(torch.zeros(1, 2, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=fragment):
        scale_neurons(model, "conv", "fc", [1.0, 2.0, 3.0])


def test_grouped_conv_and_linear_to_conv_refused():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="groups=2"):
        scale_neurons(model, "0", "2", [1.0] * 4)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Unflatten(1, (2, 2, 2)),
                          nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="Conv2d fed by the Linear"):
        scale_layers(model, "0", "3", 2.0)


def test_max_output_change_compares_probabilities_under_a_logit_shift():
    model = mlp([4, 8, 3], seed=0)
    shifted = shift_logits(model, "2", torch.ones(8), bias_shift=2.5)
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    assert max_output_change(model, shifted, X) > 1.0  # every logit moved
    assert max_output_change(model, shifted, X, compare="probabilities") < 1e-6
    with pytest.raises(ValueError, match="unknown compare"):
        max_output_change(model, shifted, X, compare="logits")
