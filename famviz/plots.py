"""plotly figures made from famviz result objects.

Imports plotly and the famviz core, never ipywidgets: every function returns a
``plotly.graph_objects.Figure``; pass ``fig=`` an existing figure to redraw it in place (its
traces are kept when their types match).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .landscape import Slice1D, Slice2D

__all__ = ["surface", "contour", "curve", "axis_title", "measures_bar", "measure_name",
           "log_axis"]

_TRAIN, _TEST = "#1f77b4", "#d62728"

#: short names of the measures for axes and legends (the long label, with the paper, is the
#: hover text)
SHORT_NAMES = {
    "relative_flatness": "κ (relative flatness)",
    "hessian_trace": "Tr(H)",
    "hessian_top_eigenvalue": "λ_max(H)",
    "hessian_frobenius": "‖H‖_F",
    "eps_sharpness": "ε-sharpness",
    "adaptive_sharpness": "adaptive sharpness",
    "adaptive_sharpness_average": "adaptive sharpness (avg)",
    "average_flatness": "average-case flatness",
    "worst_case_flatness": "worst-case flatness",
    "pac_bayes_flatness": "PAC-Bayes 1/σ²",
    "fisher_rao_norm": "Fisher–Rao norm",
    "basin_volume": "basin radius",
}


def measure_name(name: str) -> str:
    """A measure's short human name (``"hessian_trace"`` → ``"Tr(H)"``); unknown names are
    returned with underscores as spaces."""
    return SHORT_NAMES.get(name, name.replace("_", " "))


def log_axis(values=None, *, pad: float = 0.05, **extra) -> dict:
    """Layout of a log axis that labels decades only (10⁻¹, 1, 10, 10², …); plotly's default
    labels minor ticks too ("5 2 10 5 2 1"). With ``values`` (what the axis will show) the
    range is set to whole decades when they span one or more, so at least two labels show;
    within less than a decade plotly's own ticks (plain numbers) are kept. ``pad``: headroom
    in decades (e.g. for text above bars). ``extra`` is merged in (e.g. ``title=``)."""
    axis = {"type": "log", "exponentformat": "power", "minor": {"showgrid": False}}
    v = [float(x) for x in (values if values is not None else [])
         if x is not None and np.isfinite(x) and x > 0]
    if not v:
        axis.update(dtick=1)
    elif np.log10(max(v)) - np.log10(min(v)) >= 1:
        lo, hi = np.log10(min(v)) - pad, np.log10(max(v)) + pad
        axis.update(dtick=1, autorange=False, range=[float(np.floor(lo)), float(np.ceil(hi))])
    else:
        axis.update(dtick=None, autorange=True, range=None, tickformat=".3~g")
    return {**axis, **extra}


def _set_traces(fig: go.Figure, traces: list) -> None:
    """Put ``traces`` into ``fig``: in place when ``fig`` already holds traces of the same
    types in the same order (their properties are overwritten, the trace objects kept, so an
    update inside ``batch_update`` is a single restyle), else by replacing ``fig.data``."""
    if [t.type for t in fig.data] == [t.type for t in traces]:
        for old, new in zip(fig.data, traces):
            props = new.to_plotly_json()
            props.pop("type", None)
            # a property the new trace leaves unset is reset, not kept from the old one
            for key in old.to_plotly_json():
                if key not in props and key not in ("type", "uid"):
                    props[key] = None
            old.update(props)
    else:
        fig.data = []
        fig.add_traces(traces)


def axis_title(s: Slice1D | Slice2D, axis: int = 0) -> str:
    """What a slice coordinate means, e.g. ``"a along d1 (random, filter-normalized)"``."""
    dirs = s.meta.get("directions", [])
    d = dirs[axis] if axis < len(dirs) else {}
    kind = d.get("kind", "custom")
    # a, b: not α, which names the rescaling factor of the reparameterizations
    symbol = "ab"[axis] if axis < 2 else "c"
    if kind == "interpolation":
        return "t: 0 = model A, 1 = model B"
    norm = d.get("norm", "none")
    norm_text = {"filter": "filter-normalized", "layer": "layer-normalized"}.get(norm, "unnormalized")
    extra = f", λ = {d['eigenvalue']:.3g}" if "eigenvalue" in d else ""
    return f"{symbol} along d{axis + 1} ({kind}, {norm_text}{extra})"


def _short_axis_title(s: Slice1D | Slice2D, axis: int) -> str:
    """What fits on a 3-D axis: ``"a (d1)"``; the contour plot beside says the rest."""
    dirs = s.meta.get("directions", [])
    d = dirs[axis] if axis < len(dirs) else {}
    if d.get("kind") == "interpolation":
        return "t (0: A, 1: B)"
    return f"{'ab'[axis] if axis < 2 else 'c'} (d{axis + 1})"


def _check(s, cls):
    if not isinstance(s, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(s).__name__}")


def _grid(s: Slice2D, test: bool, log: bool) -> tuple[np.ndarray, str]:
    """The values a 2-D figure draws (log10 if ``log``) and their label."""
    if test and s.test_values is None:
        raise ValueError("this slice has no test values: compute it with test_data=")
    z = s.test_values if test else s.values
    zz = np.log10(np.maximum(z, 1e-12)) if log else z
    return zz, ("log10 " if log else "") + ("test" if test else "train") + " loss"


def surface(s: Slice2D, *, test: bool = False, log: bool = False, fig: go.Figure | None = None,
            title: str | None = None) -> go.Figure:
    """3-D surface of a 2-D slice, the unperturbed model marked by a point.

    ``values[i, j]`` sits at ``(x[i], y[j])``; plotly's ``z[row][col]`` is at ``(x[col], y[row])``,
    hence the transpose.
    """
    _check(s, Slice2D)
    zz, label = _grid(s, test, log)
    fig = fig if fig is not None else go.Figure()
    i, j = s.centre_index
    with fig.batch_update():
        _set_traces(fig, [
            go.Surface(x=s.x, y=s.y, z=zz.T, colorscale="Viridis", name=label,
                       colorbar={"title": {"text": label, "side": "right"}, "len": 0.8,
                                 "thickness": 15}),
            go.Scatter3d(x=[0.0], y=[0.0], z=[zz[i, j]], mode="markers",
                         marker={"size": 5, "color": "red"}, name="model")])
        # short axis titles: long ones are clipped in the 3-D scene; the full ones in the title
        fig.update_layout(
            title={"text": title or f"Loss surface ({label})", "font": {"size": 13}},
            scene={"xaxis_title": _short_axis_title(s, 0),
                   "yaxis_title": _short_axis_title(s, 1), "zaxis_title": "",
                   "aspectmode": "cube"},
            margin={"l": 0, "r": 0, "t": 40, "b": 0},
        )
    return fig


def contour(s: Slice2D, *, test: bool = False, trajectory: np.ndarray | None = None,
            levels: int = 30, log: bool = True, fig: go.Figure | None = None,
            title: str | None = None) -> go.Figure:
    """Contour plot of a 2-D slice with the unperturbed model marked; ``trajectory`` is an
    (T, 2) array of coordinates (e.g. :attr:`TrajectoryDirections.coords`) drawn as a path.
    Levels are log-spaced by default, since losses span orders of magnitude."""
    _check(s, Slice2D)
    zz, label = _grid(s, test, log)
    traces = [go.Contour(x=s.x, y=s.y, z=zz.T, ncontours=levels, colorscale="Viridis",
                         name=label, colorbar={"title": {"text": label, "side": "right"},
                                               "thickness": 15})]
    if trajectory is not None:
        t = np.asarray(trajectory, dtype=float)
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"trajectory must have shape (T, 2), got {t.shape}")
        traces.append(go.Scatter(x=t[:, 0], y=t[:, 1], mode="lines+markers",
                                 line={"color": "white"}, marker={"size": 4},
                                 name="trajectory"))
    traces.append(go.Scatter(x=[0.0], y=[0.0], mode="markers", name="model",
                             marker={"symbol": "x", "size": 11, "color": "red"}))
    fig = fig if fig is not None else go.Figure()
    with fig.batch_update():
        _set_traces(fig, traces)
        # the legend above the plot, clear of the colour bar on the right
        fig.update_layout(title={"text": title or f"Loss contours ({label})",
                                 "font": {"size": 13}},
                          xaxis_title=axis_title(s, 0), yaxis_title=axis_title(s, 1),
                          legend={"orientation": "h", "yanchor": "bottom", "y": 1.0,
                                  "xanchor": "right", "x": 1.0})
    return fig


def curve(*slices: Slice1D, labels=None, accuracy: bool = False, log: bool = False,
          fig: go.Figure | None = None, title: str | None = None) -> go.Figure:
    """1-D slices as curves, train solid and test dashed (when computed), the centre marked.
    Several slices (e.g. unnormalized vs filter-normalized) overlay with ``labels``."""
    if not slices:
        raise ValueError("pass at least one Slice1D")
    for s in slices:
        _check(s, Slice1D)
    labels = list(labels) if labels is not None else [
        s.meta.get("directions", [{}])[0].get("kind", f"slice {k + 1}")
        for k, s in enumerate(slices)]
    if len(labels) != len(slices):
        raise ValueError("labels must have one entry per slice")
    what = "accuracy" if accuracy else "loss"
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    dashes = ["solid", "dot", "dashdot", "longdash"]
    traces = []
    for k, (s, lab) in enumerate(zip(slices, labels)):
        color = palette[k % len(palette)]
        train = s.accuracy if accuracy else s.values
        test = s.test_accuracy if accuracy else s.test_values
        if train is None:
            raise ValueError("no accuracy in this slice (it needs class labels)")
        # overlapping curves stay distinguishable: each slice its own dash and markers
        traces.append(go.Scatter(x=s.x, y=train, mode="lines", name=f"{lab} · train",
                                 line={"color": color, "dash": dashes[k % len(dashes)]}))
        if test is not None:
            traces.append(go.Scatter(x=s.x, y=test, mode="lines", name=f"{lab} · test",
                                     line={"color": color, "dash": "dash"}))
        c = s.centre_index
        traces.append(go.Scatter(x=[0.0], y=[train[c]], mode="markers", showlegend=False,
                                 marker={"color": color, "size": 8}))
    fig = fig if fig is not None else go.Figure()
    with fig.batch_update():
        _set_traces(fig, traces)
        fig.update_layout(title=title or f"{what} along a direction",
                          xaxis_title=axis_title(slices[0], 0), yaxis_title=what,
                          yaxis=log_axis([v for t in traces for v in t.y]) if log
                          else {"type": "linear"})
    return fig


def measures_bar(table, *others, labels=None, relative: bool = False, log: bool | None = None,
                 fig: go.Figure | None = None, title: str | None = None) -> go.Figure:
    """Horizontal bars of a :class:`famviz.measures.MeasureTable`, one per measure, with
    standard-error bars; hovering shows the paper, the declared invariance and the cost.

    Several tables (``measures_bar(t0, t1, labels=["model", "T1 x10"])``, e.g. a model and its
    reparameterizations, measured with the same seed) give grouped bars; ``relative=True``
    divides every table's values by the first table's, so invariant measures sit at 1 and the
    others show how far a function-preserving change moved them. ``log`` (default: when every
    plotted value is positive) uses a log axis: the measures span orders of magnitude.
    """
    from .measures.table import MeasureTable

    tables = [table, *others]
    for t in tables:
        if not isinstance(t, MeasureTable):
            raise TypeError(f"expected MeasureTable(s) from measure_all, got {type(t).__name__}")
    labels = list(labels) if labels is not None else (
        ["model"] if len(tables) == 1 else [f"table {k + 1}" for k in range(len(tables))])
    if len(labels) != len(tables):
        raise ValueError("labels must have one entry per table")
    names = [r.name for r in tables[0]]
    for t in tables[1:]:
        if [r.name for r in t] != names:
            raise ValueError("the tables must hold the same measures in the same order")
    ref = {r.name: r.value for r in tables[0]}
    series = []
    for t in tables:
        xs, errs = [], []
        for r in t:
            scale = ref[r.name] if relative else 1.0
            ok = relative and scale != 0 and np.isfinite(scale)
            xs.append(r.value / scale if ok else (r.value if not relative else np.nan))
            se = r.stderr if np.isfinite(r.stderr) else 0.0
            errs.append(se / abs(scale) if ok else (se if not relative else 0.0))
        series.append((xs, errs))
    if log is None:
        log = all(x > 0 for xs, _ in series for x in xs if np.isfinite(x))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#d62728"]
    traces = []
    for k, (t, lab, (xs, errs)) in enumerate(zip(tables, labels, series)):
        hover = [
            f"{r.label}<br>value {r.value:.4g}"
            + (f" ± {r.stderr:.2g}" if np.isfinite(r.stderr) and r.stderr > 0 else "")
            + f"<br>higher is {r.higher_is}<br>"
            + ", ".join(f"{tr}: {v}" for tr, v in r.invariance.items())
            + f"<br>{r.cost.seconds:.3g} s" for r in t]
        traces.append(go.Bar(y=[measure_name(n) for n in names], x=xs, orientation="h",
                             name=lab,
                             error_x={"type": "data", "array": errs, "visible": True},
                             marker={"color": palette[k % len(palette)]},
                             hovertext=hover, hoverinfo="text"))
    fig = fig if fig is not None else go.Figure()
    with fig.batch_update():
        _set_traces(fig, traces)
        fig.layout.shapes = []
        if relative:
            fig.add_shape(type="line", x0=1.0, x1=1.0, xref="x", y0=0, y1=1, yref="paper",
                          line={"dash": "dot", "color": "gray"})
        fig.update_layout(
            title=title or ("measures relative to " + labels[0] if relative
                            else "flatness measures"),
            barmode="group", xaxis_type="log" if log else None,
            xaxis_title=("value / value of " + labels[0]) if relative else "value",
            yaxis={"autorange": "reversed"},
            height=min(1400, max(320, 120 + 22 * len(names) * len(tables))),
        )
        if log:
            fig.update_xaxes(**log_axis([x for xs, _ in series for x in xs]))
    return fig


# --- studies
# figures of famviz.study: a correlation table (famviz.study.correlations) and a run table
# (famviz.study.run); pandas objects, read by column name

__all__ += ["study_tau", "study_psi", "study_scatter"]


def _corr_check(corr) -> None:
    if not hasattr(corr, "columns") or "tau" not in corr.columns:
        raise TypeError("expected the DataFrame of famviz.study.correlations(...)")


def study_tau(corr, *, fig: go.Figure | None = None, title: str | None = None) -> go.Figure:
    """Kendall's τ per measure with its bootstrap interval, without and with the scramble.

    A measure that predicts the gap only through the parameterization loses its τ to the
    scramble; an invariant one keeps it exactly.
    """
    _corr_check(corr)
    names = list(corr.index)
    fig = fig if fig is not None else go.Figure()
    with fig.batch_update():
        fig.data = []
        for suffix, label, color in (("", "as trained", _TRAIN),
                                     ("_scrambled", "scrambled", _TEST)):
            tau = corr[f"tau{suffix}"].to_numpy(float)
            lo, hi = corr[f"tau_low{suffix}"].to_numpy(float), corr[f"tau_high{suffix}"].to_numpy(float)
            fig.add_trace(go.Bar(
                y=names, x=tau, orientation="h", name=label, marker={"color": color},
                error_x={"type": "data", "symmetric": False, "array": hi - tau,
                         "arrayminus": tau - lo, "visible": True},
                hovertext=[f"{n}<br>τ {t:.3f} [{a:.3f}, {b:.3f}]"
                           for n, t, a, b in zip(names, tau, lo, hi)], hoverinfo="text"))
        target = corr.attrs.get("target", "gap")
        fig.update_layout(
            title=title or f"Kendall τ with the {target}: as trained and after a random "
                           "function-preserving reparameterization",
            barmode="group", xaxis={"title": f"τ (positive: predicts a larger {target})",
                                    "range": [-1.05, 1.05]},
            yaxis={"autorange": "reversed"}, height=max(320, 120 + 44 * len(names)))
    return fig


def study_psi(corr, *, scrambled: bool = False, fig: go.Figure | None = None,
              title: str | None = None) -> go.Figure:
    """Granulated ψ per measure (rows) and axis (columns), with Ψ their mean, as a heatmap."""
    _corr_check(corr)
    suffix = "_scrambled" if scrambled else ""
    axes = [c[4:-1 - len(suffix)] if suffix else c[4:-1] for c in corr.columns
            if c.startswith("psi[") and c.endswith("]" + suffix)]
    cols = [f"psi[{a}]{suffix}" for a in axes] + [f"psi{suffix}"]
    z = corr[cols].to_numpy(float)
    fig = fig if fig is not None else go.Figure()
    with fig.batch_update():
        fig.data = []
        fig.add_trace(go.Heatmap(
            z=z, x=[*axes, "Ψ (mean)"], y=list(corr.index), zmin=-1, zmax=1,
            colorscale="RdBu", reversescale=True, colorbar={"title": "ψ"},
            text=np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.2f}")(z),
            texttemplate="%{text}"))
        fig.update_layout(
            title=title or "granulated Kendall ψ per axis (Jiang et al. 2020)"
                           + (", scrambled" if scrambled else ""),
            yaxis={"autorange": "reversed"}, height=max(320, 120 + 30 * len(corr)))
    return fig


def study_scatter(table, measure: str, target: str = "gap", color: str | None = None, *,
                  scrambled: bool = False, log: bool | None = None,
                  fig: go.Figure | None = None, title: str | None = None) -> go.Figure:
    """A measure against the target over the zoo, one colour per value of the axis ``color``
    (converged, error-free runs)."""
    col = f"{measure}_scrambled" if scrambled else measure
    for c in (col, target, color):
        if c is not None and c not in table.columns:
            raise ValueError(f"{c!r} is not a column of the table")
    keep = table["converged"].astype(bool) if "converged" in table else np.ones(len(table), bool)
    if "error" in table:
        keep &= table["error"].isna()
    t = table.loc[keep]
    x = t[col].to_numpy(float)
    if log is None:
        log = bool(len(x)) and bool((x > 0).all())
    groups = [(None, t)] if color is None else list(t.groupby(color, sort=True))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#d62728", "#e377c2"]
    fig = fig if fig is not None else go.Figure()
    with fig.batch_update():
        fig.data = []
        for k, (value, g) in enumerate(groups):
            fig.add_trace(go.Scatter(
                x=g[col], y=g[target], mode="markers",
                name=str(value) if color else measure,
                marker={"color": palette[k % len(palette)], "size": 8},
                hovertext=g["key"] if "key" in g else None))
        fig.update_layout(
            title=title or f"{col} against the {target}",
            xaxis={"title": col, "type": "log" if log else None},
            yaxis={"title": target}, legend={"title": {"text": color or ""}})
    return fig
