"""Relative flatness of Conv2d layers and of Linear layers on (N, ..., F) inputs, against the
dense torch.func oracle (float64), and its invariances under channel-wise rescalings."""

import numpy as np
import pytest
import torch
from torch import nn

import famviz as fv
from famviz.measures import relative
from famviz.oracles import dense_hessian, relative_flatness_bruteforce
from famviz.piecewise import piecewise_linear_graph

RTOL = 1e-5

CONVS = {
    "3x3 pad 1": dict(kernel_size=3, padding=1),
    "2x3 stride 2 dilation": dict(kernel_size=(2, 3), stride=2, padding=(1, 0), dilation=(1, 2)),
    "reflect padding": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "same, dilation 2": dict(kernel_size=3, padding="same", dilation=2),
    "valid, no bias": dict(kernel_size=2, bias=False),
    "circular, stride (2, 1)": dict(kernel_size=3, stride=(2, 1), padding=(1, 2),
                                    padding_mode="circular"),
}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 2, 7, 7, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (10,), generator=g)


def _init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def conv_net(X, seed=0, act=nn.ReLU, **conv):
    """conv "0" (2 -> 3 channels) -> act -> conv "2" (3 -> 2, 2x2) -> act -> flatten -> "5"."""
    c0 = nn.Conv2d(2, 3, **conv).double()
    c2 = nn.Conv2d(3, 2, 2).double()
    n = c2(c0(X[:1])).numel()
    model = nn.Sequential(c0, act(), c2, act(), nn.Flatten(), nn.Linear(n, 3).double())
    return _init(model, seed)


@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("layer", ["0", "2"])
def test_conv_closed_form_and_exact_equal_the_dense_oracle(images, case, layer):
    model = conv_net(images[0], seed=1, **CONVS[case])
    kappa, T = relative_flatness_bruteforce(model, images, layer)
    d = model.get_submodule(layer).weight.shape[0]
    for method in ("closed_form", "exact"):
        r = fv.relative_flatness(model, images, layer, method=method)
        assert r.method == method and r.shape == (d, model.get_submodule(layer).weight[0].numel())
        assert r.value == pytest.approx(kappa, rel=RTOL)
        np.testing.assert_allclose(r.block_traces, T.numpy(), rtol=RTOL, atol=1e-12)
    auto = fv.relative_flatness(model, images, layer)
    assert auto.method == "closed_form" and auto.num_hvps == 0


def test_cross_position_terms_matter(images):
    """Dropping the couplings between positions (p != q) gives a different, wrong κ."""
    model = conv_net(images[0], seed=2, kernel_size=3, padding=1)
    r = fv.relative_flatness(model, images, "0")
    X, y = images
    # diagonal-in-position part: each output position as its own sample of a Linear layer
    obj = fv.objective.Objective(model, images)
    with obj.capture(["0"]) as cap:
        out = obj.forward({}, X)
    from famviz.curvature import loss_hessian_factor
    from famviz.patches import patches
    S = loss_hessian_factor("cross_entropy", out.detach())
    (g,) = torch.autograd.grad(out, cap["0"]["z"], S, is_grads_batched=True)
    delta = g.reshape(*g.shape[:3], -1)  # (C, N, d, P)
    phi = patches(model[0], cap["0"]["phi"].detach())  # (N, P, m)
    T_diag = torch.einsum("cnsp,cntp,np->st", delta, delta, phi.pow(2).sum(-1)) / len(X)
    W = model[0].weight.detach().reshape(3, -1)
    kappa_diag = float(((W @ W.T) * T_diag).sum())
    assert abs(kappa_diag - r.value) > 1e-2 * r.value


def test_conv_hutchinson_converges_with_covering_stderr(images):
    model = conv_net(images[0], seed=3, kernel_size=3, padding=1)
    exact = fv.relative_flatness(model, images, "0", method="exact")
    r = fv.relative_flatness(model, images, "0", method="hutchinson", probes=300, seed=0)
    assert r.method == "hutchinson" and r.num_hvps == 300 * 3 and r.seed == 0
    assert abs(r.value - exact.value) <= 4 * r.stderr
    assert abs(r.value - exact.value) <= 0.15 * exact.value
    again = fv.relative_flatness(model, images, "0", method="hutchinson", probes=300, seed=0)
    assert again.value == r.value


