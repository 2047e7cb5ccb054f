"""LandscapeExplorer: 2-D slices of the loss surface, drawn coarse at once and then refined."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import ipywidgets as W
import plotly.graph_objects as go
from torch import nn

from .. import landscape, plots
from ..objective import check_model
from ._base import Dashboard, PlotView, Timer, guarded, in_kernel_thread

__all__ = ["LandscapeExplorer", "LandscapeResult", "RESOLUTIONS"]

#: final grid size → the nested levels drawn on the way (each reuses the points before it)
RESOLUTIONS = {11: (11,), 21: (11, 21), 41: (11, 21, 41), 81: (11, 21, 41, 81)}


@dataclass(frozen=True)
class LandscapeResult:
    """The last surface a :class:`LandscapeExplorer` drew.

    Attributes:
        slice: the finest :class:`famviz.landscape.Slice2D` computed (train and, with test
            data, test values).
        levels: the grid sizes drawn for this setting, coarse to fine (e.g. ``[11, 21, 41]``).
        seconds: per level, the time from the change until that level was drawn.
        settings: the control values.
    """

    slice: landscape.Slice2D = field(repr=False)
    levels: list[int]
    seconds: list[float]
    settings: dict


class LandscapeExplorer(Dashboard):
    """Explore 2-D slices :math:`E(\\theta + a\\, d_1 + b\\, d_2)` of the loss surface.

    Controls: the directions (two random directions, or the top-2 Hessian eigenvectors), their
    normalization (filter, layer, none; Li et al. 2018), the seed of the random directions,
    the span, the final resolution, and whether the surface shows the training or the test
    loss. Every change draws an 11 × 11 grid at once and refines it
    (:func:`famviz.landscape.slice_2d_progressive`), as a 3-D surface beside a contour plot.
    The grids are computed in a background thread, so the dashboard appears (and stays
    responsive) while it refines; a change made meanwhile abandons the old computation at its
    next level. :meth:`wait` blocks until the current computation is done.

    Args:
        model: the network (never modified).
        data: the training data, ``(X, y)`` or an iterable of batches.
        test_data: optional held-out data (enables the train/test switch).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable.
        seed: seed of the first random directions.
        span: initial half-width of the grid (coordinates in [-span, span]).
        resolution: initial final grid size, a key of :data:`RESOLUTIONS`.
        log: draw log10 of the loss.
        background: compute in a background thread (False: :meth:`update` returns when the
            finest grid is drawn).
    """

    css_class = "famviz-landscape"

    def __init__(self, model: nn.Module, data, test_data=None, *, loss="cross_entropy",
                 seed: int = 0, span: float = 1.0, resolution: int = 41, log: bool = True,
                 background: bool = True):
        super().__init__()
        check_model(model)
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {resolution!r}")
        if not span > 0:
            raise ValueError(f"span must be positive, got {span!r}")
        self._model = copy.deepcopy(model)
        self._data, self._test_data, self.loss = data, test_data, loss
        self._hessian: list | None = None  # computed on first use, then kept
        self.background = bool(background)
        self._thread: threading.Thread | None = None
        # bumped by every change (on the kernel thread); a computation of an older one stops
        self._generation = 0
        style = {"description_width": "90px"}
        self.kind = W.Dropdown(options=[("random", "random"), ("Hessian top-2", "hessian")],
                               value="random", description="directions", style=style)
        self.norm = W.Dropdown(options=["filter", "layer", "none"], value="filter",
                               description="normalize", style=style)
        self.seed = W.BoundedIntText(value=int(seed), min=0, max=2**31 - 1, description="seed",
                                     style=style, layout=W.Layout(width="200px"))
        self.span = W.FloatLogSlider(value=float(span), base=10, min=-2, max=1, step=0.05,
                                     description="span ±", continuous_update=False,
                                     readout_format=".3g", style=style)
        self.resolution = W.Dropdown(options=list(RESOLUTIONS), value=resolution,
                                     description="resolution", style=style)
        self.which = W.ToggleButtons(options=["train", "test"], value="train",
                                     disabled=test_data is None,
                                     tooltips=["training loss", "test loss"])
        self.log = W.Checkbox(value=bool(log), description="log10 loss", indent=False)
        for w in (self.kind, self.norm, self.seed, self.span, self.resolution):
            w.observe(self._on_change, names="value")
        for w in (self.which, self.log):
            w.observe(self._on_view, names="value")
        # sized by their container (two columns of the cell), only the height fixed
        self.surface_figure = go.Figure(layout={"height": 420})
        self.contour_figure = go.Figure(layout={"height": 420})
        self.surface_view = PlotView(self.surface_figure, css_class="famviz-surface-plot")
        self.contour_view = PlotView(self.contour_figure, css_class="famviz-contour-plot")
        controls = W.Box([self.kind, self.norm, self.seed, self.span, self.resolution,
                          self.which, self.log],
                         layout=W.Layout(display="flex", flex_flow="row wrap"))
        figures = W.Box([self.surface_view.widget, self.contour_view.widget],
                        layout=W.Layout(display="grid", grid_template_columns="1fr 1fr",
                                        width="100%"))
        self._finish(controls, figures)
        self.update()

    def settings(self) -> dict:
        return {"kind": self.kind.value, "norm": self.norm.value, "seed": self.seed.value,
                "span": self.span.value, "resolution": self.resolution.value,
                "which": self.which.value, "log": self.log.value}

    def _directions(self, settings: dict):
        if settings["kind"] == "hessian":
            if self._hessian is None:
                self._hessian = landscape.hessian_directions(self._model, self._data, self.loss,
                                                             k=2, seed=settings["seed"])
            return self._hessian
        seed = settings["seed"]
        return [landscape.random_direction(self._model, settings["norm"], seed=seed),
                landscape.random_direction(self._model, settings["norm"], seed=seed + 1)]

    def _on_change(self, _change) -> None:
        self.norm.disabled = self.kind.value == "hessian"  # eigenvectors: unit norm, fixed
        self.update()

    @guarded
    def _on_view(self, _change) -> None:
        if self.result is not None:
            self._draw(self.result.slice)

    def _draw(self, s: landscape.Slice2D) -> None:
        test = self.which.value == "test"
        plots.surface(s, test=test, log=self.log.value, fig=self.surface_figure)
        plots.contour(s, test=test, log=self.log.value, fig=self.contour_figure)
        self.surface_view.refresh()
        self.contour_view.refresh()

    def update(self) -> LandscapeResult | None:
        """Recompute for the current settings, drawing each level as it arrives (in a
        background thread unless ``background=False``; then the result is returned)."""
        self._generation += 1
        generation = self._generation
        settings = self.settings()
        self._set_status("computing…", busy=True)
        if not self.background:
            self._compute(generation, settings)
            return self.result
        self._thread = threading.Thread(target=self._compute, args=(generation, settings),
                                        daemon=True, name="famviz-landscape")
        self._thread.start()
        return None

    def wait(self, timeout: float | None = None) -> LandscapeResult | None:
        """Block until the current computation has drawn its finest grid; return
        :attr:`result`."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.result

    @guarded
    def _compute(self, generation: int, settings: dict) -> None:
        timer = Timer()
        d1, d2 = self._directions(settings)
        levels, seconds = [], []
        span, final = settings["span"], settings["resolution"]
        for s in landscape.slice_2d_progressive(
                self._model, self._data, d1, d2, (-span, span), levels=RESOLUTIONS[final],
                test_data=self._test_data, loss=self.loss):
            if generation != self._generation:
                return  # the settings changed: a newer computation takes over
            levels.append(len(s.x))
            seconds.append(timer())
            self.result = LandscapeResult(s, list(levels), list(seconds), settings)
            self.error = None
            status = (f"{len(s.x)} × {len(s.y)} grid drawn after {seconds[-1]:.2f} s"
                      + (" · refining" if levels[-1] < final else ""))
            in_kernel_thread(self._show, generation, s, status)

    @guarded
    def _show(self, generation: int, s: landscape.Slice2D, status: str) -> None:
        if generation == self._generation:  # not overtaken meanwhile
            self._draw(s)
            self._set_status(status)
