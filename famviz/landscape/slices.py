"""1-D and 2-D loss-surface slices (Li et al. 2018), computed by a batched grid engine.

A slice evaluates :math:`E(\\theta + \\sum_i c_i d_i)` on a grid of coordinates ``c``. The
engine keeps the data on the device once and evaluates many grid points per call with
:func:`torch.func.vmap` (no per-point data loading), in chunks sized to a memory budget. For an
``nn.Sequential`` whose first parameterized layer is ``nn.Linear`` it also uses that the first
layer is linear in the coordinates: :math:`X(W+\\sum_i c_i D_i)^\\top =
XW^\\top + \\sum_i c_i\\, XD_i^\\top`, so those products are formed once and only combined per
point.

Conventions: ``values[i, j]`` is the value at ``(x[i], y[j])``; the centre (all coordinates 0)
is always a grid point and its value is the loss of the unchanged model; the model itself is
never modified.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from .._memory import DEFAULT_MEMORY_BUDGET, check_memory_budget
from .._progress import check_progress
from ..curvature import _sequential_leaves
from ..objective import Objective, check_device, check_dtype
from ..replica import preserve_global_rng, replicate
from .directions import Direction, check_direction, interpolation_direction

__all__ = [
    "Slice1D",
    "Slice2D",
    "slice_1d",
    "slice_2d",
    "slice_2d_progressive",
    "interpolate",
    "grid_axis",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_STEPS",
    "MAX_GRID_POINTS",
]

#: most points on one axis (far beyond a figure's resolution: a typo such as steps=10**7 would
#: run for hours)
MAX_STEPS = 10_001
#: most points in one grid (a 2001 x 2001 plane fits)
MAX_GRID_POINTS = 1 << 22
#: one grid point's memory: this many times its largest activation (a residual block holds its
#: input, the current and the next output), plus its weights
_ACTIVATION_FACTOR = 3


# ------------------------------------------------------------------------------------- grids


def grid_axis(span, steps: int, name: str = "span") -> np.ndarray:
    """Coordinates ``linspace(lo, hi, steps)`` with the centre 0 exactly on the grid.

    Raises:
        TypeError: ``steps`` is not an int.
        ValueError: ``steps < 2`` or more than :data:`MAX_STEPS`, ``lo >= hi``, or 0 not on the
        grid (for a symmetric span use an odd number of steps).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__} {steps!r}")
    if steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps={steps} is more than MAX_STEPS={MAX_STEPS} points on one axis; "
                         "use fewer steps (for detail, a narrower span)")
    steps = int(steps)
    if isinstance(span, (str, bytes)):
        raise ValueError(f"{name} must be a pair (min, max), got {span!r}")
    try:
        lo, hi = (float(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max), got {span!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"{name} needs finite min < max, got ({lo}, {hi})")
    if not lo <= 0 <= hi:
        raise ValueError(f"{name} ({lo}, {hi}) must contain 0, the unperturbed model")
    pos = -lo / (hi - lo) * (steps - 1)
    k = round(pos)
    if abs(pos - k) > 1e-9:
        raise ValueError(
            f"0 is not on the grid of {steps} steps over ({lo}, {hi}); the centre must be a grid "
            "point: use an odd number of steps for a symmetric span"
        )
    axis = np.linspace(lo, hi, steps)
    axis[k] = 0.0
    return axis


# ----------------------------------------------------------------------------------- engine


#: parameter-free modules that act elementwise (or not at all) on (N, features) inputs, so the
#: batched engine can apply them to (points, N, features) stacks unchanged
_ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus,
    nn.Identity, nn.Dropout,  # dropout is off in famviz evaluations
)
#: grid points per batched evaluation in the Linear-stack engine: small enough that the
#: (points, N, width) activations stay near the cache (measured: 4-16 equally fast, 64+ 3x slower)
LINEAR_STACK_CHUNK = 8
#: most grid points per ``vmap`` call: larger stacks were slower per point, not faster (a
#: non-Sequential 64-128-64-10 MLP on the 1797 digits, 1 thread: 16 points 0.96 ms each, 64
#: points 2.3 ms, 256 points 2.4 ms)
VMAP_CHUNK = 16
#: ``vmap`` only when one grid point's activations (all leaf modules' outputs over the largest
#: data batch) hold at most this many elements. Batching points helps where the per-point ops
#: are small and their overhead dominates; above this the ops are large already, and vmap is
#: slower than a loop while holding a chunk of points' activations at once (measured on 1
#: thread: a digits CNN with 1.2e5 elements per point 1.2 vs 1.8 ms per point, vmap faster;
#: with 1.1e6 and 2.1e6 elements the loop was 1.2x faster; the narrow CIFAR ResNet of
#: benchmarks/scale.py, 5e7 elements, 0.25 s per point looped against 0.65 s with vmap, and
#: 3.4 GB more memory for a vmapped 11 x 11 grid on ResNet-18)
VMAP_MAX_ACTIVATIONS = 1 << 19


