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

**The user's own loop** (issue 12, ``--tap``, on by default): a training step written by hand —
``opt.zero_grad(); out = model(X); loss = F.cross_entropy(out, y); loss.backward(); opt.step()``
— against the same step with FAM's penalty reusing that forward pass through
``famviz.fam.PenaltyTap`` (exact gradient, last layer: ``(loss + λ·tap.penalty(out, y))
.backward()``). Neither step reads anything back to the host. Models: the digits MLP
(batch 128) and ``famviz.models.resnet((1, 1, 1), (16, 32, 64))`` (BatchNorm, trained in train
mode) on random 3×32×32 inputs, batch 32; on the ResNet also FAM on the hidden Conv2d
``layer3.0.conv2`` (Gauss-Newton route over its 8×8 positions; reported, no goal). Goal
(issue 12): the last-layer exact row ≤ 1.3× the hand-written SGD step.
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
import torch.nn.functional as F  # noqa: E402

import famviz as fv  # noqa: E402
from famviz import fam  # noqa: E402

BATCH = 128
GOALS = {"fam exact": 2.0, "fam frozen": 1.3}
#: the user's loop with PenaltyTap (issue 12)
TAP_GOAL = 1.3
TAP_LAM = 0.01
RESNET_BATCH = 32


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


def tap_models(batches):
    """(name, model, feature layer, batches) for the user-loop rows."""
    gen = torch.Generator().manual_seed(0)
    images = [(torch.randn(RESNET_BATCH, 3, 32, 32, generator=gen),
               torch.randint(0, 10, (RESNET_BATCH,), generator=gen)) for _ in range(4)]
    return [("mlp", fv.models.mlp([64, 128, 64, 10], seed=0), "4", None, batches),
            ("resnet", fv.models.resnet((1, 1, 1), (16, 32, 64), seed=0), "fc",
             "layer3.0.conv2", images)]


def user_loop(model, batches, tap: fam.PenaltyTap | None):
    """One hand-written training step per call (SGD, momentum 0.9), with the FAM penalty
    from ``tap`` when given; nothing is read back to the host."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {"i": 0}

    def step():
        X, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        if tap is None:
            F.cross_entropy(model(X), y).backward()
        else:
            with tap:
                out = model(X)
            (F.cross_entropy(out, y) + TAP_LAM * tap.penalty(out, y)).backward()
        opt.step()

    return step


def bench_tap(name, model, layer, conv, batches, repeats: int, min_sample: float):
    """SGD, FAM exact and frozen on the last layer, and (``conv``) FAM exact on a hidden
    Conv2d layer (its Gauss-Newton route), all in the user's loop."""
    model.train()
    variants = [("sgd", None, None), ("fam tap exact", layer, "exact"),
                ("fam tap frozen", layer, "frozen")]
    if conv is not None:
        variants.append((f"fam tap exact, {conv}", conv, "exact"))
    fns, routes = {}, {}
    for label, feature, gradient in variants:
        net = copy.deepcopy(model)
        tap = None if gradient is None else fam.PenaltyTap(net, feature, gradient=gradient)
        fns[label] = user_loop(net, batches, tap)
        fns[label]()  # first call: the tap checks the targets and plans its route
        routes[label] = "-" if tap is None else tap.path
    timings = time_interleaved(fns, repeats, warmup=2, min_sample=min_sample)
    rows = []
    for label in fns:
        ratio = 1.0 if label == "sgd" else paired_ratio(timings[label], timings["sgd"])
        goal = TAP_GOAL if label == "fam tap exact" else None
        verdict = "-" if goal is None else ("PASS" if ratio <= goal else "MISS")
        rows.append([name, label, routes[label], fmt_time(timings[label].median),
                     fmt_ratio(ratio), "-" if goal is None else f"<= {goal:.1f}x", verdict])
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 21)")
    p.add_argument("--models", default="mlp,cnn,tanh",
                   help="comma-separated: mlp,cnn,tanh (make_step rows; '' for none)")
    p.add_argument("--no-tap", dest="tap", action="store_false",
                   help="skip the user-loop rows (PenaltyTap on the MLP and the ResNet)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 21)
    min_sample = 0.02 if args.quick else 0.1
    batches = digits_batches()
    rows = []
    for name in filter(None, (n.strip() for n in args.models.split(","))):
        rows += bench(name, batches, repeats, min_sample)
    print(f"torch {torch.__version__}, {threads} thread(s), batch {BATCH}, float32, CPU; "
          f"{repeats} interleaved rounds, each sample >= {min_sample} s of steps")
    if rows:
        print(table(["model", "method", "FAM route", "fwd/bwd", "median step", "vs SGD",
                     "goal", "verdict"], rows))
    if args.tap:
        tap_rows = []
        for name, model, layer, conv, data in tap_models(batches):
            tap_rows += bench_tap(name, model, layer, conv, data, repeats, min_sample)
        print(f"\nthe user's own loop, PenaltyTap on the last layer (resnet: batch "
              f"{RESNET_BATCH} of 3x32x32)")
        print(table(["model", "step", "FAM route", "median step", "vs SGD", "goal", "verdict"],
                    tap_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
