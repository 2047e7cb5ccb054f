"""How famviz reads a caller's model without ever changing it.

* :func:`check_model`: a module whose tensors hold values.
* :func:`replicate`: a famviz-owned replica — the same modules, hooks and attributes (a deep
  copy), with parameters and buffers of its own. Every evaluation runs on one, so threads,
  Ctrl-C and hooks cannot leave the caller's module changed (``functional_call`` on the
  caller's module would swap tensors inside it).
* :func:`shared_names`, :func:`check_unshared`: modules used twice and tied weights, which
  per-layer closed forms and rescalings must know about.
* :func:`preserve_global_rng`, :class:`RngStream`: reading a user's ``DataLoader`` (or
  running a model that draws random numbers) without moving torch's global random state.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["RngStream", "check_model", "check_unshared", "preserve_global_rng", "replicate",
           "shared_names"]


def check_model(model, name: str = "model", *, needs_params: bool = False) -> nn.Module:
    """``model`` if it is an ``nn.Module`` whose tensors hold values (none on the meta
    device) and, with ``needs_params``, that has at least one parameter."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    for what, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for tname, t in items:
            if t.is_meta:
                raise ValueError(
                    f"{name}: {what} {tname!r} is on the meta device and holds no values; "
                    "materialize the model first (model.to_empty(device=...) and load_state_dict)"
                )
    if needs_params and next(iter(model.parameters()), None) is None:
        raise ValueError(f"{name} has no parameters: there is nothing to measure")
    return model


def shared_names(model: nn.Module) -> dict[str, str]:
    """Every parameter or module name that reaches an object also reached under another name
    (weight tying, a module used twice): ``{alias: first name}``. Empty for ordinary models."""
    aliases: dict[str, str] = {}
    for items in (model.named_modules(remove_duplicate=False),
                  model.named_parameters(remove_duplicate=False)):
        first: dict[int, str] = {}
        for name, obj in items:
            if id(obj) in first:
                aliases[name] = first[id(obj)]
            else:
                first[id(obj)] = name
    return aliases


#: the dicts of hooks a module keeps; a replica gets its own copies (hooks registered on the
#: replica never reach the caller's module)
_HOOK_DICTS = tuple(
    name for name in vars(nn.Module()) if name.endswith("_hooks") or "_hooks_" in name
)


def replicate(model: nn.Module, params: dict[str, Tensor] | None = None,
              buffers: dict[str, Tensor] | None = None, *, share: bool = False) -> nn.Module:
    """A famviz-owned replica of ``model``: the same module structure, hooks and attributes,
    with parameters, buffers, flags and hook tables of its own.

    Its parameters are ``params`` (name-keyed like ``named_parameters()``; default: detached
    aliases of the model's, which share memory and are never written) and its buffers
    ``buffers`` (default: copies). Tied parameters and modules used twice stay tied in the
    replica. Evaluating, hooking or switching modes on the replica never touches ``model``.

    Each module is copied shallowly (a new object with a copy of its attribute dict, as
    ``copy.copy`` makes), its parameter, buffer, submodule and hook tables rebuilt: cheap for
    large models, and no attribute needs to be deep-copyable. Other attributes (configs,
    constants) are the model's own objects, which famviz only reads.

    With ``share``, the replica holds the model's own ``Parameter`` and buffer objects (for
    training-time computations whose gradient must reach them, evaluated in eval mode so no
    buffer is written); only its modules, flags and hooks are separate.
    """
    check_model(model)
    tensors: dict[int, object] = {}
    for name, p in model.named_parameters():
        if share:
            tensors[id(p)] = p
            continue
        t = p.detach() if params is None else params[name]
        tensors[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad and t.is_floating_point())
    for name, b in model.named_buffers():
        tensors[id(b)] = b if share else b.detach().clone() if buffers is None else buffers[name]
    modules: dict[int, nn.Module] = {}

    def copy_module(m: nn.Module) -> nn.Module:
        if id(m) in modules:  # a module used twice stays one module
            return modules[id(m)]
        new = copy.copy(m)
        modules[id(m)] = new
        state = new.__dict__
        state["_parameters"] = {k: None if v is None else tensors[id(v)]
                                for k, v in m._parameters.items()}
        state["_buffers"] = {k: None if v is None else tensors[id(v)]
                             for k, v in m._buffers.items()}
        state["_modules"] = {k: None if v is None else copy_module(v)
                             for k, v in m._modules.items()}
        for name in (*_HOOK_DICTS, "_non_persistent_buffers_set"):
            if name in state:
                state[name] = type(state[name])(state[name])
        for key, value in list(state.items()):
            # a tensor a hook computes from parameters (weight_norm's weight) is recomputed
            # at every forward pass; the replica's starts detached
            if isinstance(value, Tensor) and value.grad_fn is not None:
                state[key] = value.detach()
        return new

    try:
        return copy_module(model)
    except Exception as exc:
        raise TypeError(
            f"famviz evaluates a private replica of the model's modules so that the model "
            f"itself is never changed, and copying {type(model).__name__} failed "
            f"({type(exc).__name__}: {exc}); for torch.compile, pass model._orig_mod"
        ) from exc


