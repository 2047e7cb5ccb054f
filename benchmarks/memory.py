"""Peak memory inside the curvature algorithms: budgeted (``memory_budget=``) against unbounded,
in one process, each row a ratio.

Rows (issue 12; "unbounded" is the algorithm holding every vector at once, as before the
budget: a huge ``memory_budget`` where the budget is the only switch, else the whole-matrix
form written out below):

* Hutchinson trace, 50 probes, and Hutch++ with 50 HVPs, on an MLP (all parameters) —
  unbounded: the (50, dim) probe block and its products / Hutch++'s whole matrices;
* Lanczos, 40 iterations (``tol`` tiny so that all 40 run) — unbounded: the whole basis on the
  device (a huge budget); budgeted: 8 basis vectors' worth;
* neuron-wise λ_max of a wide Linear layer (closed form) — unbounded: every m×m block at once
  (the d×m×m tensor); budgeted: 16 blocks at a time;
* κ by Hutchinson (``method="hutchinson"``, one probe = d HVPs) on the same layer —
  unbounded: the d×(d·m) probe block and its products.

On a CPU the figure is the peak growth of the resident set size (a thread samples
``/proc/self/statm`` every 2 ms; glibc is told to return large blocks to the OS at once, so
successive rows do not hide in memory freed by the previous one); on CUDA it is
``torch.cuda.max_memory_allocated`` above the memory in use before the call. Every pair's
results are checked to agree (relative difference printed).

    .venv/bin/python -u benchmarks/memory.py            # the table in benchmarks/README.md
    .venv/bin/python -u benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # re-run with glibc returning big blocks
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import fmt_time, set_threads, table  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import famviz as fv  # noqa: E402
from famviz.curvature import (  # noqa: E402
    HessianOperator,
    generator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_top,
    rademacher,
)
from famviz.measures.relative import _closed_form_lambda_max, _hutchinson  # noqa: E402

UNBOUNDED = 1 << 50
MB = 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak(fn, device: torch.device):
    """(result, peak memory growth in bytes, seconds) of ``fn()``."""
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated(device) - base, time.perf_counter() - t0
    base, top, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            top[0] = max(top[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
    return out, max(top[0], _rss()) - base, seconds


# ----------------------------------------------------------- the unbounded forms, written out


def hutchinson_whole(op, probes, seed):
    V = rademacher((probes, op.dim), generator(seed, op.device), op.device, op.dtype)
    return float((V * op.matmat(V)).sum(dim=1).mean())


def hutchpp_whole(op, hvps, seed):
    k, gen = hvps // 3, generator(seed, op.device)
    m = hvps - 2 * k
    S = rademacher((k, op.dim), gen, op.device, op.dtype)
    Q, _ = torch.linalg.qr(op.matmat(S).T)
    G = rademacher((m, op.dim), gen, op.device, op.dtype)
    G = G - (G @ Q) @ Q.T
    return (float(torch.einsum("ik,ki->", Q.T, op.matmat(Q.T).T))
            + float((G * op.matmat(G)).sum(dim=1).mean()))


def kappa_hutchinson_whole(op, d, m, probes, seed, M):
    """T̂ from the whole d×(d·m) probe block per probe, then κ̂ = <M, T̂>."""
    gen, Ts = generator(seed, op.device), []
    eye = torch.eye(d, dtype=op.dtype, device=op.device)
    for _ in range(probes):
        z = rademacher((m,), gen, op.device, op.dtype)
        V = (eye[:, :, None] * z).reshape(d, d * m)
        Ts.append((op.matmat(V).reshape(d, d, m) @ z).T)
    T = torch.stack(Ts).mean(dim=0)
    return float((M * (T + T.T) / 2).sum())


# ------------------------------------------------------------------------------------- rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    ap.add_argument("--wide", type=int, nargs=2, default=(256, 512), metavar=("D", "M"),
                    help="the wide layer's (outputs, inputs)")
    args = ap.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    # an MLP for the trace and eigenvalue rows (float32, all parameters)
    w = args.width
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, w // 2), nn.Tanh(),
                        nn.Linear(w // 2, 10))
    X = torch.randn(128, 64, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)
    data = (X, y)
    dim = sum(p.numel() for p in net.parameters())
    vec = dim * 4
    op = HessianOperator(fv.Objective(net, data, device=device),
                         [n for n, _ in net.named_parameters()])

    rows = []

    def row(name, bounded, unbounded, agree=1e-5):
        (a, pa, ta), (b, pb, tb) = peak(bounded, device), peak(unbounded, device)
        rel = abs(a - b) / max(abs(b), 1e-30)
        rows.append([name, f"{pa / MB:.0f}", f"{pb / MB:.0f}", f"{pa / max(pb, 1):.2f}x",
                     fmt_time(ta), fmt_time(tb), f"{rel:.1e}"])
        print(" | ".join(rows[-1]), flush=True)
        assert rel <= agree, (name, a, b)

    print(f"MLP: {dim:,} parameters ({vec / MB:.1f} MB a vector, float32), {device}")
    op.matvec(torch.ones(dim, device=device))  # warm-up: the first HVP's one-time allocations
    budget = 8 * vec  # a budget of 8 vectors
    row("Hutchinson, 50 probes",
        lambda: hutchinson_trace(op, 50, 0, budget).value,
        lambda: hutchinson_whole(op, 50, 0))
    row("Hutch++, 50 HVPs",
        lambda: hutchpp_trace(op, 50, 0, budget).value,
        lambda: hutchpp_whole(op, 50, 0), agree=1e-4)
    row("Lanczos, 40 iterations",  # tol below reach: all 40 iterations run
        lambda: float(lanczos_top(op, 1, 1e-30, 40, 0, budget).values[0]),
        lambda: float(lanczos_top(op, 1, 1e-30, 40, 0, UNBOUNDED).values[0]))

    d, m = args.wide
    torch.manual_seed(1)
    wide = nn.Sequential(nn.Linear(64, m), nn.ReLU(), nn.Linear(m, d), nn.ReLU(),
                         nn.Linear(d, 10))
    print(f"wide layer: {d}×{m} (the d×m×m blocks: {d * m * m * 4 / MB:.0f} MB, the d×(d·m) "
          f"probe block: {d * d * m * 4 / MB:.0f} MB)")
    obj = fv.Objective(wide, data, device=device)
    W = obj.params["2.weight"].detach()

    def neuronwise(budget):
        return float((W.pow(2).sum(dim=1) * _closed_form_lambda_max(obj, "2", budget)).sum())

    row(f"neuron-wise λ_max, {d}×{m} layer",
        lambda: neuronwise(2 * 16 * m * m * 4),  # 16 blocks and their temporaries
        lambda: neuronwise(UNBOUNDED))
    wop = HessianOperator(obj, ["2.weight"])
    wop.matvec(torch.ones(d * m, device=device))
    M = W @ W.T

    def kappa(T):
        return float((M * (T + T.T) / 2).sum())

    row(f"κ by Hutchinson, 1 probe ({d} HVPs), {d}×{m} layer",
        lambda: kappa(_hutchinson(wop, d, m, 1, 0, M, 8 * d * m * 4)[0]),
        lambda: kappa_hutchinson_whole(wop, d, m, 1, 0, M), agree=1e-4)

    print()
    print(table(["row", "budgeted MB", "unbounded MB", "ratio", "time budgeted",
                 "time unbounded", "rel. diff"], rows,
                f"peak memory growth ({'CUDA allocator' if device.type == 'cuda' else 'RSS'}), "
                f"{device}, {torch.get_num_threads()} thread(s)"))


if __name__ == "__main__":
    main()
