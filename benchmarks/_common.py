"""Helpers shared by the benchmark scripts: thread setup, the trained digits model, interleaved
timing, agreement checks and plain-text tables.

The machines this project runs on are shared (2 cores, 5-25x slowdowns at times), so every
comparison is timed in one process, interleaved (A B A B ...), and reported as medians and as
the median of the per-round ratios. Only ratios measured that way mean anything.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the benchmarks measure *this* checkout of famviz, whatever is installed in the environment
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import famviz as fv  # noqa: E402

__all__ = [
    "ROOT",
    "TrainedModel",
    "Timing",
    "set_threads",
    "trained_digits_mlp",
    "time_interleaved",
    "paired_ratio",
    "rel_diff",
    "agree",
    "verdict",
    "fmt_time",
    "fmt_ratio",
    "table",
]


# --------------------------------------------------------------------------------- environment


def set_threads(n: int | None) -> int:
    """Fix torch's intra-op thread count (``None``: keep the default) and return it."""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TrainedModel:
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    steps: int
    train_accuracy: float
    train_loss: float
    seconds: float

    @property
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X, self.y

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"digits MLP [64, 128, 64, 10] ({n_params} parameters), all {len(self.X)} "
                f"samples; full-batch Adam lr 1e-2, {self.steps} steps in {self.seconds:.2f} s: "
                f"train accuracy {100 * self.train_accuracy:.2f} %, "
                f"loss {self.train_loss:.5f}")


def trained_digits_mlp(seed: int = 0, lr: float = 1e-2, max_steps: int = 2000) -> TrainedModel:
    """``famviz.models.mlp([64, 128, 64, 10], seed=seed)`` trained with full-batch Adam on all
    1797 digits until 100 % train accuracy (or ``max_steps``); float32, CPU, deterministic
    (full batch: no shuffling, no random draws). Nothing is written to disk."""
    (X, y), _ = fv.data.digits(test_size=0, seed=seed)
    model = fv.models.mlp([64, 128, 64, 10], seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    steps = 0
    for steps in range(1, max_steps + 1):
        opt.zero_grad(set_to_none=True)
        out = model(X)
        loss = F.cross_entropy(out, y)
        if bool((out.argmax(dim=1) == y).all()):
            break
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out = model(X)
        acc = float((out.argmax(dim=1) == y).float().mean())
        loss = float(F.cross_entropy(out, y))
    return TrainedModel(model, X, y, steps, acc, loss, seconds)


# ------------------------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Timing:
    """Seconds per call, one sample per round (each sample averages ``number`` calls)."""

    samples: tuple[float, ...]
    number: int

    @property
    def median(self) -> float:
        return _median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _clock(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    min_sample: float = 0.0,
    budget: float | None = None,
    min_repeats: int = 5,
) -> dict[str, Timing]:
    """Time several callables interleaved: ``warmup`` untimed calls each, then ``repeats``
    rounds in which every callable is timed once (the order rotates from round to round, so
    none is always first). A callable faster than ``min_sample`` seconds is called ``number``
    times per sample (calibrated on the warm-up) and the mean is recorded. The garbage
    collector is off while a sample is taken. With ``budget`` (seconds), no new round starts
    once the rounds have taken that long and at least ``min_repeats`` are done, so a heavily
    loaded machine shortens the run instead of stretching it."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    number: dict[str, int] = {}
    for name in names:
        t = float("inf")
        for _ in range(max(warmup, 1)):
            t = min(t, _clock(fns[name], 1))
        number[name] = max(1, math.ceil(min_sample / t)) if min_sample > 0 and t > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        if (budget is not None and r >= min(min_repeats, repeats)
                and time.perf_counter() - start > budget):
            break
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                samples[name].append(_clock(fns[name], number[name]))
            finally:
                if was_enabled:
                    gc.enable()
    return {name: Timing(tuple(samples[name]), number[name]) for name in names}


def paired_ratio(a: Timing, b: Timing, scale_a: float = 1.0, scale_b: float = 1.0) -> float:
    """Median over rounds of ``(a / scale_a) / (b / scale_b)``: a ratio of runs taken side by
    side, robust to the machine's load drifting between rounds."""
    if len(a.samples) != len(b.samples):
        return (a.median / scale_a) / (b.median / scale_b)
    return _median([(x / scale_a) / (y / scale_b) for x, y in zip(a.samples, b.samples)])


# ---------------------------------------------------------------------------------- checking


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def agree(values: Sequence[float], rtol: float) -> tuple[bool, float]:
    """(all pairwise relative differences <= rtol, the largest one)."""
    worst = max((rel_diff(a, b) for i, a in enumerate(values) for b in values[i + 1:]),
                default=0.0)
    return worst <= rtol, worst


def verdict(ratio: float | None, goal: float | None, valid: bool = True) -> str:
    if ratio is None or goal is None or not math.isfinite(ratio):
        return "n/a"
    if not valid:
        return "MISS (values disagree)"
    return "PASS" if ratio <= goal else "MISS"


# -------------------------------------------------------------------------------- formatting


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """A plain-text table (also valid Markdown: pipes and a header rule)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    out = [title] if title else []
    out.append(line(cells[0]))
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)