def test_conv_neuronwise_max_and_normalize_m(images):
    model = conv_net(images[0], seed=4, kernel_size=3, padding=1)
    H, _ = dense_hessian(model, images, params="0.weight")
    H = H.reshape(3, 18, 3, 18)
    W = model[0].weight.detach().reshape(3, 18)
    expected = sum(float(W[s].pow(2).sum() * torch.linalg.eigvalsh(H[s, :, s, :])[-1])
                   for s in range(3))
    for method in ("closed_form", "exact"):
        r = fv.relative_flatness(model, images, "0", method=method, variant="neuronwise_max")
        assert r.value == pytest.approx(expected, rel=RTOL)
    a = fv.relative_flatness(model, images, "0")
    b = fv.relative_flatness(model, images, "0", normalize="m")
    assert b.value == pytest.approx(a.value / 18, rel=1e-12)  # m = 2 channels x 3 x 3


def test_conv_before_a_smooth_activation_has_no_closed_form(images):
    model = conv_net(images[0], seed=5, act=nn.Tanh, kernel_size=3, padding=1)
    kappa, _ = relative_flatness_bruteforce(model, images, "0")
    r = fv.relative_flatness(model, images, "0")
    assert r.method == "exact" and r.num_hvps == 54
    assert r.value == pytest.approx(kappa, rel=RTOL)
    with pytest.raises(ValueError, match="no closed form"):
        fv.relative_flatness(model, images, "0", method="closed_form")


def test_conv_output_layer_with_mse(images):
    X, _ = images
    model = _init(nn.Sequential(nn.Conv2d(2, 2, 3, stride=2)).double(), 6)
    Y = torch.randn(model(X).shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    kappa, _ = relative_flatness_bruteforce(model, (X, Y), "0", loss="mse")
    r = fv.relative_flatness(model, (X, Y), "0", loss="mse")
    assert r.method == "closed_form" and r.value == pytest.approx(kappa, rel=RTOL)


def test_conv_batches_give_the_full_data_result(images):
    X, y = images
    model = conv_net(X, seed=7, kernel_size=3, padding=1)
    whole = fv.relative_flatness(model, images, "0")
    parts = fv.relative_flatness(model, [(X[:3], y[:3]), (X[3:], y[3:])], "0")
    assert parts.value == pytest.approx(whole.value, rel=1e-12)


def test_unsupported_convs_are_refused_clearly(images):
    X, y = images
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    model(X.float())
    model = model.double()
    with pytest.raises(ValueError, match="groups=2.*groups=1"):
        fv.relative_flatness(model, images, "0")
    plain = conv_net(X, kernel_size=3)
    with pytest.raises(ValueError, match="normalize_features=True is implemented for Linear"):
        fv.relative_flatness(plain, images, "0", normalize_features=True)
    with pytest.raises(ValueError, match=r"Linear/Conv2d layers of this model: \['0', '2', '5'\]"):
        fv.relative_flatness(plain, images, "1")


# ------------------------------------------------------------------ Linear on (N, ..., F) inputs


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 4, 5, generator=g, dtype=torch.float64)  # N, T, F
    return X, torch.randint(0, 3, (12,), generator=g)


class MeanPool(nn.Module):
    """token-wise Linear -> act -> mean over tokens -> Linear (not an nn.Sequential)."""

    def __init__(self, act, hidden=6, features=5):
        super().__init__()
        self.token = nn.Linear(features, hidden)
        self.act = act()
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(self.act(self.token(x)).mean(dim=1))


def test_linear_on_sequences_against_the_oracle(tokens):
    X, y = tokens
    model = _init(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)), 8)
    model = model.double()
    kappa, T = relative_flatness_bruteforce(model, tokens, "0")
    for method in ("closed_form", "exact"):
        r = fv.relative_flatness(model, tokens, "0", method=method)
        assert r.value == pytest.approx(kappa, rel=RTOL)
        np.testing.assert_allclose(r.block_traces, T.numpy(), rtol=RTOL, atol=1e-12)
    auto = fv.relative_flatness(model, tokens, "0")
    assert auto.method == "closed_form" and auto.num_hvps == 0
    blocks = fv.relative_flatness(model, tokens, "0", variant="neuronwise_max")
    exact = fv.relative_flatness(model, tokens, "0", method="exact", variant="neuronwise_max")
    assert blocks.value == pytest.approx(exact.value, rel=RTOL)


