r"""The volume of a function: its prior probability under the initialization distribution
(Zhang, Reid, Valle Pérez, Louis 2021, "Why flatness does and does not correlate with
generalization for deep neural networks"; the method of Valle Pérez, Camargo, Louis 2019).

For binary classification on inputs :math:`S = \{x_1..x_n\}` the network's function is its
sign pattern :math:`f \in \{\pm1\}^n`. At initialization the output on :math:`S` is (in the
wide limit, or empirically) a centred Gaussian with kernel :math:`K`, and the volume of the
set of initial parameters that produce :math:`f` is approximated by

.. math::

    P(f) = \int \mathcal N(g; 0, K) \prod_i \Phi\!\left(\frac{f_i g_i}{s}\right) dg
         = P\big(f_i h_i > 0\ \forall i\big),\quad h \sim \mathcal N(0, K + s^2 I),

with the probit likelihood of unit noise (:math:`s^2 = 1`, GPy's EP as the authors used it) by
default; ``noise=0`` gives the step likelihood, :math:`P(\mathrm{sign}(g) = f)` exactly, which
does not depend on the kernel's scale. See ``docs/math.md``, "The volume of a function".

Kernels:

* **NNGP** for ``nn.Sequential`` stacks of ``Linear``, ``ReLU`` and ``Identity`` with weight
  variance :math:`\sigma_w^2/\text{fan\_in}` and bias variance :math:`\sigma_b^2`:
  :math:`K^0 = \sigma_b^2 + \sigma_w^2\, x\cdot x'/d`, and after a ReLU the arc-cosine
  recursion :math:`K^l = \sigma_b^2 + \frac{\sigma_w^2}{2\pi}\sqrt{K_{xx}K_{x'x'}}\,(\sin\theta
  + (\pi-\theta)\cos\theta)` (Cho & Saul 2009; Lee et al. 2018). The variances are read from
  PyTorch's default ``nn.Linear`` initialization (uniform, variance :math:`1/(3\,\text{fan\_in})`
  for weights and biases) or given.
* **Empirical** for any model whose modules re-initialize (``reset_parameters``): the second
  moment of its output over ``samples`` seeded re-initializations; the sampling error of
  :math:`\log P(f)` is estimated by a delete-a-group jackknife.

The volume depends on the function only (the labels) and on the architecture's prior, never on
the trained weights: every function-preserving reparameterization (T1, T2, T3, and T5 for two
logits) leaves it unchanged.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..curvature import generator, new_seed
from .._progress import check_progress, progress_bar
from ..objective import Objective, check_option
from ..replica import preserve_global_rng, replicate
from ._base import (
    INVARIANT,
    NOT_APPLICABLE,
    Cost,
    check_count,
    check_positive,
    check_real,
    check_seed,
)
from ._orthant import (
    EXACT_MAX_N,
    EPReport,
    log_orthant_ep,
    log_orthant_exact,
    log_orthant_mc,
)

__all__ = [
    "PriorVolumeResult",
    "prior_volume",
    "nngp_kernel",
    "empirical_kernel",
    "KERNELS",
    "METHODS",
    "EPReport",
]

KERNELS = ("auto", "nngp", "empirical")
METHODS = ("ep", "exact", "mc")
#: modules the NNGP recursion knows (Linear layers, ReLU, and the identity)
_NNGP_MODULES = (nn.Linear, nn.ReLU, nn.Identity)
#: delete-a-group jackknife groups for the sampling error of the empirical kernel
JACKKNIFE_GROUPS = 5


@dataclass(frozen=True)
class PriorVolumeResult:
    """The prior volume of a binary function; ``float(result)`` is :math:`\\log P(f)`.

    Attributes:
        log_volume: :math:`\\log P(f)` (natural log; larger = a larger volume, a simpler
            function under the prior).
        stderr: standard error of ``log_volume`` from sampling (Monte-Carlo for
            ``method="mc"``, the jackknife over kernel samples for ``kernel="empirical"``,
            both combined in quadrature); the spread of its replicates for ``method="exact"``; NaN
            for EP on the NNGP kernel (deterministic; its approximation error is measured in
            the tests and ``benchmarks/README.md``).
        kernel: ``"nngp"`` or ``"empirical"``; ``method``: ``"ep"``, ``"exact"`` or ``"mc"``.
        n: number of inputs; ``noise``: the probit noise variance :math:`s^2`.
        labels: :math:`f` as a ±1 tensor (n,).
        kernel_matrix: :math:`K` of the output used (for two logits, of their difference).
        kernel_stderr: for the empirical kernel, the relative standard error
            :math:`\\|\\mathrm{se}(\\hat K)\\|_F / \\|\\hat K\\|_F`; else 0.
        samples: re-initializations of the empirical kernel (0 for NNGP).
        ep: the EP convergence report (``method="ep"``), else None.
        sigmas: per Linear layer ``(name, σ_w², σ_b²)`` used by the NNGP kernel.
        parameters, cost, seed, invariance: as for every measure.
    """

    log_volume: float
    stderr: float
    kernel: str
    method: str
    n: int
    noise: float
    labels: Tensor = field(repr=False)
    kernel_matrix: Tensor = field(repr=False)
    kernel_stderr: float
    samples: int
    ep: EPReport | None
    sigmas: tuple = field(repr=False)
    parameters: dict = field(repr=False)
    cost: Cost
    seed: int | None
    invariance: dict[str, str] = field(repr=False)

    @property
    def bits(self) -> float:
        """:math:`-\\log_2 P(f)`: the function's description length under the prior."""
        return -self.log_volume / math.log(2)

    def __float__(self) -> float:
        return self.log_volume


