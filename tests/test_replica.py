"""famviz computes on its own replica of the caller's model: threads, Ctrl-C, weight sharing and
half precision cannot change the model or give a different number."""

from __future__ import annotations

import inspect
import linecache
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import famviz as fv
from famviz import fam, oracles
from famviz import landscape as L
from famviz.replica import replicate, shared_names

from helpers import assert_same_state, model_state

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
X, Y = _X[:40].double(), _Y[:40] % 4


def mlp():
    return fv.models.mlp([64, 8, 4], seed=0).double()


# ------------------------------------------------------------------------------ the replica


def test_replica_shares_no_tensor_and_keeps_ties():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 3))
    model[3].weight = model[0].weight
    net = replicate(model)
    own = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not own & {id(t) for t in [*net.parameters(), *net.buffers()]}
    assert net[3].weight is net[0].weight  # the tie is kept
    assert shared_names(net) == shared_names(model) == {"3.weight": "0.weight"}
    net.eval()
    net[1].running_mean += 1  # the replica's buffers are its own
    assert model.training and torch.equal(model[1].running_mean, torch.zeros(3))


def test_a_model_holding_what_cannot_be_copied_is_measured():
    """Only the module structure is copied: a lock (or an open file) in a module is fine."""

    class Locked(nn.Linear):
        def __init__(self):
            super().__init__(64, 4)
            self.lock = threading.Lock()

    locked = Locked().double()
    plain = nn.Linear(64, 4).double()
    plain.load_state_dict(locked.state_dict())
    assert fv.hessian_trace(nn.Sequential(locked), (X, Y)).value == \
        fv.hessian_trace(nn.Sequential(plain), (X, Y)).value


def test_hooks_registered_on_the_replica_stay_there():
    model = mlp()
    net = replicate(model)
    net[0].register_forward_hook(lambda *a: None)
    net.register_buffer("extra", torch.zeros(1), persistent=False)
    assert not model[0]._forward_hooks and "extra" not in dict(model.named_buffers())


# ------------------------------------------------------------------------------------ threads

THREADED = {
    "eps_sharpness": lambda m: fv.eps_sharpness(m, (X, Y), seed=3).value,
    "basin_volume": lambda m: fv.basin_volume(m, (X, Y), seed=3, samples=4).value,
    "hessian_trace": lambda m: fv.hessian_trace(m, (X, Y), method="hutchinson", probes=3,
                                                seed=3).value,
    "relative_flatness": lambda m: fv.relative_flatness(m, (X, Y), "2", method="exact").value,
    "slice_1d": lambda m: L.slice_1d(m, (X, Y), L.random_direction(m, seed=1), steps=7).values,
}


@pytest.mark.parametrize("name", list(THREADED))
def test_two_threads_give_the_sequential_results(name):
    model = mlp()
    call = THREADED[name]
    sequential = call(model)
    before, rng = model_state(model), torch.get_rng_state()
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = call(model)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        assert (r == sequential).all() if hasattr(r, "all") else r == sequential
    assert_same_state(before, model_state(model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(type(p) is nn.Parameter for p in model.parameters())


# ------------------------------------------------------------------------------------ Ctrl-C


class _Interrupt:
    """A tracer that raises KeyboardInterrupt at the ``at``-th line executed in famviz code.

    CPython reports a ``with`` statement's line again when its block ends, just before the
    context manager's ``__exit__`` is called; raising there skips ``__exit__``. A real Ctrl-C
    never arrives there (the interpreter delivers signals at its eval-breaker checks: calls,
    loop jumps, function and generator entries), so the tracer does not raise at those events.
    """

    def __init__(self, at: int | None):
        self.at, self.count = at, 0
        self.seen: dict[int, set[int]] = {}

    def __call__(self, frame, event, arg):
        if "/famviz/" not in frame.f_code.co_filename:
            return None  # do not trace into torch or the test
        if not frame.f_code.co_flags & inspect.CO_GENERATOR:
            self.seen.pop(id(frame), None)  # a new frame (a generator's is resumed instead)
        return self.local

    def _with_exit(self, frame) -> bool:
        lines = self.seen.setdefault(id(frame), set())
        again = frame.f_lineno in lines
        lines.add(frame.f_lineno)
        source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip()
        return again and source.startswith(("with ", "async with "))

    def local(self, frame, event, arg):
        if event == "line" and not self._with_exit(frame):
            self.count += 1
            if self.at is not None and self.count == self.at:
                raise KeyboardInterrupt
        return self.local


def _traced(call, at):
    tracer = _Interrupt(at)
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return tracer.count


INTERRUPTED = {
    "eps_sharpness": lambda m: fv.eps_sharpness(m, (X, Y), seed=0, steps=3),
    "relative_flatness": lambda m: fv.relative_flatness(m, (X, Y), "2", method="exact"),
    "slice_2d": lambda m: L.slice_2d(m, (X, Y), L.random_direction(m, seed=0),
                                     L.random_direction(m, seed=1), steps=3),
    "fam.penalty": lambda m: fam.penalty(m, (X, Y), "2"),
    "interpolate_bn": None,  # filled below: BatchNorm re-estimation writes buffers
}


def _bn_model():
    return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 4)).double()


