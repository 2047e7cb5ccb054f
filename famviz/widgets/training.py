"""TrainingExplorer: train with SGD, FAM, SAM or ASAM and watch loss, accuracy and relative
flatness live, the previous run beside the current one (FAM on vs off is one click apart)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import nn

from .. import fam, plots
from ..objective import check_model
from ._base import Dashboard, PlotView, Timer, in_kernel_thread

__all__ = ["TrainingExplorer", "TrainingRun"]

_METHODS = [("SGD", "sgd"), ("FAM", "fam"), ("SAM", "sam"), ("ASAM", "asam")]
_PANELS = ("loss", "accuracy", "relative flatness κ")
# per run: (panel, history field, dash) of each trace
_TRACES = ((1, "train_loss", None), (1, "test_loss", "dot"), (2, "train_accuracy", None),
           (2, "test_accuracy", "dot"), (3, "kappa", None))
_NOW, _BEFORE = "#d62728", "#7f7f7f"


@dataclass(frozen=True)
class TrainingRun:
    """A finished (or stopped) run of a :class:`TrainingExplorer`.

    Attributes:
        label: e.g. ``"FAM λ=0.01"``; settings: the arguments given to
            :func:`famviz.fam.train`; model: the trained model; history: its
            :class:`famviz.fam.History`; stopped: ended by the stop button; seconds: wall time.
    """

    label: str
    settings: dict
    model: nn.Module = field(repr=False)
    history: fam.History = field(repr=False)
    stopped: bool
    seconds: float


class TrainingExplorer(Dashboard):
    """Train a copy of a model with :func:`famviz.fam.train` from the same initialization and
    the same mini-batches every run, so runs differ only by the method and its strength.

    Controls: the method (SGD, FAM, SAM, ASAM), FAM's λ and SAM/ASAM's ρ (log scale), the number
    of epochs, start and stop. While a run trains (in a background thread, so stop works and the
    notebook stays responsive) the panels show train (solid) and test (dotted) loss and accuracy
    and κ of the feature layer after every epoch; the previous run stays in grey.

    Args:
        model: the initial network (never modified).
        train_data, test_data: ``(X, y)`` tensors (test optional).
        epochs, seed, lr, batch_size, momentum, layer, loss: as in :func:`famviz.fam.train`.
        lam, rho: initial λ and ρ (ρ: the method's default, ``famviz.fam.DEFAULT_RHO``, when
            None; SAM and ASAM each remember their own ρ).

    Attributes: ``method``, ``lam``, ``rho``, ``epochs`` (controls), ``start_button``,
    ``stop_button``, ``progress``, ``figure``; ``result``: the last :class:`TrainingRun`,
    ``previous``: the one before. :meth:`start`, :meth:`stop` and :meth:`wait` drive it from
    code.
    """

    css_class = "famviz-training"

    def __init__(self, model: nn.Module, train_data, test_data=None, *, epochs: int = 20,
                 seed: int = 0, lr: float = 0.05, batch_size: int = 64, momentum: float = 0.9,
                 layer: str | None = None, loss="cross_entropy", lam: float = fam.DEFAULT_LAM,
                 rho: float | None = None):
        super().__init__()
        check_model(model)
        self._model = copy.deepcopy(model)
        self._train, self._test = train_data, test_data
        self._fixed = {"lr": lr, "batch_size": batch_size, "momentum": momentum,
                       "layer": fam.last_linear(model) if layer is None else layer,
                       "loss": loss, "seed": int(seed)}
        style = {"description_width": "70px"}
        self.method = W.ToggleButtons(options=_METHODS, value="fam", description="method",
                                      style=style)
        self.lam = W.FloatLogSlider(value=lam, base=10, min=-4, max=0, step=0.1,
                                    description="FAM λ", readout_format=".2g", style=style)
        self._rho = {m: (fam.DEFAULT_RHO[m] if rho is None else rho) for m in ("sam", "asam")}
        self.rho = W.FloatLogSlider(value=self._rho["sam"], base=10, min=-3, max=0.5, step=0.1,
                                    description="SAM ρ", readout_format=".2g", style=style)
        self.epochs = W.IntSlider(value=int(epochs), min=1, max=max(200, int(epochs)),
                                  description="epochs", style=style)
        # no icons: they need Font Awesome, which a page offline cannot load
        self.start_button = W.Button(description="▶ start", button_style="success")
        self.start_button.add_class("famviz-start")
        self.stop_button = W.Button(description="■ stop", button_style="danger", disabled=True)
        self.stop_button.add_class("famviz-stop")
        self.progress = W.IntProgress(value=0, min=0, max=int(epochs), description="epoch",
                                      style=style)
        self.progress_label = W.Label(value=f"0 / {int(epochs)}")
        self.progress_label.add_class("famviz-epoch")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.method.observe(self._on_method, names="value")
        self.rho.observe(self._on_rho, names="value")
        self.epochs.observe(self._on_epochs, names="value")
        self.figure = go.Figure(make_subplots(rows=1, cols=3, subplot_titles=_PANELS,
                                              horizontal_spacing=0.08))
        for run, color in (("previous", _BEFORE), ("current", _NOW)):
            for col, key, dash in _TRACES:
                self.figure.add_scatter(x=[], y=[], mode="lines+markers", name=run,
                                        legendgroup=run, showlegend=key == "train_loss",
                                        line={"color": color, "dash": dash},
                                        marker={"size": 4}, row=1, col=col)
        # the legend names the runs; the line styles are explained once, for good
        self.figure.update_layout(
            height=340, margin={"l": 50, "r": 10, "t": 60, "b": 40},
            legend={"orientation": "h", "y": 1.2, "x": 0, "yanchor": "bottom"},
            annotations=[*self.figure.layout.annotations, {
                "text": "solid: train · dotted: test", "showarrow": False, "xref": "paper",
                "yref": "paper", "x": 1, "y": 1.2, "xanchor": "right", "yanchor": "bottom",
                "font": {"size": 12, "color": "#444"}}])
        self.figure.update_xaxes(title_text="epoch")
        self.figure.update_yaxes(**plots.log_axis(), row=1, col=1)
        self.figure.update_yaxes(**plots.log_axis(), row=1, col=3)
        self.figure_view = PlotView(self.figure, css_class="famviz-training-plot")
        self.previous: TrainingRun | None = None
        self._thread: threading.Thread | None = None
        self._busy = False  # True from start() until the run's thread has finished its work
        self._stop = threading.Event()
        self._enable()
        self._finish(
            W.Box([W.VBox([self.method, W.HBox([self.lam, self.rho]), self.epochs]),
                   W.VBox([W.HBox([self.start_button, self.stop_button]),
                           W.HBox([self.progress, self.progress_label])])],
                  layout=W.Layout(display="flex", flex_flow="row wrap")),
            self.figure_view.widget)
        self._set_status("ready: choose a method and press start")

    # ------------------------------------------------------------------------------ controls

    def _enable(self) -> None:
        running = self.running
        self.lam.disabled = running or self.method.value != "fam"
        self.rho.disabled = running or self.method.value not in ("sam", "asam")
        self.method.disabled = self.epochs.disabled = self.start_button.disabled = running
        self.stop_button.disabled = not running

    def _on_method(self, change) -> None:
        if change["new"] in self._rho:
            self.rho.value = self._rho[change["new"]]
        self._enable()

    def _on_epochs(self, change) -> None:
        if not self.running:
            self.progress.max = change["new"]
            self.progress_label.value = f"{self.progress.value} / {change['new']}"

    def _on_rho(self, change) -> None:
        if self.method.value in self._rho:
            self._rho[self.method.value] = change["new"]

    @property
    def running(self) -> bool:
        return self._busy

    def label(self) -> str:
        m = self.method.value
        extra = {"fam": f" λ={self.lam.value:.2g}", "sam": f" ρ={self.rho.value:.2g}",
                 "asam": f" ρ={self.rho.value:.2g}"}.get(m, "")
        return m.upper() + extra

    def start(self) -> None:
        """Start a run with the current settings (in a background thread)."""
        if self.running:
            raise RuntimeError("a run is in progress; stop it or wait for it first")
        m = self.method.value
        settings = dict(self._fixed, method=m, epochs=self.epochs.value,
                        lam=self.lam.value if m == "fam" else None,
                        rho=self.rho.value if m in ("sam", "asam") else None)
        label = self.label()
        self._stop.clear()
        self._busy = True
        self._shift_runs()
        self.progress.max, self.progress.value = settings["epochs"], 0
        self.progress_label.value = f"0 / {settings['epochs']}"
        self._thread = threading.Thread(target=self._run, args=(label, settings), daemon=True,
                                        name="famviz-training")
        self._thread.start()
        self._enable()
        self._set_status(f"training {label}: first epoch…", busy=True)

    def stop(self) -> None:
        """Ask the run to stop after the current epoch."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> TrainingRun | None:
        """Block until the run ends (or ``timeout`` seconds pass); return :attr:`result`."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.result

    # ------------------------------------------------------------------------------ running

    def _run(self, label: str, settings: dict) -> None:
        timer = Timer()
        try:
            model, history = fam.train(self._model, self._train, self._test,
                                       callbacks=[self._on_epoch], progress=False, **settings)
            stopped = history.stopped_early
            self.previous, self.result = self.result, TrainingRun(
                label, settings, model, history, stopped, timer())
            self.error = None
            last = history.last()
            summary = (f"κ {last['kappa']:.4g}, train loss {last['train_loss']:.3g}"
                       + (f", test accuracy {100 * last['test_accuracy']:.1f} %"
                          if self._test is not None else ""))
            verb = (f"stopped after {len(history)} of {settings['epochs']} epochs" if stopped
                    else f"finished {len(history)} epochs")
            in_kernel_thread(self._set_status, f"{label}: {verb} in {timer():.1f} s · {summary}")
        except Exception as exc:  # noqa: BLE001 - shown in the output area
            self._report(exc)
        finally:
            self._busy = False
            in_kernel_thread(self._enable)

    def _on_epoch(self, epoch: int, model: nn.Module, history: fam.History) -> bool:
        in_kernel_thread(self._draw, history)  # runs in the training thread
        return self._stop.is_set()

    def _draw(self, history: fam.History) -> None:
        offset = len(_TRACES)  # the current run's traces
        with self.figure.batch_update():
            for k, (_, key, _) in enumerate(_TRACES):
                self.figure.data[offset + k].update(x=list(history.epoch),
                                                    y=list(getattr(history, key)))
            self._log_ranges()
        self.figure_view.refresh()
        self.progress.value = len(history)
        self.progress_label.value = f"{len(history)} / {self.progress.max}"
        if self.running:
            self._set_status(f"training {self.label()}: epoch {len(history)} of "
                             f"{self.progress.max}", busy=True)

    def _shift_runs(self) -> None:
        """The last run's curves turn grey; the current ones are cleared."""
        n = len(_TRACES)
        with self.figure.batch_update():
            for k in range(n):
                now, before = self.figure.data[n + k], self.figure.data[k]
                before.update(x=now.x, y=now.y)
                now.update(x=[], y=[])
            name = self.result.label if self.result is not None else "previous"
            for k in range(n):
                self.figure.data[k].name = name
                self.figure.data[n + k].name = self.label()
            self._log_ranges()
        self.figure_view.refresh()

    def _log_ranges(self) -> None:
        """Decade ticks on the log panels (loss, κ) for the values both runs show."""
        for col in (1, 3):
            values = [v for (c, _, _), trace in zip(_TRACES * 2, self.figure.data)
                      if c == col for v in (trace.y or ())]
            self.figure.update_yaxes(**plots.log_axis(values), row=1, col=col)