# ----------------------------------------------------------------------------------- kernels


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a Sequential chain in order, or a ValueError naming what is not one."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"kernel='nngp' needs an nn.Sequential of {[t.__name__ for t in _NNGP_MODULES]}, "
            f"got {type(model).__name__}; use kernel='empirical' for other architectures")
    chain = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            continue
        if not isinstance(module, _NNGP_MODULES):
            raise ValueError(
                f"kernel='nngp' knows only {[t.__name__ for t in _NNGP_MODULES]}; module "
                f"{name!r} is {type(module).__name__}: use kernel='empirical'")
        chain.append((name, module))
    if not any(isinstance(m, nn.Linear) for _, m in chain):
        raise ValueError("kernel='nngp' needs at least one nn.Linear layer")
    return chain


def _per_layer(name: str, value, count: int) -> list[float]:
    if isinstance(value, (numbers.Real, Tensor)) and not isinstance(value, bool):
        v = check_real(name, value)
        values = [v] * count
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries; the model has {count} Linear "
                             "layers (give one value per layer, or a single number)")
        values = [check_real(name, v) for v in value]
    else:
        raise TypeError(f"{name} must be a number or one number per Linear layer, got "
                        f"{type(value).__name__}")
    if any(v < 0 for v in values):
        raise ValueError(f"{name} is a standard deviation and must be >= 0, got {value!r}")
    return values


def _layer_sigmas(chain, sigma_w, sigma_b) -> list[tuple[str, float, float]]:
    """(name, σ_w², σ_b²) of every Linear layer: given, or PyTorch's default init."""
    linear = [(n, m) for n, m in chain if isinstance(m, nn.Linear)]
    if (sigma_w is None) != (sigma_b is None):
        raise ValueError("give both sigma_w and sigma_b, or neither (then PyTorch's default "
                         "nn.Linear initialization is assumed)")
    if sigma_w is not None:
        sw = _per_layer("sigma_w", sigma_w, len(linear))
        sb = _per_layer("sigma_b", sigma_b, len(linear))
        return [(n, w * w, (b * b if m.bias is not None else 0.0))
                for (n, m), w, b in zip(linear, sw, sb)]
    out = []
    for name, m in linear:
        if type(m).reset_parameters is not nn.Linear.reset_parameters:
            raise ValueError(
                f"layer {name!r} ({type(m).__name__}) has its own reset_parameters: famviz "
                "cannot read its initialization variance; pass sigma_w= and sigma_b=, or use "
                "kernel='empirical'")
        # kaiming_uniform_(a=sqrt(5)) and the bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        out.append((name, 1 / 3, (1 / (3 * m.in_features)) if m.bias is not None else 0.0))
    return out


def _relu_expectation(K: Tensor) -> Tensor:
    """E[relu(u) relu(u')] for (u, u') ~ N(0, K): the arc-cosine kernel of degree 1."""
    d = torch.sqrt(torch.clamp(torch.diagonal(K), min=0.0))
    norm = d[:, None] * d[None, :]
    cos = torch.where(norm > 0, K / torch.where(norm > 0, norm, 1.0), 1.0).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    return norm / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cos)


