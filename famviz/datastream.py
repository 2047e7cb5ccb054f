"""The data an objective reads: cast, checked batches, re-read on every pass.

:class:`DataStream` turns a user's ``data`` (one batch, a list of batches, a ``DataLoader``,
``famviz.Batches``; every form of :mod:`famviz.batches`) into an iterable of ``(X, y)`` batches
on the evaluation device and dtype. Two ways to hold it:

* **kept** — one batch, a list or tuple of batches, and iterators (which can be read only once)
  are read once and kept: they are in memory already, and every pass sees the same batches;
* **live** — any other re-iterable (a ``DataLoader``, ``famviz.Batches`` over one) is iterated
  again on every pass, with one batch on the device at a time: memory stays flat in the number
  of samples, and a random augmentation stays live (each pass sees fresh draws, as in
  training). ``famviz.Batches(loader, cache=True)`` keeps such data instead (every pass then
  sees the same augmented samples).

A live stream reads the data under a **private random state** (:class:`RngStream`): iterating a
``DataLoader`` and augmenting samples draws from torch's global generator, so the stream swaps
its own state in around each read and the caller's global state is exactly as before. The
private state starts as a copy of the global state when the stream is made, so a call is
reproducible, and it advances from pass to pass. Every pass must deliver the same number of
samples (the mean loss weighs batches by their size); a pass that does not is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from .batches import FORMS, Batches, Inputs, describe, is_single_batch, split_batch
from .replica import RngStream, preserve_global_rng

__all__ = ["DataStream", "as_stream", "prepare_batch", "read_batches"]

Batch = tuple[Tensor | Inputs, Tensor]


def _check_data(data) -> None:
    if data is None or not (is_single_batch(data) or (
            isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)))):
        raise TypeError(f"data must be one batch or an iterable of batches ({FORMS}), got "
                        f"{'None' if data is None else type(data).__name__}")


def prepare_batch(batch, index: int, *, dtype=None, device=None,
                  long_labels: bool = False) -> Batch | None:
    """One raw batch as ``(X, y)`` on ``device``: floating inputs and targets cast to ``dtype``
    (integer inputs such as token ids kept), checked; None for a batch without samples.

    Raises:
        ValueError: inputs and y of different lengths, a 0-d X, or NaN/inf in them.
        TypeError: a batch in none of the forms famviz reads.
    """
    X, y = split_batch(batch, index)
    if isinstance(X, Tensor) and X.ndim == 0:
        raise ValueError(f"data, batch {index}: X is a 0-d tensor; it needs a sample axis")
    if y.ndim == 0 or len(X) != len(y):
        raise ValueError(
            f"data, batch {index}: {len(X)} samples of {describe(X)}, but y has shape "
            f"{tuple(y.shape)}; they need the same number of samples along the first axis"
        )
    if len(X) == 0:
        return None
    X = X.to(device=device, dtype=dtype if X.is_floating_point() else None) \
        if isinstance(X, Tensor) else X.to(dtype=dtype, device=device)
    for t in [X] if isinstance(X, Tensor) else X.tensors():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"data, batch {index}: X contains NaN or inf; clean the data first")
    if y.is_floating_point():
        y = y.to(device=device, dtype=dtype)
        if not torch.isfinite(y).all():
            raise ValueError(f"data, batch {index}: y contains NaN or inf; clean the data first")
    else:
        # class indices of any integer (or bool) dtype, as F.cross_entropy needs them
        y = y.to(device=device, dtype=torch.long if long_labels else None)
    return X, y


def _is_iterator(data) -> bool:
    """True for data that can be read only once (a generator; ``Batches`` over one). Never
    calls ``iter()``: a ``DataLoader`` draws from the global generator when iterated."""
    inner = data.data if isinstance(data, Batches) else None
    return isinstance(data, Iterator) or isinstance(inner, Iterator)


def _exhausted_or_empty(data) -> ValueError:
    if _is_iterator(data):
        return ValueError(
            "data is an iterator that holds no batches (any more): famviz may read data more "
            "than once (e.g. normalize_features=True). Pass a list of batches, a DataLoader "
            "or (X, y) instead of a generator"
        )
    return ValueError("data is empty: it holds no samples")


def read_batches(data, *, dtype=None, device=None, long_labels: bool = False) -> list[Batch]:
    """Read ``data`` once into a list of prepared batches (see :func:`prepare_batch`); reading
    it leaves torch's global random state as it was."""
    _check_data(data)
    raw = [data] if is_single_batch(data) else data
    with preserve_global_rng():
        items = list(raw)
    batches = [b for i, item in enumerate(items)
               if (b := prepare_batch(item, i, dtype=dtype, device=device,
                                      long_labels=long_labels)) is not None]
    if not batches:
        raise _exhausted_or_empty(data)
    return batches


