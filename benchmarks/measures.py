"""Cost of every flatness measure of famviz on the trained digits MLP (all 1797 samples).

For each measure of ``famviz.measures.MEASURES``, with its paper defaults and with the "fast"
preset of ``measure_all``: the value, the forward/backward passes over the data and HVPs it
reports, and the median wall time of interleaved repeats, against the goal of at most 2 s per
measure (so a widget can call it). Then one ``measure_all`` call per preset, and a check of the
invariance table ``measure_all`` reports against what it measures on this model (float64, the
same seed before and after T1, T2 and T5 around the last layer).

    python benchmarks/measures.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import (
    fmt_time,
    rel_diff,
    set_threads,
    table,
    time_interleaved,
    trained_digits_mlp,
)

import torch  # noqa: E402

import famviz as fv  # noqa: E402
from famviz.measures import MEASURES, measure_all  # noqa: E402
from famviz.measures.table import MeasureTable  # noqa: E402

GOAL_SECONDS = 2.0
SEED = 0
LAYER = "4"


def run_one(name: str, preset: str, model, data) -> MeasureTable:
    return measure_all(model, data, layer=LAYER, measures=[name], seed=SEED, preset=preset)


def bench_costs(model, data, repeats: int) -> list[list[str]]:
    rows = []
    for name in MEASURES:
        if MEASURES[name].binary_only:  # the digits model has 10 classes (volume.py times it)
            continue
        for preset in ("default", "fast"):
            if preset == "fast" and not MEASURES[name].fast:
                continue
            r = run_one(name, preset, model, data)[name]
            t = time_interleaved({"m": lambda: run_one(name, preset, model, data)}, repeats)
            secs = t["m"].median
            c = r.cost
            rows.append([name, preset, f"{r.value:.4g}",
                         "" if r.stderr != r.stderr else f"{r.stderr:.2g}",
                         "-" if c.forward is None else str(c.forward),
                         "-" if c.backward is None else str(c.backward),
                         "-" if c.hvps is None else str(c.hvps), fmt_time(secs),
                         "PASS" if secs <= GOAL_SECONDS else "MISS"])
    return rows


def bench_all(model, data, repeats: int) -> list[list[str]]:
    rows = []
    for preset in ("default", "fast"):
        t = time_interleaved({"all": lambda: measure_all(model, data, layer=LAYER, seed=SEED,
                                                        preset=preset)}, repeats)
        rows.append([f"measure_all(preset={preset!r})", fmt_time(t["all"].median),
                     f"{sum(not s.binary_only for s in MEASURES.values())} measures"])
    return rows


def check_invariance(model, data) -> tuple[list[list[str]], bool]:
    """Declared vs measured on the digits MLP in float64 (fast preset, same seed)."""
    m64 = fv.models.mlp([64, 128, 64, 10], seed=0).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    X, y = data
    d64 = (X.double(), y)
    g = torch.Generator().manual_seed(1)
    changed = {
        "T1": fv.reparam.scale_layers(m64, "2", LAYER, 10.0),
        "T2": fv.reparam.scale_neurons(m64, "2", LAYER,
                                       10 ** (2 * torch.rand(64, generator=g) - 1)),
        "T5": fv.reparam.shift_logits(m64, LAYER, 3 * torch.randn(64, generator=g)),
    }
    base = measure_all(m64, d64, layer=LAYER, seed=SEED, preset="fast",
                       options={"hessian_top_eigenvalue": {"tol": 1e-10}})
    after = {t: measure_all(m, d64, layer=LAYER, seed=SEED, preset="fast",
                            options={"hessian_top_eigenvalue": {"tol": 1e-10}})
             for t, m in changed.items()}
    rows, ok = [], True
    for row in base:
        cells = [row.name]
        for t in ("T1", "T2", "T5"):
            declared = row.invariance[t]
            d = rel_diff(row.value, after[t][row.name].value)
            good = (d <= 1e-9) if declared == "invariant" else (d >= 1e-5)
            ok &= good
            cells.append(f"{declared} ({d:.1e}){'' if good else ' MISMATCH'}")
        rows.append(cells)
    return rows, ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one timed repeat instead of five")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    repeats = 1 if args.quick else 5
    start = time.perf_counter()
    tm = trained_digits_mlp(seed=SEED)
    print("famviz flatness-measure benchmark" + (" (--quick)" if args.quick else ""))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"torch.get_num_threads() = {threads}, float32, CPU")
    print(tm.describe())
    print(f"reference layer {LAYER!r}, seed {SEED}; timing: one warm-up, then the median of "
          f"{repeats} runs")
    print()
    print(table(["measure", "preset", "value", "± stderr", "forward", "backward", "HVPs",
                 "median time", f"<= {GOAL_SECONDS:g} s"],
                bench_costs(tm.model, tm.data, repeats), title="Cost per measure"))
    print()
    print(table(["call", "median time", ""], bench_all(tm.model, tm.data, repeats),
                title="All measures in one call"))
    print()
    rows, ok = check_invariance(tm.model, tm.data)
    print(table(["measure", "T1 (x10, layers 2/4)", "T2 (neurons of 2)", "T5 (logit shift)"],
                rows, title="Declared invariance (measured relative change), float64, "
                            "fast preset, same seed"))
    print(f"declarations {'all confirmed' if ok else 'CONTRADICTED'} on this model")
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
