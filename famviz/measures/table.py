r"""Every flatness measure in one call: :func:`measure_all` returns a :class:`MeasureTable`, one
row per measure with its value, standard error, cost, settings and its declared behaviour under
the function-preserving reparameterizations of docs/math.md §2.

The declarations (``row.invariance``) refer to a reference Linear layer ``layer`` (the feature
layer of relative flatness), the Linear layer ``below`` feeding it through a ReLU and the one
``above`` it feeds, and are checked empirically by the test suite on random ReLU networks, each
measure computed with the same seed before and after the change:

* **T1** ``scale_layers(model, below, layer, alpha)``;
* **T2** ``scale_neurons(model, below, layer, c)`` (the neurons below the layer);
* **T3** ``scale_neurons(model, layer, above, r)`` (the rows of the layer; ``"n/a"`` for the
  output layer);
* **T5** ``shift_logits(model, output_layer, v)`` (``"n/a"`` unless the loss is softmax
  cross-entropy).

For the measures over all parameters T2 and T3 are both per-neuron rescalings of some hidden
layer, so their declarations coincide; only relative flatness tells them apart.

==========================  =========  =========  =========  =========
measure                     T1         T2         T3         T5
==========================  =========  =========  =========  =========
relative_flatness           invariant  changes    invariant  invariant
hessian_trace               changes    changes    changes    invariant
hessian_top_eigenvalue      changes    changes    changes    invariant
eps_sharpness               changes    changes    changes    changes
adaptive_sharpness          changes    changes    changes    changes
adaptive_sharpness_average  changes    changes    changes    changes
average_flatness            invariant  changes    changes    changes
worst_case_flatness         invariant  changes    changes    changes
pac_bayes_flatness          changes    changes    changes    invariant
fisher_rao_norm             invariant  invariant  invariant  invariant
basin_volume                changes    changes    changes    invariant
prior_volume                invariant  invariant  invariant  invariant
==========================  =========  =========  =========  =========

``prior_volume`` (binary tasks only; the volume of the model's own predictions on the data's
inputs) depends on the function alone; its T5 is ``"n/a"`` for a single logit.

Non-default options change some declarations, and the rows say so: adaptive sharpness with
``eta=0`` is invariant under T1, T2 and T3; relative flatness with ``normalize_features=True``
is invariant under T2 as well (provided no feature below is dead, docs/math.md §2); a measure
restricted to a parameter subset (``params=...``) declares nothing (``"not declared"``). When
the reference layer has no Linear layer below (above), T1 and T2 (T3) read ``"n/a"``.
"""

from __future__ import annotations

import html
import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..curvature import new_seed
from ..objective import Objective, check_finite_loss, check_option, resolve_layer
from ..replica import check_model
from ._base import (
    CHANGES,
    INVARIANT,
    NOT_APPLICABLE,
    TRANSFORM_DESCRIPTIONS,
    TRANSFORMS,
    UNDECLARED,
    Cost,
    check_seed,
)
from .fisher_rao import fisher_rao_norm
from .hessian import hessian_top_eigenvalue, hessian_trace
from .pac_bayes import pac_bayes_flatness
from .prior import _measure_all_entry as _prior_volume_entry
from .perturbation import (
    adaptive_sharpness,
    average_flatness,
    eps_sharpness,
    worst_case_flatness,
)
from .relative import relative_flatness
from .volume import basin_volume

__all__ = [
    "MeasureSpec",
    "MeasureRow",
    "MeasureTable",
    "MEASURES",
    "PRESETS",
    "FAST_LARGE_PARAMS",
    "measure_all",
]

PRESETS = ("default", "fast")
#: under ``preset="fast"``, a model with more parameters than this is "large": the measures then
#: also take their ``fast_large`` settings (each row's ``parameters`` records what it used)
FAST_LARGE_PARAMS = 100_000


@dataclass(frozen=True)
class MeasureSpec:
    """A measure as :func:`measure_all` runs it.

    Attributes:
        name: row name; ``label``: human-readable name with the paper.
        func: the measure function; ``kwargs``: fixed keyword arguments (e.g.
            ``kind="average"``).
        higher_is: ``"sharper"`` or ``"flatter"`` (or ``"more complex"``).
        fast: keyword arguments of the ``"fast"`` preset.
        fast_large: keyword arguments the ``"fast"`` preset adds on a large model (more than
            :data:`FAST_LARGE_PARAMS` parameters), where every pass over the data is slow: fewer
            Hessian-vector products, ascent steps and Monte-Carlo draws (see
            :func:`measure_all`).
        uses_layer: the function takes the reference layer (relative flatness).
        binary_only: the measure is defined for binary tasks only (one logit or two classes);
            measure_all leaves it out of the default list elsewhere.
    """

    name: str
    label: str
    func: Callable
    higher_is: str
    kwargs: dict = field(default_factory=dict)
    fast: dict = field(default_factory=dict)
    fast_large: dict = field(default_factory=dict)
    uses_layer: bool = False
    binary_only: bool = False


