"""Hessian-based sharpness: trace, top eigenvalues and Frobenius norm of the loss Hessian.

All three take the common arguments ``(model, data, loss, params=None, ...)``: ``params`` is
``None`` (every parameter), a layer name (``"2"``: its weight and bias), a parameter name
(``"2.weight"``), or a list of these. None of them is invariant under function-preserving
reparameterizations (docs/math.md §2): layer-wise rescaling by α multiplies the Hessian block of the
scaled-down layer by α² — the contrast relative flatness is built to avoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._memory import DEFAULT_MEMORY_BUDGET, check_memory_budget
from .._progress import check_progress
from ..curvature import (
    HessianOperator,
    generator,
    hutchinson_trace,
    hvp_progress,
    hutchpp_trace,
    lanczos_top,
    linear_pullback,
    new_seed,
    piecewise_linear_stack,
    power_iteration_top,
    probe_chunks,
)
from ..objective import (
    LOSSES,
    Objective,
    ObjectiveInfo,
    check_option,
    check_seed,
    resolve_params,
)
from ._base import check_count

__all__ = [
    "TraceResult",
    "EigenResult",
    "FrobeniusResult",
    "hessian_trace",
    "hessian_top_eigenvalue",
    "hessian_frobenius",
    "TRACE_METHODS",
    "EIGEN_METHODS",
    "FROBENIUS_METHODS",
]

TRACE_METHODS = ("auto", "exact", "hutchinson", "hutchpp")
EIGEN_METHODS = ("lanczos", "power")
FROBENIUS_METHODS = ("auto", "exact", "hutchinson")

#: with method="auto", exact HVP-based computations are used up to this many parameters
AUTO_EXACT_MAX_PARAMS = 2048
#: default number of Hessian-vector products of the stochastic estimators
DEFAULT_PROBES = 100


@dataclass(frozen=True)
class TraceResult:
    """Tr(H) over the selected parameters; ``float(result)`` is the trace.

    Attributes:
        value: the trace (estimate).
        stderr: standard error of a stochastic estimate; 0.0 when exact.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutchpp"``.
        backend: how it was computed: ``"gauss-newton"`` (exact per-layer pull-back for
            piecewise-linear Linear stacks), ``"hvp-diagonal"`` or ``"hvp"``.
        per_param: exact per-parameter traces (``{}`` for stochastic estimates).
        params: the parameter names the Hessian covers.
        num_hvps: Hessian-vector products used (0 for the Gauss-Newton backend).
        seed: the seed of a stochastic estimate, else None.
        objective: loss, number of samples, BatchNorm policy, dtype, device.
        memory_budget: the memory budget in bytes the call ran with.
    """

    value: float
    stderr: float
    method: str
    backend: str
    per_param: dict[str, float]
    params: tuple[str, ...]
    num_hvps: int
    seed: int | None
    objective: ObjectiveInfo
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def __float__(self) -> float:
        return self.value


@dataclass(frozen=True)
class EigenResult:
    """The top-k Hessian eigenvalues (descending); ``float(result)`` is the largest.

    ``eigenvectors[i]`` is a name-keyed dict of unit-norm directions (jointly unit norm over all
    selected parameters). ``residuals[i]`` is :math:`\\|Hv_i - \\lambda_i v_i\\|`, computed
    with one more HVP per pair at the end; ``converged`` is True only when each is at most
    ``tol`` times :math:`\\max(|\\lambda_i|, s)`, s the spectral scale. ``memory_budget`` is
    the budget in bytes the call ran with.
    """

    eigenvalues: tuple[float, ...]
    eigenvectors: list[dict[str, Tensor]] = field(repr=False)
    residuals: tuple[float, ...]
    method: str
    tol: float
    converged: bool
    iterations: int
    params: tuple[str, ...]
    num_hvps: int
    seed: int
    objective: ObjectiveInfo
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    @property
    def value(self) -> float:
        return self.eigenvalues[0]

    def __float__(self) -> float:
        return self.value


@dataclass(frozen=True)
class FrobeniusResult:
    """:math:`\\|H\\|_F`; ``float(result)`` is the norm (``memory_budget``: the budget in bytes
    the call ran with)."""

    value: float
    stderr: float
    method: str
    params: tuple[str, ...]
    num_hvps: int
    seed: int | None
    objective: ObjectiveInfo
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def __float__(self) -> float:
        return self.value


def _gauss_newton_traces(obj: Objective, names: list[str], layers: list[str]) -> dict[str, float]:
    """Exact per-parameter traces for a piecewise-linear Linear stack (see curvature module):
    :math:`\\mathrm{Tr}\\,H_W = \\frac1N\\sum_n \\|\\phi_n\\|^2 \\sum_c \\|\\delta_{nc}\\|^2`,
    :math:`\\mathrm{Tr}\\,H_b = \\frac1N\\sum_n \\sum_c \\|\\delta_{nc}\\|^2`."""
    wanted = [l for l in layers if f"{l}.weight" in names or f"{l}.bias" in names]
    sums = {n: 0.0 for n in names}
    for batch in linear_pullback(obj, wanted):
        for layer, pb in batch.items():
            dsq = pb.diag().sum(dim=1)  # Tr(G_n), (N_b,)
            if f"{layer}.weight" in sums:
                sums[f"{layer}.weight"] += float((pb.phi.pow(2).sum(dim=1) * dsq).sum())
            if f"{layer}.bias" in sums:
                sums[f"{layer}.bias"] += float(dsq.sum())
    return {n: v / obj.num_samples for n, v in sums.items()}


def _per_sample_vectors(obj: Objective, layers: list[str]) -> bool:
    """True when every layer sees (N, features) inputs and the model gives (N, outputs): the
    form the Gauss-Newton traces assume (a Linear on (N, T, F) tokens shares its weight over
    positions, and its traces couple them); read off the objective's one-sample pass."""
    return obj.sample_output_ndim == 2 and all(
        obj.layer_probe(name).phi_ndim in (None, 2) for name in layers)


