"""Machinery shared by the perturbation-based measures: cost accounting, invariance
declarations, argument checks and a counting evaluator of the loss at perturbed weights.

Perturbations are flat vectors ``z`` over the selected parameters (laid out by
:class:`famviz.curvature.ParamLayout`, in ``named_parameters()`` order); the loss at
``theta + z`` is evaluated with :func:`torch.func.functional_call` on a fresh parameter dict, so
the caller's model is never touched. Every full pass over the data is counted.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .._progress import tick
from ..batches import describe
from ..curvature import ParamLayout
from ..objective import Objective, check_finite_loss, check_seed, resolve_params  # noqa: F401

__all__ = [
    "INVARIANT",
    "CHANGES",
    "NOT_APPLICABLE",
    "UNDECLARED",
    "TRANSFORMS",
    "TRANSFORM_DESCRIPTIONS",
    "NORM_LAYERS",
    "Cost",
    "Adversary",
    "declare",
]

#: the measure is unchanged by the transformation (same seed before and after)
INVARIANT = "invariant"
#: the measure changes
CHANGES = "changes"
#: the transformation is not a symmetry of this setting (e.g. T5 without softmax cross-entropy,
#: T3 of the output layer)
NOT_APPLICABLE = "n/a"
#: no claim: the measure was computed on a parameter subset the declarations do not cover
UNDECLARED = "not declared"

#: the function-preserving reparameterizations of docs/math.md §2 that the declarations refer to
TRANSFORMS = ("T1", "T2", "T3", "T5")

#: what each transformation does, relative to the reference Linear layer ``layer`` (the feature
#: layer of relative flatness), the Linear layer ``below`` that feeds it through a ReLU and the
#: Linear layer ``above`` that it feeds
TRANSFORM_DESCRIPTIONS = {
    "T1": "layer-wise: reparam.scale_layers(model, below, layer, alpha) — the layer below "
          "(weight and bias) x alpha, the layer's weight / alpha",
    "T2": "neurons below: reparam.scale_neurons(model, below, layer, c) — row k of the layer "
          "below x c_k, column k of the layer's weight / c_k",
    "T3": "rows of the layer: reparam.scale_neurons(model, layer, above, r) — row s of the "
          "layer (and b_s) x r_s, column s of the layer above / r_s",
    "T5": "softmax shift: reparam.shift_logits(model, output_layer, v) — every row of the "
          "output layer + v (a symmetry of softmax cross-entropy only)",
}

#: parameters of these modules are excluded from the per-tensor neighbourhoods of Stutz et al.
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    ) if t is not None
)



def nonzero(x: Tensor) -> Tensor:
    """``x`` with zeros raised to the dtype's smallest normal number: a safe divisor for norms
    of exactly-zero vectors (a zero gradient, a zero-norm tensor), so that ``0 / nonzero(0)``
    is 0 in float32 as in float64."""
    return x.clamp_min(torch.finfo(x.dtype).tiny)


def declare(t1: str, t2: str, t3: str, t5: str, *, loss_name: str, params) -> dict[str, str]:
    """The declared behaviour under T1, T2, T3, T5 of a measure over all parameters.

    T5 is only a symmetry of softmax cross-entropy: with any other loss it is ``"n/a"``. With a
    parameter subset (``params`` not None) no claim is made.
    """
    if params is not None:
        return {t: UNDECLARED for t in TRANSFORMS}
    return {"T1": t1, "T2": t2, "T3": t3,
            "T5": t5 if loss_name == "cross_entropy" else NOT_APPLICABLE}


# --------------------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Cost:
    """What a measure cost.

    Attributes:
        forward: full forward passes over the data (``None`` where not counted).
        backward: full backward passes over the data (``None`` where not counted).
        hvps: Hessian-vector products (``None`` where not counted, 0 where none were made).
        seconds: wall-clock time of the call.
    """

    forward: int | None
    backward: int | None
    hvps: int | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- argument checks


def check_real(name: str, value) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_radius(name: str, value) -> float:
    """A radius or budget: finite and >= 0."""
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} is a radius and must be >= 0, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return int(value)


def select_params(model: nn.Module, params, *, exclude_norm: bool = False) -> list[str]:
    """Names of the perturbed parameters: ``params`` as in :func:`resolve_params`; with
    ``params=None`` and ``exclude_norm``, every parameter except those of normalization layers
    (:data:`NORM_LAYERS`)."""
    names = resolve_params(model, params)
    if params is None and exclude_norm:
        skip = {f"{m_name}.{p_name}" if m_name else p_name
                for m_name, m in model.named_modules() if isinstance(m, NORM_LAYERS)
                for p_name, _ in m.named_parameters(recurse=False)}
        names = [n for n in names if n not in skip]
        if not names:
            raise ValueError("every parameter belongs to a normalization layer: nothing to "
                             "perturb")
    return names


# ------------------------------------------------------------------------------ adversary


@dataclass(frozen=True)
class Adversary:
    """An L-infinity PGD adversary on the inputs (Madry et al. 2018): ``steps`` signed-gradient
    steps of ``step_size`` from the clean input, projected onto ``|delta_i| <= eps``."""

    eps: float
    steps: int
    step_size: float


# ------------------------------------------------------------------------------- evaluator


class Evaluator:
    """The loss (or error) at ``theta + z`` for flat perturbations ``z``, counting passes.

    Args:
        obj: the objective.
        names: the perturbed parameters.
        adversary: evaluate the adversarial (robust) loss instead of the clean one.

    Attributes:
        layout: the flat layout of the perturbed parameters.
        theta: the centre, flat (detached).
        sizes: numel of each perturbed tensor.
        loss0: the loss at the centre (checked finite).
    """

    def __init__(self, obj: Objective, names: Sequence[str], adversary: Adversary | None = None):
        if adversary is not None:
            for X, _ in obj.batches:
                if not (isinstance(X, Tensor) and X.is_floating_point()):
                    raise ValueError(
                        f"the adversarial loss perturbs the inputs, so it needs one floating "
                        f"input tensor per batch; this data has {describe(X)} (token ids or "
                        "several inputs): use a measure without an adversary"
                    )
        self.obj = obj
        self.adversary = adversary
        self.layout = ParamLayout(tuple(names), tuple(obj.params[n].shape for n in names))
        self.theta = self.layout.flatten(obj.params).detach()
        self.sizes = self.layout.numels
        self.dim = self.layout.dim
        self.device, self.dtype = obj.device, obj.dtype
        self.forward = 0
        self.backward = 0
        self.start = time.perf_counter()
        self.loss0 = check_finite_loss(self.loss(torch.zeros_like(self.theta)),
                                       "the loss at the centre (the unperturbed model)")

    # -- vectors ----------------------------------------------------------------------------

    def params_at(self, flat: Tensor) -> dict[str, Tensor]:
        return self.layout.unflatten(flat)

    def tensor_norms(self, v: Tensor) -> Tensor:
        """Euclidean norm of each tensor's block of the flat vector ``v``."""
        return torch.stack([p.norm() for p in torch.split(v, self.sizes)])

    def expand(self, per_tensor: Tensor) -> Tensor:
        """One value per tensor -> a flat vector repeating it over the tensor's entries."""
        sizes = torch.tensor(self.sizes, device=per_tensor.device)
        return torch.repeat_interleave(per_tensor, sizes)

    def cost(self) -> "Cost":
        return Cost(self.forward, self.backward, 0, time.perf_counter() - self.start)

    # -- evaluation -------------------------------------------------------------------------

    def _adversarial_inputs(self, params: dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        adv = self.adversary
        fixed = {n: p.detach() for n, p in params.items()}
        delta = torch.zeros_like(X)
        with torch.enable_grad():
            for _ in range(adv.steps):
                delta.requires_grad_(True)
                value = self.obj.batch_loss(fixed, X + delta, y)
                (g,) = torch.autograd.grad(value, delta)
                delta = (delta.detach() + adv.step_size * g.sign()).clamp(-adv.eps, adv.eps)
        return (X + delta).detach()

    def _loss(self, params: dict[str, Tensor]) -> Tensor:
        obj, N = self.obj, self.obj.num_samples
        total = None
        for X, y in obj.batches:
            if self.adversary is not None:
                X = self._adversarial_inputs(params, X, y)
            term = obj.batch_loss(params, X, y) * (len(X) / N)
            total = term if total is None else total + term
        if self.adversary is not None:
            self.forward += self.adversary.steps
            self.backward += self.adversary.steps
        self.forward += 1
        tick()
        return total

    def loss(self, z: Tensor) -> float:
        """E(theta + z); one forward pass (plus the adversary's steps)."""
        with torch.no_grad() if self.adversary is None else contextlib.nullcontext():
            value = self._loss(self.params_at(self.theta + z))
        return float(value.detach())

    def loss_and_grad(self, z: Tensor) -> tuple[float, Tensor]:
        """E(theta + z) and its gradient in z (flat); one forward and one backward pass,
        accumulated batch by batch (one batch's graph alive at a time)."""
        obj, N = self.obj, self.obj.num_samples
        total, grad = 0.0, torch.zeros_like(self.theta)
        for X, y in obj.batches:
            x = (self.theta + z).detach().requires_grad_(True)
            with torch.enable_grad():
                if self.adversary is not None:
                    X = self._adversarial_inputs(self.params_at(x), X, y)
                value = obj.batch_loss(self.params_at(x), X, y) * (len(X) / N)
                (g,) = torch.autograd.grad(value, x)
            total += float(value.detach())
            grad += g
        if self.adversary is not None:
            self.forward += self.adversary.steps
            self.backward += self.adversary.steps
        self.forward += 1
        self.backward += 1
        tick()
        return total, grad

    def error(self, z: Tensor) -> float:
        """Fraction of misclassified samples at theta + z (argmax of the output against class
        indices, or against the argmax of probability / one-hot targets)."""
        params = self.params_at(self.theta + z)
        wrong = 0.0
        with torch.no_grad():
            for X, y in self.obj.batches:
                out = self.obj.forward(params, X)
                wrong += float((out.argmax(dim=1) != class_targets(y, out)).sum())
        self.forward += 1
        tick()
        return wrong / self.obj.num_samples


def class_targets(y: Tensor, out: Tensor) -> Tensor:
    """Class indices of targets ``y`` for outputs ``out`` (N, C)."""
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(f"the error criterion needs outputs of shape (N, classes) with at "
                         f"least 2 classes, got {tuple(out.shape)}; use criterion='loss'")
    if not y.is_floating_point() and y.ndim == 1:
        return y
    if y.is_floating_point() and tuple(y.shape) == tuple(out.shape):
        return y.argmax(dim=1)
    raise ValueError(f"the error criterion needs class-index targets (N,) or one-hot / "
                     f"probability targets {tuple(out.shape)}, got {tuple(y.shape)}")


def pair_statistics(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(K); NaN for K = 1) of K values."""
    t = torch.tensor(values, dtype=torch.float64)
    mean = float(t.mean())
    stderr = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return mean, stderr


def unit_directions(gen: torch.Generator, dim: int, device, dtype) -> Tensor:
    """A direction uniform on the unit sphere of R^dim (a normalized Gaussian)."""
    e = torch.randn(dim, generator=gen, device=device, dtype=dtype)
    return e / nonzero(e.norm())
