"""Memory and time at scale: a CIFAR-shaped ResNet and a dataset read in batches.

Each contender runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its
own; the figure reported is the peak *increase* over the process's resident memory after the
model and the data were built. Rows (ratios famviz ÷ other):

* Hutchinson trace, 4 probes, a ``DataLoader`` of batch 128, at N = 256, 1024, 4096: famviz
  streams the Hessian-vector products batch by batch; PyHessian's dataloader mode does too.
  Goals: memory flat in N (N = 4096 within 1.2x of N = 256), ≤ 1.0x PyHessian's memory, time
  per HVP ≤ 1.0x PyHessian's.
* an 11 × 11 loss slice against a hand-written ``functional_call`` loop over the grid points
  (goal: ≤ 1.0x its time, ≤ 2x its memory). Memory from one process each; the time ratio from
  one process running both alternately (best of 2 each), so machine load hits both alike.
* a FAM step whose penalty reuses the training forward (``fam.PenaltyTap``) against a plain
  SGD step (goal: ≤ 1.3x).
* ``measure_all(preset="fast")`` on 512 samples labelled with the model's own predictions (it
  fits its data, as a trained model does); goal: ≤ 60 s, ≤ 2 GB. ``--profile`` runs each
  measure in its own process for its time, pass counts and peak memory.

The default ResNet is narrow (widths 16-32-64-128, 0.7 M parameters) so that the table takes
minutes on a 2-core CPU; ``--full`` runs ResNet-18 (11.2 M parameters) as in the issue.

    .venv/bin/python -u benchmarks/scale.py            # the table in benchmarks/README.md
    .venv/bin/python -u benchmarks/scale.py --quick    # N = 256, 1024 only; fewer repeats
    .venv/bin/python -u benchmarks/scale.py --full     # ResNet-18 (slow on a CPU)
    .venv/bin/python -u benchmarks/scale.py --profile  # measure_all's rows, one process each
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import fmt_time, set_threads, table  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import famviz as fv  # noqa: E402

NARROW = dict(blocks=(2, 2, 2, 2), widths=(16, 32, 64, 128))
FULL = dict(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512))
PROBES = 4
BATCH = 128


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _setup(n: int, full: bool, own_labels: bool = False):
    """The model and N random images; labels random, or (``own_labels``) the model's own
    predictions, so that it fits its data as a trained model does (error 0 at the centre: the
    PAC-Bayes search and the basin radii then behave as they do on a trained model)."""
    model = fv.models.resnet(**(FULL if full else NARROW), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    if own_labels:
        with torch.no_grad():
            y = torch.cat([model(x).argmax(1) for x in X.split(BATCH)])
    return model, X, y


def _famviz_slice(model, loader) -> float:
    d1 = fv.landscape.random_direction(model, seed=1)
    d2 = fv.landscape.random_direction(model, seed=2)
    return fv.landscape.slice_2d(model, loader, d1, d2, steps=11, span=(-0.5, 0.5)).centre_loss


def _hand_slice(model, loader) -> float:
    """The baseline: one functional_call per grid point and batch, no famviz machinery."""
    d1 = fv.landscape.random_direction(model, seed=1)
    d2 = fv.landscape.random_direction(model, seed=2)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    axis = [(i - 5) / 10 for i in range(11)]  # -0.5 ... 0.5, the centre exactly 0
    centre = None
    with torch.no_grad():
        for a in axis:
            for b in axis:
                p = {k: theta[k] + a * d1[k] + b * d2[k] for k in theta}
                total, count = 0.0, 0
                for xb, yb in loader:
                    out = functional_call(model, (p, buffers), (xb,))
                    total += float(F.cross_entropy(out, yb)) * len(xb)
                    count += len(xb)
                if a == 0 and b == 0:
                    centre = total / count
    return centre


def run_one(name: str, n: int, full: bool) -> dict:
    """One contender in this (fresh) process: seconds and peak memory increase."""
    set_threads(1)
    model, X, y = _setup(n, full, own_labels=name.startswith("measure_all_fast"))
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH)
    before = _current_rss_mb()
    t0 = time.perf_counter()
    extra = {}
    if name == "famviz_hutchinson":
        r = fv.hessian_trace(model, loader, method="hutchinson", probes=PROBES, seed=0)
        extra = {"value": r.value, "hvps": PROBES}
    elif name == "pyhessian_hutchinson":
        from pyhessian import hessian

        comp = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=False)
        vals = comp.trace(maxIter=PROBES, tol=0.0)
        extra = {"value": float(sum(vals) / len(vals)), "hvps": len(vals)}
    elif name == "famviz_slice":
        extra = {"centre": _famviz_slice(model, loader)}
    elif name == "hand_slice":
        extra = {"centre": _hand_slice(model, loader)}
    elif name == "slice_pair":  # time only: both in this process, interleaved, best of 2
        times = {"famviz": [], "hand": []}
        for _ in range(2):
            for who, f in (("hand", _hand_slice), ("famviz", _famviz_slice)):
                t1 = time.perf_counter()
                f(model, loader)
                times[who].append(time.perf_counter() - t1)
        extra = {k: min(v) for k, v in times.items()}
    elif name in ("sgd_step", "fam_tap_step"):
        net = fv.models.resnet(**(FULL if full else NARROW), seed=0).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        tap = fv.fam.PenaltyTap(net, "fc") if name == "fam_tap_step" else None
        xb, yb = X[:BATCH], y[:BATCH]
        steps = 6
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()  # the first step warms up
            opt.zero_grad()
            if tap is None:
                F.cross_entropy(net(xb), yb).backward()
            else:
                with tap:
                    out = net(xb)
                (F.cross_entropy(out, yb) + 0.01 * tap.penalty(out, yb)).backward()
            opt.step()
        extra = {"steps": steps}
    elif name.startswith("measure_all_fast"):  # measure_all_fast[:one measure]
        only = name.partition(":")[2] or None
        t = fv.measure_all(model, loader, preset="fast", seed=0, measures=only)
        extra = {"errors": t.errors(), "fast_large": t.fast_large,
                 "rows": {r.name: [round(r.cost.seconds, 2), r.cost.forward, r.cost.backward,
                                   r.cost.hvps] for r in t}}
        print(t, file=sys.stderr)
    else:
        raise ValueError(name)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": _rss_mb() - before, **extra}


def measure(name: str, n: int, full: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--n", str(n)] + (["--full"] if full else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(full: bool) -> None:
    """Where measure_all(preset="fast") spends its time and memory: one process per measure."""
    from famviz.measures import MEASURES

    rows = []
    for name in MEASURES:
        if name == "prior_volume":  # binary tasks only
            continue
        r = measure(f"measure_all_fast:{name}", 512, full)
        if "error" in r:
            rows.append([name, r["error"], "", "", "", ""])
            continue
        seconds, fwd, bwd, hvps = r["rows"][name]
        rows.append([name, fmt_time(seconds), "" if fwd is None else str(fwd),
                     "" if bwd is None else str(bwd), str(hvps), _mb(r["peak_mb"])])
    print(table(["measure", "seconds", "forward", "backward", "HVPs", "peak"], rows,
                "measure_all(preset='fast'), N=512, one measure per process"))


def _mb(x):
    return "-" if x is None else f"{x:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--one")
    ap.add_argument("--profile", action="store_true",
                    help="measure_all(preset='fast') at N=512, each measure in its own process")
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.full)))
        return
    if args.profile:
        profile(args.full)
        return
    sizes = (256, 1024) if args.quick else (256, 1024, 4096)
    arch = "ResNet-18" if args.full else "narrow ResNet (16-32-64-128)"
    params = sum(p.numel() for p in _setup(1, args.full)[0].parameters())
    print(f"{arch}, {params / 1e6:.2f} M parameters, 3x32x32 inputs, batch {BATCH}, 1 thread")

    rows, fam_peaks = [], {}
    for n in sizes:
        a = measure("famviz_hutchinson", n, args.full)
        b = measure("pyhessian_hutchinson", n, args.full)
        fam_peaks[n] = a.get("peak_mb")
        per_a = a["seconds"] / PROBES if "seconds" in a else None
        per_b = b["seconds"] / b["hvps"] if "hvps" in b else None
        rows.append([f"Hutchinson, N={n}", _mb(a.get("peak_mb")), _mb(b.get("peak_mb")),
                     f"{a['peak_mb'] / b['peak_mb']:.2f}x" if "peak_mb" in b else b.get("error"),
                     fmt_time(per_a), fmt_time(per_b),
                     f"{per_a / per_b:.2f}x" if per_a and per_b else "-"])
    flat = fam_peaks[sizes[-1]] / max(fam_peaks[sizes[0]], 1.0)
    print(table(["row", "famviz peak", "PyHessian peak", "memory ratio", "famviz / HVP",
                 "PyHessian / HVP", "time ratio"], rows,
                "Hutchinson trace, 4 probes, DataLoader (streamed)"))
    print(f"famviz peak at N={sizes[-1]} / N={sizes[0]}: {flat:.2f}x (goal <= 1.2x: "
          f"{'PASS' if flat <= 1.2 else 'MISS'})\n")

    s, h = measure("famviz_slice", 512, args.full), measure("hand_slice", 512, args.full)
    pair = measure("slice_pair", 512, args.full)
    t, f = measure("sgd_step", BATCH, args.full), measure("fam_tap_step", BATCH, args.full)
    m = measure("measure_all_fast", 512, args.full)
    rows = [
        ["11x11 slice, N=512", fmt_time(pair.get("famviz")), _mb(s.get("peak_mb")),
         f"hand loop {fmt_time(pair.get('hand'))}, {_mb(h.get('peak_mb'))}",
         f"{pair['famviz'] / pair['hand']:.2f}x time (goal <= 1.0x), "
         f"{s['peak_mb'] / max(h['peak_mb'], 1):.2f}x memory (goal <= 2x)"
         if "famviz" in pair and "peak_mb" in s and "peak_mb" in h
         else pair.get("error") or s.get("error") or h.get("error")],
        ["FAM step (PenaltyTap), batch 128", fmt_time(f["seconds"] / f["steps"]),
         _mb(f.get("peak_mb")), f"SGD step {fmt_time(t['seconds'] / t['steps'])}",
         f"{(f['seconds'] / f['steps']) / (t['seconds'] / t['steps']):.2f}x (goal <= 1.3x)"],
        ["measure_all(preset='fast'), N=512", fmt_time(m.get("seconds")), _mb(m.get("peak_mb")),
         "goal <= 60 s, <= 2 GB", str(m.get("errors") or m.get("error") or "")],
    ]
    print(table(["row", "famviz time", "famviz peak", "versus", "ratio / note"], rows,
                "Slices, FAM steps, every measure"))


if __name__ == "__main__":
    main()
