"""Every invariance declaration that measure_all reports is checked empirically: on random ReLU
networks each measure is computed with the same seed before and after T1, T2, T3 and T5
(docs/math.md §2); "invariant" must hold to rounding, "changes" must show a real change."""

import pytest
import torch

import famviz as fv
from famviz.measures import (
    CHANGES,
    INVARIANT,
    MEASURES,
    NOT_APPLICABLE,
    TRANSFORMS,
    adaptive_sharpness,
    average_flatness,
    fisher_rao_norm,
    measure_all,
    pac_bayes_flatness,
    worst_case_flatness,
)
from famviz.reparam import max_output_change, scale_layers, scale_neurons, shift_logits

from helpers import tiny_mlp

#: "invariant": relative difference at most this (float64; measured: <= 2e-13)
SAME = 1e-9
#: "changes": relative difference at least this (measured: >= 4e-4 with these factors)
MOVES = 1e-5

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
DATA = (_X[:120].double(), _Y[:120] % 4)

#: test-sized settings (the declarations do not depend on them); Lanczos to high precision so
#: that an invariant spectrum reads as invariant
SMALL = {
    "hessian_top_eigenvalue": {"tol": 1e-10, "max_iter": 100},
    "eps_sharpness": {"steps": 5, "restarts": 2},
    "adaptive_sharpness": {"steps": 5, "restarts": 2},
    "adaptive_sharpness_average": {"samples": 4},
    "average_flatness": {"samples": 4},
    "worst_case_flatness": {"steps": 5, "restarts": 2},
    "pac_bayes_flatness": {"samples": 3, "steps": 6, "criterion": "loss"},
    "basin_volume": {"samples": 2, "steps": 5},
}
SEED = 11


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def transforms(model, below, layer, above, output, seed):
    """The four reparameterizations around ``layer``, with factors well away from 1
    (T1 x20, per-neuron factors log-uniform in [0.1, 10], logit shifts of size ~3)."""
    g = torch.Generator().manual_seed(seed)
    width_below = model.get_submodule(below).out_features
    out = {
        "T1": scale_layers(model, below, layer, 20.0),
        "T2": scale_neurons(model, below, layer,
                            10 ** (2 * torch.rand(width_below, generator=g) - 1)),
        "T5": shift_logits(model, output,
                           3 * torch.randn(model.get_submodule(output).in_features,
                                           generator=g)),
    }
    if above is not None:
        width = model.get_submodule(layer).out_features
        out["T3"] = scale_neurons(model, layer, above,
                                  10 ** (2 * torch.rand(width, generator=g) - 1))
    X = DATA[0]
    for name, new in out.items():
        if name == "T5":
            with torch.no_grad():
                probs = [torch.softmax(m(X), 1) for m in (model, new)]
            assert float((probs[0] - probs[1]).abs().max()) < 1e-12
        else:
            assert max_output_change(model, new, X) < 1e-9, name
    return out


def check(declared: str, before: float, after: float) -> str | None:
    d = rel(before, after)
    if declared == INVARIANT and d > SAME:
        return f"declared invariant, changed by {d:.2e}"
    if declared == CHANGES and d < MOVES:
        return f"declared changes, moved only {d:.2e}"
    return None


NETS = [  # (widths, seed, reference layer)
    ([64, 7, 6, 4], 0, "2"),
    ([64, 9, 5, 4], 1, "2"),
    ([64, 6, 8, 5, 4], 2, "4"),
]


@pytest.mark.parametrize("widths,seed,layer", NETS)
def test_every_declaration_of_measure_all_holds(widths, seed, layer):
    model = tiny_mlp(widths, seed=seed)
    linear = [str(2 * i) for i in range(len(widths) - 1)]
    i = linear.index(layer)
    below, above, output = linear[i - 1], linear[i + 1], linear[-1]
    base = measure_all(model, DATA, layer=layer, seed=SEED, options=SMALL)
    multiclass = [n for n, spec in MEASURES.items() if not spec.binary_only]
    assert base.names == multiclass and (base.below, base.above) == (below, above)
    failures = []
    for t, new in transforms(model, below, layer, above, output, seed).items():
        table = measure_all(new, DATA, layer=layer, seed=SEED, options=SMALL)
        for row in base:
            declared = row.invariance[t]
            assert declared in (INVARIANT, CHANGES), (row.name, t, declared)
            problem = check(declared, row.value, table[row.name].value)
            if problem:
                failures.append(f"{row.name} under {t}: {problem}")
    assert not failures, "\n".join(failures)


