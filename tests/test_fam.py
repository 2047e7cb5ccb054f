"""FAM penalty, SAM/ASAM and the training loop (famviz.fam).

Oracles: ``famviz.relative_flatness`` (itself tested against the dense Hessian) for the penalty's
value; for its gradient, κ(θ) written from scratch with ``torch.func`` — the dense Hessian of the
layer's weight, contracted as ``einsum('ikjk->ij')`` — differentiated once more by
``torch.func.grad``, and central finite differences. All in float64.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import famviz as fv
from famviz import fam
from famviz.oracles import relative_flatness_bruteforce

from helpers import assert_same_state, model_state, tiny_mlp

EXACT = 1e-10  # two exact computations of the same number
GRAD_RTOL = 1e-8  # penalty gradient vs the torch.func oracle (agreement seen: ~1e-15)


def smooth_loss(out, target):
    """A per-sample loss with no closed form: it forces the HVP route."""
    return F.cross_entropy(out, target) + 0.05 * out.pow(4).mean()


def targets(loss, y, classes):
    return F.one_hot(y % classes, classes).double() if loss == "mse" else y % classes


@pytest.fixture(scope="module")
def batch(digits_small):
    X, y = digits_small
    return X[:48], y[:48]


# (widths, activation, layer, loss, route)
CASES = [
    ([64, 7, 6, 5], "relu", "4", "cross_entropy", "softmax"),
    ([64, 7, 6, 5], "relu", "2", "cross_entropy", "gauss_newton"),
    ([64, 7, 6, 5], "relu", "0", "cross_entropy", "gauss_newton"),
    ([64, 7, 6, 5], "tanh", "2", "cross_entropy", "hvp"),
    ([64, 7, 6, 5], "relu", "4", smooth_loss, "hvp"),
    ([64, 7, 6, 5], "relu", "4", "mse", "mse"),
    ([64, 7, 6, 5], "relu", "2", "mse", "gauss_newton"),
]
IDS = ["last-ce", "hidden-ce", "first-ce", "tanh-hidden", "custom-loss", "last-mse",
       "hidden-mse"]


@pytest.mark.parametrize("widths, act, layer, loss, route", CASES, ids=IDS)
def test_penalty_equals_relative_flatness(batch, widths, act, layer, loss, route):
    model = tiny_mlp(widths, seed=1, activation=act)
    X, y = batch[0], targets(loss, batch[1], widths[-1])
    assert fam.penalty_path(model, (X, y), layer, loss) == route
    for normalize in (None, "m"):
        ref = fv.relative_flatness(model, (X, y), layer, loss=loss, normalize=normalize).value
        for gradient in ("exact", "frozen"):
            value = fam.penalty(model, (X, y), layer, loss, normalize=normalize,
                                gradient=gradient)
            assert value.ndim == 0 and value.dtype == torch.float64
            assert value.item() == pytest.approx(ref, rel=EXACT)


@pytest.mark.parametrize("widths, act, layer, loss, route", CASES, ids=IDS)
def test_penalty_equals_relative_flatness_from_hessian_vector_products(batch, widths, act,
                                                                       layer, loss, route):
    """Every route against κ from the d·m exact Hessian-vector products in the weight (no
    closed form shared with the penalty)."""
    model = tiny_mlp(widths, seed=5, activation=act)
    X, y = batch[0][:30], targets(loss, batch[1][:30], widths[-1])
    ref = fv.relative_flatness(model, (X, y), layer, loss=loss, method="exact")
    assert ref.method == "exact" and ref.num_hvps > 0
    for gradient in ("exact", "frozen"):
        value = fam.penalty(model, (X, y), layer, loss, gradient=gradient)
        assert value.item() == pytest.approx(ref.value, rel=1e-9)


class TwoLayer(nn.Module):
    """Not an nn.Sequential: the penalty takes the HVP route below the head."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(64, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


