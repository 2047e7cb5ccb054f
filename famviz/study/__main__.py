"""Command line of famviz.study.

    python -m famviz.study run SPEC.yaml DIR [--workers N | --scheduler ADDR]
    python -m famviz.study report DIR [--target gap] [--scramble t1t3|t2]

``run`` trains and measures every run of the spec (a YAML file with the arguments of
:class:`famviz.study.Spec` for the digits zoo: ``axes``, ``seeds``, ``base``, ``measures``,
...), resuming what ``DIR`` already holds: in this process, on ``N`` local worker processes
(a Dask ``LocalCluster`` when distributed is installed, else a process pool), or on the Dask
scheduler at ``ADDR`` (e.g. ``tcp://10.0.0.5:8786``; for SLURM start one with dask-jobqueue).
``report`` prints the correlation table and writes it (``correlations.csv``) and the figures
(``tau.html``, ``psi.html``, ``scatter.html``) to ``DIR/report/``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

__all__ = ["main"]

_SHOWN = ["tau", "tau_low", "tau_high", "psi", "pearson", "sign_error", "sign_error_max", "n",
          "tau_scrambled", "psi_scrambled", "pearson_scrambled", "sign_error_scrambled"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m famviz.study",
                                description="flatness-versus-generalization studies")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and measure the zoo of SPEC into DIR (resumes)")
    r.add_argument("spec", type=Path, help="YAML file with the Spec's arguments")
    r.add_argument("directory", type=Path)
    where = r.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="local worker processes (one torch thread each)")
    where.add_argument("--scheduler", default=None,
                       help="address of a running Dask scheduler, e.g. tcp://host:8786")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    s = sub.add_parser("report", help="print the correlation table, write the figures")
    s.add_argument("directory", type=Path)
    s.add_argument("--target", default="gap", help="gap (default), error_gap or any column")
    s.add_argument("--scramble", default="t1t3", choices=["t1t3", "t2"])
    s.add_argument("--color", default=None, help="axis colouring the scatter (default: first)")
    return p


@contextlib.contextmanager
def _executor(workers: int | None, scheduler: str | None):
    if scheduler is not None:
        import distributed

        with distributed.Client(scheduler) as client:
            yield client.get_executor()
        return
    if workers is None:
        yield None
        return
    if workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {workers}")
    try:
        import distributed
    except ImportError:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            yield pool
        return
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        yield client.get_executor()


def _run(args) -> int:
    import yaml

    from .runner import run
    from .spec import Spec

    if not args.spec.exists():
        raise SystemExit(f"no spec file {args.spec}")
    content = yaml.safe_load(args.spec.read_text())
    if not isinstance(content, dict):
        raise SystemExit(f"{args.spec} must hold a mapping (axes:, seeds:, ...)")
    try:
        spec = Spec.from_dict(content)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"{args.spec}: {exc}") from None
    with _executor(args.workers, args.scheduler) as executor:
        table = run(spec, args.directory, executor=executor, progress=not args.quiet)
    failed = table["error"].notna().sum()
    print(f"{len(table)} runs in {args.directory}: {int(table['converged'].sum())} converged, "
          f"{failed} failed")
    return 0


def _report(args) -> int:
    import pandas as pd

    from .. import plots
    from .runner import load
    from .scores import correlations

    try:
        table = load(args.directory)
        corr = correlations(table, target=args.target, scramble=args.scramble)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    out = args.directory / "report"
    out.mkdir(exist_ok=True)
    corr.to_csv(out / "correlations.csv")
    left = corr.attrs["left_out"]
    with pd.option_context("display.width", 200, "display.max_columns", 40,
                           "display.float_format", "{:.3f}".format):
        print(f"target: {args.target}; {len(table)} runs, left out: "
              f"{left['not_converged']} not converged, {left['error']} failed; scramble: "
              f"{args.scramble}")
        print(corr[[c for c in _SHOWN if c in corr]].to_string())
    axes = corr.attrs["axes"]
    color = args.color or (axes[0] if axes else None)
    best = corr["tau"].abs().idxmax()
    plots.study_tau(corr).write_html(out / "tau.html", include_plotlyjs=True)
    plots.study_psi(corr).write_html(out / "psi.html", include_plotlyjs=True)
    plots.study_scatter(table, best, args.target, color).write_html(
        out / "scatter.html", include_plotlyjs=True)
    print(f"wrote {out}/correlations.csv, tau.html, psi.html, scatter.html ({best})")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return _run(args) if args.command == "run" else _report(args)


if __name__ == "__main__":
    sys.exit(main())