def test_output_layer_has_no_T3_and_first_layer_no_T1_T2():
    model = tiny_mlp([64, 6, 4], seed=0)
    last = measure_all(model, DATA, layer="2", seed=0, measures=["relative_flatness",
                                                                 "fisher_rao_norm"])
    assert (last.below, last.above) == ("0", None)
    assert all(r.invariance["T3"] == NOT_APPLICABLE for r in last)
    assert last["relative_flatness"].invariance["T1"] == INVARIANT
    first = measure_all(model, DATA, layer="0", seed=0, measures=["relative_flatness"])
    assert (first.below, first.above) == (None, "2")
    assert first["relative_flatness"].invariance == {
        "T1": NOT_APPLICABLE, "T2": NOT_APPLICABLE, "T3": INVARIANT, "T5": INVARIANT}
    mse = measure_all(model, (DATA[0], torch.zeros(120, 4, dtype=torch.float64)), loss="mse",
                      layer="2", seed=0, measures=["hessian_trace"])
    assert mse["hessian_trace"].invariance["T5"] == NOT_APPLICABLE


# --------------------------------------------------------------- declarations of options


def _one(func, model, kw):
    return func(model, DATA, seed=SEED, **kw)


OPTION_CASES = [  # (function, options, layer pair) -- the non-default declarations
    (adaptive_sharpness, {"eta": 0.0, "steps": 5, "restarts": 2}),
    (adaptive_sharpness, {"eta": 0.0, "kind": "average", "samples": 3}),
    (fisher_rao_norm, {"method": "logits"}),
    (average_flatness, {"samples": 2, "adversarial": True, "adv_steps": 2, "adv_eps": 0.05}),
    (worst_case_flatness, {"steps": 3, "restarts": 1, "adversarial": True, "adv_steps": 2,
                           "adv_eps": 0.05}),
]


@pytest.mark.parametrize("func,kw", OPTION_CASES,
                         ids=["adaptive-eta0", "adaptive-eta0-average", "fisher-logits",
                              "average-adversarial", "worst-adversarial"])
def test_declarations_of_non_default_options(func, kw):
    model = tiny_mlp([64, 7, 6, 4], seed=5)
    base = _one(func, model, kw)
    failures = []
    for t, new in transforms(model, "0", "2", "4", "4", 5).items():
        problem = check(base.invariance[t], float(base), float(_one(func, new, kw)))
        if problem:
            failures.append(f"{t}: {problem}")
    assert not failures, "\n".join(failures)
    if func is adaptive_sharpness:
        assert [base.invariance[t] for t in TRANSFORMS] == [INVARIANT] * 3 + [CHANGES]


def test_relative_flatness_T2_invariant_after_std_normalization():
    model = tiny_mlp([64, 7, 6, 4], seed=6)
    opts = {"relative_flatness": {"normalize_features": True}}
    kw = dict(layer="2", seed=0, measures=["relative_flatness"], options=opts)
    base = measure_all(model, DATA, **kw)
    assert base["relative_flatness"].invariance["T2"] == INVARIANT
    assert float(fv.reparam.feature_std(model, "2", DATA).min()) > 1e-8  # no dead features
    new = transforms(model, "0", "2", "4", "4", 6)["T2"]
    assert rel(base["relative_flatness"].value,
               measure_all(new, DATA, **kw)["relative_flatness"].value) < SAME


def test_pac_bayes_error_criterion_declarations():
    """The paper's criterion (training error) on a briefly trained net: T1 moves sigma, the
    softmax shift does not."""
    X, y = DATA
    model = tiny_mlp([64, 12, 4], seed=2)
    params = list(model.parameters())
    for _ in range(80):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(X), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
    kw = {"samples": 3, "steps": 6}
    base = _one(pac_bayes_flatness, model, kw)
    assert base.criterion == "error" and base.sigma < float("inf")
    new = transforms(model, "0", "2", None, "2", 2)
    assert check(base.invariance["T1"], float(base),
                 float(_one(pac_bayes_flatness, new["T1"], kw))) is None
    assert check(base.invariance["T5"], float(base),
                 float(_one(pac_bayes_flatness, new["T5"], kw))) is None
