"""fam.train draws only from private generators seeded by an exact integer (issue 11)."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import famviz as fv
from famviz._random import (
    SEEDED_DROPOUT,
    check_seed,
    derive_seed,
    make_generator,
    seed_dropout,
    unseed_dropout,
)
from famviz.fam import train

KW = {"epochs": 2, "batch_size": 16, "lr": 0.1, "progress": False, "track_kappa": False}


def dropout_net(seed=0):
    torch.manual_seed(seed)  # the test's own initialization; train() never touches the RNG
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()


def data(n=64):
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_history(h1, h2):
    d1, d2 = h1.to_dict(), h2.to_dict()
    d1.pop("time_per_step"), d2.pop("time_per_step")
    return repr(d1) == repr(d2)  # NaN (no test data, no κ) equal to NaN


# ---------------------------------------------------------------------------------- seeds


def test_seeds_are_exact_integers():
    model, d = dropout_net(), data()
    a, ha = train(model, d, seed=2**60, **KW)
    b, hb = train(model, d, seed=2**60 + 1, **KW)
    assert not same(weights(a), weights(b))  # a float would have made them one seed
    assert ha.seed == 2**60 and hb.seed == 2**60 + 1 and type(hb.seed) is int
    c, _ = train(model, d, seed=np.uint64(2**64 - 1), **KW)  # the largest seed
    assert all(torch.isfinite(v).all() for v in weights(c).values())


def test_history_seed_reproduces_the_run():
    model, d = dropout_net(), data()
    a, ha = train(model, d, **KW)  # seed drawn from the OS and recorded
    b, hb = train(model, d, seed=ha.seed, **KW)
    assert same(weights(a), weights(b)) and same_history(ha, hb)


@pytest.mark.parametrize("seed, error, match", [
    (True, TypeError, "seed must be an integer in \\[0, 2\\*\\*64\\), got bool True"),
    (1.0, TypeError, "got float 1.0; pass int\\(seed\\)"),
    (float(2**60), TypeError, "got float"),
    ("3", TypeError, "got str '3'"),
    (-1, ValueError, "seed must be in \\[0, 2\\*\\*64\\).*got -1"),
    (2**64, ValueError, "got 18446744073709551616; reduce it"),
])
def test_bad_seeds_are_refused_before_training(seed, error, match):
    with pytest.raises(error, match=match):
        train(dropout_net(), data(), seed=seed, **KW)


def test_derived_seeds_are_exact_and_independent():
    assert derive_seed(2**60, "dropout") != derive_seed(2**60 + 1, "dropout")
    assert derive_seed(7, "dropout") != derive_seed(7, "kappa")
    assert 0 <= derive_seed(2**64 - 1, "x") < 2**64
    assert check_seed("seed", np.int64(3)) == 3 and type(check_seed("s", np.int64(3))) is int
    a = torch.rand(3, generator=make_generator(2**63 + 5, "cpu"))
    b = torch.rand(3, generator=make_generator(2**63 + 5, "cpu"))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------- global RNG


def test_global_rng_neither_used_nor_changed():
    """With dropout and tuple data: the state is unchanged, and the result does not depend on
    it."""
    model, d = dropout_net(), data()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a, ha = train(model, d, seed=3, **KW)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b, hb = train(model, d, seed=3, **KW)
    assert same(weights(a), weights(b)) and same_history(ha, hb)
    c, _ = train(model, d, seed=4, **KW)
    assert not same(weights(a), weights(c))


def test_dropout_is_active_and_the_returned_model_is_plain_torch():
    model, d = dropout_net(), data()
    with torch.no_grad():
        model[2].p = 0.0
    no_drop, _ = train(model, d, seed=3, **KW)
    drop, _ = train(dropout_net(), d, seed=3, **KW)  # same init, p = 0.3
    assert not same(weights(no_drop), weights(drop))
    assert type(drop[2]) is nn.Dropout and not hasattr(drop[2], "generator")
    assert drop[2].training == model[2].training


def test_fam_sam_and_kappa_tracking_are_reproducible_too():
    model, d = dropout_net(), data()
    for method in ("fam", "sam"):
        kw = dict(KW, track_kappa=True)
        state = torch.get_rng_state()
        a, ha = train(model, d, method=method, seed=11, **kw)
        b, hb = train(model, d, method=method, seed=11, **kw)
        assert torch.equal(torch.get_rng_state(), state)
        assert same(weights(a), weights(b)) and same_history(ha, hb), method


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.2, self.training))


def test_functional_dropout_is_refused_and_the_global_state_restored():
    model = FunctionalDropout().double()
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="draws from torch's global random number generator"):
        train(model, data(), seed=0, **KW)
    assert torch.equal(torch.get_rng_state(), state)


def test_two_threads_give_the_sequential_results():
    d = data(256)
    kw = dict(KW, epochs=3, batch_size=8)
    models = [dropout_net(0), dropout_net(1)]
    sequential = [train(m, d, seed=s, **kw) for m, s in zip(models, (21, 22))]
    results = [None, None]

    def run(i):
        results[i] = train(models[i], d, seed=(21, 22)[i], **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (a, ha), (b, hb) in zip(sequential, results):
        assert same(weights(a), weights(b)) and same_history(ha, hb)


# ----------------------------------------------------------------------- seeded dropout

SHAPES = {
    nn.Dropout: (6, 5, 4),
    nn.Dropout1d: (6, 5, 40),
    nn.Dropout2d: (6, 5, 4, 10),
    nn.Dropout3d: (6, 5, 2, 4, 5),
    nn.AlphaDropout: (6, 5, 40),
    nn.FeatureAlphaDropout: (6, 5, 40),
}
CHANNEL_WISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)


@pytest.mark.parametrize("cls", list(SEEDED_DROPOUT), ids=lambda c: c.__name__)
def test_seeded_dropout_has_torchs_semantics(cls):
    """torch's module (on a forked global RNG) shows the map a kept and a dropped entry go
    through and the mask's shape; the seeded module must do the same with its own bits."""
    p = 0.3
    x = torch.randn(*SHAPES[cls], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) + 3.0  # away from 0: kept and dropped differ
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = cls(p).train()(x)
    dropped_value = ref.flatten().mode().values  # the most common output
    kept = ref != dropped_value
    fit = torch.linalg.lstsq(torch.stack([x[kept], torch.ones_like(x[kept])], 1),
                             ref[kept][:, None]).solution
    slope, intercept = float(fit[0]), float(fit[1])

    module = cls(p).train()
    gen = make_generator(1, "cpu")
    assert seed_dropout(nn.Sequential(module), gen) == ["0"]
    assert isinstance(module, cls) and module.generator is gen
    out = module(x)
    mine_kept = out != dropped_value
    assert torch.allclose(out[mine_kept], slope * x[mine_kept] + intercept, atol=1e-12)
    assert torch.allclose(ref[kept], slope * x[kept] + intercept, atol=1e-12)
    if cls in CHANNEL_WISE:  # one decision per (sample, channel)
        per_channel = mine_kept.flatten(2)
        assert (per_channel.all(dim=2) | ~per_channel.any(dim=2)).all()
    frac = float(mine_kept.double().mean())
    assert 0.4 < frac < 0.95  # about 1 - p
    again = cls(p).train()
    seed_dropout(again, make_generator(1, "cpu"))
    assert torch.equal(again(x), out)  # the generator alone decides the mask
    assert torch.equal(module.eval()(x), x)
    unseed_dropout(module)
    assert type(module) is cls and not hasattr(module, "generator")


@pytest.mark.parametrize("cls, shape", [(nn.Dropout1d, (40, 7)), (nn.Dropout3d, (40, 2, 3, 4))])
def test_seeded_channel_dropout_of_unbatched_inputs_drops_whole_channels(cls, shape):
    module = cls(0.5).train()
    seed_dropout(module, make_generator(0, "cpu"))
    out = module(torch.ones(shape, dtype=torch.float64))
    per_channel = out.flatten(1)  # channels first when there is no batch dimension
    assert ((per_channel == 0).all(dim=1) | (per_channel == 2).all(dim=1)).all()
    assert 0 < int((per_channel[:, 0] == 0).sum()) < 40
