"""Flatness and sharpness measures, one module per family.

Every measure takes ``(model, data, loss="cross_entropy", ..., seed=None)`` and returns a frozen
dataclass with ``float(result)`` the headline value; :func:`measure_all` runs them all and
returns a :class:`MeasureTable`.
"""

from ._base import CHANGES, INVARIANT, NOT_APPLICABLE, TRANSFORMS, UNDECLARED, Cost
from .fisher_rao import FisherRaoResult, fisher_rao_norm
from .hessian import (
    EigenResult,
    FrobeniusResult,
    TraceResult,
    hessian_frobenius,
    hessian_top_eigenvalue,
    hessian_trace,
)
from .pac_bayes import PacBayesResult, pac_bayes_flatness
from .perturbation import (
    SharpnessResult,
    adaptive_sharpness,
    average_flatness,
    eps_sharpness,
    worst_case_flatness,
)
from .prior import PriorVolumeResult, empirical_kernel, nngp_kernel, prior_volume
from .relative import RelativeFlatnessResult, relative_flatness
from .table import MEASURES, MeasureRow, MeasureSpec, MeasureTable, measure_all
from .volume import VolumeResult, basin_volume

__all__ = [
    "EigenResult",
    "FrobeniusResult",
    "RelativeFlatnessResult",
    "TraceResult",
    "hessian_frobenius",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "relative_flatness",
    # perturbation-based sharpness
    "SharpnessResult",
    "eps_sharpness",
    "adaptive_sharpness",
    "average_flatness",
    "worst_case_flatness",
    # PAC-Bayes, Fisher-Rao, volume
    "PacBayesResult",
    "pac_bayes_flatness",
    "FisherRaoResult",
    "fisher_rao_norm",
    "VolumeResult",
    "basin_volume",
    # the prior volume of a function (Zhang et al. 2021)
    "PriorVolumeResult",
    "prior_volume",
    "nngp_kernel",
    "empirical_kernel",
    # all at once
    "measure_all",
    "MeasureTable",
    "MeasureRow",
    "MeasureSpec",
    "MEASURES",
    "Cost",
    # invariance declarations
    "TRANSFORMS",
    "INVARIANT",
    "CHANGES",
    "NOT_APPLICABLE",
    "UNDECLARED",
]
