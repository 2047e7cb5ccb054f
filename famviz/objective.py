"""The objective every measure differentiates: model + loss + data -> E(params).

:class:`Objective` evaluates the mean loss over *all* samples of ``data`` at any name-keyed
parameter dict through :func:`torch.func.functional_call` on a famviz-owned **replica** of the
caller's model (:func:`replicate`: the same modules, hooks and attributes, with parameters and
buffers of its own). The caller's module is only read: no tensor inside it is ever swapped, no
flag flipped and no hook registered, so threads, Ctrl-C and shared weights cannot leave it
changed; its weights, ``.grad``, ``requires_grad`` flags and train/eval modes are exactly as
they were afterwards.

Conventions (docs/math.md):

* ``data`` is one batch ``(X, y)`` or an iterable of batches such as a ``DataLoader``, in any
  form of :mod:`famviz.batches`. It is held as a :class:`famviz.datastream.DataStream`: a
  ``DataLoader`` is re-read on every pass with one batch on the device at a time (memory flat in
  the number of samples, augmentation live), lists and single batches are kept. Reading never
  changes torch's global random state. The loss is the mean over all samples: batch losses
  weighted by batch size.
* ``loss`` is ``"cross_entropy"`` or ``"mse"`` (``torch.nn.functional`` semantics,
  ``reduction="mean"``) or a callable ``(output, target) -> scalar`` that averages over its batch.
* BatchNorm is evaluated in eval mode (running statistics) by default, ``bn="train"`` uses batch
  statistics; dropout is always off. The policy is recorded in every result.
* Precision: the default evaluation dtype is the model's parameter dtype, raised to float32 for
  half-precision (float16 / bfloat16) models: second derivatives and small loss differences are
  not representable in half precision. ``dtype=torch.float64`` gives exact numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import _random
from .batches import OutputError, describe, logits_of, tensors_of
from .datastream import DataStream, as_stream
from .replica import check_model, check_unshared, preserve_global_rng, replicate, shared_names

__all__ = [
    "LOSSES",
    "check_device",
    "check_dtype",
    "check_finite_loss",
    "double_backward_safe",
    "check_targets",
    "BN_POLICIES",
    "Objective",
    "check_option",
    "check_seed",
    "resolve_layer",
    "resolve_params",
    "LayerReusedError",
]

#: named losses; anything else must be a callable
LOSSES = ("cross_entropy", "mse")
#: how BatchNorm layers are evaluated
BN_POLICIES = ("eval", "train")

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def check_seed(seed, name: str = "seed") -> int | None:
    """``seed`` as an exact Python int in ``[0, 2**64)``, or None (see
    :func:`famviz._random.check_seed`: a seed is used exactly or refused, never rounded)."""
    return None if seed is None else _random.check_seed(name, seed)


def check_option(name: str, value, valid: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``valid``, else raise a ValueError listing them."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")
    return value


# ----------------------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------------------- loss


def check_targets(loss_name: str, output_shape: tuple[int, ...], y: Tensor) -> None:
    """Raise a ValueError when targets ``y`` do not fit outputs of ``output_shape`` (N, ...)."""
    n = len(y)
    if loss_name == "cross_entropy":
        if len(output_shape) != 2:
            raise ValueError(
                f"cross_entropy needs model outputs of shape (N, classes), got {output_shape}"
            )
        classes = output_shape[1]
        if y.is_floating_point():
            if tuple(y.shape) != (n, classes):
                raise ValueError(
                    f"cross_entropy with probability targets needs targets of shape "
                    f"({n}, {classes}), got {tuple(y.shape)}"
                )
            # the closed forms (and the meaning of the loss) assume distributions
            if bool((y < 0).any()) or not torch.allclose(
                y.sum(dim=1), torch.ones((), dtype=y.dtype, device=y.device), atol=1e-6
            ):
                raise ValueError(
                    "cross_entropy probability targets must be non-negative and sum to 1 per "
                    "sample; pass class indices (long) for hard labels"
                )
        else:
            if y.ndim != 1:
                raise ValueError(
                    f"cross_entropy needs class-index targets of shape ({n},), "
                    f"got {tuple(y.shape)}"
                )
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= classes:
                raise ValueError(
                    f"data: the targets y range over [{lo}, {hi}] but the model has {classes} "
                    "outputs (class indices must lie in [0, outputs))"
                )
    elif loss_name == "mse":
        if tuple(y.shape) != (n, *output_shape[1:]):
            raise ValueError(
                f"mse needs targets of the output's shape {(n, *output_shape[1:])}, got "
                f"{tuple(y.shape)} (reshape y, e.g. y[:, None], or one-hot encode class labels)"
            )


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, target.to(output.dtype))


def _no_loss(output: Tensor, target: Tensor) -> Tensor:
    raise ValueError("this objective was built with loss=None: it evaluates outputs only")


def resolve_loss(loss) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """Return ``(name, fn)`` for a loss given by name or as a callable; ``None`` gives an
    objective for forward evaluations only (targets are neither checked nor used)."""
    if loss is None:
        return "none", _no_loss
    if callable(loss):
        # never the bare name: a user's function called "mse" is not famviz's MSE, and the
        # closed forms must not treat it as such
        return f"custom:{getattr(loss, '__name__', type(loss).__name__)}", loss
    check_option("loss", loss, LOSSES)
    return loss, {"cross_entropy": F.cross_entropy, "mse": _mse}[loss]


# ---------------------------------------------------------------------------- names and layers


#: dtypes famviz computes in; half precision is raised to float32 (see the module docstring)
COMPUTE_DTYPES = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64,
                "double": torch.float64}


def check_dtype(dtype, model: nn.Module | None = None) -> torch.dtype:
    """The evaluation dtype: ``dtype`` (a torch dtype or its name, ``"float64"``), or by default
    the model's parameter dtype with half precision raised to float32.

    Raises:
        TypeError / ValueError: anything but float32 / float64 (names included), with what to
            pass instead.
    """
    if dtype is None:
        first = next((p for p in model.parameters() if p.is_floating_point()), None) \
            if model is not None else None
        if first is None:
            return torch.get_default_dtype()
        return torch.float32 if first.dtype in _HALF else first.dtype
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: torch.float32, torch.float64 "
                             f"(or their names {', '.join(map(repr, _DTYPE_NAMES))})")
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype such as torch.float64, got "
                        f"{type(dtype).__name__}")
    if dtype in _HALF:
        raise ValueError(f"dtype={dtype} is too coarse for curvature and small loss differences "
                         "(they round to 0); famviz computes in float32 or float64: pass "
                         "dtype=torch.float32 (half-precision models are evaluated in float32 by "
                         "default)")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_device(device) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None), or a ValueError naming it."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None


def double_backward_safe():
    """A context in which attention runs through PyTorch's math kernel: the fused
    scaled-dot-product-attention kernels have no double backward, which Hessian-vector products
    and exact penalty gradients need (a model with attention would otherwise fail there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def check_finite_loss(value: Tensor | float, what: str = "the loss at the model's weights") -> float:
    """``float(value)`` if finite, else a ValueError: a measure computed from a NaN or infinite
    loss would be NaN or meaningless."""
    number = float(value.detach()) if isinstance(value, Tensor) else float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(
            f"{what} is {number}: every measure is computed from it. Check the weights, the "
            "buffers, the data and the loss function (a custom loss must return a finite scalar; "
            "logits of inf give NaN)"
        )
    return number


class LayerReusedError(ValueError):
    """A layer whose inputs and outputs famviz reads ran more than once in one forward pass
    (a module used twice): per-layer closed forms do not apply."""


def resolve_layer(model: nn.Module, layer: str, types: tuple[type, ...] = (nn.Linear,), *,
                  unshared: bool = False) -> nn.Module:
    """The submodule called ``layer``; it must be an instance of one of ``types``.

    With ``unshared``, the layer must also be used under one name only and share no parameter
    with another module (per-layer measures and rescalings are defined for such a layer).

    Raises:
        TypeError: ``layer`` is not a string (layers are chosen by name, never by position).
        ValueError: no such module (the message lists the valid names), the wrong type, or
            (``unshared``) a module used twice or with tied weights.
    """
    check_model(model)
    valid = [n for n, m in model.named_modules() if n and isinstance(m, types)]
    kinds = "/".join(t.__name__ for t in types)
    if not isinstance(layer, str):
        raise TypeError(
            f"layer must be a module name (str) such as {valid[:3]}, got {type(layer).__name__}"
        )
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise ValueError(f"unknown layer {layer!r}; {kinds} layers of this model: {valid}")
    module = modules[layer]
    if not isinstance(module, types):
        raise ValueError(
            f"layer {layer!r} is {type(module).__name__}; only {kinds} layers are supported "
            f"here. {kinds} layers of this model: {valid}"
        )
    if unshared:
        check_unshared(model, layer, module)
    return module


def resolve_params(model: nn.Module, params=None) -> list[str]:
    """Parameter names selected by ``params``.

    ``None`` selects every parameter; a string selects a parameter by name (``"2.weight"``) or
    all parameters of a module (``"2"``); a list selects the union, in model order.
    """
    all_names = [n for n, _ in check_model(model, needs_params=True).named_parameters()]
    if params is None:
        return all_names
    aliases = shared_names(model)  # a tied parameter is selected by any of its names
    wanted = [params] if isinstance(params, str) else list(params)
    if not wanted:
        raise ValueError("params is empty; pass None for all parameters")
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for w in wanted:
        if not isinstance(w, str):
            raise TypeError(f"params must hold names (str), got {type(w).__name__}")
        if w in all_names or w in aliases and aliases[w] in all_names:
            chosen.add(aliases.get(w, w))
        elif w in modules and w:
            names = [aliases.get(f"{w}.{n}", f"{w}.{n}")
                     for n, _ in modules[w].named_parameters(remove_duplicate=False)]
            if not names:
                raise ValueError(f"module {w!r} has no parameters")
            chosen.update(names)
        else:
            layers = sorted({n.rsplit(".", 1)[0] for n in all_names if "." in n})
            raise ValueError(
                f"unknown parameter or layer {w!r}; layers: {layers}; parameters: {all_names}"
            )
    return [n for n in all_names if n in chosen]


# ------------------------------------------------------------------------------------ objective


@dataclass(frozen=True)
class LayerProbe:
    """A module's part in one forward pass: ``calls`` (times it ran), ``phi_ndim`` (axes of
    its first input when it first ran), ``is_output`` (its output is the model's output),
    ``output_sizes``."""

    calls: int
    phi_ndim: int | None
    is_output: bool
    #: the number of elements of its output(s), one entry per call (sizes, not identity:
    #: left out of comparisons)
    output_sizes: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ObjectiveInfo:
    """What an objective was: recorded in every result."""

    loss: str
    num_samples: int
    bn: str
    dtype: str
    device: str


class Objective:
    """Mean loss of ``model`` over ``data``, as a function of name-keyed parameters.

    Args:
        model: any ``nn.Module``; never modified.
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches.
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> scalar``;
            ``None`` for forward evaluations only (features, outputs).
        dtype: evaluate in this floating dtype (e.g. ``torch.float64`` for exactness);
            default: the model's parameter dtype.
        device: default: the model's parameter device.
        bn: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics).

    Attributes:
        params: detached copies of the model's parameters (cast), keyed like
            ``named_parameters()``.
        buffers: copies of the model's buffers (cast where floating).
        batches: the data, a re-iterable :class:`famviz.datastream.DataStream` of ``(X, y)``
            on ``device`` (iterate it; a ``DataLoader`` is re-read on every pass).
        sample: the first sample of the data (``X[:1]``), to learn output shapes from.
        num_samples: N, the number of samples.
    """

    def __init__(self, model: nn.Module, data, loss="cross_entropy", *, dtype=None, device=None,
                 bn: str = "eval"):
        check_model(model, needs_params=True)
        check_option("bn", bn, BN_POLICIES)
        named = list(model.named_parameters())
        dtype = check_dtype(dtype, model)
        device = check_device(device)
        self.device = device if device is not None else named[0][1].device
        self.dtype = dtype
        self.bn = bn
        self.loss_name, self.loss_fn = resolve_loss(loss)
        self.params: dict[str, Tensor] = {}
        for name, p in named:
            t = p.detach().to(
                device=self.device, dtype=dtype if p.is_floating_point() else None, copy=True
            )
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"parameter {name!r} contains NaN or inf")
            self.params[name] = t
        self.buffers: dict[str, Tensor] = {}
        for name, b in model.named_buffers():
            t = b.detach().to(
                device=self.device, dtype=dtype if b.is_floating_point() else None, copy=True
            )
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(
                    f"buffer {name!r} contains NaN or inf (e.g. BatchNorm statistics after a "
                    "diverged training step): every output would be NaN; reset or re-estimate it"
                )
            self.buffers[name] = t
        #: the private replica every evaluation runs on; the caller's ``model`` is only read
        self.model = replicate(model, self.params, self.buffers)
        #: picks the logits from the model's output (``famviz.Batches(..., output_fn=...)``)
        self.output_fn = getattr(data, "output_fn", None)
        self.batches: DataStream = as_stream(data, dtype=dtype, device=self.device,
                                             long_labels=self.loss_name == "cross_entropy")
        self.sample = self.batches.first()[0][:1]
        out = self._check_input()
        has_bn = any(isinstance(m, _BATCHNORM) for m in self.model.modules())

        def check(i, X, y):
            check_targets(self.loss_name, tuple(out.shape), y)
            if bn == "train" and has_bn and len(X) < 2:
                raise ValueError(
                    f"bn='train' normalizes with batch statistics, and batch {i} of data "
                    "holds a single sample (its variance is undefined); use larger batches "
                    "(e.g. drop_last=True) or bn='eval'"
                )

        key = (self.loss_name if self.loss_name in LOSSES else id(self.loss_fn),
               tuple(out.shape[1:]), bn == "train" and has_bn)
        if key not in self.batches.checked:  # objectives sharing a stream check it once
            self.batches.scan(check)
            self.batches.checked.add(key)
        self.num_samples = self.batches.num_samples

    def _check_input(self) -> Tensor:
        """Fail early, with a clear message, on inputs the model cannot take (one forward pass
        on a single sample); return that output, for the targets' shapes. The same pass
        records every module's part in it (:meth:`layer_probe`)."""
        self._draws_rng = False
        seen: dict[str, list] = {}

        def make_hook(name):
            def hook(module, inputs, output):
                entry = seen.setdefault(name, [0, None, None, []])
                entry[0] += 1
                entry[3].append(sum(t.numel() for t in tensors_of(output)))
                if entry[0] == 1:
                    phi = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
                    entry[1], entry[2] = (None if phi is None else phi.ndim), output
            return hook

        handles = [m.register_forward_hook(make_hook(name))
                   for name, m in self.model.named_modules() if name]
        try:
            with torch.no_grad(), preserve_global_rng():
                state = torch.get_rng_state()
                out = self.forward({}, self.sample, bn="eval")  # BatchNorm may see 1 sample
                # a model that draws random numbers when it runs (noise layers, F.dropout in a
                # custom forward) gets every forward pass wrapped so the global RNG stays put
                self._draws_rng = not torch.equal(state, torch.get_rng_state())
        except OutputError:
            raise
        except (RuntimeError, TypeError) as exc:  # shapes, or keyword inputs it does not take
            raise ValueError(f"data: the model cannot evaluate {describe(self.sample)}: "
                             f"{exc}") from exc
        finally:
            for h in handles:
                h.remove()
        self._probes = {name: LayerProbe(calls, phi_ndim, output is out, tuple(sizes))
                        for name, (calls, phi_ndim, output, sizes) in seen.items()}
        #: the shape of the model's output on :attr:`sample`
        self.sample_output_shape = tuple(out.shape)
        return out

    @property
    def sample_output_ndim(self) -> int:
        return len(self.sample_output_shape)

    def layer_probe(self, layer: str) -> LayerProbe:
        """How module ``layer`` took part in the one-sample forward pass made when the
        objective was built: how often it ran, its input's number of axes, whether its output
        is the model's output (a module that did not run: 0 calls)."""
        return self._probes.get(layer, LayerProbe(0, None, False))

    # -- evaluation ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def modes(self, bn: str | None = None) -> Iterator[None]:
        """Temporarily put the model in the evaluation mode of the BN policy (``bn``, default
        the objective's); restore the caller's modes afterwards."""
        bn = self.bn if bn is None else bn
        saved = [(m, m.training) for m in self.model.modules()]
        try:
            for m, _ in saved:
                m.training = bn == "train" and isinstance(m, _BATCHNORM)
            yield
        finally:
            for m, mode in saved:
                m.training = mode

    def forward(self, params: dict[str, Tensor], X: Tensor, bn: str | None = None) -> Tensor:
        """Model output at ``params`` (merged over the stored parameters) for inputs ``X``."""
        merged = {**self.params, **params}
        rng = preserve_global_rng() if self._draws_rng else contextlib.nullcontext()
        args, kwargs = ((X,), None) if isinstance(X, Tensor) else (X.args, X.kwargs)
        with self.modes(bn), rng:
            # buffers are our copies: BatchNorm in train mode may update them, the caller's never
            out = functional_call(self.model, (merged, self.buffers), args, kwargs)
        return logits_of(out, self.output_fn)

    def batch_loss(self, params: dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        out = self.forward(params, X)
        value = self.loss_fn(out, y)
        if not isinstance(value, Tensor) or value.ndim != 0:
            raise ValueError("the loss must return a scalar tensor (use reduction='mean')")
        return value

    def loss(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """E(params): the mean loss over all samples (batch losses weighted by batch size)."""
        params = self.params if params is None else params
        total = None
        for X, y in self.batches:
            term = self.batch_loss(params, X, y) * (len(X) / self.num_samples)
            total = term if total is None else total + term
        return total

    def info(self) -> ObjectiveInfo:
        return ObjectiveInfo(
            loss=self.loss_name,
            num_samples=self.num_samples,
            bn=self.bn,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
        )

    # -- layer features -----------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self, layers: Sequence[str]) -> Iterator[dict[str, dict[str, Tensor]]]:
        """Record each named layer's input ``phi`` and output ``z`` during forward passes.

        The output is replaced by a tensor that autograd can differentiate with respect to, so
        ``torch.autograd.grad(out, captured[layer]["z"], ...)`` backpropagates to the layer's
        outputs. Hooks are removed afterwards, whatever happens (they live on the replica).

        Raises:
            LayerReusedError: a captured layer ran twice in one forward pass (a module used
                twice): its input and output are not one ``phi`` and one ``z``.
        """
        modules = dict(self.model.named_modules())
        captured: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
        handles = []

        def make_hook(name):
            def hook(module, inputs, output):
                if "z" in captured[name]:
                    raise LayerReusedError(
                        f"layer {name!r} runs more than once in one forward pass (the same "
                        "module is used twice); per-layer closed forms do not apply to it"
                    )
                z = output if output.requires_grad else output.detach().requires_grad_(True)
                captured[name]["phi"] = inputs[0]
                captured[name]["z"] = z
                return z

            return hook

        def new_pass(module, inputs):  # slots hold one forward pass each
            for slot in captured.values():
                slot.clear()

        try:
            handles.append(self.model.register_forward_pre_hook(new_pass))
            for name in layers:
                handles.append(modules[name].register_forward_hook(make_hook(name)))
            yield captured
        finally:
            for h in handles:
                h.remove()
