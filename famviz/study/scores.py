r"""How well a measure predicts generalization over a zoo: rank and linear correlations and the
conditional scores of the generalization-measure literature.

* **Kendall's τ** (τ-b, ties counted as in :func:`scipy.stats.kendalltau`) between the measure
  and the target over all runs, with a percentile bootstrap confidence interval (Jiang et al.
  2020).
* **Granulated Ψ** (Jiang et al. 2020, eq. 4): for axis :math:`i`, :math:`\psi_i` is τ over the
  runs that differ only in axis :math:`i` (everything else, the seed included, held fixed),
  averaged over those groups; :math:`\Psi` is the mean of the :math:`\psi_i`. Groups where τ is
  undefined (fewer than two runs, or a constant measure or target) are left out.
* **Pearson's r** (Petzka et al. 2021).
* **Sign-error** (Dziugaite et al. 2020): over the pairs of runs that differ in exactly one
  axis (same seed), the fraction whose measure difference and target difference disagree in
  sign (a tie in either counts ½); the mean over all pairs and the max over axes of the
  per-axis mean (the worst "environment").

Signs are oriented so that positive τ, Ψ, r mean "the measure predicts a larger gap": a
measure for which higher is flatter (the basin radius) enters negated.

References:
    Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio. *Fantastic Generalization
    Measures and Where to Find Them.* ICLR 2020.

    G. K. Dziugaite, A. Drouin, B. Neal, N. Rajkumar, E. Caballero, L. Wang, I. Mitliagkas,
    D. M. Roy. *In Search of Robust Measures of Generalization.* NeurIPS 2020.

    H. Petzka, M. Kamp, L. Adilova, C. Sminchisescu, M. Boley. *Relative Flatness and
    Generalization.* NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..measures.table import MEASURES
from .runner import SCRAMBLED, T2

__all__ = ["kendall_tau", "pearson_r", "granulated_psi", "sign_error", "correlations",
           "measure_columns", "SCRAMBLES"]

#: which reparameterization the "_scrambled" columns of the result read: T1+T3 or T2
SCRAMBLES = {"t1t3": SCRAMBLED, "t2": T2}
#: bootstrap resamples and confidence level of τ's interval
BOOTSTRAP, CONFIDENCE = 1000, 0.95


def kendall_tau(x, y) -> float:
    """Kendall's τ-b of two equally long sequences; NaN when either is constant or n < 2.

    >>> kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
    0.6666666666666666
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(_tau_b(x[None], y[None])[0])


