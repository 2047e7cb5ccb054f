"""The measures' contract: worst case >= average case on the same neighbourhood, seeds,
untouched caller state and global RNG, clear errors on bad input, the measure_all table and its
bar chart."""

import json
import math

import pytest
import torch
from torch import nn

import famviz as fv
from famviz.measures import (
    MEASURES,
    MeasureTable,
    adaptive_sharpness,
    average_flatness,
    basin_volume,
    eps_sharpness,
    fisher_rao_norm,
    measure_all,
    pac_bayes_flatness,
    worst_case_flatness,
)

from helpers import assert_call_leaves_caller_alone, tiny_mlp

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
DATA = (_X[:80].double(), _Y[:80] % 4)

#: cheap settings per measure function (keyword arguments)
CHEAP = {
    eps_sharpness: {"steps": 3, "restarts": 2},
    adaptive_sharpness: {"steps": 3, "restarts": 2},
    average_flatness: {"samples": 3},
    worst_case_flatness: {"steps": 3, "restarts": 2},
    pac_bayes_flatness: {"samples": 2, "steps": 3, "criterion": "loss"},
    fisher_rao_norm: {},
    basin_volume: {"samples": 2, "steps": 3},
}
CHEAP_TABLE = {
    "hessian_top_eigenvalue": {"max_iter": 10},
    "eps_sharpness": {"steps": 3},
    "adaptive_sharpness": {"steps": 3},
    "adaptive_sharpness_average": {"samples": 3},
    "average_flatness": {"samples": 3},
    "worst_case_flatness": {"steps": 3, "restarts": 2},
    "pac_bayes_flatness": {"samples": 2, "steps": 3, "criterion": "loss"},
    "basin_volume": {"samples": 2, "steps": 3},
}


def net(seed=0):
    return tiny_mlp([64, 8, 4], seed=seed)


# ------------------------------------------------------------------------ worst >= average


@pytest.mark.parametrize("seed", [0, 1])
def test_worst_case_at_least_average_case_on_the_same_neighbourhood(seed):
    model = net(seed)
    for rho in (0.05, 0.5):
        worst = adaptive_sharpness(model, DATA, rho=rho, steps=10)
        avg = adaptive_sharpness(model, DATA, rho=rho, kind="average", samples=5, seed=seed)
        assert float(worst) >= float(avg) and float(worst) > 0
    for xi in (0.01, 0.3):
        worst = worst_case_flatness(model, DATA, xi=xi, steps=10, restarts=2, seed=seed)
        avg = average_flatness(model, DATA, xi=xi, samples=5, seed=seed)
        assert float(worst) >= float(avg) and float(worst) > 0
        assert worst.loss_perturbed >= avg.loss_perturbed


def test_more_restarts_never_lower_the_worst_case():
    model = net(2)
    one = worst_case_flatness(model, DATA, xi=0.05, steps=4, restarts=1)
    three = worst_case_flatness(model, DATA, xi=0.05, steps=4, restarts=3, seed=0)
    assert float(three) >= float(one) and one.seed is None and three.seed == 0


def test_adversarial_variant_measures_the_robust_loss():
    model = net(3)
    clean = average_flatness(model, DATA, xi=0.1, samples=2, seed=0)
    robust = average_flatness(model, DATA, xi=0.1, samples=2, seed=0, adversarial=True,
                              adv_eps=0.1, adv_steps=3)
    assert robust.loss_at_centre > clean.loss_at_centre
    assert robust.parameters["adv_step_size"] == pytest.approx(2.5 * 0.1 / 3)
    # each evaluation runs the adversary's 3 forward/backward passes first
    assert robust.cost.forward == 4 * (1 + 2 * 2) and robust.cost.backward == 3 * (1 + 2 * 2)
    zero = average_flatness(model, DATA, xi=0.1, samples=2, seed=0, adversarial=True,
                            adv_eps=0.0, adv_steps=2)
    assert float(zero) == pytest.approx(float(clean), rel=1e-12)


# ------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("func", list(CHEAP), ids=lambda f: f.__name__)
def test_reproducible_with_a_seed(func):
    model = net(4)
    kw = CHEAP[func]
    a, b = func(model, DATA, seed=7, **kw), func(model, DATA, seed=7, **kw)
    assert float(a) == float(b)
    fresh = func(model, DATA, **kw)
    if fresh.seed is not None:  # something was random: the recorded seed replays it
        assert isinstance(fresh.seed, int)
        assert float(func(model, DATA, seed=fresh.seed, **kw)) == float(fresh)


