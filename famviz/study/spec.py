"""What a study trains: hyperparameter axes over a base setup, expanded into run configs.

A config is a flat dict of JSON scalars (the base settings, one value per axis and a ``seed``);
each run is keyed by a hash of its config, the study's settings and the famviz version, so a
directory of finished runs can be resumed and never mixes runs of different code or settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..measures.table import MEASURES, PRESETS

__all__ = ["Spec", "DIGITS_DEFAULTS", "TRAIN_DEFAULTS", "OPTIMIZERS", "METHODS"]

#: the base optimizers of the study's trainer
OPTIMIZERS = ("sgd", "adam")
#: training methods: plain, FAM (Adilova et al. 2023), SAM (Foret et al. 2021), ASAM (Kwon et al.)
METHODS = ("sgd", "fam", "sam", "asam")

#: training settings, used by every zoo (built-in or the user's own)
TRAIN_DEFAULTS: dict = {
    "lr": 0.05,
    "batch_size": 64,
    "optimizer": "sgd",     # SGD with momentum, or Adam
    "momentum": 0.9,        # SGD only
    "weight_decay": 0.0,
    "method": "sgd",
    "lam": 0.01,            # FAM's λ
    "rho": None,            # SAM/ASAM's ρ: None = famviz.fam.DEFAULT_RHO
}

#: the built-in zoo: MLPs on scikit-learn's 8x8 digits
DIGITS_DEFAULTS: dict = {
    "width": 32,            # hidden units per layer
    "depth": 2,             # hidden layers
    "train_size": None,     # None: the whole training split (1347 samples)
    "label_noise": 0.0,     # fraction of training labels replaced by another class
    "split_seed": 0,        # the train/test split, shared by every run
    **TRAIN_DEFAULTS,
}

_SCALAR = (str, bool, int, float, type(None))


def _check_scalar(where: str, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}; values must be finite")
    if not isinstance(value, _SCALAR):
        raise TypeError(f"{where} is a {type(value).__name__}; configs hold JSON scalars only "
                        "(str, int, float, bool, None)")


def _name(f: Callable) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _positive_int(where: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where} must be a positive int, got {v!r}")


def _check_training(where: str, key: str, v) -> None:
    """The values the trainer needs, checked before any run starts."""
    if key == "optimizer" and v not in OPTIMIZERS:
        raise ValueError(f"{where}: unknown optimizer {v!r}; valid: {', '.join(OPTIMIZERS)}")
    if key == "method" and v not in METHODS:
        raise ValueError(f"{where}: unknown method {v!r}; valid: {', '.join(METHODS)}")
    if key in ("batch_size", "width", "depth"):
        _positive_int(f"{where} ({key})", v)
    if key == "train_size":
        _positive_int(f"{where} (train_size)", v, allow_none=True)
    if key in ("lr",) and not (isinstance(v, (int, float)) and v > 0):
        raise ValueError(f"{where}: lr must be > 0, got {v!r}")
    if key in ("momentum", "weight_decay", "lam") and not (
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"{where}: {key} must be a number >= 0, got {v!r}")
    if key == "rho" and v is not None and not (isinstance(v, (int, float)) and v >= 0):
        raise ValueError(f"{where}: rho must be None or a number >= 0, got {v!r}")
    if key == "label_noise" and not (isinstance(v, (int, float)) and 0 <= v < 1):
        raise ValueError(f"{where}: label_noise must lie in [0, 1), got {v!r}")
    if key == "split_seed" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ValueError(f"{where}: split_seed must be an int >= 0, got {v!r}")


@dataclass(frozen=True)
class Spec:
    """A study: every combination of the ``axes`` values, times every seed.

    Each run trains a network until its train cross-entropy reaches ``target_loss`` (Jiang et
    al. 2020 train to 0.01) or ``max_epochs`` pass (``converged`` is recorded), then measures
    it (:func:`famviz.measure_all` in float64, before and after a random function-preserving
    reparameterization; see :func:`famviz.study.run`).

    Args:
        axes: ``{name: [values, ...]}``, each a hyperparameter axis. For the built-in digits
            zoo the names are the keys of :data:`DIGITS_DEFAULTS` (width, depth, lr,
            batch_size, optimizer, momentum, weight_decay, train_size, label_noise, method,
            lam, rho); with ``make_model``/``make_data`` any name is allowed and the config is
            handed to them (the keys of :data:`TRAIN_DEFAULTS` still drive the trainer).
        seeds: one run per seed per combination (exact ints).
        base: fixed settings over the defaults (same names as ``axes``).
        make_model: ``make_model(config) -> nn.Module`` (seeded from ``config["seed"]``); a
            picklable (module-level) function when the study runs on other processes.
        make_data: ``make_data(config) -> ((X, y), (X_test, y_test))``; classification
            labels, cross-entropy loss.
        measures: names of :data:`famviz.measures.table.MEASURES` (None: all).
        preset: :func:`famviz.measure_all`'s preset (``"fast"`` by default).
        layer: the feature layer of κ and of the scramble (None: the last Linear layer).
        target_loss: train cross-entropy at which training stops, converged.
        max_epochs: the epoch cap (not converged if the target is not reached by then).
        measure_samples: training samples the measures see (None: all; the first ones of the
            training set, which the trainer has already shuffled by seed).
        scramble: the interval of the random factors of the reparameterization (Petzka et
            al. 2021 draw from U[5, 25]).
        threads: torch threads per run (results are computed with this many everywhere).

    >>> s = Spec(axes={"width": [16, 32], "lr": [0.01, 0.1]}, seeds=[0, 1])
    >>> len(s.configs()), s.configs()[0]["width"], s.configs()[0]["seed"]
    (8, 16, 0)
    """

    axes: Mapping[str, Sequence]
    seeds: Sequence[int] = (0,)
    base: Mapping = field(default_factory=dict)
    make_model: Callable | None = None
    make_data: Callable | None = None
    measures: Sequence[str] | None = None
    preset: str = "fast"
    layer: str | None = None
    target_loss: float = 0.01
    max_epochs: int = 200
    measure_samples: int | None = 512
    scramble: tuple[float, float] = (5.0, 25.0)
    threads: int = 1

    def __post_init__(self):
        if not isinstance(self.axes, Mapping) or not self.axes:
            raise ValueError("axes must be a non-empty dict {name: [values, ...]}")
        axes = {}
        for name, values in self.axes.items():
            if not isinstance(name, str) or not name or name == "seed":
                raise ValueError(f"axis name {name!r}: a non-empty str other than 'seed' "
                                 "(seeds go in seeds=)")
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise TypeError(f"axis {name!r} must be a list of values, got {values!r}")
            values = tuple(values)
            if not values:
                raise ValueError(f"axis {name!r} has no values")
            if len(set(map(json.dumps, values))) != len(values):
                raise ValueError(f"axis {name!r} repeats a value: {list(values)}")
            for v in values:
                _check_scalar(f"axis {name!r} value {v!r}", v)
            axes[name] = values
        object.__setattr__(self, "axes", axes)
        seeds = tuple(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                            for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct ints >= 0, got {list(self.seeds)}")
        object.__setattr__(self, "seeds", seeds)
        base = dict(self.base)
        for k, v in base.items():
            _check_scalar(f"base[{k!r}]", v)
        object.__setattr__(self, "base", base)
        custom = self.make_model is not None or self.make_data is not None
        if custom and (self.make_model is None or self.make_data is None):
            raise ValueError("a zoo of your own needs both make_model(config) and "
                             "make_data(config); pass neither for the built-in digits zoo")
        for f in (self.make_model, self.make_data):
            if f is not None and not callable(f):
                raise TypeError(f"make_model/make_data must be callables, got {f!r}")
        if not custom:
            unknown = [k for k in [*axes, *base] if k not in DIGITS_DEFAULTS]
            if unknown:
                raise ValueError(f"unknown settings {unknown} for the digits zoo; valid: "
                                 f"{', '.join(DIGITS_DEFAULTS)} (or pass make_model and "
                                 "make_data for a zoo of your own)")
        defaults = DIGITS_DEFAULTS if not custom else TRAIN_DEFAULTS
        for k in defaults:
            for v in axes.get(k, (base.get(k, defaults[k]),)):
                _check_training(f"setting {k!r}", k, v)
        if self.measures is not None:
            names = [self.measures] if isinstance(self.measures, str) else list(self.measures)
            bad = [n for n in names if n not in MEASURES]
            if bad or not names:
                raise ValueError(f"unknown measures {bad or names}; valid: {', '.join(MEASURES)}")
            object.__setattr__(self, "measures", tuple(names))
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        if not (isinstance(self.target_loss, (int, float)) and self.target_loss > 0):
            raise ValueError(f"target_loss must be > 0, got {self.target_loss!r}")
        _positive_int("max_epochs", self.max_epochs)
        _positive_int("measure_samples", self.measure_samples, allow_none=True)
        _positive_int("threads", self.threads)
        lo, hi = (float(x) for x in self.scramble)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"scramble must be an interval (low, high) with 0 < low <= high, "
                             f"got {self.scramble!r}")
        object.__setattr__(self, "scramble", (lo, hi))

    # ------------------------------------------------------------------------------------

    @property
    def custom(self) -> bool:
        """A zoo of the user's own (``make_model``/``make_data``) rather than digits MLPs."""
        return self.make_model is not None

    def configs(self) -> list[dict]:
        """Every run's config: defaults, then ``base``, then one value per axis and the seed;
        axes vary slowest-first in the order given, seeds fastest."""
        defaults = TRAIN_DEFAULTS if self.custom else DIGITS_DEFAULTS
        out = []
        names = list(self.axes)
        for combo in itertools.product(*self.axes.values()):
            for seed in self.seeds:
                out.append({**defaults, **self.base, **dict(zip(names, combo)), "seed": seed})
        return out

    def settings(self) -> dict:
        """Everything besides the config that a run's numbers depend on (part of its key)."""
        return {
            "zoo": "digits" if not self.custom else
                   {"make_model": _name(self.make_model), "make_data": _name(self.make_data)},
            "measures": list(self.measures) if self.measures is not None else None,
            "preset": self.preset,
            "layer": self.layer,
            "target_loss": float(self.target_loss),
            "max_epochs": self.max_epochs,
            "measure_samples": self.measure_samples,
            "scramble": list(self.scramble),
        }

    def key(self, config: Mapping) -> str:
        """The run's key: a hash of its config, :meth:`settings` and the famviz version."""
        from .. import __version__

        text = json.dumps({"config": dict(config), "settings": self.settings(),
                           "famviz": __version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def to_dict(self) -> dict:
        """JSON-ready description (the callables by qualified name), as written to the study
        directory."""
        return {"axes": {k: list(v) for k, v in self.axes.items()}, "seeds": list(self.seeds),
                "base": dict(self.base), "threads": self.threads, **self.settings()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Spec:
        """A built-in-zoo spec from a plain dict (a YAML file's content); unknown keys are
        refused with the valid ones listed."""
        valid = ("axes", "seeds", "base", "measures", "preset", "layer", "target_loss",
                 "max_epochs", "measure_samples", "scramble", "threads")
        bad = [k for k in d if k not in valid]
        if bad:
            raise ValueError(f"unknown spec keys {bad}; valid: {', '.join(valid)}")
        kw = dict(d)
        if "scramble" in kw:
            kw["scramble"] = tuple(kw["scramble"])
        return cls(**kw)