def test_penalty_on_cnn_and_custom_module(batch):
    X, y = batch
    cnn = fv.models.cnn(channels=(2, 3), hidden=6, num_classes=5, seed=0).double()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        custom = TwoLayer().double()
    for model, layer, route in [(cnn, "fc2", "softmax"), (cnn, "fc1", "gauss_newton"),
                                (custom, "head", "softmax"), (custom, "hidden", "hvp")]:
        ref = fv.relative_flatness(model, (X, y), layer).value
        assert fam.penalty_path(model, (X, y), layer) == route
        assert fam.penalty(model, (X, y), layer).item() == pytest.approx(ref, rel=EXACT)
    # layer=None is the last Linear module
    assert fam.penalty(cnn, (X, y)).item() == pytest.approx(
        fv.relative_flatness(cnn, (X, y), "fc2").value, rel=EXACT)


class Squashed(nn.Sequential):
    """An nn.Sequential subclass with its own forward: not a plain stack of its children."""

    def forward(self, x):
        return 3 * torch.tanh(super().forward(x))


def test_sequential_subclass_with_own_forward_is_not_treated_as_a_stack():
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        model = Squashed(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    for layer in ("0", "2"):
        assert fam.penalty_path(model, (X, y), layer) == "hvp"
        kappa, _ = relative_flatness_bruteforce(model, (X, y), layer)
        assert fam.penalty(model, (X, y), layer).item() == pytest.approx(kappa, rel=1e-9)


# ------------------------------------------------------------------------ exact gradients


def kappa_oracle(model, X, y, layer, loss):
    """κ(θ) as a pure function of the parameter dict, from the dense Hessian of W."""
    loss_fn = loss if callable(loss) else {
        "cross_entropy": F.cross_entropy, "mse": F.mse_loss}[loss]
    wname = f"{layer}.weight"

    def kappa(params):
        W = params[wname]
        d, m = W.shape

        def E(flat):
            return loss_fn(functional_call(model, {**params, wname: flat.reshape(d, m)}, (X,)), y)

        H = torch.func.hessian(E)(W.reshape(-1)).reshape(d, m, d, m)
        return ((W @ W.T) * torch.einsum("ikjk->ij", H)).sum()

    return kappa


def live_grads(model):
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("widths, act, layer, loss, route", CASES, ids=IDS)
def test_exact_gradient_matches_torch_func(batch, widths, act, layer, loss, route):
    model = tiny_mlp(widths, seed=2, activation=act)
    X, y = batch[0][:24], targets(loss, batch[1][:24], widths[-1])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = torch.func.grad(kappa_oracle(model, X, y, layer, loss))(params)
    fam.penalty(model, (X, y), layer, loss).backward()
    got = live_grads(model)
    below = [n for n in params if int(n.split(".")[0]) < int(layer)]
    checked = [f"{layer}.weight", *below]
    if loss != "mse":  # with MSE the loss curvature, hence kappa, does not depend on biases
        checked.append(f"{layer}.bias")
    for name in params:
        scale = expected[name].abs().max()
        error = float((got[name] - expected[name]).abs().max())
        assert error <= GRAD_RTOL * float(scale) + 1e-14, name
    # the gradient really reaches W, its bias and the layers below (through phi)
    for name in checked:
        assert float(expected[name].abs().max()) > 0, name


def test_exact_gradient_matches_finite_differences(batch):
    """Gauss-Newton route on a ReLU net: κ(θ) is the Gauss-Newton expression almost everywhere,
    so a central difference of the *measured* κ (famviz.relative_flatness) along a random
    direction in all parameters equals the penalty's directional derivative."""
    model = tiny_mlp([64, 7, 6, 5], seed=3)
    X, y = batch
    fam.penalty(model, (X, y), "2").backward()
    gen = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype)
                 for n, p in model.named_parameters()}
    analytic = sum(float((p.grad * direction[n]).sum()) for n, p in model.named_parameters())

    def kappa_at(t):
        shifted = tiny_mlp([64, 7, 6, 5], seed=3)
        with torch.no_grad():
            for n, p in shifted.named_parameters():
                p.add_(t * direction[n])
        return fv.relative_flatness(shifted, (X, y), "2").value

    h = 1e-5
    numeric = (kappa_at(h) - kappa_at(-h)) / (2 * h)
    assert numeric == pytest.approx(analytic, rel=1e-6)


