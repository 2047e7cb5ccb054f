"""What a batch of data and a model's output may be.

A batch is read into model inputs and targets ``y``:

* ``(X, y)`` with ``X`` a tensor (or array): the model is called as ``model(X)``;
* ``(X, y)`` with ``X`` a tuple or list of tensors: positional inputs, ``model(*X)``;
* ``(X, y)`` with ``X`` a dict: keyword inputs, ``model(**X)``;
* a dict with a ``"labels"`` entry (the HuggingFace convention): the other entries are the
  keyword inputs, ``model(**rest)``;
* anything else through ``Batches(data, batch_fn=...)``, where ``batch_fn(batch)`` returns one
  of the forms above.

A model's output is used as logits when it is a tensor, a dict with a ``"logits"`` entry, or an
object with a ``logits`` attribute (HuggingFace's ``ModelOutput``); ``Batches(data,
output_fn=...)`` covers the rest (``output_fn(output) -> Tensor``).

Multi-tensor inputs are carried as :class:`Inputs`, which slices, moves and casts all of its
tensors together; single-tensor inputs stay plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Batches", "Inputs", "OutputError", "concat", "describe", "logits_of", "split_batch"]

FORMS = ("(X, y) with X a tensor, a tuple of tensors (positional inputs) or a dict (keyword "
         "inputs), or a dict with a 'labels' entry (HuggingFace)")


@dataclass(frozen=True)
class Inputs:
    """The model inputs of one batch: ``model(*args, **kwargs)``.

    Tensors whose first axis has the batch's length are per-sample and are sliced with the
    batch; other values (flags, shared tensors) are passed as they are.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def values(self) -> list:
        return [*self.args, *self.kwargs.values()]

    def tensors(self) -> list[Tensor]:
        return [v for v in self.values() if isinstance(v, Tensor)]

    def __len__(self) -> int:
        for t in self.tensors():
            if t.ndim > 0:
                return len(t)
        raise ValueError("the batch's inputs hold no tensor with a sample axis")

    def _map(self, fn) -> Inputs:
        n = len(self)

        def one(v):
            return fn(v) if isinstance(v, Tensor) and v.ndim > 0 and len(v) == n else v

        return Inputs(tuple(one(v) for v in self.args), {k: one(v) for k, v in self.kwargs.items()})

    def __getitem__(self, index: slice) -> Inputs:
        return self._map(lambda t: t[index])

    def to(self, *, dtype=None, device=None) -> Inputs:
        """Every tensor moved to ``device``; floating ones cast to ``dtype``."""

        def move(v):
            if not isinstance(v, Tensor):
                return v
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

        return Inputs(tuple(move(v) for v in self.args),
                      {k: move(v) for k, v in self.kwargs.items()})

    def call(self, fn: Callable):
        return fn(*self.args, **self.kwargs)


def concat(xs: list) -> Tensor | Inputs:
    """The inputs of several batches as one: tensors concatenated along the sample axis (for
    :class:`Inputs`, every per-sample tensor; other values are the first batch's)."""
    if all(isinstance(x, Tensor) for x in xs):
        return torch.cat(xs)
    if not all(isinstance(x, Inputs) for x in xs):
        raise TypeError("batches mix single-tensor and multi-tensor inputs")
    first, n = xs[0], len(xs[0])

    def join(values):
        v0 = values[0]
        if isinstance(v0, Tensor) and v0.ndim > 0 and len(v0) == n:
            return torch.cat(values)
        return v0

    return Inputs(tuple(join([x.args[i] for x in xs]) for i in range(len(first.args))),
                  {k: join([x.kwargs[k] for x in xs]) for k in first.kwargs})


