"""Per-update latency of each famviz dashboard on the digits MLP (all 1797 samples).

* ReparamExplorer: one α slider move = reparameterize, ``measure_all`` (fast preset, the
  default measures), two 1-D slices, the output check and the redraw. Goal: <= 300 ms per
  move. Also the share of the update spent outside the core (the widget's own overhead).
* LandscapeExplorer: one change of the seed = new directions, the 11 x 11 grid drawn, then the
  21 x 21 and 41 x 41 refinements (train and test).
* TrainingExplorer: seconds per epoch through the dashboard (background thread, live redraw
  after every epoch) against ``famviz.fam.train`` alone with the same settings.

Headless: the FigureWidgets are updated as in a notebook, but no browser renders them, so the
times are the kernel's side of an update (the browser's redraw of these small figures adds
tens of milliseconds).

    python benchmarks/widgets.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import time

from _common import fmt_ratio, fmt_time, paired_ratio, set_threads, table, time_interleaved, \
    trained_digits_mlp

import torch  # noqa: E402

import famviz as fv  # noqa: E402
from famviz.widgets import LandscapeExplorer, ReparamExplorer, TrainingExplorer  # noqa: E402
from famviz.widgets.reparam import DEFAULT_MEASURES  # noqa: E402

GOAL_REPARAM = 0.300


def bench_reparam(model, data, repeats: int) -> list[list[str]]:
    rows = []
    for layer, dtype in (("2", torch.float64), ("4", torch.float64), ("2", torch.float32)):
        e = ReparamExplorer(model, data, layer=layer, dtype=dtype)
        slider = e.alpha[("0", "2")]
        values = itertools.cycle([3.0, 0.3])  # every move changes the model

        def move():
            slider.value = next(values)
            assert e.error is None, e.error

        def core_only():  # the same computations without the widget
            m = e.model()
            e._measure(m)
            fv.reparam.max_output_change(e._start_model, m, data)
            e._slice(m, e._raw_direction)
            e._slice(m, fv.landscape.normalize_direction(e._direction, m))

        t = time_interleaved({"move": move, "core": core_only}, repeats, warmup=2)
        secs = t["move"].median
        rows.append([f"α slider move, layer {layer}, {str(dtype).removeprefix('torch.')}",
                     fmt_time(secs), fmt_ratio(paired_ratio(t["move"], t["core"])),
                     "≤ 300 ms", "PASS" if secs <= GOAL_REPARAM else "MISS"])
    return rows


def bench_landscape(model, data, test, repeats: int) -> list[list[str]]:
    e = LandscapeExplorer(model, data, test_data=test, resolution=41, background=False)
    seeds = itertools.count(1)
    firsts, totals = [], []
    for _ in range(repeats):
        e.seed.value = next(seeds)
        assert e.error is None, e.error
        firsts.append(e.result.seconds[0])
        totals.append(e.result.seconds[-1])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return [["seed change: 11 × 11 drawn (train + test)", fmt_time(med(firsts)), "", "", ""],
            ["seed change: refined to 41 × 41", fmt_time(med(totals)), "", "", ""]]


def bench_training(model, data, test, epochs: int, repeats: int) -> list[list[str]]:
    rows = []
    for method in ("sgd", "fam"):
        e = TrainingExplorer(model, data, test, epochs=epochs, seed=0)
        e.method.value = method

        def dashboard():
            e.start()
            run = e.wait()
            assert e.error is None and len(run.history) == epochs, e.error

        def plain():
            fv.fam.train(model, data, test, method, lam=e.lam.value if method == "fam" else None,
                         epochs=epochs, seed=0, batch_size=64, progress=False)

        t = time_interleaved({"dashboard": dashboard, "plain": plain}, repeats)
        rows.append([f"{method.upper()} epoch via dashboard (batch 64, κ tracked)",
                     fmt_time(t["dashboard"].median / epochs),
                     fmt_ratio(paired_ratio(t["dashboard"], t["plain"])), "", ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    repeats = 3 if args.quick else 9
    tm = trained_digits_mlp()
    (X, y), (Xt, yt) = fv.data.digits(seed=0)
    print(f"{tm.describe()}; torch {torch.__version__}, {threads} thread(s)")
    print(f"ReparamExplorer measures: {', '.join(DEFAULT_MEASURES)} (fast preset)\n")
    start = time.perf_counter()
    rows = bench_reparam(tm.model, tm.data, repeats)
    rows += bench_landscape(tm.model, (X, y), (Xt, yt), max(3, repeats // 3))
    rows += bench_training(fv.models.mlp([64, 128, 64, 10], seed=0), (X, y), (Xt, yt),
                           epochs=3, repeats=max(3, repeats // 3))
    print(table(["update", "median time", "÷ core alone", "goal", "verdict"], rows,
                title="Dashboard latency (kernel side)"))
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
