"""What the three dashboards share: a root box with a CSS class, a status line, an output area
where errors from callbacks are shown (never lost), and the last result."""

from __future__ import annotations

import functools
import html
import json
import threading
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

        def show():
            self.output.append_stderr(text)
            self._set_status(f"error: {type(exc).__name__}: {exc}", error=True)

        in_kernel_thread(show)

    def _set_status(self, text: str, *, error: bool = False, busy: bool = False) -> None:
        style = "color:#b00020" if error else ("color:#a05a00" if busy else "color:#444")
        self.status.value = f'<span style="{style}">{html.escape(text)}</span>'


def _kernel_loop():
    """The running IPython kernel's main event loop, or None outside a kernel."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return None
    kernel = getattr(get_ipython(), "kernel", None)
    return getattr(kernel, "io_loop", None)


def in_kernel_thread(fn, *args) -> None:
    """Call ``fn(*args)`` on the kernel's main thread.

    Widget state must change only there: ipywidgets' echo suppression and plotly's edit
    bookkeeping are not thread-safe, and updates sent from a worker thread were lost at random
    in Voilà. From a worker thread inside a kernel the call is queued on the kernel's event
    loop (tornado's ``add_callback`` is thread-safe); anywhere else it runs at once.
    """
    loop = _kernel_loop() if threading.current_thread() is not threading.main_thread() else None
    if loop is None:
        fn(*args)
    else:
        loop.add_callback(fn, *args)


#: plotly's configuration for every dashboard figure: no logo, no link to plotly's cloud
PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "modeBarButtonsToRemove": ["sendDataToCloud", "select2d", "lasso2d"]}
PLOTLY_MIME = "application/vnd.plotly.v1+json"


class PlotView:
    """A plotly figure shown in a dashboard: the kernel-side ``figure`` (a plain
    ``go.Figure``, changed in place) and ``widget``, an ipywidgets ``Output`` whose outputs are
    the figure's current JSON.

    Why not a ``FigureWidget``: a ``FigureWidget`` sends its changes to the views that exist as
    one-off messages and keeps its synced state from creation. A view made later from the
    state (Voilà connects after running the notebook; a reloaded JupyterLab tab; a second view)
    draws the old figure, and in Voilà (voila 0.5, plotly 6) the one-off messages did not reach
    even the first view (tests/browser). An ``Output``'s ``outputs`` are widget state, set here
    from the kernel, so every view draws the current figure; JupyterLab's plotly renderer
    (plotly's own lab extension, local) loads plotly.js once per page instead of once per
    ``FigureWidget``.

    :meth:`refresh` after each change (on the kernel thread, see :func:`in_kernel_thread`).
    """

    def __init__(self, figure, *, css_class: str = "famviz-plot") -> None:
        self.figure = figure
        self.widget = W.Output(layout=W.Layout(width="100%", min_width="0"))
        self.widget.add_class("famviz-plot")
        self.widget.add_class(css_class)
        self.refresh()

    def bundle(self) -> dict:
        """The display data the views draw: the figure's JSON (numpy arrays as plotly's typed
        arrays) and :data:`PLOT_CONFIG`."""
        return {PLOTLY_MIME: {**json.loads(self.figure.to_json()), "config": PLOT_CONFIG}}

    def refresh(self) -> None:
        self.widget.outputs = ({"output_type": "display_data", "data": self.bundle(),
                                "metadata": {}},)


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


def fmt(x: float, digits: int = 4) -> str:
    """A number as the readouts show it: ``digits`` significant digits, plain where that is
    readable (``47.09``, ``0.01234``), scientific otherwise (``1.234e+05``)."""
    if x is None or not np.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


class Timer:
    """Seconds since creation, for the status line and the ``seconds`` fields of results."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
