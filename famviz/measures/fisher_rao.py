r"""The Fisher–Rao norm (Liang, Poggio, Rakhlin, Stokes — AISTATS 2019).

.. math::

    \|\theta\|_{fr}^2 = \frac1N \sum_n \langle \theta, \nabla_\theta\, \ell(f_\theta(x_n), y_n)
                        \rangle^2 .

For a bias-free network that is positively homogeneous of degree 1 in each of its
:math:`L + 1` weight layers (Linear/ReLU stacks), Euler's theorem gives
:math:`\langle\theta, \nabla_\theta f\rangle = (L+1) f`, hence the logit formula

.. math::

    \|\theta\|_{fr}^2 = (L+1)^2\, \frac1N \sum_n
        \Big\langle \frac{\partial\ell}{\partial z_n}, z_n \Big\rangle^2,
    \qquad z_n = f_\theta(x_n),

which is how it is usually computed (Jiang et al. 2020 apply it to every network).

* ``method="jvp"`` (default) evaluates the definition for any network: the directional
  derivative of the outputs along :math:`\theta` (a Jacobian-vector product, computed by two
  reverse-mode passes so that in-place buffer updates are allowed), contracted with
  :math:`\partial\ell_n/\partial z_n`. It is
  invariant to every rescaling of single parameters (:math:`\theta \to D\theta` gives
  :math:`\nabla \to D^{-1}\nabla`), hence to T1, T2, T3, and — with softmax cross-entropy,
  whose logit gradient sums to zero — to the softmax shift T5.
* ``method="logits"`` is the logit formula: it depends on the network's outputs only, so it is
  invariant to every function-preserving change, but it equals the definition only for
  bias-free homogeneous networks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..objective import Objective, ObjectiveInfo, check_option, check_seed
from ._base import INVARIANT, Cost, check_count, declare, select_params

__all__ = ["FisherRaoResult", "fisher_rao_norm", "METHODS", "WEIGHT_LAYERS"]

METHODS = ("jvp", "logits")
#: layers counted in the depth L + 1 of the logit formula
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class FisherRaoResult:
    """The Fisher–Rao norm; ``float(result)`` is :math:`\\|\\theta\\|_{fr}` (not squared).

    Attributes:
        value: the norm; ``squared``: :math:`\\|\\theta\\|_{fr}^2`.
        stderr: 0.0 (exact).
        method: ``"jvp"`` or ``"logits"``; ``depth``: :math:`L+1` used by ``"logits"``.
        parameters, params, cost, seed (always None), invariance, objective: as for every
            measure.
    """

    value: float
    squared: float
    stderr: float
    method: str
    depth: int | None
    parameters: dict = field(repr=False)
    params: tuple[str, ...] = field(repr=False)
    cost: Cost
    seed: None
    invariance: dict[str, str] = field(repr=False)
    objective: ObjectiveInfo = field(repr=False)

    def __float__(self) -> float:
        return self.value


def _directional_derivative(obj: Objective, theta: dict, X):
    r"""Outputs and their derivative along theta, :math:`\dot z = J\theta`, by two reverse-mode
    passes (the "double vjp": :math:`\nabla_u \langle J^\top u, \theta\rangle = J\theta`).
    Unlike forward mode (:func:`torch.func.jvp`) this works with modules that update buffers in
    place (BatchNorm with ``bn="train"``)."""
    params = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
    with torch.enable_grad():
        out = obj.forward(params, X)
        u = torch.zeros_like(out, requires_grad=True)
        pulled = torch.autograd.grad(out, list(params.values()), grad_outputs=u,
                                     create_graph=True, allow_unused=True)
        inner = sum((g * t).sum() for g, t in zip(pulled, theta.values()) if g is not None)
        if not isinstance(inner, torch.Tensor) or not inner.requires_grad:
            return out.detach(), torch.zeros_like(out)  # the outputs do not depend on theta
        (dout,) = torch.autograd.grad(inner, u)
    return out.detach(), dout


def _check_centre(value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(
            f"the loss at the centre (the unperturbed model) is {value}: check the weights, "
            "the data and the loss function (a custom loss must return a finite scalar)"
        )


def fisher_rao_norm(
    model,
    data,
    loss="cross_entropy",
    *,
    method: str = "jvp",
    depth: int | None = None,
    params=None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
) -> FisherRaoResult:
    r"""The Fisher–Rao norm :math:`\|\theta\|_{fr}` with the empirical labels.

    Args:
        model, data, loss: as everywhere in famviz; the model is never modified. A callable
            loss must be a mean of per-sample terms (then :math:`N_b\,\partial
            \mathrm{loss}/\partial z_n = \partial\ell_n/\partial z_n`).
        method: ``"jvp"`` (the definition, any network) or ``"logits"`` (the formula for
            bias-free homogeneous networks).
        depth: :math:`L+1` for ``"logits"``; default: the number of Linear/Conv layers.
        params: ``"jvp"`` only: the parameters :math:`\theta` of the inner product (default
            all).
        seed: unused (the norm is exact); accepted for the common signature.
        dtype, device, bn: evaluation dtype, device and BatchNorm policy.

    Example (one Linear layer, no bias, MSE: :math:`\langle\theta,\nabla\ell_n\rangle =
    \langle 2(z_n - y_n), z_n\rangle` with :math:`z_n = w x_n`; here :math:`x = 1, y = 0,
    w = 3`: :math:`(2 \cdot 3 \cdot 3)^2 = 324`, norm 18):

    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(3.0)
    >>> data = (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    >>> r = fisher_rao_norm(model, data, loss="mse")
    >>> r.squared, float(r), fisher_rao_norm(model, data, loss="mse", method="logits").squared
    (324.0, 18.0, 324.0)
    """
    start = time.perf_counter()
    check_option("method", method, METHODS)
    check_seed(seed)  # unused, but a bad seed is still refused
    if method == "logits":
        if params is not None:
            raise ValueError("params applies to method='jvp' only: the logit formula covers "
                             "all weights of the network")
        if depth is None:
            depth = sum(isinstance(m, WEIGHT_LAYERS) for m in model.modules())
            if depth == 0:
                raise ValueError("the model has no Linear/Conv layers: pass depth=L+1")
        depth = check_count("depth", depth)
    names = select_params(model, params)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    theta = {n: obj.params[n] for n in names}
    total, centre = 0.0, 0.0
    for X, y in obj.batches:
        if method == "jvp":
            out, dout = _directional_derivative(obj, theta, X)
        else:
            with torch.no_grad():
                out = obj.forward({}, X)
            dout = None
        out = out.detach().requires_grad_(True)
        with torch.enable_grad():
            value = obj.loss_fn(out, y)
            (g,) = torch.autograd.grad(value * len(X), out)
        centre += float(value.detach()) * len(X) / obj.num_samples
        direction = dout.detach() if dout is not None else out.detach()
        s = (g * direction).reshape(len(X), -1).sum(dim=1)
        total += float(s.pow(2).sum())
    _check_centre(centre)
    squared = total / obj.num_samples * (depth**2 if method == "logits" else 1)
    invariance = declare(INVARIANT, INVARIANT, INVARIANT, INVARIANT, loss_name=obj.loss_name,
                         params=params)
    return FisherRaoResult(
        value=math.sqrt(squared), squared=squared, stderr=0.0, method=method,
        depth=depth if method == "logits" else None,
        parameters={"method": method, "depth": depth}, params=tuple(names),
        cost=Cost(1, 2 if method == "jvp" else 0, 0, time.perf_counter() - start), seed=None,
        invariance=invariance,
        objective=obj.info(),
    )
