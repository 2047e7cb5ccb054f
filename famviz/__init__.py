"""famviz: relative flatness, FAM and sharpness measures for PyTorch models, with notebook
figures and widgets.

The core (this package without :mod:`famviz.plots` and :mod:`famviz.widgets`) needs only torch
and numpy.
"""

from . import data, landscape, models, oracles, reparam
from .curvature import HessianOperator
from .measures import (
    EigenResult,
    FrobeniusResult,
    RelativeFlatnessResult,
    TraceResult,
    hessian_frobenius,
    hessian_top_eigenvalue,
    hessian_trace,
    relative_flatness,
)
from .objective import Objective

__version__ = "0.1.0"

_LAZY = ("plots",)  # layers above the core: imported on first use, so `import famviz` stays light


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
    "Objective",
    "HessianOperator",
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
    # reparameterizations
    "reparam",
    # loss landscapes
    "landscape",
]