def describe(X) -> str:
    """A short description of a batch's inputs for error messages (a tensor's shape per
    sample; every input's full shape)."""
    if isinstance(X, Tensor):
        return f"inputs X of shape {tuple(X.shape[1:])} (per sample)"
    parts = [f"{tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__ for v in X.args]
    parts += [f"{k}={tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
              for k, v in X.kwargs.items()]
    return "inputs (" + ", ".join(parts) + ")"


def _is_tensorish(a) -> bool:
    return isinstance(a, Tensor) or (hasattr(a, "shape") and hasattr(a, "__array__"))


def _as_tensor(a, what: str) -> Tensor:
    if isinstance(a, Tensor):
        return a
    try:
        return torch.as_tensor(a)
    except Exception as exc:
        raise TypeError(f"{what} must be a tensor or array, got {type(a).__name__}") from exc


def is_single_batch(data) -> bool:
    """True when ``data`` is one batch rather than an iterable of batches: ``(X, y)`` whose
    ``y`` is a tensor/array and whose ``X`` is a tensor/array, a dict or a tuple of tensors, or
    a dict with ``"labels"``. (A list of two batches has pairs where ``y`` would be.)"""
    if isinstance(data, Mapping):
        return "labels" in data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    X, y = data
    if _is_tensorish(X):
        return True
    if not _is_tensorish(y):
        return False
    return isinstance(X, Mapping) or (isinstance(X, (tuple, list)) and len(X) > 0
                                      and all(_is_tensorish(v) for v in X))


def split_batch(batch, index: int) -> tuple[Tensor | Inputs, Tensor]:
    """``(inputs, y)`` of one raw batch, or a TypeError that says what was seen."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(
                f"batch {index} of data is a dict without a 'labels' entry (keys "
                f"{sorted(map(str, batch))[:8]}); famviz reads {FORMS}; pass "
                "famviz.Batches(data, batch_fn=...) for other forms"
            )
        rest = {k: v for k, v in batch.items() if k != "labels"}
        return Inputs((), rest), _as_tensor(batch["labels"], "labels")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"batch {index} of data is a {type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
            f"famviz reads {FORMS}; pass famviz.Batches(data, batch_fn=...) for other forms"
        )
    X, y = batch
    y = _as_tensor(y, "y")
    if isinstance(X, Inputs):  # a batch famviz has read already (a DataStream's)
        return X, y
    if isinstance(X, Mapping):
        return Inputs((), dict(X)), y
    if isinstance(X, (tuple, list)) and not _is_tensorish(X):
        if not any(_is_tensorish(v) for v in X) or not all(
                _is_tensorish(v) or not isinstance(v, (tuple, list, Mapping)) for v in X):
            raise TypeError(
                f"batch {index} of data: X is a {type(X).__name__} that is not a tuple of "
                f"tensors; famviz reads {FORMS}"
            )
        return Inputs(tuple(_as_tensor(v, "X") if _is_tensorish(v) else v for v in X)), y
    return _as_tensor(X, "X"), y


def tensors_of(output) -> list[Tensor]:
    """The tensors of a module's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in tensors_of(o)]
    return []


class OutputError(TypeError):
    """famviz cannot find the logits in a model's output."""


def logits_of(output, output_fn: Callable | None = None) -> Tensor:
    """The logits in a model's output: the output itself when it is a tensor, its ``"logits"``
    entry or ``logits`` attribute, or ``output_fn(output)``."""
    if output_fn is not None:
        output = output_fn(output)
        if not isinstance(output, Tensor):
            raise OutputError(f"output_fn must return a tensor, got {type(output).__name__}")
        return output
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise OutputError(
        f"the model returned a {type(output).__name__}; famviz uses a tensor, a dict with a "
        "'logits' entry or an object with a .logits attribute as the logits: pass "
        "famviz.Batches(data, output_fn=lambda out: ...) that picks the logits"
    )


class Batches(Iterable):
    """``data`` read with a ``batch_fn`` and/or a model ``output_fn``, and whether famviz keeps
    it; re-iterable whenever ``data`` is (a ``DataLoader``, a list).

    Args:
        data: any iterable of batches (or one batch).
        batch_fn: ``batch -> (X, y)`` or a dict with ``"labels"`` (see the module docstring).
        output_fn: ``model output -> logits tensor``.
        cache: read ``data`` once and keep its batches (on the evaluation device): every pass
            of a computation then sees the same samples, and a ``DataLoader``'s random
            augmentation is frozen. Default: a ``DataLoader`` is re-read on every pass, one
            batch in memory at a time (see :mod:`famviz.datastream`).

    >>> import torch
    >>> raw = [{"pixels": torch.zeros(2, 3), "target": torch.tensor([0, 1])}]
    >>> data = Batches(raw, batch_fn=lambda b: (b["pixels"], b["target"]))
    >>> [tuple(x.shape) for x, _ in data]
    [(2, 3)]
    """

    def __init__(self, data, *, batch_fn: Callable | None = None,
                 output_fn: Callable | None = None, cache: bool = False):
        for name, fn in (("batch_fn", batch_fn), ("output_fn", output_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be True or False, got {cache!r}")
        self.data = data
        self.batch_fn = batch_fn
        self.output_fn = output_fn
        self.cache = cache

    def __iter__(self) -> Iterator:
        source = [self.data] if is_single_batch(self.data) else self.data
        for batch in source:
            yield self.batch_fn(batch) if self.batch_fn is not None else batch