def _tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """τ-b of each row pair of ``x``, ``y`` (shape (B, n)), by the n² pair signs."""
    n = x.shape[1]
    if n < 2:
        return np.full(len(x), np.nan)
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    concord = (sx * sy).sum(axis=(1, 2))
    nx, ny = (sx != 0).sum(axis=(1, 2)), (sy != 0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((nx > 0) & (ny > 0), concord / np.sqrt(nx * ny.astype(float)), np.nan)


def pearson_r(x, y) -> float:
    """Pearson's correlation; NaN when either sequence is constant or n < 2.

    >>> round(pearson_r([1, 2, 3], [2, 4, 7]), 6)
    0.993399
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / den if den > 0 else math.nan


def _groups(frame: pd.DataFrame, fixed: list[str]) -> list[list]:
    """Index labels of the rows that agree on every column of ``fixed`` (None and NaN values
    included, which pandas' groupby drops)."""
    if not fixed:
        return [list(frame.index)]
    groups: dict[tuple, list] = {}
    for idx, values in zip(frame.index, frame[fixed].itertuples(index=False, name=None)):
        groups.setdefault(tuple(map(repr, values)), []).append(idx)
    return list(groups.values())


def granulated_psi(frame: pd.DataFrame, measure: str, target: str, axes: Sequence[str],
                   seed: str | None = "seed") -> tuple[float, dict[str, float]]:
    """Jiang et al.'s granulated Ψ and the per-axis ψ_i (see the module docstring).

    Returns:
        ``(Ψ, {axis: ψ_i})``; ψ_i is NaN for an axis without any group where τ is defined,
        and Ψ the mean of the defined ψ_i.
    """
    psi = {}
    for axis in axes:
        fixed = [a for a in axes if a != axis] + ([seed] if seed in frame else [])
        taus = []
        for idx in _groups(frame, fixed):
            sub = frame.loc[idx]
            t = kendall_tau(sub[measure], sub[target])
            if not math.isnan(t):
                taus.append(t)
        psi[axis] = float(np.mean(taus)) if taus else math.nan
    defined = [v for v in psi.values() if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else math.nan), psi


def sign_error(frame: pd.DataFrame, measure: str, target: str, axes: Sequence[str],
               seed: str | None = "seed") -> tuple[float, float, dict[str, float]]:
    """Dziugaite et al.'s sign-error over pairs of runs differing in exactly one axis.

    Returns:
        ``(mean over all pairs, max over axes of the per-axis mean, {axis: mean})``; NaN where
        there is no pair.
    """
    per_axis, everything = {}, []
    for axis in axes:
        fixed = [a for a in axes if a != axis] + ([seed] if seed in frame else [])
        errors = []
        for idx in _groups(frame, fixed):
            m = frame.loc[idx, measure].to_numpy(float)
            g = frame.loc[idx, target].to_numpy(float)
            i, j = np.triu_indices(len(m), k=1)
            agree = np.sign(m[i] - m[j]) * np.sign(g[i] - g[j])
            errors.extend(((1.0 - agree) / 2.0).tolist())
        per_axis[axis] = float(np.mean(errors)) if errors else math.nan
        everything.extend(errors)
    defined = [v for v in per_axis.values() if not math.isnan(v)]
    return (float(np.mean(everything)) if everything else math.nan,
            max(defined) if defined else math.nan, per_axis)


def _orientation(measure: str) -> float:
    base = measure.removesuffix("_std")
    spec = MEASURES.get(base)
    return -1.0 if spec is not None and spec.higher_is == "flatter" else 1.0


def measure_columns(table: pd.DataFrame, scramble: str = "t1t3") -> list[str]:
    """The measure columns of a study table that have a scrambled counterpart."""
    suffix = SCRAMBLES[scramble]
    return [c for c in table.columns if not c.endswith((SCRAMBLED, T2))
            and f"{c}{suffix}" in table.columns]


def _scores(frame, column, target, axes, sign, rng_seed) -> dict:
    x = sign * frame[column].to_numpy(float)
    g = frame[target].to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(g)
    sub = frame.loc[ok].assign(_m=x[ok], _g=g[ok])
    n = int(ok.sum())
    tau = kendall_tau(x[ok], g[ok])
    low = high = math.nan
    if n >= 2:
        rng = np.random.default_rng(rng_seed)
        idx = rng.integers(0, n, size=(BOOTSTRAP, n))
        boot = _tau_b(x[ok][idx], g[ok][idx])
        boot = boot[np.isfinite(boot)]
        if len(boot):
            a = (1 - CONFIDENCE) / 2
            low, high = (float(v) for v in np.quantile(boot, [a, 1 - a]))
    psi, per_axis = granulated_psi(sub, "_m", "_g", axes)
    mean_err, max_err, _ = sign_error(sub, "_m", "_g", axes)
    out = {"tau": tau, "tau_low": low, "tau_high": high, "psi": psi,
           "pearson": pearson_r(x[ok], g[ok]), "sign_error": mean_err,
           "sign_error_max": max_err, "n": n}
    out.update({f"psi[{a}]": v for a, v in per_axis.items()})
    return out


def correlations(table: pd.DataFrame, target: str = "gap", measures: Sequence[str] | None = None,
                 *, axes: Sequence[str] | None = None, scramble: str = "t1t3",
                 converged_only: bool = True, seed: int = 0) -> pd.DataFrame:
    """One row per measure: how well it predicts ``target`` over the zoo, without and with the
    scramble.

    Args:
        table: :func:`famviz.study.run`'s table.
        target: the column to predict: ``"gap"`` (test − train loss), ``"error_gap"``, or any
            numeric column.
        measures: measure columns (default: every column with a scrambled counterpart).
        axes: the hyperparameter axes for Ψ and the sign-error (default: the table's
            ``attrs["axes"]`` as :func:`~famviz.study.run` sets it, else the config columns
            between ``key`` and ``seed``).
        scramble: ``"t1t3"`` (the ``_scrambled`` columns) or ``"t2"`` (``_t2``: the std
            normalization's test).
        converged_only: leave out runs that did not reach the target loss (counted in
            ``attrs["left_out"]``); runs with an ``error`` are always left out.
        seed: seed of the bootstrap.

    Returns:
        A DataFrame indexed by measure with ``tau``, ``tau_low``, ``tau_high``, ``psi``,
        ``psi[<axis>]``, ``pearson``, ``sign_error``, ``sign_error_max``, ``n``, each again
        with the suffix ``_scrambled``.
    """
    if scramble not in SCRAMBLES:
        raise ValueError(f"unknown scramble {scramble!r}; valid: {', '.join(SCRAMBLES)}")
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas.DataFrame (famviz.study.run's result), got "
                        f"{type(table).__name__}")
    if target not in table:
        raise ValueError(f"target {target!r} is not a column of the table; e.g. 'gap', "
                         "'error_gap'")
    suffix = SCRAMBLES[scramble]
    names = measure_columns(table, scramble) if measures is None else list(measures)
    missing = [m for m in names if m not in table or f"{m}{suffix}" not in table]
    if missing or not names:
        raise ValueError(f"measures {missing or names} lack a column or its '{suffix}' "
                         f"counterpart; valid: {measure_columns(table, scramble)}")
    if axes is None:
        axes = table.attrs.get("axes")
    if axes is None:
        cols = list(table.columns)
        axes = cols[cols.index("key") + 1:cols.index("seed")] if "key" in cols else []
    axes = list(axes)
    keep = pd.Series(True, index=table.index)
    if "error" in table:
        keep &= table["error"].isna()
    failed = int((~keep).sum())
    not_converged = 0
    if converged_only and "converged" in table:
        not_converged = int((keep & ~table["converged"].astype(bool)).sum())
        keep &= table["converged"].astype(bool)
    frame = table.loc[keep]
    rows = {}
    for name in names:
        sign = _orientation(name)
        row = _scores(frame, name, target, axes, sign, seed)
        scr = _scores(frame, f"{name}{suffix}", target, axes, sign, seed)
        row.update({f"{k}_scrambled": v for k, v in scr.items()})
        rows[name] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "measure"
    out.attrs.update({"target": target, "axes": axes, "scramble": scramble,
                      "left_out": {"error": failed, "not_converged": not_converged}})
    return out