_OTHER_BN = _bn_model()
INTERRUPTED["interpolate_bn"] = lambda m: L.interpolate(m, _OTHER_BN, (X, Y), steps=3,
                                                         bn_reestimate=True)


@pytest.mark.parametrize("name", list(INTERRUPTED))
def test_ctrl_c_at_any_point_leaves_the_model_intact(name):
    call = INTERRUPTED[name]
    model = _bn_model() if name == "interpolate_bn" else mlp()
    model.train()  # every mode flag is something that could be left flipped
    with torch.no_grad():
        model[0].weight.grad = torch.ones_like(model[0].weight)
    total = _traced(lambda: call(model), None)
    assert total > 50
    points = sorted({1 + (total - 1) * k // 24 for k in range(25)})
    before, rng = model_state(model), torch.get_rng_state()
    interrupted = 0
    for at in points:
        try:
            _traced(lambda: call(model), at)
        except KeyboardInterrupt:
            interrupted += 1
        assert_same_state(before, model_state(model))
        assert all(type(p) is nn.Parameter for p in model.parameters())
        assert torch.equal(torch.get_rng_state(), rng), f"RNG moved after interrupt at {at}"
    assert interrupted >= len(points) - 1  # the last point may fall after the last line


# ----------------------------------------------------------------------- shared modules


def _repeated():
    """One Linear module applied twice (weight sharing by reuse)."""
    g = torch.Generator().manual_seed(0)
    inner = nn.Linear(8, 8).double()
    with torch.no_grad():
        for p in inner.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), inner, nn.ReLU(), inner, nn.ReLU(),
                         nn.Linear(8, 4)).double()


def _tied():
    """Two Linear modules with one weight (weight tying)."""
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    model[4].weight = model[2].weight
    return model


@pytest.mark.parametrize("make", [_repeated, _tied], ids=["repeated", "tied"])
def test_shared_modules_match_the_dense_oracle(make):
    model = make()
    data = (X, Y)
    before = model_state(model)
    H, _ = oracles.dense_hessian(model, data)
    assert fv.hessian_trace(model, data).value == pytest.approx(float(H.trace()), rel=1e-10)
    assert fv.hessian_frobenius(model, data).value == pytest.approx(float(H.norm()), rel=1e-10)
    top = torch.linalg.eigvalsh(H)[-1]
    assert fv.hessian_top_eigenvalue(model, data, seed=0, tol=1e-10).eigenvalues[0] == \
        pytest.approx(float(top), rel=1e-7)
    for layer in ("2", "6"):
        ref, _ = oracles.relative_flatness_bruteforce(model, data, layer)
        r = fv.relative_flatness(model, data, layer)
        assert r.value == pytest.approx(ref, rel=1e-10), layer
    with pytest.raises(ValueError, match="no closed form"):
        fv.relative_flatness(model, data, "2", method="closed_form")
    # a slice's centre is the loss of the model itself
    s = L.slice_1d(model, data, L.random_direction(model, seed=0), steps=5)
    with torch.no_grad():
        centre = float(torch.nn.functional.cross_entropy(model.eval()(X), Y))
    model.train()
    assert s.values[2] == pytest.approx(centre, rel=1e-12)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("make, fragment", [(_repeated, "used twice"),
                                            (_tied, "tied weights")], ids=["repeated", "tied"])
def test_shared_modules_refused_where_a_layer_must_be_used_once(make, fragment):
    model = make()
    with pytest.raises(ValueError, match=fragment):
        fam.penalty(model, (X, Y), "2")
    with pytest.raises(ValueError, match=fragment):
        fv.reparam.scale_layers(model, "0", "2", 2.0)


def test_penalty_of_an_unshared_layer_in_a_model_with_sharing_equals_the_oracle():
    """The output layer of the repeated model is used once: its penalty is κ on the batch."""
    model = _repeated()
    ref, _ = oracles.relative_flatness_bruteforce(model, (X, Y), "6")
    assert float(fam.penalty(model, (X, Y), "6")) == pytest.approx(ref, rel=1e-10)