def hessian_trace(
    model,
    data,
    loss="cross_entropy",
    params=None,
    method: str = "auto",
    *,
    probes: int = DEFAULT_PROBES,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> TraceResult:
    """Trace of the Hessian of the mean loss over the selected parameters.

    .. math:: \\mathrm{Tr}(H) = \\sum_i \\frac{\\partial^2 E}{\\partial\\theta_i^2}

    Methods:
        * ``"exact"``: for an ``nn.Sequential`` of Linear layers and piecewise-linear activations
          with cross-entropy or MSE, the per-layer Gauss-Newton pull-back (one forward and C
          batched backward passes, no HVP; exact because the Hessian's diagonal blocks equal the
          Gauss-Newton blocks there); otherwise the diagonal from one HVP per coordinate.
        * ``"hutchinson"``: ``probes`` Rademacher probes, with a standard error.
        * ``"hutchpp"``: Hutch++ with a budget of ``probes`` HVPs (lower variance when the
          spectrum is dominated by a few large eigenvalues).
        * ``"auto"``: exact when the Gauss-Newton route applies or there are at most
          :data:`AUTO_EXACT_MAX_PARAMS` parameters, else Hutch++.

    Args:
        model: any ``nn.Module`` (never modified).
        data: ``(X, y)`` or an iterable of batches.
        loss: ``"cross_entropy"``, ``"mse"`` or a callable.
        params: ``None`` (all), a layer or parameter name, or a list of them.
        method: see above.
        probes: HVP budget of the stochastic methods.
        seed: seed of the stochastic methods (a fresh one is drawn and recorded if None).
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.
        memory_budget: bytes of vectors the algorithm may hold at once besides the model
            and one batch's graph (chunks of probes or unit vectors; Hutch++'s sketch of ``probes // 3`` vectors is held whole); results do not
            depend on it, only memory and speed. Default
            :data:`famviz.DEFAULT_MEMORY_BUDGET` (1 GiB).
        progress: show a progress bar of the Hessian-vector products (``tqdm.auto``).

    Example (least squares, :math:`H = \\frac{2}{N}X^\\top X`):

    >>> import torch
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> r = hessian_trace(model, (X, torch.zeros(2, 1, dtype=torch.float64)), loss="mse")
    >>> round(float(r), 10), r.method
    (5.0, 'exact')
    """
    check_option("method", method, TRACE_METHODS)
    seed = check_seed(seed)
    probes = check_count("probes", probes)
    memory_budget = check_memory_budget(memory_budget)
    progress = check_progress(progress)
    names = resolve_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    info = obj.info()
    stack = piecewise_linear_stack(model) if obj.loss_name in LOSSES else None
    gauss_newton = (stack is not None and all(n.rsplit(".", 1)[0] in stack for n in names)
                    and _per_sample_vectors(obj, stack))
    dim = sum(obj.params[n].numel() for n in names)
    if method == "auto":
        method = "exact" if gauss_newton or dim <= AUTO_EXACT_MAX_PARAMS else "hutchpp"

    if method == "exact" and gauss_newton:
        per = _gauss_newton_traces(obj, names, stack)
        return TraceResult(sum(per.values()), 0.0, "exact", "gauss-newton", per, tuple(names), 0,
                           None, info, memory_budget)

    op = HessianOperator(obj, names)
    if method == "exact":
        with hvp_progress(op, progress, op.dim, "Hessian trace (exact)"):
            diag = op.diagonal(memory_budget)
        per = {n: float(t.sum()) for n, t in op.layout.unflatten(diag).items()}
        return TraceResult(float(diag.sum()), 0.0, "exact", "hvp-diagonal", per, tuple(names),
                           op.num_hvps, None, info, memory_budget)
    seed = new_seed() if seed is None else seed
    estimator = hutchinson_trace if method == "hutchinson" else hutchpp_trace
    with hvp_progress(op, progress, probes, f"Hessian trace ({method})"):
        est = estimator(op, probes, seed, memory_budget)
    return TraceResult(est.value, est.stderr, method, "hvp", {}, tuple(names), op.num_hvps, seed,
                       info, memory_budget)


def hessian_top_eigenvalue(
    model,
    data,
    loss="cross_entropy",
    params=None,
    k: int = 1,
    method: str = "lanczos",
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> EigenResult:
    """The ``k`` largest eigenvalues of the Hessian (and their eigenvectors).

    Methods:
        * ``"lanczos"`` (default): Lanczos with full reorthogonalization; the k largest
          *algebraic* eigenvalues. A breakdown (zero or low-rank Hessian) restarts in the
          orthogonal complement, so exactly k values come back; for ``k >= 2`` a second run in
          the complement of the first checks for missed copies of repeated eigenvalues (about
          twice the HVPs of ``k = 1``).
        * ``"power"``: power iteration with deflation (at most ``max_iter`` HVPs per pair);
          finds the eigenvalues of largest *magnitude*, which are the top ones at a minimum
          where H is nearly positive semi-definite.

    Both stop when every pair's residual :math:`\\|Hv_i - \\lambda_i v_i\\| \\le
    \\mathrm{tol}\\cdot\\max(|\\lambda_i|, s)`, with s the spectral scale (the largest
    :math:`\\|Hv\\|` seen, a lower bound of :math:`\\|H\\|_2`): every tolerance is relative,
    so a loss scaled by 1e-20 or 1e+20 gives the same relative accuracy, and a zero Hessian gives
    eigenvalues 0. The eigenvalue error is at most the residual. ``result.residuals`` are the
    true residuals (k extra HVPs at the end) and ``result.converged`` is True only when they
    meet that bound — False when ``max_iter`` ran out first.

    ``memory_budget`` (bytes, default :data:`famviz.DEFAULT_MEMORY_BUDGET`) bounds the part of
    the Lanczos basis kept on the device; the rest goes to a temporary file and is read back
    in chunks (:class:`famviz._memory.VectorStore`), with the same eigenvalues. ``progress``
    shows a bar counting the Hessian-vector products (``tqdm.auto``).

    Example (least squares: :math:`H = \\mathrm{diag}(1, 4)`):

    >>> import torch
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> r = hessian_top_eigenvalue(model, (X, torch.zeros(2, 1, dtype=torch.float64)),
    ...                            loss="mse", k=2, seed=0)
    >>> [round(v, 8) for v in r.eigenvalues]
    [4.0, 1.0]
    """
    check_option("method", method, EIGEN_METHODS)
    seed = check_seed(seed)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    memory_budget = check_memory_budget(memory_budget)
    progress = check_progress(progress)
    if method == "lanczos" and max_iter < k:
        raise ValueError(f"max_iter={max_iter} is below k={k}: Lanczos needs at least k "
                         "iterations for k eigenvalues; raise max_iter")
    names = resolve_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    op = HessianOperator(obj, names)
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the number of selected parameters ({op.dim})")
    seed = new_seed() if seed is None else seed
    with hvp_progress(op, progress, None, f"Hessian eigenvalues ({method})"):
        if method == "lanczos":
            eig = lanczos_top(op, int(k), float(tol), int(max_iter), seed, memory_budget)
        else:
            eig = power_iteration_top(op, int(k), float(tol), int(max_iter), seed)
    vectors = [{n: t.detach() for n, t in op.layout.unflatten(v).items()} for v in eig.vectors]
    return EigenResult(
        tuple(float(v) for v in eig.values), vectors, tuple(float(r) for r in eig.residuals),
        method, float(tol), eig.converged, eig.iterations, tuple(names), op.num_hvps, seed,
        obj.info(), memory_budget,
    )


def hessian_frobenius(
    model,
    data,
    loss="cross_entropy",
    params=None,
    method: str = "auto",
    *,
    probes: int = DEFAULT_PROBES,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> FrobeniusResult:
    """Frobenius norm of the Hessian, :math:`\\|H\\|_F = \\sqrt{\\mathrm{Tr}(H^2)}`.

    ``"exact"`` sums :math:`\\|He_i\\|^2` over all coordinates (one HVP each, batched);
    ``"hutchinson"`` estimates :math:`\\mathrm{Tr}(H^2) = \\mathbb E\\|Hv\\|^2` with Rademacher
    probes, the standard error carried to the norm by the delta method; ``"auto"`` is exact up
    to :data:`AUTO_EXACT_MAX_PARAMS` parameters. ``memory_budget`` (bytes, default
    :data:`famviz.DEFAULT_MEMORY_BUDGET`) bounds the chunks of unit vectors or probes held at
    once (the result does not depend on it); ``progress`` shows a bar counting the HVPs.

    >>> import torch
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> r = hessian_frobenius(model, (X, torch.zeros(2, 1, dtype=torch.float64)), loss="mse")
    >>> round(float(r) ** 2, 10)  # 1^2 + 4^2
    17.0
    """
    check_option("method", method, FROBENIUS_METHODS)
    seed = check_seed(seed)
    probes = check_count("probes", probes, minimum=2)
    memory_budget = check_memory_budget(memory_budget)
    progress = check_progress(progress)
    names = resolve_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    op = HessianOperator(obj, names)
    if method == "auto":
        method = "exact" if op.dim <= AUTO_EXACT_MAX_PARAMS else "hutchinson"
    if method == "exact":
        with hvp_progress(op, progress, op.dim, "Hessian Frobenius norm (exact)"):
            total = sum(float(rows.pow(2).sum()) for _, rows in op.columns(memory_budget))
        return FrobeniusResult(math.sqrt(total), 0.0, "exact", tuple(names), op.num_hvps, None,
                               obj.info(), memory_budget)
    seed = new_seed() if seed is None else seed
    gen = generator(seed, op.device)
    with hvp_progress(op, progress, probes, "Hessian Frobenius norm (hutchinson)"):
        samples = torch.cat([op.matmat(V).pow(2).sum(dim=1)
                             for V in probe_chunks(op, probes, gen, memory_budget)])
    sq = float(samples.mean())
    value = math.sqrt(max(sq, 0.0))
    stderr_sq = float(samples.std() / math.sqrt(probes))
    stderr = stderr_sq / (2 * value) if value > 0 else float("nan")
    return FrobeniusResult(value, stderr, "hutchinson", tuple(names), op.num_hvps, seed,
                           obj.info(), memory_budget)
