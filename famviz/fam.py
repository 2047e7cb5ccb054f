"""FAM, SAM and ASAM: flatness-aware training with an exact relative-flatness penalty.

**FAM** (relative flatness aware minimization; Adilova, Abourayya, Li, Dada, Petzka, Egger,
Kleesiek, Kamp — "FAM: Relative Flatness Aware Minimization", TAG-ML workshop at ICML 2023)
adds λ times the relative flatness of one ``nn.Linear`` feature layer, measured on the current
mini-batch, to the loss (docs/math.md §3):

.. math::

    L_{\\mathrm{FAM}}(\\theta) = E_{\\mathrm{batch}}(\\theta) + \\lambda\\,\\kappa(W),\\qquad
    \\kappa(W) = \\sum_{s,s'} \\langle w_s, w_{s'}\\rangle\\,\\mathrm{Tr}(H_{s,s'})
               = \\langle WW^\\top, T\\rangle_F .

Because the layer's output :math:`z_n = W\\phi_n + b` is linear in W, the block traces are
:math:`T = \\sum_n \\|\\phi_n\\|^2\\, \\partial^2 E / \\partial z_n^2`: only the loss' Hessian in
the layer's *outputs* is needed, never a Hessian over the weights. :func:`penalty` evaluates κ
on a batch as a differentiable tensor of the model's own parameters, by one of three routes:

* ``"softmax"`` / ``"mse"`` — the layer is the model's output layer and the loss is
  cross-entropy / MSE: :math:`\\kappa = \\frac1N\\sum_n \\|\\phi_n\\|^2 \\mathrm{Var}_{i\\sim
  p_n}(w_i)` (cross-entropy) or :math:`\\kappa = \\frac{2}{Nd}\\|W\\|_F^2\\sum_n\\|\\phi_n\\|^2`
  (MSE). Costs a few small matrix products on top of the forward pass.
* ``"gauss_newton"`` — cross-entropy / MSE and only piecewise-linear modules after the layer in
  an ``nn.Sequential`` (ReLU, pooling, Linear, ...): there :math:`\\partial^2 E/\\partial z_n^2 =
  \\frac1N A_n H^\\ell_n A_n^\\top` exactly almost everywhere, with :math:`A_n = (\\partial o_n /
  \\partial z_n)^\\top` (d × C) obtained from C output-unit vectors pushed back in one batched backward
  pass (kept in the graph).
* ``"hvp"`` — anything else (smooth activations after the layer, a custom loss, a model that is
  not a plain stack): d batched Hessian-vector products in the layer's outputs, with
  ``create_graph=True``.

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

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from dataclasses import replace as _replace

import torch
from torch import Tensor, nn

from .curvature import new_seed, piecewise_linear_after
from .measures.relative import NORMALIZATIONS  # None: the paper's κ; "m": κ / inputs
from .objective import (
    LOSSES,
    as_batches,
    check_model,
    check_option,
    check_targets,
    resolve_layer,
    resolve_loss,
)

__all__ = [
    "METHODS",
    "GRADIENTS",
    "NORMALIZATIONS",
    "PENALTY_PATHS",
    "DEFAULT_LAM",
    "DEFAULT_RHO",
    "ASAM_ETA",
    "penalty",
    "penalty_path",
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

#: training methods of :func:`train`
METHODS = ("sgd", "fam", "sam", "asam")
#: how the FAM penalty is differentiated
GRADIENTS = ("exact", "frozen")
#: how :func:`penalty` computes κ (see the module docstring)
PENALTY_PATHS = ("softmax", "mse", "gauss_newton", "hvp")
#: FAM's λ when none is given (a scale that suits the tutorials' digits MLP; it is data dependent)
DEFAULT_LAM = 0.01
#: ρ when none is given: Foret et al. use 0.05 for SAM; Kwon et al. recommend a ρ about ten
#: times larger for ASAM (0.5 for CIFAR-10 with SGD)
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}
#: ASAM's η (Kwon et al. 2021): T = |w| + η keeps zero weights perturbable
ASAM_ETA = 0.01
#: samples per forward pass when :func:`train` evaluates losses and accuracies
EVAL_BATCH = 4096

_NORM_LAYERS = (nn.modules.batchnorm._NormBase,)
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


class StopTraining(Exception):
    """Raise from a :func:`train` callback to stop after the current epoch (returning ``True``
    from the callback does the same). The model and history so far are returned."""


# ------------------------------------------------------------------------------------ checks


def _number(name: str, value, *, low: float | None = None, strict: bool = False,
            high: float | None = None, integer: bool = False) -> float:
    """``value`` as a float (int if ``integer``) within bounds, else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, Tensor) and value.numel() == 1
    ):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if integer:
        if value != int(value):
            raise ValueError(f"{name} must be an integer, got {value}")
        value = int(value)
    if low is not None and (value < low or (strict and value == low)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high:g}, got {value}")
    return value


def _check_normalize(normalize) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: None, 'm'")