@pytest.mark.parametrize("widths, act, layer", [
    ([64, 7, 6, 5], "relu", "4"),
    ([64, 7, 6, 5], "relu", "2"),
    ([64, 7, 6, 5], "tanh", "2"),
], ids=["softmax", "gauss_newton", "hvp"])
@pytest.mark.parametrize("normalize", [None, "m"])
def test_frozen_gradient_is_2TW_on_W_only(batch, widths, act, layer, normalize):
    model = tiny_mlp(widths, seed=4, activation=act)
    X, y = batch
    fam.penalty(model, (X, y), layer, normalize=normalize, gradient="frozen").backward()
    r = fv.relative_flatness(model, (X, y), layer)
    W = model.get_submodule(layer).weight
    T = torch.as_tensor(r.block_traces)
    expected = 2 * T @ W.detach() / (W.shape[1] if normalize == "m" else 1)
    torch.testing.assert_close(W.grad, expected, rtol=1e-9, atol=1e-12)
    for name, p in model.named_parameters():
        if name != f"{layer}.weight":
            assert p.grad is None, f"frozen penalty sent a gradient to {name}"


# ------------------------------------------------------------------ the caller's model


def bn_dropout_model():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 5)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def test_penalty_leaves_the_model_alone_and_backward_fills_its_grads(batch):
    X, y = batch
    model = bn_dropout_model()
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        F.cross_entropy(model(X), y).backward()  # BatchNorm statistics and leftover grads
    model[0].bias.requires_grad_(False)
    before = model_state(model)
    rng = torch.get_rng_state()
    value = fam.penalty(model, (X, y), "4")
    assert_same_state(before, model_state(model))
    assert torch.equal(torch.get_rng_state(), rng)
    # evaluated like relative_flatness: dropout off, BatchNorm on running statistics
    assert value.item() == pytest.approx(fv.relative_flatness(model, (X, y), "4").value,
                                         rel=EXACT)
    # the graph reaches the live parameters (not frozen ones): .grad accumulates
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(fam.penalty(model, (X, y), "4"), trainable)
    old = [p.grad.clone() for p in trainable]
    (0.5 * value).backward()
    for p, g, g0 in zip(trainable, expected, old):
        torch.testing.assert_close(p.grad, g0 + 0.5 * g)
    assert torch.equal(model[0].bias.grad, before["grads"][1])


def test_penalty_bad_input(batch):
    X, y = batch
    model = tiny_mlp([64, 6, 5])
    with pytest.raises(ValueError, match="'exact', 'frozen'"):
        fam.penalty(model, (X, y), "2", gradient="approximate")
    with pytest.raises(ValueError, match="normalize"):
        fam.penalty(model, (X, y), "2", normalize="d")
    with pytest.raises(ValueError, match="only Linear/Conv2d layers"):
        fam.penalty(model, (X, y), "1")
    with pytest.raises(ValueError, match="unknown layer"):
        fam.penalty(model, (X, y), "fc9")
    with pytest.raises(ValueError, match="loss"):
        fam.penalty(model, (X, y), "2", loss="hinge")
    with pytest.raises(ValueError, match="targets"):
        fam.penalty(model, (X, y + 5), "2")
    with pytest.raises(ValueError, match="no nn.Linear"):
        fam.penalty(nn.Sequential(nn.ReLU()), (X, y))


# ---------------------------------------------------------------------------- SAM, ASAM


def small_net(seed=0):
    return tiny_mlp([64, 6, 5], seed=seed)


def sam_run(make_base, rho, steps, X, y, adaptive=False):
    model = small_net()
    opt = fam.SAM(make_base(model), rho=rho, adaptive=adaptive)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return model