#: the measures of :func:`measure_all`, in table order
MEASURES: dict[str, MeasureSpec] = {s.name: s for s in [
    MeasureSpec("relative_flatness", "relative flatness κ (Petzka et al. 2021)",
                relative_flatness, "sharper", uses_layer=True),
    MeasureSpec("hessian_trace", "Tr(H)", hessian_trace, "sharper",
                fast_large={"probes": 6}),
    MeasureSpec("hessian_top_eigenvalue", "λ_max(H)", hessian_top_eigenvalue, "sharper",
                fast_large={"tol": 1e-2, "max_iter": 8}),
    MeasureSpec("eps_sharpness", "ε-sharpness, % (Keskar et al. 2017)", eps_sharpness,
                "sharper", fast={"steps": 10}, fast_large={"steps": 5}),
    MeasureSpec("adaptive_sharpness", "adaptive sharpness, worst case (Kwon et al. 2021)",
                adaptive_sharpness, "sharper", fast={"steps": 10}, fast_large={"steps": 5}),
    MeasureSpec("adaptive_sharpness_average",
                "adaptive sharpness, average case (Kwon et al. 2021)", adaptive_sharpness,
                "sharper", kwargs={"kind": "average"}, fast={"samples": 10},
                fast_large={"samples": 5}),
    MeasureSpec("average_flatness", "average-case flatness (Stutz et al. 2021)",
                average_flatness, "sharper", fast={"samples": 10}, fast_large={"samples": 5}),
    MeasureSpec("worst_case_flatness", "worst-case flatness (Stutz et al. 2021)",
                worst_case_flatness, "sharper", fast={"restarts": 3},
                fast_large={"restarts": 1, "steps": 5}),
    MeasureSpec("pac_bayes_flatness", "PAC-Bayes flatness 1/σ² (Jiang et al. 2020)",
                pac_bayes_flatness, "sharper", fast={"samples": 5, "steps": 8},
                fast_large={"samples": 2, "steps": 4}),
    MeasureSpec("fisher_rao_norm", "Fisher–Rao norm (Liang et al. 2019)", fisher_rao_norm,
                "more complex"),
    MeasureSpec("basin_volume", "basin mean radius (volume estimate)", basin_volume,
                "flatter", fast={"samples": 5, "steps": 6},
                fast_large={"samples": 2, "steps": 4}),
    MeasureSpec("prior_volume", "log prior volume log P(f) (Zhang et al. 2021)",
                _prior_volume_entry, "flatter", binary_only=True),
]}


@dataclass(frozen=True)
class MeasureRow:
    """One measure of a :class:`MeasureTable`.

    Attributes:
        name, label, higher_is: from the :class:`MeasureSpec`.
        value: the headline number (``float(result)``); ``stderr``: its standard error (NaN
            where there is none: worst cases; 0.0 where exact).
        invariance: declared behaviour under T1, T2, T3, T5.
        cost: passes over the data, HVPs (``None`` where not counted) and seconds.
        parameters: the settings used.
        seed: the seed the measure recorded (None if nothing was random).
        result: the measure's own result object (None when it failed).
        error: why the measure failed (``"ValueError: ..."``), or None. A failed row keeps the
            rest of the table: its value and stderr are NaN and it is shown as an error.
    """

    name: str
    label: str
    value: float
    stderr: float
    higher_is: str
    invariance: dict[str, str]
    cost: Cost
    parameters: dict
    seed: int | None
    result: object = field(repr=False)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "value": self.value, "error": self.error,
                "stderr": self.stderr, "higher_is": self.higher_is,
                "invariance": dict(self.invariance), "cost": self.cost.to_dict(),
                "parameters": _plain(self.parameters), "seed": self.seed}