def test_linear_on_sequences_as_output_layer_with_mse(tokens):
    X, _ = tokens
    model = _init(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)), 9).double()
    Y = torch.randn(12, 4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for layer in ("0", "2"):
        kappa, _ = relative_flatness_bruteforce(model, (X, Y), layer, loss="mse")
        r = fv.relative_flatness(model, (X, Y), layer, loss="mse")
        assert r.method == "closed_form" and r.value == pytest.approx(kappa, rel=RTOL)


def test_linear_on_sequences_in_a_custom_module(tokens):
    relu = _init(MeanPool(nn.ReLU), 10).double()
    tanh = _init(MeanPool(nn.Tanh), 10).double()
    for model, method in ((relu, "closed_form"), (tanh, "exact")):  # fx proves ReLU's case
        kappa, _ = relative_flatness_bruteforce(model, tokens, "token")
        r = fv.relative_flatness(model, tokens, "token")
        assert r.method == method and r.value == pytest.approx(kappa, rel=RTOL)


def test_auto_on_a_wide_layer_stays_within_its_hvp_budget():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 3, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    model = _init(MeanPool(nn.Tanh, hidden=72, features=64), 11).double()  # d*m = 4608
    r = fv.relative_flatness(model, (X, y), "token", seed=0)
    assert r.method == "hutchinson_kappa" and r.num_hvps == relative.DEFAULT_PROBES
    assert r.stderr > 0 and r.seed == 0
    r2 = fv.relative_flatness(model, (X, y), "token", probes=3, seed=0)
    assert r2.num_hvps == 3


@pytest.mark.parametrize("shape", ["d < m", "d > m"])
def test_hutchinson_kappa_converges_with_covering_stderr(images, shape):
    X, y = images
    if shape == "d < m":  # conv "0": W is 3 x 18, W W^T invertible: T itself is estimated
        model, layer = conv_net(X, seed=16, kernel_size=3, padding=1), "0"
    else:  # 12 x 5: T only on the span of W W^T
        model = _init(nn.Sequential(nn.Flatten(), nn.Linear(98, 5), nn.ReLU(),
                                    nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)), 16).double()
        layer = "3"
    exact = fv.relative_flatness(model, images, layer, method="exact")
    r = fv.relative_flatness(model, images, layer, method="hutchinson_kappa", probes=3000,
                             seed=1)
    assert r.num_hvps == 3000 and r.seed == 1 and r.method == "hutchinson_kappa"
    assert abs(r.value - exact.value) <= 4 * r.stderr
    assert abs(r.value - exact.value) <= 0.05 * exact.value
    W = model.get_submodule(layer).weight.detach().reshape(len(r.block_traces), -1)
    assert float(((W @ W.T).numpy() * r.block_traces).sum()) == pytest.approx(r.value, rel=1e-8)
    if shape == "d < m":
        scale = np.abs(exact.block_traces).max()
        assert np.abs(r.block_traces - exact.block_traces).max() < 0.2 * scale
    again = fv.relative_flatness(model, images, layer, method="hutchinson_kappa", probes=3000,
                                 seed=1)
    assert again.value == r.value
    with pytest.raises(ValueError, match="neuronwise_max"):
        fv.relative_flatness(model, images, layer, method="hutchinson_kappa",
                             variant="neuronwise_max")


# ---------------------------------------------------------------------------------- invariances


def _rescale_channels(model, first, second, r, block=1):
    """Output channel s of conv ``first`` (weight, bias) x r_s; input channel s of ``second``
    (a conv, or a Linear after Flatten whose columns come in blocks of ``block``) / r_s."""
    new = fv.objective.replicate(model, {n: p.detach().clone() for n, p in
                                        model.named_parameters()})
    f, s = new.get_submodule(first), new.get_submodule(second)
    with torch.no_grad():
        f.weight.mul_(r[:, None, None, None])
        if f.bias is not None:
            f.bias.mul_(r)
        if isinstance(s, nn.Conv2d):
            s.weight.div_(r[None, :, None, None])
        else:
            s.weight.div_(r.repeat_interleave(block)[None, :])
    return new