class DataStream(Iterable):
    """Re-iterable ``(X, y)`` batches of ``data`` (see the module docstring).

    Args:
        data: one batch or an iterable of batches in any form of :mod:`famviz.batches`.
        dtype, device: floating inputs and targets are cast to ``dtype`` and everything moved
            to ``device``.
        long_labels: cast integer targets to ``torch.long`` (class indices).
        rng: the private random state live data is read under (default: a copy of the global
            state now, see :class:`famviz.replica.RngStream`).

    Attributes:
        live: True when the data is re-read on every pass.
        num_samples, num_batches, min_batch, max_batch: the number of samples and batches and
            the sizes of the smallest and largest batch, counted by :meth:`scan` (0 before it).
    """

    def __init__(self, data, *, dtype=None, device=None, long_labels: bool = False,
                 rng: RngStream | None = None):
        _check_data(data)
        self.dtype, self.device, self.long_labels = dtype, device, long_labels
        self.output_fn = getattr(data, "output_fn", None)
        kept = (is_single_batch(data) or isinstance(data, (list, tuple))
                or getattr(data, "cache", False) or _is_iterator(data))
        self.live = not kept
        self._data = data
        self._rng = (rng or RngStream()) if self.live else None
        self._kept = None if self.live else read_batches(
            data, dtype=dtype, device=device, long_labels=long_labels)
        self.num_samples = self.num_batches = self.min_batch = self.max_batch = 0
        #: keys of the checks a full pass has made (an Objective's target checks), so that
        #: several objectives on one stream check it once
        self.checked: set = set()

    def scan(self, check: Callable | None = None) -> None:
        """One pass over the data: count its samples and batches, and call ``check(index, X,
        y)`` on every batch (e.g. to check targets before any long work)."""
        sizes = []
        for i, (X, y) in enumerate(self):
            if check is not None:
                check(i, X, y)
            sizes.append(len(X))
        if not sizes:
            raise _exhausted_or_empty(self._data)
        self.num_samples, self.num_batches = sum(sizes), len(sizes)
        self.min_batch, self.max_batch = min(sizes), max(sizes)

    def _read(self) -> Iterator:
        """The raw batches of one pass over live data, each read under the private state."""
        with self._rng.active():
            it = iter(self._data)
        while True:
            with self._rng.active():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        if not self.live:
            yield from self._kept
            return
        seen = 0
        for i, raw in enumerate(self._read()):
            batch = prepare_batch(raw, i, dtype=self.dtype, device=self.device,
                                  long_labels=self.long_labels)
            if batch is None:
                continue
            seen += len(batch[0])
            yield batch
        if self.num_samples and seen != self.num_samples:
            raise ValueError(
                f"data delivered {seen} samples on one pass and {self.num_samples} on the first: "
                "famviz reads data once per pass and needs the same number of samples every "
                "time (a DataLoader over a fixed dataset gives it; a stream that grows or "
                "shrinks does not)"
            )

    def first(self) -> Batch:
        """The first batch (reads only that batch of live data)."""
        batches = iter(self)
        try:
            return next(batches)
        except StopIteration:
            raise _exhausted_or_empty(self._data) from None
        finally:
            batches.close()


def as_stream(data, *, dtype=None, device=None, long_labels: bool = False) -> DataStream:
    """``data`` as a :class:`DataStream`; a stream with the same settings is shared as is."""
    if isinstance(data, DataStream) and (data.dtype, data.device, data.long_labels) == (
            dtype, device, long_labels):
        return data
    return DataStream(data, dtype=dtype, device=device, long_labels=long_labels)
