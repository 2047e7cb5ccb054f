"""Bad input, table-driven: every public function x every class of bad input gives a famviz
error (TypeError / ValueError) whose message names what was wrong, raised before any long work;
and after every call, failed or not, the caller's model (state_dict bitwise, grads,
requires_grad, train/eval flags, hooks) and torch's global RNG are exactly as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import famviz as fv
from famviz import fam, oracles, reparam
from famviz import landscape as L

from helpers import assert_same_state, model_state

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
X, Y = _X[:24].double(), _Y[:24]


def good_model() -> nn.Module:
    return fv.models.mlp([64, 6, 10], seed=0).double()


def _direction(model):
    return L.random_direction(model, seed=0)


# every public function that takes (model, data, ...), with the options it accepts
FUNCTIONS = {
    "relative_flatness": (lambda m, d, **k: fv.relative_flatness(m, d, "2", **k),
                          {"seed", "dtype", "loss", "bn"}),
    "hessian_trace": (lambda m, d, **k: fv.hessian_trace(m, d, **k), {"seed", "dtype", "loss", "bn"}),
    "hessian_top_eigenvalue": (lambda m, d, **k: fv.hessian_top_eigenvalue(m, d, **k),
                               {"seed", "dtype", "loss", "bn"}),
    "hessian_frobenius": (lambda m, d, **k: fv.hessian_frobenius(m, d, **k),
                          {"seed", "dtype", "loss", "bn"}),
    "eps_sharpness": (lambda m, d, **k: fv.eps_sharpness(m, d, **k), {"seed", "dtype", "loss", "bn"}),
    "adaptive_sharpness": (lambda m, d, **k: fv.adaptive_sharpness(m, d, **k),
                           {"seed", "dtype", "loss", "bn"}),
    "average_flatness": (lambda m, d, **k: fv.average_flatness(m, d, **k),
                         {"seed", "dtype", "loss", "bn"}),
    "worst_case_flatness": (lambda m, d, **k: fv.worst_case_flatness(m, d, **k),
                            {"seed", "dtype", "loss", "bn"}),
    "pac_bayes_flatness": (lambda m, d, **k: fv.pac_bayes_flatness(m, d, **k),
                           {"seed", "dtype", "loss", "bn"}),
    "fisher_rao_norm": (lambda m, d, **k: fv.fisher_rao_norm(m, d, **k),
                        {"seed", "dtype", "loss", "bn"}),
    "basin_volume": (lambda m, d, **k: fv.basin_volume(m, d, **k), {"seed", "dtype", "loss", "bn"}),
    "measure_all": (lambda m, d, **k: fv.measure_all(m, d, measures=["fisher_rao_norm"], **k),
                    {"seed", "dtype", "loss", "bn"}),
    "Objective": (lambda m, d, **k: fv.Objective(m, d, **k), {"dtype", "loss", "bn"}),
    "hessian_directions": (lambda m, d, **k: L.hessian_directions(m, d, **k),
                           {"seed", "dtype", "loss", "bn"}),
    "slice_1d": (lambda m, d, **k: L.slice_1d(m, d, _direction(m), steps=3, **k),
                 {"dtype", "loss", "bn"}),
    "slice_2d": (lambda m, d, **k: L.slice_2d(m, d, _direction(m), _direction(m),
                                             steps=3, **k),
                 {"dtype", "loss", "bn"}),
    "fam.penalty": (lambda m, d, **k: fam.penalty(m, d, "2", **k), {"loss"}),
    "reparam.normalize_features": (lambda m, d, **k: reparam.normalize_features(m, "2", d), set()),
    "reparam.feature_std": (lambda m, d, **k: reparam.feature_std(m, "2", d), set()),
    "oracles.dense_hessian": (lambda m, d, **k: oracles.dense_hessian(m, d, params="2", **k),
                              {"dtype", "loss"}),
}

# functions of a model alone
MODEL_ONLY = {
    "random_direction": lambda m, **k: L.random_direction(m, **k),
    "reparam.scale_layers": lambda m, **k: reparam.scale_layers(m, "0", "2", 2.0),
    "reparam.consecutive_pairs": lambda m, **k: reparam.consecutive_pairs(m),
    "reparam.max_output_change": lambda m, **k: reparam.max_output_change(m, good_model(), X),
}


class NoParameters(nn.Module):
    def forward(self, x):
        return x[:, :10]


def _meta_model():
    with torch.device("meta"):
        return fv.models.mlp([64, 6, 10])


def _nan_weight():
    m = good_model()
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    return m


def _nan_buffer():
    m = nn.Sequential(nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 10)).double()
    m[1].running_mean[0] = float("nan")
    m.eval()
    return m


# (factory, exception, message fragment); the fragment names what was wrong
BAD_MODELS = {
    "None": (lambda: None, TypeError, "must be a torch.nn.Module"),
    "a function": (lambda: (lambda x: x), TypeError, "must be a torch.nn.Module"),
    "no parameters": (NoParameters, ValueError, "no parameters"),
    "meta tensors": (_meta_model, ValueError, "meta device"),
    "NaN weight": (_nan_weight, ValueError, "NaN"),
}
# the NaN-buffer model has another layer "2": run only on functions that do not name layers
BUFFER_NAN = (_nan_buffer, ValueError, "buffer '1.running_mean' contains NaN")


def _exhausted():
    gen = iter([(X, Y)])
    list(gen)
    return gen


BAD_DATA = {
    "None": (lambda: None, TypeError, "data must be"),
    "an int": (lambda: 3, TypeError, "data must be"),
    "empty": (lambda: (X[:0], Y[:0]), ValueError, "data is empty"),
    "lengths differ": (lambda: (X, Y[:5]), ValueError, "same number of samples"),
    "NaN in X": (lambda: (X * float("nan"), Y), ValueError, "X contains NaN"),
    "wrong width": (lambda: (X[:, :10], Y), ValueError, "cannot evaluate inputs X of shape (10,)"),
    "labels out of range": (lambda: (X, Y + 20), ValueError, "targets y range over"),
    "exhausted iterator": (_exhausted, ValueError, "iterator"),
}

BAD_OPTIONS = {
    "seed=-1": ({"seed": -1}, ValueError, "seed must be in [0, 2**64)"),
    "seed=2**64": ({"seed": 2**64}, ValueError, "seed must be in [0, 2**64)"),
    "seed=1.5": ({"seed": 1.5}, TypeError, "seed must be an integer"),
    "seed=True": ({"seed": True}, TypeError, "seed must be an integer"),
    "dtype=float16": ({"dtype": torch.float16}, ValueError, "dtype=torch.float16"),
    "dtype='banana'": ({"dtype": "banana"}, ValueError, "unknown dtype 'banana'"),
    "dtype=int64": ({"dtype": torch.int64}, ValueError, "dtype must be torch.float32 or"),
    "loss='banana'": ({"loss": "banana"}, ValueError, "unknown loss 'banana'"),
    "bn='banana'": ({"bn": "banana"}, ValueError, "unknown bn 'banana'"),
}


def _expect_clean_failure(call, model, exc, fragment):
    """``call()`` raises ``exc`` mentioning ``fragment``; the model and the RNG are untouched."""
    before = model_state(model) if isinstance(model, nn.Module) and not _is_meta(model) else None
    rng = torch.get_rng_state()
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), str(info.value)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG moved"
    if before is not None:
        after = model_state(model)
        _assert_same_allowing_nan(before, after)


def _is_meta(model):
    return any(p.is_meta for p in model.parameters())


def _assert_same_allowing_nan(before, after):
    """Bitwise equality where NaN == NaN (the NaN models keep their NaN)."""
    for k in before["state"]:
        a, b = before["state"][k], after["state"][k]
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), k
        assert torch.equal(a.isnan(), b.isnan()), k
    for key in ("modes", "requires_grad", "hooks"):
        assert before[key] == after[key], key


#: functions that look a layer up by name: a model without parameters has no such layer
NAME_A_LAYER = {"relative_flatness", "fam.penalty", "reparam.normalize_features",
                "reparam.feature_std"}


@pytest.mark.parametrize("case", list(BAD_MODELS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_bad_model(name, case):
    call, _ = FUNCTIONS[name]
    factory, exc, fragment = BAD_MODELS[case]
    if case == "no parameters" and name in NAME_A_LAYER:
        kinds = "Linear/Conv2d" if name in ("relative_flatness", "fam.penalty") else "Linear"
        fragment = f"unknown layer '2'; {kinds} layers of this model: []"
    if case == "NaN weight" and name == "fam.penalty":
        pytest.skip("the penalty is a training-step tensor: like the loss, it follows the "
                    "weights (checking them would cost a host sync per step)")
    model = factory()
    _expect_clean_failure(lambda: call(model, (X, Y)), model, exc, fragment)


@pytest.mark.parametrize("case", [c for c in BAD_MODELS if c != "NaN weight"])
@pytest.mark.parametrize("name", list(MODEL_ONLY))
def test_bad_model_alone(name, case):
    factory, exc, fragment = BAD_MODELS[case]
    if case == "no parameters" and name != "random_direction":
        pytest.skip("a parameter-free model is a valid argument here (its layers are looked up "
                    "by name, or it is simply evaluated)")
    model = factory()
    _expect_clean_failure(lambda: MODEL_ONLY[name](model), model, exc,
                          "unknown layer" if case == "no parameters" and name != "random_direction"
                          else fragment)


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if n not in {
    "relative_flatness", "fam.penalty", "reparam.normalize_features", "reparam.feature_std",
    "oracles.dense_hessian"}])
def test_nan_buffer(name):
    call, _ = FUNCTIONS[name]
    factory, exc, fragment = BUFFER_NAN
    model = factory()
    _expect_clean_failure(lambda: call(model, (X, Y)), model, exc, fragment)


@pytest.mark.parametrize("case", list(BAD_DATA))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_bad_data(name, case):
    call, _ = FUNCTIONS[name]
    factory, exc, fragment = BAD_DATA[case]
    if name.startswith("reparam.") and case == "labels out of range":
        pytest.skip("feature statistics do not use the targets")
    model = good_model()
    _expect_clean_failure(lambda: call(model, factory()), model, exc, fragment)


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_bad_option(name, case):
    call, accepted = FUNCTIONS[name]
    kwargs, exc, fragment = BAD_OPTIONS[case]
    if not set(kwargs) <= accepted:
        pytest.skip(f"{name} takes no {set(kwargs)}")
    model = good_model()
    _expect_clean_failure(lambda: call(model, (X, Y), **kwargs), model, exc, fragment)


@pytest.mark.parametrize("case", [c for c in BAD_OPTIONS if c.startswith("seed")])
def test_bad_seed_for_directions(case):
    kwargs, exc, fragment = BAD_OPTIONS[case]
    model = good_model()
    _expect_clean_failure(lambda: L.random_direction(model, **kwargs), model, exc, fragment)


@pytest.mark.parametrize("call, exc, fragment", [
    (lambda m: fv.hessian_trace(m, (X, Y), method="hutchinson", probes=2.5), TypeError,
     "probes must be an integer"),
    (lambda m: fv.hessian_trace(m, (X, Y), method="hutchinson", probes=0), ValueError,
     "probes must be at least 1"),
    (lambda m: fv.relative_flatness(m, (X, Y), "2", method="hutchinson", probes=1.0), TypeError,
     "probes must be an integer"),
    (lambda m: fv.hessian_frobenius(m, (X, Y), method="hutchinson", probes=1), ValueError,
     "probes must be at least 2"),
    (lambda m: fv.relative_flatness(m, (X, Y), 2), TypeError, "layer must be a module name"),
    (lambda m: fv.relative_flatness(m, (X, Y), "9"), ValueError, "unknown layer '9'"),
    (lambda m: fv.relative_flatness(m, (X, Y), "1"), ValueError, "layer '1' is ReLU"),
    (lambda m: fv.measure_all(m, (X, Y), options={"eps_sharpness": {"epz": 1.0}}), ValueError,
     "options['eps_sharpness'] has keywords ['epz']"),
    (lambda m: fv.measure_all(m, (X, Y), options={"eps_sharpness": 1.0}), TypeError,
     "options['eps_sharpness'] must be a dict"),
    (lambda m: fv.hessian_trace(m, (X, Y), params="nope"), ValueError,
     "unknown parameter or layer 'nope'"),
])
def test_bad_arguments(call, exc, fragment):
    model = good_model()
    _expect_clean_failure(lambda: call(model), model, exc, fragment)


def test_bn_train_with_a_one_sample_batch_is_refused_up_front():
    model = nn.Sequential(nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 10)).double()
    data = [(X[:23], Y[:23]), (X[23:], Y[23:])]
    _expect_clean_failure(lambda: fv.hessian_trace(model, data, bn="train"), model, ValueError,
                          "batch 1 of data holds a single sample")


def test_weight_norm_layer_is_refused_with_the_fix():
    model = good_model()
    model[2] = nn.utils.weight_norm(model[2])
    _expect_clean_failure(lambda: fv.relative_flatness(model, (X, Y), "2"), model, ValueError,
                          "computed, not a parameter")
    # the other measures work on such a model (its parameters are weight_g and weight_v)
    assert float(fv.hessian_trace(model, (X, Y))) > 0


@pytest.mark.parametrize("labels", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_dtype_are_class_indices(labels):
    model = good_model()
    ref = fv.hessian_trace(model, (X, Y)).value
    assert fv.hessian_trace(model, (X, Y.to(labels))).value == ref
    assert fv.eps_sharpness(model, (X, Y.to(labels)), seed=0).value == \
        fv.eps_sharpness(model, (X, Y), seed=0).value


def test_bool_labels_are_classes_zero_and_one():
    model = fv.models.mlp([64, 6, 2], seed=0).double()
    b = Y > 4
    assert fv.hessian_trace(model, (X, b)).value == fv.hessian_trace(model, (X, b.long())).value


def test_dtype_may_be_given_by_name():
    model = good_model().float()
    r = fv.hessian_trace(model, (X.float(), Y), dtype="float64")
    assert r.objective.dtype == "float64"
    assert r.value == fv.hessian_trace(model, (X.float(), Y), dtype=torch.float64).value


def test_same_state_helper_still_strict():
    """The NaN-tolerant comparison above must still see a changed weight."""
    a = good_model()
    before = model_state(a)
    with torch.no_grad():
        a[0].weight[0, 0] += 1
    with pytest.raises(AssertionError):
        _assert_same_allowing_nan(before, model_state(a))
    assert_same_state(before, before)


@pytest.mark.parametrize("labels", [torch.int32, torch.uint8])
def test_penalty_takes_integer_labels_of_any_dtype(labels):
    model = good_model()
    assert float(fam.penalty(model, (X, Y.to(labels)), "2")) == \
        float(fam.penalty(model, (X, Y), "2"))


def test_train_checks_test_data_and_labels_before_the_first_epoch():
    model = good_model()
    with pytest.raises(ValueError, match=r"test_data: the model cannot evaluate inputs of shape"):
        fam.train(model, (X, Y), (X[:, :10], Y), epochs=50, progress=False)
    _, h = fam.train(model, (X, Y.int()), epochs=1, seed=0, progress=False)
    _, ref = fam.train(model, (X, Y), epochs=1, seed=0, progress=False)
    assert h.train_loss == ref.train_loss


def test_train_refuses_a_last_batchnorm_batch_of_one_sample():
    model = nn.Sequential(nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 10)).double()
    with pytest.raises(ValueError, match="batch of one sample"):
        fam.train(model, (X[:17], Y[:17]), batch_size=8, epochs=1, progress=False)