def test_channel_rescaling_leaves_kappa_unchanged_and_moves_the_trace(images):
    X, _ = images
    model = conv_net(X, seed=12, kernel_size=3, padding=1)
    r = torch.tensor([4.0, 0.25, 3.0], dtype=torch.float64)
    new = _rescale_channels(model, "0", "2", r)
    assert fv.reparam.max_output_change(model, new, X) < 1e-12  # the same function
    for method in ("closed_form", "exact"):
        before = fv.relative_flatness(model, images, "0", method=method).value
        after = fv.relative_flatness(new, images, "0", method=method).value
        assert after == pytest.approx(before, rel=1e-9)
    tr = fv.hessian_trace(model, images, params="0.weight").value
    tr_new = fv.hessian_trace(new, images, params="0.weight").value
    assert abs(tr_new / tr - 1) > 0.1
    # the conv above sees its input channels rescaled (T2-like): its κ moves
    k2 = fv.relative_flatness(model, images, "2").value
    assert abs(fv.relative_flatness(new, images, "2").value / k2 - 1) > 0.1


def test_channel_rescaling_into_a_flattened_linear(images):
    X, _ = images
    model = conv_net(X, seed=13, kernel_size=3, padding=1)  # conv "2" output: 2 x 6 x 6
    r = torch.tensor([5.0, 0.2], dtype=torch.float64)
    new = _rescale_channels(model, "2", "5", r, block=36)
    assert fv.reparam.max_output_change(model, new, X) < 1e-12
    before = fv.relative_flatness(model, images, "2").value
    assert fv.relative_flatness(new, images, "2").value == pytest.approx(before, rel=1e-9)
    tr = fv.hessian_trace(model, images, params="2.weight").value
    assert abs(fv.hessian_trace(new, images, params="2.weight").value / tr - 1) > 0.1


def test_hutchinson_kappa_with_a_fixed_seed_is_invariant_too(images):
    X, _ = images
    model = conv_net(X, seed=21, kernel_size=3, padding=1)
    t3 = _rescale_channels(model, "0", "2", torch.tensor([4.0, 0.25, 3.0], dtype=torch.float64))
    t1 = _rescale_channels(model, "0", "2", torch.full((3,), 5.0, dtype=torch.float64))
    opts = dict(method="hutchinson_kappa", probes=20, seed=3)
    for layer, new in (("0", t3), ("2", t1)):
        before = fv.relative_flatness(model, images, layer, **opts)
        after = fv.relative_flatness(new, images, layer, **opts)
        assert after.value == pytest.approx(before.value, rel=1e-9)
        assert after.stderr == pytest.approx(before.stderr, rel=1e-9)
    other = fv.relative_flatness(model, images, "2", method="hutchinson_kappa", probes=20, seed=4)
    assert other.value != before.value  # the seed matters


def test_layerwise_rescaling_leaves_kappa_unchanged(images):
    X, _ = images
    model = conv_net(X, seed=14, kernel_size=3, padding=1)
    alpha = 7.0
    new = _rescale_channels(model, "0", "2", torch.full((3,), alpha, dtype=torch.float64))
    assert fv.reparam.max_output_change(model, new, X) < 1e-12
    before = fv.relative_flatness(model, images, "2")
    after = fv.relative_flatness(new, images, "2")
    assert after.value == pytest.approx(before.value, rel=1e-9)
    tr = fv.hessian_trace(model, images, params="2.weight").value
    tr_new = fv.hessian_trace(new, images, params="2.weight").value
    assert tr_new == pytest.approx(alpha**2 * tr, rel=1e-9)  # H_W x α² (docs/math.md §2, T1)


# ------------------------------------------------------------ closed form from the fx graph


