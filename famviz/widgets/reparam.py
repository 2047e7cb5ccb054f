"""ReparamExplorer: rescale a ReLU network without changing its function and watch which
flatness measures move (Dinh et al. 2017) and which stay put (relative flatness, Petzka et al.
2021)."""

from __future__ import annotations

import copy
import html
import math
from dataclasses import dataclass, field

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn

from .. import landscape, plots, reparam
from ..fam import last_linear
from ..measures.table import MEASURES, MeasureTable, measure_all
from ..objective import check_model
from ._base import Dashboard, PlotView, Timer, fmt, guarded

__all__ = ["ReparamExplorer", "ReparamResult", "DEFAULT_MEASURES"]

#: the measures shown by default: each costs at most a few tens of milliseconds on the digits
#: MLP with the ``"fast"`` preset (benchmarks/widgets.py), so a slider move stays interactive
DEFAULT_MEASURES = ("relative_flatness", "hessian_trace", "hessian_top_eigenvalue",
                    "eps_sharpness", "fisher_rao_norm")

#: log10 range of the α sliders and of the per-neuron spread sliders
LOG_RANGE = 2.0

#: the function check's threshold: a larger change of what the reparameterization preserves
#: (softmax probabilities with cross-entropy, outputs otherwise) is reported as a change
FUNCTION_TOL = 1e-6

#: α values of :meth:`ReparamExplorer.sweep` (the lecture view): 0.01 to 100
SWEEP_ALPHAS = tuple(float(a) for a in np.logspace(-LOG_RANGE, LOG_RANGE, 9))

_DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x")


@dataclass(frozen=True)
class ReparamResult:
    """What a :class:`ReparamExplorer` shows after an update.

    Attributes:
        settings: the slider values: ``alpha`` (``{"first→second": α}``), ``t2``, ``t3``
            (per-neuron spreads), ``shift`` (T5), ``normalize`` (κ on std-normalized features).
        model: the reparameterized model (a new model; the explorer's input is never changed).
        table: :func:`famviz.measure_all` of ``model``; ``start``: the same at the start.
        ratios: each measure's value divided by its value at the start.
        max_output_change: the largest change over the data, between the start model and
            ``model``, of the softmax probabilities (cross-entropy) or of the outputs (zero up
            to rounding: the function is unchanged).
        raw, filtered: the 1-D slices along the fixed direction (unnormalized) and along the
            same direction filter-normalized to the current weights; ``raw_start`` and
            ``filtered_start`` are those of the start model (the two coincide there).
        seconds: the time of the update (reparameterize, measure, slice, redraw).
        compared: what ``max_output_change`` compares: ``"probabilities"`` (softmax, with
            cross-entropy: T5 moves the logits, not the probabilities) or ``"outputs"``.
    """

    settings: dict
    model: nn.Module = field(repr=False)
    table: MeasureTable = field(repr=False)
    start: MeasureTable = field(repr=False)
    ratios: dict[str, float]
    max_output_change: float
    raw: landscape.Slice1D = field(repr=False)
    filtered: landscape.Slice1D = field(repr=False)
    raw_start: landscape.Slice1D = field(repr=False)
    filtered_start: landscape.Slice1D = field(repr=False)
    seconds: float
    compared: str = "probabilities"


def _log_slider(description: str, tooltip: str) -> W.FloatLogSlider:
    return W.FloatLogSlider(value=1.0, base=10, min=-LOG_RANGE, max=LOG_RANGE, step=0.05,
                            description=description, readout_format=".3g",
                            continuous_update=False, tooltip=tooltip,
                            style={"description_width": "110px"},
                            layout=W.Layout(width="420px"))


