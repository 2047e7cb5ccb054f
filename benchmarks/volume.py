"""The prior volume's integral: expectation propagation against the exact orthant routine
(n <= 8) and the GHK Monte-Carlo sampler (larger n), on NNGP kernels of real digits.

For n = 8 ... 1797 digits (all of them; binary labels: digit >= 5) and the NNGP kernel of
``fv.models.mlp([64, 64, 64, 1])`` (PyTorch's default init), it prints EP's time and sweeps
and its difference to the reference, for the probit noise 1 (the default) and the step
likelihood (noise 0). Run: ``.venv/bin/python benchmarks/volume.py`` (``--quick``: n <= 500).
"""

from __future__ import annotations

import argparse
import math
import time

from _common import set_threads, table

import torch

import famviz as fv
from famviz.measures import nngp_kernel
from famviz.measures._orthant import log_orthant_ep, log_orthant_exact, log_orthant_mc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n <= 500 only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mc-samples", type=int, default=2000)
    args = parser.parse_args()
    threads = set_threads(args.threads or None)
    (X, y), (Xt, yt) = fv.data.digits(test_size=0.5, seed=0)
    X = torch.cat([X, Xt]).double()
    f = torch.where(torch.cat([y, yt]) >= 5, 1.0, -1.0).double()
    model = fv.models.mlp([64, 64, 64, 1], seed=0)
    sizes = [8, 50, 200, 500] + ([] if args.quick else [1000, 1500, 1797])
    rows = []
    for n in sizes:
        K, _ = nngp_kernel(model, X[:n])
        for noise in (1.0, 0.0):
            t0 = time.perf_counter()
            ep, report = log_orthant_ep(K, f[:n], noise)
            t_ep = time.perf_counter() - t0
            t0 = time.perf_counter()
            if n <= 8:
                ref, err = log_orthant_exact(K, f[:n], noise, seed=0)
                kind = "exact"
            else:
                ref, err = log_orthant_mc(K, f[:n], noise, samples=args.mc_samples, seed=0)
                kind = f"tilted GHK {args.mc_samples}"
            t_ref = time.perf_counter() - t0
            rows.append([str(n), f"{noise:g}", f"{ep:.3f}", f"{report.iterations}",
                         "yes" if report.converged else "NO", f"{t_ep:.2f}", kind,
                         f"{ref:.3f} ± {err:.3f}", f"{ep - ref:+.3f}", f"{t_ref:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\ntorch threads: {threads}; log P(f) per n, EP vs reference (nats)\n")
    print(table(["n", "noise", "EP log P", "sweeps", "converged", "EP s", "reference",
                 "ref log P ± se", "EP - ref", "ref s"], rows))


if __name__ == "__main__":
    main()
