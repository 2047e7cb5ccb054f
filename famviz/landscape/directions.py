"""Directions in parameter space for loss-surface slices, as name-keyed dicts.

A :class:`Direction` is a ``dict[str, Tensor]`` keyed like ``model.named_parameters()`` (so it
can be added to parameters by name), with attributes recording how it was made (``kind``,
``norm``, ``ignore``, ``seed``) that every slice copies into its metadata.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..curvature import generator, new_seed
from ..objective import check_option, check_seed
from ..replica import check_model

__all__ = [
    "Direction",
    "NORMS",
    "IGNORES",
    "random_direction",
    "hessian_directions",
    "interpolation_direction",
    "trajectory_directions",
    "TrajectoryDirections",
    "orthogonalize",
    "normalize_direction",
    "check_direction",
]

#: "filter": Li et al. (2018), each output row/filter scaled to the norm of the matching weight
#: row; "layer": each tensor scaled to its parameter's norm; "none": left as drawn
NORMS = ("filter", "layer", "none")
#: "biasbn": zero the direction on 1-D parameters (biases, normalization layers), Li et al.'s
#: default; None: keep them
IGNORES = ("biasbn", None)

#: numerical floor for norms (a zero row of the direction stays zero)
_EPS = 1e-12


class Direction(dict):
    """A name-keyed direction with provenance attributes (``kind``, ``norm``, ``ignore``,
    ``seed``, ``info``). Behaves as a plain ``dict[str, Tensor]``."""

    def __init__(self, tensors: Mapping[str, Tensor], *, kind: str, norm: str = "none",
                 ignore: str | None = None, seed: int | None = None, info: dict | None = None):
        super().__init__(tensors)
        self.kind, self.norm, self.ignore, self.seed = kind, norm, ignore, seed
        self.info = dict(info or {})

    def describe(self) -> dict:
        """JSON-serializable provenance, stored with every slice."""
        return {"kind": self.kind, "norm": self.norm, "ignore": self.ignore, "seed": self.seed,
                **self.info}

    def norm_total(self) -> float:
        return float(torch.sqrt(sum(t.double().pow(2).sum() for t in self.values())))


def _params(model: nn.Module) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in check_model(model).named_parameters()
              if p.is_floating_point()}
    if not params:
        raise ValueError("model has no parameters (of a floating dtype): there is no direction "
                         "to draw")
    return params


def check_direction(model: nn.Module, direction: Mapping[str, Tensor], what: str = "direction"):
    """Raise a clear ValueError unless ``direction`` has exactly the model's (floating)
    parameter names with matching shapes and finite values."""
    params = _params(model)
    if not isinstance(direction, Mapping):
        raise TypeError(f"{what} must be a name-keyed dict of tensors, got "
                        f"{type(direction).__name__}")
    missing = [n for n in params if n not in direction]
    extra = [n for n in direction if n not in params]
    if missing or extra:
        raise ValueError(f"{what} does not match the model's parameters: missing {missing}, "
                         f"unknown {extra}")
    for n, p in params.items():
        t = direction[n]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{what}[{n!r}] must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{what}[{n!r}] has shape {tuple(t.shape)}, the parameter "
                             f"{tuple(p.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}[{n!r}] contains NaN or inf")


def normalize_direction(direction: Mapping[str, Tensor], model: nn.Module, norm: str = "filter",
                        ignore: str | None = "biasbn") -> dict[str, Tensor]:
    """Rescale ``direction`` to the scale of ``model``'s weights.

    * ``"filter"`` (Li et al. 2018): every output row of a weight (a neuron's incoming weights;
      a filter of a conv layer) gets the norm of the matching row of the parameter:
      :math:`d_{i} \\leftarrow d_{i}\\,\\|\\theta_{i}\\| / \\|d_{i}\\|`. A 1-D parameter that is
      not ignored is treated as one filter per entry (:math:`|d_i| = |\\theta_i|`).
    * ``"layer"``: each tensor scaled to its parameter's norm.
    * ``"none"``: unchanged.

    With ``ignore="biasbn"`` the direction is zero on every 1-D parameter.
    """
    check_option("norm", norm, NORMS)
    if ignore not in IGNORES:
        raise ValueError(f"unknown ignore {ignore!r}; valid: 'biasbn', None")
    params = _params(model)
    out = {}
    for name, d in direction.items():
        p = params[name].to(d.dtype)
        if ignore == "biasbn" and p.ndim <= 1:
            out[name] = torch.zeros_like(d)
        elif norm == "none":
            out[name] = d.clone()
        elif norm == "layer":
            out[name] = d * (p.norm() / d.norm().clamp_min(_EPS))
        else:  # filter: rows along the first axis
            rows_d = d.reshape(d.shape[0], -1) if d.ndim > 1 else d.reshape(-1, 1)
            rows_p = p.reshape(p.shape[0], -1) if p.ndim > 1 else p.reshape(-1, 1)
            scale = rows_p.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(_EPS)
            out[name] = (rows_d * scale).reshape(d.shape)
    return out


def random_direction(model: nn.Module, norm: str = "filter", ignore: str | None = "biasbn",
                     seed: int | None = None) -> Direction:
    """A Gaussian random direction N(0, I) over all parameters, normalized by ``norm``.

    Args:
        model: the network (never modified).
        norm: ``"filter"`` (default; Li et al. 2018), ``"layer"`` or ``"none"``.
        ignore: ``"biasbn"`` (default) zeroes biases and normalization parameters; ``None``.
        seed: drawn from the OS and recorded if None.

    >>> import famviz as fv
    >>> m = fv.models.mlp([4, 3, 2], seed=0)
    >>> d = random_direction(m, seed=0)
    >>> sorted(d), d.kind, d.norm, d.seed
    (['0.bias', '0.weight', '2.bias', '2.weight'], 'random', 'filter', 0)
    >>> bool(torch.allclose(d["0.weight"].norm(dim=1), m[0].weight.norm(dim=1)))
    True
    """
    check_option("norm", norm, NORMS)
    seed = check_seed(seed)
    params = _params(model)
    seed = new_seed() if seed is None else seed
    device = next(iter(params.values())).device
    gen = generator(seed, device)
    raw = {n: torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
           for n, p in params.items()}
    return Direction(normalize_direction(raw, model, norm, ignore), kind="random", norm=norm,
                     ignore=ignore, seed=seed)


def hessian_directions(model: nn.Module, data, loss="cross_entropy", k: int = 2, *,
                       norm: str = "none", seed: int | None = None, **kwargs) -> list[Direction]:
    """The top-``k`` Hessian eigenvectors (Lanczos, :func:`famviz.hessian_top_eigenvalue`) as
    directions; jointly unit norm over all parameters unless ``norm`` rescales them. Their
    eigenvalues are in ``direction.info["eigenvalue"]``. Extra keyword arguments go to
    :func:`famviz.hessian_top_eigenvalue` (``tol``, ``dtype``, ``bn``, ...)."""
    from ..measures.hessian import hessian_top_eigenvalue

    r = hessian_top_eigenvalue(model, data, loss, k=k, seed=seed, **kwargs)
    params = _params(model)
    out = []
    for lam, vec in zip(r.eigenvalues, r.eigenvectors):
        full = {n: vec[n].to(p.dtype) if n in vec else torch.zeros_like(p)
                for n, p in params.items()}
        if norm != "none":
            full = normalize_direction(full, model, norm, ignore=None)
        out.append(Direction(full, kind="hessian", norm=norm, seed=r.seed,
                             info={"eigenvalue": lam}))
    return out


def interpolation_direction(model_a: nn.Module, model_b: nn.Module) -> Direction:
    """:math:`\\theta_b - \\theta_a`: a slice from ``model_a`` with ``span=(0, 1)`` walks the
    straight line to ``model_b`` (coordinate 1 is ``model_b``)."""
    pa, pb = _params(model_a), _params(model_b)
    if pa.keys() != pb.keys() or any(pa[n].shape != pb[n].shape for n in pa):
        raise ValueError("the two models must have the same parameter names and shapes")
    return Direction({n: (pb[n] - pa[n]).clone() for n in pa}, kind="interpolation")


@dataclass(frozen=True)
class TrajectoryDirections:
    """PCA of a training trajectory (Li et al. 2018, §7).

    Attributes:
        directions: the top principal directions (unit norm, mutually orthogonal).
        explained_variance_ratio: the share of the trajectory's variance each explains.
        coords: (T, k) coordinates of every state relative to the last one along the
            directions — draw them over a contour plot.
    """

    directions: list[Direction]
    explained_variance_ratio: tuple[float, ...]
    coords: np.ndarray


def trajectory_directions(states: Sequence, k: int = 2, model: nn.Module | None = None, *,
                          memory_budget: int | None = None) -> TrajectoryDirections:
    """Principal directions of the path ``states`` (state dicts or models, in training order),
    centred on the LAST state — slice around the final model with these directions.

    Only floating parameters enter (buffers such as BatchNorm statistics are left out); pass
    ``model`` when ``states`` are state dicts, so parameters can be told from buffers.

    Raises:
        ValueError: fewer than ``k + 1`` states, a state without one of the parameters or with
            another shape, NaN/inf in a state, or a path whose (T, P) matrix of states needs
            more than ``memory_budget`` bytes (default
            :data:`famviz.landscape.DEFAULT_MEMORY_BUDGET`) for the PCA.
        TypeError: ``states`` not a sequence, ``k`` not an int, ``model`` not a module.
    """
    from .._memory import DEFAULT_MEMORY_BUDGET, check_memory_budget

    if isinstance(states, (str, bytes, Mapping)) or not isinstance(states, Sequence):
        raise TypeError(f"states must be a list of state dicts or models in training order, "
                        f"got {type(states).__name__}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1 directions, got {k}")
    if len(states) < k + 1:
        raise ValueError(f"need at least {k + 1} states for {k} directions, got {len(states)}")
    if model is not None:
        check_model(model)
    elif not isinstance(states[0], nn.Module):
        raise ValueError("pass model= when states are state dicts (to know the parameter names)")
    template = _params(model if model is not None else states[0])
    names = list(template)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    check_memory_budget(budget)
    size = sum(t.numel() for t in template.values())
    if k > size:
        raise ValueError(f"k={k} directions, but the model has only {size} parameters")
    need = 3 * len(states) * size * 8  # the float64 states, the SVD's factor and workspace
    if need > budget:
        raise ValueError(f"the PCA of {len(states)} states of {size} parameters needs about "
                         f"{need / 2**20:.0f} MiB, more than memory_budget={budget / 2**20:.0f} "
                         "MiB: pass fewer states (e.g. every n-th) or raise memory_budget")

    def vec(i, s):
        if not isinstance(s, (nn.Module, Mapping)):
            raise TypeError(f"state {i} is a {type(s).__name__}; states are state dicts or "
                            "models")
        sd = s.state_dict() if isinstance(s, nn.Module) else s
        for n in names:
            if n not in sd:
                raise ValueError(f"state {i} has no parameter {n!r}")
            t = sd[n]
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(template[n].shape):
                raise ValueError(f"state {i}[{n!r}] is not a tensor of shape "
                                 f"{tuple(template[n].shape)}")
        v = torch.cat([sd[n].detach().double().reshape(-1) for n in names])
        if not torch.isfinite(v).all():
            raise ValueError(f"state {i} contains NaN or inf")
        return v

    final = vec(len(states) - 1, states[-1])
    M = torch.stack([vec(i, s) - final for i, s in enumerate(states[:-1])])  # (T-1, P)
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    var = S.pow(2)
    if var.sum() == 0:
        raise ValueError("all states are equal: the path has no direction")
    ratio = tuple(float(v) for v in (var[:k] / var.sum()))
    dirs = []
    for i in range(k):
        parts = torch.split(Vh[i], [template[n].numel() for n in names])
        dirs.append(Direction(
            {n: t.reshape(template[n].shape).to(template[n].dtype) for n, t in zip(names, parts)},
            kind="pca", info={"component": i, "explained_variance_ratio": ratio[i]}))
    coords = torch.cat([M, M.new_zeros(1, M.shape[1])]) @ Vh[:k].T
    return TrajectoryDirections(dirs, ratio, coords.cpu().numpy())


def orthogonalize(d1: Mapping[str, Tensor], d2: Mapping[str, Tensor]) -> Direction:
    """``d2`` made orthogonal to ``d1`` (over all parameters jointly), keeping ``d2``'s norm.
    Note: this undoes an exact filter normalization of ``d2``."""
    dot = sum(float((d1[n].double() * d2[n].double()).sum()) for n in d1)
    n1 = sum(float(d1[n].double().pow(2).sum()) for n in d1)
    n2 = sum(float(d2[n].double().pow(2).sum()) for n in d2)
    if n1 == 0:
        raise ValueError("d1 is zero")
    out = {n: d2[n] - (dot / n1) * d1[n] for n in d2}
    new_norm = sum(float(t.double().pow(2).sum()) for t in out.values())
    if new_norm <= _EPS * max(n2, 1.0):
        raise ValueError("d2 is parallel to d1: nothing is left after orthogonalizing")
    scale = (n2 / new_norm) ** 0.5
    base = d2 if isinstance(d2, Direction) else None
    return Direction({n: t * scale for n, t in out.items()},
                     kind=base.kind if base else "custom", norm=base.norm if base else "none",
                     ignore=base.ignore if base else None, seed=base.seed if base else None,
                     info={**(base.info if base else {}), "orthogonalized": True})
