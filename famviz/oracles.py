"""Brute-force references for small models: the full Hessian from :func:`torch.func.hessian`.

These share nothing with :mod:`famviz.curvature` (no HVP operator, no Gauss-Newton pull-back,
no batching): the data are concatenated, the loss is written out with ``torch.nn.functional``
and the Hessian is formed densely. They cost O(P^2) memory and are meant for tests and for
users who want to check a number on a tiny model (use float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian

from .batches import concat, logits_of
from .objective import Objective, check_dtype, double_backward_safe, resolve_layer, resolve_params
from .replica import replicate

__all__ = ["dense_hessian", "block_traces", "relative_flatness_bruteforce"]

#: refuse dense Hessians beyond this many parameters (memory grows with the square)
MAX_DENSE_PARAMS = 6000


def _loss_fn(loss):
    if callable(loss):
        return loss
    return {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}[loss]


def dense_hessian(model: nn.Module, data, loss="cross_entropy", params=None,
                  dtype=torch.float64) -> tuple[Tensor, list[str]]:
    """The full Hessian of the mean loss w.r.t. the selected parameters, flattened in
    ``named_parameters()`` order; returns ``(H, names)``. A replica of the model is evaluated
    in eval mode; the model itself is never modified.
    """
    names = resolve_params(model, params)
    # validation only (model, data, targets, dtype: the same clear errors as every measure);
    # the Hessian below shares none of the objective's evaluation code
    obj = Objective(model, data, loss, dtype=dtype)
    X = concat([b[0] for b in obj.batches])
    y = torch.cat([b[1] for b in obj.batches])
    args, kwargs = ((X,), None) if isinstance(X, Tensor) else (X.args, X.kwargs)
    dtype = check_dtype(dtype)
    base = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
    buffers = {n: b.detach().to(dtype) if b.is_floating_point() else b.detach().clone()
               for n, b in model.named_buffers()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    if sum(sizes) > MAX_DENSE_PARAMS:
        raise ValueError(f"{sum(sizes)} parameters: too many for a dense Hessian "
                         f"(limit {MAX_DENSE_PARAMS})")
    fn = _loss_fn(loss)

    def f(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        p = dict(base)
        p.update({n: t.reshape(s) for n, t, s in zip(names, parts, shapes)})
        return fn(logits_of(functional_call(net, (p, buffers), args, kwargs), obj.output_fn), y)

    net = replicate(model, base, buffers).eval()
    flat = torch.cat([base[n].reshape(-1) for n in names])
    with double_backward_safe():
        return hessian(f)(flat), names


def block_traces(H_weight: Tensor, d: int, m: int) -> Tensor:
    """:math:`T_{ij} = \\mathrm{Tr}(H_{i,j}) = \\sum_k H[(i,k),(j,k)]` for a weight Hessian
    laid out (out, in, out, in) — the contraction ``einsum('ikjk->ij')``."""
    return torch.einsum("ikjk->ij", H_weight.reshape(d, m, d, m))


def relative_flatness_bruteforce(model: nn.Module, data, layer: str, loss="cross_entropy",
                                 dtype=torch.float64) -> tuple[float, Tensor]:
    """:math:`\\kappa = \\sum_{s,s'} \\langle w_s, w_{s'}\\rangle \\mathrm{Tr}(H_{s,s'})` from
    the dense Hessian of the layer's weight; returns ``(kappa, T)``.

    For an ``nn.Conv2d`` the weight (d, c, kh, kw) is the matrix (d, c·kh·kw) whose rows are
    the flattened filters; the dense Hessian in it holds every coupling between the positions
    that share the filters."""
    module = resolve_layer(model, layer, (nn.Linear, nn.Conv2d))
    d = module.weight.shape[0]
    m = module.weight[0].numel()
    H, _ = dense_hessian(model, data, loss, params=f"{layer}.weight", dtype=dtype)
    T = block_traces(H, d, m)
    W = module.weight.detach().to(dtype).reshape(d, m)
    return float(((W @ W.T) * T).sum()), T
