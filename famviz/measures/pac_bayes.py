r"""PAC-Bayes flatness (Jiang, Neyshabur, Mobahi, Krishnan, Bengio 2020): the largest standard
deviation :math:`\sigma` of isotropic Gaussian weight noise that the loss (or the error)
tolerates, found by bisection.

.. math::

    \sigma^\star = \max\{\sigma :\ \mathbb E_{u \sim N(0, \sigma^2 I)}\, c(\theta + u)
                   - c(\theta) \le \tau\},
    \qquad \text{reported as } 1/\sigma^{\star 2},

with :math:`c` the mean loss or the classification error and :math:`\tau` the target. Note
that :math:`\sigma` is the *standard deviation* (a known slip elsewhere passes :math:`\sigma^2`
as the std, docs/math.md §4).

Design:

* **Common random numbers.** The same standard-normal draws :math:`\epsilon_k` are used for
  every :math:`\sigma` (:math:`u_k = \sigma\epsilon_k`), so the Monte-Carlo estimate is a fixed
  function of :math:`\sigma` and the bisection converges on it; each draw is used as an
  antithetic pair :math:`\pm u_k` (the first-order term cancels exactly).
* **Bracketing, then geometric bisection.** From :data:`SIGMA_START`, :math:`\sigma` is doubled
  (or halved) until the target is bracketed, then the bracket is bisected in log scale
  ``steps`` times; the reported :math:`\sigma` is the largest one verified to meet the target.
  The start does not depend on the weights, so equal loss surfaces give equal answers.
* **No finite σ.** When even the largest σ tried (``SIGMA_START`` doubled
  :data:`MAX_BRACKET_STEPS` times, about 1e22) does not raise the criterion by the target —
  the error is already at chance level, or the selected parameters do not reach the output —
  there is no σ to report. The result then says so: ``found`` is False, ``value`` and
  ``sigma`` are NaN (neither 0, which would read as "flattest", nor ∞ is a measurement) and
  ``message`` tells why; a :class:`RuntimeWarning` carries the same message.
* **Standard error** by the delta method, assuming the increase grows like :math:`\sigma^2`
  near :math:`\sigma^\star` (exact for a quadratic loss): an error :math:`\delta` in the
  estimated increase moves :math:`\sigma^\star` by :math:`\sigma^\star\delta/(2\tau)` and
  :math:`1/\sigma^{\star2}` by :math:`\delta/\tau` relative.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .._progress import counts_evaluations
from ..curvature import generator, new_seed
from ..objective import Objective, ObjectiveInfo, check_option
from ._base import (
    CHANGES,
    INVARIANT,
    Cost,
    Evaluator,
    check_count,
    check_positive,
    check_seed,
    declare,
    pair_statistics,
    select_params,
)

__all__ = ["PacBayesResult", "pac_bayes_flatness", "CRITERIA", "SIGMA_START"]

#: what the noise may raise by at most ``target``
CRITERIA = ("error", "loss")
#: first sigma tried when bracketing (a constant: it must not depend on the weights)
SIGMA_START = 0.01
#: at most this many doublings / halvings while bracketing
MAX_BRACKET_STEPS = 80


@dataclass(frozen=True)
class PacBayesResult:
    """PAC-Bayes flatness; ``float(result)`` is :math:`1/\\sigma^2`.

    Attributes:
        value: :math:`1/\\sigma^2` (larger = sharper); NaN when ``found`` is False.
        sigma: the largest standard deviation found to meet the target; NaN when ``found``
            is False.
        found: False when no noise level up to the largest one tried (``bracket[0]``) raised
            the criterion by more than ``target``, so that no finite σ exists to report;
            ``message`` then says why.
        message: empty when ``found``, else the explanation.
        stderr, sigma_stderr: delta-method standard errors of ``value`` and ``sigma``.
        criterion: ``"error"`` or ``"loss"``; ``target``: the allowed increase.
        centre: the criterion at the unperturbed weights.
        increase: the Monte-Carlo increase at ``sigma`` (at most ``target``).
        increase_stderr: its standard error over the antithetic pairs.
        bracket: the final bisection bracket ``(sigma, sigma_fail)``.
        evaluations: noise levels tried (each costs ``2 * samples`` forward passes).
        parameters, params, cost, seed, invariance, objective: as for every measure.
    """

    value: float
    sigma: float
    stderr: float
    sigma_stderr: float
    criterion: str
    target: float
    centre: float
    increase: float
    increase_stderr: float
    bracket: tuple[float, float]
    evaluations: int
    found: bool
    message: str
    parameters: dict = field(repr=False)
    params: tuple[str, ...] = field(repr=False)
    cost: Cost
    seed: int
    invariance: dict[str, str] = field(repr=False)
    objective: ObjectiveInfo = field(repr=False)

    def __float__(self) -> float:
        return self.value


@counts_evaluations("pac_bayes_flatness")
def pac_bayes_flatness(
    model,
    data,
    loss="cross_entropy",
    *,
    target: float = 0.1,
    criterion: str = "error",
    samples: int = 10,
    steps: int = 15,
    params=None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    progress: bool = False,
) -> PacBayesResult:
    r"""PAC-Bayes flatness :math:`1/\sigma^2` (Jiang et al. 2020), :math:`\sigma` the largest
    std of isotropic Gaussian weight noise raising the error (or loss) by at most ``target``.

    Isotropic noise ignores the scale of the weights, so the measure changes under T1, T2 and
    T3; the softmax shift T5 only translates the loss surface, which isotropic noise cannot
    see (invariant with the same seed).

    Args:
        model, data, loss: as everywhere in famviz; the model is never modified.
        target: :math:`\tau`, the allowed increase (Jiang et al.: 0.1 of the training error).
        criterion: ``"error"`` (classification error: argmax of the output against class
            targets; the paper's choice) or ``"loss"`` (the mean loss).
        samples: Monte-Carlo draws per :math:`\sigma`, each used as an antithetic pair (so
            ``2 * samples`` forward passes per :math:`\sigma`; the paper uses 10 draws).
        steps: geometric bisection steps after bracketing (the paper's search depth 15).
        params: perturb only these parameters (default all).
        seed: seed of the draws (drawn and recorded if None).
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.
        progress: show a tqdm bar counting the loss evaluations.

    Example (:math:`L(w) = \|w\|^2/2` in 2-D: the increase is :math:`\sigma^2\|\epsilon\|^2/2`
    averaged over the draws; one draw fixes it, so :math:`\sigma^\star =
    \sqrt{2\tau}/\|\epsilon\|`):

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> data = (torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    >>> r = pac_bayes_flatness(model, data, loss="mse", criterion="loss", target=0.02,
    ...                        samples=1, steps=40, seed=0)
    >>> eps = torch.randn(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> abs(r.sigma - (2 * 0.02) ** 0.5 / float(eps.norm())) < 1e-9
    True
    """
    target = check_positive("target", target)
    check_option("criterion", criterion, CRITERIA)
    samples = check_count("samples", samples)
    steps = check_count("steps", steps, minimum=0)
    seed = check_seed(seed)
    names = select_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    ev = Evaluator(obj, names)
    used_seed = new_seed() if seed is None else seed
    gen = generator(used_seed, ev.device)
    draws = [torch.randn(ev.dim, generator=gen, device=ev.device, dtype=ev.dtype)
             for _ in range(samples)]

    measure = ev.error if criterion == "error" else ev.loss
    centre = ev.error(torch.zeros_like(ev.theta)) if criterion == "error" else ev.loss0

    def increase(sigma: float) -> tuple[float, float]:
        pairs = []
        for e in draws:
            vals = [measure(sigma * e), measure(-sigma * e)]
            # a non-finite value (overflow at huge noise) counts as exceeding any target
            pairs.append(sum(v if math.isfinite(v) else math.inf for v in vals) / 2 - centre)
        if any(math.isinf(p) for p in pairs):
            return math.inf, math.nan
        return pair_statistics(pairs)

    stats: dict[float, tuple[float, float]] = {}  # sigma -> (increase, stderr)

    def ok(sigma: float) -> bool:
        if sigma not in stats:
            stats[sigma] = increase(sigma)
        return stats[sigma][0] <= target

    lo, hi = 0.0, math.inf
    sigma = SIGMA_START
    for _ in range(MAX_BRACKET_STEPS):
        if ok(sigma):
            lo = sigma
            if math.isfinite(hi):
                break
            sigma *= 2
        else:
            hi = sigma
            if lo > 0:
                break
            sigma /= 2
    if lo > 0 and math.isfinite(hi):
        for _ in range(steps):
            mid = math.sqrt(lo * hi)
            if ok(mid):
                lo = mid
            else:
                hi = mid
    if lo == 0.0:
        raise ValueError(
            f"even noise with std {sigma:.3g} raises the {criterion} by more than {target}: "
            "the criterion jumps at the centre (is the model at a discontinuity, e.g. ties in "
            "the argmax?)"
        )

    parameters = {"target": target, "criterion": criterion, "samples": samples, "steps": steps}
    invariance = declare(CHANGES, CHANGES, CHANGES, INVARIANT, loss_name=obj.loss_name,
                         params=params)
    found, message = math.isfinite(hi), ""
    if not found:  # the target was never exceeded: no finite sigma to report
        value, sig, se, sig_se, (inc, inc_se) = math.nan, math.nan, math.nan, math.nan, stats[lo]
        message = (
            f"no finite sigma: noise with std up to {lo:.3g} never raised the {criterion} by "
            f"more than the target {target} (at that std: {inc:+.3g}; centre {centre:.4g}), so "
            "the measure is undefined here; the criterion does not react to the noise (an "
            "error already at chance level, or parameters that do not reach the output?)"
        )
        # stacklevel 3: the caller's line, past the counts_evaluations wrapper
        warnings.warn(f"pac_bayes_flatness: {message}", RuntimeWarning, stacklevel=3)
    else:
        inc, inc_se = stats[lo]
        sig, value = lo, 1.0 / lo**2
        se, sig_se = value * inc_se / target, sig * inc_se / (2 * target)
    return PacBayesResult(
        value=value, sigma=sig, stderr=se, sigma_stderr=sig_se, criterion=criterion,
        target=target, centre=centre, increase=inc, increase_stderr=inc_se,
        bracket=(lo, hi), evaluations=len(stats), found=found, message=message,
        parameters=parameters, params=tuple(names),
        cost=ev.cost(), seed=used_seed, invariance=invariance, objective=obj.info(),
    )