# ------------------------------------------------------------------------ half precision


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_evaluated_in_float32(half):
    model = fv.models.mlp([64, 8, 4], seed=0).to(half)
    data = (X.to(half), Y)
    as32 = fv.models.mlp([64, 8, 4], seed=0).to(half).float()
    data32 = (X.to(half).float(), Y)
    r = fv.eps_sharpness(model, data, seed=0)
    assert r.objective.dtype == "float32"
    assert r.value > 0 and r.value == fv.eps_sharpness(as32, data32, seed=0).value
    t = fv.hessian_trace(model, data)
    assert t.value == fv.hessian_trace(as32, data32).value
    assert next(model.parameters()).dtype == half  # the caller's model is not converted


# ------------------------------------------------------------------- the data and the RNG


def test_iterating_a_dataloader_leaves_the_global_rng():
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    rng = torch.get_rng_state()
    r = fv.hessian_trace(mlp(), loader)
    assert torch.equal(torch.get_rng_state(), rng)
    assert r.value == pytest.approx(fv.hessian_trace(mlp(), (X, Y)).value, rel=1e-12)


def test_nonfinite_loss_is_an_error_not_nan():
    model = mlp()
    with torch.no_grad():
        model[2].bias[0] = 1e308  # finite weights, infinite logits
    for call in (lambda: fv.hessian_trace(model, (X, Y), method="hutchinson", probes=2),
                 lambda: fv.hessian_frobenius(model, (X, Y)),
                 lambda: fv.relative_flatness(model, (X, Y), "2"),
                 lambda: fv.relative_flatness(model, (X, Y), "2", method="exact"),
                 lambda: fv.hessian_trace(model, (X, Y))):
        with pytest.raises(ValueError, match="NaN or inf|is nan|is inf"):
            call()


def test_measure_all_keeps_the_other_rows_when_one_measure_fails():
    t = fv.measure_all(mlp(), (X, Y), measures=["fisher_rao_norm", "eps_sharpness"], seed=0,
                       options={"eps_sharpness": {"eps": -1.0}})
    assert t["fisher_rao_norm"].ok and t["fisher_rao_norm"].value > 0
    row = t["eps_sharpness"]
    assert not row.ok and "eps" in row.error and row.error.startswith("ValueError")
    assert t.values() == {"fisher_rao_norm": t["fisher_rao_norm"].value}
    assert "eps_sharpness" in t.errors() and "error" in t.to_text()


# ------------------------------------------------ property tests: sharing and half precision

widths = st.integers(3, 7)


@settings(max_examples=10, deadline=None)
@given(width=widths, uses=st.integers(2, 3), seed=st.integers(0, 10_000))
def test_property_repeated_module_equals_oracle(width, uses, seed):
    g = torch.Generator().manual_seed(seed)
    inner = nn.Linear(width, width).double()
    first, last = nn.Linear(64, width).double(), nn.Linear(width, 4).double()
    for p in [*inner.parameters(), *first.parameters(), *last.parameters()]:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    layers = [first, nn.ReLU()]
    for _ in range(uses):
        layers += [inner, nn.ReLU()]
    model = nn.Sequential(*layers, last)
    out = str(len(layers))
    H, _ = oracles.dense_hessian(model, (X, Y))
    assert fv.hessian_trace(model, (X, Y)).value == pytest.approx(float(H.trace()), rel=1e-9)
    ref, _ = oracles.relative_flatness_bruteforce(model, (X, Y), "2")
    assert fv.relative_flatness(model, (X, Y), "2").value == pytest.approx(ref, rel=1e-9,
                                                                            abs=1e-14)
    ref_out, _ = oracles.relative_flatness_bruteforce(model, (X, Y), out)
    assert fv.relative_flatness(model, (X, Y), out).value == pytest.approx(ref_out, rel=1e-9)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), half=st.sampled_from([torch.float16, torch.bfloat16]))
def test_property_half_precision_equals_its_float32_copy(seed, half):
    model = fv.models.mlp([64, 6, 4], seed=seed).to(half)
    before = model_state(model)
    copy32 = fv.models.mlp([64, 6, 4], seed=seed).to(half).float()
    data = (X[:20].to(half), Y[:20])
    data32 = (data[0].float(), data[1])
    assert fv.relative_flatness(model, data, "2").value == \
        fv.relative_flatness(copy32, data32, "2").value
    assert fv.hessian_trace(model, data).value == fv.hessian_trace(copy32, data32).value
    assert_same_state(before, model_state(model))


class _Noisy(nn.Module):
    """Draws from the global RNG in every forward pass (and adds nothing)."""

    def forward(self, x):
        return x + 0 * torch.rand_like(x)


def test_a_model_that_draws_random_numbers_leaves_the_global_rng():
    model = nn.Sequential(mlp(), _Noisy())
    rng = torch.get_rng_state()
    r = fv.hessian_trace(model, (X, Y), method="hutchinson", probes=2, seed=0)
    fv.eps_sharpness(model, (X, Y), seed=0, steps=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert r.value == fv.hessian_trace(mlp(), (X, Y), method="hutchinson", probes=2,
                                       seed=0).value