@pytest.mark.parametrize("make_base", [
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
], ids=["sgd", "adam"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_with_rho_zero_is_the_base_optimizer(batch, make_base, adaptive):
    X, y = batch
    reference = small_net()
    base = make_base(reference)
    for _ in range(3):
        base.zero_grad()
        F.cross_entropy(reference(X), y).backward()
        base.step()
    model = sam_run(make_base, 0.0, 3, X, y, adaptive=adaptive)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    moved = sam_run(make_base, 0.05, 3, X, y, adaptive=adaptive)
    assert not all(torch.equal(a, b) for a, b in zip(moved.parameters(), reference.parameters()))


def test_sam_perturbation_and_return(batch):
    X, y = batch
    model = small_net()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = fam.SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.3)
    F.cross_entropy(model(X), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    opt.first_step()
    for p, t, gi in zip(model.parameters(), theta, g):
        torch.testing.assert_close(p.detach() - t, 0.3 * gi / norm)
    opt.second_step()  # lr = 0: back at theta exactly
    for p, t in zip(model.parameters(), theta):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="rho"):
        fam.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=-0.1)
    with pytest.raises(TypeError, match="Optimizer instance"):
        fam.SAM(torch.optim.SGD, rho=0.1)


@pytest.mark.parametrize("named", [True, False])
def test_asam_scales_weights_and_not_biases(batch, named):
    X, y = batch
    model = small_net()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.mul_(50.0)  # big biases: scaling them would show
    params = model.named_parameters() if named else model.parameters()
    eta, rho = 0.01, 0.5
    opt = fam.SAM(torch.optim.SGD(params, lr=0.1), rho=rho, adaptive=True, eta=eta)
    F.cross_entropy(model(X), y).backward()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    scale = {n: (theta[n].abs() + eta) if n.endswith("weight") else torch.ones_like(theta[n])
             for n in theta}
    norm = torch.sqrt(sum((scale[n] * grads[n]).pow(2).sum() for n in theta))
    opt.first_step()
    for n, p in model.named_parameters():
        expected = rho * scale[n] ** 2 * grads[n] / norm
        torch.testing.assert_close(p.detach() - theta[n], expected, rtol=1e-9, atol=1e-14)
    assert "ASAM" in repr(opt)


def test_frozen_running_stats_restores_batchnorm(batch):
    X, _ = batch
    model = bn_dropout_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with fam.frozen_running_stats(model):
        model(X)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    model(X)
    assert not torch.equal(model[1].running_mean, state["1.running_mean"])


# ------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def split(digits_small):
    X, y = digits_small
    return (X[:150], y[:150]), (X[150:], y[150:])


def comparable(history):
    d = history.to_dict()
    d.pop("time_per_step")
    return d


