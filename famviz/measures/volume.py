r"""A volume estimate of the flat region around the weights, for small models.

Zhang et al. (2021) relate flatness to the *volume* of the basin — the prior probability of the
function — and estimate it through a Gaussian-process approximation. famviz offers the simpler
local estimator of docs/math.md §4 (basin volume), for small models: along random directions
:math:`u_k` (uniform on the unit sphere of the parameter space), the radius

.. math::

    r(u) = \sup\{r :\ L(\theta + s\,u) - L(\theta) \le \tau \text{ for } s \le r\}

within which the loss stays below the threshold, and from the radii

* the **mean radius** :math:`\bar r = \frac1K\sum_k r(u_k)` (the headline value; larger =
  flatter) with its Monte-Carlo standard error, and
* the **fraction of directions** whose radius exceeds a given :math:`R`
  (:meth:`VolumeResult.fraction`): the fraction of the sphere of radius :math:`R` inside the
  basin.

The volume itself, :math:`V_P\,\mathbb E[r(u)^P]` in :math:`P` dimensions, is dominated by rare
long directions and cannot be estimated from a handful of rays, so famviz does not report it.

Each radius is found by doubling from :data:`RADIUS_START` until the threshold is crossed,
then ``steps`` geometric bisection steps; a crossing between two grid points closer than the
first crossing can be missed (the radius is that of the first crossing seen on the doubling
grid). Directions are used in antithetic pairs :math:`\pm u_k` (2 rays per sample); the
standard error is taken over the pair means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._progress import counts_evaluations
from ..curvature import generator, new_seed
from ..objective import Objective, ObjectiveInfo
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
    unit_directions,
)

__all__ = ["VolumeResult", "basin_volume", "RADIUS_START", "MAX_DOUBLINGS"]

#: first radius tried on every ray (a constant: it must not depend on the weights)
RADIUS_START = 0.01
#: a ray whose loss stays below the threshold up to RADIUS_START * 2**MAX_DOUBLINGS is capped
MAX_DOUBLINGS = 40


@dataclass(frozen=True)
class VolumeResult:
    """Radii of the flat region along random directions; ``float(result)`` is the mean radius.

    Attributes:
        value: mean radius :math:`\\bar r` (larger = flatter); ``stderr``: its standard error.
        radii: the radius of every ray (pairs :math:`+u_k, -u_k` adjacent).
        threshold: :math:`\\tau`, the allowed loss increase.
        capped: rays on which the threshold was never crossed (their radius is the cap).
        loss_at_centre: :math:`L(\\theta)`.
        parameters, params, cost, seed, invariance, objective: as for every measure.
    """

    value: float
    stderr: float
    radii: tuple[float, ...] = field(repr=False)
    threshold: float
    capped: int
    loss_at_centre: float
    parameters: dict = field(repr=False)
    params: tuple[str, ...] = field(repr=False)
    cost: Cost
    seed: int
    invariance: dict[str, str] = field(repr=False)
    objective: ObjectiveInfo = field(repr=False)

    def fraction(self, radius: float) -> tuple[float, float]:
        """Fraction of directions whose radius is at least ``radius``, and its standard error
        (over antithetic pairs)."""
        hits = [float(r >= radius) for r in self.radii]
        pairs = [(a + b) / 2 for a, b in zip(hits[::2], hits[1::2])]
        return pair_statistics(pairs)

    def __float__(self) -> float:
        return self.value


def _radius(ev: Evaluator, u: torch.Tensor, threshold: float, steps: int) -> tuple[float, bool]:
    def below(r: float) -> bool:
        value = ev.loss(r * u)
        return math.isfinite(value) and value - ev.loss0 <= threshold

    lo, hi, r = 0.0, math.inf, RADIUS_START
    for _ in range(MAX_DOUBLINGS + 1):
        if below(r):
            lo = r
            r *= 2
        else:
            hi = r
            break
    if math.isinf(hi):
        return lo, True
    if lo == 0.0:  # crossed already at RADIUS_START: shrink until below
        for _ in range(MAX_DOUBLINGS * 2):
            r /= 2
            if below(r):
                lo = r
                break
            hi = r
        else:
            return 0.0, False
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if below(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


@counts_evaluations("basin_volume")
def basin_volume(
    model,
    data,
    loss="cross_entropy",
    *,
    threshold: float = 0.1,
    samples: int = 10,
    steps: int = 10,
    params=None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    progress: bool = False,
) -> VolumeResult:
    r"""Mean radius of the region around :math:`\theta` where the loss rises by at most
    ``threshold``, along random directions (a volume estimate for small models).

    Isotropic directions ignore the scale of the weights, so the radius changes under T1, T2
    and T3; the softmax shift T5 only translates the loss surface (invariant with the same
    seed).

    Args:
        model, data, loss: as everywhere in famviz; the model is never modified.
        threshold: :math:`\tau`, the allowed increase of the mean loss.
        samples: random directions, each used with both signs (2 rays per sample).
        steps: geometric bisection steps per ray after bracketing (relative precision of each
            radius :math:`2^{2^{-\text{steps}}} - 1`, 7e-4 for 10 steps).
        params: directions in the space of these parameters only (default all).
        seed: seed of the directions (drawn and recorded if None).
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.
        progress: show a tqdm bar counting the loss evaluations.

    Example (:math:`L(w) = \|w\|^2/2` at :math:`w = 0`: every radius is
    :math:`\sqrt{2\tau}`):

    >>> import torch
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.zero_()
    >>> data = (torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))
    >>> r = basin_volume(model, data, loss="mse", threshold=0.02 / 3, samples=4, steps=30,
    ...                  seed=0)  # mse averages over 3 outputs: L = |w|^2 / 3
    >>> round(float(r), 6), r.fraction(0.1)[0], r.fraction(0.2)[0]
    (0.141421, 1.0, 0.0)
    """
    threshold = check_positive("threshold", threshold)
    samples = check_count("samples", samples)
    steps = check_count("steps", steps, minimum=0)
    seed = check_seed(seed)
    names = select_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    ev = Evaluator(obj, names)
    used_seed = new_seed() if seed is None else seed
    gen = generator(used_seed, ev.device)
    radii, capped = [], 0
    for _ in range(samples):
        u = unit_directions(gen, ev.dim, ev.device, ev.dtype)
        for sign in (1.0, -1.0):
            r, cap = _radius(ev, sign * u, threshold, steps)
            radii.append(r)
            capped += cap
    pairs = [(a + b) / 2 for a, b in zip(radii[::2], radii[1::2])]
    value, stderr = pair_statistics(pairs)
    invariance = declare(CHANGES, CHANGES, CHANGES, INVARIANT, loss_name=obj.loss_name,
                         params=params)
    return VolumeResult(
        value=value, stderr=stderr, radii=tuple(radii), threshold=threshold, capped=capped,
        loss_at_centre=ev.loss0,
        parameters={"threshold": threshold, "samples": samples, "steps": steps},
        params=tuple(names), cost=ev.cost(), seed=used_seed, invariance=invariance,
        objective=obj.info(),
    )
