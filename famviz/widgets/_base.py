"""What the three dashboards share: a root box with a CSS class, a status line, an output area
where errors from callbacks are shown (never lost), and the last result."""

from __future__ import annotations

import functools
import html
import time
import traceback

import ipywidgets as W
import numpy as np


class Dashboard:
    """Base of the famviz dashboards. Subclasses build ``self.widget`` (the root box) and call
    :meth:`_finish` at the end of ``__init__``.

    Attributes:
        widget: the root ipywidgets box (displayed when the dashboard is a cell's last
            expression, or with ``IPython.display.display(dashboard)``).
        result: the last result (a class of each dashboard's own); None before the first.
        error: the traceback text of the last failed update, or None after a successful one.
        output: the ipywidgets ``Output`` area that shows errors.
        status: one line of HTML saying what happened last, with its time.
    """

    css_class = "famviz-dashboard"

    def __init__(self) -> None:
        self.result = None
        self.error: str | None = None
        self.status = W.HTML(value="")
        self.status.add_class("famviz-status")
        self.output = W.Output(layout=W.Layout(max_height="220px", overflow="auto"))
        self.widget: W.Box | None = None

    def _finish(self, *children: W.Widget) -> None:
        self.widget = W.VBox([*children, self.status, self.output])
        self.widget.add_class("famviz-dashboard")
        self.widget.add_class(self.css_class)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _report(self, exc: BaseException) -> None:
        """Show an exception from a callback in the output area and the status line."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.error = text
        self.output.append_stderr(text)
        self._set_status(f"error: {type(exc).__name__}: {exc}", error=True)

    def _set_status(self, text: str, *, error: bool = False) -> None:
        style = "color:#b00020" if error else "color:#444"
        self.status.value = f'<span style="{style}">{html.escape(text)}</span>'


def guarded(method):
    """Run a dashboard callback; an exception goes to the dashboard's output area instead of
    vanishing in the widget machinery (and the dashboard stays usable)."""

    @functools.wraps(method)
    def wrapper(self: Dashboard, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown to the user, not swallowed
            self._report(exc)
            return None

    return wrapper


def fmt(x: float, digits: int = 5) -> str:
    """A number as the readouts show it: ``digits`` significant digits, scientific notation."""
    if x is None or not np.isfinite(x):
        return str(x)
    return f"{x:.{digits - 1}e}"


class Timer:
    """Seconds since creation, for the status line and the ``seconds`` fields of results."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
