"""famviz: relative flatness, FAM and sharpness measures for PyTorch models, with notebook
figures and widgets.

The core (this package without :mod:`famviz.plots` and :mod:`famviz.widgets`) needs only torch
and numpy.
"""

from . import data, fam, landscape, models, oracles, reparam
from ._memory import DEFAULT_MEMORY_BUDGET
from .batches import Batches
from .curvature import HessianOperator
from .measures import (
    EigenResult,
    FisherRaoResult,
    FrobeniusResult,
    MeasureTable,
    PacBayesResult,
    PriorVolumeResult,
    RelativeFlatnessResult,
    SharpnessResult,
    TraceResult,
    VolumeResult,
    adaptive_sharpness,
    average_flatness,
    basin_volume,
    eps_sharpness,
    fisher_rao_norm,
    hessian_frobenius,
    hessian_top_eigenvalue,
    hessian_trace,
    measure_all,
    pac_bayes_flatness,
    prior_volume,
    relative_flatness,
    worst_case_flatness,
)
from .objective import Objective

__version__ = "0.1.0"

# imported on first use, so `import famviz` stays light: the layers above the core, and the
# studies (which add pandas)
_LAZY = ("plots", "widgets", "study")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'famviz' has no attribute {name!r}")

__all__ = [
    # data and models
    "data",
    "models",
    # objective and curvature machinery
    "Batches",
    "Objective",
    "HessianOperator",
    "DEFAULT_MEMORY_BUDGET",
    "oracles",
    # relative flatness
    "relative_flatness",
    "RelativeFlatnessResult",
    # Hessian measures
    "hessian_trace",
    "hessian_top_eigenvalue",
    "hessian_frobenius",
    "TraceResult",
    "EigenResult",
    "FrobeniusResult",
    # perturbation-based sharpness, PAC-Bayes, Fisher-Rao, volume
    "eps_sharpness",
    "adaptive_sharpness",
    "average_flatness",
    "worst_case_flatness",
    "pac_bayes_flatness",
    "fisher_rao_norm",
    "basin_volume",
    "SharpnessResult",
    "PacBayesResult",
    "FisherRaoResult",
    "VolumeResult",
    # the prior volume of a function (Zhang et al. 2021)
    "prior_volume",
    "PriorVolumeResult",
    # every measure at once
    "measure_all",
    "MeasureTable",
    # reparameterizations
    "reparam",
    # loss landscapes
    "landscape",
    # FAM, SAM and ASAM training
    "fam",
    # flatness-versus-generalization studies over model zoos
    "study",
]
