"""A slice's grid split across the workers of a ``concurrent.futures.Executor`` (a process pool,
or Dask distributed's ``Client.get_executor()`` on a cluster), as the loss-landscape reference
code splits it across MPI ranks.

Each worker rebuilds the batched engine from the model, the data and the directions and
evaluates a contiguous run of grid points. The runs are cut at multiples of the engine's own
chunk size, so every point is computed in the same batched call as in the serial engine and the
values are identical to it, bit for bit (with the same number of torch threads: one on each
worker, unless told otherwise).
"""

from __future__ import annotations

import math
from concurrent.futures import Executor, as_completed

import numpy as np
import torch

__all__ = ["evaluate", "DEFAULT_PIECES"]

#: pieces a grid is cut into by default (a few per worker keeps workers busy to the end)
DEFAULT_PIECES = 16


def _evaluate_rows(job: dict, coords: np.ndarray, threads: int):
    """On a worker: the engines of ``job`` (the arguments of ``_prepare``) on ``coords``."""
    from .slices import _prepare

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engines = _prepare(**job)
        return [e.evaluate(coords) for e in engines]
    finally:
        torch.set_num_threads(before)


def evaluate(engines, job: dict, coords: np.ndarray, executor: Executor, *,
             pieces: int | None = None, threads: int = 1, progress: bool = False):
    """Like evaluating every engine on ``coords`` in this process, on ``executor``.

    Args:
        engines: the engines built here (for their chunk sizes).
        job: keyword arguments of ``slices._prepare`` (model, data, directions, ...), sent to
            each worker.
        coords: (P, k) grid coordinates.
        pieces: how many runs of points to cut the grid into (default
            :data:`DEFAULT_PIECES`); each run is a multiple of the engines' chunk size.
        threads: torch threads on each worker.

    Returns:
        One ``(loss, accuracy)`` pair of arrays per engine, in grid order.
    """
    if not isinstance(executor, Executor):
        raise TypeError("executor must be a concurrent.futures.Executor (e.g. "
                        "ProcessPoolExecutor(2) or distributed.Client().get_executor()), got "
                        f"{type(executor).__name__}")
    pieces = DEFAULT_PIECES if pieces is None else pieces
    if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
        raise ValueError(f"pieces must be a positive int, got {pieces!r}")
    unit = math.lcm(*(e.chunk for e in engines))
    units = math.ceil(len(coords) / unit)
    per = math.ceil(units / min(pieces, units)) * unit
    bounds = [(s, min(s + per, len(coords))) for s in range(0, len(coords), per)]
    futures = {executor.submit(_evaluate_rows, job, coords[a:b], threads): k
               for k, (a, b) in enumerate(bounds)}
    parts: dict[int, list] = {}
    done = as_completed(futures)
    if progress:
        from tqdm.auto import tqdm

        done = tqdm(done, total=len(futures), desc="slice", unit="piece")
    try:
        for future in done:
            parts[futures[future]] = future.result()
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    out = []
    for e in range(len(engines)):
        loss = np.concatenate([parts[k][e][0] for k in range(len(bounds))])
        acc = np.concatenate([parts[k][e][1] for k in range(len(bounds))])
        out.append((loss, acc))
    return out