def test_train_reproducible_and_input_untouched(split):
    train_data, test_data = split
    model = bn_dropout_model()  # dropout draws random numbers; BatchNorm has state
    model.eval()
    before = model_state(model)
    rng = torch.get_rng_state()
    runs = [fam.train(model, train_data, test_data, "fam", lam=0.01, epochs=2, batch_size=32,
                      seed=seed, progress=False) for seed in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used"
    assert_same_state(before, model_state(model))
    (a, ha), (b, hb), (c, hc) = runs
    assert comparable(ha) == comparable(hb)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    assert comparable(ha) != comparable(hc)
    assert a is not model and not a.training  # the copy comes back in the input's modes
    assert all(p.grad is None for p in a.parameters())
    # BatchNorm/dropout model: the penalty gets its own evaluation-mode forward pass
    assert ha.forward_passes[0] == 2 * ha.steps[0] and ha.penalty_path == "softmax"
    assert ha.seed == 7 and len(ha) == 2 and ha.epoch == (1, 2)


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_sam_updates_batchnorm_statistics_once_per_step(split, method):
    train_data, _ = split
    trained, h = fam.train(bn_dropout_model(), train_data, method=method, epochs=1,
                           batch_size=50, seed=0, progress=False, track_kappa=False)
    assert int(trained[1].num_batches_tracked) == h.steps[0] == 3
    assert h.forward_passes[0] == h.backward_passes[0] == 6
    assert h.rho == fam.DEFAULT_RHO[method] and h.lam is None


def test_fam_lowers_kappa_relative_to_sgd(split):
    train_data, test_data = split
    model = tiny_mlp([64, 16, 5], seed=0)
    kw = dict(epochs=8, batch_size=32, lr=0.05, seed=0, progress=False)
    _, sgd = fam.train(model, train_data, test_data, "sgd", **kw)
    _, famh = fam.train(model, train_data, test_data, "fam", lam=0.05, **kw)
    assert famh.kappa[-1] < 0.6 * sgd.kappa[-1]
    assert famh.train_accuracy[-1] > sgd.train_accuracy[-1] - 0.1  # and still learns
    assert math.isnan(sgd.penalty[-1]) and famh.penalty[-1] > 0
    assert famh.penalty_path == "softmax" and famh.lam == 0.05
    assert sgd.forward_passes == sgd.backward_passes == famh.forward_passes == (5,) * 8


@pytest.mark.parametrize("layer, gradient, passes", [
    ("0", "exact", (1, 2)),  # Gauss-Newton route: one batched backward for A, then the step
    ("2", "frozen", (1, 1)),
])
def test_fam_hidden_layer_and_frozen(split, layer, gradient, passes):
    train_data, _ = split
    _, h = fam.train(tiny_mlp([64, 16, 5], seed=0), train_data, method="fam", epochs=1,
                     batch_size=50, layer=layer, gradient=gradient, seed=0, progress=False)
    assert (h.forward_passes[0], h.backward_passes[0]) == tuple(3 * k for k in passes)
    assert h.layer == layer and h.gradient == gradient
    assert h.kappa[0] == pytest.approx(
        fv.relative_flatness(_, train_data, layer).value, rel=EXACT)


def test_callbacks_stop_early(split):
    train_data, _ = split
    seen = []

    def stop_at_two(epoch, model, history):
        seen.append((epoch, len(history)))
        return epoch == 2

    def raise_at_one(epoch, model, history):
        raise fam.StopTraining

    _, h = fam.train(small_net(), train_data, epochs=5, seed=0, progress=False,
                     callbacks=[stop_at_two], track_kappa=False)
    assert len(h) == 2 and h.stopped_early and seen == [(1, 1), (2, 2)]
    _, h = fam.train(small_net(), train_data, epochs=5, seed=0, progress=False,
                     callbacks=[raise_at_one], track_kappa=False)
    assert len(h) == 1 and h.stopped_early
    _, h = fam.train(small_net(), train_data, epochs=1, seed=0, progress=False,
                     callbacks=[stop_at_two], track_kappa=False)
    assert len(h) == 1 and not h.stopped_early


def test_history_is_plain_data_and_progress_is_silent(split, capsys):
    train_data, test_data = split
    _, h = fam.train(small_net(), train_data, test_data, "asam", rho=0.2, epochs=2, seed=3,
                     progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    d = json.loads(json.dumps(h.to_dict()))
    assert d["method"] == "asam" and d["rho"] == 0.2 and d["eta"] == fam.ASAM_ETA
    assert len(d["test_accuracy"]) == 2 and 0 <= d["test_accuracy"][-1] <= 1
    assert h.last()["epoch"] == 2 and h.num_test == len(test_data[0])
    with pytest.raises(dataclasses_error()):
        h.method = "sgd"
    # no test data: NaN test columns; the same seed drawn at random is recorded
    _, h = fam.train(small_net(), train_data, epochs=1, progress=False, track_kappa=False)
    assert math.isnan(h.test_loss[0]) and math.isnan(h.kappa[0]) and isinstance(h.seed, int)


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="adam"), ValueError, "'sgd', 'fam', 'sam', 'asam'"),
    (dict(method="fam", lam=-0.1), ValueError, "lam must be >= 0"),
    (dict(method="sam", rho=-1.0), ValueError, "rho must be >= 0"),
    (dict(epochs=0), ValueError, "epochs must be >= 1"),
    (dict(epochs=1.5), ValueError, "epochs must be an integer"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(lr=0.0), ValueError, "lr must be > 0"),
    (dict(momentum=1.0), ValueError, "momentum must be < 1"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
    (dict(layer="1"), ValueError, "only Linear/Conv2d layers are supported"),
    (dict(layer=2), TypeError, "module name"),
    (dict(gradient="approx"), ValueError, "'exact', 'frozen'"),
    (dict(normalize="d"), ValueError, "normalize"),
    (dict(loss="hinge"), ValueError, "'cross_entropy', 'mse'"),
    (dict(lam="big", method="fam"), TypeError, "lam must be a number"),
    (dict(callbacks=[1]), TypeError, "callables"),
])
def test_train_bad_input(split, kwargs, error, match):
    train_data, _ = split
    with pytest.raises(error, match=match):
        fam.train(small_net(), train_data, progress=False, **kwargs)


