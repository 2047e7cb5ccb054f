"""Grid and path guards of famviz.landscape: every bad argument of slice_1d, slice_2d,
slice_2d_progressive and interpolate is refused with a clear error before any evaluation, and
the caller's models and torch's global RNG are left alone; interpolate's BatchNorm
re-estimation against an independent float64 reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from famviz import landscape as ls
from famviz.landscape import slices
from famviz.objective import Objective

from helpers import assert_same_state, model_state

N_IN, N_OUT = 8, 3


class Noisy(nn.Module):
    """Draws from the global RNG in every forward pass (and adds nothing)."""

    def forward(self, x):
        return x + 0 * torch.rand_like(x)


def bn_model(seed, dropout=0.5, noisy=False):
    """Linear - BatchNorm - ReLU - Dropout - Linear (- Noisy), float64."""
    with torch.random.fork_rng():  # seeded initialization, the suite's RNG left alone
        torch.manual_seed(seed)
        layers = [nn.Linear(N_IN, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(dropout),
                  nn.Linear(6, N_OUT)]
    return nn.Sequential(*layers, *([Noisy()] if noisy else [])).double()


def mlp(seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(N_IN, 5), nn.Tanh(), nn.Linear(5, N_OUT)).double()


def with_state(model):
    """Every kind of caller state: train mode, fitted BN statistics, a frozen parameter and
    leftover gradients."""
    X, y = DATA
    model.train()
    F.cross_entropy(model(X), y).backward()
    model[0].bias.requires_grad_(False)
    return model


_g = torch.Generator().manual_seed(0)
DATA = (torch.randn(24, N_IN, generator=_g, dtype=torch.float64), torch.arange(24) % N_OUT)
TEST = (torch.randn(15, N_IN, generator=_g, dtype=torch.float64), torch.arange(15) % N_OUT)


@pytest.fixture
def env():
    a, b, m = with_state(bn_model(1)), with_state(bn_model(2)), with_state(mlp(0))
    d1, d2 = ls.random_direction(m, seed=1), ls.random_direction(m, seed=2)
    return {"a": a, "b": b, "mlp": m, "d1": d1, "d2": d2}


@pytest.fixture
def no_work(monkeypatch):
    """Any evaluation of a grid or path means a check came too late."""
    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(slices._Engine, "evaluate", fail)
    monkeypatch.setattr(torch.linalg, "svd", fail)  # trajectory_directions' PCA


def s1(e, **kw):
    return ls.slice_1d(e["mlp"], DATA, e["d1"], **{"steps": 5, **kw})


def s2(e, **kw):
    return ls.slice_2d(e["mlp"], DATA, e["d1"], e["d2"], **{"steps": 5, **kw})


def prog(e, **kw):
    return ls.slice_2d_progressive(e["mlp"], DATA, e["d1"], e["d2"],
                                   **{"levels": (3, 5), **kw})


def interp(e, **kw):
    return ls.interpolate(e["a"], e["b"], DATA, **{"steps": 5, **kw})


def interp_bn(e, **kw):
    return interp(e, bn_reestimate=True, **kw)


def path_of(model):
    """Four states of ``model`` along a made-up training run."""
    g = torch.Generator().manual_seed(0)
    return [{n: p.detach() + i * torch.randn(p.shape, generator=g, dtype=p.dtype)
             for n, p in model.named_parameters()} for i in range(4)]


def traj(e, **kw):
    return ls.trajectory_directions(path_of(e["mlp"]), **{"model": e["mlp"], **kw})


def drop(d, name):
    return {k: v for k, v in d.items() if k != name}


BIG = ls.MAX_STEPS + 1
# (call, kwargs, exception, message fragment)
CASES = {
    # the size of grids and paths
    "1d steps 1e7": (s1, dict(steps=10**7), ValueError, "MAX_STEPS=10001"),
    "1d steps over max": (s1, dict(steps=BIG), ValueError, f"steps={BIG} is more than MAX_STEPS"),
    "1d results over budget": (s1, dict(steps=10_001, memory_budget=100_000), ValueError,
                               "coordinates and results, more than memory_budget"),
    "2d points over max": (s2, dict(steps=(3001, 3001)), ValueError, "MAX_GRID_POINTS"),
    "2d over budget": (s2, dict(steps=2001, memory_budget=50 << 20), ValueError,
                       "more than memory_budget=50 MiB: use fewer steps"),
    "progressive points over max": (prog, dict(levels=(3, 2049)), ValueError,
                                    "grid of 4198401 points, more than MAX_GRID_POINTS"),
    "progressive over budget": (prog, dict(levels=(3, 5, 9), memory_budget=1000), ValueError,
                                "more than memory_budget"),
    "progressive level over max": (prog, dict(levels=(3, 20_001)), ValueError, "MAX_STEPS"),
    "interpolate steps 1e7": (interp, dict(steps=10**7), ValueError, "MAX_STEPS"),
    "interpolate bn steps 1e7": (interp_bn, dict(steps=10**7), ValueError, "MAX_STEPS"),
    "interpolate bn over budget": (interp_bn, dict(steps=10_001, memory_budget=100_000),
                                   ValueError, "coordinates and results, more than"),
    "point over budget": (s1, dict(memory_budget=1000), ValueError,
                          "one grid point needs about"),
    # steps and span
    "steps 1": (s1, dict(steps=1), ValueError, "steps must be an integer >= 2"),
    "steps float": (s1, dict(steps=5.0), TypeError, "steps must be an int, got float"),
    "steps bool": (s1, dict(steps=True), TypeError, "steps must be an int, got bool"),
    "steps None": (s2, dict(steps=None), TypeError, "steps must be an int, got NoneType"),
    "steps even": (s1, dict(steps=4), ValueError, "use an odd number of steps"),
    "steps triple": (s2, dict(steps=(5, 5, 5)), ValueError, "steps must be an int or a pair"),
    "span reversed": (s1, dict(span=(1, -1)), ValueError, "span needs finite min < max"),
    "span NaN": (s1, dict(span=(-1, float("nan"))), ValueError, "finite min < max"),
    "span text": (s1, dict(span="ab"), ValueError, "span must be a pair (min, max), got 'ab'"),
    "span triple": (s1, dict(span=(-1, 0, 1)), ValueError, "span must be a pair"),
    "span without 0": (s1, dict(span=(0.5, 1)), ValueError, "must contain 0"),
    "2d span one pair": (s2, dict(span=((-1, 1),)), ValueError, "span must be (min, max) or"),
    "2d y span without 0": (s2, dict(span=((-1, 1), (0.5, 1))), ValueError,
                            "y span (0.5, 1.0) must contain 0"),
    "2d span ragged": (s2, dict(span=((-1, 1), 2)), ValueError, "y span must be a pair"),
    "interpolate span": (interp, dict(span=(0.5, 1)), ValueError, "must contain 0"),
    "interpolate bn span": (interp_bn, dict(span=(0.5, 1)), ValueError, "must contain 0"),
    # levels
    "levels with 1": (prog, dict(levels=(1, 3)), ValueError, "every level must be >= 2"),
    "levels not nested": (prog, dict(levels=(3, 4)), ValueError, "must increase and nest"),
    "levels decreasing": (prog, dict(levels=(5, 3)), ValueError, "must increase and nest"),
    "levels repeated": (prog, dict(levels=(3, 3)), ValueError, "must increase and nest"),
    "levels empty": (prog, dict(levels=()), ValueError, "levels is empty"),
    "levels an int": (prog, dict(levels=41), TypeError, "levels must be a sequence of ints"),
    "levels text": (prog, dict(levels="41"), TypeError, "levels must be a sequence of ints"),
    "levels floats": (prog, dict(levels=(3.0, 5)), TypeError, "levels must hold ints"),
    "level off centre": (prog, dict(levels=(2, 3)), ValueError, "0 is not on the grid of 2"),
    "progressive unknown kwarg": (prog, dict(colour="red"), TypeError, "colour"),
    # directions
    "direction key missing": (lambda e, **kw: ls.slice_1d(e["mlp"], DATA, drop(e["d1"], "2.bias"),
                                                         **kw), {}, ValueError,
                              "direction does not match the model's parameters: missing "
                              "['2.bias']"),
    "direction extra key": (lambda e, **kw: ls.slice_1d(e["mlp"], DATA,
                                                        {**e["d1"], "9.weight": torch.ones(1)}),
                            {}, ValueError, "unknown ['9.weight']"),
    "direction shape": (lambda e, **kw: ls.slice_2d(e["mlp"], DATA, e["d1"], {
        **e["d2"], "0.weight": e["d2"]["0.weight"].T}, steps=3), {}, ValueError,
        "direction 2['0.weight'] has shape (8, 5), the parameter (5, 8)"),
    "direction numpy": (lambda e, **kw: ls.slice_1d(e["mlp"], DATA, {
        k: v.numpy() for k, v in e["d1"].items()}), {}, TypeError,
        "direction['0.weight'] must be a floating-point tensor"),
    "direction ints": (lambda e, **kw: ls.slice_1d(e["mlp"], DATA, {
        k: v.long() for k, v in e["d1"].items()}), {}, TypeError, "got torch.int64"),
    "direction NaN": (lambda e, **kw: ls.slice_1d(e["mlp"], DATA, {
        **e["d1"], "2.weight": e["d1"]["2.weight"] * float("nan")}), {}, ValueError,
        "direction['2.weight'] contains NaN or inf"),
    "direction a list": (lambda e, **kw: ls.slice_1d(e["mlp"], DATA, list(e["d1"].values())),
                         {}, TypeError, "direction must be a name-keyed dict"),
    "progressive d2 keys": (lambda e, **kw: ls.slice_2d_progressive(
        e["mlp"], DATA, e["d1"], drop(e["d2"], "0.weight"), levels=(3, 5)), {}, ValueError,
        "direction 2 does not match"),
    "interpolate other shapes": (lambda e, **kw: ls.interpolate(e["a"], e["mlp"], DATA), {},
                                 ValueError, "same parameter names and shapes"),
    # other arguments
    "budget zero": (s1, dict(memory_budget=0), ValueError, "memory_budget must be > 0"),
    "budget float": (s2, dict(memory_budget=1.5e9), TypeError,
                     "memory_budget must be an int number of bytes"),
    "progressive budget float": (prog, dict(memory_budget=1e9), TypeError, "memory_budget"),
    "progress not bool": (s1, dict(progress="yes"), TypeError, "progress must be True or False"),
    "2d progress not bool": (s2, dict(progress=1), TypeError, "progress must be True or False"),
    "progressive progress": (prog, dict(progress=None), TypeError, "progress must be True"),
    "dtype unknown name": (s1, dict(dtype="banana"), ValueError, "unknown dtype 'banana'"),
    "dtype integer": (s2, dict(dtype=torch.int64), ValueError,
                      "dtype must be torch.float32 or torch.float64"),
    "device unknown": (s1, dict(device="gpu9"), ValueError, "device must be a torch.device"),
    "bn unknown": (s1, dict(bn="batch"), ValueError, "unknown bn 'batch'"),
    "loss unknown": (prog, dict(loss="hinge"), ValueError, "unknown loss 'hinge'"),
    "interpolate flag": (interp, dict(bn_reestimate="yes"), TypeError,
                         "bn_reestimate must be True or False"),
    "interpolate bn train": (interp_bn, dict(bn="train"), ValueError,
                             "bn='train' with bn_reestimate=True"),
    "interpolate bn dtype": (interp_bn, dict(dtype="banana"), ValueError, "unknown dtype"),
    "interpolate bn progress": (interp_bn, dict(progress=2), TypeError, "progress must be"),
    "interpolate bn budget": (interp_bn, dict(memory_budget=-1), ValueError,
                              "memory_budget must be > 0"),
    "interpolate bn loss": (interp_bn, dict(loss="hinge"), ValueError, "unknown loss"),
    "interpolate bn one-sample batch": (
        lambda e, **kw: ls.interpolate(e["a"], e["b"], [DATA, (DATA[0][:1], DATA[1][:1])],
                                       bn_reestimate=True), {}, ValueError,
        "at least 2 samples (BatchNorm takes batch statistics); batch 1 has 1"),
    "interpolate unknown kwarg": (interp, dict(colour="red"), TypeError, "colour"),
    # the path of a training run
    "trajectory k 0": (traj, dict(k=0), ValueError, "k must be >= 1"),
    "trajectory k float": (traj, dict(k=2.0), TypeError, "k must be an int"),
    "trajectory k too many": (traj, dict(k=4), ValueError, "need at least 5 states"),
    "trajectory generator": (lambda e, **kw: ls.trajectory_directions(
        (s for s in path_of(e["mlp"])), model=e["mlp"]), {}, TypeError,
        "states must be a list"),
    "trajectory no model": (traj, dict(model=None), ValueError, "pass model="),
    "trajectory missing parameter": (lambda e, **kw: ls.trajectory_directions(
        [*path_of(e["mlp"])[:3], drop(path_of(e["mlp"])[3], "2.bias")], model=e["mlp"]), {},
        ValueError, "state 3 has no parameter '2.bias'"),
    "trajectory NaN": (lambda e, **kw: ls.trajectory_directions(
        [*path_of(e["mlp"])[:3], {n: t * float("nan") for n, t in path_of(e["mlp"])[3].items()}],
        model=e["mlp"]), {}, ValueError, "state 3 contains NaN or inf"),
    "trajectory over budget": (traj, dict(memory_budget=1000), ValueError,
                               "the PCA of 4 states of 63 parameters needs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_arguments_refused_before_work(case, env, no_work):
    call, kwargs, exc, fragment = CASES[case]
    before = {k: model_state(env[k]) for k in ("a", "b", "mlp")}
    rng = torch.get_rng_state()
    with pytest.raises(exc) as info:
        call(env, **kwargs)
    assert fragment in str(info.value), str(info.value)
    for k in before:
        assert_same_state(before[k], model_state(env[k]))
    assert torch.equal(torch.get_rng_state(), rng)


def test_grid_axis_refuses_huge_steps_before_allocating():
    with pytest.raises(ValueError, match="MAX_STEPS"):
        ls.grid_axis((-1, 1), 10**12)  # linspace would need 8 TB
    assert ls.grid_axis((-1, 1), np.int64(5)).tolist() == [-1, -0.5, 0, 0.5, 1]


def test_largest_allowed_grids_pass_the_guards():
    """The guards refuse only what they say: the limits themselves are accepted."""
    slices._check_grid_memory(ls.MAX_GRID_POINTS, True, ls.MAX_GRID_POINTS * 8 * 8)
    assert len(ls.grid_axis((-1, 1), ls.MAX_STEPS)) == ls.MAX_STEPS
    with pytest.raises(ValueError, match="memory_budget"):
        slices._check_grid_memory(ls.MAX_GRID_POINTS, True, ls.MAX_GRID_POINTS * 8 * 8 - 1)


def test_progressive_checks_on_call_and_matches_slice_2d(env):
    e = env
    levels = ls.slice_2d_progressive(e["mlp"], DATA, e["d1"], e["d2"], span=((-1, 1), (0, 2)),
                                     levels=(3, 5, 9), test_data=DATA)
    direct = ls.slice_2d(e["mlp"], DATA, e["d1"], e["d2"], span=((-1, 1), (0, 2)), steps=9,
                         test_data=DATA)
    out = list(levels)
    assert [s.meta["level"] for s in out] == [3, 5, 9]
    for s, stride in zip(out, (4, 2, 1)):
        for key in ("values", "accuracy", "test_values", "test_accuracy"):
            np.testing.assert_allclose(getattr(s, key), getattr(direct, key)[::stride, ::stride],
                                       rtol=1e-12, atol=1e-15)
        assert s.centre_loss == pytest.approx(direct.centre_loss, rel=1e-12)


# ------------------------------------------------------------------ BatchNorm re-estimation


def reference_reestimated(a, b, batches, t, data):
    """Independent float64 reference for bn_model at ``t``: BN statistics the plain average over
    ``batches`` of each batch's mean and unbiased variance at the interpolated weights, then the
    loss and accuracy on ``data`` of an eval-mode forward pass written out by hand (no
    dropout)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    p = {n: (pa[n] + t * (pb[n] - pa[n])).detach() for n in pa}
    hs = [X @ p["0.weight"].T + p["0.bias"] for X, _ in batches]
    mean = torch.stack([h.mean(0) for h in hs]).mean(0)
    var = torch.stack([h.var(0, unbiased=True) for h in hs]).mean(0)
    X, y = data
    z = (X @ p["0.weight"].T + p["0.bias"] - mean) / torch.sqrt(var + a[1].eps)
    out = torch.relu(z * p["1.weight"] + p["1.bias"]) @ p["4.weight"].T + p["4.bias"]
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def test_bn_reestimation_against_reference_and_caller_untouched():
    a = with_state(bn_model(1, dropout=0.9, noisy=True))
    b = with_state(bn_model(2, dropout=0.9, noisy=True))
    calls = []
    a[0].register_forward_hook(lambda *args: calls.append(1))
    X, y = DATA
    batches = [(X[:12], y[:12]), (X[12:], y[12:])]
    before = {"a": model_state(a), "b": model_state(b)}
    rng = torch.get_rng_state()
    s = ls.interpolate(a, b, batches, steps=5, span=(-0.5, 1.5), test_data=TEST,
                       bn_reestimate=True)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used"
    # hooks are part of the model's function (weight_norm, pruning): they run on the replica,
    # while the caller's hook tables stay as they were (model_state counts them)
    assert calls, "the model's hook did not run on the replica"
    assert_same_state(before["a"], model_state(a))
    assert_same_state(before["b"], model_state(b))
    assert s.meta["bn"] == "reestimated" and s.x.tolist() == [-0.5, 0, 0.5, 1, 1.5]
    for i, t in enumerate(s.x):
        for data, values, accuracy in [(DATA, s.values, s.accuracy),
                                       (TEST, s.test_values, s.test_accuracy)]:
            loss, acc = reference_reestimated(a, b, batches, float(t), data)
            assert values[i] == pytest.approx(loss, rel=1e-10)
            assert accuracy[i] == pytest.approx(acc, abs=1e-12)
    assert s.centre_loss == s.values[1]
    # with model_a's own statistics (no re-estimation) the numbers differ
    plain = ls.interpolate(a, b, batches, steps=5, span=(-0.5, 1.5))
    assert np.abs(plain.values - s.values).max() > 1e-3


