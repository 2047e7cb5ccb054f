"""Bounded memory inside the curvature algorithms: ``memory_budget`` plans the chunks (probes,
unit vectors, the Lanczos basis, Hessian blocks) and never changes a result; progress bars
count the Hessian-vector products and change nothing either."""

from __future__ import annotations

import math

import pytest
import torch

import famviz as fv
from famviz._memory import (
    DEFAULT_MEMORY_BUDGET,
    VectorStore,
    check_memory_budget,
    rows_per_chunk,
)
from famviz.curvature import (
    BATCHED_HVP_MAX_DIM,
    HVP_CHUNK,
    HessianOperator,
    generator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_top,
    probe_chunks,
    probe_rows,
    rademacher,
)

ONE_ROW = 1  # a budget below one vector: every chunk holds a single vector

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
X, Y = _X[:60].double(), _Y[:60]
DATA = (X, Y)


def model():
    return fv.models.mlp([64, 6, 10], activation="tanh", seed=0).double()


def operator(names=None):
    obj = fv.Objective(model(), DATA)
    return HessianOperator(obj, names or list(obj.params))


# ------------------------------------------------------------------------------ planning


def test_the_landscape_default_is_the_shared_constant():
    assert fv.DEFAULT_MEMORY_BUDGET == DEFAULT_MEMORY_BUDGET == fv.landscape.DEFAULT_MEMORY_BUDGET


def test_rows_per_chunk_follows_the_budget():
    assert rows_per_chunk(100, 1000) == 10
    assert rows_per_chunk(100, 1000, copies=3) == 3
    assert rows_per_chunk(100, 1000, copies=3, cap=2) == 2
    assert rows_per_chunk(100, 99) == 1  # at least one row, whatever the budget
    assert rows_per_chunk(8, 10**12, cap=HVP_CHUNK) == HVP_CHUNK


def test_probe_rows_follow_the_budget():
    op = operator()  # 724 float64 parameters: 5792 bytes a vector
    row = op.dim * 8
    assert op.dim <= BATCHED_HVP_MAX_DIM
    assert probe_rows(op, DEFAULT_MEMORY_BUDGET) == HVP_CHUNK
    assert probe_rows(op, 3 * 10 * row) == 10  # probes, products and a temporary
    assert probe_rows(op, 3 * 10 * row - 1) == 9
    assert probe_rows(op, ONE_ROW) == 1
    sizes = [len(V) for V in probe_chunks(op, 25, generator(0, op.device), 3 * 10 * row)]
    assert sizes == [10, 10, 5]


def test_vector_store_keeps_the_budget_on_the_device_and_the_rest_in_a_file():
    n, row = 50, 50 * 8
    rows = torch.randn(9, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for budget, resident, chunk in [(10**6, 9, 9), (8 * row, 6, 2), (row, 0, 1), (1, 0, 1)]:
        store = VectorStore(n, torch.float64, "cpu", budget, capacity=9)
        for r in rows:
            store.append(r)
        assert (len(store), store.spilled, store.chunk) == (9, 9 - resident, chunk)
        assert all(len(b) <= max(chunk, resident) for b in store.blocks())
        assert torch.equal(torch.cat([b.clone() for b in store.blocks()]), rows)  # bit for bit
        assert torch.equal(torch.cat([b.clone() for b in store.blocks(4, 7)]), rows[4:7])
        assert torch.allclose(store.coefficients(w), rows @ w, rtol=1e-14, atol=0)
        assert torch.allclose(store.coefficients(w, 3), rows[3:] @ w, rtol=1e-14, atol=0)
        c = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(store.combine(c, 5), rows[5:].T @ c, rtol=1e-13, atol=1e-15)
        store.close()


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 1.5e9, "1GB", None, True])
@pytest.mark.parametrize("call", [
    lambda m, d, b: fv.hessian_trace(m, d, method="hutchinson", probes=4, seed=0,
                                     memory_budget=b),
    lambda m, d, b: fv.hessian_top_eigenvalue(m, d, seed=0, memory_budget=b),
    lambda m, d, b: fv.hessian_frobenius(m, d, memory_budget=b),
    lambda m, d, b: fv.relative_flatness(m, d, "2", method="exact", memory_budget=b),
], ids=["trace", "eigen", "frobenius", "relative"])
def test_bad_budgets_are_refused_naming_the_argument(call, bad):
    with pytest.raises(ValueError, match="memory_budget must be"):
        call(model(), DATA, bad)
    assert check_memory_budget(5) == 5


# ------------------------------------------------------------------ budgets change nothing