class ReparamExplorer(Dashboard):
    """Function-preserving reparameterizations of a ReLU network with live flatness measures.

    Controls (docs/math.md §2):

    * **T1** — one log-scale slider α per pair of consecutive Linear layers
      (:func:`famviz.reparam.consecutive_pairs`): the lower layer ×α, the upper ÷α.
    * **T3** — per-neuron scaling of the rows of the feature layer ``layer`` (its columns in the
      layer above divided): neuron k is scaled by ``s ** z_k`` with a fixed random pattern
      ``z_k`` ∈ [-1, 1], so one slider ``s`` spreads the neurons' scales over [1/s, s].
    * **T2** — the same for the neurons of the layer below ``layer``.
    * **T5** — the softmax shift: every row of the output layer plus ``t·u`` for a fixed random
      vector ``u`` (only with cross-entropy).
    * "std-normalize κ": relative flatness computed on the std canonical form
      (``normalize_features=True``), which makes it invariant under T2 as well.
    * "randomize" draws random settings for all controls; "reset" returns to the start.

    Every change recomputes :func:`famviz.measure_all` (``preset="fast"``, the same seed every
    time, so estimates move only when the model does) and shows each measure relative to its
    value at the start on a log axis, a table of values with the declared behaviour of each
    measure under the active transformations, :func:`famviz.reparam.max_output_change` (zero up
    to rounding), and the loss along a fixed random direction: unnormalized (the direction does
    not follow the rescaling, so the curve changes) beside filter-normalized to the current
    weights (Li et al. 2018).

    Args:
        model: a network whose Linear layers can be rescaled (never modified).
        data: ``(X, y)`` or an iterable of batches; the measures and slices use all of it.
        layer: the feature layer of relative flatness (default: the last Linear layer).
        measures: names of :data:`famviz.measures.table.MEASURES` to show.
        loss: ``"cross_entropy"`` or ``"mse"`` (T5 needs cross-entropy).
        seed: seed of the random patterns, of the direction and of every stochastic measure.
        span, steps: the 1-D slices' range and number of points.
        dtype: evaluation dtype (float64 by default, so invariant readouts agree to all the
            digits shown).

    Attributes (besides :class:`~famviz.widgets._base.Dashboard`'s):
        alpha: ``{(first, second): slider}``; t2, t3, shift: sliders (None where the model has
        no such layer, or T5 without cross-entropy); normalize: checkbox; dead_features: the
        number of features of ``layer`` that are zero on all the data; readout: the table
        (each value in ``<td class="famviz-value" data-measure=NAME>``);
        measures_figure, lecture_figure, slice_figure: the ``go.Figure`` s, shown by
        measures_view, lecture_view, slice_view (:class:`~famviz.widgets._base.PlotView`);
        lecture_pair: the α of the lecture view; result: :class:`ReparamResult`.
    """

    css_class = "famviz-reparam"

    def __init__(self, model: nn.Module, data, layer: str | None = None,
                 measures=DEFAULT_MEASURES, *, loss="cross_entropy", seed: int = 0,
                 span=(-1.0, 1.0), steps: int = 21, dtype: torch.dtype = torch.float64):
        super().__init__()
        check_model(model)
        names = [measures] if isinstance(measures, str) else list(measures)
        if not names:
            raise ValueError(f"measures is empty; choose from {list(MEASURES)}")
        for n in names:
            if n not in MEASURES:
                raise ValueError(f"unknown measure {n!r}; valid: {list(MEASURES)}")
        pairs = reparam.consecutive_pairs(model)
        if not pairs:
            raise ValueError("the model has no pair of consecutive Linear layers (Linear -> "
                             "ReLU-like -> Linear) to rescale; see famviz.reparam")
        self.layer = last_linear(model) if layer is None else layer
        linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        if self.layer not in linear:
            raise ValueError(f"layer {self.layer!r} is not an nn.Linear of the model; "
                             f"Linear layers: {sorted(linear)}")
        self.below = next((a for a, b in pairs if b == self.layer), None)
        self.above = next((b for a, b in pairs if a == self.layer), None)
        self.output_layer = last_linear(model)
        self.pairs = pairs
        self.measures = tuple(names)
        self.loss = loss
        self.seed = int(seed)
        self.span, self.steps, self.dtype = span, int(steps), dtype
        self._data = data
        self._start_model = copy.deepcopy(model).to(dtype)
        modules = dict(self._start_model.named_modules())

        # fixed random patterns: drawn once, from a private generator (the global RNG is untouched)
        g = torch.Generator().manual_seed(self.seed)
        self._z3 = torch.rand(modules[self.layer].out_features, generator=g, dtype=dtype) * 2 - 1
        self._z2 = (torch.rand(modules[self.below].out_features, generator=g, dtype=dtype) * 2 - 1
                    if self.below else None)
        w_out = modules[self.output_layer].weight.detach()
        u = torch.randn(w_out.shape[1], generator=g, dtype=dtype)
        self._u = u / u.norm() * w_out.norm(dim=1).mean()  # t = 1: a shift as large as a row
        # dead features (zero std on the data) keep their scale in the std canonical form, so
        # κ with normalize_features is T2-invariant only without them (docs/math.md §2)
        self.dead_features = (int((reparam.feature_std(self._start_model, self.layer, data)
                                   < reparam.MIN_FEATURE_STD).sum()) if self.below else 0)
        self._direction = landscape.random_direction(self._start_model, norm="none",
                                                     seed=self.seed)
        # the unnormalized direction: filter-normalized once, to the start weights, then fixed
        self._raw_direction = landscape.normalize_direction(self._direction, self._start_model)

        # controls
        self.alpha = {(a, b): _log_slider(f"T1 α {a}→{b}",
                                          f"layer {a} ×α, layer {b} ÷α")
                      for a, b in pairs}
        for s in self.alpha.values():
            s.add_class("famviz-alpha")
        self.t3 = (_log_slider(f"T3 rows of {self.layer}",
                               f"neuron k of layer {self.layer} × s^z_k, its column in "
                               f"{self.above} ÷ s^z_k") if self.above else None)
        self.t2 = (_log_slider(f"T2 rows of {self.below}",
                               f"neuron k of layer {self.below} × s^z_k, its column in "
                               f"{self.layer} ÷ s^z_k") if self.below else None)
        self.shift = (W.FloatSlider(value=0.0, min=-5.0, max=5.0, step=0.1,
                                    description=f"T5 shift {self.output_layer}",
                                    continuous_update=False,
                                    style={"description_width": "110px"},
                                    layout=W.Layout(width="420px"))
                      if loss == "cross_entropy" else None)
        self.normalize = W.Checkbox(value=False, description="std-normalize κ (T2-invariant)",
                                    indent=False)
        # no icons: they need Font Awesome, which a page offline cannot load
        self.randomize_button = W.Button(
            description="randomize",
            tooltip="random α, T3 spread and shift; T2 only with std-normalized κ, the one "
                    "setting under which κ is T2-invariant")
        self.reset_button = W.Button(description="reset")
        self.sweep_button = W.Button(description="α sweep",
                                     tooltip="the lecture view: α of the first pair from "
                                             "0.01 to 100, the other controls at the start")
        for s in self._sliders():
            s.observe(self._on_change, names="value")
        self.normalize.observe(self._on_change, names="value")
        self.randomize_button.on_click(lambda _: self.randomize())
        self.reset_button.on_click(lambda _: self.reset())
        self.sweep_button.on_click(lambda _: self.sweep())
        self._rng = np.random.default_rng(self.seed)
        self._batch = False

        # figures and readouts
        self.readout = W.HTML(layout=W.Layout(min_width="360px", margin="0 0 0 16px"))
        self.readout.add_class("famviz-readout")
        labels = [plots.measure_name(n) for n in self.measures]
        bars = go.Figure(layout={
            "title": {"text": "each measure ÷ its value at the start", "font": {"size": 13}},
            "height": 320, "yaxis": plots.log_axis(title="ratio to start"),
            "margin": {"l": 60, "r": 10, "t": 40, "b": 70}, "showlegend": False})
        bars.add_bar(x=labels, y=[1.0] * len(self.measures), marker_color="#1f77b4",
                     textposition="outside", cliponaxis=False)
        bars.add_hline(y=1.0, line_dash="dot", line_color="grey")
        self.measures_figure = bars
        self.measures_view = PlotView(bars, css_class="famviz-measures-plot")
        # the lecture view: each measure's ratio against α of one pair, on log-log axes
        self.lecture_pair = next(((a, b) for a, b in pairs if b == self.layer), pairs[0])
        lecture = go.Figure(layout={
            "title": {"text": f"T1 on {self.lecture_pair[0]}→{self.lecture_pair[1]}: "
                              "each measure ÷ its start value", "font": {"size": 13}},
            "height": 320, "xaxis": plots.log_axis([10 ** -LOG_RANGE, 10 ** LOG_RANGE],
                                                   title="α (rescaling factor)"),
            "yaxis": plots.log_axis(title="ratio to start"),
            "margin": {"l": 60, "r": 10, "t": 40, "b": 45},
            "legend": {"orientation": "h", "y": -0.25, "x": 0}})
        for k, (name, label) in enumerate(zip(self.measures, labels)):
            lecture.add_scatter(x=[], y=[], mode="lines+markers", name=label,
                                line={"dash": _DASHES[k % len(_DASHES)], "width": 2},
                                marker={"symbol": _SYMBOLS[k % len(_SYMBOLS)], "size": 7})
        self.lecture_figure = lecture
        self.lecture_view = PlotView(lecture, css_class="famviz-lecture-plot")
        self._lecture_points: dict[float, dict[str, float]] = {}
        self._lecture_normalize = False
        # separate y-axes: at large α the unnormalized curve spans far more than the other
        slices = go.Figure(make_subplots(
            rows=1, cols=2, shared_yaxes=False, horizontal_spacing=0.12, subplot_titles=(
                "fixed direction (unnormalized)", "filter-normalized to current weights")))
        for col in (1, 2):
            slices.add_scatter(x=[], y=[], mode="lines", name="start",
                               line={"color": "grey", "dash": "dash", "width": 3},
                               showlegend=col == 1, row=1, col=col)
            slices.add_scatter(x=[], y=[], mode="lines+markers", name="now",
                               line={"color": "#d62728"}, marker={"size": 4},
                               showlegend=col == 1, row=1, col=col)
        slices.update_layout(height=300, margin={"l": 60, "r": 10, "t": 40, "b": 40},
                             legend={"orientation": "h", "y": 1.18, "x": 1, "xanchor": "right"})
        slices.update_yaxes(title_text="train loss", row=1, col=1)
        slices.update_xaxes(title_text="step along the direction")
        self.slice_figure = slices
        self.slice_view = PlotView(slices, css_class="famviz-slice-plot")

        controls = W.VBox([
            W.HTML("<b>Function-preserving reparameterizations</b> (the network's outputs "
                   "do not change)"),
            *self.alpha.values(),
            *[s for s in (self.t3, self.t2, self.shift) if s is not None],
            self.normalize,
            W.HBox([self.randomize_button, self.reset_button, self.sweep_button]),
        ], layout=W.Layout(flex="0 0 auto"))
        self._set_status("computing the start values…", busy=True)
        self._start = self._measure(self._start_model)
        self._start_norm: MeasureTable | None = None  # the same with κ std-normalized, on demand
        self._raw_start = self._slice(self._start_model, self._raw_direction)
        self._filtered_start = self._raw_start  # at the start the two directions coincide
        # wraps below the controls when the cell is narrow, instead of squeezing the sliders
        top = W.Box([controls, self.readout],
                    layout=W.Layout(display="flex", flex_flow="row wrap"))
        figures = W.Box([self.measures_view.widget, self.lecture_view.widget],
                        layout=W.Layout(display="grid", grid_template_columns="1fr 1fr",
                                        width="100%"))
        self._finish(top, figures, self.slice_view.widget)
        self.update()

    # ------------------------------------------------------------------------------ controls

    def _sliders(self) -> list[W.Widget]:
        return [*self.alpha.values(), *[s for s in (self.t3, self.t2, self.shift) if s]]

    def settings(self) -> dict:
        """The current slider values (see :class:`ReparamResult`)."""
        return {"alpha": {f"{a}→{b}": s.value for (a, b), s in self.alpha.items()},
                "t3": self.t3.value if self.t3 else 1.0,
                "t2": self.t2.value if self.t2 else 1.0,
                "shift": self.shift.value if self.shift else 0.0,
                "normalize": bool(self.normalize.value)}

    def set(self, *, alpha: dict | None = None, t2: float | None = None,
            t3: float | None = None, shift: float | None = None,
            normalize: bool | None = None) -> ReparamResult | None:
        """Set several controls and update once. ``alpha`` maps ``(first, second)`` pairs (or
        ``"first→second"`` labels) to values."""
        self._batch = True
        try:
            for key, value in (alpha or {}).items():
                pair = tuple(key.split("→")) if isinstance(key, str) else tuple(key)
                if pair not in self.alpha:
                    raise ValueError(f"no α slider for {key!r}; pairs: {list(self.alpha)}")
                self.alpha[pair].value = value
            for slider, value, name in ((self.t2, t2, "t2"), (self.t3, t3, "t3"),
                                        (self.shift, shift, "shift")):
                if value is not None:
                    if slider is None:
                        raise ValueError(f"this model has no {name} control")
                    slider.value = value
            if normalize is not None:
                self.normalize.value = bool(normalize)
        finally:
            self._batch = False
        return self.update()

    def randomize(self) -> ReparamResult | None:
        """Random settings under which the displayed κ is invariant: every α and the T3
        spread log-uniform in [0.1, 10], the shift in [-3, 3]; the T2 spread too only when κ
        is std-normalized (else T2 is left at 1, since it moves κ: docs/math.md §2)."""
        r = self._rng
        t2 = 10 ** r.uniform(-1, 1) if self.t2 and self.normalize.value else None
        return self.set(alpha={p: 10 ** r.uniform(-1, 1) for p in self.alpha},
                        t2=t2 if t2 is not None else (1.0 if self.t2 else None),
                        t3=10 ** r.uniform(-1, 1) if self.t3 else None,
                        shift=r.uniform(-3, 3) if self.shift else None)

    def reset(self) -> ReparamResult | None:
        """Back to the start model."""
        return self.set(alpha={p: 1.0 for p in self.alpha}, t2=1.0 if self.t2 else None,
                        t3=1.0 if self.t3 else None, shift=0.0 if self.shift else None,
                        normalize=False)

    def sweep(self, alphas=SWEEP_ALPHAS) -> list[ReparamResult]:
        """The lecture view in one call: every other control back at the start, then α of
        :attr:`lecture_pair` set to each of ``alphas`` in turn (each drawn as it is
        computed); returns the results. κ stays a flat line at 1, Tr(H) and λ_max follow a
        slope."""
        values = [float(a) for a in alphas]
        if not values or any(not (a > 0 and math.isfinite(a)) for a in values):
            raise ValueError(f"alphas must be positive finite numbers, got {alphas!r}")
        lo, hi = 10 ** -LOG_RANGE, 10 ** LOG_RANGE
        if any(a < lo * (1 - 1e-9) or a > hi * (1 + 1e-9) for a in values):
            raise ValueError(f"alphas must lie in the slider's range [{lo:g}, {hi:g}], "
                             f"got {values}")
        self.set(alpha={p: 1.0 for p in self.alpha}, t2=1.0 if self.t2 else None,
                 t3=1.0 if self.t3 else None, shift=0.0 if self.shift else None)
        results = []
        for a in values:
            results.append(self.set(alpha={self.lecture_pair: a}))
        return results

    def _on_change(self, _change) -> None:
        if not self._batch:
            self.update()

    # ------------------------------------------------------------------------------ compute

    def model(self) -> nn.Module:
        """The start model with the current reparameterizations applied (a new model)."""
        m = self._start_model
        for (a, b), s in self.alpha.items():
            if s.value != 1.0:
                m = reparam.scale_layers(m, a, b, s.value)
        if self.t3 is not None and self.t3.value != 1.0:
            m = reparam.scale_neurons(m, self.layer, self.above, self.t3.value ** self._z3)
        if self.t2 is not None and self.t2.value != 1.0:
            m = reparam.scale_neurons(m, self.below, self.layer, self.t2.value ** self._z2)
        if self.shift is not None and self.shift.value != 0.0:
            m = reparam.shift_logits(m, self.output_layer, self.shift.value * self._u)
        return m

    def _measure(self, model: nn.Module) -> MeasureTable:
        options = ({"relative_flatness": {"normalize_features": True}}
                   if self.normalize.value and "relative_flatness" in self.measures else None)
        return measure_all(model, self._data, self.layer, self.loss, self.measures,
                           seed=self.seed, preset="fast", options=options, dtype=self.dtype)

    def _slice(self, model: nn.Module, direction) -> landscape.Slice1D:
        return landscape.slice_1d(model, self._data, direction, self.span, self.steps,
                                  loss=self.loss, dtype=self.dtype)

    @guarded
    def update(self) -> ReparamResult:
        """Recompute everything for the current settings and redraw; returns the result."""
        timer = Timer()
        self._set_status("computing…", busy=True)  # sent at once; the work follows
        model = self.model()
        start = self._start if not self.normalize.value else self._start_normalized()
        table = self._measure(model) if model is not self._start_model or self.normalize.value \
            else self._start
        ratios = {r.name: r.value / start[r.name].value if start[r.name].value else math.nan
                  for r in table}
        change, compared = self._function_change(model)
        raw = self._slice(model, self._raw_direction)
        filtered = self._slice(model, landscape.normalize_direction(self._direction, model))
        self._draw(table, start, ratios, change, compared, raw, filtered)
        self.result = ReparamResult(self.settings(), model, table, start, ratios, change, raw,
                                    filtered, self._raw_start, self._filtered_start, timer(),
                                    compared)
        self.error = None
        self._set_status(f"updated in {self.result.seconds * 1e3:.0f} ms (measures, slices "
                         "and figures)")
        return self.result

    def _function_change(self, model: nn.Module) -> tuple[float, str]:
        """The largest change, over the data, of what the reparameterizations preserve: the
        softmax probabilities with cross-entropy (T5 shifts every logit by the same amount),
        the outputs otherwise. Returns ``(value, what was compared)``."""
        compare = "probabilities" if self.loss == "cross_entropy" else "outputs"
        return reparam.max_output_change(self._start_model, model, self._data, compare), compare

    def _start_normalized(self) -> MeasureTable:
        """The start table with κ on std-normalized features (computed once)."""
        if self._start_norm is None:
            self._start_norm = self._measure(self._start_model)
        return self._start_norm

    # ------------------------------------------------------------------------------ drawing

    def _active(self) -> list[str]:
        s = self.settings()
        active = []
        if any(v != 1.0 for v in s["alpha"].values()):
            active.append("T1")
        if s["t2"] != 1.0:
            active.append("T2")
        if s["t3"] != 1.0:
            active.append("T3")
        if s["shift"] != 0.0:
            active.append("T5")
        return active

    def _draw(self, table, start, ratios, change, compared, raw, filtered) -> None:
        names = [r.name for r in table]
        unchanged = [abs(math.log10(max(ratios[n], 1e-300))) < 1e-6 for n in names]
        with self.measures_figure.batch_update():
            bar = self.measures_figure.data[0]
            bar.x = [plots.measure_name(n) for n in names]
            bar.y = [ratios[n] for n in names]
            bar.text = [f"{ratios[n]:.4g}×" for n in names]
            bar.hovertext = [r.label for r in table]
            # green: unchanged; orange: moved (not an error: the lesson is which ones move)
            bar.marker.color = ["#2ca02c" if u else "#ff7f0e" for u in unchanged]
            self.measures_figure.update_yaxes(**plots.log_axis([*ratios.values(), 1.0],
                                                               pad=0.35))
        with self.slice_figure.batch_update():
            for k, (now, before) in enumerate(((raw, self._raw_start),
                                               (filtered, self._filtered_start))):
                self.slice_figure.data[2 * k].update(x=before.x, y=before.values)
                self.slice_figure.data[2 * k + 1].update(x=now.x, y=now.values)
        self._draw_lecture(ratios)
        self.readout.value = self._table_html(table, start, ratios, change, compared)
        for view in (self.measures_view, self.lecture_view, self.slice_view):
            view.refresh()

    def _draw_lecture(self, ratios: dict[str, float]) -> None:
        """Add the current point to the lecture view when only α of :attr:`lecture_pair` is
        away from the start (pure T1 there); the κ variant in use resets the curves."""
        s = self.settings()
        if bool(s["normalize"]) != self._lecture_normalize:
            self._lecture_points.clear()
            self._lecture_normalize = bool(s["normalize"])
        others = [v for (pair, v) in zip(self.alpha, s["alpha"].values())
                  if pair != self.lecture_pair]
        if all(v == 1.0 for v in others) and s["t2"] == 1.0 and s["t3"] == 1.0 \
                and s["shift"] == 0.0:
            alpha = float(self.alpha[self.lecture_pair].value)
            self._lecture_points[alpha] = dict(ratios)
        xs = sorted(self._lecture_points)
        current = float(self.alpha[self.lecture_pair].value)
        with self.lecture_figure.batch_update():
            for trace, name in zip(self.lecture_figure.data, self.measures):
                trace.x = xs
                trace.y = [self._lecture_points[a][name] for a in xs]
            self.lecture_figure.update_yaxes(**plots.log_axis(
                [1.0, *(v for p in self._lecture_points.values() for v in p.values())]))
            self.lecture_figure.layout.shapes = [{
                "type": "line", "xref": "x", "yref": "paper", "x0": current, "x1": current,
                "y0": 0, "y1": 1, "line": {"color": "grey", "dash": "dot", "width": 1}}]

    def _table_html(self, table, start, ratios, change, compared) -> str:
        active = self._active()
        head = "".join(f"<th>{t}</th>" for t in active) or "<th>declared</th>"
        rows = []
        for r in table:
            declared = "".join(
                f"<td>{html.escape(r.invariance.get(t, '?'))}</td>" for t in active) or \
                "<td>(no change applied)</td>"
            rows.append(
                f"<tr><td title='{html.escape(r.label)}'>"
                f"{html.escape(plots.measure_name(r.name))}</td>"
                f"<td class='famviz-value' data-measure='{r.name}'>{fmt(r.value)}</td>"
                f"<td class='famviz-start-value'>{fmt(start[r.name].value)}</td>"
                f"<td class='famviz-ratio' data-measure='{r.name}'>{ratios[r.name]:.4g}×</td>"
                f"{declared}</tr>")
        what = ("softmax probabilities p" if compared == "probabilities" else "outputs f")
        sym = "p" if compared == "probabilities" else "f"
        same = change <= FUNCTION_TOL
        verdict = ("the function is unchanged (rounding only)" if same else
                   f"the function CHANGED (more than {FUNCTION_TOL:g})")
        return (
            "<style>.famviz-table td, .famviz-table th {padding: 1px 8px; text-align: right;"
            " white-space: nowrap}"
            ".famviz-table td:first-child, .famviz-table th:first-child {text-align: left}"
            "</style>"
            "<table class='famviz-table' style='border-collapse:collapse;font-size:13px'>"
            f"<tr><th>measure</th><th>now</th><th>start</th><th>ratio</th>{head}</tr>"
            + "".join(rows) + "</table>"
            f"<p style='font-size:13px' class='famviz-function-check' "
            f"data-same='{str(same).lower()}'>function check ({what}): "
            f"max |{sym}<sub>now</sub>(x) − {sym}<sub>start</sub>(x)| = "
            f"<span class='famviz-value' data-measure='max_output_change'>{fmt(change, 2)}"
            f"</span> → <span class='famviz-verdict' style='color:"
            f"{'#2ca02c' if same else '#b00020'}'>{verdict}</span></p>"
            + (f"<p style='font-size:13px;color:#b00020'>{self.dead_features} feature(s) of "
               f"layer {html.escape(self.layer)} are dead on these data: their scale stays "
               "free in the std canonical form, so κ is not exactly T2-invariant here.</p>"
               if self.normalize.value and self.dead_features else ""))