def check_unshared(model: nn.Module, name: str, module: nn.Module) -> None:
    """Raise a ValueError when ``module`` (called ``name``) is registered under a second name
    (used twice) or shares a parameter with another module (tied weights)."""
    own = {id(p) for p in module.parameters(recurse=False)}
    for other_name, other in model.named_modules(remove_duplicate=False):
        if other is module and other_name != name:
            raise ValueError(
                f"layer {name!r} is the same module as {other_name!r} (used twice); a per-layer "
                "measure or rescaling is defined for a layer that is used once"
            )
        if other is not module and any(id(p) in own for p in other.parameters(recurse=False)):
            raise ValueError(
                f"a parameter of layer {name!r} is shared with module {other_name!r} (tied "
                "weights); a per-layer measure or rescaling would also act on that module"
            )


_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Run a block that may draw from torch's global generators (iterating a user's
    ``DataLoader`` draws its base seed there; a dataset's augmentation may draw more) and put
    their states back afterwards, also on error. famviz's own blocks hold one lock, so two
    threads running famviz cannot restore each other's states in the wrong order."""
    with _RNG_LOCK:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = list(range(torch.cuda.device_count())) if cuda else []
        with torch.random.fork_rng(devices=devices):
            yield


class RngStream:
    """A private copy of torch's global random state, swapped in around a block: the block
    draws from (and advances) the private state, and the global state is put back afterwards,
    also on error. It starts as a copy of the global state when made (CPU, and CUDA devices
    already initialized), so code run in it draws what it would have drawn outside, without
    moving the caller's generator; with ``seed``, the CPU state starts from that seed instead
    (``torch.manual_seed`` semantics). Used to read a user's ``DataLoader`` (shuffling, worker
    seeds, augmentation) pass after pass."""

    def __init__(self, seed: int | None = None) -> None:
        self._cpu = (torch.get_rng_state() if seed is None
                     else torch.Generator().manual_seed(seed).get_state())
        self._cuda = torch.cuda.get_rng_state_all() if _cuda_initialized() else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The block draws from this private state; the global state is put back after."""
        with _RNG_LOCK:  # a `with`, not acquire/try: no point where an interrupt leaks it
            cuda = _cuda_initialized()
            saved = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
            try:
                torch.set_rng_state(self._cpu)
                if cuda and self._cuda is not None:
                    torch.cuda.set_rng_state_all(self._cuda)
                yield
            finally:
                self._cpu = torch.get_rng_state()
                if cuda:
                    self._cuda = torch.cuda.get_rng_state_all()
                    torch.cuda.set_rng_state_all(saved[1])
                torch.set_rng_state(saved[0])


def _cuda_initialized() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()
