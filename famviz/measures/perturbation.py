r"""Perturbation-based sharpness: how much the loss rises in a neighbourhood of the weights,
in the worst case (projected gradient ascent) or on average (Monte Carlo).

* :func:`eps_sharpness` — the box :math:`|z_i| \le \epsilon(|\theta_i|+1)`
  (Keskar et al. 2017);
* :func:`adaptive_sharpness` — the ellipsoid :math:`\|z/(|\theta|+\eta)\|_2 \le \rho`
  (Kwon et al. 2021), worst and average case;
* :func:`average_flatness` — per tensor :math:`\|\nu_l\|_2 = \xi\|\theta_l\|_2`, average case
  (Stutz et al. 2021);
* :func:`worst_case_flatness` — per tensor :math:`\|\nu_l\|_2 \le \xi\|\theta_l\|_2`, worst
  case (Stutz et al. 2021).

Common conventions:

* The worst case is found by projected steepest ascent in the neighbourhood's own geometry
  (signed gradients for the box, normalized gradients for the ellipsoid and the per-tensor
  balls), ``steps`` steps from the centre and from ``restarts - 1`` random points; the largest
  loss seen is reported. It is a lower bound on the true maximum (the loss is not concave).
* The average case samples points of the neighbourhood's boundary — uniform directions on the
  sphere of its normalized coordinates (:math:`z/(|\theta|+\eta)`, or each tensor's
  :math:`\nu_l` for Stutz et al.) — and evaluates each at :math:`+z` and :math:`-z`
  (antithetic pairs: the first-order term cancels exactly, so the estimate has far less
  variance; the distribution is symmetric, so it stays unbiased).
  ``samples`` counts directions, costing ``2 * samples`` forward passes; the standard error is
  taken over the pair means.
* Worst-case values have no standard error (``stderr`` is NaN); they are not Monte-Carlo
  estimates.

References:
    N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy, P. T. P. Tang. *On Large-Batch
    Training for Deep Learning: Generalization Gap and Sharp Minima.* ICLR 2017.

    J. Kwon, J. Kim, H. Park, I. K. Choi. *ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks.* ICML 2021.

    D. Stutz, M. Hein, B. Schiele. *Relating Adversarially Robust Generalization to Flat
    Minima.* ICCV 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._progress import counts_evaluations
from ..curvature import generator, new_seed
from ..objective import Objective, ObjectiveInfo, check_option
from ._base import (
    CHANGES,
    INVARIANT,
    Adversary,
    Cost,
    Evaluator,
    check_count,
    check_positive,
    check_radius,
    check_seed,
    declare,
    nonzero,
    pair_statistics,
    select_params,
    unit_directions,
)

__all__ = [
    "SharpnessResult",
    "eps_sharpness",
    "adaptive_sharpness",
    "average_flatness",
    "worst_case_flatness",
    "KINDS",
]

#: worst case (ascent) or average case (Monte Carlo on the boundary)
KINDS = ("worst", "average")
#: default signed-gradient step, as a fraction of the box half-width / of rho: 2.5 / steps, the
#: usual PGD choice (the far side of the set is reachable in 40 % of the steps)
STEP_FACTOR = 2.5


@dataclass(frozen=True)
class SharpnessResult:
    """A perturbation-based sharpness value; ``float(result)`` is :attr:`value`.

    Attributes:
        value: the measure (for :func:`eps_sharpness` the percentage
            :math:`100\\,(L_{\\max} - L)/(1 + L)`; otherwise the loss increase).
        stderr: Monte-Carlo standard error (average case); NaN for the worst case.
        measure: the function's name.
        kind: ``"worst"`` or ``"average"``.
        loss_at_centre: :math:`L(\\theta)` (the robust loss with ``adversarial=True``).
        loss_perturbed: the largest loss found (worst case) or the mean perturbed loss.
        parameters: the settings used (radii, steps, samples, ...).
        params: names of the perturbed parameters.
        cost: forward/backward passes over the data and seconds.
        seed: the seed of the random draws; None when nothing random was drawn.
        invariance: declared behaviour under T1, T2, T3, T5 (see ``famviz.measures.table``).
        objective: loss, number of samples, BatchNorm policy, dtype, device.
    """

    value: float
    stderr: float
    measure: str
    kind: str
    loss_at_centre: float
    loss_perturbed: float
    parameters: dict = field(repr=False)
    params: tuple[str, ...] = field(repr=False)
    cost: Cost
    seed: int | None
    invariance: dict[str, str] = field(repr=False)
    objective: ObjectiveInfo = field(repr=False)

    @property
    def increase(self) -> float:
        """:math:`L_{\\text{perturbed}} - L(\\theta)`."""
        return self.loss_perturbed - self.loss_at_centre

    def __float__(self) -> float:
        return self.value


# ------------------------------------------------------------------------------ engines


def _ascend(ev: Evaluator, starts: list[Tensor], steps: int,
            project: Callable[[Tensor], Tensor],
            step: Callable[[Tensor, Tensor], Tensor]) -> float:
    """Projected ascent from each start; the largest loss seen (the centre's included). A NaN
    loss anywhere makes the result NaN (``max`` would silently skip it)."""
    best = ev.loss0

    def keep(value: float) -> float:
        return value if (math.isnan(value) or value > best) else best

    for z0 in starts:
        z = project(z0)
        for _ in range(steps):
            value, g = ev.loss_and_grad(z)
            best = keep(value)
            z = project(step(z, g))
        best = keep(ev.loss(z))
    return best


def _average(ev: Evaluator, draws: list[Tensor]) -> tuple[float, float, float]:
    """Mean increase over antithetic pairs, its standard error, and the mean perturbed loss."""
    pair_means = [(ev.loss(z) + ev.loss(-z)) / 2 for z in draws]
    mean, stderr = pair_statistics([m - ev.loss0 for m in pair_means])
    return mean, stderr, sum(pair_means) / len(pair_means)


def _starts(ev: Evaluator, restarts: int, gen: torch.Generator | None,
            random_point: Callable[[torch.Generator], Tensor]) -> list[Tensor]:
    starts = [torch.zeros_like(ev.theta)]
    starts += [random_point(gen) for _ in range(restarts - 1)]
    return starts


def _adversary(adversarial: bool, adv_eps, adv_steps, adv_step_size) -> Adversary | None:
    if not adversarial:
        return None
    eps = check_radius("adv_eps", adv_eps)
    steps = check_count("adv_steps", adv_steps)
    size = STEP_FACTOR * eps / steps if adv_step_size is None else check_positive(
        "adv_step_size", adv_step_size)
    return Adversary(eps, steps, size)


def _result(ev: Evaluator, value: float, stderr: float, measure: str, kind: str,
            perturbed: float, parameters: dict, names, seed, invariance) -> SharpnessResult:
    return SharpnessResult(
        value=float(value), stderr=float(stderr), measure=measure, kind=kind,
        loss_at_centre=ev.loss0, loss_perturbed=float(perturbed), parameters=parameters,
        params=tuple(names), cost=ev.cost(), seed=seed, invariance=invariance,
        objective=ev.obj.info(),
    )


# ------------------------------------------------------------------------------- Keskar


@counts_evaluations("eps_sharpness")
def eps_sharpness(
    model,
    data,
    loss="cross_entropy",
    *,
    eps: float = 1e-3,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    params=None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    progress: bool = False,
) -> SharpnessResult:
    r""":math:`\epsilon`-sharpness (Keskar et al. 2017), in percent.

    .. math::

        \phi_\epsilon(\theta) = 100\,
            \frac{\max_{z \in C_\epsilon} L(\theta + z) - L(\theta)}{1 + L(\theta)},
        \qquad C_\epsilon = \{z : |z_i| \le \epsilon\,(|\theta_i| + 1)\},

    maximized over the full parameter space by projected steepest ascent for the box:
    :math:`z \leftarrow \Pi_{C_\epsilon}(z + a\,b \odot \mathrm{sign}\,\nabla L)` with half-widths
    :math:`b_i = \epsilon(|\theta_i|+1)` (the paper uses L-BFGS-B on the same box).
    Changes under every reparameterization of docs/math.md §2 (the box is not equivariant).

    Args:
        model, data, loss: as everywhere in famviz; the model is never modified.
        eps: :math:`\epsilon` (the paper reports 1e-3 and 5e-4).
        steps: ascent steps per start (each one forward and one backward pass).
        step_size: :math:`a`, the step as a fraction of the half-widths (default 2.5 / steps).
        restarts: starts: the centre, then ``restarts - 1`` uniform random points of the box.
        params: perturb only these parameters (names or layers; default all).
        seed: seed of the random starts (drawn and recorded if None and ``restarts > 1``).
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.
        progress: show a tqdm bar counting the loss evaluations.

    Example (:math:`L(w) = (w-1)^2` at :math:`w = 3`: the box is :math:`|z| \le 4\epsilon`, the
    maximum :math:`(2 + 4\epsilon)^2`; with :math:`\epsilon = 0.1`: 100 (5.76 − 4) / 5 = 35.2):

    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(3.0)
    >>> data = (torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    >>> r = eps_sharpness(model, data, loss="mse", eps=0.1)
    >>> round(float(r), 10), round(r.loss_perturbed, 10)
    (35.2, 5.76)
    """
    eps = check_radius("eps", eps)
    steps = check_count("steps", steps)
    restarts = check_count("restarts", restarts)
    a = STEP_FACTOR / steps if step_size is None else check_positive("step_size", step_size)
    seed = check_seed(seed)
    names = select_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    ev = Evaluator(obj, names)
    b = eps * (ev.theta.abs() + 1)
    used_seed = (new_seed() if seed is None else seed) if restarts > 1 else None
    gen = generator(used_seed, ev.device) if used_seed is not None else None

    def project(z):
        return torch.maximum(torch.minimum(z, b), -b)

    def random_point(g):
        return b * (2 * torch.rand(ev.dim, generator=g, device=ev.device, dtype=ev.dtype) - 1)

    best = _ascend(ev, _starts(ev, restarts, gen, random_point), steps, project,
                   lambda z, g: z + a * b * g.sign())
    value = 100.0 * (best - ev.loss0) / (1.0 + ev.loss0)
    invariance = declare(CHANGES, CHANGES, CHANGES, CHANGES, loss_name=obj.loss_name,
                         params=params)
    parameters = {"eps": eps, "steps": steps, "step_size": a, "restarts": restarts}
    return _result(ev, value, math.nan, "eps_sharpness", "worst", best, parameters, names,
                   used_seed, invariance)


# ------------------------------------------------------------------------------ adaptive


@counts_evaluations("adaptive_sharpness")
def adaptive_sharpness(
    model,
    data,
    loss="cross_entropy",
    *,
    rho: float = 0.5,
    eta: float = 0.01,
    kind: str = "worst",
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    samples: int = 20,
    params=None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    progress: bool = False,
) -> SharpnessResult:
    r"""Adaptive sharpness (Kwon et al. 2021, the neighbourhood of ASAM), worst or average case.

    .. math::

        S_{\max} = \max_{\|T_\theta^{-1} z\|_2 \le \rho} L(\theta + z) - L(\theta),
        \qquad
        S_{\mathrm{avg}} = \mathbb E_{\|T_\theta^{-1} z\|_2 = \rho}\, L(\theta + z) - L(\theta),
        \qquad T_\theta = \mathrm{diag}(|\theta| + \eta).

    In the normalized coordinates :math:`u = T_\theta^{-1} z` the set is a Euclidean ball: the
    worst case ascends along normalized gradients :math:`T_\theta \nabla L`, the average case
    draws :math:`u` uniformly on the sphere :math:`\|u\| = \rho` (antithetic pairs).
    With :math:`\eta = 0` the measure is invariant to every positive rescaling of single
    coordinates, hence to T1, T2 and T3; with :math:`\eta > 0` (the paper's default) only
    approximately, and it changes under all of them. T5 changes it either way.

    Args:
        model, data, loss: as everywhere in famviz; the model is never modified.
        rho: :math:`\rho` (the paper's 0.5 for CIFAR-10; 1.0 for CIFAR-100).
        eta: :math:`\eta` (the paper's 0.01).
        kind: ``"worst"`` or ``"average"``.
        steps, step_size, restarts: the worst-case ascent (step in units of the normalized
            coordinates, default :math:`2.5\rho/\text{steps}`).
        samples: directions of the average case (each evaluated at :math:`\pm z`).
        params: perturb only these parameters (default all).
        seed: seed of the random draws (drawn and recorded if None and something is random).
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.
        progress: show a tqdm bar counting the loss evaluations.

    Example (:math:`L(w) = \|w\|^2/2` at :math:`w = (1, 1)`, :math:`\eta = 0`: the set is the
    disc of radius :math:`\rho` around :math:`w`; worst increase
    :math:`\sqrt2\rho + \rho^2/2`, average :math:`\rho^2/2` exactly):

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(1.0)
    >>> X = torch.eye(2, dtype=torch.float64)
    >>> data = (X, torch.zeros(2, 1, dtype=torch.float64))  # mse: (w1^2 + w2^2) / 2
    >>> worst = adaptive_sharpness(model, data, loss="mse", rho=0.1, eta=0.0)
    >>> avg = adaptive_sharpness(model, data, loss="mse", rho=0.1, eta=0.0, kind="average",
    ...                          seed=0)
    >>> round(float(worst), 8), round(2 ** 0.5 * 0.1 + 0.005, 8), round(float(avg), 10)
    (0.14642136, 0.14642136, 0.005)
    """
    check_option("kind", kind, KINDS)
    rho = check_radius("rho", rho)
    eta = check_radius("eta", eta)
    steps = check_count("steps", steps)
    restarts = check_count("restarts", restarts)
    samples = check_count("samples", samples)
    a = STEP_FACTOR * rho / steps if step_size is None else check_positive("step_size",
                                                                            step_size)
    seed = check_seed(seed)
    names = select_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    ev = Evaluator(obj, names)
    t = ev.theta.abs() + eta
    random = kind == "average" or restarts > 1
    used_seed = (new_seed() if seed is None else seed) if random else None
    gen = generator(used_seed, ev.device) if random else None
    if eta > 0:
        invariance = declare(CHANGES, CHANGES, CHANGES, CHANGES, loss_name=obj.loss_name,
                             params=params)
    else:
        invariance = declare(INVARIANT, INVARIANT, INVARIANT, CHANGES, loss_name=obj.loss_name,
                             params=params)

    if kind == "worst":
        def unorm(z):
            return torch.where(t > 0, z / nonzero(t), torch.zeros_like(z)).norm()

        def project(z):
            n = float(unorm(z))
            return z if n <= rho else z * (rho / n)

        def step(z, g):
            gu = t * g
            return z + t * (a * gu / nonzero(gu.norm()))

        def random_point(g):
            u = unit_directions(g, ev.dim, ev.device, ev.dtype)
            r = float(torch.rand((), generator=g, device=ev.device, dtype=ev.dtype))
            return t * (rho * r * u)

        best = _ascend(ev, _starts(ev, restarts, gen, random_point), steps, project, step)
        value, stderr, perturbed = best - ev.loss0, math.nan, best
        parameters = {"rho": rho, "eta": eta, "kind": kind, "steps": steps, "step_size": a,
                      "restarts": restarts}
    else:
        draws = [t * (rho * unit_directions(gen, ev.dim, ev.device, ev.dtype))
                 for _ in range(samples)]
        value, stderr, perturbed = _average(ev, draws)
        parameters = {"rho": rho, "eta": eta, "kind": kind, "samples": samples}
    return _result(ev, value, stderr, "adaptive_sharpness", kind, perturbed, parameters, names,
                   used_seed, invariance)


# --------------------------------------------------------------------------------- Stutz


def _per_tensor_direction(ev: Evaluator, gen: torch.Generator) -> Tensor:
    """Independent uniform unit directions in each tensor's block."""
    e = torch.randn(ev.dim, generator=gen, device=ev.device, dtype=ev.dtype)
    return e / ev.expand(nonzero(ev.tensor_norms(e)))


@counts_evaluations("average_flatness")
def average_flatness(
    model,
    data,
    loss="cross_entropy",
    *,
    xi: float = 0.5,
    samples: int = 20,
    params=None,
    adversarial: bool = False,
    adv_eps: float = 8 / 255,
    adv_steps: int = 10,
    adv_step_size: float | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    progress: bool = False,
) -> SharpnessResult:
    r"""Average-case flatness (Stutz, Hein, Schiele 2021): the mean loss increase under random
    per-tensor relative perturbations.

    .. math::

        \mathbb E_\nu\, L(\theta + \nu) - L(\theta),
        \qquad \|\nu_l\|_2 = \xi\,\|\theta_l\|_2 \text{ for every tensor } l,

    with each :math:`\nu_l` uniform on its sphere, drawn independently (antithetic pairs
    :math:`\pm\nu`). Parameters of normalization layers are not perturbed (by default).
    Per-tensor relative radii make the neighbourhood equivariant under layer-wise rescaling
    (T1: invariant with the same seed) but not under per-neuron rescaling (T2, T3) or the
    softmax shift (T5).

    Args:
        model, data, loss: as everywhere in famviz; the model is never modified.
        xi: :math:`\xi`, the relative radius (the paper's 0.5 for random perturbations).
        samples: directions (each evaluated at :math:`\pm\nu`); the paper uses 10–50.
        params: perturb only these parameters (default: all except normalization layers).
        adversarial: measure the flatness of the robust loss
            :math:`\frac1N\sum_n \max_{\|\delta\|_\infty \le \epsilon} \ell(f(x_n+\delta), y_n)`,
            each maximum by ``adv_steps`` PGD steps of ``adv_step_size`` (default
            :math:`2.5\epsilon/\text{steps}`) from the clean input, inputs not clipped.
        adv_eps, adv_steps, adv_step_size: the PGD adversary (:math:`\epsilon = 8/255` as in
            the paper's CIFAR experiments).
        seed: seed of the draws (drawn and recorded if None).
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.
        progress: show a tqdm bar counting the loss evaluations.

    Example (:math:`L(w) = \|w\|^2/2`: the increase is :math:`\xi^2\|w\|^2/2` for every
    :math:`\pm\nu` pair, exactly):

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    >>> data = (torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    >>> r = average_flatness(model, data, loss="mse", xi=0.1, seed=0)
    >>> round(float(r), 10), r.stderr < 1e-12  # 0.1^2 * 25 / 2
    (0.125, True)
    """
    xi = check_radius("xi", xi)
    samples = check_count("samples", samples)
    adversary = _adversary(adversarial, adv_eps, adv_steps, adv_step_size)
    seed = check_seed(seed)
    names = select_params(model, params, exclude_norm=True)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    ev = Evaluator(obj, names, adversary)
    radius = ev.expand(xi * ev.tensor_norms(ev.theta))
    used_seed = new_seed() if seed is None else seed
    gen = generator(used_seed, ev.device)
    draws = [radius * _per_tensor_direction(ev, gen) for _ in range(samples)]
    value, stderr, perturbed = _average(ev, draws)
    parameters = {"xi": xi, "samples": samples, **_adv_parameters(adversary)}
    invariance = declare(INVARIANT, CHANGES, CHANGES, CHANGES, loss_name=obj.loss_name,
                         params=params)
    return _result(ev, value, stderr, "average_flatness", "average", perturbed, parameters,
                   names, used_seed, invariance)


@counts_evaluations("worst_case_flatness")
def worst_case_flatness(
    model,
    data,
    loss="cross_entropy",
    *,
    xi: float = 0.003,
    steps: int = 20,
    step_size: float = 0.01,
    restarts: int = 10,
    params=None,
    adversarial: bool = False,
    adv_eps: float = 8 / 255,
    adv_steps: int = 10,
    adv_step_size: float | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    progress: bool = False,
) -> SharpnessResult:
    r"""Worst-case flatness (Stutz, Hein, Schiele 2021): the largest loss increase in the
    per-tensor relative neighbourhood, by projected gradient ascent.

    .. math::

        \max_{\nu:\ \|\nu_l\|_2 \le \xi\|\theta_l\|_2\ \forall l} L(\theta + \nu) - L(\theta)

    Each step moves every tensor along its normalized gradient, rescaled to its own size,
    :math:`\nu_l \leftarrow \nu_l + s\,\|\theta_l\|\, g_l/\|g_l\|`, then projects each
    :math:`\nu_l` back onto its ball; the best of ``restarts`` runs (the first from the centre,
    the others from random points of the neighbourhood) is reported. Normalization layers are
    not perturbed (by default). Invariant under T1 (with the same seed), changes under T2, T3
    and T5.

    Args:
        model, data, loss: as everywhere in famviz; the model is never modified.
        xi: :math:`\xi` (the paper's 0.003 for the worst case).
        steps: ascent steps per run (the paper's 20).
        step_size: :math:`s`, relative to each tensor's norm (the paper's learning rate 0.01).
        restarts: runs (the paper's best of 10).
        params: perturb only these parameters (default: all except normalization layers).
        adversarial, adv_eps, adv_steps, adv_step_size: measure on the robust (PGD) loss, as
            in :func:`average_flatness`.
        seed: seed of the random starts (drawn and recorded if None and ``restarts > 1``).
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.
        progress: show a tqdm bar counting the loss evaluations.

    Example (:math:`L(w) = \|w\|^2/2` at :math:`\|w\| = 5`: the worst point moves outwards,
    :math:`(5 + 5\xi)^2/2 - 25/2`; with :math:`\xi = 0.1`: 2.625):

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    >>> data = (torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    >>> r = worst_case_flatness(model, data, loss="mse", xi=0.1, restarts=1)
    >>> round(float(r), 10)
    2.625
    """
    xi = check_radius("xi", xi)
    steps = check_count("steps", steps)
    step_size = check_positive("step_size", step_size)
    restarts = check_count("restarts", restarts)
    adversary = _adversary(adversarial, adv_eps, adv_steps, adv_step_size)
    seed = check_seed(seed)
    names = select_params(model, params, exclude_norm=True)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    ev = Evaluator(obj, names, adversary)
    norms = ev.tensor_norms(ev.theta)
    radii = xi * norms
    used_seed = (new_seed() if seed is None else seed) if restarts > 1 else None
    gen = generator(used_seed, ev.device) if used_seed is not None else None

    def project(z):
        factor = (radii / nonzero(ev.tensor_norms(z))).clamp(max=1.0)
        return z * ev.expand(factor)

    def step(z, g):
        unit = g / ev.expand(nonzero(ev.tensor_norms(g)))  # 0 where a tensor's gradient is 0
        return z + ev.expand(step_size * norms) * unit

    def random_point(g):
        r = torch.rand(len(ev.sizes), generator=g, device=ev.device, dtype=ev.dtype)
        return ev.expand(radii * r) * _per_tensor_direction(ev, g)

    best = _ascend(ev, _starts(ev, restarts, gen, random_point), steps, project, step)
    parameters = {"xi": xi, "steps": steps, "step_size": step_size, "restarts": restarts,
                  **_adv_parameters(adversary)}
    invariance = declare(INVARIANT, CHANGES, CHANGES, CHANGES, loss_name=obj.loss_name,
                         params=params)
    return _result(ev, best - ev.loss0, math.nan, "worst_case_flatness", "worst", best,
                   parameters, names, used_seed, invariance)


def _adv_parameters(adversary: Adversary | None) -> dict:
    if adversary is None:
        return {"adversarial": False}
    return {"adversarial": True, "adv_eps": adversary.eps, "adv_steps": adversary.steps,
            "adv_step_size": adversary.step_size}