@dataclass(frozen=True)
class MeasureTable:
    """The result of :func:`measure_all`: rows in :data:`MEASURES` order.

    ``layer`` is the reference layer, ``below``/``above`` the Linear layers the T1/T2 and T3
    declarations pair it with (None where there is none: those columns read ``"n/a"``).

    ``table["eps_sharpness"]`` is a row, ``table.values()`` maps names to values,
    ``table.invariance()`` names to declarations; ``to_dict()`` is JSON-ready; in a notebook
    the table renders as HTML, in a terminal ``print(table)`` gives text. ``fast_large`` is
    True when ``preset="fast"`` met a large model and added each measure's ``fast_large``
    settings (:data:`FAST_LARGE_PARAMS`).
    """

    rows: tuple[MeasureRow, ...]
    layer: str | None
    below: str | None
    above: str | None
    seed: int
    preset: str
    objective: object = field(repr=False)
    seconds: float = 0.0
    fast_large: bool = False

    def __getitem__(self, name: str) -> MeasureRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no measure {name!r} in this table; it has {self.names}")

    def __iter__(self) -> Iterator[MeasureRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def values(self) -> dict[str, float]:
        """``{name: value}`` of the measures that succeeded (see :meth:`errors`)."""
        return {r.name: r.value for r in self.rows if r.ok}

    def errors(self) -> dict[str, str]:
        """``{name: error}`` of the measures that failed."""
        return {r.name: r.error for r in self.rows if not r.ok}

    def invariance(self) -> dict[str, dict[str, str]]:
        return {r.name: dict(r.invariance) for r in self.rows}

    def to_dict(self) -> dict:
        info = self.objective
        return {"layer": self.layer, "below": self.below, "above": self.above,
                "seed": self.seed, "preset": self.preset, "fast_large": self.fast_large,
                "seconds": self.seconds,
                "objective": _plain(vars(info)) if info is not None else None,
                "rows": [r.to_dict() for r in self.rows]}

    # -- display ---------------------------------------------------------------------------

    def _cells(self) -> list[list[str]]:
        out = []
        for r in self.rows:
            c = r.cost
            if not r.ok:
                out.append([r.name, "error", r.error, r.higher_is,
                            *[r.invariance.get(t, "") for t in TRANSFORMS], "", "", "",
                            f"{c.seconds:.3f}"])
                continue
            out.append([r.name, _num(r.value), "" if math.isnan(r.stderr) else _num(r.stderr),
                        r.higher_is, *[r.invariance.get(t, "") for t in TRANSFORMS],
                        _count(c.forward), _count(c.backward), _count(c.hvps),
                        f"{c.seconds:.3f}"])
        return out

    _HEADERS = ("measure", "value", "± stderr", "higher is", *TRANSFORMS, "forward",
                "backward", "HVPs", "seconds")

    def to_text(self) -> str:
        """A plain-text (Markdown) table."""
        cells = [list(self._HEADERS)] + self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

        def line(row):
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        info = self.objective
        caption = (f"flatness measures — loss {info.loss}, {info.num_samples} samples, "
                   f"reference layer {self.layer!r}, seed {self.seed}, preset "
                   f"{self.preset!r}{' (large model)' if self.fast_large else ''}, "
                   f"{self.seconds:.2f} s" if info is not None else "")
        head = "".join(
            f'<th title="{html.escape(TRANSFORM_DESCRIPTIONS[h])}">{h}</th>'
            if h in TRANSFORM_DESCRIPTIONS else f"<th>{html.escape(h)}</th>"
            for h in self._HEADERS)
        body = []
        for row, cells in zip(self.rows, self._cells()):
            tds = [f'<td title="{html.escape(row.label)}">{html.escape(cells[0])}</td>']
            for h, c in zip(self._HEADERS[1:], cells[1:]):
                style = _STYLE.get(c, "") if h in TRANSFORMS else ""
                tds.append(f'<td style="{style}">{html.escape(c)}</td>')
            params = ", ".join(f"{k}={v}" for k, v in _plain(row.parameters).items())
            tds.append(f"<td><small>{html.escape(params)}</small></td>")
            body.append("<tr>" + "".join(tds) + "</tr>")
        return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}"
                f"<th>parameters</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


_STYLE = {INVARIANT: "color:#1a7f37", CHANGES: "color:#b35900", NOT_APPLICABLE: "color:#888",
          UNDECLARED: "color:#888"}


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _count(x) -> str:
    return "" if x is None else str(x)


def _plain(d: dict) -> dict:
    """JSON-friendly copy: tensors/dtypes/other objects as strings, numbers kept."""
    out = {}
    for k, v in d.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (bool, int, float, str)) else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


# ------------------------------------------------------------------------------ declarations


