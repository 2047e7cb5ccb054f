"""Flatness and sharpness measures, one module per family."""

from .hessian import (
    EigenResult,
    FrobeniusResult,
    TraceResult,
    hessian_frobenius,
    hessian_top_eigenvalue,
    hessian_trace,
)
from .relative import RelativeFlatnessResult, relative_flatness

__all__ = [
    "EigenResult",
    "FrobeniusResult",
    "RelativeFlatnessResult",
    "TraceResult",
    "hessian_frobenius",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "relative_flatness",
]