def test_different_seeds_differ():
    model = net(4)
    a = average_flatness(model, DATA, xi=0.3, samples=3, seed=1)
    b = average_flatness(model, DATA, xi=0.3, samples=3, seed=2)
    assert float(a) != float(b) and a.seed == 1 and b.seed == 2


def test_batches_give_the_same_answer_as_one_batch():
    model = net(5)
    X, y = DATA
    batches = [(X[:30], y[:30]), (X[30:], y[30:])]
    for func in (eps_sharpness, worst_case_flatness, pac_bayes_flatness, fisher_rao_norm):
        kw = CHEAP[func]
        one, two = func(model, DATA, seed=3, **kw), func(model, batches, seed=3, **kw)
        assert float(one) == pytest.approx(float(two), rel=1e-10), func.__name__


def test_float32_model_runs_in_its_own_dtype():
    model = fv.models.mlp([64, 8, 4], seed=0)
    r = average_flatness(model, (DATA[0].float(), DATA[1]), samples=2, seed=0)
    assert r.objective.dtype == "float32" and math.isfinite(float(r))


# ---------------------------------------------------------------------- untouched state


def stateful_model():
    """BatchNorm buffers, train mode, a frozen parameter and leftover gradients."""
    model = nn.Sequential()
    model.add_module("fc0", nn.Linear(64, 8))
    model.add_module("bn", nn.BatchNorm1d(8))
    model.add_module("act0", nn.ReLU())
    model.add_module("fc1", nn.Linear(8, 6))
    model.add_module("act1", nn.ReLU())
    model.add_module("fc2", nn.Linear(6, 4))
    model = model.double().train()
    model.fc0.bias.requires_grad_(False)
    torch.nn.functional.cross_entropy(model(DATA[0]), DATA[1]).backward()
    return model


CALLS = {f.__name__: (lambda f: lambda m, d: f(m, d, **CHEAP[f]))(f) for f in CHEAP}
CALLS["average_flatness/adversarial"] = lambda m, d: average_flatness(
    m, d, samples=1, adversarial=True, adv_steps=2)
CALLS["adaptive_sharpness/average"] = lambda m, d: adaptive_sharpness(
    m, d, kind="average", samples=2)
CALLS["pac_bayes_flatness/error"] = lambda m, d: pac_bayes_flatness(m, d, samples=1, steps=2)
CALLS["fisher_rao_norm/logits"] = lambda m, d: fisher_rao_norm(m, d, method="logits")
CALLS["measure_all"] = lambda m, d: measure_all(m, d, options=CHEAP_TABLE)


@pytest.mark.parametrize("name", list(CALLS))
def test_caller_state_and_global_rng_untouched(name):
    assert_call_leaves_caller_alone(CALLS[name], stateful_model(), DATA)


def test_normalization_layers_are_not_perturbed_by_stutz():
    model = stateful_model()
    r = average_flatness(model, DATA, samples=1, seed=0)
    assert "bn.weight" not in r.params and "fc0.weight" in r.params
    assert "bn.weight" in eps_sharpness(model, DATA, steps=1).params
    chosen = average_flatness(model, DATA, samples=1, seed=0, params=["bn", "fc2"])
    assert chosen.params == ("bn.weight", "bn.bias", "fc2.weight", "fc2.bias")
    assert set(chosen.invariance.values()) == {"not declared"}


# ----------------------------------------------------------------------------- bad input


NEGATIVE = [
    (eps_sharpness, "eps"), (adaptive_sharpness, "rho"), (adaptive_sharpness, "eta"),
    (average_flatness, "xi"), (worst_case_flatness, "xi"), (average_flatness, "adv_eps"),
]


@pytest.mark.parametrize("func,arg", NEGATIVE, ids=lambda x: getattr(x, "__name__", x))
def test_negative_radii_are_refused(func, arg):
    kw = {arg: -0.1}
    if arg == "adv_eps":
        kw["adversarial"] = True
    with pytest.raises(ValueError, match=rf"{arg} is a radius and must be >= 0, got -0.1"):
        func(net(), DATA, **kw)