def nngp_kernel(model: nn.Module, X: Tensor, *, sigma_w=None, sigma_b=None):
    r"""The NNGP kernel of each output unit of a ``Linear``/``ReLU``/``Identity`` stack.

    .. math::

        K^{l}(x, x') = \sigma_{b,l}^2 + \sigma_{w,l}^2\, G^{l-1}(x, x'),\qquad
        G = \tfrac1d\, x\cdot x' \text{ (input)},\quad
        G = \mathbb E[\mathrm{relu}(u)\,\mathrm{relu}(u')] \text{ after a ReLU}

    (the arc-cosine kernel, Cho & Saul 2009; Lee et al. 2018), weights
    :math:`\sim (0, \sigma_w^2/\text{fan\_in})`, biases :math:`\sim (0, \sigma_b^2)`.

    Args:
        model: an ``nn.Sequential`` (nested allowed) of ``Linear``, ``ReLU``, ``Identity``.
        X: inputs (n, d).
        sigma_w, sigma_b: standard deviations, one number or one per Linear layer (the weight
            variance is :math:`\sigma_w^2/\text{fan\_in}`); default PyTorch's ``nn.Linear``
            init, :math:`\sigma_w^2 = 1/3`, :math:`\sigma_b^2 = 1/(3\,\text{fan\_in})`.

    Returns:
        ``(K, sigmas)``: K (n, n) float64, and ``(name, σ_w², σ_b²)`` per Linear layer.

    Example (one Linear layer: :math:`K = \sigma_b^2 + \sigma_w^2 XX^\top/d`):

    >>> import torch
    >>> K, _ = nngp_kernel(torch.nn.Sequential(torch.nn.Linear(2, 1)), torch.eye(2),
    ...                    sigma_w=2.0, sigma_b=1.0)
    >>> K.tolist()
    [[3.0, 1.0], [1.0, 3.0]]
    """
    chain = _linear_layers(model)
    sigmas = _layer_sigmas(chain, sigma_w, sigma_b)
    X = torch.as_tensor(X).detach().to(dtype=torch.float64, device="cpu")
    if X.ndim != 2:
        raise ValueError(f"kernel='nngp' needs inputs of shape (n, features), got "
                         f"{tuple(X.shape)}")
    G = X @ X.T / X.shape[1]
    state = "input"  # input: G is x.x'/d of deterministic inputs
    by_name = {n: (w2, b2) for n, w2, b2 in sigmas}
    for name, m in chain:
        if isinstance(m, nn.Linear):
            w2, b2 = by_name[name]
            # G is a second moment per unit; the layer sums fan_in of them with var σ_w²/fan_in
            G = b2 + w2 * G
            state = "gaussian"
        elif isinstance(m, nn.ReLU):
            if state == "gaussian":
                G = _relu_expectation(G)
                state = "post"
            elif state == "input":
                R = torch.relu(X)
                G = R @ R.T / X.shape[1]
            # relu after relu: the identity on non-negative values
    if state != "gaussian":
        raise ValueError("kernel='nngp' needs the model to end in a Linear layer")
    return G, tuple(sigmas)


def _binary_output(out: Tensor, what: str) -> Tensor:
    """The binary score g of a model output: the logit (N,) / (N, 1), or z1 - z0 (N, 2)."""
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        return out.reshape(-1)
    if out.ndim == 2 and out.shape[1] == 2:
        return out[:, 1] - out[:, 0]
    raise ValueError(
        f"prior_volume is defined for binary classification: {what} must have one logit or "
        f"two classes per sample, got outputs of shape {tuple(out.shape)}. Train a binary "
        "model (e.g. one class against the rest)")


