"""Flatness versus generalization: train a zoo of networks over a grid of hyperparameters,
measure each (with and without a random function-preserving reparameterization) and score how
well every measure predicts the generalization gap.

>>> import famviz as fv
>>> spec = fv.study.Spec(axes={"width": [16, 32]}, seeds=[0])      # doctest: +SKIP
>>> table = fv.study.run(spec, "my-study")                          # doctest: +SKIP
>>> fv.study.correlations(table, target="gap")                      # doctest: +SKIP

Runs are resumable (one file per finished run), failing configs become ``error`` rows, and any
``concurrent.futures.Executor`` runs them in parallel: a process pool, or Dask distributed on a
cluster (``distributed.Client(address).get_executor()``). See the README, "Studies".
"""

from .runner import KAPPA_STD, METRICS, load, run, run_one
from .scores import correlations, granulated_psi, kendall_tau, pearson_r, sign_error
from .spec import DIGITS_DEFAULTS, TRAIN_DEFAULTS, Spec

__all__ = ["Spec", "run", "run_one", "load", "correlations", "kendall_tau", "pearson_r",
           "granulated_psi", "sign_error", "DIGITS_DEFAULTS", "TRAIN_DEFAULTS", "METRICS",
           "KAPPA_STD"]
