"""The study figures draw the numbers of the tables they are given."""

import numpy as np
import pytest

from famviz import plots
from famviz.study import correlations
from test_study_scores import _table


@pytest.fixture(scope="module")
def tables():
    t = _table()
    return t, correlations(t)


def test_tau_bars_with_intervals(tables):
    _, c = tables
    fig = plots.study_tau(c)
    plain, scr = fig.data
    assert list(plain.y) == list(c.index) and np.allclose(plain.x, c["tau"])
    assert np.allclose(scr.x, c["tau_scrambled"])
    assert np.allclose(np.asarray(plain.x) + np.asarray(plain.error_x.array), c["tau_high"])
    assert np.allclose(np.asarray(plain.x) - np.asarray(plain.error_x.arrayminus), c["tau_low"])


def test_psi_heatmap(tables):
    _, c = tables
    fig = plots.study_psi(c)
    assert list(fig.data[0].x) == ["a", "b", "Ψ (mean)"]
    assert np.allclose(np.asarray(fig.data[0].z, float), c[["psi[a]", "psi[b]", "psi"]], equal_nan=True)
    z = np.asarray(plots.study_psi(c, scrambled=True).data[0].z, float)
    assert np.allclose(z, c[["psi[a]_scrambled", "psi[b]_scrambled", "psi_scrambled"]], equal_nan=True)


def test_scatter_coloured_by_an_axis(tables):
    t, _ = tables
    t = t.copy()
    t.loc[0, "converged"] = False
    fig = plots.study_scatter(t, "good", color="b")
    assert [d.name for d in fig.data] == ["0", "1", "2", "3"]
    assert sum(len(d.x) for d in fig.data) == len(t) - 1
    first = t[(t.b == 0) & t.converged]
    assert np.allclose(fig.data[0].x, first["good"]) and np.allclose(fig.data[0].y, first["gap"])
    with pytest.raises(ValueError, match="'nope' is not a column"):
        plots.study_scatter(t, "nope")
    with pytest.raises(TypeError, match="correlations"):
        plots.study_tau(t)
