"""SAM and ASAM around any optimizer (a ``torch.optim.Optimizer`` itself), and BatchNorm
statistics frozen for SAM's second pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from ._args import number

#: normalization layers whose running statistics SAM's second pass must not update
_NORM_LAYERS = (nn.modules.batchnorm._NormBase,)


#: ASAM's η (Kwon et al. 2021): T = |w| + η keeps zero weights perturbable
ASAM_ETA = 0.01


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


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any optimizer (Foret et al. 2021); with
    ``adaptive=True``, ASAM (Kwon et al. 2021). A ``torch.optim.Optimizer``: learning-rate
    schedulers and ``torch.amp.GradScaler`` attach to it (its ``param_groups`` are the base
    optimizer's).

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
    ``backward()``; or call :meth:`first_step`, then your own second forward/backward pass, then
    :meth:`step` without a closure (or :meth:`second_step`). With a ``GradScaler``:
    ``scaler.scale(loss).backward(); sam.first_step(); sam.zero_grad()``, the second pass with
    ``scaler.scale(loss).backward()``, then ``scaler.step(sam); scaler.update()``: the ascent
    ε depends only on the gradient's direction, so the first gradients need no unscaling (and
    a first pass that overflowed takes no ascent). Put the second pass inside
    :func:`frozen_running_stats` so BatchNorm statistics are updated once per step.

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
        rho = number("rho", rho, low=0.0)
        eta = number("eta", eta, low=0.0, strict=True)
        super().__init__(base_optimizer.param_groups, {"rho": rho, "adaptive": bool(adaptive),
                                                       "eta": eta})
        # one set of groups: a scheduler or a GradScaler acting on SAM acts on the base
        self.param_groups = base_optimizer.param_groups
        self.base_optimizer = base_optimizer
        self.rho, self.adaptive, self.eta = rho, bool(adaptive), eta
        self._eps: list[tuple[Tensor, Tensor]] = []
        self._ascended = False  # between first_step and second_step

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
        if self._ascended:
            raise RuntimeError("first_step() called twice without second_step()")
        self._ascended = True
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
        # no ascent for rho = 0, a zero gradient, or an overflowed (scaled) first pass
        zero = self.rho == 0 or not 0.0 < float(norm) < math.inf
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
        self._ascended = False
        self.base_optimizer.step()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SAM step. ``closure`` zeroes the gradients, computes the loss, calls
        ``backward()`` and returns the loss; it is called twice. Returns the first loss.

        Without a closure, after :meth:`first_step` and a second backward pass: the descent
        from θ (what ``GradScaler.step`` calls)."""
        if closure is None:
            if not self._ascended:
                raise ValueError("SAM.step() without a closure completes a step begun with "
                                 "first_step(); pass a closure that recomputes the loss and "
                                 "gradients, or call first_step() first")
            self.second_step()
            return None
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