def test_hutchinson_in_one_vector_chunks_equals_the_dense_draw():
    op = operator()
    V = rademacher((40, op.dim), generator(4, op.device), op.device, op.dtype)
    expected = (V * op.matmat(V)).sum(dim=1)
    for budget in (DEFAULT_MEMORY_BUDGET, ONE_ROW):
        est = hutchinson_trace(op, 40, 4, budget)
        assert est.value == pytest.approx(float(expected.mean()), rel=1e-12)
        assert est.stderr == pytest.approx(float(expected.std() / math.sqrt(40)), rel=1e-10)


def test_hutchpp_in_chunks_equals_the_unbounded_sketch():
    """The reference is Hutch++ written out with whole matrices (the pre-chunking form)."""
    op = operator()
    hvps, seed = 31, 7
    k, m = hvps // 3, hvps - 2 * (hvps // 3)
    gen = generator(seed, op.device)
    S = rademacher((k, op.dim), gen, op.device, op.dtype)
    Q, _ = torch.linalg.qr(op.matmat(S).T)
    G = rademacher((m, op.dim), gen, op.device, op.dtype)
    G = G - (G @ Q) @ Q.T
    expected = float(torch.einsum("ik,ki->", Q.T, op.matmat(Q.T).T)) + float(
        (G * op.matmat(G)).sum(dim=1).mean())
    for budget in (DEFAULT_MEMORY_BUDGET, 3 * 4 * op.dim * 8, ONE_ROW):
        assert hutchpp_trace(op, hvps, seed, budget).value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("call", [
    lambda m, d, b: fv.hessian_trace(m, d, method="hutchinson", probes=12, seed=3,
                                     memory_budget=b).value,
    lambda m, d, b: fv.hessian_trace(m, d, method="hutchpp", probes=12, seed=3,
                                     memory_budget=b).value,
    lambda m, d, b: fv.hessian_trace(m, d, params="0", method="exact", memory_budget=b).value,
    lambda m, d, b: fv.hessian_frobenius(m, d, method="exact", memory_budget=b).value,
    lambda m, d, b: fv.hessian_frobenius(m, d, method="hutchinson", probes=9, seed=1,
                                         memory_budget=b).value,
], ids=["hutchinson", "hutchpp", "exact-diagonal", "frobenius-exact", "frobenius-hutchinson"])
def test_public_trace_and_frobenius_do_not_depend_on_the_budget(call):
    a, b = call(model(), DATA, DEFAULT_MEMORY_BUDGET), call(model(), DATA, ONE_ROW)
    assert b == pytest.approx(a, rel=1e-12)


def test_lanczos_basis_spilled_to_a_file_gives_the_same_eigenpairs(monkeypatch):
    spilled = []
    close = VectorStore.close
    monkeypatch.setattr(VectorStore, "close", lambda self: (spilled.append(self.spilled),
                                                            close(self)))
    op = operator()
    dense = torch.linalg.eigvalsh(op.dense()).flip(0)
    ref = lanczos_top(op, 3, 1e-10, 150, seed=2)
    assert spilled == [0]  # the default budget holds the whole basis
    for budget in (10 * op.dim * 8, ONE_ROW):  # ten rows on the device / none
        eig = lanczos_top(op, 3, 1e-10, 150, seed=2, memory_budget=budget)
        assert spilled[-1] >= eig.iterations - 10  # the basis went to the file
        assert torch.allclose(eig.values, ref.values, rtol=1e-10, atol=1e-14)
        assert eig.iterations == ref.iterations and eig.converged
        assert (eig.vectors * ref.vectors).sum(dim=1).abs().sub(1).abs().max() < 1e-8
    assert torch.allclose(ref.values, dense[:3], rtol=1e-9, atol=1e-13)  # the oracle


def test_public_eigenvalues_record_the_budget_and_do_not_depend_on_it():
    a = fv.hessian_top_eigenvalue(model(), DATA, k=2, seed=1, tol=1e-10)
    b = fv.hessian_top_eigenvalue(model(), DATA, k=2, seed=1, tol=1e-10, memory_budget=4096)
    assert a.memory_budget == DEFAULT_MEMORY_BUDGET and b.memory_budget == 4096
    assert b.eigenvalues == pytest.approx(a.eigenvalues, rel=1e-10)


# ------------------------------------------------------------------------------- progress


@pytest.mark.parametrize("call", [
    lambda m, d, p: fv.hessian_trace(m, d, method="hutchinson", probes=6, seed=0,
                                     progress=p).value,
    lambda m, d, p: fv.hessian_trace(m, d, params="0", method="exact", progress=p).value,
    lambda m, d, p: fv.hessian_top_eigenvalue(m, d, seed=0, progress=p).eigenvalues,
    lambda m, d, p: fv.hessian_frobenius(m, d, method="hutchinson", probes=5, seed=0,
                                         progress=p).value,
], ids=["hutchinson", "exact", "eigen", "frobenius"])
def test_progress_bar_shows_on_request_and_changes_nothing(call, capsys):
    quiet = call(model(), DATA, False)
    assert capsys.readouterr().err == ""
    loud = call(model(), DATA, True)
    err = capsys.readouterr().err
    assert "HVP" in err and "Hessian" in err
    assert loud == quiet


