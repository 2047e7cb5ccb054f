"""SGD vs FAM vs SAM vs ASAM with matched hyperparameters: test accuracy, generalization gap and
relative flatness, mean ± std over seeds.

Run from the repository root:

    .venv/bin/python benchmarks/fam_compare.py            # default: 5 seeds (a few minutes)
    .venv/bin/python benchmarks/fam_compare.py --quick    # smoke test: 2 seeds, fewer epochs
    .venv/bin/python benchmarks/fam_compare.py --seeds 10 --datasets digits

Setup (the defaults; every method shares them — only the method differs):

* ``digits``: sklearn's 8x8 digits, 75/25 stratified split (split seed 0), MLP
  ``[64, 128, 64, 10]``; 20 epochs, batch 64, SGD lr 0.05, momentum 0.9, no weight decay.
* ``moons``: 500 two-moons points (coordinate noise 0.2), 75/25 split, 20 % of the *training*
  labels flipped (test labels clean), MLP ``[2, 64, 64, 2]``; 60 epochs, batch 32, same SGD.

Methods: ``sgd``; ``fam`` with λ ∈ {0.001, 0.01, 0.1} (exact gradient, last layer, κ
unnormalized) and λ = 0.01 with the frozen gradient; ``sam`` (ρ = 0.05); ``asam`` (ρ = 0.5,
η = 0.01). Seed s initializes the model (``famviz.models.mlp(..., seed=s)``) and drives the
shuffling; every method sees the same initializations and the same seeds.

Reported per method (mean ± std over seeds, after the last epoch): test accuracy; the
generalization gap, test loss − train loss (docs/math.md §5), and the accuracy gap, train − test
accuracy; κ of the last layer on the full training set (``famviz.relative_flatness``); mean time
per step (absolute times are only comparable within one run on this shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import set_threads, table  # noqa: E402

import torch  # noqa: E402

import famviz as fv  # noqa: E402
from famviz import fam  # noqa: E402

METHODS = [  # (label, train() keyword arguments)
    ("sgd", dict(method="sgd")),
    ("fam λ=0.001", dict(method="fam", lam=0.001)),
    ("fam λ=0.01", dict(method="fam", lam=0.01)),
    ("fam λ=0.1", dict(method="fam", lam=0.1)),
    ("fam λ=0.01 frozen", dict(method="fam", lam=0.01, gradient="frozen")),
    ("sam ρ=0.05", dict(method="sam", rho=0.05)),
    ("asam ρ=0.5", dict(method="asam", rho=0.5)),
]

DATASETS = {
    "digits": dict(widths=[64, 128, 64, 10], epochs=20, batch_size=64, lr=0.05, momentum=0.9),
    "moons": dict(widths=[2, 64, 64, 2], epochs=60, batch_size=32, lr=0.05, momentum=0.9),
}


def load(name: str):
    if name == "digits":
        return fv.data.digits(test_size=0.25, seed=0)
    return fv.data.moons(n_samples=500, noise=0.2, label_noise=0.2, test_size=0.25, seed=0)


def run(name: str, seeds: list[int], epochs: int | None) -> list[list[str]]:
    cfg = dict(DATASETS[name])
    widths = cfg.pop("widths")
    if epochs is not None:
        cfg["epochs"] = epochs
    train_data, test_data = load(name)
    results: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        model = fv.models.mlp(widths, seed=seed)
        for label, kw in METHODS:
            trained, h = fam.train(model, train_data, test_data, seed=seed, progress=False,
                                   track_kappa=False, **cfg, **kw)
            kappa = fv.relative_flatness(trained, train_data, h.layer).value
            r = results.setdefault(label, {k: [] for k in
                                           ("test_acc", "gap", "acc_gap", "kappa", "step")})
            r["test_acc"].append(100 * h.test_accuracy[-1])
            r["gap"].append(h.test_loss[-1] - h.train_loss[-1])
            r["acc_gap"].append(100 * (h.train_accuracy[-1] - h.test_accuracy[-1]))
            r["kappa"].append(kappa)
            r["step"].append(1e3 * statistics.fmean(h.time_per_step))

    def ms(xs: list[float], digits: int) -> str:
        sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
        return f"{statistics.fmean(xs):.{digits}f} ± {sd:.{digits}f}"

    rows = []
    for label, _ in METHODS:
        r = results[label]
        rows.append([name, label, ms(r["test_acc"], 2), ms(r["gap"], 3), ms(r["acc_gap"], 2),
                     ms(r["kappa"], 3), f"{statistics.median(r['step']):.2f}"])
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds and 5/15 epochs (smoke test)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    p.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs")
    p.add_argument("--datasets", default="digits,moons", help="comma-separated: digits,moons")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    n_seeds = 2 if args.quick else args.seeds
    if n_seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    start = time.perf_counter()
    rows = []
    for name in args.datasets.split(","):
        name = name.strip()
        if name not in DATASETS:
            raise SystemExit(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
        epochs = args.epochs
        if args.quick and epochs is None:
            epochs = {"digits": 5, "moons": 15}[name]
        rows += run(name, list(range(n_seeds)), epochs)
    print(f"torch {torch.__version__}, {threads} thread(s); {n_seeds} seeds; "
          f"{time.perf_counter() - start:.0f} s in all")
    print(table(["data", "method", "test acc %", "gap (test-train loss)", "acc gap (pts)",
                 "final κ", "ms/step"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
