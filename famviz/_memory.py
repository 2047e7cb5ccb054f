"""Memory budgets: the one default, its validation, and chunk planning.

A ``memory_budget`` (bytes) bounds what an algorithm keeps alive *besides* the model and one
batch's graph: chunks of probe vectors, a Lanczos basis, blocks of a wide layer's Hessian. The
planning functions turn a budget into a number of rows per chunk; results do not depend on it
(the same numbers in a different grouping), only memory and speed do.
"""

from __future__ import annotations

import math
import numbers
import tempfile

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "MemoryBudgetError",
    "check_memory_budget",
    "rows_per_chunk",
    "chunks",
    "VectorStore",
    "nbytes",
]

#: default memory budget in bytes: of one evaluation chunk and the result grid (landscapes), of
#: the vectors the curvature algorithms hold at once (probes, Lanczos basis, Hessian blocks)
DEFAULT_MEMORY_BUDGET = 1 << 30


class MemoryBudgetError(TypeError, ValueError):
    """A ``memory_budget`` that is not an int number of bytes (a TypeError, as the landscape
    functions raise, and a ValueError like every other bad budget)."""


def check_memory_budget(memory_budget) -> int:
    """``memory_budget`` as an int > 0, else an error that names it."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        raise MemoryBudgetError(
            f"memory_budget must be an int number of bytes (e.g. 2 << 30), got "
            f"{type(memory_budget).__name__} {memory_budget!r}")
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")
    return int(memory_budget)


def rows_per_chunk(row_bytes: int, memory_budget: int, *, copies: int = 1,
                   cap: int | None = None) -> int:
    """How many rows of ``row_bytes`` bytes fit in ``memory_budget`` when ``copies`` buffers of
    that many rows are alive at once; at least 1 (a single row is the least any algorithm
    needs), at most ``cap``."""
    rows = max(1, memory_budget // max(1, copies * row_bytes))
    return rows if cap is None else max(1, min(cap, rows))


def chunks(total: int, size: int):
    """``(start, stop)`` of consecutive chunks of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


class VectorStore:
    """A growing list of at most ``capacity`` vectors of one length, dtype and device, holding
    at most ``memory_budget`` bytes of them on the device (at least one row at a time): when
    they do not all fit, the rows past the resident ones go to a temporary file (in
    ``tempfile.gettempdir()``, i.e. ``$TMPDIR``: the host's page cache and disk, not the
    process's memory; a tmpfs there is RAM) and are read back in chunks of a quarter of the
    budget, for every pass over the rows.

    Only what a Lanczos basis needs: ``append``, ``coefficients(w) = Q w`` and
    ``combine(c) = Q^T c`` over the rows ``start:``, each one pass over the rows in order.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device, memory_budget: int, capacity: int):
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self.row_bytes = nbytes((dim,), dtype)
        fit = memory_budget // self.row_bytes  # rows the budget holds
        if capacity <= fit:
            self.chunk, resident = max(1, capacity), capacity
        else:  # resident rows plus one chunk read back from the file stay within the budget
            self.chunk = max(1, fit // 4)
            resident = max(0, fit - self.chunk)
        self._resident = torch.empty(resident, dim, dtype=dtype, device=self.device)
        self._n = 0
        self._file = None
        self._buffer = None
        self._spilled = 0

    def __len__(self) -> int:
        return self._n + self._spilled

    @property
    def spilled(self) -> int:
        """Rows held in the file."""
        return self._spilled

    def append(self, v: Tensor) -> None:
        if self._n < len(self._resident):
            self._resident[self._n] = v
            self._n += 1
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="famviz-basis-")
        self._file.seek(self._spilled * self.row_bytes)
        self._file.write(v.detach().to("cpu").contiguous().view(torch.uint8).numpy())
        self._spilled += 1

    def blocks(self, start: int = 0, stop: int | None = None):
        """The rows ``start:stop`` as (r, dim) matrices on the device, in order: views of the
        resident rows, then chunks read back from the file into one reused buffer (each valid
        until the next one is read)."""
        res = self._n
        stop = len(self) if stop is None else min(stop, len(self))
        for a, b in chunks(max(0, min(stop, res) - start), self.chunk):
            yield self._resident[start + a:start + b]
        first = max(start, res) - res
        for a, b in chunks(max(0, stop - res - first), self.chunk):
            if self._buffer is None:  # allocated once: no fresh pages to fault in per read
                self._buffer = torch.empty(self.chunk * self.row_bytes, dtype=torch.uint8)
            buf = self._buffer[:(b - a) * self.row_bytes]
            self._file.seek((first + a) * self.row_bytes)
            self._file.readinto(buf.numpy())
            yield buf.view(self.dtype).reshape(b - a, self.dim).to(self.device)

    def coefficients(self, w: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """:math:`Q w` for the rows ``start:stop`` (a vector of their length)."""
        parts = [Q @ w for Q in self.blocks(start, stop)]
        return torch.cat(parts) if parts else w.new_zeros(0)

    def combine(self, c: Tensor, start: int = 0) -> Tensor:
        """:math:`Q^\\top c` for the rows ``start:start + len(c)``, ``c`` of shape (rows,) or
        (rows, k)."""
        out, pos = None, 0
        for Q in self.blocks(start, start + len(c)):
            part = c[pos:pos + len(Q)]
            pos += len(Q)
            if out is None:
                out = Q.T @ part
            elif part.ndim == 1:
                out.addmv_(Q.T, part)  # in place: no new vector per chunk
            else:
                out.addmm_(Q.T, part)
        if out is None:
            return torch.zeros(self.dim, *c.shape[1:], dtype=self.dtype, device=self.device)
        return out

    def close(self) -> None:
        """Delete the file (if any); the store is empty afterwards."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buffer = None
        self._resident, self._n, self._spilled = self._resident[:0], 0, 0


def nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
