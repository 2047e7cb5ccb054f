"""Figures from slice results: the data in the figure is the data of the slice, axes say what
the coordinates mean."""

import numpy as np
import plotly.graph_objects as go
import pytest

import famviz as fv
from famviz import landscape as ls
from famviz import plots

from helpers import tiny_mlp


@pytest.fixture(scope="module")
def slices():
    (X, y), (Xt, yt) = fv.data.digits(test_size=0.25, seed=0)
    data, test = (X[:100].double(), y[:100] % 5), (Xt[:50].double(), yt[:50] % 5)
    model = tiny_mlp([64, 8, 5], seed=0)
    d1 = ls.random_direction(model, seed=1)
    d2 = ls.random_direction(model, norm="none", seed=2)
    s2 = ls.slice_2d(model, data, d1, d2, steps=(7, 5), test_data=test)
    s1 = ls.slice_1d(model, data, d1, steps=9, test_data=test)
    return s1, s2


def test_surface_orientation_and_labels(slices):
    _, s2 = slices
    fig = plots.surface(s2)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (5, 7)  # rows run along y
    assert np.array_equal(z, s2.values.T)
    # short 3-D axis titles (long ones are clipped in a scene)
    assert fig.layout.scene.xaxis.title.text == "a (d1)"
    assert fig.layout.scene.yaxis.title.text == "b (d2)"
    assert fig.data[1].z[0] == pytest.approx(s2.centre_loss)


def test_contour_with_trajectory_and_test(slices):
    _, s2 = slices
    traj = np.array([[0.5, 0.5], [0.2, 0.1], [0.0, 0.0]])
    fig = plots.contour(s2, test=True, trajectory=traj, log=False)
    assert np.array_equal(np.asarray(fig.data[0].z), s2.test_values.T)
    assert list(fig.data[1].x) == [0.5, 0.2, 0.0]
    with pytest.raises(ValueError, match="shape"):
        plots.contour(s2, trajectory=np.zeros((3, 3)))


def test_curve_overlay_and_update_in_place(slices):
    s1, _ = slices
    fw = go.Figure()
    fig = plots.curve(s1, s1, labels=["a", "b"], fig=fw)
    assert fig is fw
    names = [t.name for t in fig.data if t.name]
    assert names == ["a · train", "a · test", "b · train", "b · test"]
    assert np.array_equal(np.asarray(fig.data[0].y), s1.values)
    plots.curve(s1, fig=fw, accuracy=True)  # redraw in place: old traces replaced
    assert len(fw.data) == 3 and np.array_equal(np.asarray(fw.data[0].y), s1.accuracy)
    with pytest.raises(TypeError):
        plots.curve(slices[1])


def test_redraw_keeps_the_traces_and_resets_what_is_not_set(slices):
    s1, s2 = slices
    fig = plots.contour(s2, log=False)
    traces = list(fig.data)
    plots.contour(s2, test=True, log=True, fig=fig)
    assert list(fig.data) == traces and all(a is b for a, b in zip(fig.data, traces))
    np.testing.assert_allclose(np.asarray(fig.data[0].z), np.log10(s2.test_values).T)
    fig = plots.curve(s1, s1, labels=["a", "b"])
    fig.data[0].hovertext = "stale"
    plots.curve(s1, s1, labels=["a", "b"], fig=fig)
    assert fig.data[0].hovertext is None
    assert fig.data[0].line.dash != fig.data[3].line.dash  # overlapping curves stay visible


def test_log_axes_tick_decades_and_measures_have_names():
    assert plots.log_axis()["dtick"] == 1 and plots.log_axis()["type"] == "log"
    wide = plots.log_axis([0.5, 1.0, 2205.0], title="ratio")
    assert wide["dtick"] == 1 and wide["range"] == [-1.0, 4.0] and wide["title"] == "ratio"
    narrow = plots.log_axis([0.3, 0.6])  # within a decade: plotly's plain ticks
    assert narrow["dtick"] is None and narrow["autorange"] is True
    assert plots.measure_name("hessian_top_eigenvalue") == "λ_max(H)"
    assert plots.measure_name("new_measure") == "new measure"


def test_plots_do_not_import_widgets():
    import subprocess
    import sys

    code = "import sys, famviz.plots; assert 'ipywidgets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