def last_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` module in registration order — the output layer of an
    ``nn.Sequential`` stack, and the default feature layer of :func:`train`.

    >>> from famviz.models import mlp
    >>> last_linear(mlp([4, 8, 3]))
    '2'
    """
    check_model(model)
    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layer; FAM needs one as its feature layer")
    return names[-1]


def _layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Linear]:
    name = last_linear(model) if layer is None else layer
    return name, resolve_layer(model, name, (nn.Linear,))


# ------------------------------------------------------------------------- forward machinery


@contextlib.contextmanager
def _eval_modes(model: nn.Module) -> Iterator[None]:
    """Dropout off and BatchNorm on running statistics (the famviz evaluation policy, as in
    :func:`famviz.relative_flatness`); the caller's modes are restored afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _Target:
    """The feature layer of a model and how to run the model so that the layer's input
    ``phi`` and output ``z`` are captured.

    A plain (nested) ``nn.Sequential`` stack that uses the layer once and has no hooks on its
    containers is run leaf by leaf, which is what its forward does, without registering a hook
    (registering and removing one costs about as much as a small layer's forward pass). Any
    other model is run whole, with a temporary forward hook on the layer."""

    def __init__(self, model: nn.Module, layer: str | None):
        self.name, self.module = _layer(model, layer)
        self.model = model
        self.leaves: list[nn.Module] | None = None
        self.index = -1
        leaves: list[nn.Module] = []

        def walk(module: nn.Module) -> bool:
            children = list(module.children())
            if not children:
                leaves.append(module)
                return True
            if (not isinstance(module, nn.Sequential) or _hooked(module)
                    or type(module).forward is not nn.Sequential.forward):
                return False
            return all(walk(c) for c in children)

        if isinstance(model, nn.Sequential) and walk(model):
            hits = [i for i, m in enumerate(leaves) if m is self.module]
            if len(hits) == 1:
                self.leaves, self.index = leaves, hits[0]

    def forward(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(out, phi, z)``. A layer output that does not require grad (frozen layer and
        inputs) is replaced by a leaf that does, so the loss can be differentiated in it."""
        if self.leaves is not None:
            h = X
            for i, module in enumerate(self.leaves):
                if i == self.index:
                    phi = h
                    h = module(h)
                    if not h.requires_grad:
                        h = h.detach().requires_grad_(True)
                    z = h
                else:
                    h = module(h)
            return h, self._check(phi), z
        store: dict = {"calls": 0}

        def hook(mod, inputs, output):
            store["calls"] += 1
            z = output if output.requires_grad else output.detach().requires_grad_(True)
            store["phi"], store["z"] = inputs[0], z
            return z

        handle = self.module.register_forward_hook(hook)
        try:
            out = self.model(X)
        finally:
            handle.remove()
        if store["calls"] != 1:
            raise ValueError(
                f"layer {self.name!r} ran {store['calls']} times in one forward pass; the FAM "
                "penalty needs a feature layer that is applied exactly once per sample"
            )
        return out, self._check(store["phi"]), store["z"]

    def _check(self, phi: Tensor) -> Tensor:
        if phi.ndim != 2:
            raise ValueError(
                f"layer {self.name!r} receives inputs of shape {tuple(phi.shape)}; the FAM "
                "penalty needs (N, features) inputs (flatten before the layer)"
            )
        return phi


def _has_mode_dependent(model: nn.Module) -> bool:
    return any(isinstance(m, _MODE_DEPENDENT) for m in model.modules())


def penalty_path(model: nn.Module, batch, layer: str | None = None, loss="cross_entropy") -> str:
    """Which route :func:`penalty` takes for this model, layer, loss and kind of input (one of
    :data:`PENALTY_PATHS`; see the module docstring). Runs one forward pass on the first sample
    of ``batch`` without gradients; the model is left as it was.

    >>> import torch
    >>> from famviz.models import mlp
    >>> net, X, y = mlp([4, 8, 3]), torch.zeros(2, 4), torch.tensor([0, 1])
    >>> penalty_path(net, (X, y), "2"), penalty_path(net, (X, y), "0")
    ('softmax', 'gauss_newton')
    """
    target = _Target(model, layer)
    loss_name, _ = resolve_loss(loss)
    W = target.module.weight
    X = as_batches(batch, dtype=W.dtype, device=W.device)[0][0][:1]
    with torch.no_grad(), _eval_modes(model):
        out, _, z = target.forward(X)
    return _plan(model, target, loss_name, z, out)


# ------------------------------------------------------------------------------- the penalty


def _output_jacobian(out: Tensor, z: Tensor, exact: bool) -> Tensor:
    """``A[n, c, :] = ∂o_{n,c} / ∂z_n`` (N, C, d), kept in the graph when ``exact``: the C
    output-unit vectors pushed back to the layer in one batched (vmapped) backward pass."""
    N, C = out.shape
    eye = torch.eye(C, dtype=out.dtype, device=out.device)
    (A,) = torch.autograd.grad(out, z, grad_outputs=eye[:, None, :].expand(C, N, C),
                               is_grads_batched=True, create_graph=exact, retain_graph=True,
                               allow_unused=True)
    if A is None:  # the layer does not reach the output
        return torch.zeros(N, C, z.shape[1], dtype=z.dtype, device=z.device)
    return A.transpose(0, 1)


def _loss_hessian_columns(z: Tensor, out: Tensor, y: Tensor, loss_fn, exact: bool) -> Tensor:
    """``HV[n, j, :] = (∂²E / ∂z_n²) e_j`` (N, d, d) for the batch loss E, kept in the graph
    when ``exact``: d Hessian-vector products in the layer's outputs — the gradient in z, then
    one batched (vmapped) backward pass of the unit vectors e_j given to every sample. Samples
    must not interact (a mean of per-sample losses; BatchNorm on running statistics)."""
    N, d = z.shape
    zeros = torch.zeros(N, d, d, dtype=z.dtype, device=z.device)
    E = loss_fn(out, y)
    if not isinstance(E, Tensor) or E.ndim != 0:
        raise ValueError("the loss must return a scalar tensor (use reduction='mean')")
    (g,) = torch.autograd.grad(E, z, create_graph=True, retain_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:  # the loss is at most linear in z
        return zeros
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    (HV,) = torch.autograd.grad(g, z, grad_outputs=eye[:, None, :].expand(d, N, d),
                                is_grads_batched=True, create_graph=exact, retain_graph=True,
                                allow_unused=True)
    return zeros if HV is None else HV.transpose(0, 1)


def _traces(path: str, phi2: Tensor, z: Tensor, out: Tensor, y: Tensor, loss_name: str,
            loss_fn, exact: bool) -> tuple[Tensor, int]:
    """The block traces :math:`T = \\sum_n \\|\\phi_n\\|^2 \\partial^2E/\\partial z_n^2`
    (d×d, not yet symmetrized) and the number of extra backward passes. With ``exact=False``
    (and a detached ``phi2``) T carries no graph."""
    N, d = z.shape
    if path == "softmax":  # T = 1/N sum_n ||phi_n||^2 (diag p_n - p_n p_n^T)
        p = torch.softmax(out if exact else out.detach(), dim=1)
        wp = p * (phi2 / N)[:, None]
        return torch.diag(wp.sum(dim=0)).addmm(wp.T, p, alpha=-1), 0
    if path == "mse":  # T = 2/(N d) sum_n ||phi_n||^2 I
        return (2.0 / (N * d)) * phi2.sum() * torch.eye(d, dtype=z.dtype, device=z.device), 0
    if path == "gauss_newton":
        A = _output_jacobian(out, z, exact)  # (N, C, d)
        C = A.shape[1]
        w = phi2 / N
        flat = A.reshape(N * C, d)
        if loss_name == "cross_entropy":  # sum_n w_n A_n^T (diag p_n - p_n p_n^T) A_n
            p = torch.softmax(out if exact else out.detach(), dim=1)
            q = torch.bmm(p[:, None, :], A)[:, 0, :]  # A_n^T p_n, (N, d)
            T = ((flat * (w[:, None] * p).reshape(N * C, 1)).T @ flat
                 - (q * w[:, None]).T @ q)
        else:  # mse: the loss Hessian in the output is (2/C) I per sample
            T = (2.0 / C) * ((flat * w.repeat_interleave(C)[:, None]).T @ flat)
        return T, 1
    if path == "hvp":
        HV = _loss_hessian_columns(z, out, y, loss_fn, exact)  # (N, d, d)
        return (phi2 @ HV.reshape(N, d * d)).reshape(d, d).T, 2
    raise AssertionError(path)  # pragma: no cover - internal


def _kappa(path: str, W: Tensor, phi: Tensor, z: Tensor, out: Tensor, y: Tensor,
           loss_name: str, loss_fn, exact: bool) -> tuple[Tensor, int]:
    """κ on one batch from the captured tensors, and the number of extra backward passes it
    took. ``exact=False`` detaches T so that only ⟨WWᵀ, T⟩'s explicit W remains in the graph."""
    N = phi.shape[0]
    phi2 = phi.pow(2).sum(dim=1)  # ||phi_n||^2
    if exact and path == "softmax":  # kappa = 1/N sum_n ||phi_n||^2 Var_{i ~ p_n}(w_i)
        p = torch.softmax(out, dim=1)
        spread = p @ W.pow(2).sum(dim=1) - (p @ W).pow(2).sum(dim=1)
        return (phi2 * spread).sum() / N, 0
    if exact and path == "mse":  # kappa = 2/(N d) ||W||_F^2 sum_n ||phi_n||^2
        return (2.0 / (N * out.shape[1])) * phi2.sum() * W.pow(2).sum(), 0
    T, backwards = _traces(path, phi2 if exact else phi2.detach(), z, out, y, loss_name, loss_fn,
                           exact)
    if not exact:
        T = T.detach()
    T = (T + T.T) / 2
    return ((W @ W.T) * T).sum(), backwards


def _plan(model: nn.Module, target: _Target, loss_name: str, z: Tensor, out: Tensor) -> str:
    """The route for this model/layer/loss, given one captured forward pass. The Gauss-Newton
    route needs a plain stack (run leaf by leaf, so an nn.Sequential subclass with its own
    forward is excluded) whose modules after the layer are piecewise linear."""
    if loss_name not in LOSSES:
        return "hvp"
    if z is out:
        return "softmax" if loss_name == "cross_entropy" else "mse"
    if (out.ndim == 2 and target.leaves is not None
            and piecewise_linear_after(model, target.name, "eval")):
        return "gauss_newton"
    return "hvp"


def penalty(
    model: nn.Module,
    batch,
    layer: str | None = None,
    loss="cross_entropy",
    normalize: str | None = None,
    gradient: str = "exact",
) -> Tensor:
    """Relative flatness κ of ``layer`` on ``batch`` as a differentiable scalar — FAM's penalty.

    .. math::

        \\kappa(W) = \\sum_{s,s'} \\langle w_s, w_{s'}\\rangle\\,\\mathrm{Tr}(H_{s,s'}),
        \\qquad T = \\sum_n \\|\\phi_n\\|^2\\,\\frac{\\partial^2 E}{\\partial z_n^2}

    (Petzka et al. 2021; used as a regularizer by Adilova et al. 2023, docs/math.md §1 and §3). The
    value equals ``famviz.relative_flatness(model, batch, layer, loss, normalize=normalize)``.

    The model is run on its own parameters, so ``(loss + lam * penalty(...)).backward()`` fills
    the ``.grad`` of the live model; nothing else about the model changes (the forward pass runs
    with dropout off and BatchNorm on running statistics, as :func:`famviz.relative_flatness`
    evaluates, and the caller's modes are restored). See the module docstring for the three
    routes (``"softmax"``/``"mse"`` closed forms, ``"gauss_newton"``, ``"hvp"``) and their cost.

    Args:
        model: the network.
        batch: ``(X, y)`` (or an iterable of batches, concatenated).
        layer: name of an ``nn.Linear`` module; ``None``: the last one (:func:`last_linear`).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> scalar`` that
            averages per-sample losses (the ``"hvp"`` route assumes samples do not interact).
        normalize: ``None`` (κ, the paper's measure) or ``"m"`` (κ / m, m = in_features).
        gradient: ``"exact"`` — the true gradient of κ w.r.t. every parameter (W, its bias, the
            layers below through φ and above through the curvature); ``"frozen"`` — T held
            constant: the gradient is :math:`2TW` (÷ m) on W only, what the public FAM code
            effectively computes (docs/math.md §6).

    Returns:
        A 0-dim tensor in the model's dtype.

    Example (docs/math.md §1: one sample, φ = [1, 0], W = [[2, 0], [0, 0]]: κ = 4σ(2)(1 − σ(2)), and
    the frozen gradient on W is 2TW with T = p(1−p)[[1, −1], [−1, 1]]):

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False)).double()
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    >>> batch = (torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0]))
    >>> k = penalty(model, batch, "0", gradient="frozen")
    >>> round(k.item(), 8)
    0.41997434
    >>> k.backward()
    >>> pq = k.item() / 4                          # p(1 - p)
    >>> (model[0].weight.grad / pq).round(decimals=8)
    tensor([[ 4.,  0.],
            [-4.,  0.]], dtype=torch.float64)
    """
    check_option("gradient", gradient, GRADIENTS)
    _check_normalize(normalize)
    target = _Target(model, layer)
    loss_name, loss_fn = resolve_loss(loss)
    W = target.module.weight
    batches = as_batches(batch, dtype=W.dtype, device=W.device)
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.enable_grad(), _eval_modes(model):
        out, phi, z = target.forward(X)
        if loss_name in LOSSES:
            check_targets(loss_name, tuple(out.shape), y)
        path = _plan(model, target, loss_name, z, out)
        value, _ = _kappa(path, W, phi, z, out, y, loss_name, loss_fn, gradient == "exact")
    return value / W.shape[1] if normalize == "m" else value


# ---------------------------------------------------------------------------------- SAM, ASAM


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Run forward passes without changing BatchNorm's running statistics: they (and
    ``num_batches_tracked``) are restored on exit. SAM's second, perturbed forward pass goes
    inside, so the statistics are updated once per step, by the first pass."""
    saved = []
    for m in model.modules():
        if isinstance(m, _NORM_LAYERS) and getattr(m, "track_running_stats", False):
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, key, None)
                if buf is not None:
                    saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class SAM:
    """Sharpness-aware minimization around any optimizer (Foret et al. 2021); with
    ``adaptive=True``, ASAM (Kwon et al. 2021).

    Each step evaluates the gradient twice: at θ, to find the ascent step

    .. math::

        \\epsilon = \\rho\\,\\frac{T^2\\nabla L(\\theta)}{\\|T\\nabla L(\\theta)\\|_2},\\qquad
        T = I \\ \\text{(SAM)},\\quad T = \\mathrm{diag}(|w| + \\eta)\\ \\text{on weights, 1 on
        biases (ASAM)},

    and at θ + ε, where the base optimizer takes its step from θ with that second gradient
    (momentum, weight decay and learning rate are the base optimizer's). Which tensors count as
    biases: parameters named ``*bias`` when the base optimizer was given
    ``model.named_parameters()``, otherwise the 1-D tensors.

    Use :meth:`step` with a closure that zeroes the gradients, computes the loss and calls
    ``backward()``; or call :meth:`first_step` and :meth:`second_step` around your own second
    forward/backward pass. Put the second pass inside :func:`frozen_running_stats` so BatchNorm
    statistics are updated once per step. LR schedulers attach to the base optimizer.

    Args:
        base_optimizer: a ``torch.optim.Optimizer`` instance over the parameters to train.
        rho: neighbourhood radius ρ ≥ 0 (ρ = 0 reproduces the base optimizer).
        adaptive: ASAM's element-wise scaling.
        eta: ASAM's η > 0.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)
    >>> w.grad = w.detach().clone()        # the gradient of ||w||^2 / 2
    >>> opt.first_step()                   # w + 0.5 * g / ||g||
    >>> w.detach()
    tensor([3.3000, 4.4000])
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05,
                 adaptive: bool = False, eta: float = ASAM_ETA):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer instance, e.g. "
                            f"torch.optim.SGD(model.parameters(), lr=0.1); got "
                            f"{type(base_optimizer).__name__}")
        self.base_optimizer = base_optimizer
        self.rho = _number("rho", rho, low=0.0)
        self.adaptive = bool(adaptive)
        self.eta = _number("eta", eta, low=0.0, strict=True)
        self._eps: list[tuple[Tensor, Tensor]] = []

    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def _scaled(self, group: dict) -> list[tuple[Tensor, bool]]:
        names = group.get("param_names")
        out = []
        for i, p in enumerate(group["params"]):
            if names is not None:
                is_bias = names[i].rsplit(".", 1)[-1] == "bias"
            else:
                is_bias = p.ndim <= 1
            out.append((p, self.adaptive and not is_bias))
        return out

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter with a gradient to θ + ε (remembered for :meth:`second_step`).
        A zero gradient or ρ = 0 gives ε = 0."""
        if self._eps:
            raise RuntimeError("first_step() called twice without second_step()")
        items = []
        for group in self.param_groups:
            for p, scaled in self._scaled(group):
                if p.grad is None:
                    continue
                t = p.abs() + self.eta if scaled else None
                items.append((p, t, p.grad if t is None else p.grad * t))
        if not items:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(tg)
                                                     for _, _, tg in items]))
        zero = self.rho == 0 or float(norm) == 0.0
        for p, t, tg in items:
            eps = torch.zeros_like(p) if zero else (tg if t is None else tg * t) * (self.rho / norm)
            p.add_(eps)
            self._eps.append((p, eps))

    @torch.no_grad()
    def second_step(self) -> None:
        """Return to θ and let the base optimizer step with the gradient now in ``.grad``."""
        for p, eps in self._eps:
            p.sub_(eps)
        self._eps = []
        self.base_optimizer.step()

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One SAM step. ``closure`` zeroes the gradients, computes the loss, calls
        ``backward()`` and returns the loss; it is called twice. Returns the first loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and gradients")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        return {"base": self.base_optimizer.state_dict(), "rho": self.rho,
                "adaptive": self.adaptive, "eta": self.eta}

    def load_state_dict(self, state: dict) -> None:
        self.base_optimizer.load_state_dict(state["base"])
        self.rho, self.adaptive, self.eta = state["rho"], state["adaptive"], state["eta"]

    def __repr__(self) -> str:
        kind = "ASAM" if self.adaptive else "SAM"
        eta = f", eta={self.eta:g}" if self.adaptive else ""
        return f"{kind}(rho={self.rho:g}{eta}, base={type(self.base_optimizer).__name__})"


# ------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepInfo:
    """What one training step did.

    Attributes:
        loss: the mini-batch loss at θ (before the step, without the penalty).
        penalty: FAM's κ (÷ m if normalized) on the batch; NaN for other methods.
        forward_passes: full forward passes through the model.
        backward_passes: backward passes (autograd calls; a batched, vmapped pass counts once).
    """

    loss: float
    penalty: float
    forward_passes: int
    backward_passes: int


class Step:
    """One optimizer step of SGD, FAM, SAM or ASAM on ``model`` (trained in place); built by
    :func:`make_step`. Call it with a batch ``(X, y)``; returns a :class:`StepInfo`."""

    def __init__(self, model: nn.Module, method: str, *, lam: float, rho: float, lr: float,
                 momentum: float, weight_decay: float, layer: str | None, loss,
                 normalize: str | None, gradient: str, eta: float):
        self.model = model
        self.method = method
        self.loss_name, self.loss_fn = resolve_loss(loss)
        self.target = _Target(model, layer)
        self.layer, self.module = self.target.name, self.target.module
        self.lam, self.normalize, self.gradient = lam, normalize, gradient
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter that requires grad: nothing to train")
        base = torch.optim.SGD(named, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if method in ("sam", "asam"):
            self.optimizer: torch.optim.Optimizer | SAM = SAM(base, rho=rho,
                                                              adaptive=method == "asam", eta=eta)
        else:
            self.optimizer = base
        # FAM: share the loss' forward pass unless the model behaves differently in train mode
        # (BatchNorm, dropout): then the penalty gets its own forward pass in evaluation mode,
        # as penalty() and relative_flatness() evaluate it
        self.shared_forward = not _has_mode_dependent(model)
        self.path: str | None = None

    def _loss(self, X: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
        value = self.loss_fn(self.model(X) if out is None else out, y)
        if not isinstance(value, Tensor) or value.ndim != 0:
            raise ValueError("the loss must return a scalar tensor (use reduction='mean')")
        return value

    def _fam_penalty(self, out: Tensor, phi: Tensor, z: Tensor, y: Tensor):
        """κ on the batch (÷ m if normalized) from the captured layer tensors: a tensor in the
        graph (exact), or for the frozen gradient the detached value and the term 2TW (÷ m) to
        add to W's gradient — applying :math:`2TW` directly instead of differentiating
        :math:`\\langle WW^\\top, T\\rangle` saves the autograd bookkeeping."""
        if self.path is None:
            self.path = _plan(self.model, self.target, self.loss_name, z, out)
        W = self.module.weight
        scale = 1.0 / W.shape[1] if self.normalize == "m" else 1.0
        if self.gradient == "exact":
            value, backwards = _kappa(self.path, W, phi, z, out, y, self.loss_name, self.loss_fn,
                                      True)
            return value * scale, None, backwards
        T, backwards = _traces(self.path, phi.detach().pow(2).sum(dim=1), z, out, y,
                               self.loss_name, self.loss_fn, False)
        with torch.no_grad():
            if self.path not in ("softmax", "mse"):  # symmetric by construction there
                T = (T + T.T) / 2
            TW = T @ W
            value = (W * TW).sum()
            return (value if scale == 1.0 else value * scale), TW.mul_(2 * scale), backwards

    def __call__(self, X: Tensor, y: Tensor) -> StepInfo:
        model, opt = self.model, self.optimizer
        with torch.enable_grad():
            if self.method == "sgd":
                opt.zero_grad(set_to_none=True)
                loss = self._loss(X, y)
                loss.backward()
                opt.step()
                return StepInfo(float(loss.detach()), float("nan"), 1, 1)
            if self.method == "fam":
                opt.zero_grad(set_to_none=True)
                if self.shared_forward:
                    out, phi, z = self.target.forward(X)
                    loss = self._loss(X, y, out)
                    pen, decay, backwards = self._fam_penalty(out, phi, z, y)
                    forwards = 1
                else:  # the penalty's own forward pass in evaluation mode
                    loss = self._loss(X, y)
                    with _eval_modes(model):
                        out, phi, z = self.target.forward(X)
                        pen, decay, backwards = self._fam_penalty(out, phi, z, y)
                    forwards = 2
                if decay is None:
                    (loss + self.lam * pen).backward()
                else:
                    loss.backward()
                    W = self.module.weight
                    if W.requires_grad:
                        if W.grad is None:
                            W.grad = torch.zeros_like(W)
                        W.grad.add_(decay, alpha=self.lam)
                opt.step()
                return StepInfo(float(loss.detach()), float(pen.detach()), forwards,
                                1 + backwards)
            # SAM / ASAM: gradient at theta, ascend, gradient at theta + eps (BatchNorm
            # statistics updated by the first pass only), descend from theta
            opt.zero_grad(set_to_none=True)
            loss = self._loss(X, y)
            loss.backward()
            opt.first_step()
            opt.zero_grad(set_to_none=True)
            with frozen_running_stats(model):
                self._loss(X, y).backward()
            opt.second_step()
            return StepInfo(float(loss.detach()), float("nan"), 2, 2)


def make_step(model: nn.Module, method: str = "sgd", *, lam: float | None = None,
              rho: float | None = None, lr: float = 0.05, momentum: float = 0.9,
              weight_decay: float = 0.0, layer: str | None = None, loss="cross_entropy",
              normalize: str | None = None, gradient: str = "exact",
              eta: float = ASAM_ETA) -> Step:
    """A callable ``step(X, y) -> StepInfo`` that trains ``model`` **in place** with one of
    :data:`METHODS` (SGD with momentum underneath each); for custom training loops. Arguments
    as in :func:`train`, which uses it."""
    check_model(model)
    check_option("method", method, METHODS)
    check_option("gradient", gradient, GRADIENTS)
    _check_normalize(normalize)
    lam = DEFAULT_LAM if lam is None else _number("lam", lam, low=0.0)
    rho = DEFAULT_RHO.get(method, 0.0) if rho is None else _number("rho", rho, low=0.0)
    return Step(
        model, method, lam=lam, rho=rho,
        lr=_number("lr", lr, low=0.0, strict=True),
        momentum=_number("momentum", momentum, low=0.0, high=1.0),
        weight_decay=_number("weight_decay", weight_decay, low=0.0),
        layer=layer, loss=loss, normalize=normalize, gradient=gradient,
        eta=_number("eta", eta, low=0.0, strict=True),
    )


# --------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class History:
    """Per-epoch record of a :func:`train` run (a new object after every epoch).

    Per-epoch tuples (one entry per completed epoch):
        epoch: 1, 2, ...
        train_loss, train_accuracy: on the full training data after the epoch (evaluation mode:
            dropout off, BatchNorm on running statistics). Accuracy is NaN when the targets are
            not class labels.
        test_loss, test_accuracy: the same on ``test_data`` (NaN without it).
        kappa: relative flatness κ of the feature layer on the full training data
            (:func:`famviz.relative_flatness`, the paper's unnormalized κ; NaN when not tracked).
        batch_loss: mean mini-batch loss during the epoch (at θ, without the penalty).
        penalty: mean FAM penalty on the mini-batches (÷ m if normalized); NaN for other methods.
        time_per_step: mean wall-clock seconds per optimizer step (evaluation excluded).
        forward_passes, backward_passes: totals for the epoch's steps (see :class:`StepInfo`).
        steps: optimizer steps taken.

    Everything else records the run's settings. Two runs with the same seed and settings give
    identical histories except ``time_per_step``.
    """

    method: str
    layer: str
    loss: str
    seed: int
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    lam: float | None
    rho: float | None
    eta: float | None
    normalize: str | None
    gradient: str | None
    penalty_path: str | None
    num_train: int
    num_test: int
    stopped_early: bool = False
    epoch: tuple[int, ...] = ()
    train_loss: tuple[float, ...] = ()
    train_accuracy: tuple[float, ...] = ()
    test_loss: tuple[float, ...] = ()
    test_accuracy: tuple[float, ...] = ()
    kappa: tuple[float, ...] = ()
    batch_loss: tuple[float, ...] = ()
    penalty: tuple[float, ...] = ()
    time_per_step: tuple[float, ...] = ()
    forward_passes: tuple[int, ...] = ()
    backward_passes: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()

    #: the per-epoch fields
    PER_EPOCH = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "kappa",
                 "batch_loss", "penalty", "time_per_step", "forward_passes", "backward_passes",
                 "steps")

    def __len__(self) -> int:
        return len(self.epoch)

    def to_dict(self) -> dict:
        """Plain Python (lists for the per-epoch fields), ready for ``json.dumps``/pandas."""
        d = asdict(self)
        for key in self.PER_EPOCH:
            d[key] = list(d[key])
        return d

    def last(self) -> dict:
        """The last epoch's values, keyed by field name (empty before the first epoch)."""
        return {key: getattr(self, key)[-1] for key in self.PER_EPOCH} if len(self) else {}

    def _append(self, **values) -> History:
        new = {key: getattr(self, key) + (values[key],) for key in self.PER_EPOCH}
        return _replace(self, **new)


@torch.no_grad()
def _evaluate(model: nn.Module, X: Tensor, y: Tensor, loss_fn) -> tuple[float, float]:
    """Mean loss and accuracy (NaN unless the targets are class labels) in evaluation mode."""
    if len(X) == 0:
        return float("nan"), float("nan")
    total, correct, classify = 0.0, 0, None
    with _eval_modes(model):
        for start in range(0, len(X), EVAL_BATCH):
            xb, yb = X[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            out = model(xb)
            total += float(loss_fn(out, yb)) * len(xb)
            if classify is None:
                classify = out.ndim == 2 and out.shape[1] > 1 and not yb.is_floating_point()
            if classify:
                correct += int((out.argmax(dim=1) == yb).sum())
    return total / len(X), (correct / len(X) if classify else float("nan"))


def _tensors(data, what: str, dtype, device) -> tuple[Tensor, Tensor]:
    batches = as_batches(data, dtype=dtype, device=device)
    if len(batches) == 1:
        return batches[0]
    try:
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    except RuntimeError as exc:
        raise ValueError(f"the batches of {what} have inconsistent shapes: {exc}") from exc


@contextlib.contextmanager
def _private_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (dropout draws from it) inside, restore the caller's state on
    exit: the caller's random stream is never consumed."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def train(
    model: nn.Module,
    train_data,
    test_data=None,
    method: str = "sgd",
    *,
    lam: float | None = None,
    rho: float | None = None,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    layer: str | None = None,
    loss="cross_entropy",
    normalize: str | None = None,
    gradient: str = "exact",
    eta: float = ASAM_ETA,
    seed: int | None = None,
    callbacks: Sequence[Callable] = (),
    progress: bool = True,
    track_kappa: bool = True,
) -> tuple[nn.Module, History]:
    """Train a copy of ``model`` with SGD, FAM, SAM or ASAM; return ``(trained, history)``.

    All methods share the base optimizer — SGD with ``lr``, ``momentum`` and ``weight_decay`` —
    and the mini-batches, so runs from one initialization differ only by the method:

    * ``"sgd"``: the mini-batch loss.
    * ``"fam"`` (Adilova et al. 2023): loss + λ·κ(W) of ``layer`` on the mini-batch
      (:func:`penalty`; ``normalize``, ``gradient`` apply).
    * ``"sam"`` (Foret et al. 2021) / ``"asam"`` (Kwon et al. 2021): :class:`SAM` around SGD
      with radius ``rho`` (and ``eta`` for ASAM).

    The input model is never modified (a deep copy is trained; its train/eval modes are restored
    at the end). The data are shuffled every epoch with a ``torch.Generator`` seeded by
    ``seed``; dropout draws from torch's global RNG, seeded from ``seed`` inside
    ``torch.random.fork_rng`` so the caller's random state is neither used nor changed. The same
    seed and settings therefore give the same model and history (up to ``time_per_step``).

    Args:
        model: the network (not modified).
        train_data: ``(X, y)`` or an iterable of ``(X, y)`` batches (gathered into tensors and
            re-batched; ``batch_size`` decides the mini-batches).
        test_data: optional held-out ``(X, y)`` for the test columns of the history.
        method: one of :data:`METHODS`.
        lam: FAM's λ ≥ 0 (default :data:`DEFAULT_LAM`); ignored by other methods (recorded as
            None).
        rho: SAM/ASAM radius ρ ≥ 0 (default :data:`DEFAULT_RHO`); ignored by SGD and FAM.
        epochs: passes over the training data (≥ 1).
        lr, momentum, weight_decay: the SGD base optimizer (lr > 0, 0 ≤ momentum < 1,
            weight_decay ≥ 0).
        batch_size: mini-batch size (≥ 1); the last batch of an epoch may be smaller.
        layer: the ``nn.Linear`` feature layer (FAM's penalty and the tracked κ); ``None``: the
            last ``nn.Linear`` module (:func:`last_linear`).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> scalar``.
        normalize: FAM penalty κ (``None``) or κ/m (``"m"``).
        gradient: FAM penalty gradient, ``"exact"`` or ``"frozen"`` (see :func:`penalty`).
        eta: ASAM's η.
        seed: seed of the shuffling and of dropout; ``None`` draws one (recorded in the history).
        callbacks: functions ``callback(epoch, model, history)`` called after every epoch with
            the model being trained (do not modify it) and the history so far. Returning
            ``True`` or raising :class:`StopTraining` ends training after that epoch
            (``history.stopped_early`` is then True).
        progress: show a ``tqdm`` progress bar over epochs.
        track_kappa: compute κ on the full training data after every epoch.

    Raises:
        ValueError: an unknown method/option, λ < 0, ρ < 0, epochs < 1, a layer that is not an
            ``nn.Linear``, targets that do not fit the outputs, ...
        FloatingPointError: the loss became NaN or infinite (lower ``lr`` or ``lam``).

    Example (two moons; FAM from the same initialization as SGD):

    >>> from famviz import data, models
    >>> train_data, test_data = data.moons(n_samples=200, seed=0)
    >>> model = models.mlp([2, 16, 2], seed=0)
    >>> trained, history = train(model, train_data, test_data, method="fam", lam=0.01,
    ...                          epochs=3, seed=0, progress=False)
    >>> len(history), history.method, history.layer, history.penalty_path, trained is model
    (3, 'fam', '2', 'softmax', False)
    >>> sorted(history.to_dict())[:4]
    ['backward_passes', 'batch_loss', 'batch_size', 'epoch']
    """
    check_model(model)
    check_option("method", method, METHODS)
    check_option("gradient", gradient, GRADIENTS)
    _check_normalize(normalize)
    epochs = _number("epochs", epochs, low=1, integer=True)
    batch_size = _number("batch_size", batch_size, low=1, integer=True)
    if isinstance(test_data, str):
        raise TypeError(f"test_data is the string {test_data!r}; pass the method by keyword: "
                        f"train(model, train_data, method={test_data!r})")
    if lam is not None:
        _number("lam", lam, low=0.0)
    if rho is not None:
        _number("rho", rho, low=0.0)
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks must be callables, got {type(cb).__name__}")
    layer_name, _ = _layer(model, layer)
    loss_name, loss_fn = resolve_loss(loss)
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("the model has no parameters")
    dtype, device = first.dtype, first.device
    X, y = _tensors(train_data, "train_data", dtype, device)
    if test_data is not None:
        X_test, y_test = _tensors(test_data, "test_data", dtype, device)
    else:
        X_test, y_test = X[:0], y[:0]
    seed = new_seed() if seed is None else _number("seed", seed, low=0, integer=True)

    net = copy.deepcopy(model)
    for p in net.parameters():
        p.grad = None
    modes = [m.training for m in net.modules()]
    with torch.no_grad(), _eval_modes(net):  # clear errors before any training
        try:
            out = net(X[:2])
        except RuntimeError as exc:
            raise ValueError(f"the model cannot evaluate inputs of shape "
                             f"{tuple(X.shape[1:])} (per sample): {exc}") from exc
        if loss_name in LOSSES:
            check_targets(loss_name, tuple(out.shape), y)
            if len(X_test):
                check_targets(loss_name, tuple(out.shape), y_test)

    step = make_step(net, method, lam=lam, rho=rho, lr=lr, momentum=momentum,
                     weight_decay=weight_decay, layer=layer_name, loss=loss, normalize=normalize,
                     gradient=gradient, eta=eta)
    is_fam, is_sam = method == "fam", method in ("sam", "asam")
    history = History(
        method=method, layer=layer_name, loss=loss_name, seed=seed, epochs=epochs,
        lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
        batch_size=batch_size, lam=step.lam if is_fam else None,
        rho=step.optimizer.rho if is_sam else None,
        eta=float(eta) if method == "asam" else None,
        normalize=normalize if is_fam else None, gradient=gradient if is_fam else None,
        penalty_path=None, num_train=len(X), num_test=len(X_test),
    )

    from tqdm.auto import tqdm  # noqa: PLC0415 (kept out of the core's import time)

    shuffle = torch.Generator().manual_seed(seed)
    bar = tqdm(range(1, epochs + 1), desc=f"{method}", disable=not progress, leave=False)
    try:
        with _private_global_rng(seed + 1, device):
            for epoch in bar:
                net.train()
                order = torch.randperm(len(X), generator=shuffle).to(device)
                seconds, losses, pens, fwd, bwd, steps = 0.0, [], [], 0, 0, 0
                for start in range(0, len(X), batch_size):
                    idx = order[start:start + batch_size]
                    t0 = time.perf_counter()
                    info = step(X[idx], y[idx])
                    seconds += time.perf_counter() - t0
                    if not math.isfinite(info.loss) or (is_fam and not math.isfinite(info.penalty)):
                        raise FloatingPointError(
                            f"{method}: the loss became {info.loss} (penalty {info.penalty}) in "
                            f"epoch {epoch}; lower lr{' or lam' if is_fam else ''}")
                    losses.append(info.loss)
                    pens.append(info.penalty)
                    fwd += info.forward_passes
                    bwd += info.backward_passes
                    steps += 1
                for m, mode in zip(net.modules(), modes):
                    m.training = mode
                tr_loss, tr_acc = _evaluate(net, X, y, loss_fn)
                te_loss, te_acc = _evaluate(net, X_test, y_test, loss_fn)
                kappa = float("nan")
                if track_kappa:
                    from .measures.relative import relative_flatness  # noqa: PLC0415

                    kappa = relative_flatness(net, (X, y), layer_name, loss).value
                if is_fam and history.penalty_path is None:
                    history = _replace(history, penalty_path=step.path)
                history = history._append(
                    epoch=epoch, train_loss=tr_loss, train_accuracy=tr_acc, test_loss=te_loss,
                    test_accuracy=te_acc, kappa=kappa, batch_loss=sum(losses) / len(losses),
                    penalty=sum(pens) / len(pens), time_per_step=seconds / steps,
                    forward_passes=fwd, backward_passes=bwd, steps=steps,
                )
                bar.set_postfix(loss=f"{tr_loss:.4f}", acc=f"{tr_acc:.3f}",
                                kappa=f"{kappa:.4g}", refresh=False)
                stop = False
                for cb in callbacks:
                    try:
                        stop = bool(cb(epoch, net, history)) or stop
                    except StopTraining:
                        stop = True
                if stop:
                    if epoch < epochs:
                        history = _replace(history, stopped_early=True)
                    break
    finally:
        bar.close()
        for m, mode in zip(net.modules(), modes):
            m.training = mode
        for p in net.parameters():
            p.grad = None
    return net, history
