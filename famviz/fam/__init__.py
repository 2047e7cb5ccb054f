"""FAM, SAM and ASAM: flatness-aware training with an exact relative-flatness penalty.

**FAM** (relative flatness aware minimization; Adilova, Abourayya, Li, Dada, Petzka, Egger,
Kleesiek, Kamp — "FAM: Relative Flatness Aware Minimization", TAG-ML workshop at ICML 2023)
adds λ times the relative flatness of one feature layer (an ``nn.Linear``, or an ``nn.Conv2d``
seen as a Linear map on patches: docs/conv.md), measured on the current mini-batch, to the loss
(docs/math.md §3):

.. math::

    L_{\\mathrm{FAM}}(\\theta) = E_{\\mathrm{batch}}(\\theta) + \\lambda\\,\\kappa(W),\\qquad
    \\kappa(W) = \\sum_{s,s'} \\langle w_s, w_{s'}\\rangle\\,\\mathrm{Tr}(H_{s,s'})
               = \\langle WW^\\top, T\\rangle_F .

Because the layer's output :math:`z_n = W\\phi_n + b` is linear in W, the block traces are
:math:`T = \\sum_n \\|\\phi_n\\|^2\\, \\partial^2 E / \\partial z_n^2`: only the loss' Hessian in
the layer's *outputs* is needed, never a Hessian over the weights (for a layer applied at several
positions p, :math:`\\langle\\phi_{n,p},\\phi_{n,q}\\rangle` weighs the curvature between
positions: docs/conv.md). :func:`penalty` evaluates κ on a batch as a differentiable tensor of
the model's own parameters — through the Gauss-Newton pull-back of :mod:`famviz.curvature` that
:func:`famviz.relative_flatness` uses — by one of three routes:

* ``"softmax"`` / ``"mse"`` — the layer is the model's output layer and the loss is
  cross-entropy / MSE: :math:`\\kappa = \\frac1N\\sum_n \\|\\phi_n\\|^2 \\mathrm{Var}_{i\\sim
  p_n}(w_i)` (cross-entropy) or :math:`\\kappa = \\frac{2}{Nd}\\|W\\|_F^2\\sum_n\\|\\phi_n\\|^2`
  (MSE). Costs a few small matrix products on top of the forward pass.
* ``"gauss_newton"`` — cross-entropy / MSE and only piecewise-linear modules after the layer in
  an ``nn.Sequential`` (ReLU, pooling, Linear, ...): there :math:`\\partial^2 E/\\partial z_n^2 =
  \\frac1N \\sum_c \\delta_{cn}\\delta_{cn}^\\top` exactly almost everywhere: the C columns of a
  factor of the loss Hessian in the output, pushed back to the layer in one batched backward
  pass (:func:`famviz.curvature.pull_back`, kept in the graph).
* ``"hvp"`` — anything else (smooth activations after the layer, a custom loss, a model that is
  not a plain stack): d batched Hessian-vector products in the layer's outputs (d·P for a layer
  applied at P positions; refused where that would not fit), with ``create_graph=True``.

``gradient="exact"`` keeps every piece in the autograd graph, so ``backward()`` delivers the true
gradient of κ to W, its bias, every layer below W (through φ) and every layer above it (through
the loss curvature) — a third-order quantity obtained by double backpropagation.
``gradient="frozen"`` treats T as a constant for the step: the gradient is
:math:`\\partial\\kappa/\\partial W = 2\\,T W` on W only (÷ m when normalized) — a data-dependent
weight decay, nothing below W. That is what the public FAM code effectively computes, because it
wraps the Hessian in a new leaf tensor, which cuts the graph (docs/math.md §6).

**SAM** (Foret, Kleiner, Mobahi, Neyshabur — "Sharpness-Aware Minimization for Efficiently
Improving Generalization", ICLR 2021) and **ASAM** (Kwon, Kim, Park, Choi — "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021):
:class:`SAM` wraps any optimizer and takes its step with the gradient at the perturbed point
:math:`\\theta + \\epsilon`, :math:`\\epsilon = \\rho\\, T^2\\nabla L / \\|T \\nabla L\\|` with
:math:`T = I` (SAM) or :math:`T = \\mathrm{diag}(|w| + \\eta)` on weights and 1 on biases (ASAM).

:func:`train` runs SGD, FAM, SAM or ASAM on a copy of a model, reproducibly from a seed, and
returns the trained copy with a :class:`History`.
"""

from __future__ import annotations

from ._args import NORMALIZATIONS
from .penalty import GRADIENTS, PENALTY_PATHS, PenaltyTap, last_linear, penalty, penalty_path
from .sam import ASAM_ETA, SAM, frozen_running_stats
from .train import (
    DEFAULT_LAM,
    DEFAULT_RHO,
    METHODS,
    OPTIMIZERS,
    History,
    Step,
    StepInfo,
    StopTraining,
    make_step,
    train,
)

__all__ = [
    "METHODS",
    "GRADIENTS",
    "OPTIMIZERS",
    "NORMALIZATIONS",
    "PENALTY_PATHS",
    "DEFAULT_LAM",
    "DEFAULT_RHO",
    "ASAM_ETA",
    "penalty",
    "penalty_path",
    "PenaltyTap",
    "last_linear",
    "SAM",
    "frozen_running_stats",
    "make_step",
    "Step",
    "StepInfo",
    "train",
    "History",
    "StopTraining",
]
