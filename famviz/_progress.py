"""Progress bars (``tqdm.auto``, imported only when a bar is asked for) for long calls."""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["check_progress", "progress_bar"]


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
