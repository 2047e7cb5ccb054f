"""Progress bars (``tqdm.auto``, imported only when a bar is asked for) for long calls.

:func:`progress_bar` is a bar a function drives itself; :func:`counts_evaluations` wraps a
public measure that takes ``progress``: its bar counts the evaluations (loss, gradient, error
passes over the data) that :func:`tick` reports from deep inside, without threading the bar
through every helper.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["check_progress", "counts_evaluations", "progress_bar", "tick"]

_BAR: ContextVar = ContextVar("famviz_progress_bar", default=None)


def check_progress(progress) -> bool:
    """``progress`` must be True or False (a truthy string is a mistake, not a yes)."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    return progress


@contextmanager
def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "HVP"):
    """A tqdm bar with ``total`` steps (None: a counter), or None when not ``enabled`` (nothing
    is imported or printed then); closed on exit, also on error."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit)
    try:
        yield bar
    finally:
        bar.close()


def tick(n: int = 1) -> None:
    """Count ``n`` evaluations on the bar of the call this runs in (if it shows one)."""
    bar = _BAR.get()
    if bar is not None:
        bar.update(n)


def counts_evaluations(desc: str):
    """Decorate a function with a ``progress: bool = False`` parameter: with
    ``progress=True`` a bar named ``desc`` counts the evaluations it makes (:func:`tick`)."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                progress = signature.bind(*args, **kwargs).arguments.get("progress", False)
            except TypeError:
                return fn(*args, **kwargs)  # Python's own message for a bad call
            check_progress(progress)
            with progress_bar(progress, None, desc, unit="evaluation") as bar:
                token = _BAR.set(bar)
                try:
                    return fn(*args, **kwargs)
                finally:
                    _BAR.reset(token)

        return call

    return wrap