def test_train_bad_data(split):
    (X, y), _ = split
    with pytest.raises(ValueError, match="outputs"):
        fam.train(small_net(), (X, y + 10), progress=False)
    with pytest.raises(ValueError, match="cannot evaluate inputs"):
        fam.train(small_net(), (X[:, :10], y), progress=False)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fam.train(small_net(), (bad, y), progress=False)


def test_divergence_is_reported(split):
    (X, y), _ = split
    Y = F.one_hot(y, 5).float()
    with pytest.raises(FloatingPointError, match="lower lr"):  # float32 overflows quickly
        fam.train(fv.models.mlp([64, 6, 5]), (X.float(), Y), loss="mse", lr=1e3, epochs=8,
                  seed=0, progress=False, track_kappa=False)


def test_make_step_trains_in_place(batch):
    X, y = batch
    model = small_net()
    w0 = model[2].weight.detach().clone()
    step = fam.make_step(model, "fam", lam=0.1, layer="2")
    info = step(X, y)
    assert not torch.equal(model[2].weight, w0)
    assert info.penalty == pytest.approx(
        fv.relative_flatness(tiny_mlp([64, 6, 5]), (X, y), "2").value, rel=EXACT)
    assert (info.forward_passes, info.backward_passes) == (1, 1)


@pytest.mark.parametrize("layer, gradient", [("2", "exact"), ("2", "frozen"), ("0", "exact"),
                                             ("0", "frozen")])
def test_fam_step_is_sgd_on_loss_plus_penalty(batch, layer, gradient):
    """The training step (shared forward pass; frozen: 2TW added to W's gradient directly)
    equals SGD with momentum on loss + λ·penalty(...) computed by the public function."""
    X, y = batch
    lam, kw = 0.3, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    model = small_net()
    step = fam.make_step(model, "fam", lam=lam, layer=layer, gradient=gradient,
                         normalize="m", **kw)
    reference = small_net()
    opt = torch.optim.SGD(reference.parameters(), **kw)
    for i in range(2):
        xb, yb = X[16 * i:16 * i + 24], y[16 * i:16 * i + 24]
        step(xb, yb)
        opt.zero_grad()
        (F.cross_entropy(reference(xb), yb)
         + lam * fam.penalty(reference, (xb, yb), layer, normalize="m",
                             gradient=gradient)).backward()
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_train_custom_module_takes_the_hvp_route(split):
    train_data, _ = split
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = TwoLayer().double()
    _, h = fam.train(model, train_data, method="fam", layer="hidden", epochs=1, batch_size=50,
                     seed=0, progress=False)
    assert h.penalty_path == "hvp" and h.steps == (3,)
    assert (h.forward_passes[0], h.backward_passes[0]) == (3, 9)
    assert h.kappa[0] == pytest.approx(fv.relative_flatness(_, train_data, "hidden").value,
                                       rel=EXACT)


def test_a_callable_loss_is_never_taken_for_a_named_one():
    """A user's function called ``mse`` (here sum-reduced) is a custom loss: HVP route."""
    def mse(out, target):
        return ((out - target) ** 2).sum()

    model = tiny_mlp([4, 6, 3])
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    Y = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    assert fam.penalty_path(model, (X, Y), "2", mse) == "hvp"
    kappa, _ = relative_flatness_bruteforce(model, (X, Y), "2", loss=mse)
    assert fam.penalty(model, (X, Y), "2", mse).item() == pytest.approx(kappa, rel=1e-9)


