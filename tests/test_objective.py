"""The objective plumbing: data forms, losses, dtype, BatchNorm policy, and clear errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import famviz as fv
from famviz.datastream import read_batches
from famviz.objective import Objective, resolve_params

from helpers import tiny_mlp


@pytest.fixture
def net_and_data(digits_small):
    return tiny_mlp([64, 8, 5], seed=0), digits_small


def test_loss_forms_agree(net_and_data):
    model, (X, y) = net_and_data
    expected = float(F.cross_entropy(model(X), y))
    batches = [(X[i : i + 33], y[i : i + 33]) for i in range(0, len(X), 33)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=50)
    for data in ((X, y), [X, y], batches, loader, (X.numpy(), y.numpy())):
        obj = Objective(model, data)
        assert float(obj.loss()) == pytest.approx(expected, rel=1e-12)
        assert obj.num_samples == len(X)
    obj = Objective(model, (X, y), loss=lambda out, t: F.cross_entropy(out, t))
    assert float(obj.loss()) == pytest.approx(expected, rel=1e-12)
    assert obj.info().loss == "custom:<lambda>"


def test_mse_and_probability_targets(net_and_data):
    model, (X, y) = net_and_data
    onehot = F.one_hot(y, 5).double()
    assert float(Objective(model, (X, onehot), "mse").loss()) == pytest.approx(
        float(F.mse_loss(model(X), onehot)), rel=1e-12
    )
    assert float(Objective(model, (X, onehot)).loss()) == pytest.approx(
        float(F.cross_entropy(model(X), y)), rel=1e-12
    )


def test_dtype_and_bn_policy_recorded(digits_small):
    X, y = digits_small
    model = nn.Sequential(nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))
    with torch.no_grad():  # give BatchNorm running statistics unlike the batch's
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    ev = Objective(model, (X.float(), y), dtype=torch.float64)
    tr = Objective(model, (X.float(), y), dtype=torch.float64, bn="train")
    assert ev.info().bn == "eval" and tr.info().bn == "train" and ev.info().dtype == "float64"
    assert float(ev.loss()) != pytest.approx(float(tr.loss()), rel=1e-3)
    model.eval()
    assert float(ev.loss()) == pytest.approx(float(F.cross_entropy(model.double()(X), y)),
                                             rel=1e-10)
    r = fv.hessian_trace(model, (X, y), bn="train", dtype=torch.float64)
    assert r.objective.bn == "train"


def test_resolve_params():
    model = tiny_mlp([4, 3, 2])
    assert resolve_params(model) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert resolve_params(model, "2") == ["2.weight", "2.bias"]
    assert resolve_params(model, ["2.bias", "0"]) == ["0.weight", "0.bias", "2.bias"]
    with pytest.raises(ValueError, match=r"unknown parameter or layer 'fc'.*layers: \['0', '2'\]"):
        resolve_params(model, "fc")


# ---------------------------------------------------------------------------- clear errors


def test_unknown_layer_lists_valid_names(net_and_data):
    model, data = net_and_data
    with pytest.raises(ValueError, match=r"unknown layer 'fc3'.*\['0', '2'\]"):
        fv.relative_flatness(model, data, "fc3")
    with pytest.raises(TypeError, match="module name"):
        fv.relative_flatness(model, data, 2)


def test_unsupported_layer_type(net_and_data):
    model, data = net_and_data
    with pytest.raises(ValueError, match="'1' is ReLU; only Linear/Conv2d layers are supported"):
        fv.relative_flatness(model, data, "1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_weights_or_data(net_and_data, bad):
    model, (X, y) = net_and_data
    Xb = X.clone()
    Xb[3, 5] = bad
    for fn in (fv.relative_flatness, fv.hessian_trace):
        args = ("2",) if fn is fv.relative_flatness else ()
        with pytest.raises(ValueError, match="X contains NaN or inf"):
            fn(model, (Xb, y), *args)
    broken = tiny_mlp([64, 8, 5])
    with torch.no_grad():
        broken[2].weight[0, 0] = bad
    with pytest.raises(ValueError, match="parameter '2.weight' contains NaN or inf"):
        fv.hessian_top_eigenvalue(broken, (X, y))


def test_empty_data(net_and_data):
    model, (X, y) = net_and_data
    for data in ((X[:0], y[:0]), []):
        with pytest.raises(ValueError, match="data is empty"):
            fv.hessian_trace(model, data)


def test_shape_mismatches(net_and_data):
    model, (X, y) = net_and_data
    with pytest.raises(ValueError, match="same number of samples"):
        fv.hessian_trace(model, (X, y[:-1]))
    with pytest.raises(ValueError, match="mse needs targets of the output's shape"):
        fv.relative_flatness(model, (X, y.double()), "2", loss="mse")
    with pytest.raises(ValueError, match="class-index targets of shape"):
        fv.hessian_trace(model, (X, y[:, None]))
    with pytest.raises(ValueError, match=r"targets y range over \[0, 8\] but the model has 5"):
        fv.hessian_trace(model, (X, y * 2))
    with pytest.raises(ValueError, match="input"):
        fv.hessian_trace(model, (X[:, :10], y))


def test_unknown_options(net_and_data):
    model, data = net_and_data
    cases = [
        (lambda: fv.relative_flatness(model, data, "2", method="fast"), "unknown method 'fast'"),
        (lambda: fv.relative_flatness(model, data, "2", variant="x"), "unknown variant 'x'"),
        (lambda: fv.relative_flatness(model, data, "2", normalize="d"), "unknown normalize"),
        (lambda: fv.hessian_trace(model, data, loss="hinge"), "unknown loss 'hinge'"),
        (lambda: fv.hessian_trace(model, data, bn="frozen"), "unknown bn 'frozen'"),
        (lambda: fv.hessian_trace(model, data, method="lanczos"), "unknown method 'lanczos'"),
        (lambda: fv.hessian_top_eigenvalue(model, data, k=0), "k must be a positive integer"),
        (lambda: fv.hessian_top_eigenvalue(model, data, tol=0), "tol must be > 0"),
        (lambda: fv.hessian_trace(model, data, method="hutchinson", probes=1), "probes must"),
        (lambda: fv.relative_flatness(model, data, "2", method="hutchinson",
                                      variant="neuronwise_max"), "neuronwise_max"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_not_a_model_or_not_data(digits_small):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fv.hessian_trace(lambda x: x, digits_small)
    with pytest.raises(TypeError, match="data must be"):
        read_batches(42)
    with pytest.raises(TypeError, match="batch 0 of data is a Tensor; famviz reads \\(X, y\\)"):
        read_batches([torch.zeros(3, 2)])


def test_custom_loss_named_like_a_builtin_is_not_the_builtin(digits_small):
    """A user's `mse` with another reduction must not get famviz's MSE closed form."""
    X, _ = digits_small
    model = tiny_mlp([64, 6, 3], seed=2)
    Y = torch.randn(len(X), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def mse(out, target):
        return ((out - target) ** 2).sum()

    kappa, _ = fv.oracles.relative_flatness_bruteforce(model, (X, Y), "2", loss=mse)
    r = fv.relative_flatness(model, (X, Y), "2", loss=mse)
    assert r.method == "exact" and r.objective.loss == "custom:mse"
    assert r.value == pytest.approx(kappa, rel=1e-6)
    H, _ = fv.oracles.dense_hessian(model, (X, Y), loss=mse)
    t = fv.hessian_trace(model, (X, Y), loss=mse)
    assert t.backend != "gauss-newton" and t.value == pytest.approx(float(H.trace()), rel=1e-6)


def test_sequential_subclass_with_own_forward_gets_no_closed_form(digits_small):
    X, y = digits_small

    class Squashed(nn.Sequential):
        def forward(self, x):
            return 3 * torch.tanh(super().forward(x))

    model = Squashed(nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 5)).double()
    kappa, _ = fv.oracles.relative_flatness_bruteforce(model, (X, y), "2")
    r = fv.relative_flatness(model, (X, y), "2")
    assert r.method == "exact" and r.value == pytest.approx(kappa, rel=1e-6)
    assert fv.hessian_trace(model, (X, y)).backend != "gauss-newton"


def test_probability_targets_must_be_distributions(net_and_data):
    model, (X, y) = net_and_data
    soft = F.one_hot(y, 5).double() * 2
    with pytest.raises(ValueError, match="sum to 1"):
        fv.hessian_trace(model, (X, soft))


def test_the_one_sample_pass_records_each_layers_part():
    lin = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), lin, torch.nn.Tanh(),
                                lin, torch.nn.Linear(4, 2))
    obj = Objective(model, (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])))
    assert obj.layer_probe("0") == type(obj.layer_probe("0"))(1, 2, False)
    assert obj.layer_probe("2").calls == 2  # the same module used twice
    assert obj.layer_probe("2").output_sizes == (4, 4) and obj.sample_output_shape == (1, 2)
    assert obj.layer_probe("5").is_output and obj.layer_probe("5").calls == 1
    assert obj.layer_probe("missing").calls == 0 and obj.sample_output_ndim == 2
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 4 * 4, 3))
    obj = Objective(conv, (torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])))
    assert obj.layer_probe("0").phi_ndim == 4 and obj.layer_probe("2").phi_ndim == 2
