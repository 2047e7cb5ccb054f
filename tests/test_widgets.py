"""The dashboards without a browser: ipywidgets work headless, so setting a control runs the
callback, and the results, the figures and the state every view draws (the Outputs' figure
JSON) can be checked against the core."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
import torch

import famviz as fv
from famviz import reparam
from famviz.widgets import LandscapeExplorer, ReparamExplorer, TrainingExplorer
from tests.helpers import (
    assert_call_leaves_caller_alone,
    assert_same_state,
    model_state,
)

REL = 1e-9  # float64 evaluation: invariant readouts agree far beyond the digits shown


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def _readout(explorer: ReparamExplorer, name: str) -> str:
    """The text a user sees in the readout cell of one measure."""
    marker = f"data-measure='{name}'>"
    html = explorer.readout.value
    start = html.index(marker) + len(marker)
    return html[start:html.index("<", start)]


@pytest.fixture(scope="module")
def digits():
    (X, y), (Xt, yt) = fv.data.digits(seed=0)
    return (X[:300].double(), y[:300]), (Xt[:200].double(), yt[:200])


@pytest.fixture(scope="module")
def net():
    """64-24-16-10 ReLU MLP at initialization: no dead features on the data, so the std
    canonical form makes κ exactly T2-invariant (docs/math.md §2)."""
    return fv.models.mlp([64, 24, 16, 10], seed=8).double()


@pytest.fixture(scope="module")
def explorer(net, digits):
    return ReparamExplorer(net, digits[0], layer="2", steps=11)


# ----------------------------------------------------------------------------- ReparamExplorer


def test_reparam_explorer_finds_pairs_and_neighbours(explorer):
    assert list(explorer.alpha) == [("0", "2"), ("2", "4")]
    assert (explorer.below, explorer.layer, explorer.above) == ("0", "2", "4")
    assert explorer.result is not None and explorer.error is None
    assert all(v == pytest.approx(1.0) for v in explorer.result.ratios.values())


def test_t1_keeps_kappa_readout_and_moves_trace(explorer, net, digits):
    explorer.reset()
    kappa, trace = _readout(explorer, "relative_flatness"), _readout(explorer, "hessian_trace")
    explorer.alpha[("0", "2")].value = 10.0  # the slider's observer recomputes
    r = explorer.result
    assert _readout(explorer, "relative_flatness") == kappa
    assert _readout(explorer, "hessian_trace") != trace
    assert _rel(r.ratios["relative_flatness"], 1.0) < REL
    assert _rel(r.ratios["fisher_rao_norm"], 1.0) < REL
    assert r.ratios["hessian_trace"] > 2 and r.ratios["hessian_top_eigenvalue"] > 2
    assert r.max_output_change < 1e-10
    # the widget's numbers are the core's numbers for the same reparameterization
    expected = reparam.scale_layers(net, "0", "2", 10.0)
    assert _rel(r.table["hessian_trace"].value,
                float(fv.hessian_trace(expected, digits[0], dtype=torch.float64))) < 1e-10
    assert _rel(r.table["relative_flatness"].value,
                float(fv.relative_flatness(expected, digits[0], "2", dtype=torch.float64))) < 1e-10
    # the bar chart shows the ratios, the readout the values
    bar = explorer.measures_figure.data[0]
    assert list(bar.x) == [fv.plots.measure_name(n) for n in r.ratios]
    np.testing.assert_allclose(bar.y, list(r.ratios.values()))
    assert _readout(explorer, "hessian_trace") == fv.widgets._base.fmt(r.table["hessian_trace"].value)


def test_t1_moves_the_raw_slice_but_not_the_filter_normalized_one(explorer):
    explorer.reset()
    explorer.alpha[("0", "2")].value = 10.0
    r = explorer.result
    np.testing.assert_allclose(r.filtered.values, r.filtered_start.values, rtol=1e-9)
    assert np.max(np.abs(r.raw.values - r.raw_start.values)) > 1e-3
    now = explorer.slice_figure.data
    np.testing.assert_allclose(now[1].y, r.raw.values)
    np.testing.assert_allclose(now[3].y, r.filtered.values)
    np.testing.assert_allclose(now[0].y, r.raw_start.values)


def test_t3_and_t5_keep_kappa(explorer):
    explorer.reset()
    kappa = _readout(explorer, "relative_flatness")
    explorer.t3.value = 5.0
    assert _readout(explorer, "relative_flatness") == kappa
    assert _rel(explorer.result.ratios["relative_flatness"], 1.0) < REL
    assert explorer.result.ratios["hessian_trace"] != pytest.approx(1.0, rel=1e-3)
    explorer.set(t3=1.0, shift=3.0)
    r = explorer.result
    assert _readout(explorer, "relative_flatness") == kappa
    # with cross-entropy the Hessian is unchanged by the softmax shift, ε-sharpness is not
    assert _rel(r.ratios["hessian_trace"], 1.0) < 1e-8
    assert abs(r.ratios["eps_sharpness"] - 1.0) > 1e-6
    # the logits moved by about the shift, the softmax probabilities (what T5 preserves) not
    assert reparam.max_output_change(explorer._start_model, r.model, explorer._data) > 0.1
    assert r.compared == "probabilities" and r.max_output_change < 1e-12
    assert "T5" in explorer.readout.value


def test_t2_moves_kappa_unless_std_normalized(explorer, digits):
    assert float(reparam.feature_std(explorer._start_model, "2", digits[0]).min()) > 1e-6
    explorer.reset()
    explorer.t2.value = 5.0
    assert abs(explorer.result.ratios["relative_flatness"] - 1.0) > 1e-3
    explorer.normalize.value = True
    assert _rel(explorer.result.ratios["relative_flatness"], 1.0) < 1e-8
    assert explorer.result.table["relative_flatness"].invariance["T2"] == "invariant"


def _function_check(explorer):
    """The function check as the page shows it: (number, verdict words)."""
    html = explorer.readout.value
    verdict = html[html.index("famviz-verdict"):]
    return _readout(explorer, "max_output_change"), verdict[verdict.index(">") + 1:
                                                           verdict.index("<")]


def _softmax_change(explorer, model):
    """Independent reference: max |softmax(f_now) − softmax(f_start)| over the data."""
    X = explorer._data[0]
    with torch.no_grad():
        return float((torch.softmax(model(X), -1)
                      - torch.softmax(explorer._start_model(X), -1)).abs().max())


@pytest.mark.parametrize("setting", [{"alpha": {("0", "2"): 30.0}}, {"t2": 7.0}, {"t3": 0.2},
                                     {"shift": -4.0}, "randomize"])
def test_function_check_compares_what_each_transformation_preserves(explorer, setting):
    explorer.reset()
    r = explorer.randomize() if setting == "randomize" else explorer.set(**setting)
    assert r.compared == "probabilities"
    assert r.max_output_change == pytest.approx(_softmax_change(explorer, r.model), abs=1e-15)
    assert r.max_output_change < 1e-12
    number, words = _function_check(explorer)
    assert float(number) < 1e-12 and words == "the function is unchanged (rounding only)"


def test_function_check_words_follow_the_number(explorer):
    """A model that is not a reparameterization: the check must say so, with its number."""
    explorer.reset()
    other = fv.models.mlp([64, 24, 16, 10], seed=99).double()
    change, compared = explorer._function_change(other)
    assert compared == "probabilities"
    assert change == pytest.approx(_softmax_change(explorer, other), rel=1e-12)
    assert change > 1e-3
    explorer._draw(explorer.result.table, explorer.result.start, explorer.result.ratios,
                   change, compared, explorer.result.raw, explorer.result.filtered)
    number, words = _function_check(explorer)
    assert float(number) == pytest.approx(change, rel=0.05) and "CHANGED" in words
    explorer.reset()


def test_randomize_keeps_kappa_unless_t2_is_allowed(explorer):
    explorer.reset()
    for _ in range(3):  # toggle off: T2 is never drawn, κ's ratio stays 1
        r = explorer.randomize()
        assert r.settings["t2"] == 1.0 and not r.settings["normalize"]
        assert _rel(r.ratios["relative_flatness"], 1.0) < REL
    explorer.normalize.value = True  # toggle on: T2 drawn too, κ (std-normalized) still 1
    r = explorer.randomize()
    assert r.settings["t2"] != 1.0 and r.settings["normalize"]
    assert _rel(r.ratios["relative_flatness"], 1.0) < 1e-8
    explorer.reset()


def test_lecture_view_draws_ratios_against_alpha(explorer, net, digits):
    explorer.reset()
    results = explorer.sweep([0.1, 1.0, 10.0])
    assert explorer.lecture_pair == ("0", "2")
    fig = explorer.lecture_figure
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    by_name = dict(zip(explorer.measures, fig.data))
    assert list(by_name["relative_flatness"].x) == [0.1, 1.0, 10.0]
    np.testing.assert_allclose(by_name["relative_flatness"].y, 1.0, rtol=1e-9)
    # Tr(H) at α = 10 is the core's Tr(H) of the rescaled model over the start's
    expected = (float(fv.hessian_trace(reparam.scale_layers(net, "0", "2", 10.0), digits[0],
                                       dtype=torch.float64))
                / float(fv.hessian_trace(net, digits[0], dtype=torch.float64)))
    assert by_name["hessian_trace"].y[2] == pytest.approx(expected, rel=1e-9)
    assert results[2].ratios["hessian_trace"] == pytest.approx(expected, rel=1e-9)
    # another control away from the start: the point is not a T1-only point, not drawn
    explorer.t3.value = 3.0
    assert len(fig.data[0].x) == 3
    with pytest.raises(ValueError, match="alphas"):
        explorer.sweep([0.0])
    explorer.reset()


def test_figures_reach_every_view_as_widget_state(explorer):
    """What a late or reloaded view draws is the Output's state: the figure's current JSON."""
    explorer.reset()
    explorer.alpha[("0", "2")].value = 10.0
    for view in (explorer.measures_view, explorer.lecture_view, explorer.slice_view):
        (out,) = view.widget.outputs
        shown = out["data"]["application/vnd.plotly.v1+json"]
        assert shown["layout"].get("title", {}).get("text") == view.figure.layout.title.text
        assert len(shown["data"]) == len(view.figure.data)
    bar = explorer.measures_view.widget.outputs[0]["data"][
        "application/vnd.plotly.v1+json"]["data"][0]
    assert bar["x"] == [fv.plots.measure_name(n) for n in explorer.measures]
    explorer.reset()


def test_randomize_changes_everything_but_the_function_and_reset_returns(explorer):
    explorer.reset()
    start = dict(explorer.result.table.values())
    r = explorer.randomize()
    assert r.settings["alpha"]["0→2"] != 1.0 and r.settings["shift"] != 0.0
    assert _rel(r.ratios["fisher_rao_norm"], 1.0) < 1e-8
    r = explorer.reset()
    assert r.settings["t2"] == 1.0 and not r.settings["normalize"]
    for name, value in r.table.values().items():
        assert _rel(value, start[name]) < 1e-12, name


def test_reparam_callback_errors_show_in_the_output_and_clear(explorer):
    explorer.reset()
    good = explorer._data
    explorer._data = (good[0] * float("nan"), good[1])  # a failure inside the callback
    try:
        explorer.alpha[("2", "4")].value = 2.0  # must not raise
        assert explorer.error is not None and "ValueError" in explorer.error
        assert any("ValueError" in o.get("text", "") for o in explorer.output.outputs)
        assert "error" in explorer.status.value
    finally:
        explorer._data = good
    explorer.alpha[("2", "4")].value = 1.0
    assert explorer.error is None and "updated" in explorer.status.value


def test_reparam_explorer_leaves_caller_alone(net, digits):
    def call(model, data):
        e = ReparamExplorer(model, data, layer="2", steps=5, measures=["relative_flatness"])
        e.randomize()

    assert_call_leaves_caller_alone(call, net, digits[0])


def test_reparam_explorer_bad_input(net, digits):
    with pytest.raises(ValueError, match="unknown measure"):
        ReparamExplorer(net, digits[0], measures=["sharpness_of_doom"])
    with pytest.raises(ValueError, match="no pair"):
        ReparamExplorer(torch.nn.Linear(64, 10).double(), digits[0])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        ReparamExplorer(net, digits[0], layer="1")
    e = ReparamExplorer(net, digits[0], steps=5, measures=["relative_flatness"])
    assert e.t3 is None  # the output layer has no layer above
    with pytest.raises(ValueError, match="no t3 control"):
        e.set(t3=2.0)


# --------------------------------------------------------------------------- LandscapeExplorer


def test_landscape_explorer_draws_coarse_then_refines(net, digits):
    train, test = digits
    e = LandscapeExplorer(net, train, test_data=test, resolution=21, span=0.5)
    e.wait(120)
    assert e.error is None
    assert e.result.levels == [11, 21]
    assert e.result.seconds[0] <= e.result.seconds[1]
    s = e.result.slice
    # the refined grid is the core's slice_2d along the same directions
    d1 = fv.landscape.random_direction(net, "filter", seed=0)
    d2 = fv.landscape.random_direction(net, "filter", seed=1)
    ref = fv.landscape.slice_2d(net, train, d1, d2, (-0.5, 0.5), 21, test_data=test)
    np.testing.assert_allclose(s.values, ref.values, rtol=1e-9)
    np.testing.assert_allclose(s.test_values, ref.test_values, rtol=1e-9)
    surf = e.surface_figure.data[0]
    np.testing.assert_allclose(np.asarray(surf.z), np.log10(s.values).T)
    # train/test switches the view without recomputing
    e.which.value = "test"
    assert e.result.slice is s
    np.testing.assert_allclose(np.asarray(e.surface_figure.data[0].z), np.log10(s.test_values).T)
    np.testing.assert_allclose(np.asarray(e.contour_figure.data[0].z),
                               np.log10(s.test_values).T)


def test_landscape_explorer_controls_recompute(net, digits):
    e = LandscapeExplorer(net, digits[0], resolution=11, background=False)
    before = e.result.slice.values
    e.seed.value = 7
    assert e.result.settings["seed"] == 7
    assert not np.allclose(e.result.slice.values, before)
    e.kind.value = "hessian"
    assert e.error is None and e.norm.disabled
    assert e.result.slice.meta["directions"][0]["kind"] == "hessian"
    e.kind.value = "random"
    assert not e.norm.disabled
    assert e.which.disabled  # no test data


def test_landscape_explorer_keeps_only_the_latest_setting(net, digits):
    e = LandscapeExplorer(net, digits[0], resolution=41)
    for seed in (1, 2, 3):  # changes faster than a 41 x 41 grid is computed
        e.seed.value = seed
    e.wait(120)
    assert e.error is None
    assert e.result.settings["seed"] == 3 and e.result.levels == [11, 21, 41]
    d1 = fv.landscape.random_direction(net, "filter", seed=3)
    d2 = fv.landscape.random_direction(net, "filter", seed=4)
    ref = fv.landscape.slice_2d(net, digits[0], d1, d2, (-1.0, 1.0), 41)
    np.testing.assert_allclose(e.result.slice.values, ref.values, rtol=1e-9)


def _shown(view):
    return view.widget.outputs[0]["data"]["application/vnd.plotly.v1+json"]


def test_landscape_explorer_updates_in_place_and_shows_the_current_grid(net, digits):
    e = LandscapeExplorer(net, digits[0], resolution=21, background=False)
    surface = e.surface_figure.data[0]
    e.resolution.value = 11
    e.log.value = False
    assert e.surface_figure.data[0] is surface  # the trace kept, its arrays replaced
    np.testing.assert_allclose(np.asarray(surface.z), e.result.slice.values.T)
    for view in (e.surface_view, e.contour_view):  # what every view draws
        z = _shown(view)["data"][0]["z"]  # plotly's typed array: base64, dtype, shape
        values = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"])
        assert z["shape"] == "11, 11"
        np.testing.assert_allclose(values.reshape(11, 11), e.result.slice.values.T)
        assert _shown(view)["layout"]["title"]["text"] == view.figure.layout.title.text
    assert "train loss" in e.contour_figure.layout.title.text
    assert "log10" not in e.contour_figure.layout.title.text


def test_landscape_explorer_bad_input(net, digits):
    with pytest.raises(ValueError, match="resolution"):
        LandscapeExplorer(net, digits[0], resolution=30)
    with pytest.raises(ValueError, match="span"):
        LandscapeExplorer(net, digits[0], span=0)


# ---------------------------------------------------------------------------- TrainingExplorer


@pytest.fixture(scope="module")
def moons():
    return fv.data.moons(n_samples=200, seed=0)


def _history_values(h):
    d = h.to_dict()
    d.pop("time_per_step")
    return d


def test_training_explorer_runs_what_fam_train_runs(moons):
    train, test = moons
    model = fv.models.mlp([2, 16, 2], seed=0)
    before = model_state(model)
    e = TrainingExplorer(model, train, test, epochs=3, seed=1, batch_size=32)
    e.method.value = "fam"
    e.start()
    run = e.wait(120)
    assert e.error is None and not e.running
    assert run.label.startswith("FAM") and not run.stopped and len(run.history) == 3
    _, ref = fv.fam.train(model, train, test, "fam", lam=e.lam.value, epochs=3, seed=1,
                          batch_size=32, progress=False)
    assert _history_values(run.history) == _history_values(ref)
    current = e.figure.data[5:]
    assert list(current[0].y) == list(ref.train_loss)
    assert list(current[4].y) == list(ref.kappa)
    assert "finished 3 epochs" in e.status.value
    # a second run: the first becomes the grey "previous" one
    e.method.value = "sgd"
    e.start()
    e.wait(120)
    assert e.previous is run and e.result.label == "SGD"
    assert list(e.figure.data[0].y) == list(ref.train_loss)
    assert e.figure.data[0].name == run.label
    shown = _shown(e.figure_view)["data"]  # the state every view draws: the SGD run now
    assert shown[5]["name"] == "SGD" and shown[0]["name"] == run.label
    assert e.progress_label.value == "3 / 3"
    assert_same_state(before, model_state(model))


def test_training_explorer_stops_on_stop(moons):
    train, test = moons
    e = TrainingExplorer(fv.models.mlp([2, 16, 2], seed=0), train, test, epochs=200)
    e.method.value = "sgd"
    e.start()
    with pytest.raises(RuntimeError, match="in progress"):
        e.start()
    deadline = time.monotonic() + 60
    while e.progress.value < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    e.stop()
    run = e.wait(60)
    assert run.stopped and 1 <= len(run.history) < 200
    assert "stopped after" in e.status.value
    assert not e.running and not e.start_button.disabled and e.stop_button.disabled


def test_training_explorer_reports_errors_from_its_thread(moons):
    train, test = moons
    e = TrainingExplorer(fv.models.mlp([2, 16, 2], seed=0), train, test, epochs=5, lr=1e12)
    e.method.value = "sgd"
    e.start()
    e.wait(60)
    assert e.result is None and "FloatingPointError" in e.error
    assert any("FloatingPointError" in o.get("text", "") for o in e.output.outputs)
    assert not e.running


def test_training_explorer_remembers_rho_per_method(moons):
    e = TrainingExplorer(fv.models.mlp([2, 16, 2], seed=0), *moons)
    e.method.value = "sam"
    assert e.rho.value == pytest.approx(fv.fam.DEFAULT_RHO["sam"]) and not e.rho.disabled
    assert e.lam.disabled
    e.rho.value = 0.1
    e.method.value = "asam"
    assert e.rho.value == pytest.approx(fv.fam.DEFAULT_RHO["asam"])
    e.method.value = "sam"
    assert e.rho.value == pytest.approx(0.1)


# ------------------------------------------------------------------------------------- display


@pytest.mark.parametrize("make", ["reparam", "landscape", "training"])
def test_dashboards_display_as_one_widget_with_their_css_class(make, net, digits, moons):
    e = {"reparam": lambda: ReparamExplorer(net, digits[0], steps=5,
                                            measures=["relative_flatness"]),
         "landscape": lambda: LandscapeExplorer(net, digits[0], resolution=11,
                                                background=False),
         "training": lambda: TrainingExplorer(fv.models.mlp([2, 16, 2], seed=0), *moons)}[make]()
    bundle = e._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert f"famviz-{make}" in e.widget._dom_classes
