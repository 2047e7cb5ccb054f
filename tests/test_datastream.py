"""A DataLoader is re-read on every pass (augmentation live, one batch in memory), under a
private random state; lists, single batches and generators are kept; ``Batches(cache=True)``
keeps a DataLoader. fam.train streams a DataLoader per epoch."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import famviz as fv
from famviz import fam
from famviz.datastream import DataStream

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
X, Y = _X[:40].double(), _Y[:40]


def model():
    return fv.models.mlp([64, 6, 10], activation="tanh", seed=0).double()


class Augmented(Dataset):
    """Digits plus Gaussian noise drawn from torch's global generator (as torchvision's
    random transforms do); every sample it hands out is logged."""

    def __init__(self, noise=0.3):
        self.noise, self.log, self.reads = noise, [], 0

    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        self.reads += 1
        x = X[i] + self.noise * torch.randn(X.shape[1], dtype=X.dtype)
        self.log.append((x, Y[i]))
        return x, Y[i]


def hand_loss(net, samples):
    Xs = torch.stack([x for x, _ in samples])
    ys = torch.stack([y for _, y in samples])
    with torch.no_grad():
        return float(F.cross_entropy(net(Xs), ys))


def test_a_dataloader_is_re_read_on_every_pass_with_live_augmentation():
    data = Augmented()
    loader = DataLoader(data, batch_size=16, shuffle=True)
    net = model()
    rng = torch.get_rng_state()
    obj = fv.Objective(net, loader)
    assert obj.batches.live and obj.num_samples == len(X) and obj.batches.num_batches == 3
    values = []
    for _ in range(3):
        value = float(obj.loss())
        # the oracle: the mean loss over exactly the samples this pass was handed
        assert value == pytest.approx(hand_loss(net, data.log[-len(X):]), rel=1e-12)
        values.append(value)
    assert len(set(values)) == 3  # fresh noise on every pass
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_private_state_starts_from_the_global_state():
    """The same call twice (global state unchanged between) draws the same augmentation, and
    so gives the same number."""
    loader = DataLoader(Augmented(), batch_size=16, shuffle=True)
    a = fv.hessian_trace(model(), loader, method="hutchinson", probes=3, seed=0).value
    b = fv.hessian_trace(model(), loader, method="hutchinson", probes=3, seed=0).value
    assert a == b
    torch.manual_seed(12345)  # another global state: other draws
    c = fv.hessian_trace(model(), loader, method="hutchinson", probes=3, seed=0).value
    assert c != a


def test_every_hvp_re_reads_the_data_and_sees_its_augmentation():
    from famviz.curvature import HessianOperator

    data = Augmented()
    obj = fv.Objective(model(), DataLoader(data, batch_size=16))
    op = HessianOperator(obj, list(obj.params))
    v = torch.ones(op.dim, dtype=torch.float64)
    before = data.reads
    products = [op.matvec(v) for _ in range(3)]
    assert data.reads - before == 3 * len(X)  # one pass per product
    assert not torch.equal(products[0], products[1])  # each on fresh draws


def test_cache_keeps_a_dataloader():
    data = Augmented()
    cached = fv.Batches(DataLoader(data, batch_size=16, shuffle=True), cache=True)
    obj = fv.Objective(model(), cached)
    assert not obj.batches.live and data.reads == len(X)  # read once
    assert float(obj.loss()) == float(obj.loss())
    assert float(obj.loss()) == pytest.approx(hand_loss(obj.model, data.log), rel=1e-12)
    assert data.reads == len(X)
    with pytest.raises(TypeError, match="cache must be True or False"):
        fv.Batches([], cache="yes")


def test_without_augmentation_live_and_kept_data_give_the_same_numbers():
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    for call in (lambda d: fv.hessian_trace(model(), d).value,
                 lambda d: fv.relative_flatness(model(), d, "2").value,
                 lambda d: fv.eps_sharpness(model(), d, seed=0, steps=3).value):
        assert call(loader) == pytest.approx(call((X, Y)), rel=1e-10, abs=1e-13)


def test_generators_are_kept_since_they_can_be_read_once():
    gen = ((X[i:i + 16], Y[i:i + 16]) for i in range(0, len(X), 16))
    stream = DataStream(gen)
    assert not stream.live
    stream.scan()
    assert stream.num_samples == len(X) and sum(len(b[0]) for b in stream) == len(X)
    assert fv.hessian_trace(model(), ((X[i:i + 16], Y[i:i + 16]) for i in range(0, 40, 16))
                            ).value == pytest.approx(fv.hessian_trace(model(), (X, Y)).value,
                                                     rel=1e-10)


class Shrinking(IterableDataset):
    """Delivers one sample fewer on every pass."""

    def __init__(self):
        self.n = len(X)

    def __iter__(self):
        self.n -= 1
        return iter(list(zip(X[:self.n], Y[:self.n])))


def test_a_pass_with_other_samples_is_an_error():
    with pytest.raises(ValueError, match="samples on one pass and .* on the first"):
        obj = fv.Objective(model(), DataLoader(Shrinking(), batch_size=16))
        obj.loss()


def test_threads_reading_one_dataloader_leave_the_global_state():
    loader = DataLoader(Augmented(), batch_size=16, shuffle=True)
    rng = torch.get_rng_state()
    errors = []

    def work():
        try:
            fv.hessian_trace(model(), loader, method="hutchinson", probes=2, seed=0)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------- fam.train


def _sgd_by_hand(net, loader, epochs, lr):
    net = fv.replica.replicate(net, {n: p.detach().clone().requires_grad_(True)
                                     for n, p in net.named_parameters()})
    params = list(net.parameters())
    for _ in range(epochs):
        for xb, yb in loader:
            grads = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * g
    return net


def test_train_on_a_dataloader_uses_its_batches_every_epoch():
    loader = DataLoader(TensorDataset(X, Y), batch_size=16)  # no shuffle: a fixed order
    trained, history = fam.train(model(), loader, loader, method="sgd", epochs=3, lr=0.1,
                                 momentum=0.0, seed=0, progress=False, track_kappa=True)
    expected = _sgd_by_hand(model(), loader, 3, 0.1)
    for (n, p), q in zip(trained.named_parameters(), expected.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), n
    assert history.num_train == len(X) and history.steps[-1] == 3 and history.batch_size == 16
    assert history.test_loss[-1] == pytest.approx(hand_loss(expected, list(zip(X, Y))),
                                                  rel=1e-10)
    assert history.kappa[-1] == pytest.approx(
        fv.relative_flatness(expected, (X, Y), "2").value, rel=1e-8)


def test_train_re_reads_an_augmented_dataloader_reproducibly_from_seed():
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the run depends on `seed` only
        data = Augmented()
        loader = DataLoader(data, batch_size=16, shuffle=True)
        rng = torch.get_rng_state()
        trained, history = fam.train(model(), loader, method="fam", epochs=2, seed=7,
                                     progress=False, track_kappa=False)
        assert torch.equal(torch.get_rng_state(), rng)
        reads_per_epoch = len(X)
        assert data.reads >= 2 * 2 * reads_per_epoch  # trained and evaluated every epoch
        runs.append(trained.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_train_refuses_batch_size_with_a_dataloader():
    with pytest.raises(ValueError, match="batch_size: train_data is a DataLoader"):
        fam.train(model(), DataLoader(TensorDataset(X, Y), batch_size=16), batch_size=8,
                  epochs=1, progress=False)
