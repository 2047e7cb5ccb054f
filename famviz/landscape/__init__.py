"""Loss-surface slices: directions, 1-D/2-D grids, interpolation, and safe files."""

from .directions import (
    Direction,
    TrajectoryDirections,
    hessian_directions,
    interpolation_direction,
    normalize_direction,
    orthogonalize,
    random_direction,
    trajectory_directions,
)
from .io import load, save
from .slices import (
    DEFAULT_MEMORY_BUDGET,
    MAX_GRID_POINTS,
    MAX_STEPS,
    Slice1D,
    Slice2D,
    grid_axis,
    interpolate,
    slice_1d,
    slice_2d,
    slice_2d_progressive,
)

__all__ = [
    "Direction",
    "TrajectoryDirections",
    "random_direction",
    "hessian_directions",
    "interpolation_direction",
    "trajectory_directions",
    "orthogonalize",
    "normalize_direction",
    "Slice1D",
    "Slice2D",
    "slice_1d",
    "slice_2d",
    "slice_2d_progressive",
    "interpolate",
    "grid_axis",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_STEPS",
    "MAX_GRID_POINTS",
    "save",
    "load",
]