def _declared(name: str, opts: dict, *, loss_name: str) -> dict[str, str]:
    """Declarations of the measures implemented before this module (relative flatness, the
    Hessian measures); the others declare their own in their results."""
    if opts.get("params") is not None or opts.get("variant", "kappa") != "kappa":
        return {t: UNDECLARED for t in TRANSFORMS}
    t5 = INVARIANT if loss_name == "cross_entropy" else NOT_APPLICABLE
    if name == "relative_flatness":
        return {"T1": INVARIANT,
                "T2": INVARIANT if opts.get("normalize_features") else CHANGES,
                "T3": INVARIANT, "T5": t5}
    return {"T1": CHANGES, "T2": CHANGES, "T3": CHANGES, "T5": t5}


def _neighbours(model: nn.Module, layer: str) -> tuple[str | None, str | None]:
    """The Linear layers ``below`` (feeding ``layer`` through positively homogeneous
    operations) and ``above`` (fed by it), as :func:`famviz.reparam.consecutive_pairs` finds
    them; ``None`` where there is none. A model torch.fx cannot trace gives ``("?", "?")``:
    unknown, the declarations are then left as the measures state them."""
    from .. import reparam

    try:
        pairs = reparam.consecutive_pairs(model)
    except ValueError:  # not traceable
        return "?", "?"
    below = next((a for a, b in pairs if b == layer), None)
    above = next((b for a, b in pairs if a == layer), None)
    return below, above


def _is_binary(obj: Objective) -> bool:
    """One logit or two classes per sample (the tasks of the binary-only measures), read off
    the objective's one-sample pass."""
    shape = obj.sample_output_shape
    return len(shape) == 1 or (len(shape) == 2 and shape[1] in (1, 2))


def _default_layer(model: nn.Module) -> str | None:
    linear = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


# ------------------------------------------------------------------------------ measure_all


