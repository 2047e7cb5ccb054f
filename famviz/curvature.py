"""Curvature machinery: Hessian-vector products, exact blocks, trace and eigenvalue estimators,
and loss-Hessian factors pulled back to Linear layers.

Two routes to second-order information:

* :class:`HessianOperator` — H restricted to a set of named parameters, as a linear operator on
  flat vectors. The first-order graph is built once; every Hessian-vector product (HVP) is one
  extra backward pass through it (double backward). Works for any model and loss.
* :func:`linear_pullback` — for Linear layers followed only by piecewise-linear modules (ReLU,
  LeakyReLU, max-pooling, other Linear layers...) and a cross-entropy or MSE loss, the Hessian
  block of a layer equals its Gauss-Newton block exactly (the network is piecewise linear in
  that layer's weights, so the residual term vanishes almost everywhere):

  .. math::

     \\frac{\\partial^2 E}{\\partial W_{ik}\\,\\partial W_{jl}}
       = \\frac1N \\sum_n (J_n^\\top H^{\\ell}_n J_n)_{ij}\\, \\phi_{nk}\\phi_{nl},

  with :math:`J_n` the Jacobian of the output with respect to the layer's output and
  :math:`H^{\\ell}_n = S_n S_n^\\top` the loss Hessian in the output. Backpropagating the C
  columns of :math:`S_n` gives :math:`\\Delta_n = J_n^\\top S_n` and with it every block trace at
  the cost of one forward and C batched backward passes.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._memory import DEFAULT_MEMORY_BUDGET, VectorStore, rows_per_chunk
from ._progress import progress_bar
from ._random import make_generator
from .objective import Objective, check_finite_loss, double_backward_safe
from .replica import shared_names

__all__ = [
    "HessianOperator",
    "ParamLayout",
    "hutchinson_trace",
    "probe_chunks",
    "probe_rows",
    "rademacher_rows",
    "hutchpp_trace",
    "lanczos_top",
    "power_iteration_top",
    "linear_pullback",
    "Pullback",
    "loss_hessian_factor",
    "softmax_complement",
    "softmax_coupling",
    "laplacian",
    "row_distances",
    "piecewise_linear_after",
    "piecewise_linear_stack",
    "new_seed",
    "generator",
    "rademacher",
    "hvp_progress",
]

#: largest batch of vectors pushed through one batched HVP (bounds memory)
HVP_CHUNK = 256
#: batched HVPs (``is_grads_batched``) only for parameter blocks up to this size. Larger blocks
#: backpropagate through the whole network, where torch's batched backward falls back to a slow
#: per-vector loop (no batching rule for log_softmax's backward): measured on the digits MLP,
#: all 17k parameters, a plain loop of HVPs is ~3x faster; for the 640 weights of its last layer
#: batching is ~2.4x faster. A fixed rule (not a timing) keeps results reproducible bit for bit.
BATCHED_HVP_MAX_DIM = 4096

#: modules that are piecewise linear in their input (and parameter-free): the Hessian of a
#: Linear layer followed only by these (and other Linear layers) equals its Gauss-Newton block
PIECEWISE_LINEAR = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,  # always off in famviz evaluations
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
)


def new_seed() -> int:
    """A fresh seed from the OS (never from torch's or numpy's global RNG)."""
    return secrets.randbits(62)


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A private generator seeded exactly (:func:`famviz._random.make_generator`)."""
    return make_generator(seed, device)


# ------------------------------------------------------------------------------ flat vectors


