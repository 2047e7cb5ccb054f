"""The FAM penalty of Conv2d layers, and its steady state without host synchronizations.

Oracles (float64): ``famviz.relative_flatness`` with ``method="exact"`` (d·m Hessian-vector
products in the weight), a dense ``torch.func`` Hessian of the conv weight contracted as
``einsum('ikjk->ij')`` and differentiated once more by ``torch.func.grad``, and
``torch.autograd.gradcheck`` (finite differences) on tiny cases.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import famviz as fv
from famviz import fam

EXACT = 1e-10  # two exact computations of the same number


def smooth_loss(out, target):
    """A per-sample loss with no closed form: it forces the HVP route."""
    return F.cross_entropy(out, target) + 0.05 * out.pow(4).mean()


def conv_net(seed, act=nn.ReLU, stride=1, padding=1, classes=4, bias=True):
    """conv (2 -> 3, 3x3) -> act -> conv (3 -> 2, 2x2, stride) -> act -> flatten -> linear."""
    gen = torch.Generator().manual_seed(seed)
    second = nn.Conv2d(3, 2, 2, stride=stride, padding=padding, bias=bias)
    side = (6 + 2 * padding - 2) // stride + 1
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), act(), second, act(),
                          nn.Flatten(), nn.Linear(2 * side * side, classes)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model


def images(n=10, seed=0, classes=4):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.float64)
    return X, torch.randint(0, classes, (n,), generator=gen)


def kappa_oracle(model, X, y, layer, loss_fn):
    """κ(θ) as a pure function of the parameter dict, from the dense Hessian of the weight W
    (any shape, seen as d×m)."""
    wname = f"{layer}.weight"

    def kappa(params):
        W = params[wname]
        d, m = W.shape[0], W[0].numel()

        def E(flat):
            return loss_fn(functional_call(model, {**params, wname: flat.reshape(W.shape)},
                                           (X,)), y)

        H = torch.func.hessian(E)(W.reshape(-1)).reshape(d, m, d, m)
        Wm = W.reshape(d, m)
        return ((Wm @ Wm.T) * torch.einsum("ikjk->ij", H)).sum()

    return kappa


# (layer, activation, stride, padding, loss, route)
CASES = [
    ("0", nn.ReLU, 1, 1, "cross_entropy", "gauss_newton"),
    ("2", nn.ReLU, 1, 1, "cross_entropy", "gauss_newton"),
    ("2", nn.ReLU, 2, 0, "cross_entropy", "gauss_newton"),
    ("0", nn.ReLU, 2, 1, "mse", "gauss_newton"),
    ("2", nn.Tanh, 1, 0, "cross_entropy", "hvp"),
    ("0", nn.ReLU, 1, 1, smooth_loss, "hvp"),
]
IDS = ["first-ce", "second-ce", "second-stride2-ce", "first-mse", "tanh-hvp", "custom-loss"]


def _targets(loss, y, classes=4):
    return F.one_hot(y, classes).double() if loss == "mse" else y


@pytest.mark.parametrize("layer, act, stride, padding, loss, route", CASES, ids=IDS)
def test_conv_penalty_equals_relative_flatness_and_dense_oracle(layer, act, stride, padding,
                                                                 loss, route):
    model = conv_net(1, act, stride, padding)
    X, y = images()
    y = _targets(loss, y)
    assert fam.penalty_path(model, (X, y), layer, loss) == route
    loss_fn = loss if callable(loss) else {"cross_entropy": F.cross_entropy,
                                           "mse": F.mse_loss}[loss]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense = float(kappa_oracle(model, X, y, layer, loss_fn)(params))
    exact = fv.relative_flatness(model, (X, y), layer, loss=loss, method="exact")
    assert exact.value == pytest.approx(dense, rel=1e-9)
    m = model.get_submodule(layer).weight[0].numel()
    for gradient in ("exact", "frozen"):
        value = fam.penalty(model, (X, y), layer, loss, gradient=gradient)
        assert value.dtype == torch.float64 and value.item() == pytest.approx(dense, rel=EXACT)
        normalized = fam.penalty(model, (X, y), layer, loss, normalize="m", gradient=gradient)
        assert normalized.item() == pytest.approx(dense / m, rel=EXACT)


@pytest.mark.parametrize("layer, act, stride, padding, loss, route", CASES, ids=IDS)
def test_conv_penalty_exact_gradient_matches_torch_func(layer, act, stride, padding, loss,
                                                        route):
    model = conv_net(2, act, stride, padding)
    X, y = images(8, seed=1)
    y = _targets(loss, y)
    loss_fn = loss if callable(loss) else {"cross_entropy": F.cross_entropy,
                                           "mse": F.mse_loss}[loss]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = torch.func.grad(kappa_oracle(model, X, y, layer, loss_fn))(params)
    value = fam.penalty(model, (X, y), layer, loss)
    got = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    for (name, _), g in zip(model.named_parameters(), got):
        g = torch.zeros_like(expected[name]) if g is None else g
        torch.testing.assert_close(g, expected[name], rtol=1e-8,
                                   atol=1e-10 * float(expected[name].abs().max()) + 1e-14,
                                   msg=name)
    # the gradient reaches the conv weight and the layers below it (through the patches)
    assert float(expected[f"{layer}.weight"].abs().max()) > 0
    if layer == "2":
        assert float(expected["0.weight"].abs().max()) > 0


def test_conv_frozen_gradient_is_2TW_on_the_weight_only():
    model = conv_net(3)
    X, y = images()
    fam.penalty(model, (X, y), "2", gradient="frozen").backward()
    T = torch.as_tensor(fv.relative_flatness(model, (X, y), "2").block_traces)
    W = model[2].weight
    expected = (2 * T @ W.detach().reshape(len(T), -1)).reshape(W.shape)
    torch.testing.assert_close(W.grad, expected, rtol=1e-9, atol=1e-13)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "2.weight")


def tiny_conv(act):
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), act(), nn.Flatten(), nn.Linear(18, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    X = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    return model, X, torch.tensor([0, 2, 1])


@pytest.mark.parametrize("act, route", [(nn.ReLU, "gauss_newton"), (nn.Tanh, "hvp")])
def test_conv_penalty_passes_gradcheck(act, route):
    """Finite differences in every parameter (gradcheck perturbs the model's own Parameter
    objects, which the penalty reads)."""
    model, X, y = tiny_conv(act)
    assert fam.penalty_path(model, (X, y), "0") == route
    params = tuple(model.parameters())
    assert torch.autograd.gradcheck(lambda *_: fam.penalty(model, (X, y), "0"), params,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_penalty_tap_and_training_step_on_a_conv_layer():
    """PenaltyTap equals the standalone penalty (value and gradient); one FAM step with a
    Conv2d feature layer is SGD on loss + λ·penalty, for both gradients."""
    model = conv_net(4)
    X, y = images(12, seed=2)
    for gradient in ("exact", "frozen"):
        ref = fam.penalty(model, (X, y), "0", gradient=gradient)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
        tap = fam.PenaltyTap(model, "0", gradient=gradient)
        for _ in range(2):
            with tap:
                out = model(X)
            value = tap.penalty(out, y)
        assert tap.path == "gauss_newton"
        assert float(value) == pytest.approx(float(ref), rel=1e-12)
        grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
        for a, b in zip(grads, ref_grads):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-10, atol=1e-14)

        lam, kw = 0.2, dict(lr=0.05, momentum=0.9)
        trained, reference = conv_net(4), conv_net(4)
        step = fam.make_step(trained, "fam", lam=lam, layer="2", gradient=gradient, **kw)
        opt = torch.optim.SGD(reference.parameters(), **kw)
        for i in range(2):
            xb, yb = X[4 * i:4 * i + 8], y[4 * i:4 * i + 8]
            info = step(xb, yb)
            opt.zero_grad()
            pen = fam.penalty(reference, (xb, yb), "2", gradient=gradient)
            assert info.penalty == pytest.approx(float(pen), rel=1e-10)
            (F.cross_entropy(reference(xb), yb) + lam * pen).backward()
            opt.step()
        for a, b in zip(trained.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_train_takes_a_conv_layer():
    model = conv_net(5)
    X, y = images(24, seed=3)
    trained, h = fam.train(model, (X, y), method="fam", layer="2", epochs=1, batch_size=12,
                           seed=0, progress=False)
    assert h.layer == "2" and h.penalty_path == "gauss_newton"
    assert h.kappa[0] == pytest.approx(fv.relative_flatness(trained, (X, y), "2").value,
                                       rel=1e-10)


def test_resnet_conv_layers_take_the_gauss_newton_route():
    """A ReLU ResNet (residual additions, BatchNorm on running statistics) is not a plain
    stack: its torch.fx graph proves the Gauss-Newton route, as for relative_flatness."""
    model = fv.models.resnet((1, 1), (3, 4), num_classes=3, seed=0).double()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=buf.dtype) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen, dtype=buf.dtype) + 0.5)
    X = torch.randn(6, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in ("layer2.0.conv1", "layer1.0.conv2"):
        assert fam.penalty_path(model, (X, y), layer) == "gauss_newton"
        model.eval()
        dense = float(kappa_oracle(model, X, y, layer, F.cross_entropy)(params))
        model.train()
        assert fam.penalty(model, (X, y), layer).item() == pytest.approx(dense, rel=EXACT)
    model.eval()  # the tap evaluates the caller's pass: in eval mode it is the same number
    tap = fam.PenaltyTap(model, "layer2.0.conv1")
    with tap:
        out = model(X)
    assert tap.penalty(out, y).item() == pytest.approx(
        fam.penalty(model, (X, y), "layer2.0.conv1").item(), rel=1e-12)


def test_conv_refusals():
    model = conv_net(6)
    X, y = images()
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(),
                            nn.Linear(64, 4)).double()
    with pytest.raises(ValueError, match="groups=2"):
        fam.penalty(grouped, (X, y), "0")
    with pytest.raises(ValueError, match="only Linear/Conv2d layers"):
        fam.penalty(model, (X, y), "1")
    # the HVP route over every position of a wide layer would not fit: refused up front
    wide = nn.Sequential(nn.Conv2d(2, 8, 1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * 144, 4)).double()
    big = torch.zeros(120, 2, 12, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="1152 Hessian-vector products per sample"):
        fam.penalty(wide, (big, torch.zeros(120, dtype=torch.long)), "0")


def test_linear_on_sequences_takes_the_position_routes():
    """A Linear applied per token ((N, T, F) inputs) is the same view with positions = T."""
    gen = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Flatten(), nn.Linear(20, 3)).double()
    X = torch.randn(9, 5, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense = float(kappa_oracle(model, X, y, "0", F.cross_entropy)(params))
    assert fam.penalty_path(model, (X, y), "0") == "gauss_newton"
    assert fam.penalty(model, (X, y), "0").item() == pytest.approx(dense, rel=EXACT)
    model[1] = nn.Tanh()
    dense = float(kappa_oracle(model, X, y, "0", F.cross_entropy)(params))
    assert fam.penalty_path(model, (X, y), "0") == "hvp"
    assert fam.penalty(model, (X, y), "0").item() == pytest.approx(dense, rel=EXACT)


# ------------------------------------------------------------------ no host synchronization


class _SyncCounter:
    """Counts the Python-level ways of reading a tensor's value on the host (``item``,
    ``bool``, ``int``, ``float``, ``tolist``, ``numpy``): each is a device synchronization on
    an accelerator. Device-side assertions (``torch._assert_async``) are not among them."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *args, _name=name, _original=original, **kw):
                self.calls.append(_name)
                return _original(t, *args, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("layer", ["4", "2"])  # softmax route, Gauss-Newton route
@pytest.mark.parametrize("gradient", ["exact", "frozen"])
def test_steady_state_penalty_reads_nothing_on_the_host(monkeypatch, layer, gradient):
    model = fv.models.mlp([6, 8, 7, 4], seed=3).double()
    X = torch.randn(40, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(40) % 4
    tap = fam.PenaltyTap(model, layer, gradient=gradient)
    with tap:  # the first call checks the targets (on the host) and plans the route
        tap.penalty(model(X), y)
    counter = _SyncCounter(monkeypatch)
    with tap:
        out = model(X)
    value = tap.penalty(out, y)
    value.backward()
    standalone = fam.penalty(model, (X, y), layer, gradient=gradient)
    standalone.backward()
    assert counter.calls == []
    monkeypatch.undo()
    assert float(value) == pytest.approx(float(standalone), rel=1e-12)


def test_device_side_checks_still_refuse_bad_batches():
    """The standalone penalty checks targets and inputs on the device, every call; on the CPU
    that raises at once with the detailed message."""
    model = fv.models.mlp([6, 8, 4], seed=0).double()
    X = torch.randn(10, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(10) % 4
    fam.penalty(model, (X, y), "2")
    with pytest.raises(ValueError, match=r"targets y range over \[4, 7\]"):
        fam.penalty(model, (X, y + 4), "2")
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        fam.penalty(model, (X * float("inf"), y), "2")
    probs = torch.full((10, 4), 0.3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to 1"):
        fam.penalty(model, (X, probs), "2")
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        fam.penalty(model, (X, probs * float("nan")), "2")
