"""Cost of one training step of FAM, SAM and ASAM relative to plain SGD, in one process.

Run from the repository root:

    .venv/bin/python benchmarks/fam_cost.py             # default (about a minute on an idle machine)
    .venv/bin/python benchmarks/fam_cost.py --quick     # smoke test
    .venv/bin/python benchmarks/fam_cost.py --threads 2 --repeats 15

Setup: digits (sklearn's bundled 8x8 images, 1347 training samples), mini-batches of 128 taken
in a fixed shuffled order and cycled; float32; CPU; cross-entropy. Every variant is one
``famviz.fam.make_step`` (the step ``famviz.fam.train`` runs: SGD with lr 0.05 and momentum 0.9
underneath every method) on its own copy of the same initial model, so all variants do the same
amount of work per call; they are timed interleaved (``_common.time_interleaved``), and the
ratio reported is the median over rounds of (variant / SGD) taken side by side.

Models and feature layers:

* ``mlp``  — ``famviz.models.mlp([64, 128, 64, 10])``; FAM on the last layer ``"4"`` (closed
  form: κ = mean ‖φ‖² Var_p(w)) and on the hidden layer ``"2"`` (Gauss-Newton route: the 10
  output-unit vectors are pushed back to the layer in one batched backward pass, kept in the
  graph).
* ``cnn``  — ``famviz.models.cnn()``; FAM on ``"fc2"`` (closed form) and ``"fc1"``
  (Gauss-Newton route).
* ``tanh`` — the MLP with tanh: FAM on ``"2"`` takes the HVP route (64 batched HVPs in the
  layer's outputs, double backprop); its SGD baseline is the tanh MLP.

Goals (issue 5): FAM exact ≤ 2.0× SGD, FAM frozen ≤ 1.3× SGD; SAM and ASAM (two forward and two
backward passes by construction) are reported beside them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (sets sys.path so that famviz is this checkout)
    fmt_ratio,
    fmt_time,
    paired_ratio,
    set_threads,
    table,
    time_interleaved,
)

import torch  # noqa: E402

import famviz as fv  # noqa: E402
from famviz import fam  # noqa: E402

BATCH = 128
GOALS = {"fam exact": 2.0, "fam frozen": 1.3}


def digits_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    (X, y), _ = fv.data.digits(test_size=0.25, seed=seed)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    return [(X[order[i:i + BATCH]], y[order[i:i + BATCH]])
            for i in range(0, len(X) - BATCH + 1, BATCH)]


def variants(name: str) -> tuple[torch.nn.Module, dict[str, dict]]:
    """The model and, per row, the make_step arguments."""
    if name == "mlp":
        model, last, hidden = fv.models.mlp([64, 128, 64, 10], seed=0), "4", "2"
    elif name == "cnn":
        model, last, hidden = fv.models.cnn(seed=0), "fc2", "fc1"
    elif name == "tanh":
        model = fv.models.mlp([64, 128, 64, 10], activation="tanh", seed=0)
        return model, {
            "sgd": dict(method="sgd"),
            "fam exact": dict(method="fam", layer="2"),
            "fam frozen": dict(method="fam", layer="2", gradient="frozen"),
        }
    else:
        raise ValueError(name)
    return model, {
        "sgd": dict(method="sgd"),
        "fam exact": dict(method="fam", layer=last),
        "fam frozen": dict(method="fam", layer=last, gradient="frozen"),
        "sam": dict(method="sam"),
        "asam": dict(method="asam"),
        "fam exact, hidden": dict(method="fam", layer=hidden),
        "fam frozen, hidden": dict(method="fam", layer=hidden, gradient="frozen"),
    }


def bench(name: str, batches, repeats: int, min_sample: float):
    model, rows = variants(name)
    fns, steps, info = {}, {}, {}
    for label, kw in rows.items():
        step = fam.make_step(copy.deepcopy(model), lr=0.05, momentum=0.9, **kw)
        steps[label] = step
        state = {"i": 0}

        def run(step=step, state=state):
            X, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            return step(X, y)

        fns[label] = run
        info[label] = run()  # first call: builds caches, records the route and pass counts
    timings = time_interleaved(fns, repeats, warmup=2, min_sample=min_sample)
    out = []
    for label in rows:
        route = steps[label].path or "-"
        goal_key = label.replace(", hidden", "")
        goal = GOALS.get(goal_key) if label != "sgd" else None
        ratio = paired_ratio(timings[label], timings["sgd"]) if label != "sgd" else 1.0
        verdict = "-" if goal is None else ("PASS" if ratio <= goal else "MISS")
        out.append([name, label, route, f"{info[label].forward_passes}/"
                    f"{info[label].backward_passes}", fmt_time(timings[label].median),
                    fmt_ratio(ratio), "-" if goal is None else f"<= {goal:.1f}x", verdict])
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 21)")
    p.add_argument("--models", default="mlp,cnn,tanh", help="comma-separated: mlp,cnn,tanh")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 21)
    min_sample = 0.02 if args.quick else 0.1
    batches = digits_batches()
    rows = []
    for name in args.models.split(","):
        rows += bench(name.strip(), batches, repeats, min_sample)
    print(f"torch {torch.__version__}, {threads} thread(s), batch {BATCH}, float32, CPU; "
          f"{repeats} interleaved rounds, each sample >= {min_sample} s of steps")
    print(table(["model", "method", "FAM route", "fwd/bwd", "median step", "vs SGD", "goal",
                 "verdict"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