@dataclass(frozen=True)
class ParamLayout:
    """How a name-keyed parameter dict maps to one flat vector (in the given name order)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        seq = [tensors[n] for n in self.names] if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in seq])

    def split(self, flat: Tensor) -> list[Tensor]:
        """Flat vector(s) (..., dim) -> list of tensors shaped like the parameters."""
        lead = flat.shape[:-1]
        return [
            part.reshape(*lead, *shape)
            for part, shape in zip(torch.split(flat, self.numels, dim=-1), self.shapes)
        ]

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.split(flat)))


# ------------------------------------------------------------------------------ the operator


class HessianOperator:
    """The Hessian of ``objective`` with respect to the parameters ``names``.

    Two ways to make a Hessian-vector product (HVP), with the same numbers:

    * one batch of data (``stream=False``): the gradient graph is built once at construction
      (one forward and one backward pass) and kept; each HVP is one more backward pass;
    * several batches (``stream=True``, the default when the data has more than one batch,
      and always for live data such as a ``DataLoader``, which is re-read on every pass): each HVP is accumulated over the batches, with one batch's graph alive at a time, so
      memory stays flat in the number of samples; an HVP then costs a forward, a backward and
      a double-backward pass per batch.

    ``num_hvps`` counts the Hessian-vector products made; a progress bar set as ``bar`` (by
    :func:`hvp_progress`) is advanced by each.
    """

    bar = None  # a tqdm bar counting HVPs, while hvp_progress holds one

    def __init__(self, objective: Objective, names: Sequence[str], *, stream: bool | None = None):
        if not names:
            raise ValueError("no parameters selected")
        self.objective = objective
        self._params = {n: objective.params[n].detach().clone().requires_grad_(True) for n in names}
        self.layout = ParamLayout(tuple(names), tuple(p.shape for p in self._params.values()))
        self.dim = self.layout.dim
        self.device = objective.device
        self.dtype = objective.dtype
        self.num_hvps = 0
        # live data (a DataLoader re-read on every pass) is streamed whatever was asked: a graph
        # kept from one pass would freeze its augmentation and hold its whole dataset
        batches = objective.batches
        self.stream = (batches.live or batches.num_batches > 1 if stream is None
                       else bool(stream) or batches.live)
        if self.stream:
            with torch.no_grad():
                check_finite_loss(objective.loss(self._params))
            # which parameters have a Hessian row at all: read off the first batch's graph
            grads = self._batch_grads(*objective.batches.first())
            self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            return
        with double_backward_safe():  # attention kernels that support double backward
            loss = objective.loss(self._params)
        check_finite_loss(loss)
        grads = torch.autograd.grad(
            loss, list(self._params.values()), create_graph=True, allow_unused=True
        )
        # parameters whose gradient is constant (or absent) have zero Hessian rows
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]
        self._inputs = [list(self._params.values())[i] for i in self._live]

    def _batch_grads(self, X, y) -> tuple:
        """The gradient of one batch's weighted loss, with its graph (for a double backward)."""
        with double_backward_safe():
            loss = self.objective.batch_loss(self._params, X, y) * (
                len(X) / self.objective.num_samples)
        return torch.autograd.grad(loss, list(self._params.values()), create_graph=True,
                                   allow_unused=True)

    def _double_backward(self, grads, inputs, parts, batched: bool, retain: bool) -> tuple:
        try:
            return torch.autograd.grad(grads, inputs, grad_outputs=parts, retain_graph=retain,
                                       allow_unused=True, is_grads_batched=batched)
        except RuntimeError as exc:
            if "is not implemented" not in str(exc) or "derivative for" not in str(exc):
                raise
            raise ValueError(
                f"the model uses an operation without a second derivative ({exc}); "
                "Hessian-vector products differentiate twice. Replace it by one that has one "
                "(for attention: the math/eager implementation, e.g. HuggingFace's "
                "attn_implementation='eager'; famviz already routes "
                "F.scaled_dot_product_attention through its math kernel)"
            ) from exc

    def _backward(self, parts: list[Tensor], batched: bool) -> list[Tensor]:
        full = [torch.zeros_like(p) for p in parts]
        if not self.stream:
            outs = self._double_backward(self._grads, self._inputs,
                                         [parts[i] for i in self._live], batched, retain=True)
            for i, o in zip(self._live, outs):
                if o is not None:
                    full[i] = o
            return full
        params = list(self._params.values())
        for X, y in self.objective.batches:  # one batch's graph alive at a time
            grads = self._batch_grads(X, y)
            live = [i for i in self._live if grads[i] is not None and grads[i].requires_grad]
            if not live:
                continue
            outs = self._double_backward([grads[i] for i in live], [params[i] for i in live],
                                         [parts[i] for i in live], batched, retain=False)
            for i, o in zip(live, outs):
                if o is not None:
                    full[i] = full[i] + o
        return full

    def matvec(self, v: Tensor) -> Tensor:
        """H v for a flat vector ``v`` of length ``dim``."""
        self.num_hvps += 1
        if self.bar is not None:
            self.bar.update(1)
        if not self._live:
            return torch.zeros_like(v)
        return self.layout.flatten(self._backward(self.layout.split(v), batched=False))

    def matmat(self, V: Tensor) -> Tensor:
        """H applied to each row of ``V`` (k, dim): batched in chunks of :data:`HVP_CHUNK` for
        blocks up to :data:`BATCHED_HVP_MAX_DIM` parameters, one HVP at a time above."""
        if self.dim > BATCHED_HVP_MAX_DIM:
            return torch.stack([self.matvec(v) for v in V]) if len(V) else V.clone()
        out = []
        for start in range(0, V.shape[0], HVP_CHUNK):
            chunk = V[start : start + HVP_CHUNK]
            self.num_hvps += chunk.shape[0]
            if self.bar is not None:
                self.bar.update(chunk.shape[0])
            if not self._live:
                out.append(torch.zeros_like(chunk))
                continue
            parts = self._backward(self.layout.split(chunk), batched=True)
            out.append(torch.cat([p.reshape(chunk.shape[0], -1) for p in parts], dim=1))
        return torch.cat(out)

    def columns(self, memory_budget: int = DEFAULT_MEMORY_BUDGET
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(idx, H[idx])``: chunks of Hessian rows (= columns) from HVPs with the unit
        vectors ``e_idx``, so callers can reduce them without holding the dense matrix; chunks
        of :func:`probe_rows` rows within ``memory_budget``."""
        size = probe_rows(self, memory_budget)
        for start in range(0, self.dim, size):
            idx = torch.arange(start, min(start + size, self.dim), device=self.device)
            E = torch.zeros(len(idx), self.dim, device=self.device, dtype=self.dtype)
            E[torch.arange(len(idx), device=self.device), idx] = 1
            yield idx, self.matmat(E)

    def dense(self) -> Tensor:
        """The full (dim, dim) Hessian from ``dim`` HVPs; for small parameter blocks."""
        H = torch.cat([rows for _, rows in self.columns(DEFAULT_MEMORY_BUDGET)])
        return (H + H.T) / 2

    def diagonal(self, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Tensor:
        """The exact diagonal from ``dim`` HVPs with unit vectors (chunked, see
        :meth:`columns`)."""
        return torch.cat([rows[torch.arange(len(idx), device=rows.device), idx]
                          for idx, rows in self.columns(memory_budget)])


# ------------------------------------------------------------------------- trace estimators


@contextmanager
def hvp_progress(op: HessianOperator, enabled: bool, total: int | None, desc: str):
    """While inside, a progress bar (:func:`famviz._progress.progress_bar`) counts the HVPs
    of ``op``; nothing is shown or imported when not ``enabled``."""
    with progress_bar(enabled, total, desc) as bar:
        op.bar = bar
        try:
            yield bar
        finally:
            op.bar = None


def rademacher(shape, gen: torch.Generator, device, dtype) -> Tensor:
    """Random signs ±1 drawn from ``gen``."""
    return torch.randint(0, 2, shape, generator=gen, device=device).to(dtype) * 2 - 1


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float
    num_hvps: int


def hutchinson_trace(op: HessianOperator, probes: int, seed: int,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Estimate:
    """Hutchinson's estimator :math:`\\mathrm{Tr}(H) \\approx \\frac1K\\sum_k v_k^\\top H v_k`
    with Rademacher probes; the standard error is the sample std over probes / sqrt(K).
    Probes are drawn and multiplied in chunks (:func:`probe_chunks`) within ``memory_budget``."""
    if probes < 2:
        raise ValueError(f"probes must be at least 2 (for a standard error), got {probes}")
    gen = generator(seed, op.device)
    samples = torch.cat([(V * op.matmat(V)).sum(dim=1)
                         for V in probe_chunks(op, probes, gen, memory_budget)])
    return Estimate(float(samples.mean()), float(samples.std() / math.sqrt(probes)), probes)


def probe_rows(op: HessianOperator, memory_budget: int, copies: int = 3) -> int:
    """Probe vectors per chunk: as many as ``copies`` (probes, their products, a temporary)
    of them fit in ``memory_budget``, at most one batched HVP's worth (:data:`HVP_CHUNK`), and
    one at a time above :data:`BATCHED_HVP_MAX_DIM` parameters, where HVPs go one by one
    anyway; at least one."""
    row = op.dim * torch.empty((), dtype=op.dtype).element_size()
    cap = HVP_CHUNK if op.dim <= BATCHED_HVP_MAX_DIM else 1
    return rows_per_chunk(row, memory_budget, copies=copies, cap=cap)


def rademacher_rows(n: int, dim: int, gen: torch.Generator, device, dtype) -> Tensor:
    """``n`` Rademacher vectors (n, dim) drawn one row after another, so that any grouping of
    rows into chunks gives the same vectors on every device (a CPU generator draws them as one
    (n, dim) block would)."""
    if torch.device(device).type == "cpu":
        return rademacher((n, dim), gen, device, dtype)
    return torch.stack([rademacher((dim,), gen, device, dtype) for _ in range(n)])


def probe_chunks(op: HessianOperator, probes: int, gen: torch.Generator,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Iterator[Tensor]:
    """``probes`` Rademacher probes drawn from ``gen`` in chunks of :func:`probe_rows`, so
    memory holds a chunk of probes, never all of them; the probes do not depend on the
    chunking (:func:`rademacher_rows`: on a CPU they are those of one (probes, dim) draw)."""
    size = probe_rows(op, memory_budget)
    for start in range(0, probes, size):
        yield rademacher_rows(min(size, probes - start), op.dim, gen, op.device, op.dtype)


def hutchpp_trace(op: HessianOperator, hvps: int, seed: int,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with a budget of ``hvps`` products.

    A third of the budget sketches the top of the spectrum (:math:`Q = \\mathrm{orth}(H S)`),
    whose trace :math:`\\mathrm{Tr}(Q^\\top H Q)` is exact; Hutchinson on the deflated
    remainder :math:`(I - QQ^\\top) H (I - QQ^\\top)` uses the last third. The standard error
    is that of the remainder's Hutchinson samples.

    Memory: the sketch :math:`Y = HS` (k = ``hvps // 3`` vectors) is the method itself; it is
    factored in place (Householder, ``geqrf``). Q is formed as a second k-vector matrix only
    when both fit in ``memory_budget``; otherwise it is applied from the reflectors
    (``ormqr``, slower). The sketch probes S, the columns of Q with their products
    :math:`HQ`, and the remainder's probes come in chunks of :func:`probe_rows` within
    ``memory_budget``.
    """
    if hvps < 6:
        raise ValueError(f"Hutch++ needs a budget of at least 6 HVPs, got {hvps}")
    k = min(hvps // 3, op.dim)
    m = hvps - 2 * k
    gen = generator(seed, op.device)
    size = probe_rows(op, memory_budget)
    # H S column by column, in column-major layout: LAPACK factors it in place, no copy
    Y = torch.empty(k, op.dim, dtype=op.dtype, device=op.device).T
    for start in range(0, k, size):
        stop = min(start + size, k)
        Y[:, start:stop] = op.matmat(rademacher_rows(stop - start, op.dim, gen, op.device,
                                                     op.dtype)).T
    tau = torch.empty(k, dtype=op.dtype, device=op.device)
    reflectors, tau = torch.geqrf(Y, out=(Y, tau))  # in place: Y becomes Q's reflectors
    # Q formed explicitly (faster products) when it fits in the budget beside the reflectors;
    # else applied from them, Q_full = H_1 ... H_k (no second k-vector matrix)
    row = op.dim * torch.empty((), dtype=op.dtype).element_size()
    Q = torch.linalg.householder_product(reflectors, tau) if 2 * k * row <= memory_budget else None

    def q_columns(start: int, stop: int) -> Tensor:  # (stop - start, dim)
        if Q is not None:
            return Q[:, start:stop].T
        E = torch.zeros(op.dim, stop - start, dtype=op.dtype, device=op.device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1
        return torch.ormqr(reflectors, tau, E).T

    def deflate(G: Tensor) -> Tensor:  # rows g -> (I - QQ^T) g
        if Q is not None:
            return G - (G @ Q) @ Q.T
        # (I - QQ^T) g = Q_full [0; (Q_full^T g)_{k:}]: the first k coordinates are Q's
        h = torch.ormqr(reflectors, tau, G.T, transpose=True)
        h[:k] = 0
        return torch.ormqr(reflectors, tau, h).T

    top = 0.0
    for start in range(0, k, size):
        Qc = q_columns(start, min(start + size, k))
        top += float((Qc * op.matmat(Qc)).sum())
    samples = []
    for start in range(0, m, size):
        G = deflate(rademacher_rows(min(size, m - start), op.dim, gen, op.device, op.dtype))
        samples.append((G * op.matmat(G)).sum(dim=1))
    samples = torch.cat(samples)
    rest = float(samples.mean())
    stderr = float(samples.std() / math.sqrt(m)) if m > 1 else float("nan")
    return Estimate(top + rest, stderr, 2 * k + m)


# --------------------------------------------------------------------- eigenvalue estimators


@dataclass(frozen=True)
class Eigen:
    values: Tensor  # (k,), descending
    vectors: Tensor  # (k, dim), unit norm
    residuals: Tensor  # (k,), ||H v - lambda v||, from k final HVPs
    iterations: int
    converged: bool
    scale: float  # the spectral scale the tolerances are relative to (a lower bound of ||H||_2)


#: a Lanczos vector whose norm after reorthogonalization is below this many machine epsilons
#: times the spectral scale spans nothing new: the Krylov space is invariant (breakdown)
BREAKDOWN_EPS = 100


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def residual_ok(residual: Tensor, values: Tensor, tol: float, scale: float,
                dtype: torch.dtype) -> bool:
    """The convergence test of both eigensolvers: every :math:`\\|Hv_i - \\lambda_i v_i\\|
    \\le \\mathrm{tol}\\cdot\\max(|\\lambda_i|, s)` with s the spectral scale (so eigenvalues
    far below the top are held to an accuracy relative to the top, and a zero Hessian passes),
    or below the working precision (:data:`BREAKDOWN_EPS` machine epsilons of the operator's
    ``dtype`` times s) when ``tol`` asks for more than the dtype can give."""
    floor = BREAKDOWN_EPS * _eps(dtype) * scale
    bound = (tol * values.abs().clamp_min(scale)).clamp_min(floor)
    return bool((residual <= bound).all())


def _true_residuals(op: HessianOperator, vals: Tensor, vecs: Tensor) -> Tensor:
    return (op.matmat(vecs) - vals[:, None] * vecs).norm(dim=1)


def _orthogonalize(q: Tensor, Q) -> Tensor:
    """``q`` minus its projection on the rows of ``Q`` (a list of vectors or a
    :class:`VectorStore`), classical Gram-Schmidt applied twice (Kahan-Parlett)."""
    if not len(Q):
        return q
    if isinstance(Q, VectorStore):
        for _ in range(2):
            q = q - Q.combine(Q.coefficients(q))
        return q
    Qm = torch.stack(Q)
    for _ in range(2):
        q = q - Qm.T @ (Qm @ q)
    return q


def _unit_orthogonal(n: int, Q, gen: torch.Generator, op) -> Tensor | None:
    """A random unit vector orthogonal to the rows of Q (None if Q spans everything)."""
    q = torch.randn(n, generator=gen, device=op.device, dtype=op.dtype)
    q = _orthogonalize(q / q.norm(), Q)
    norm = float(q.norm())
    if norm <= BREAKDOWN_EPS * _eps(op.dtype):
        return None
    return q / norm


def lanczos_top(op: HessianOperator, k: int, tol: float, max_iter: int, seed: int,
                memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Eigen:
    """The ``k`` largest (algebraic) eigenpairs by Lanczos with full reorthogonalization.

    All tolerances are relative to the spectral scale s, the largest :math:`\\|Hq_j\\|` seen
    (a lower bound of :math:`\\|H\\|_2`), so a Hessian scaled by 1e-20 or 1e+20 takes the same
    iterations and gives the same relative accuracy. A Ritz pair is converged when its residual
    bound :math:`|\\beta_j s_{j,i}| \\le \\mathrm{tol}\\cdot\\max(|\\theta_i|, s)`
    (:func:`residual_ok`); the eigenvalue error is then at most that residual.

    One Krylov space holds one copy of a repeated eigenvalue, and it becomes invariant (a
    breakdown) when the Hessian is zero or of low rank. So a run ends with a *block*: when its
    top k Ritz pairs have converged or it broke down. For ``k >= 2`` another block then starts
    from a random vector orthogonal to every Lanczos vector so far (where the missed copies
    live) and runs until its top Ritz pair has converged: if that lies below the k-th value
    found, nothing was missed; otherwise its values join and it runs on as a full block,
    followed by another check. Exactly ``k`` values come back. The check costs a second run for
    ``k >= 2``; for ``k = 1`` multiplicity does not matter and there is none.

    ``converged`` is decided at the end from the true residuals :math:`\\|Hv - \\theta v\\|`
    (k more HVPs), not from the Lanczos bound, and is False when ``max_iter`` (all blocks
    together) ran out before the check.

    The Lanczos basis (one vector per iteration) lives in a :class:`VectorStore`: at most
    ``memory_budget`` bytes of it on the device, the rest in a temporary file read back in
    chunks for each reorthogonalization (the same numbers up to the order of summation). Of
    each finished block only its top k Ritz vectors are formed.
    """
    n = op.dim
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of parameters ({n}), got {k}")
    max_iter = min(max_iter, n)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is below k={k}: Lanczos needs at least k "
                         "iterations for k eigenvalues; raise max_iter")
    gen = generator(seed, op.device)
    # max_iter + 1 rows: the vector after the last iteration is appended before the loop ends
    Q = VectorStore(n, op.dtype, op.device, memory_budget, capacity=max_iter + 1)
    try:
        return _lanczos(op, k, tol, max_iter, gen, Q)
    finally:
        Q.close()


def _lanczos(op: HessianOperator, k: int, tol: float, max_iter: int, gen, Q: VectorStore) -> Eigen:
    n = op.dim
    q = _unit_orthogonal(n, Q, gen, op)
    Q.append(q)
    done: list[tuple[Tensor, Tensor]] = []  # finished blocks: (Ritz values, top-k Ritz vectors)
    start, alphas, betas = 0, [], []  # the current block: Q[start:], its tridiagonal T
    scale, converged, iterations = 0.0, False, 0
    theta = S = None
    kth = -math.inf  # the k-th largest value of the finished blocks

    def ritz(theta: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        top = S[:, :k].to(device=op.device, dtype=op.dtype)  # only these can be among the top k
        return theta, Q.combine(top, start).T

    for _ in range(max_iter):
        iterations += 1
        w = op.matvec(q)
        scale = max(scale, float(w.norm()))
        alphas.append(float(w @ q))
        w = _orthogonalize(w, Q)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        theta, S = theta.flip(0), S.flip(1)
        broke = beta <= BREAKDOWN_EPS * _eps(op.dtype) * scale
        bounds = (beta * S[-1, :]).abs()
        checking = bool(done)  # a block after the first looks for missed values
        if not broke:
            top_ok = residual_ok(bounds[:1], theta[:1], tol, scale, op.dtype)
            if checking and top_ok and float(theta[0]) <= kth:
                converged = True  # the complement holds nothing among the top k
                break
            kk = min(k, len(alphas))
            have = sum(len(v) for v, _ in done) + len(alphas)
            if not (have >= k and residual_ok(bounds[:kk], theta[:kk], tol, scale, op.dtype)):
                betas.append(beta)
                q = w / beta
                Q.append(q)
                continue
        # the block is finished: its converged (or, after a breakdown, exact) pairs are kept
        new_top = float(theta[0]) > kth
        done.append(ritz(theta, S))
        alphas, betas = [], []
        vals = torch.cat([v for v, _ in done])
        if len(vals) >= k:
            kth = float(vals.sort(descending=True).values[k - 1])
        if (k == 1 and not checking) or (checking and not new_top):
            converged = True
            break
        q = _unit_orthogonal(n, Q, gen, op) if len(Q) < n else None
        if q is None:
            converged = True  # every direction is spanned: all n eigenvalues are exact
            break
        start = len(Q)
        Q.append(q)
    if alphas:  # the unfinished block
        done.append(ritz(theta, S))
    vals = torch.cat([v for v, _ in done])
    if len(vals) < k:  # pragma: no cover - max_iter >= k gives k Ritz values
        raise RuntimeError(f"Lanczos produced {len(vals)} Ritz values for k={k}")
    # a stable sort picks, among equal values, the earlier (so within a block one of the top k)
    order = torch.sort(vals, descending=True, stable=True).indices[:k].tolist()
    offsets = [0]
    for v, _ in done:
        offsets.append(offsets[-1] + len(v))
    picked = []
    for i in order:
        b = max(j for j in range(len(done)) if offsets[j] <= i)
        picked.append(done[b][1][i - offsets[b]])
    vals = vals[order].to(device=op.device, dtype=op.dtype)
    vecs = torch.stack(picked)
    vecs = vecs / vecs.norm(dim=1, keepdim=True)
    res = _true_residuals(op, vals, vecs)
    converged = converged and residual_ok(res, vals, tol, scale, op.dtype)
    return Eigen(vals, vecs, res, iterations, converged, scale)


def power_iteration_top(op: HessianOperator, k: int, tol: float, max_iter: int, seed: int) -> Eigen:
    """The ``k`` dominant eigenpairs (largest magnitude) by power iteration with deflation.

    Each pair iterates (at most ``max_iter`` HVPs) until its residual
    :math:`\\|Hv - \\lambda v\\| \\le \\mathrm{tol}\\cdot\\max(|\\lambda|, s)`, s the spectral
    scale (the largest :math:`\\|Hv\\|` seen; :func:`residual_ok`). This is stricter than
    PyHessian's rule (the Rayleigh quotient changing by less than ``tol``), which stops long
    before the eigenvector is found when the top two eigenvalues are close. Later pairs are
    kept orthogonal to the earlier ones. A direction the (deflated) Hessian maps to zero is an
    eigenvector with eigenvalue 0: a zero Hessian gives zeros, not NaN.

    ``converged`` is decided at the end from the true residuals of all k pairs.
    """
    n = op.dim
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of parameters ({n}), got {k}")
    gen = generator(seed, op.device)
    values, vectors = [], []
    total, scale, converged_all = 0, 0.0, True
    for _ in range(k):
        v = _unit_orthogonal(n, vectors, gen, op)
        lam, converged = 0.0, False
        for _ in range(max_iter):
            Hv = op.matvec(v)
            total += 1
            scale = max(scale, float(Hv.norm()))
            for u in vectors:  # deflate: the earlier eigenvectors' directions are removed
                Hv = Hv - (u @ Hv) * u
            lam = float(v @ Hv)
            res = (Hv - lam * v).norm()
            # a quarter of tol: the true residual also carries the earlier pairs' errors
            if residual_ok(res[None], torch.tensor([lam], dtype=res.dtype, device=res.device), tol / 4, scale,
                           op.dtype):
                converged = True
                break
            norm = float(Hv.norm())
            if norm <= BREAKDOWN_EPS * _eps(op.dtype) * scale:  # H v = 0: lambda = 0
                lam, converged = 0.0, True
                break
            v = Hv / norm
            for u in vectors:
                v = v - (u @ v) * u
            v = v / v.norm()
        values.append(lam)
        vectors.append(v)
        converged_all &= converged
    vecs = torch.stack(vectors)
    vals = torch.tensor(values, dtype=op.dtype, device=op.device)
    order = torch.argsort(vals, descending=True)
    vals, vecs = vals[order], vecs[order]
    res = _true_residuals(op, vals, vecs)
    converged_all = converged_all and residual_ok(res, vals, tol, scale, op.dtype)
    return Eigen(vals, vecs, res, total, converged_all, scale)


# ------------------------------------------------------------------ Gauss-Newton pull-backs


def softmax_complement(p: Tensor) -> Tensor:
    """:math:`1 - p` for softmax rows ``p`` (N, d), accurate where :math:`p_i \\approx 1`.

    ``1 - p_i`` in floating point loses every digit below the rounding of :math:`p_i` (in
    float32 a :math:`1 - p_i` of 1e-9 becomes 0); the row's largest entry therefore gets the
    sum of the other entries instead (positive terms, no cancellation). The other entries are
    at most 1/2, where ``1 - p_i`` is exact to rounding.
    """
    top = p.argmax(dim=1, keepdim=True)
    rest = p.scatter(1, top, 0.0).sum(dim=1, keepdim=True)
    return (1 - p).scatter(1, top, rest)


def softmax_coupling(p: Tensor, w: Tensor) -> Tensor:
    r""":math:`A = \sum_n w_n p_n p_n^\top` with its diagonal set to zero (d×d, entries
    >= 0), for softmax rows ``p`` (N, d) and weights ``w`` >= 0 (N,).

    Since :math:`\sum_{j} p_{nj} = 1`, :math:`\sum_n w_n(\mathrm{diag}(p_n) - p_np_n^\top)`
    is the graph Laplacian :math:`\mathrm{diag}(A\mathbf 1) - A` of A, and for any matrix W
    with rows :math:`w_s`, :math:`\langle WW^\top, \mathrm{diag}(A\mathbf 1) - A\rangle
    = \tfrac12 \sum_{s,s'} A_{ss'}\|w_s - w_{s'}\|^2`. Both forms are sums of non-negative
    terms: no cancellation when ``p`` is nearly one-hot (near-zero cross-entropy), where
    :math:`\sum_s p_s\|w_s\|^2 - \|\sum_s p_s w_s\|^2` subtracts two nearly equal numbers
    (and can come out negative in float32).
    """
    A = (p * w[:, None]).T @ p
    return A * (1 - torch.eye(A.shape[0], dtype=A.dtype, device=A.device))


def laplacian(A: Tensor) -> Tensor:
    r""":math:`\mathrm{diag}(A\mathbf 1) - A` (see :func:`softmax_coupling`)."""
    return torch.diag(A.sum(dim=1)) - A


def row_distances(W: Tensor) -> Tensor:
    r""":math:`E_{ss'} = \|w_s - w_{s'}\|^2` for the rows of W (d×m), from the differences
    themselves (not from :math:`\|w_s\|^2 + \|w_{s'}\|^2 - 2\langle w_s, w_{s'}\rangle`,
    which cancels for nearby rows)."""
    return torch.cdist(W, W, compute_mode="donot_use_mm_for_euclid_dist").square()


def loss_hessian_factor(loss_name: str, output: Tensor) -> Tensor:
    """Per-sample factor ``S`` (C, N, d_out) of the loss Hessian in the output:
    :math:`\\partial^2 \\ell_n / \\partial o_n^2 = \\sum_c S_{c,n} S_{c,n}^\\top`.

    * cross-entropy (softmax): :math:`\\mathrm{diag}(p) - pp^\\top`, factor column
      :math:`c`: :math:`\\sqrt{p_c}\\,(e_c - p)`; labels do not enter. Its entry
      :math:`1 - p_c` comes from :func:`softmax_complement` (accurate near a one-hot p).
    * MSE (mean over the d outputs of a sample): :math:`(2/d)\\,I`, columns
      :math:`\\sqrt{2/d}\\,e_c`.
    """
    N, d = output.shape
    if loss_name == "cross_entropy":
        p = torch.softmax(output, dim=1)
        # sqrt(p) as exp(log p / 2): its derivative stays finite where p underflows to 0 (the
        # FAM penalty differentiates this factor)
        root = torch.exp(0.5 * torch.log_softmax(output, dim=1))
        eye = torch.eye(d, dtype=torch.bool, device=output.device)
        # S[c, n, :] = sqrt(p[n, c]) * (e_c - p[n]), its entry c taken from
        # softmax_complement; a mask, not an indexed assignment (whose backward is slower)
        return root.T[:, :, None] * torch.where(eye[:, None, :], softmax_complement(p)[None],
                                                -p[None])
    if loss_name == "mse":
        eye = torch.eye(d, dtype=output.dtype, device=output.device) * math.sqrt(2.0 / d)
        return eye[:, None, :].expand(d, N, d)
    raise ValueError(f"no loss-Hessian factor for loss {loss_name!r}")


def _sequential_leaves(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Leaf modules in execution order when ``model`` is built only from nn.Sequential
    containers without hooks, and uses no module or parameter twice (a shared one breaks the
    per-layer closed forms). Running the leaves one after the other is then the model's
    forward pass."""
    if shared_names(model):
        return None
    leaves: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> bool:
        children = list(module.named_children())
        if not children:
            leaves.append((prefix, module))
            return True
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            return False  # a subclass with its own forward may do anything between its layers
        if module._forward_hooks or module._forward_pre_hooks:
            return False  # a container's hook may change what its children compute
        return all(walk(f"{prefix}.{n}" if prefix else n, c) for n, c in children)

    return leaves if walk("", model) else None


def piecewise_linear_after(model: nn.Module, layer: str, bn: str = "eval") -> bool:
    """True when the model is an nn.Sequential stack in which everything after ``layer`` is
    piecewise linear (so the layer's Hessian block equals its Gauss-Newton block)."""
    leaves = _sequential_leaves(model)
    if leaves is None:
        return False
    names = [n for n, _ in leaves]
    if layer not in names:
        return False
    allowed: tuple[type, ...] = PIECEWISE_LINEAR + (nn.Linear, nn.Conv1d, nn.Conv2d)
    if bn == "eval":  # BatchNorm with running statistics is affine
        allowed += (nn.modules.batchnorm._BatchNorm,)
    return all(isinstance(m, allowed) for _, m in leaves[names.index(layer) + 1 :])


def piecewise_linear_stack(model: nn.Module) -> list[str] | None:
    """Names of the Linear layers when the whole model is an nn.Sequential stack of Linear and
    parameter-free piecewise-linear modules (so every Linear block's Hessian is Gauss-Newton);
    otherwise None."""
    leaves = _sequential_leaves(model)
    if leaves is None:
        return None
    for _, m in leaves:
        if not isinstance(m, (nn.Linear,) + PIECEWISE_LINEAR):
            return None
        if isinstance(m, PIECEWISE_LINEAR) and any(True for _ in m.parameters()):
            return None
    return [n for n, m in leaves if isinstance(m, nn.Linear)]


@dataclass
class Pullback:
    r"""One batch's view of a Linear layer for the Gauss-Newton closed forms.

    ``phi`` (N_b, m) are the layer's inputs. The per-sample curvature in the layer's outputs,
    :math:`G_n = J_n^\top H^{\ell}_n J_n` (d×d), is given by ``delta`` (C, N_b, d), the
    loss-Hessian factor backpropagated to the layer (:math:`G_n = \sum_c
    \delta_{cn}\delta_{cn}^\top`), or — when the layer's output is the model's output, so
    that :math:`G_n` is the loss Hessian itself — by ``output`` with ``delta`` None.
    """

    phi: Tensor
    delta: Tensor | None
    output: Tensor | None
    loss_name: str

    @functools.cached_property
    def probs(self) -> Tensor:
        """Softmax of the model's output (cross-entropy on the output layer)."""
        return torch.softmax(self.output, dim=1)

    def gram(self, w: Tensor) -> Tensor:
        r""":math:`\sum_n w_n G_n` (d×d) for weights ``w`` >= 0 (N_b,): the Laplacian of
        :func:`softmax_coupling` for cross-entropy on the output, :math:`(2/d)\sum_n w_n I`
        for MSE on it, :math:`\sum_{c,n} w_n\delta_{cn}\delta_{cn}^\top` through ``delta``."""
        if self.delta is None:
            if self.loss_name == "cross_entropy":  # G_n = diag(p_n) - p_n p_n^T
                return laplacian(softmax_coupling(self.probs, w))
            d = self.output.shape[1]  # mse: G_n = (2/d) I
            return torch.eye(d, dtype=w.dtype, device=w.device) * ((2.0 / d) * w.sum())
        d = self.delta.shape[-1]
        return (self.delta * w[None, :, None]).reshape(-1, d).T @ self.delta.reshape(-1, d)

    def kappa(self, W: Tensor, w: Tensor) -> Tensor:
        r""":math:`\langle WW^\top, \sum_n w_n G_n\rangle` for the layer's weight W, as a sum
        of non-negative terms: :math:`\tfrac12\sum_{s,s'} A_{ss'}\|w_s - w_{s'}\|^2` for
        cross-entropy on the output, whose Gram matrix is the Laplacian of A
        (:func:`softmax_coupling`); :math:`\sum_{c,n} w_n \|W^\top\delta_{cn}\|^2` through
        ``delta``. In exact arithmetic that is ``(W @ W.T * gram).sum()``, but it is never
        negative and stays accurate near zero cross-entropy, where the contraction cancels.

        Differentiable in W, w and the pull-back's tensors (the FAM penalty): ``w`` enters
        linearly, never through :math:`\sqrt{w}`, which has no finite derivative at a sample
        with :math:`\phi_n = 0`."""
        if self.delta is None:
            if self.loss_name == "cross_entropy":
                # sum_n w_n p_n p_n^T; its diagonal meets E_ss = 0 exactly, so it need not be
                # zeroed as in softmax_coupling (a training step runs this: fewer kernels)
                p = self.probs
                return ((p.T * w) @ p * row_distances(W)).sum() / 2
            return (2.0 / self.output.shape[1]) * w.sum() * W.square().sum()
        return ((self.delta @ W).square().sum(dim=2) * w).sum()

    def gram_and_kappa(self, W: Tensor | None, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`gram` and (when the layer's weight W is given) :meth:`kappa`."""
        return self.gram(w), None if W is None else self.kappa(W, w)

    def diag(self) -> Tensor:
        r""":math:`\mathrm{diag}(G_n)` for every sample, (N_b, d)."""
        if self.delta is None:
            if self.loss_name == "cross_entropy":  # p (1 - p), with 1 - p accurate near 1
                return self.probs * softmax_complement(self.probs)
            return torch.full_like(self.output, 2.0 / self.output.shape[1])
        return self.delta.pow(2).sum(dim=0)


def pull_back(out: Tensor, zs: Sequence[Tensor], loss_name: str, *,
              create_graph: bool = False, retain_graph: bool = False) -> list[Tensor]:
    r"""The loss-Hessian factor backpropagated from the model's output ``out`` (N, C) to each
    layer output ``z`` in ``zs``: :math:`\delta_{cn} = J_n^\top S_{cn}` with ``S`` from
    :func:`loss_hessian_factor` (of the output flattened per sample: MSE averages over all
    its entries), shaped (C, *z.shape), from one batched backward pass (zeros
    for a z that does not reach the output). Then :math:`\sum_c \delta_{cn}\delta_{cn}^\top
    = J_n^\top (\partial^2 \ell_n / \partial o_n^2) J_n`, the Gauss-Newton curvature in z.

    With ``create_graph`` (the FAM penalty's exact gradient) the factor and the backward pass
    stay in the autograd graph, so the result is differentiable in everything ``out`` depends
    on; otherwise it is computed from a detached ``out`` and carries no graph.
    ``retain_graph`` keeps the forward graph for a later backward pass (a training step's)."""
    if not zs:
        return []
    flat = (out if create_graph else out.detach()).reshape(len(out), -1)
    S = loss_hessian_factor(loss_name, flat)  # (C, N, D)
    if create_graph:
        # the Jacobian from constant unit vectors, then the factor applied to it: the
        # derivative in S is then a product with J, not a double backward through the layers
        # above (about 10 % of a FAM step on a hidden layer of the digits MLP)
        D = flat.shape[1]
        eye = torch.eye(D, dtype=out.dtype, device=out.device).reshape(D, 1, *out.shape[1:])
        grads = torch.autograd.grad(out, list(zs), grad_outputs=eye.expand(D, *out.shape),
                                    is_grads_batched=True, create_graph=True,
                                    retain_graph=True, allow_unused=True)
        grads = [None if J is None else torch.einsum("cnk,kn...->cn...", S, J) for J in grads]
    else:
        grads = torch.autograd.grad(out, list(zs), grad_outputs=S.reshape(len(S), *out.shape),
                                    is_grads_batched=True, retain_graph=retain_graph,
                                    allow_unused=True)
    return [g if g is not None else torch.zeros(S.shape[0], *z.shape, dtype=S.dtype,
                                                 device=S.device)
            for z, g in zip(zs, grads)]


def linear_pullback(objective: Objective, layers: Sequence[str]):
    """For each batch, yield ``{layer: Pullback}`` for the named Linear layers: one forward
    pass, plus — for layers that are not the output layer — the C columns of the loss-Hessian
    factor backpropagated to their outputs in one batched backward pass.

    Exact (Hessian = Gauss-Newton) only where :func:`piecewise_linear_after` holds or the layer
    is the output layer; callers check.
    """
    params = {n: p.detach() for n, p in objective.params.items()}
    for X, y in objective.batches:
        with objective.capture(layers) as cap:
            out = objective.forward(params, X)
        if not torch.isfinite(out).all():
            raise ValueError("the model's output holds NaN or inf on this data: every "
                             "curvature measure would be NaN. Check the weights, buffers and "
                             "inputs")
        with torch.no_grad():  # the closed forms do not need the loss, but it must be finite
            check_finite_loss(objective.loss_fn(out, y), "the loss on a batch of data")
        hidden = [name for name in layers if cap[name]["z"] is not out]
        deltas = dict(zip(hidden, pull_back(out, [cap[name]["z"] for name in hidden],
                                            objective.loss_name)))
        result = {}
        for name in layers:
            phi = cap[name]["phi"].detach()
            if phi.ndim != 2:
                raise ValueError(
                    f"layer {name!r} receives inputs of shape {tuple(phi.shape)}; the closed "
                    "form needs (N, features) inputs — use method='exact' instead"
                )
            if name in deltas:
                result[name] = Pullback(phi, deltas[name], None, objective.loss_name)
            else:
                result[name] = Pullback(phi, None, out.detach(), objective.loss_name)
        yield result