class _Engine:
    """Evaluates mean loss and accuracy at many points ``theta + C @ D`` at once.

    Three strategies, chosen per model (``mode``):

    * ``"linear-stack"``: an ``nn.Sequential`` of Linear layers and elementwise activations. The
      first layer's products with θ and the directions are formed once per data batch; a chunk
      of P points then costs one small GEMM to combine them and a ``baddbmm`` per later layer
      with per-point weights :math:`W + \\sum_i c_i D_i`.
    * ``"vmap"``: any other model whose activations per point are small
      (:data:`VMAP_MAX_ACTIVATIONS`), :func:`torch.func.vmap` over points of ``functional_call``.
    * ``"loop"``: one point at a time, like a hand-written ``functional_call`` loop (models with
      large activations such as CNNs on images, BatchNorm with batch statistics, or ops without
      a vmap rule).
    """

    def __init__(self, obj: Objective, directions: Sequence[Mapping[str, Tensor]],
                 memory_budget: int):
        self.obj = obj
        self.names = list(obj.params)
        self.theta = obj.params
        self.dirs = [{n: d[n].to(device=obj.device, dtype=obj.dtype) for n in self.names}
                     for d in directions]
        self.classify = (obj.loss_name == "cross_entropy"
                         and not obj.batches.first()[1].is_floating_point())
        self.loss_fn = obj.loss_fn
        self.stack = None
        self.activations = self._activation_elements()
        if obj.bn == "train":  # batch statistics per point
            self.mode = "loop"
        else:
            self.stack = self._linear_stack()
            if self.stack is not None:
                self.mode = "linear-stack"
            else:
                self.mode = "vmap" if self.activations <= VMAP_MAX_ACTIVATIONS else "loop"
        self.chunk = self._chunk_size(memory_budget)

    # -- strategy --------------------------------------------------------------------------

    def _linear_stack(self):
        """For a Sequential of Linear layers and elementwise activations: the layers, each as
        (name, stacked [theta, d_1, ..., d_k] weights and biases), and the first layer's
        products per data batch."""
        leaves = _sequential_leaves(self.obj.model)
        if leaves is None or not isinstance(leaves[0][1], nn.Linear):
            return None
        ops = []
        for name, m in leaves:
            if isinstance(m, nn.Linear):
                w, b = f"{name}.weight", f"{name}.bias"
                W = torch.stack([self.theta[w]] + [d[w] for d in self.dirs])
                B = (torch.stack([self.theta[b]] + [d[b] for d in self.dirs])
                     if b in self.theta else None)
                ops.append(("linear", W, B))
            elif isinstance(m, _ELEMENTWISE):
                if not isinstance(m, (nn.Identity, nn.Dropout)):
                    ops.append(("act", m, None))
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                continue  # a no-op on (N, features) inputs
            else:
                return None
        if self.obj.batches.live or any(not isinstance(X, Tensor) or X.ndim != 2
                                        for X, _ in self.obj.batches):
            return None  # the first layer's products are kept per batch: kept data only
        _, W0, B0 = ops[0]
        first = [torch.einsum("nm,kdm->knd", X, W0) + (B0[:, None, :] if B0 is not None else 0)
                 for X, _ in self.obj.batches]  # (1 + k, N_b, d) per batch
        return ops[1:], first

    def _activation_elements(self) -> int:
        """Elements of one grid point's activations: every leaf module's outputs on one sample
        (read off the objective's one-sample pass), times the largest data batch. Sets
        ``peak``: the largest single output times that batch (evaluations run without a graph,
        so a point holds a few such tensors at a time, not all of them)."""
        counts = [size for name, m in self.obj.model.named_modules()
                  if name and not any(True for _ in m.children())
                  for size in self.obj.layer_probe(name).output_sizes]
        out = math.prod(self.obj.sample_output_shape)
        self.n_max = self.obj.batches.max_batch
        self.peak = self.n_max * max(counts + [out])
        return self.n_max * max(sum(counts), out)

    def _chunk_size(self, budget: int) -> int:
        itemsize = torch.finfo(self.obj.dtype).bits // 8
        per_point = _ACTIVATION_FACTOR * self.peak * itemsize + sum(
            t.numel() for t in self.theta.values()) * itemsize
        n_max = self.n_max
        if per_point > budget:
            raise ValueError(
                f"one grid point needs about {per_point / 2**20:.0f} MiB (batch of {n_max} "
                f"samples), more than memory_budget={budget / 2**20:.0f} MiB: pass smaller "
                "batches or raise memory_budget"
            )
        chunk = max(1, budget // per_point)
        return min(chunk, LINEAR_STACK_CHUNK if self.mode == "linear-stack" else VMAP_CHUNK)

    # -- evaluation ------------------------------------------------------------------------

    def _point_params(self, c: Tensor) -> dict[str, Tensor]:
        out = {}
        for n in self.names:
            t = self.theta[n]
            for ci, d in zip(c, self.dirs):
                t = t + ci * d[n]
            out[n] = t
        return out

    def _stats(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = self.loss_fn(out, y)
        if self.classify:
            acc = (out.argmax(-1) == y).to(out.dtype).mean()
        else:
            acc = torch.zeros((), dtype=out.dtype, device=out.device)
        return loss, acc

    def _stack_chunk(self, cc: Tensor, b: int, y: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and accuracy of P points (``cc`` = (P, 1 + k) with a leading 1) on batch b."""
        ops, first = self.stack
        h = torch.einsum("pk,knd->pnd", cc, first[b])
        for kind, A, B in ops:
            if kind == "act":
                h = h.relu_() if type(A) is nn.ReLU else A(h)  # h is ours: relu in place
            else:
                W = torch.einsum("pk,kod->pod", cc, A)
                h = (torch.baddbmm((cc @ B)[:, None, :], h, W.transpose(1, 2)) if B is not None
                     else torch.bmm(h, W.transpose(1, 2)))
        if self.classify:
            # one max serves the log-sum-exp and the accuracy; a sample counts as correct when
            # its true logit attains the maximum (argmax differs only on exact float ties, and
            # over 10 classes costs 6x more than amax here)
            top = h.amax(-1, keepdim=True)
            lse = (h - top).exp_().sum(-1).log_().add_(top.squeeze(-1))
            true = h.gather(2, y.expand(len(cc), -1)[..., None]).squeeze(-1)
            return (lse - true).mean(1), (true >= top.squeeze(-1)).to(h.dtype).mean(1)
        loss = torch.stack([self.loss_fn(o, y) for o in h])
        return loss, torch.zeros_like(loss)

    def _eval_chunk(self, C: Tensor) -> tuple[Tensor, Tensor]:
        N = self.obj.num_samples
        loss = torch.zeros(len(C), dtype=self.obj.dtype, device=self.obj.device)
        acc = torch.zeros_like(loss)
        if self.mode == "loop":  # each point's weights formed once, then every batch
            for i, c in enumerate(C):
                params = self._point_params(c)
                for X, y in self.obj.batches:
                    l_b, a_b = self._stats(self.obj.forward(params, X), y)
                    w = len(X) / N
                    loss[i] += w * l_b
                    acc[i] += w * a_b
            return loss, acc
        # the leading 1 multiplies theta (C[:, :1] would be empty without directions)
        cc = torch.cat([C.new_ones(len(C), 1), C], dim=1)
        for b, (X, y) in enumerate(self.obj.batches):
            if self.mode == "linear-stack":
                l_b, a_b = self._stack_chunk(cc, b, y)
            else:  # vmap

                def point(c, X=X, y=y):
                    return self._stats(self.obj.forward(self._point_params(c), X), y)

                l_b, a_b = vmap(point)(C)
            w = len(X) / N
            loss += w * l_b
            acc += w * a_b
        return loss, acc

    @torch.no_grad()
    def evaluate(self, coords: np.ndarray, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Mean loss and accuracy at each row of ``coords`` (P, k)."""
        C = torch.as_tensor(coords, dtype=self.obj.dtype, device=self.obj.device)
        chunks = range(0, len(C), self.chunk)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="slice", unit="chunk")
        losses, accs = [], []
        with self.obj.modes():
            for start in chunks:
                C_chunk = C[start : start + self.chunk]
                try:
                    l, a = self._eval_chunk(C_chunk)
                except RuntimeError:
                    if self.mode != "vmap":
                        raise
                    self.mode = "loop"  # an op without a vmap rule: go point by point
                    l, a = self._eval_chunk(C_chunk)
                losses.append(l)
                accs.append(a)
        return torch.cat(losses).cpu().double().numpy(), torch.cat(accs).cpu().double().numpy()


# ----------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Slice1D:
    """A 1-D slice: ``values[i]`` is the loss at ``x[i]`` along the direction.

    ``accuracy`` is None unless the loss is cross-entropy with class labels; ``test_*`` are None
    without ``test_data``. ``meta`` holds JSON-serializable provenance: the direction's kind,
    normalization and seed, loss, number of samples, BatchNorm policy, dtype, span, engine and
    seconds.
    """

    x: np.ndarray
    values: np.ndarray
    accuracy: np.ndarray | None
    test_values: np.ndarray | None
    test_accuracy: np.ndarray | None
    centre_loss: float
    meta: dict = field(default_factory=dict)

    @property
    def centre_index(self) -> int:
        return int(np.flatnonzero(self.x == 0)[0])


@dataclass(frozen=True)
class Slice2D:
    """A 2-D slice: ``values[i, j]`` is the loss at ``(x[i], y[j])`` — the first axis runs along
    the first direction. Other fields as in :class:`Slice1D`."""

    x: np.ndarray
    y: np.ndarray
    values: np.ndarray
    accuracy: np.ndarray | None
    test_values: np.ndarray | None
    test_accuracy: np.ndarray | None
    centre_loss: float
    meta: dict = field(default_factory=dict)

    @property
    def centre_index(self) -> tuple[int, int]:
        return int(np.flatnonzero(self.x == 0)[0]), int(np.flatnonzero(self.y == 0)[0])


# --------------------------------------------------------------------------------- front door


def _check_args(dtype, device) -> None:
    """The Objective's dtype and device checks, made before the grid work is planned."""
    check_dtype(dtype)
    check_device(device)


def _prepare(model, data, test_data, directions, loss, dtype, device, bn, memory_budget):
    for i, d in enumerate(directions):
        check_direction(model, d, what=f"direction {i + 1}" if len(directions) > 1 else "direction")
    check_memory_budget(memory_budget)
    _check_args(dtype, device)
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    engines = [_Engine(obj, directions, memory_budget)]
    if test_data is not None:
        tobj = Objective(model, test_data, loss, dtype=dtype, device=device, bn=bn)
        engines.append(_Engine(tobj, directions, memory_budget))
    return engines


def _describe(d) -> dict:
    return d.describe() if isinstance(d, Direction) else {"kind": "custom"}


def _meta(engines, directions, span, steps, seconds) -> dict:
    info = engines[0].obj.info()
    return {
        "directions": [_describe(d) for d in directions],
        "loss": info.loss,
        "num_samples": info.num_samples,
        "num_test_samples": engines[1].obj.num_samples if len(engines) > 1 else 0,
        "bn": info.bn,
        "dtype": info.dtype,
        "span": [list(map(float, s)) for s in span],
        "steps": list(steps),
        "engine": engines[0].mode,
        "seconds": seconds,
    }


def _evaluate_all(engines, coords, progress, results=None):
    check_progress(progress)
    if results is None:  # else computed elsewhere (an executor's workers)
        results = [e.evaluate(coords, progress) for e in engines]
    train_l, train_a = results[0]
    test_l, test_a = results[1] if len(results) > 1 else (None, None)
    has_acc = engines[0].classify
    return train_l, train_a if has_acc else None, test_l, (test_a if has_acc else None)


def slice_1d(model: nn.Module, data, direction: Mapping[str, Tensor], span=(-1.0, 1.0),
             steps: int = 51, *, test_data=None, loss="cross_entropy", dtype=None, device=None,
             bn: str = "eval", memory_budget: int = DEFAULT_MEMORY_BUDGET,
             progress: bool = False) -> Slice1D:
    """The loss along one direction, :math:`E(\\theta + x\\,d)` for ``x`` on a grid over ``span``.

    Args:
        model: the network (never modified).
        data: ``(X, y)`` or an iterable of batches; ``test_data`` likewise, evaluated in the
            same call.
        direction: a name-keyed dict over all parameters (e.g. :func:`random_direction`).
        span: ``(min, max)`` containing 0; ``steps`` grid points (0 must be one of them: odd
            ``steps`` for a symmetric span).
        loss, dtype, device, bn: as everywhere in famviz.
        memory_budget: bytes one evaluation chunk may use; a grid point that alone needs more
            is refused with a clear error, as is a grid whose coordinates and results need
            more.
        progress: show a tqdm bar.

    Raises:
        ValueError: a direction without the model's parameter names and shapes, a bad span,
            ``steps`` above :data:`MAX_STEPS`, a grid over the memory budget, bad data or
            options. All are checked before any evaluation.
    """
    x = grid_axis(span, steps)
    _check_grid_memory(len(x), test_data is not None, memory_budget, dims=1)
    t0 = time.perf_counter()
    engines = _prepare(model, data, test_data, [direction], loss, dtype, device, bn,
                       memory_budget)
    train_l, train_a, test_l, test_a = _evaluate_all(engines, x[:, None], progress)
    centre = float(train_l[int(np.flatnonzero(x == 0)[0])])
    meta = _meta(engines, [direction], [span], [len(x)], time.perf_counter() - t0)
    return Slice1D(x, train_l, train_a, test_l, test_a, centre, meta)


def _axes_2d(span, steps):
    """``((xspan, yspan), (nx, ny))`` from a shared or per-axis ``span`` and ``steps``."""
    if isinstance(span, (str, bytes)) or not hasattr(span, "__len__") or len(span) != 2:
        raise ValueError(f"span must be (min, max) or ((xmin, xmax), (ymin, ymax)), got {span!r}")
    spans = (span, span) if all(np.ndim(s) == 0 for s in span) else tuple(span)
    if isinstance(steps, (tuple, list, np.ndarray)):
        if len(steps) != 2:
            raise ValueError(f"steps must be an int or a pair (nx, ny), got {steps!r}")
        st = tuple(steps)
    else:
        st = (steps, steps)
    return spans, st


def slice_2d(model: nn.Module, data, d1: Mapping[str, Tensor], d2: Mapping[str, Tensor],
             span=(-1.0, 1.0), steps=41, *, test_data=None, loss="cross_entropy", dtype=None,
             device=None, bn: str = "eval", memory_budget: int = DEFAULT_MEMORY_BUDGET,
             progress: bool = False, executor=None) -> Slice2D:
    """The loss on a plane, ``values[i, j]`` = :math:`E(\\theta + x_i d_1 + y_j d_2)`.

    ``span`` is ``(min, max)`` for both axes or ``((xmin, xmax), (ymin, ymax))``; ``steps`` an
    int or ``(nx, ny)``. ``executor``: a ``concurrent.futures.Executor`` (a process pool, Dask's
    ``Client.get_executor()``) that evaluates the grid in pieces on its workers, one torch thread
    each, with values identical to this process's (:mod:`famviz.landscape.parallel`); the
    model, data and directions must be picklable. Other arguments as in :func:`slice_1d`.

    >>> import torch, famviz as fv
    >>> m = fv.models.mlp([4, 8, 3], seed=0)
    >>> X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    >>> y = torch.arange(32) % 3
    >>> d1, d2 = fv.landscape.random_direction(m, seed=1), fv.landscape.random_direction(m, seed=2)
    >>> s = slice_2d(m, (X, y), d1, d2, steps=(5, 3))
    >>> s.values.shape, s.centre_index
    ((5, 3), (2, 1))
    >>> bool(abs(s.values[2, 1] - torch.nn.functional.cross_entropy(m(X), y).item()) < 1e-6)
    True
    """
    spans, st = _axes_2d(span, steps)
    x, y = grid_axis(spans[0], st[0], "x span"), grid_axis(spans[1], st[1], "y span")
    _check_grid_memory(len(x) * len(y), test_data is not None, memory_budget)
    t0 = time.perf_counter()
    engines = _prepare(model, data, test_data, [d1, d2], loss, dtype, device, bn, memory_budget)
    coords = np.stack(np.meshgrid(x, y, indexing="ij"), axis=-1).reshape(-1, 2)
    shape = (len(x), len(y))
    if executor is None:
        res = _evaluate_all(engines, coords, progress)
    else:
        from .parallel import evaluate

        # the batches as read here: a DataLoader is read once, and needs no pickling
        batches = [e.obj.batches for e in engines] + [None]
        job = {"model": model, "data": batches[0], "test_data": batches[1],
               "directions": [d1, d2],
               "loss": loss, "dtype": dtype, "device": device, "bn": bn,
               "memory_budget": memory_budget}
        res = _evaluate_all(engines, coords, progress,
                            results=evaluate(engines, job, coords, executor, progress=progress))
    train_l, train_a, test_l, test_a = (None if r is None else r.reshape(shape) for r in res)
    i, j = int(np.flatnonzero(x == 0)[0]), int(np.flatnonzero(y == 0)[0])
    meta = _meta(engines, [d1, d2], spans, st, time.perf_counter() - t0)
    return Slice2D(x, y, train_l, train_a, test_l, test_a, float(train_l[i, j]), meta)


def _check_grid_memory(points: int, with_test: bool, budget: int, dims: int = 2) -> None:
    """Refuse, before any work, a grid of more than :data:`MAX_GRID_POINTS` points or whose
    coordinates (``dims`` per point, with the meshgrid's copies) and result arrays (loss and
    accuracy, for the test data too) need more than ``budget`` bytes."""
    check_memory_budget(budget)
    if points > MAX_GRID_POINTS:
        raise ValueError(f"steps give a grid of {points} points, more than MAX_GRID_POINTS="
                         f"{MAX_GRID_POINTS}; use fewer steps (for detail, a narrower span)")
    need = points * 8 * ((4 if with_test else 2) + 2 * dims)
    if need > budget:
        raise ValueError(f"a grid of {points} points needs {need / 2**20:.0f} MiB for its "
                         f"coordinates and results, more than memory_budget="
                         f"{budget / 2**20:.0f} MiB: use fewer steps or raise memory_budget")


def _check_levels(levels) -> list[int]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (Sequence, np.ndarray)):
        raise TypeError(f"levels must be a sequence of ints such as (11, 21, 41), got {levels!r}")
    if len(levels) == 0:
        raise ValueError("levels is empty; pass grid sizes such as (11, 21, 41)")
    for n in levels:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"levels must hold ints, got {type(n).__name__} {n!r} in {levels!r}")
        if n < 2:
            raise ValueError(f"every level must be >= 2 grid points per axis, got {list(levels)}")
    levels = [int(n) for n in levels]
    if any(b <= a or (b - 1) % (a - 1) for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must increase and nest ((n_next - 1) a multiple of (n - 1), "
                         f"e.g. (11, 21, 41)), got {levels}")
    return levels


def slice_2d_progressive(model: nn.Module, data, d1: Mapping[str, Tensor],
                         d2: Mapping[str, Tensor], span=(-1.0, 1.0),
                         levels: Sequence[int] = (11, 21, 41), *, test_data=None,
                         loss="cross_entropy", dtype=None, device=None, bn: str = "eval",
                         memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = False
                         ) -> Iterator[Slice2D]:
    """Coarse-to-fine 2-D slices for interactive use: yields a :class:`Slice2D` per level, each
    on a finer grid over the same span, ``levels[i]`` points per axis.

    Grids are nested (``levels[i+1] - 1`` a multiple of ``levels[i] - 1``), and points already
    computed are not evaluated again, so the last level costs no more than :func:`slice_2d` at
    that resolution. Every argument (the levels, the span, the finest grid against the memory
    budget, the directions, the data) is checked when the function is called, before the first
    level is computed. Other arguments as in :func:`slice_2d`.
    """
    levels = _check_levels(levels)
    spans, _ = _axes_2d(span, levels[0])
    axes = [(grid_axis(spans[0], n, "x span"), grid_axis(spans[1], n, "y span"))
            for n in levels]
    n_max = levels[-1]
    _check_grid_memory(n_max * n_max, test_data is not None, memory_budget)
    check_progress(progress)
    t0 = time.perf_counter()
    engines = _prepare(model, data, test_data, [d1, d2], loss, dtype, device, bn, memory_budget)
    return _progressive(engines, [d1, d2], spans, levels, axes, progress, t0)


def _progressive(engines, dirs, spans, levels, axes, progress, t0) -> Iterator[Slice2D]:
    # results live on the finest grid; level n is its sub-grid of stride (n_max - 1) / (n - 1)
    n_max = levels[-1]
    fine: list[np.ndarray | None] = [None] * 4
    done = np.zeros((n_max, n_max), dtype=bool)
    for n, (x, y) in zip(levels, axes):
        idx = np.arange(n) * ((n_max - 1) // (n - 1))
        sub = np.ix_(idx, idx)
        todo = ~done[sub]
        if todo.any():
            coords = np.stack(np.meshgrid(x, y, indexing="ij"), axis=-1)[todo]
            res = _evaluate_all(engines, coords, progress)
            ii, jj = np.nonzero(todo)
            for k, r in enumerate(res):
                if r is not None:
                    if fine[k] is None:
                        fine[k] = np.full((n_max, n_max), np.nan)
                    fine[k][idx[ii], idx[jj]] = r
            done[idx[ii], idx[jj]] = True
        arrays = [None if f is None else f[sub] for f in fine]
        ci, cj = int(np.flatnonzero(x == 0)[0]), int(np.flatnonzero(y == 0)[0])
        meta = _meta(engines, dirs, spans, (n, n), time.perf_counter() - t0)
        meta["level"] = n
        yield Slice2D(x, y, *arrays, float(arrays[0][ci, cj]), meta)


def _running_stats_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def interpolate(model_a: nn.Module, model_b: nn.Module, data, steps: int = 21,
                span=(0.0, 1.0), *, test_data=None, loss="cross_entropy", dtype=None,
                device=None, bn: str = "eval", bn_reestimate: bool = False,
                memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = False) -> Slice1D:
    """The loss on the straight line :math:`\\theta_a + t(\\theta_b - \\theta_a)`; ``t = 0`` is
    ``model_a``, ``t = 1`` is ``model_b`` (Goodfellow et al. 2015).

    Only parameters are interpolated; buffers (BatchNorm running statistics) are ``model_a``'s,
    unless ``bn_reestimate=True``: then at every point the running statistics of each BatchNorm
    layer are re-estimated from ``data`` (forward passes with only the BatchNorm layers in
    train mode, a cumulative average over the batches; dropout stays off) before the loss is
    evaluated, so interpolated weights are not judged with ``model_a``'s statistics. This runs
    on a private replica of ``model_a``; the caller's models and torch's global RNG are left
    as they were. On a model without BatchNorm layers that track running
    statistics there is nothing to re-estimate and ``bn_reestimate=True`` is a no-op: the
    result equals ``bn_reestimate=False`` (``meta["bn"]`` then says ``"eval"``, not
    ``"reestimated"``).

    Args:
        model_a, model_b: two models with the same parameter names and shapes.
        data, test_data, loss, dtype, device, memory_budget, progress: as in :func:`slice_1d`.
        steps, span: the grid over ``t``; ``span`` must contain 0.
        bn: ``"eval"`` or ``"train"`` (batch statistics) without re-estimation; re-estimation
            implies ``"eval"`` with the new statistics.
        bn_reestimate: re-estimate BatchNorm statistics at every point (see above).

    Raises:
        ValueError: models of different shapes, bad grid or data, a data batch of one sample
            with ``bn_reestimate=True`` (BatchNorm cannot take batch statistics of one sample),
            or ``bn="train"`` together with ``bn_reestimate=True``.
        TypeError: ``bn_reestimate`` not a bool, or another argument of the wrong type.
    """
    if not isinstance(bn_reestimate, bool):
        raise TypeError(f"bn_reestimate must be True or False, got {bn_reestimate!r}")
    direction = interpolation_direction(model_a, model_b)
    if not (bn_reestimate and _running_stats_layers(model_a)):
        return slice_1d(model_a, data, direction, span, steps, test_data=test_data, loss=loss,
                        dtype=dtype, device=device, bn=bn, memory_budget=memory_budget,
                        progress=progress)
    if bn != "eval":
        raise ValueError(f"bn={bn!r} with bn_reestimate=True: the re-estimated running "
                         "statistics are evaluated with bn='eval'; pass bn='eval' or "
                         "bn_reestimate=False")
    return _interpolate_bn(model_a, direction, data, steps, span, test_data, loss, dtype,
                           device, memory_budget, progress)


def _private_copy(model: nn.Module, dtype, device) -> nn.Module:
    """A replica of ``model`` that owns copies of its parameters and buffers (re-estimation
    writes both), frozen, in the evaluation dtype."""
    dtype = check_dtype(dtype, model)

    def own(t):
        return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else None,
                             copy=True)

    work = replicate(model, {n: own(p) for n, p in model.named_parameters()},
                     {n: own(b) for n, b in model.named_buffers()})
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def _interpolate_bn(model_a, direction, data, steps, span, test_data, loss, dtype, device,
                    memory_budget, progress):
    t = grid_axis(span, steps)
    _check_grid_memory(len(t), test_data is not None, memory_budget, dims=1)
    _check_args(dtype, device)
    check_progress(progress)
    # a model may draw random numbers when it runs; famviz's lock keeps threads in order
    with preserve_global_rng():
        return _reestimated_path(model_a, direction, data, t, span, test_data, loss, dtype,
                                 device, memory_budget, progress)


def _reestimated_path(model_a, direction, data, t, span, test_data, loss, dtype, device,
                      memory_budget, progress):
    t0 = time.perf_counter()
    # everything below runs on a private replica; data, loss and shapes are checked by the
    # Objectives before any evaluation
    work = _private_copy(model_a, dtype, device)
    train = Objective(work, data, loss)
    test = None if test_data is None else Objective(work, test_data, loss)
    small = [i for i, (X, _) in enumerate(train.batches) if len(X) < 2]
    if small:
        raise ValueError(f"bn_reestimate=True needs data batches of at least 2 samples "
                         f"(BatchNorm takes batch statistics); batch {small[0]} has 1")
    theta = {n: p.detach().clone() for n, p in work.named_parameters()}
    bns = _running_stats_layers(work)
    for m in bns:
        m.momentum = None  # cumulative average over the batches
    points = range(len(t))
    if progress:
        from tqdm.auto import tqdm

        points = tqdm(points, desc="interpolate", unit="point")
    rows = []
    with torch.no_grad():
        for i in points:
            for n, p in work.named_parameters():
                if n in direction:  # the floating parameters
                    p.copy_(theta[n] + float(t[i]) * direction[n].to(p))
            for m in bns:
                m.reset_running_stats()
            for m in work.modules():  # only BatchNorm in train mode: dropout stays off
                m.training = isinstance(m, nn.modules.batchnorm._BatchNorm)
            for X, _ in train.batches:
                work(X)
            work.eval()
            row = []
            for obj in (train, test):
                if obj is None:
                    row += [None, None]
                    continue
                eng = _Engine(Objective(work, obj.batches, loss), [], memory_budget)
                l, a = eng.evaluate(np.zeros((1, 0)))
                row += [l[0], a[0] if eng.classify else None]
            rows.append(row)
    cols = [None if c[0] is None else np.array(c, dtype=np.float64) for c in zip(*rows)]
    info = train.info()
    meta = {"directions": [direction.describe()], "loss": info.loss,
            "num_samples": info.num_samples,
            "num_test_samples": 0 if test is None else test.num_samples,
            "bn": "reestimated", "dtype": info.dtype, "span": [list(map(float, span))],
            "steps": [len(t)], "engine": "loop", "seconds": time.perf_counter() - t0}
    centre = float(cols[0][int(np.flatnonzero(t == 0)[0])])
    return Slice1D(t, cols[0], cols[1], cols[2], cols[3], centre, meta)
