"""famviz.study end to end and scaled out.

1. **The 128-network digits zoo** (7 axes x 2 values, 1 seed) trained to cross-entropy 0.01 and
   measured as trained and scrambled, on a Dask ``LocalCluster`` of 2 single-threaded workers
   (this machine has 2 cores): wall time against the goal of 10 minutes, and the correlation
   table it produces.
2. **Scale-out** on a subset of the zoo, each run in a fresh directory (nothing resumed) and on a
   freshly started executor whose workers have imported famviz already (start-up not timed):
   Dask with 1 worker, Dask with 2 workers, and a ``ProcessPoolExecutor`` with 2 workers.
   Goals: 2 Dask workers >= 1.7x the throughput of 1; Dask's overhead against the process pool
   <= 10 %.

    .venv/bin/python benchmarks/study.py            # what `make bench` runs (~10-20 min)
    .venv/bin/python benchmarks/study.py --quick    # smoke test: an 8-network zoo
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import _common  # noqa: F401  (puts this checkout first on sys.path)
import pandas as pd

import famviz as fv

AXES = {
    "width": [32, 128],
    "depth": [1, 2],
    "lr": [0.05, 0.1],
    "batch_size": [32, 128],
    "weight_decay": [0.0, 1e-4],
    "train_size": [500, None],
    "label_noise": [0.0, 0.05],
}
SETTINGS = {"max_epochs": 150, "measure_samples": 512}


def _warm():
    import famviz.study.runner  # noqa: F401

    return True


def dask_run(spec, workers: int, directory=None):
    import distributed

    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        c.run(_warm)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            table = fv.study.run(spec, directory or d, executor=c.get_executor(),
                                 progress=False)
            return time.perf_counter() - t0, table


def pool_run(spec, workers: int):
    ctx = multiprocessing.get_context("spawn")  # as Dask starts its workers
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_warm_one, range(4 * workers)))  # every worker started, famviz imported
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            table = fv.study.run(spec, d, executor=pool, progress=False)
            return time.perf_counter() - t0, table


def _warm_one(_):
    time.sleep(0.5)  # long enough that every worker gets one
    return _warm()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="an 8-network zoo, a 4-network subset")
    p.add_argument("--subset", type=int, default=16, help="networks in the scale-out runs")
    p.add_argument("--report-only", action="store_true",
                   help="score the zoo already in benchmarks/results/study-zoo (no training)")
    args = p.parse_args()
    axes = dict(AXES)
    if args.quick:
        axes = {k: AXES[k] for k in ("width", "lr", "label_noise")}
        args.subset = 4
    spec = fv.study.Spec(axes=axes, seeds=[0], **SETTINGS)
    n = len(spec.configs())
    print(f"famviz {fv.__version__}, torch {fv.fam.torch.__version__}, pandas {pd.__version__}")
    print(f"1. zoo of {n} networks, Dask LocalCluster with 2 single-threaded workers")
    zoo = _common.HERE / "results" / ("study-zoo-quick" if args.quick else "study-zoo")
    if args.report_only:
        table, seconds = fv.study.load(zoo, spec), float("nan")
    else:
        shutil.rmtree(zoo, ignore_errors=True)  # timed from scratch; kept for --report-only
        seconds, table = dask_run(spec, 2, zoo)
    failed = int(table["error"].notna().sum())
    print(f"   {seconds:.0f} s ({seconds / 60:.1f} min; goal <= 10 min: "
          f"{'met' if seconds <= 600 else 'MISSED'}; {zoo}), {int(table['converged'].sum())} of {n} "
          f"converged, {failed} failed, median {table['seconds'].median():.1f} s per network")
    corr = fv.study.correlations(table, target="gap")
    cols = ["tau", "tau_low", "tau_high", "psi", "pearson", "sign_error", "sign_error_max", "n",
            "tau_scrambled", "psi_scrambled"]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(f"   target: gap; left out: {corr.attrs['left_out']}")
        print(corr[cols].to_string())
        t2 = fv.study.correlations(table, target="gap", scramble="t2",
                                   measures=["relative_flatness", "relative_flatness_std"])
        print("   under T2 (neuron-wise scaling of the feature layer's inputs):")
        print(t2[["tau", "tau_scrambled", "psi", "psi_scrambled"]].to_string())
        err = fv.study.correlations(table, target="error_gap")
        print("   target: error_gap")
        print(err[["tau", "psi", "pearson", "tau_scrambled"]].to_string())
    if args.report_only:
        return

    # the subset: the last log2(subset) axes vary, the others keep their first value
    k = args.subset.bit_length() - 1
    if 2 ** k != args.subset or not 1 <= k <= len(axes):
        raise SystemExit(f"--subset must be a power of 2 up to {2 ** len(axes)}")
    names = list(axes)
    sub = fv.study.Spec(axes={a: axes[a] for a in names[-k:]}, seeds=[0],
                        base={a: axes[a][0] for a in names[:-k]}, **SETTINGS)
    m = len(sub.configs())
    print(f"2. scale-out on {m} networks (fresh directory and executor each, start-up not timed)")
    one, _ = dask_run(sub, 1)
    two, t_two = dask_run(sub, 2)
    pool, t_pool = pool_run(sub, 2)
    cols = [c for c in t_two.columns if c not in ("seconds", "measure_seconds")]
    same = t_two[cols].equals(t_pool[cols])
    print(f"   Dask 1 worker {one:.1f} s, Dask 2 workers {two:.1f} s, process pool 2 workers "
          f"{pool:.1f} s; tables identical: {same}")
    print(f"   speed-up 2 vs 1 Dask worker: {one / two:.2f}x (goal >= 1.7x: "
          f"{'met' if one / two >= 1.7 else 'MISSED'})")
    print(f"   Dask overhead vs the process pool: {100 * (two / pool - 1):+.1f} % (goal <= 10 %: "
          f"{'met' if two / pool - 1 <= 0.10 else 'MISSED'})")


if __name__ == "__main__":
    main()