class Head(nn.Module):
    """conv -> ReLU -> then ``how`` -> mean over positions -> Linear."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        z = torch.relu(self.conv(x))
        if self.how == "scaled":  # by a factor that depends on the input only: linear in z
            z = z * x.abs().mean() / 3.0 + x[:, :1]
        elif self.how == "gated":
            z = z * torch.sigmoid(z)
        elif self.how == "inverse":
            z = 1.0 / (1.0 + z)
        elif self.how == "branch":
            if x.sum() > 0:
                z = z + 1
        elif self.how == "eval only" and not self.training:  # famviz evaluates in eval mode
            z = z * torch.sigmoid(z)
        elif self.how == "reshaped":  # shapes read off z are not values of z
            z = z.reshape(z.shape[0], z.size(1), -1)[..., None]
        return self.fc(z.mean(dim=(2, 3)))


@pytest.mark.parametrize("how, closed", [("scaled", True), ("gated", False),
                                         ("inverse", False), ("branch", False),
                                         ("eval only", False), ("reshaped", True)])
def test_closed_form_where_the_graph_proves_it(images, how, closed):
    model = _init(Head(how), 15).double().train()
    assert piecewise_linear_graph(model.eval(), "conv") is closed
    model.train()
    kappa, _ = relative_flatness_bruteforce(model, images, "conv")
    r = fv.relative_flatness(model, images, "conv")
    assert r.method == ("closed_form" if closed else "exact")
    assert r.value == pytest.approx(kappa, rel=RTOL)


def test_the_graph_check_refuses_hooks_and_train_mode_batchnorm():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(75, 3))
    check = piecewise_linear_graph
    assert check(model, "0") and check(model, "0", bn="eval") and not check(model, "0", bn="train")
    assert check(model, "4")
    handle = model[2].register_forward_hook(lambda m, i, o: o * o)
    assert not check(model, "0")
    handle.remove()
    assert not check(model, "missing")  # an unknown name is never proven


def test_reparam_channel_rescalings_of_the_digits_cnn(digits_small):
    """fv.reparam on conv -> ReLU -> max-pool -> conv -> ReLU -> flatten -> Linear."""
    X, y = digits_small
    data = (X[:40], y[:40])
    model = fv.models.cnn(channels=(2, 3), hidden=6, num_classes=5, seed=0).double()
    t3 = fv.reparam.scale_neurons(model, "conv1", "conv2", [8.0, 0.125])
    t3b = fv.reparam.scale_neurons(model, "conv2", "fc1", [0.1, 3.0, 10.0])
    t1 = fv.reparam.scale_layers(model, "conv1", "conv2", 6.0)
    for layer, new in (("conv1", t3), ("conv2", t3b), ("conv2", t1)):
        assert fv.reparam.max_output_change(model, new, data[0]) < 1e-12
        before = fv.relative_flatness(model, data, layer)
        after = fv.relative_flatness(new, data, layer)
        assert before.method == after.method == "closed_form"
        assert after.value == pytest.approx(before.value, rel=1e-9)
        tr = fv.hessian_trace(model, data, params=f"{layer}.weight").value
        assert abs(fv.hessian_trace(new, data, params=f"{layer}.weight").value / tr - 1) > 0.1


@pytest.mark.parametrize("method", ["closed_form", "exact", "hutchinson", "hutchinson_kappa"])
def test_conv_measures_leave_the_caller_alone(images, method):
    from helpers import assert_call_leaves_caller_alone

    model = conv_net(images[0], seed=17, kernel_size=3, padding=1).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].register_forward_hook(lambda m, i, o: None)  # no-op hook: runs on the replica
    assert_call_leaves_caller_alone(
        lambda mod, data: fv.relative_flatness(mod, data, "0", method=method, probes=3, seed=0),
        model, images)


def test_conv_in_float32(images):
    X, y = images
    model = conv_net(X, seed=18, kernel_size=3, padding=1)
    r64 = fv.relative_flatness(model, images, "0")
    r32 = fv.relative_flatness(model.float(), (X.float(), y), "0")
    assert r32.objective.dtype == "float32" and r32.method == "closed_form"
    assert r32.value == pytest.approx(r64.value, rel=1e-4)


def test_output_conv_mse_blocks_against_the_oracle(images):
    """For an output conv under MSE the pull-back uses G = (2/D) I directly."""
    X, _ = images
    model = _init(nn.Sequential(nn.Conv2d(2, 3, 2, stride=2)).double(), 19)
    Y = torch.randn(model(X).shape, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    H, _ = dense_hessian(model, (X, Y), loss="mse", params="0.weight")
    H = H.reshape(3, 8, 3, 8)
    W = model[0].weight.detach().reshape(3, 8)
    expected = sum(float(W[s].pow(2).sum() * torch.linalg.eigvalsh(H[s, :, s, :])[-1])
                   for s in range(3))
    r = fv.relative_flatness(model, (X, Y), "0", loss="mse", variant="neuronwise_max")
    assert r.method == "closed_form" and r.value == pytest.approx(expected, rel=RTOL)


def test_linear_with_an_image_shaped_output_under_mse():
    """(N, F) inputs, but the model's output is (N, 2, 3): the pull-back flattens it."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(9, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(9, 2, 3, generator=g, dtype=torch.float64)
    model = _init(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 6),
                                nn.Unflatten(1, (2, 3))), 20).double()
    for layer in ("0", "2"):
        kappa, _ = relative_flatness_bruteforce(model, (X, Y), layer, loss="mse")
        r = fv.relative_flatness(model, (X, Y), layer, loss="mse")
        assert r.method == "closed_form" and r.value == pytest.approx(kappa, rel=RTOL)
