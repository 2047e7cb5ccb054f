"""Data in several batches is streamed: Hessian-vector products and gradients are accumulated
batch by batch with one batch's graph alive at a time, and give the one-batch numbers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import famviz as fv
from famviz.curvature import HessianOperator

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
X, Y = _X[:90].double(), _Y[:90]
ONE = (X, Y)
MANY = DataLoader(TensorDataset(X, Y), batch_size=32)  # 32 + 32 + 26: unequal weights


def model():
    return fv.models.mlp([64, 7, 10], activation="tanh", seed=0).double()


def test_streamed_hvps_equal_the_kept_graph():
    obj_one, obj_many = fv.Objective(model(), ONE), fv.Objective(model(), MANY)
    names = list(obj_one.params)
    kept, streamed = HessianOperator(obj_one, names), HessianOperator(obj_many, names)
    assert not kept.stream and streamed.stream
    V = torch.randn(5, kept.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(streamed.matmat(V), kept.matmat(V), rtol=1e-11, atol=1e-13)
    assert torch.allclose(streamed.matvec(V[0]), kept.matvec(V[0]), rtol=1e-11, atol=1e-13)
    # one batch, streamed on request: the same numbers again
    forced = HessianOperator(obj_one, names, stream=True)
    assert torch.allclose(forced.matvec(V[1]), kept.matvec(V[1]), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("call", [
    lambda m, d: fv.hessian_trace(m, d).value,
    lambda m, d: fv.hessian_trace(m, d, method="hutchinson", probes=5, seed=1).value,
    lambda m, d: fv.hessian_trace(m, d, method="hutchpp", probes=9, seed=1).value,
    lambda m, d: fv.hessian_top_eigenvalue(m, d, k=2, seed=0).eigenvalues,
    lambda m, d: fv.hessian_frobenius(m, d).value,
    lambda m, d: fv.relative_flatness(m, d, "0", method="exact").value,
    lambda m, d: fv.relative_flatness(m, d, "0", method="hutchinson_kappa", seed=2).value,
    lambda m, d: fv.eps_sharpness(m, d, seed=0, steps=3).value,
    lambda m, d: fv.adaptive_sharpness(m, d, seed=0, steps=3).value,
])
def test_measures_on_streamed_batches_equal_one_batch(call):
    a, b = call(model(), ONE), call(model(), MANY)
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-8, atol=1e-12)


def test_hutchinson_probes_in_chunks_are_one_draw():
    """Probes come in chunks; their stream is that of one (probes, dim) draw, so a seed gives
    the same estimate as before chunking (and as a dense reference)."""
    from famviz.curvature import generator, hutchinson_trace, rademacher

    op = HessianOperator(fv.Objective(model(), ONE), ["0.weight"])
    V = rademacher((300, op.dim), generator(4, op.device), op.device, op.dtype)
    expected = (V * op.matmat(V)).sum(dim=1).mean()
    assert hutchinson_trace(op, 300, 4).value == pytest.approx(float(expected), rel=1e-12)