def test_progress_must_be_a_bool():
    with pytest.raises(TypeError, match="progress must be True or False"):
        fv.hessian_trace(model(), DATA, progress="yes")


# ----------------------------------------------------------------------- relative flatness

RELU = (fv.models.mlp([64, 8, 5, 10], activation="relu", seed=1).double(), DATA)


def _conv():
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(64, 3)).double()
    return net, (torch.randn(10, 2, 6, 6, generator=gen, dtype=torch.float64),
                 torch.randint(0, 3, (10,), generator=gen))


def _neuronwise_oracle(net, data, layer):
    """Σ_s ||w_s||² λ_max(H_ss) from the dense Hessian of the layer's weight."""
    obj = fv.Objective(net, data)
    W = obj.params[f"{layer}.weight"]
    d, m = W.shape[0], W[0].numel()
    H = HessianOperator(obj, [f"{layer}.weight"]).dense().reshape(d, m, d, m)
    lam = torch.stack([torch.linalg.eigvalsh(H[s, :, s, :])[-1] for s in range(d)])
    return float((W.reshape(d, m).pow(2).sum(dim=1) * lam).sum())


def test_block_rows_follow_the_budget():
    from famviz.measures.relative import _block_rows

    block = 30 * 30 * 8
    assert _block_rows(100, 30, torch.float64, DEFAULT_MEMORY_BUDGET) == 100
    assert _block_rows(100, 30, torch.float64, 2 * 7 * block) == 7  # blocks + temporaries
    assert _block_rows(100, 30, torch.float32, 2 * 7 * block) == 14
    assert _block_rows(100, 30, torch.float64, ONE_ROW) == 1


@pytest.mark.parametrize("case", [
    ("relu", "0", "closed_form", "neuronwise_max"),
    ("relu", "0", "exact", "neuronwise_max"),
    ("conv", "0", "closed_form", "neuronwise_max"),
    ("conv", "0", "exact", "neuronwise_max"),
    ("relu", "2", "hutchinson", "kappa"),
    ("relu", "2", "hutchinson_kappa", "kappa"),
    ("relu", "0", "exact", "kappa"),
])
def test_relative_flatness_does_not_depend_on_the_budget(case):
    net_name, layer, method, variant = case
    net, data = RELU if net_name == "relu" else _conv()
    kw = dict(method=method, variant=variant, probes=5, seed=2)
    a = fv.relative_flatness(net, data, layer, **kw)
    b = fv.relative_flatness(net, data, layer, **kw, memory_budget=ONE_ROW)
    assert b.value == pytest.approx(a.value, rel=1e-12)
    assert b.stderr == pytest.approx(a.stderr, rel=1e-10, abs=1e-300)
    assert abs(b.T - a.T).max() <= 1e-12 * abs(a.T).max()
    assert (a.memory_budget, b.memory_budget) == (DEFAULT_MEMORY_BUDGET, ONE_ROW)
    if variant == "neuronwise_max":  # and both equal the dense oracle
        assert b.value == pytest.approx(_neuronwise_oracle(net, data, layer), rel=1e-10)


def test_hutchinson_rows_in_chunks_equal_the_dense_probe_block():
    """method="hutchinson" forms e_s' ⊗ z a chunk of rows at a time; the reference forms the
    whole d×(d·m) block per probe (the pre-chunking form)."""
    from famviz.measures.relative import _hutchinson

    net, data = RELU
    obj = fv.Objective(net, data)
    op = HessianOperator(obj, ["2.weight"])
    W = obj.params["2.weight"]
    d, m = W.shape
    gen = generator(9, op.device)
    Ts = []
    for _ in range(4):
        z = rademacher((m,), gen, op.device, op.dtype)
        V = (torch.eye(d, dtype=op.dtype)[:, :, None] * z).reshape(d, d * m)
        Ts.append((op.matmat(V).reshape(d, d, m) @ z).T)
    expected = torch.stack(Ts).mean(dim=0)
    for budget in (DEFAULT_MEMORY_BUDGET, ONE_ROW):
        T, _ = _hutchinson(op, d, m, 4, 9, W @ W.T, budget)
        assert torch.allclose(T, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["exact", "hutchinson", "hutchinson_kappa"])
def test_relative_flatness_progress_bar(method, capsys):
    net, data = RELU
    quiet = fv.relative_flatness(net, data, "2", method=method, probes=3, seed=0)
    assert capsys.readouterr().err == ""
    loud = fv.relative_flatness(net, data, "2", method=method, probes=3, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "relative flatness" in err and f"{loud.num_hvps}/{loud.num_hvps}" in err
    assert loud.value == quiet.value