def _replica(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A famviz replica that owns copies of the parameters (re-initialization writes them), in
    eval mode, frozen, in ``dtype``."""

    def own(t):
        return t.detach().to(dtype=dtype if dtype is not None and t.is_floating_point()
                             else None, copy=True)

    replica = replicate(model, {n: own(p) for n, p in model.named_parameters()},
                        {n: own(b) for n, b in model.named_buffers()})
    for p in replica.parameters():
        p.requires_grad_(False)
    return replica.eval()


def _resettable(model: nn.Module) -> list[nn.Module]:
    """Modules with reset_parameters; every parameter must belong to one."""
    modules = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    covered = {id(p) for m in modules for p in m.parameters(recurse=False)}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if not modules or missing:
        raise ValueError(
            "kernel='empirical' re-initializes the model with reset_parameters(), but "
            + (f"parameters {missing} belong to modules without one"
               if missing else "no module of this model has one")
            + "; give those modules a reset_parameters() method")
    return modules


def empirical_kernel(model: nn.Module, X: Tensor, *, samples: int = 2000, seed: int = 0,
                     dtype: torch.dtype = torch.float64, progress: bool = False):
    r"""The empirical kernel of a model's binary score at initialization.

    :math:`\hat K = \frac1M \sum_{m=1}^M g_m g_m^\top`, with :math:`g_m` the score
    (the logit, or :math:`z_1 - z_0`) on X of a copy re-initialized by every module's
    ``reset_parameters()`` under seed ``m`` (the caller's model and the global RNG are left
    alone). The prior mean is taken as zero, as for the NNGP kernel (true for every init that is
    symmetric about zero).

    ``progress=True`` shows a tqdm bar of the re-initializations.

    Returns:
        ``(K, G)``: K (n, n) float64 and the M × n scores G (float64).
    """
    samples = check_count("samples", samples)
    check_progress(progress)
    replica = _replica(model, dtype)
    modules = _resettable(replica)
    X = torch.as_tensor(X).detach().to(dtype=dtype, device=next(replica.parameters()).device)
    gen = generator(seed, "cpu")
    seeds = torch.randint(0, 2**62, (samples,), generator=gen).tolist()
    scores = []
    # reset_parameters draws from the global generator: seed it per sample, then restore it
    with preserve_global_rng(), torch.no_grad(), progress_bar(
            progress, samples, "empirical kernel", unit="init") as bar:
        for s in seeds:
            torch.manual_seed(s)
            for m in modules:
                m.reset_parameters()
            scores.append(_binary_output(replica(X), "the model's output").to(torch.float64))
            if bar is not None:
                bar.update()
    G = torch.stack(scores).cpu()
    return G.T @ G / samples, G


# --------------------------------------------------------------------------------- the measure


def _predictions(model: nn.Module, X: Tensor, dtype) -> tuple[Tensor, int]:
    """±1 predictions of the model on X (eval mode, on a replica) and its number of outputs."""
    replica = _replica(model, dtype)
    first = next(replica.parameters(), None)
    if first is None:
        raise ValueError("the model has no parameters")
    with torch.no_grad():
        out = replica(X.to(dtype=first.dtype, device=first.device))
    score = _binary_output(out, "the model's output")
    width = 1 if out.ndim == 1 else out.shape[1]
    return torch.where(score > 0, 1.0, -1.0).to(torch.float64).cpu(), width


def _check_labels(labels, n: int) -> Tensor:
    y = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if y.numel() != n:
        raise ValueError(f"labels has {y.numel()} entries for {n} inputs; give one label per "
                         "row of X")
    values = set(torch.unique(y.to(torch.float64)).tolist())
    if values <= {0.0, 1.0}:
        return torch.where(y.to(torch.float64) > 0, 1.0, -1.0).to(torch.float64)
    if values <= {-1.0, 1.0}:
        return y.to(torch.float64)
    raise ValueError(
        f"labels must be binary, {{0, 1}} or {{-1, +1}} (class 1 is +1), got values "
        f"{sorted(values)[:6]}; prior_volume is defined for binary classification only")


def prior_volume(
    model: nn.Module,
    X: Tensor,
    labels=None,
    *,
    kernel: str = "auto",
    method: str = "ep",
    noise: float = 1.0,
    sigma_w=None,
    sigma_b=None,
    samples: int = 2000,
    mc_samples: int = 2000,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    damping: float = 0.5,
    tol: float = 1e-9,
    max_iter: int = 500,
    progress: bool = False,
) -> PriorVolumeResult:
    r"""The prior probability :math:`\log P(f)` of the model's binary function on the inputs X
    (Zhang et al. 2021): the volume of the initial parameters that produce it.

    .. math::

        \log P(f) = \log \int \mathcal N(g; 0, K) \prod_i \Phi(f_i g_i / s)\, dg

    with the network's NNGP or empirical kernel K and the probit noise variance
    :math:`s^2` = ``noise`` (module docstring).

    Args:
        model: a binary classifier (one logit, or two classes: the score is
            :math:`z_1 - z_0` and its kernel that of the difference); never modified. More
            classes are refused.
        X: the inputs S (n, ...), typically train ∪ test.
        labels: the function f: ``None`` for the model's own predictions on X (sign of the
            score, 0 counted as −1), or n labels in {0, 1} or {−1, +1}.
        kernel: ``"nngp"`` (Linear/ReLU/Identity stacks), ``"empirical"`` (any model whose
            modules have ``reset_parameters``) or ``"auto"`` (NNGP where it applies).
        method: ``"ep"`` (expectation propagation, any n), ``"exact"`` (n ≤ 10; the oracle)
            or ``"mc"`` (GHK Monte-Carlo with minimax tilting, ``mc_samples`` samples and a
            standard error).
        noise: the probit noise variance :math:`s^2` (1: the paper's GPy likelihood; 0: the
            step likelihood, :math:`P(\mathrm{sign}(g) = f)`, independent of K's scale).
        sigma_w, sigma_b: the NNGP prior's standard deviations (one number or one per Linear
            layer); default: read from PyTorch's default ``nn.Linear`` initialization.
        samples: re-initializations for the empirical kernel.
        mc_samples: samples of ``method="mc"``.
        seed: seed of the empirical kernel and of the Monte-Carlo routines (drawn and
            recorded if None and needed).
        dtype: dtype of the model's forward passes (default the model's); the kernel and the
            integral are always float64.
        damping, tol, max_iter: EP's damping factor in (0, 1], its tolerance on the change of
            :math:`\log P` and its sweep cap.
        progress: show a tqdm bar of the empirical kernel's re-initializations.

    Returns:
        A :class:`PriorVolumeResult`; ``float(result)`` is :math:`\log P(f)`.

    Example (independent outputs: :math:`P(f) = 2^{-n}` for any f):

    >>> import torch, math
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    >>> r = prior_volume(model, torch.eye(3), labels=[1, 0, 1], sigma_w=1.0, sigma_b=0.0)
    >>> round(r.log_volume / math.log(2), 10), r.ep.converged
    (-3.0, True)
    """
    start = time.perf_counter()
    check_option("kernel", kernel, KERNELS)
    check_option("method", method, METHODS)
    noise = check_real("noise", noise)
    if noise < 0:
        raise ValueError(f"noise is a variance and must be >= 0, got {noise!r}")
    damping = check_real("damping", damping)
    if not 0 < damping <= 1:
        raise ValueError(f"damping must lie in (0, 1], got {damping!r}")
    tol = check_positive("tol", tol)
    max_iter = check_count("max_iter", max_iter)
    samples = check_count("samples", samples, minimum=2)
    check_progress(progress)
    mc_samples = check_count("mc_samples", mc_samples, minimum=2)
    seed = check_seed(seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a tensor of inputs (n, ...), got {type(X).__name__}; for "
                        "data (X, y) pass X and labels=y")
    n = X.shape[0] if X.ndim else 0
    if n == 0:
        raise ValueError("X is empty: give at least one input")
    if not torch.isfinite(X).all():
        raise ValueError("X contains NaN or inf")
    if method == "exact" and n > EXACT_MAX_N:
        raise ValueError(f"method='exact' integrates n <= {EXACT_MAX_N} dimensions; X has "
                         f"{n} inputs: use method='ep' (any n) or 'mc'")
    if kernel == "auto":
        try:
            _linear_layers(model)
            kernel = "nngp"
        except ValueError:
            kernel = "empirical"
    if kernel == "empirical":
        _resettable(model)  # fail before any work
        fewest = samples - math.ceil(samples / JACKKNIFE_GROUPS)  # the jackknife's kernels
        if noise == 0 and fewest < n:
            raise ValueError(
                f"with noise=0 the empirical kernel (and its jackknife replicates) from "
                f"samples={samples} re-initializations has rank <= {fewest} < n={n}, and most "
                f"sign patterns get probability 0: use samples >= "
                f"{math.ceil(n * JACKKNIFE_GROUPS / (JACKKNIFE_GROUPS - 1))} or noise > 0")
    else:
        _layer_sigmas(_linear_layers(model), sigma_w, sigma_b)  # fail before any work

    forward = 0
    predicted, width = _predictions(model, X, dtype)
    forward += 1
    f = predicted if labels is None else _check_labels(labels, n)
    needs_seed = kernel == "empirical" or method in ("mc", "exact")
    used_seed = (new_seed() if seed is None else seed) if needs_seed else seed

    sigmas: tuple = ()
    kernel_stderr, jack_stderr = 0.0, 0.0
    if kernel == "nngp":
        K, sigmas = nngp_kernel(model, X.reshape(n, -1), sigma_w=sigma_w, sigma_b=sigma_b)
        if width == 2:  # the difference of two independent outputs
            K = 2 * K
        G = None
    else:
        K, G = empirical_kernel(model, X, samples=samples, seed=used_seed,
                                dtype=dtype or torch.float64, progress=progress)
        forward += samples
        kernel_stderr = _kernel_stderr(G, K)

    # the step likelihood sees identical inputs once: their outputs are equal at every
    # initialization (EP would count the constraint twice; conflicting labels have P = 0)
    distinct, conflict = _distinct_inputs(X.reshape(n, -1), f) if noise == 0 else (None, False)
    if noise == 0 and not conflict and bool((torch.diagonal(K)[distinct] <= 0).any()):
        raise ValueError(
            "some inputs have zero prior variance (the network's output there is 0 at every "
            "initialization), so their sign is undefined with noise=0: use noise > 0")
    f_used = f if distinct is None else f[distinct]

    def integrate(Km):
        if distinct is not None:
            Km = Km[distinct][:, distinct]
        if method == "ep":
            value, report = log_orthant_ep(Km, f_used, noise, damping=damping, tol=tol,
                                           max_iter=max_iter)
            return value, report, 0.0
        if method == "exact":
            value, err = log_orthant_exact(Km, f_used, noise, seed=used_seed)
            return value, None, err
        value, se_mc = log_orthant_mc(Km, f_used, noise, samples=mc_samples, seed=used_seed)
        return value, None, se_mc

    if conflict:
        log_p, report, err = -math.inf, None, 0.0
    else:
        log_p, report, err = integrate(K)
    if G is not None and not conflict:  # delete-a-group jackknife over the re-initializations
        groups = torch.arange(samples) % JACKKNIFE_GROUPS
        leave_out = []
        for g in range(JACKKNIFE_GROUPS):
            rest = G[groups != g]
            leave_out.append(integrate(rest.T @ rest / len(rest))[0])
        t = torch.tensor(leave_out, dtype=torch.float64)
        k = JACKKNIFE_GROUPS
        jack_stderr = float(torch.sqrt((k - 1) / k * ((t - t.mean()) ** 2).sum()))
    stderr = math.sqrt(err**2 + jack_stderr**2)
    if kernel == "nngp" and method == "ep":
        stderr = math.nan

    t5 = INVARIANT if width == 2 else NOT_APPLICABLE
    invariance = {"T1": INVARIANT, "T2": INVARIANT, "T3": INVARIANT, "T5": t5}
    parameters = {"kernel": kernel, "method": method, "noise": noise, "n": n}
    if kernel == "empirical":
        parameters["samples"] = samples
    if method == "mc":
        parameters["mc_samples"] = mc_samples
    return PriorVolumeResult(
        log_volume=log_p, stderr=stderr, kernel=kernel, method=method, n=n, noise=noise,
        labels=f, kernel_matrix=K, kernel_stderr=kernel_stderr,
        samples=samples if kernel == "empirical" else 0, ep=report, sigmas=sigmas,
        parameters=parameters,
        cost=Cost(forward, 0, 0, time.perf_counter() - start),
        seed=used_seed, invariance=invariance,
    )


def _distinct_inputs(X: Tensor, f: Tensor) -> tuple[Tensor, bool]:
    """Indices of the first occurrence of every distinct input, and whether two identical
    inputs carry different labels."""
    _, inverse = torch.unique(X, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(f), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(f)), reduce="amin")
    conflict = bool((f != f[first[inverse]]).any())
    return first.sort().values, conflict


def _kernel_stderr(G: Tensor, K: Tensor) -> float:
    """||se(K)||_F / ||K||_F with se_ij^2 = var_m(g_mi g_mj) / M (no M x n x n tensor)."""
    M = G.shape[0]
    second = (G * G).T @ (G * G) / M  # E[g_i² g_j²]
    var = (second - K * K) * M / (M - 1)
    return float(torch.sqrt(var.clamp(min=0).sum() / M) / K.norm())


def _measure_all_entry(model, data, loss="cross_entropy", *, seed=None, dtype=None,
                       device=None, bn="eval", **options) -> PriorVolumeResult:
    """:func:`prior_volume` as a row of :func:`famviz.measures.measure_all`: the volume of the
    model's own predictions on the inputs of ``data`` (``loss`` plays no part)."""
    obj = Objective(model, data, None, dtype=dtype, device=device, bn=bn)
    X = torch.cat([Xb for Xb, _ in obj.batches])
    return prior_volume(model, X, seed=seed, dtype=dtype, **options)
