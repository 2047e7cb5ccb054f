"""The FAM penalty: relative flatness κ of a feature layer on a batch, as a differentiable
scalar (routes and gradients in the package docstring of :mod:`famviz.fam`); the model's
own forward pass reused by :class:`PenaltyTap`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..curvature import laplacian, piecewise_linear_after, softmax_coupling
from ..batches import OutputError, concat, describe, logits_of
from ..objective import (
    LOSSES,
    as_batches,
    check_option,
    check_targets,
    double_backward_safe,
    resolve_layer,
    resolve_loss,
)
from ..replica import check_model, replicate, shared_names
from ._args import check_normalize

#: how the FAM penalty is differentiated
GRADIENTS = ("exact", "frozen")
#: how :func:`penalty` computes κ (see the module docstring)
PENALTY_PATHS = ("softmax", "mse", "gauss_newton", "hvp")
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


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
    return name, resolve_layer(model, name, (nn.Linear,), unshared=True)


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
        self.name, _ = _layer(model, layer)
        # a replica holding the caller's Parameter objects: gradients reach them, while the
        # hook and the evaluation modes are set on modules the caller never sees
        self.model = model = replicate(model, share=True)
        self.module = model.get_submodule(self.name)
        self.output_fn = None  # set from famviz.Batches(..., output_fn=...) by the caller
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

        # a module or parameter used twice is not one layer of a stack: run the model whole
        if isinstance(model, nn.Sequential) and not shared_names(model) and walk(model):
            hits = [i for i, m in enumerate(leaves) if m is self.module]
            if len(hits) == 1:
                self.leaves, self.index = leaves, hits[0]

    def forward(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(out, phi, z)``. A layer output that does not require grad (frozen layer and
        inputs) is replaced by a leaf that does, so the loss can be differentiated in it."""
        try:
            return self._forward(X)
        except (torch.OutOfMemoryError, OutputError):
            raise
        except (RuntimeError, TypeError) as exc:  # shapes, keyword inputs it does not take
            raise ValueError(f"batch: the model cannot evaluate {describe(X)}: {exc}") from exc

    def _forward(self, X) -> tuple[Tensor, Tensor, Tensor]:
        if self.leaves is not None and isinstance(X, Tensor):
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
            out = logits_of(self.model(X) if isinstance(X, Tensor) else X.call(self.model),
                            self.output_fn)
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
    target.output_fn = getattr(batch, "output_fn", None)
    with torch.no_grad(), _eval_modes(target.model):
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
    if path == "softmax":  # T = 1/N sum_n ||phi_n||^2 (diag p_n - p_n p_n^T), as a Laplacian
        p = torch.softmax(out if exact else out.detach(), dim=1)
        return laplacian(softmax_coupling(p, phi2 / N)), 0
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
    if exact and path == "softmax":
        # kappa = 1/N sum_n ||phi_n||^2 Var_{i ~ p_n}(w_i) = 1/2 sum_{s,s'} A_ss' ||w_s - w_s'||^2:
        # non-negative terms, no cancellation when p_n is nearly one-hot (near-zero loss)
        p = torch.softmax(out, dim=1)
        A = (p * (phi2 / N)[:, None]).T @ p  # its diagonal meets E_ss = 0 exactly
        G = W @ W.T
        g = G.diagonal()
        return 0.5 * (A * (g[:, None] + g[None, :] - 2 * G).clamp_min(0)).sum(), 0
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

    The forward pass runs on a famviz replica of the model's modules that holds the model's own
    parameters, so ``(loss + lam * penalty(...)).backward()`` fills the ``.grad`` of the live
    model, and nothing else about the model changes: the replica runs with dropout off and
    BatchNorm on running statistics (as :func:`famviz.relative_flatness` evaluates) while the
    model's own modes, hooks and buffers are never touched. See the module docstring for the three
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
    check_normalize(normalize)
    target = _Target(model, layer)
    loss_name, loss_fn = resolve_loss(loss)
    W = target.module.weight
    batches = as_batches(batch, dtype=W.dtype, device=W.device)
    X = concat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    target.output_fn = getattr(batch, "output_fn", None)
    if loss_name == "cross_entropy" and not y.is_floating_point():
        y = y.long()  # class indices of any integer dtype (or bool)
    with torch.enable_grad(), _eval_modes(target.model), double_backward_safe():
        out, phi, z = target.forward(X)
        if loss_name in LOSSES:
            check_targets(loss_name, tuple(out.shape), y)
        path = _plan(model, target, loss_name, z, out)
        value, _ = _kappa(path, W, phi, z, out, y, loss_name, loss_fn, gradient == "exact")
    return value / W.shape[1] if normalize == "m" else value


class PenaltyTap:
    """The FAM penalty from *your* training forward pass: no second forward.

    Inside ``with tap:`` a forward hook on the feature layer keeps its input φ and output z;
    :meth:`penalty` then computes κ of the batch from them and the model's output, exactly as
    :func:`penalty` would from its own pass (the same routes and gradients), but on the
    activations of the pass you ran — in training mode if your model is, so with dropout
    masks and batch statistics where :func:`penalty` uses eval mode; they agree for models
    without such layers. The hook lives only inside the ``with`` block. Targets are checked on
    the first call only, so later steps force no host synchronization.

    >>> import torch
    >>> from famviz.models import mlp
    >>> net, X, y = mlp([4, 8, 3], seed=0), torch.randn(16, 4), torch.arange(16) % 3
    >>> tap = PenaltyTap(net, "2")
    >>> with tap:
    ...     out = net(X)
    >>> value = tap.penalty(out, y)
    >>> bool(torch.isclose(value, penalty(net, (X, y), "2")))
    True
    """

    def __init__(self, model: nn.Module, layer: str | None = None, loss="cross_entropy",
                 normalize: str | None = None, gradient: str = "exact"):
        check_option("gradient", gradient, GRADIENTS)
        check_normalize(normalize)
        self.model = model
        self.target = _Target(model, layer)  # the layer's name, the route planning
        self.name = self.target.name
        self.module = model.get_submodule(self.name)
        self.loss_name, self.loss_fn = resolve_loss(loss)
        self.normalize, self.exact = normalize, gradient == "exact"
        self.path: str | None = None
        self._seen: dict = {}
        self._handle = None

    def _hook(self, module, inputs, output):
        if "z" in self._seen:
            raise ValueError(f"layer {self.name!r} ran twice inside one `with` block; the "
                             "penalty needs one forward pass of a layer used once")
        z = output if output.requires_grad else output.detach().requires_grad_(True)
        self._seen.update(phi=inputs[0], z=z)
        return z

    def __enter__(self) -> PenaltyTap:
        self._seen = {}
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None

    def penalty(self, out: Tensor, y: Tensor) -> Tensor:
        """κ of the batch just run (÷ m with ``normalize="m"``) as a differentiable scalar."""
        if "z" not in self._seen:
            raise ValueError(f"layer {self.name!r} has not run: call the model inside "
                             "`with tap:` before tap.penalty(out, y)")
        phi, z = self.target._check(self._seen["phi"]), self._seen["z"]
        self._seen = {}
        if self.loss_name == "cross_entropy" and not y.is_floating_point():
            y = y.long()
        if self.path is None:  # first call: check the targets and plan the route once
            if self.loss_name in LOSSES:
                check_targets(self.loss_name, tuple(out.shape), y)
            self.path = _plan(self.model, self.target, self.loss_name, z, out)
        W = self.module.weight
        value, _ = _kappa(self.path, W, phi, z, out, y, self.loss_name, self.loss_fn,
                          self.exact)
        return value / W.shape[1] if self.normalize == "m" else value