def test_bn_reestimate_without_batchnorm_is_a_no_op():
    a, b = with_state(mlp(1)), mlp(2)
    before = model_state(a)
    rng = torch.get_rng_state()
    re = ls.interpolate(a, b, DATA, steps=5, bn_reestimate=True, test_data=DATA)
    plain = ls.interpolate(a, b, DATA, steps=5, test_data=DATA)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_state(before, model_state(a))
    for key in ("values", "accuracy", "test_values", "test_accuracy"):
        assert np.array_equal(getattr(re, key), getattr(plain, key))
    assert re.meta["bn"] == plain.meta["bn"] == "eval"


def test_engine_without_directions_evaluates_the_model():
    """The fixed point of an engine with no directions (used per point by the re-estimation)
    is the model's own loss, also in the Linear-stack engine."""
    model = mlp(0)
    obj = Objective(model, DATA, dtype=torch.float64)
    eng = slices._Engine(obj, [], ls.DEFAULT_MEMORY_BUDGET)
    assert eng.mode == "linear-stack"
    loss, acc = eng.evaluate(np.zeros((1, 0)))
    with torch.no_grad():
        out = model(DATA[0])
    assert loss[0] == pytest.approx(float(F.cross_entropy(out, DATA[1])), rel=1e-12)
    assert acc[0] == pytest.approx(float((out.argmax(1) == DATA[1]).double().mean()), abs=1e-15)


def test_trajectory_of_equal_states_is_refused():
    m = mlp(0)
    with pytest.raises(ValueError, match="all states are equal"):
        ls.trajectory_directions([m.state_dict()] * 3, model=m)
    assert len(ls.trajectory_directions(path_of(m), k=3, model=m).directions) == 3