def measure_all(
    model: nn.Module,
    data,
    layer: str | None = None,
    loss="cross_entropy",
    measures=None,
    seed: int | None = None,
    *,
    preset: str = "default",
    options: dict[str, dict] | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    bn: str = "eval",
    progress: bool = False,
) -> MeasureTable:
    """Every flatness measure of famviz on one model, as a table.

    Args:
        model: the network (never modified).
        data: ``(X, y)`` or an iterable of ``(X, y)`` batches.
        layer: the reference ``nn.Linear`` layer: the feature layer of relative flatness and
            the layer the T1/T2/T3 declarations refer to (default: the last Linear layer).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable.
        measures: names from :data:`MEASURES` (default: all; relative flatness is left out
            when the model has no Linear layer, the prior volume unless the task is binary).
        seed: one seed for every stochastic measure (drawn and recorded if None).
        preset: ``"default"`` (each measure's paper defaults) or ``"fast"`` (fewer samples and
            steps, for interactive use: ``MEASURES[name].fast``). On a large model (more than
            :data:`FAST_LARGE_PARAMS` parameters, a CIFAR ResNet) ``"fast"`` also applies
            ``MEASURES[name].fast_large``: Tr(H) from 6 HVPs (Hutch++ where the trace is not
            exact), λ_max to a relative residual of 1e-2 in at most 8 Lanczos steps
            (``result.converged`` says whether it got there), 5 ascent steps and one start for
            the worst cases, 5 draws for the averages, 2 draws and 4 bisection steps for
            PAC-Bayes and the basin volume.
            Each row's ``parameters`` record what was used (and the table's ``fast_large``
            that the rule applied). See ``benchmarks/README.md`` for the costs.
        options: per-measure keyword overrides, e.g. ``{"eps_sharpness": {"eps": 5e-4}}``.
        dtype, device, bn: evaluation dtype, device and BatchNorm policy of every measure.
        progress: show a progress bar (``tqdm.auto``).

    Returns:
        A :class:`MeasureTable`.

    >>> import torch, famviz as fv
    >>> (X, y), _ = fv.data.digits(seed=0)
    >>> model = fv.models.mlp([64, 16, 10], seed=0)
    >>> t = measure_all(model, (X[:100], y[:100]), measures=["fisher_rao_norm", "eps_sharpness"],
    ...                 seed=0)
    >>> t.names, t["fisher_rao_norm"].invariance["T1"]
    (['fisher_rao_norm', 'eps_sharpness'], 'invariant')
    """
    start = time.perf_counter()
    check_model(model, needs_params=True)
    check_option("preset", preset, PRESETS)
    seed = check_seed(seed)
    seed = new_seed() if seed is None else seed
    options = dict(options or {})
    unknown = [k for k in options if k not in MEASURES]
    if unknown:
        raise ValueError(f"options for unknown measures {unknown}; valid: {list(MEASURES)}")
    for name, opts in options.items():
        if not isinstance(opts, dict):
            raise TypeError(f"options[{name!r}] must be a dict of keyword arguments, got "
                            f"{type(opts).__name__}")
        accepted = inspect.signature(MEASURES[name].func).parameters
        fixed = {"model", "data", "layer", "loss", "seed", "dtype", "device", "bn"}
        wrong = [k for k in opts if k not in accepted or k in fixed]
        if wrong:
            raise ValueError(
                f"options[{name!r}] has keywords {wrong} that {name} does not take here; it "
                f"takes {[k for k in accepted if k not in fixed]} (model, data, layer, loss, "
                "seed, dtype, device and bn are measure_all's own arguments)")
    if layer is None:
        layer = _default_layer(model)
    if layer is not None:
        resolve_layer(model, layer, (nn.Linear,))
    if measures is None:
        names = [n for n in MEASURES if layer is not None or not MEASURES[n].uses_layer]
    else:
        names = [measures] if isinstance(measures, str) else list(measures)
        if not names:
            raise ValueError(f"measures is empty; pass None for all of {list(MEASURES)}")
        for n in names:
            check_option("measure", n, tuple(MEASURES))
        if "relative_flatness" in names and layer is None:
            raise ValueError("relative_flatness needs a Linear layer; this model has none")
    obj = Objective(model, data, loss, dtype=dtype, device=device, bn=bn)
    # every measure reads the data through this objective's stream: checked once, a generator
    # read once, a DataLoader's private random state carried from measure to measure
    data = obj.batches
    with torch.no_grad():
        check_finite_loss(obj.loss(), "the loss at the centre (the unperturbed model)")
    below, above = _neighbours(model, layer) if layer is not None else (None, None)
    if measures is None and not _is_binary(obj):
        names = [n for n in names if not MEASURES[n].binary_only]

    large = (preset == "fast"
             and sum(p.numel() for p in model.parameters()) > FAST_LARGE_PARAMS)
    iterator = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="flatness measures")
    rows = []
    for name in iterator:
        spec = MEASURES[name]
        opts = {**spec.kwargs, **(spec.fast if preset == "fast" else {}),
                **(spec.fast_large if large else {}), **options.get(name, {})}
        common = {"loss": loss, "seed": seed, "dtype": dtype, "device": device, "bn": bn}
        t0 = time.perf_counter()
        try:
            if spec.uses_layer:
                result = spec.func(model, data, layer, **common, **opts)
            else:
                result = spec.func(model, data, **common, **opts)
            if getattr(result, "found", True) is False:  # e.g. PAC-Bayes without a finite σ
                raise ValueError(result.message)
        except Exception as exc:  # one failing measure keeps the other rows (shown as an error)
            rows.append(MeasureRow(
                name=name, label=spec.label, value=math.nan, stderr=math.nan,
                higher_is=spec.higher_is,
                invariance=_declared(name, opts, loss_name=obj.loss_name),
                cost=Cost(None, None, None, time.perf_counter() - t0), parameters=dict(opts),
                seed=None, result=None, error=f"{type(exc).__name__}: {exc}",
            ))
            continue
        seconds = time.perf_counter() - t0
        if hasattr(result, "invariance"):
            invariance, cost = dict(result.invariance), result.cost
            parameters = dict(result.parameters)
        else:
            invariance = _declared(name, opts, loss_name=obj.loss_name)
            cost = Cost(None, None, result.num_hvps, seconds)
            parameters = {k: v for k, v in opts.items()}
            parameters.setdefault("method", getattr(result, "method", None))
            if name == "relative_flatness":
                parameters["layer"] = layer
        # a transformation that does not exist around the reference layer is not a symmetry
        for t, missing in (("T1", below is None), ("T2", below is None), ("T3", above is None)):
            if missing and invariance.get(t) != UNDECLARED:
                invariance[t] = NOT_APPLICABLE
        rows.append(MeasureRow(
            name=name, label=spec.label, value=float(result),
            stderr=float(getattr(result, "stderr", math.nan)), higher_is=spec.higher_is,
            invariance=invariance, cost=cost, parameters=parameters,
            seed=getattr(result, "seed", None), result=result,
        ))
    return MeasureTable(tuple(rows), layer, below if below != "?" else None,
                        above if above != "?" else None, seed, preset, obj.info(),
                        time.perf_counter() - start, large)