@pytest.mark.parametrize("func,kw,match", [
    (average_flatness, {"samples": 0}, "samples must be at least 1"),
    (adaptive_sharpness, {"kind": "average", "samples": 0}, "samples must be at least 1"),
    (pac_bayes_flatness, {"samples": 0}, "samples must be at least 1"),
    (basin_volume, {"samples": 0}, "samples must be at least 1"),
    (eps_sharpness, {"steps": 0}, "steps must be at least 1"),
    (worst_case_flatness, {"restarts": 0}, "restarts must be at least 1"),
    (pac_bayes_flatness, {"target": 0.0}, "target must be > 0"),
    (basin_volume, {"threshold": -1.0}, "threshold must be > 0"),
    (eps_sharpness, {"eps": float("nan")}, "eps must be finite"),
    (average_flatness, {"samples": 2.5}, "samples must be an integer"),
    (adaptive_sharpness, {"kind": "best"}, "unknown kind 'best'; valid: 'worst', 'average'"),
    (pac_bayes_flatness, {"criterion": "acc"}, "unknown criterion 'acc'; valid: 'error'"),
    (fisher_rao_norm, {"method": "exact"}, "unknown method 'exact'; valid: 'jvp', 'logits'"),
    (eps_sharpness, {"params": "fc9"}, "unknown parameter or layer 'fc9'"),
    (average_flatness, {"seed": "1"}, "seed must be an integer in \[0, 2\*\*64\)"),
])
def test_bad_arguments(func, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        func(net(), DATA, **kw)


def nan_loss(out, y):
    return out.sum() * float("nan")


@pytest.mark.parametrize("func", list(CHEAP) + [measure_all], ids=lambda f: f.__name__)
def test_nan_loss_at_the_centre(func):
    with pytest.raises(ValueError, match="the loss at the centre .* is nan"):
        func(net(), DATA, loss=nan_loss)


def test_empty_data_and_error_criterion_without_classes():
    X, y = DATA
    with pytest.raises(ValueError, match="data is empty"):
        average_flatness(net(), (X[:0], y[:0]))
    regression = tiny_mlp([64, 5, 1])
    with pytest.raises(ValueError, match="error criterion needs outputs .* at least 2 classes"):
        pac_bayes_flatness(regression, (X, torch.zeros(80, 1, dtype=torch.float64)),
                           loss="mse")


def test_measure_all_bad_arguments():
    with pytest.raises(ValueError, match="unknown measure 'flatness'"):
        measure_all(net(), DATA, measures=["flatness"])
    with pytest.raises(ValueError, match="options for unknown measures"):
        measure_all(net(), DATA, options={"eps": {"eps": 1.0}})
    with pytest.raises(ValueError, match="unknown preset 'quick'"):
        measure_all(net(), DATA, preset="quick")
    with pytest.raises(ValueError, match="unknown layer 'fc'"):
        measure_all(net(), DATA, layer="fc")


# ---------------------------------------------------------------------------- the table


@pytest.fixture(scope="module")
def table():
    return measure_all(net(6), DATA, seed=5, options=CHEAP_TABLE)


def test_measure_all_returns_every_measure(table):
    multiclass = [n for n, spec in MEASURES.items() if not spec.binary_only]
    assert isinstance(table, MeasureTable) and table.names == multiclass
    assert table.layer == "2" and table.below == "0" and table.above is None
    for row in table:
        assert row.value == float(row.result) and math.isfinite(row.value), row.name
        assert row.cost.seconds > 0 and set(row.invariance) == {"T1", "T2", "T3", "T5"}
        if row.name in ("average_flatness", "pac_bayes_flatness", "basin_volume",
                        "adaptive_sharpness_average"):
            assert row.seed == 5 and row.stderr > 0
    assert table["eps_sharpness"].parameters["steps"] == 3
    assert table["eps_sharpness"].cost.forward == 5 and table["eps_sharpness"].cost.backward == 3
    assert table["relative_flatness"].parameters["layer"] == "2"
    assert table.values()["fisher_rao_norm"] == table["fisher_rao_norm"].value
    with pytest.raises(KeyError, match="no measure 'x'"):
        table["x"]


def test_measure_all_subset_and_fast_preset():
    t = measure_all(net(6), DATA, measures="fisher_rao_norm", seed=1)
    assert t.names == ["fisher_rao_norm"]
    fast = measure_all(net(6), DATA, measures=["basin_volume"], preset="fast", seed=1)
    assert fast["basin_volume"].parameters == {"threshold": 0.1, **MEASURES["basin_volume"].fast}


def test_fast_preset_on_a_large_model_adds_the_recorded_large_model_settings(monkeypatch):
    """Above FAST_LARGE_PARAMS parameters "fast" also applies each measure's fast_large
    settings; the rows record them and give the numbers of a direct call with those settings;
    the user's options still win; below the threshold nothing changes."""
    from famviz.measures import table as table_mod

    names = ["eps_sharpness", "worst_case_flatness", "hessian_top_eigenvalue"]
    small = measure_all(net(6), DATA, measures=names, preset="fast", seed=1)
    assert not small.fast_large
    assert small["eps_sharpness"].parameters["steps"] == MEASURES["eps_sharpness"].fast["steps"]
    monkeypatch.setattr(table_mod, "FAST_LARGE_PARAMS", 10)  # the tiny MLP counts as large
    t = measure_all(net(6), DATA, measures=names, preset="fast", seed=1,
                    options={"worst_case_flatness": {"steps": 2}})
    assert t.fast_large and t.to_dict()["fast_large"] is True and "large model" in t._repr_html_()
    eps = t["eps_sharpness"]
    assert eps.parameters["steps"] == MEASURES["eps_sharpness"].fast_large["steps"] == 5
    assert eps.value == fv.eps_sharpness(net(6), DATA, steps=5, seed=1).value
    worst = t["worst_case_flatness"].parameters
    assert worst["restarts"] == 1 and worst["steps"] == 2  # the option overrides the preset
    eig = t["hessian_top_eigenvalue"]
    assert eig.parameters["tol"] == 1e-2 and eig.parameters["max_iter"] == 8
    direct = fv.hessian_top_eigenvalue(net(6), DATA, tol=1e-2, max_iter=8, seed=1)
    assert eig.value == float(direct) and eig.cost.hvps == direct.num_hvps
    assert not measure_all(net(6), DATA, measures=names, seed=1).fast_large  # default preset


def test_table_to_dict_is_json_and_reports_the_declarations(table):
    d = json.loads(json.dumps(table.to_dict()))
    assert [r["name"] for r in d["rows"]] == table.names
    row = d["rows"][table.names.index("average_flatness")]
    assert row["invariance"] == {"T1": "invariant", "T2": "changes", "T3": "n/a",
                                 "T5": "changes"}
    assert row["parameters"]["xi"] == 0.5 and row["cost"]["forward"] == 7
    assert d["objective"]["loss"] == "cross_entropy" and d["seed"] == 5
    assert table.invariance()["fisher_rao_norm"]["T1"] == "invariant"


def test_table_html_and_text(table):
    html = table._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == len(table) + 1
    assert "ε-sharpness" in html and "invariant" in html and "xi=0.5" in html
    text = str(table)
    assert text.splitlines()[0].startswith("| measure") and len(text.splitlines()) == 13


def test_measures_bar(table):
    from famviz.plots import measure_name, measures_bar

    fig = measures_bar(table)
    assert len(fig.data) == 1 and list(fig.data[0].y) == [measure_name(n) for n in table.names]
    again = measure_all(net(6), DATA, seed=5, options=CHEAP_TABLE)
    fig = measures_bar(table, again, labels=["a", "b"], relative=True)
    assert [tr.name for tr in fig.data] == ["a", "b"]
    assert all(x == pytest.approx(1.0) for x in fig.data[1].x)  # same model, same seed
    with pytest.raises(TypeError, match="MeasureTable"):
        measures_bar({"a": 1})
    with pytest.raises(ValueError, match="one entry per table"):
        measures_bar(table, labels=["a", "b"])


def test_float32_zero_norm_tensors_and_zero_gradients_stay_finite():
    """Zero biases (radius 0 in the per-tensor neighbourhoods) and a dead ReLU layer (zero
    gradients below it) must not produce 0/0 in float32, whose smallest normal is 1e-38."""
    model = fv.models.mlp([64, 8, 4], seed=0)
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # every hidden unit dead: no gradient reaches layer 0
        model[2].bias.zero_()
    data = (DATA[0].float(), DATA[1])
    for func in (eps_sharpness, adaptive_sharpness, worst_case_flatness, average_flatness):
        r = func(model, data, seed=0, **CHEAP[func])
        assert math.isfinite(float(r)), func.__name__
    kinds = adaptive_sharpness(model, data, kind="average", samples=2, seed=0)
    assert math.isfinite(float(kinds))
