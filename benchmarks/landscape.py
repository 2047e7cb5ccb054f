"""Loss-surface slices: famviz's grid engine against loss-landscapes and per-point baselines.

Digits MLP 64-128-64-10 (trained), all 1797 samples, a 41x41 grid along two filter-normalized
random directions, everything in one process and interleaved:

* famviz ``landscape.slice_2d`` (batched Linear-stack engine);
* loss-landscapes ``random_plane`` (filter normalization; timed only — its directions are drawn
  from U[0, 1] and its grid is off-centre, so its values are not comparable);
* a naive loop: one ``functional_call`` on all data per grid point;
* the reference implementation's pattern: per grid point, re-iterate a DataLoader (batch 128);
* a floor: three bare GEMMs per grid point (the matrix products of one forward pass, nothing
  else).

Goals (issue 4): famviz <= 0.6x the naive loop, >= 1.5x faster than loss-landscapes, >= 20x
faster than the DataLoader loop, <= 2x the GEMM floor; an 11x11 preview under 0.1 s.

    .venv/bin/python benchmarks/landscape.py [--quick] [--threads N]

Accuracy: loss-landscapes' numbers are not checked (different directions); famviz's grid is
checked against the naive loop on the same directions before anything is timed.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from _common import (
    fmt_ratio,
    fmt_time,
    paired_ratio,
    set_threads,
    table,
    time_interleaved,
    trained_digits_mlp,
    verdict,
)

from famviz import landscape as ls

STEPS = 41
PREVIEW = 11


# ------------------------------------------------------------------------------ computations


def famviz_slice(model, data, d1, d2, steps=STEPS):
    return ls.slice_2d(model, data, d1, d2, span=(-1, 1), steps=steps).values


def per_point(model, d1, d2, loss_at, steps=STEPS):
    """The baselines' grid walk: build theta + a d1 + b d2 for one point, evaluate it."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    axis = ls.grid_axis((-1, 1), steps)
    out = np.empty((steps, steps))
    with torch.no_grad():
        for i, a in enumerate(axis):
            for j, b in enumerate(axis):
                out[i, j] = loss_at({n: theta[n] + a * d1[n] + b * d2[n] for n in theta})
    return out


def naive_loop(model, data, d1, d2, steps=STEPS):
    """One functional_call on all data per grid point."""
    X, y = data
    return per_point(model, d1, d2, lambda params: F.cross_entropy(
        functional_call(model, params, (X,)), y).item(), steps)


def dataloader_loop(model, data, d1, d2, steps=STEPS, batch_size=128):
    """The reference implementation's pattern: every grid point re-reads the data loader."""
    X, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                         batch_size=batch_size, shuffle=False)

    def loss_at(params):
        total = sum(F.cross_entropy(functional_call(model, params, (xb,)), yb,
                                    reduction="sum").item() for xb, yb in loader)
        return total / len(X)

    return per_point(model, d1, d2, loss_at, steps)


def gemm_floor(model, data, steps=STEPS):
    X, _ = data
    W = [m.weight.detach() for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for _ in range(steps * steps):
            h = X
            for w in W:
                h = h @ w.T
    return None


def loss_landscapes_plane(model, data, steps=STEPS):
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    X, y = data
    metric = Loss(F.cross_entropy, X, y)
    return loss_landscapes.random_plane(model, metric, distance=1, steps=steps,
                                        normalization="filter", deepcopy_model=True)


# ------------------------------------------------------------------------------------ report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every contender (default 1: on a shared "
                             "2-core machine a second thread waits on a busy core; 0 = torch's "
                             "default)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads or None)
    repeats = 3 if args.quick else 7

    tm = trained_digits_mlp()
    model, data = tm.model, tm.data
    print(f"torch {torch.__version__}, {threads} thread(s); {tm.describe()}")
    d1 = ls.random_direction(model, norm="filter", seed=1)
    d2 = ls.random_direction(model, norm="filter", seed=2)

    # correctness first: the engine against the independent per-point loop
    ours, ref = famviz_slice(model, data, d1, d2), naive_loop(model, data, d1, d2)
    worst = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"famviz grid vs per-point functional_call: max relative difference {worst:.1e}")
    engine = ls.slice_2d(model, data, d1, d2, steps=3).meta["engine"]

    try:
        import loss_landscapes  # noqa: F401

        peer = {"loss-landscapes random_plane": lambda: loss_landscapes_plane(
            copy.deepcopy(model), data)}
    except ImportError as exc:
        print(f"loss-landscapes not importable ({exc}); skipped")
        peer = {}

    fns = {
        "famviz slice_2d": lambda: famviz_slice(model, data, d1, d2),
        "naive functional_call loop": lambda: naive_loop(model, data, d1, d2),
        "GEMM floor (3 GEMMs/point)": lambda: gemm_floor(model, data),
        **peer,
    }
    t = time_interleaved(fns, repeats, budget=240)
    slow = time_interleaved({"famviz slice_2d": fns["famviz slice_2d"],
                             "DataLoader loop (batch 128)": lambda: dataloader_loop(
                                 model, data, d1, d2)}, 1 if args.quick else 3, min_repeats=1)
    preview = time_interleaved({"famviz 11x11 preview": lambda: famviz_slice(
        model, data, d1, d2, PREVIEW)}, repeats * 3, min_sample=0.05)

    fam = t["famviz slice_2d"]
    rows = []
    for name, timing in {**t, **{k: v for k, v in slow.items() if k != "famviz slice_2d"}}.items():
        rows.append([name, fmt_time(timing.median)])
    print()
    print(table(["41x41 grid, 1797 samples", "median time"], rows,
                title=f"Loss-surface slices (engine: {engine}; {repeats} interleaved rounds)"))

    goals = [
        ("famviz / naive loop", paired_ratio(fam, t["naive functional_call loop"]), 0.6),
        ("famviz / GEMM floor", paired_ratio(fam, t["GEMM floor (3 GEMMs/point)"]), 2.0),
        ("famviz / DataLoader loop",
         paired_ratio(slow["famviz slice_2d"], slow["DataLoader loop (batch 128)"]), 1 / 20),
    ]
    if peer:
        goals.append(("famviz / loss-landscapes",
                      paired_ratio(fam, t["loss-landscapes random_plane"]), 1 / 1.5))
    rows = [[name, fmt_ratio(r), f"<= {g:.3g}x", verdict(r, g, worst < 1e-4)]
            for name, r, g in goals]
    p = preview["famviz 11x11 preview"].median
    rows.append(["11x11 preview (seconds)", fmt_time(p), "< 100 ms", verdict(p, 0.1)])
    print()
    print(table(["ratio (same process)", "measured", "goal", "verdict"], rows))


if __name__ == "__main__":
    main()
