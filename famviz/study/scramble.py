r"""Random function-preserving reparameterizations of a trained network (the T1, T2, T3 of
:mod:`famviz.reparam`), drawn from a seeded generator and applied in float64.

* :func:`scramble` — T1 with a factor :math:`\alpha \sim U[a, b]` on every consecutive pair of
  Linear layers (Petzka et al. 2021 use U[5, 25]), then T3: neuron-wise factors
  :math:`r_s \sim U[a, b]` on the rows of the feature layer (with the inverse on the next
  layer's columns; skipped when the feature layer is the output layer). Relative flatness κ of
  the feature layer is provably unchanged by both.
* :func:`scramble_inputs` — T2: neuron-wise factors on the feature layer's *inputs* (rows of the
  layer below, columns of the feature layer), which moves κ unless it is computed in the std
  canonical form (``normalize_features=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import reparam

__all__ = ["scramble", "scramble_inputs"]


def _uniform(gen: torch.Generator, n: int, interval: tuple[float, float]) -> torch.Tensor:
    lo, hi = interval
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def scramble(model: nn.Module, layer: str, interval: tuple[float, float], seed: int):
    """T1 on every consecutive Linear pair, then T3 on ``layer``'s rows; a new model.

    Returns:
        ``(model, applied)`` with ``applied`` naming what was done, e.g. ``"T1 x2, T3"``.
    """
    gen = torch.Generator().manual_seed(seed)
    pairs = reparam.consecutive_pairs(model)
    for first, second in pairs:
        model = reparam.scale_layers(model, first, second, float(_uniform(gen, 1, interval)))
    applied = [f"T1 x{len(pairs)}"] if pairs else []
    above = next((b for a, b in pairs if a == layer), None)
    if above is not None:
        rows = dict(model.named_modules())[layer].out_features
        model = reparam.scale_neurons(model, layer, above, _uniform(gen, rows, interval))
        applied.append("T3")
    return model, ", ".join(applied) or "none"


def scramble_inputs(model: nn.Module, layer: str, interval: tuple[float, float], seed: int):
    """T2: the neurons feeding ``layer`` times :math:`c_k \\sim U[a, b]`, ``layer``'s columns
    divided by them; ``None`` when no Linear layer feeds ``layer``."""
    below = next((a for a, b in reparam.consecutive_pairs(model) if b == layer), None)
    if below is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    width = dict(model.named_modules())[below].out_features
    return reparam.scale_neurons(model, below, layer, _uniform(gen, width, interval))
