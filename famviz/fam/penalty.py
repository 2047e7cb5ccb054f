"""The FAM penalty: relative flatness κ of a feature layer on a batch, as a differentiable
scalar (routes and gradients in the package docstring of :mod:`famviz.fam`); the model's
own forward pass reused by :class:`PenaltyTap`.

The curvature comes from the Gauss-Newton pull-back of :mod:`famviz.curvature`
(:func:`~famviz.curvature.pull_back`, :class:`~famviz.curvature.Pullback`) and, for a layer
applied at several positions (a Conv2d, a Linear on (N, ..., F) inputs), from
:func:`famviz.patches.position_traces` — the same code that :func:`famviz.relative_flatness`
runs, here kept in the autograd graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..batches import OutputError, concat, describe, is_single_batch, logits_of, split_batch
from ..curvature import Pullback, _sequential_leaves, piecewise_linear_after, pull_back
from ..datastream import read_batches
from ..objective import (
    LOSSES,
    check_option,
    check_targets,
    double_backward_safe,
    resolve_layer,
    resolve_loss,
)
from ..patches import LAYER_TYPES, check_layer, patches, position_traces, weight_shape
from ..piecewise import piecewise_linear_graph
from ..replica import check_model, replicate, shared_names
from ._args import check_normalize

#: how the FAM penalty is differentiated
GRADIENTS = ("exact", "frozen")
#: how :func:`penalty` computes κ (see the module docstring)
PENALTY_PATHS = ("softmax", "mse", "gauss_newton", "hvp")
#: the "hvp" route takes (d·P)² · N entries of Hessian-vector products for a layer with d
#: outputs at P > 1 positions on N samples; beyond this many (1 GiB in float64) it refuses
MAX_HVP_ENTRIES = 2**27
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


def _layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """The feature layer: a Linear or a Conv2d with groups=1 (:mod:`famviz.patches`)."""
    name = last_linear(model) if layer is None else layer
    module = resolve_layer(model, name, LAYER_TYPES, unshared=True)
    check_layer(module, name)
    return name, module


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


class _Target:
    """The feature layer of a model and how to run the model so that the layer's input
    ``phi`` and output ``z`` are captured.

    A plain (nested) ``nn.Sequential`` stack that uses the layer once
    (:func:`famviz.curvature._sequential_leaves`) is run leaf by leaf, which is what its forward
    does, without registering a hook (registering and removing one costs about as much as a
    small layer's forward pass). Any other model is run whole, with a temporary forward hook
    on the layer."""

    def __init__(self, model: nn.Module, layer: str | None):
        self.name, _ = _layer(model, layer)
        # a replica holding the caller's Parameter objects: gradients reach them, while the
        # hook and the evaluation modes are set on modules the caller never sees
        self.model = model = replicate(model, share=True)
        self.module = model.get_submodule(self.name)
        self.output_fn = None  # set from famviz.Batches(..., output_fn=...) by the caller
        self.leaves: list[nn.Module] | None = None
        self.index = -1
        leaves = _sequential_leaves(model)
        if leaves is not None:
            hits = [i for i, (_, m) in enumerate(leaves) if m is self.module]
            if len(hits) == 1:
                self.leaves, self.index = [m for _, m in leaves], hits[0]

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
            return h, phi, z
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
        return out, store["phi"], store["z"]


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
    X = read_batches(batch, dtype=W.dtype, device=W.device)[0][0][:1]
    target.output_fn = getattr(batch, "output_fn", None)
    with torch.no_grad(), _eval_modes(target.model):
        out, _, z = target.forward(X)
    return _plan(model, target, loss_name, z, out)


# ------------------------------------------------------------------------------- the penalty


def _matrix(module: nn.Module) -> Tensor:
    """The layer's weight as the d×m matrix W of κ (a view: gradients reach the weight)."""
    W = module.weight
    return W if W.ndim == 2 else W.flatten(1)


def _positions(module: nn.Module, phi: Tensor) -> bool:
    """True when the layer applies its weight at several positions per sample (a Conv2d, a
    Linear on (N, ..., F) inputs): then T couples positions (:mod:`famviz.patches`)."""
    return isinstance(module, nn.Conv2d) or phi.ndim > 2


def _hvp_traces(module: nn.Module, phi: Tensor, z: Tensor, out: Tensor, y: Tensor, loss_fn,
                exact: bool) -> Tensor:
    r"""T from Hessian-vector products in the layer's output z, for any loss:
    :math:`T_{ss'} = \sum_n \sum_{p,q} \langle\phi_{n,p}, \phi_{n,q}\rangle\,
    \partial^2 E / \partial z_{n,sp}\,\partial z_{n,s'q}` (docs/conv.md; for a Linear on
    (N, m) inputs :math:`T = \sum_n \|\phi_n\|^2 \partial^2E/\partial z_n^2`). The gradient
    in z, then one batched (vmapped) backward pass of the d·P unit vectors of one sample's z,
    given to every sample at once — samples must not interact (a mean of per-sample losses,
    BatchNorm on running statistics). Kept in the graph when ``exact``."""
    N = len(z)
    count = z[0].numel()  # d * P
    d = weight_shape(module)[0]
    if count > d and count * count * N > MAX_HVP_ENTRIES:
        raise ValueError(
            f"the FAM penalty of this {type(module).__name__} layer needs {count} "
            f"Hessian-vector products per sample (outputs × positions) on {N} samples here: "
            "too large. The Gauss-Newton route needs none: cross-entropy or MSE with only "
            "piecewise-linear operations after the layer (ReLU, pooling, BatchNorm, Linear, "
            "Conv2d, residual additions; see fam.penalty_path). Choose such a layer or loss, "
            "or a smaller batch"
        )
    E = loss_fn(out, y)
    if not isinstance(E, Tensor) or E.ndim != 0:
        raise ValueError("the loss must return a scalar tensor (use reduction='mean')")
    (g,) = torch.autograd.grad(E, z, create_graph=True, retain_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:  # the loss is at most linear in z
        return torch.zeros(d, d, dtype=z.dtype, device=z.device)
    eye = torch.eye(count, dtype=z.dtype, device=z.device).reshape(count, 1, *z.shape[1:])
    (HV,) = torch.autograd.grad(g, z, grad_outputs=eye.expand(count, *z.shape),
                                is_grads_batched=True, create_graph=exact, retain_graph=True,
                                allow_unused=True)
    if HV is None:
        return torch.zeros(d, d, dtype=z.dtype, device=z.device)
    Phi = patches(module, phi)  # (N, P, m)
    K = Phi @ Phi.transpose(1, 2)  # (N, P, P): <phi_np, phi_nq>
    P = K.shape[1]
    # H[j, n, p, s] = (d^2 E / dz_n dz_n) e_j at output (s, p); j runs over z[0]'s entries
    H = HV.reshape(count, N, d, P).transpose(2, 3) if isinstance(module, nn.Conv2d) else \
        HV.reshape(count, N, P, d)
    # j = (s', q): channel-major for a Conv2d's (d, H, W), position-major for a Linear's
    H = H.reshape(d, P, N, P, d) if isinstance(module, nn.Conv2d) else \
        H.reshape(P, d, N, P, d).transpose(0, 1)
    return torch.einsum("npq,tqnps->st", K, H)  # [s, s'] = sum K[n,p,q] H[s',q,n,p,s]


def _curvature(path: str, module: nn.Module, phi: Tensor, z: Tensor, out: Tensor, y: Tensor,
               loss_name: str, loss_fn, exact: bool, want: str = "kappa") -> tuple[Tensor, int]:
    r"""κ (``want="kappa"``) or T (``want="T"``, d×d, symmetric, detached) on one batch from
    the captured tensors, and the number of extra backward passes it took.

    κ is differentiable in the layer's weight always, and with ``exact`` also in everything
    T depends on (φ, the layers above through the curvature); without it T's inputs are
    detached, so κ's gradient is :math:`2TW` on W only. T is what the frozen training step
    needs (it adds :math:`2\lambda TW` to W's gradient itself)."""
    N = len(phi)
    ph = phi if exact else phi.detach()
    if path == "hvp":
        T = _hvp_traces(module, ph, z, out, y, loss_fn, exact)
        T, backwards = (T + T.T) / 2, 2
    elif not _positions(module, phi):  # one vector per sample: the Pullback of curvature.py
        if path == "gauss_newton":
            (delta,) = pull_back(out, [z], loss_name, create_graph=exact, retain_graph=True)
            pb, backwards = Pullback(ph, delta, None, loss_name), 1
        else:  # "softmax" / "mse": the layer's output is the model's output
            pb, backwards = Pullback(ph, None, out if exact else out.detach(), loss_name), 0
        w = ph.square().sum(dim=1) / N
        if want == "T":
            return pb.gram(w).detach(), backwards
        return pb.kappa(_matrix(module), w), backwards
    elif path == "mse":  # the output at several positions, MSE over all D entries: G = (2/D) I
        s = (2.0 / (out[0].numel() * N)) * patches(module, ph).square().sum()
        T, backwards = torch.eye(len(module.weight), dtype=s.dtype, device=s.device) * s, 0
    elif path == "gauss_newton":
        (g,) = pull_back(out, [z], loss_name, create_graph=exact, retain_graph=True)
        T, _ = position_traces(module, g, ph)
        T, backwards = (T + T.T) / (2 * N), 1
    else:  # pragma: no cover - the softmax route needs (N, classes) outputs: one position
        raise AssertionError(path)
    if not exact:
        T = T.detach()
    if want == "T":
        return T, backwards
    W = _matrix(module)
    return ((W @ W.T) * T).sum(), backwards


def _plan(model: nn.Module, target: _Target, loss_name: str, z: Tensor, out: Tensor) -> str:
    """The route for this model/layer/loss, given one captured forward pass. The Gauss-Newton
    route needs only piecewise-linear operations after the layer: read off a plain stack
    (:func:`famviz.curvature.piecewise_linear_after`) or, for any other model, off its torch.fx
    graph (:func:`famviz.piecewise.piecewise_linear_graph`, traced on the replica: residual
    blocks, BatchNorm on running statistics — every layer of a ReLU ResNet), as
    :func:`famviz.relative_flatness` decides its closed form."""
    if loss_name not in LOSSES:
        return "hvp"
    if z is out:
        return "softmax" if loss_name == "cross_entropy" else "mse"
    if target.leaves is not None:
        if piecewise_linear_after(model, target.name, "eval"):
            return "gauss_newton"
    elif not shared_names(target.model) and piecewise_linear_graph(target.model, target.name,
                                                                   "eval"):
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
    A Conv2d layer is the Linear map of its weight, reshaped to (out_channels,
    in_channels·kh·kw), on unfolded patches; its T couples the positions that share the weight
    (docs/conv.md) — the same view as :func:`famviz.relative_flatness`.

    The forward pass runs on a famviz replica of the model's modules that holds the model's own
    parameters, so ``(loss + lam * penalty(...)).backward()`` fills the ``.grad`` of the live
    model, and nothing else about the model changes: the replica runs with dropout off and
    BatchNorm on running statistics (as :func:`famviz.relative_flatness` evaluates) while the
    model's own modes, hooks and buffers are never touched. See the module docstring for the three
    routes (``"softmax"``/``"mse"`` closed forms, ``"gauss_newton"``, ``"hvp"``) and their cost.
    The route is planned on every call (for a hidden layer of a model that is not a plain
    ``nn.Sequential``, from a torch.fx trace: a few milliseconds); :class:`PenaltyTap` plans
    once and reuses your forward pass.

    Args:
        model: the network.
        batch: ``(X, y)`` (or an iterable of batches, concatenated). One batch is checked
            for NaN/inf and out-of-range targets on its device (``torch._assert_async``: no
            host synchronization; on the CPU a ValueError at once); an iterable of batches is
            checked on the host.
        layer: name of an ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``) module; ``None``: the
            last ``nn.Linear`` (:func:`last_linear`).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> scalar`` that
            averages per-sample losses (the ``"hvp"`` route assumes samples do not interact).
        normalize: ``None`` (κ, the paper's measure) or ``"m"`` (κ / m, m = in_features, a
            Conv2d's in_channels·kh·kw).
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
    X, y = _batch(batch, W.dtype, W.device)
    target.output_fn = getattr(batch, "output_fn", None)
    if loss_name == "cross_entropy" and not y.is_floating_point():
        y = y.long()  # class indices of any integer dtype (or bool)
    with torch.enable_grad(), _eval_modes(target.model), double_backward_safe():
        out, phi, z = target.forward(X)
        if loss_name in LOSSES:
            _check_targets_on_device(loss_name, tuple(out.shape), y)
        path = _plan(model, target, loss_name, z, out)
        value, _ = _curvature(path, target.module, phi, z, out, y, loss_name, loss_fn,
                              gradient == "exact")
    return value / weight_shape(target.module)[1] if normalize == "m" else value


def _on_device(ok: Tensor, message: str, explain: Callable[[], None] | None = None) -> None:
    """Raise a ValueError unless the 0-dim boolean ``ok`` is True, without a host
    synchronization: on an accelerator the check is queued on the device
    (``torch._assert_async``), and a failure stops its work with ``message`` (a device-side
    assertion, as an out-of-range label in ``F.cross_entropy`` raises there); on the CPU it is
    checked at once, and ``explain`` (if given) raises the detailed error."""
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        if bool(ok):  # a backend without device-side assertions: checked on the host
            return
        if explain is not None:
            explain()
        raise ValueError(message) from None


def _batch(batch, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """``(X, y)`` of one batch, floating-point tensors cast to the layer's dtype and device
    and checked for NaN/inf on the device (:func:`_on_device`: no host synchronization). An
    iterable of batches is read by :func:`famviz.datastream.read_batches` (checked on the host)
    and concatenated."""
    if not is_single_batch(batch):
        batches = read_batches(batch, dtype=dtype, device=device)
        return concat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    X, y = split_batch(batch, 0)
    if isinstance(X, Tensor) and X.ndim == 0 or y.ndim == 0 or len(X) != len(y) or not len(y):
        return _batch([batch], dtype, device)  # read_batches says what is wrong
    X = X.to(device=device, dtype=dtype if X.is_floating_point() else None) \
        if isinstance(X, Tensor) else X.to(dtype=dtype, device=device)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else None)
    for what, t in [("X", x) for x in ([X] if isinstance(X, Tensor) else X.tensors())] + \
            [("y", y)]:
        if t.is_floating_point():
            _on_device(torch.isfinite(t).all(), f"batch: {what} contains NaN or inf; clean "
                       "the data first")
    return X, y


def _check_targets_on_device(loss_name: str, shape: tuple[int, ...], y: Tensor) -> None:
    """:func:`famviz.objective.check_targets` without a host synchronization: shapes are
    checked at once, the values of class indices and probability targets on the device
    (:func:`_on_device`; on the CPU with check_targets' own message)."""
    if loss_name != "cross_entropy" or len(shape) != 2 or (
            y.ndim != 1 if not y.is_floating_point() else tuple(y.shape) != (len(y), shape[1])):
        check_targets(loss_name, shape, y)  # shapes only (MSE) or a shape error
        return
    if y.is_floating_point():
        ok = (y >= 0).all() & torch.isclose(y.sum(dim=1), torch.ones_like(y[:, 0]),
                                             atol=1e-6).all()
        message = "cross_entropy probability targets must be non-negative and sum to 1"
    else:
        ok = (y >= 0).all() & (y < shape[1]).all()
        message = f"the targets y must be class indices in [0, {shape[1]})"
    _on_device(ok, message, lambda: check_targets(loss_name, shape, y))


class PenaltyTap:
    """The FAM penalty from *your* training forward pass: no second forward.

    Inside ``with tap:`` a forward hook on the feature layer keeps its input φ and output z;
    :meth:`penalty` then computes κ of the batch from them and the model's output, exactly as
    :func:`penalty` would from its own pass (the same routes and gradients), but on the
    activations of the pass you ran — in training mode if your model is, so with dropout
    masks and batch statistics where :func:`penalty` uses eval mode; they agree for models
    without such layers. The hook lives only inside the ``with`` block. The layer may be a
    Linear or a Conv2d (as in :func:`penalty`). Targets are checked and the route planned on the
    first call only: later steps read nothing back to the host (no device synchronization).

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
        phi, z = self._seen["phi"], self._seen["z"]
        self._seen = {}
        if self.loss_name == "cross_entropy" and not y.is_floating_point():
            y = y.long()
        if self.path is None:  # first call: check the targets and plan the route once
            if self.loss_name in LOSSES:
                check_targets(self.loss_name, tuple(out.shape), y)
            self.path = _plan(self.model, self.target, self.loss_name, z, out)
        value, _ = _curvature(self.path, self.module, phi, z, out, y, self.loss_name,
                              self.loss_fn, self.exact)
        return value / weight_shape(self.module)[1] if self.normalize == "m" else value