def _sam_run(model, X, y, steps, *, scheduler=False, scaler=None, closure_api=True):
    """SAM steps on a fixed batch, with the closure API or first_step / step (the way
    GradScaler drives an optimizer)."""
    opt = fam.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    lrs = []
    for _ in range(steps):
        if closure_api:
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(X), y)
                loss.backward()
                return loss
            opt.step(closure)
        else:
            scale = (lambda t: scaler.scale(t)) if scaler is not None else (lambda t: t)
            opt.zero_grad()
            scale(torch.nn.functional.cross_entropy(model(X), y)).backward()
            opt.first_step()  # the ascent uses the gradient's direction: no unscaling
            opt.zero_grad()
            scale(torch.nn.functional.cross_entropy(model(X), y)).backward()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step()
    return lrs


def test_sam_is_an_optimizer_for_schedulers_and_grad_scalers():
    X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 3
    ref = fv.models.mlp([4, 8, 3], seed=0)
    assert isinstance(fam.SAM(torch.optim.SGD(ref.parameters(), lr=0.1)), torch.optim.Optimizer)
    lrs = _sam_run(ref, X, y, 5, scheduler=True)
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025]  # the scheduler drove the base optimizer
    for api in ({"closure_api": False},
                {"closure_api": False,
                 "scaler": torch.amp.GradScaler("cpu", init_scale=2.0**10)}):
        other = fv.models.mlp([4, 8, 3], seed=0)
        _sam_run(other, X, y, 5, scheduler=True, **api)
        for a, b in zip(ref.parameters(), other.parameters()):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="completes a step begun with first_step"):
        fam.SAM(torch.optim.SGD(ref.parameters(), lr=0.1)).step()


@pytest.mark.parametrize("layer", ["4", "2"])  # the output layer (softmax), a hidden layer
@pytest.mark.parametrize("gradient", ["exact", "frozen"])
def test_penalty_tap_reuses_the_training_forward(layer, gradient):
    """The penalty from the caller's own forward pass equals the standalone penalty, value and
    gradient, with one forward pass fewer; the hook is gone after the block."""
    X = torch.randn(40, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(40) % 4
    model = fv.models.mlp([6, 8, 7, 4], seed=3).double()
    ref = fam.penalty(model, (X, y), layer, gradient=gradient)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    tap = fam.PenaltyTap(model, layer, gradient=gradient)
    for _ in range(2):  # the second step reuses the planned route
        with tap:
            out = model(X)
        value = tap.penalty(out, y)
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    assert float(value) == pytest.approx(float(ref), rel=1e-12)
    for a, b in zip(grads, ref_grads):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="has not run"):
        tap.penalty(out, y)


def test_train_takes_any_optimizer_and_a_device():
    train_data, test_data = fv.data.moons(n_samples=80, seed=0)
    model = fv.models.mlp([2, 8, 2], seed=0)
    _, adam = fam.train(model, train_data, epochs=2, optimizer="adam", lr=0.01, seed=0,
                        progress=False)
    factory = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    _, made = fam.train(model, train_data, epochs=2, optimizer=factory, seed=0, progress=False)
    assert adam.train_loss == made.train_loss and adam.optimizer == "adam"
    _, sgd = fam.train(model, train_data, epochs=2, seed=0, progress=False)
    assert sgd.train_loss != adam.train_loss
    _, sam_adam = fam.train(model, train_data, epochs=1, method="sam", optimizer="adam",
                            lr=0.01, seed=0, progress=False)
    assert len(sam_adam) == 1
    trained, h = fam.train(model, train_data, epochs=1, seed=0, device="cpu", progress=False)
    assert h.device == "cpu" and next(trained.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        fam.train(model, train_data, optimizer="rmsprop")
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer"):
        fam.train(model, train_data, optimizer=lambda params: None, progress=False)
