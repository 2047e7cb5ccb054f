"""famviz's curvature measures side by side with the peer libraries, in one process.

Run from the repository root:

    .venv/bin/python benchmarks/curvature.py            # default (1-3 minutes)
    .venv/bin/python benchmarks/curvature.py --quick    # smoke test
    .venv/bin/python benchmarks/curvature.py --threads 2 --only trace,kappa

Setup: the digits MLP ``famviz.models.mlp([64, 128, 64, 10], seed=0)`` trained here to 100 %
train accuracy on all 1797 samples (full-batch Adam, deterministic); cross-entropy (mean);
float32; CPU. Every library gets the same model (its own deep copy where it mutates it), the
same data and the same loss.

Comparisons (see benchmarks/README.md for the measured figures):

1. ``trace``      exact Tr(H) of the whole network: famviz vs BackPACK ``DiagHessian``.
2. ``hutchinson`` 100-probe Hutchinson, time per HVP: famviz vs PyHessian ``trace``; plus
                  famviz's own HVP loop (``matvec``) vs its batched ``matmat``.
3. ``eigen``      top eigenvalue to 1e-4 relative: famviz Lanczos/power vs PyHessian power
                  iteration and hessian-eigenthings power iteration/Lanczos.
4. ``kappa``      relative flatness of layer "4": closed form vs exact (HVPs) vs the dense
                  brute force of ``famviz.oracles``, against one plain forward pass.

Computation (``compute_*`` and the peer wrappers), timing (``bench_*``) and printing
(``print_*``) are separate functions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (sets sys.path so that famviz is this checkout)
    TrainedModel,
    agree,
    fmt_ratio,
    fmt_time,
    paired_ratio,
    rel_diff,
    set_threads,
    table,
    time_interleaved,
    trained_digits_mlp,
    verdict,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import famviz as fv  # noqa: E402
from famviz.objective import Objective  # noqa: E402

SECTIONS = ("trace", "hutchinson", "eigen", "kappa")
PROBES = 100
EIG_TOL = 1e-4
EIG_MAX_ITER = 1000  # cap for the power iterations (they stop on their own rule long before)
LANCZOS_SCAN = 64  # longest Krylov space scanned when calibrating hessian-eigenthings' Lanczos
SEED = 0
LAYER = "4"
#: one thread by default: on the shared 2-core machines a second thread makes every op wait for
#: a busy core (one forward pass, while another process ran: 31-55 ms with 2 threads, 1.07 ms
#: with 1; 0.65 ms idle)
DEFAULT_THREADS = 1

# the peers' own warnings, known and harmless here (said once in the README)
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")


# =============================================================================== peers


def import_peers() -> dict[str, object]:
    """Import each peer; a peer that fails to import is recorded with the reason and skipped."""
    peers: dict[str, object] = {}

    def attempt(name, fn):
        try:
            peers[name] = fn()
        except Exception as exc:  # ImportError, or e.g. a broken torchvision raising RuntimeError
            peers[name] = None
            peers[name + ":error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    def _backpack():
        import backpack
        from backpack.extensions import DiagHessian

        return (backpack, DiagHessian)

    def _pyhessian():
        import importlib

        # the package re-exports the class ``hessian`` under the submodule's name: take the
        # module itself (its ``hessian_vector_product`` is what the HVP counter wraps)
        return importlib.import_module("pyhessian.hessian")

    def _eigenthings():
        import hessian_eigenthings

        return hessian_eigenthings

    attempt("backpack", _backpack)
    attempt("pyhessian", _pyhessian)
    attempt("hessian_eigenthings", _eigenthings)
    return peers


def peer_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def count_calls(module, attr: str):
    """Temporarily wrap ``module.attr`` to count its calls (only in untimed counting runs)."""
    original = getattr(module, attr)
    box = {"calls": 0}

    def wrapper(*args, **kwargs):
        box["calls"] += 1
        return original(*args, **kwargs)

    setattr(module, attr, wrapper)
    try:
        yield box
    finally:
        setattr(module, attr, original)


class BackpackDiagHessian:
    """Tr(H) as the sum of BackPACK's exact Hessian diagonal. BackPACK's ``extend`` mutates the
    model (hooks, ``diag_h`` attributes), so it gets its own deep copy, extended once."""

    def __init__(self, backpack_mod, DiagHessian, model: nn.Module, X, y):
        self._bp, self._ext = backpack_mod, DiagHessian
        self.model = backpack_mod.extend(copy.deepcopy(model))
        self.loss = backpack_mod.extend(nn.CrossEntropyLoss())
        self.X, self.y = X, y

    def __call__(self) -> float:
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.X), self.y)
        with self._bp.backpack(self._ext()):
            loss.backward()
        return float(sum(p.diag_h.sum() for p in self.model.parameters()))


class PyHessianRunner:
    """PyHessian 0.1 on its own deep copy (its constructor calls ``model.eval()`` and leaves
    ``.grad`` holding a create_graph gradient). ``cuda=False`` is required on a CPU machine
    (the default ``cuda=True`` fails with 'Torch not compiled with CUDA enabled')."""

    def __init__(self, pyhessian_mod, model: nn.Module, X, y):
        self._mod = pyhessian_mod
        self.model = copy.deepcopy(model)
        self.X, self.y = X, y

    def _hessian(self):
        self.model.zero_grad(set_to_none=True)  # else the create_graph gradients accumulate
        return self._mod.hessian(self.model, nn.CrossEntropyLoss(),
                                         data=(self.X, self.y), cuda=False)

    def trace(self, iters: int) -> tuple[float, int]:
        """Hutchinson with ``tol=0``: PyHessian stops when |mean - previous mean| /
        (previous mean + 1e-6) < tol, which with tol=0 never holds while the running mean is
        positive, so exactly ``iters`` probes are used (checked by the length of the list)."""
        torch.manual_seed(SEED)  # PyHessian draws probes from the global RNG
        samples = self._hessian().trace(maxIter=iters, tol=0)
        return sum(samples) / len(samples), len(samples)

    def top_eigenvalue(self, tol: float, max_iter: int) -> float:
        torch.manual_seed(SEED)
        values, _ = self._hessian().eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        return float(values[0])

    def count_top_eigenvalue_hvps(self, tol: float, max_iter: int) -> int:
        with count_calls(self._mod, "hessian_vector_product") as box:
            self.top_eigenvalue(tol, max_iter)
        return box["calls"]


class EigenthingsRunner:
    """hessian-eigenthings 1.0.0a5 on its own deep copy. This release has no
    ``compute_hessian_eigenthings`` (the 0.x API); its public API is a ``HessianOperator`` over a
    DataLoader (one full batch of all samples here) and the algorithms ``power_iteration_one``
    and ``lanczos``. Each of its HVPs recomputes the forward and first backward pass."""

    def __init__(self, he, model: nn.Module, X, y):
        from torch.utils.data import DataLoader, TensorDataset

        self.he = he
        self.model = copy.deepcopy(model)
        loader = DataLoader(TensorDataset(X, y), batch_size=len(X), shuffle=False)
        self.op = he.HessianOperator(self.model, loader, he.supervised_loss(F.cross_entropy),
                                     full_dataset=True)

    def power(self, tol: float, max_iter: int) -> tuple[float, int, bool]:
        lam, _, _, iters, conv = self.he.power_iteration_one(self.op, max_iter=max_iter, tol=tol,
                                                             seed=SEED)
        return float(lam), int(iters), bool(conv)

    def lanczos(self, steps: int, tol: float) -> tuple[float, bool]:
        r = self.he.lanczos(self.op, k=1, max_iter=steps, tol=tol, which="LA",
                            reorthogonalize=True, seed=SEED)
        return float(r.eigenvalues[0]), bool(r.converged[0])

    def lanczos_min_steps(self, tol: float, scan: int) -> int | None:
        """Its Lanczos runs a fixed number of steps (no early stop). Untimed calibration: one
        run of ``scan`` steps through its public ``lanczos_tridiagonal``, then the first prefix
        whose top Ritz pair meets its own criterion |beta_m s_m| < tol |theta| (a prefix of a
        Lanczos run is the shorter run from the same start vector)."""
        gen = torch.Generator().manual_seed(SEED)
        v0 = torch.randn(self.op.size, dtype=self.op.dtype, generator=gen)
        td = self.he.lanczos_tridiagonal(self.op, v0, scan, reorthogonalize=True)
        alphas, betas = td.alphas.double(), td.betas.double()
        for m in range(1, td.iterations + 1):
            T = torch.diag(alphas[:m])
            if m > 1:
                T += torch.diag(betas[: m - 1], 1) + torch.diag(betas[: m - 1], -1)
            theta, S = torch.linalg.eigh(T)
            beta_m = float(betas[m - 1]) if m - 1 < len(betas) else td.last_beta
            if abs(beta_m * float(S[-1, -1])) < tol * abs(float(theta[-1])):
                return m
        return None


# ======================================================================== famviz computations


def compute_fv_exact_trace(model, data) -> float:
    return float(fv.hessian_trace(model, data, method="exact"))


def compute_fv_hutchinson(model, data, probes: int) -> tuple[float, float, int]:
    r = fv.hessian_trace(model, data, method="hutchinson", probes=probes, seed=SEED)
    return r.value, r.stderr, r.num_hvps


def rademacher_probes(op: fv.HessianOperator, probes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 2, (probes, op.dim), generator=gen).to(op.dtype) * 2 - 1


def compute_hvps_loop(op: fv.HessianOperator, V: torch.Tensor) -> float:
    """Hutchinson from a plain loop of ``matvec`` on a prebuilt operator."""
    return float(sum(float(v @ op.matvec(v)) for v in V) / len(V))


def compute_hvps_batched(op: fv.HessianOperator, V: torch.Tensor) -> float:
    """The same probes through the batched ``matmat``."""
    return float((V * op.matmat(V)).sum(dim=1).mean())


def compute_fv_top_eig(model, data, method: str, dtype=None, tol: float = EIG_TOL):
    r = fv.hessian_top_eigenvalue(model, data, method=method, tol=tol, seed=SEED, dtype=dtype,
                                  max_iter=200)
    return r.value, r.num_hvps, r.converged


def compute_kappa(model, data, method: str) -> float:
    return float(fv.relative_flatness(model, data, layer=LAYER, method=method))


def compute_kappa_bruteforce(model, data) -> float:
    return fv.oracles.relative_flatness_bruteforce(model, data, LAYER, dtype=torch.float32)[0]


def compute_forward(model, X) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


# ============================================================================ result records


@dataclass
class Row:
    """One line of the summary table: famviz's time against a peer's (or a reference's)."""

    section: str
    ours: str
    ours_time: float
    other: str
    other_time: float | None
    ratio: float | None
    goal: float | None = None
    valid: bool = True
    unit: str = "per call"

    @property
    def verdict(self) -> str:
        return verdict(self.ratio, self.goal, self.valid)


@dataclass
class Section:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    values: list[tuple[str, str]] = field(default_factory=list)  # (what, value text)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Repeats:
    fast: int  # rounds for calls of milliseconds (with several calls per sample)
    medium: int  # rounds for Hutchinson, eigenvalues
    slow: int  # rounds for the dense brute force
    min_sample: float  # seconds per sample for fast calls
    budget: float | None  # seconds per timing group after which no new round starts...
    min_repeats: int  # ...once this many rounds are done

    def kw(self, repeats: int, min_sample: float = 0.0) -> dict:
        return dict(repeats=repeats, min_sample=min_sample, budget=self.budget,
                    min_repeats=min(self.min_repeats, repeats))


def repeats_for(quick: bool) -> Repeats:
    if quick:
        return Repeats(3, 2, 1, 0.005, None, 1)
    return Repeats(21, 7, 5, 0.02, 30.0, 5)


# ================================================================================= timing


def timed(sec: Section, fns: dict[str, Callable[[], object]], **kw):
    """:func:`time_interleaved`, noting in the section how many rounds were timed."""
    t = time_interleaved(fns, **kw)
    rounds = len(next(iter(t.values())).samples)
    per = ", ".join(f"{name} x{timing.number}" for name, timing in t.items() if timing.number > 1)
    sec.notes.append(f"timed {rounds} interleaved rounds of {len(fns)} contenders"
                     + (f" (calls per sample: {per})" if per else ""))
    return t


def bench_trace(tm: TrainedModel, peers, rep: Repeats) -> Section:
    sec = Section("trace", "1. Exact Tr(H), whole network (17226 parameters)")
    model, data = tm.model, tm.data
    r = fv.hessian_trace(model, data, method="exact")
    sec.values.append(("famviz hessian_trace(method='exact')",
                       f"{r.value:.7g} (backend {r.backend}, {r.num_hvps} HVPs)"))
    if peers.get("backpack") is None:
        sec.notes.append(f"BackPACK skipped: {peers.get('backpack:error')}")
        t = timed(sec, {"fv": lambda: compute_fv_exact_trace(model, data)},
                  **rep.kw(rep.fast, rep.min_sample))
        sec.rows.append(Row("trace", "famviz exact", t["fv"].median, "BackPACK (skipped)", None,
                            None, 2.0))
        return sec
    bp = BackpackDiagHessian(*peers["backpack"], model, *data)
    v_bp = bp()
    ok, worst = agree([r.value, v_bp], 1e-4)
    sec.values.append(("BackPACK DiagHessian, sum of diag_h", f"{v_bp:.7g}"))
    sec.checks.append(f"famviz vs BackPACK: rel. diff {worst:.1e} (need <= 1e-4): "
                      f"{'ok' if ok else 'DISAGREE'}")
    t = timed(sec, {"fv": lambda: compute_fv_exact_trace(model, data), "bp": bp},
              **rep.kw(rep.fast, rep.min_sample))
    sec.rows.append(Row("trace", "famviz hessian_trace exact", t["fv"].median,
                        "BackPACK DiagHessian", t["bp"].median, paired_ratio(t["fv"], t["bp"]),
                        2.0, ok))
    return sec


def bench_hutchinson(tm: TrainedModel, peers, rep: Repeats) -> Section:
    sec = Section("hutchinson", f"2. Hutchinson, {PROBES} Rademacher probes, time per HVP")
    model, data = tm.model, tm.data
    exact = float(fv.hessian_trace(model, data, method="exact"))
    v_fv, se_fv, n_fv = compute_fv_hutchinson(model, data, PROBES)
    sec.values.append(("exact Tr(H) (reference)", f"{exact:.7g}"))
    sec.values.append(("famviz hutchinson, seed=0",
                       f"{v_fv:.7g} +- {se_fv:.3g} (num_hvps {n_fv})"))
    sec.checks.append(f"famviz estimate within {abs(v_fv - exact) / se_fv:.2f} stderr of the "
                      "exact trace")

    op = fv.HessianOperator(Objective(model, data), [n for n, _ in model.named_parameters()])
    V = rademacher_probes(op, PROBES)
    v_loop, v_batch = compute_hvps_loop(op, V), compute_hvps_batched(op, V)
    ok_int, worst_int = agree([v_fv, v_loop, v_batch], 1e-4)
    sec.checks.append(f"famviz matvec loop / matmat / hessian_trace on the same probes: rel. "
                      f"diff {worst_int:.1e}: {'ok' if ok_int else 'DISAGREE'}")

    fns: dict[str, Callable[[], object]] = {
        "fv": lambda: compute_fv_hutchinson(model, data, PROBES),
        "loop": lambda: compute_hvps_loop(op, V),
        "batch": lambda: compute_hvps_batched(op, V),
    }
    ph = None
    valid = True
    if peers.get("pyhessian") is None:
        sec.notes.append(f"PyHessian skipped: {peers.get('pyhessian:error')}")
    else:
        ph = PyHessianRunner(peers["pyhessian"], model, *data)
        v_ph, n_ph = ph.trace(PROBES)
        if n_ph != PROBES:
            sec.notes.append(f"PyHessian stopped after {n_ph} probes instead of {PROBES}")
        sec.values.append(("PyHessian trace(maxIter=100, tol=0), torch.manual_seed(0)",
                           f"{v_ph:.7g} ({n_ph} iterations = HVPs)"))
        # With torch.manual_seed(0), PyHessian's per-parameter randint_like draws are the same
        # Rademacher probes as famviz's seed=0 draw, so the two estimates must agree closely.
        valid, worst = agree([v_fv, v_ph], 1e-4)
        sec.checks.append(f"famviz vs PyHessian (same probes): rel. diff {worst:.1e} "
                          f"(need <= 1e-4): {'ok' if valid else 'DISAGREE'}")
        fns["ph"] = lambda: ph.trace(PROBES)
    t = timed(sec, fns, **rep.kw(rep.medium))

    if ph is not None:
        sec.rows.append(Row("hutchinson", f"famviz hessian_trace hutchinson ({n_fv} HVPs)",
                            t["fv"].median / n_fv, f"PyHessian trace ({n_ph} HVPs)",
                            t["ph"].median / n_ph,
                            paired_ratio(t["fv"], t["ph"], n_fv, n_ph), 1.0, valid, "per HVP"))
        sec.rows.append(Row("hutchinson", "famviz matvec loop (prebuilt operator)",
                            t["loop"].median / PROBES, f"PyHessian trace ({n_ph} HVPs)",
                            t["ph"].median / n_ph,
                            paired_ratio(t["loop"], t["ph"], PROBES, n_ph), None, True,
                            "per HVP"))
    else:
        sec.rows.append(Row("hutchinson", f"famviz hessian_trace hutchinson ({n_fv} HVPs)",
                            t["fv"].median / n_fv, "PyHessian (skipped)", None, None, 1.0,
                            unit="per HVP"))
    sec.rows.append(Row("hutchinson", "famviz matmat batched (prebuilt operator)",
                        t["batch"].median / PROBES, "famviz matvec loop (prebuilt operator)",
                        t["loop"].median / PROBES, paired_ratio(t["batch"], t["loop"]), None,
                        ok_int, "per HVP"))
    return sec


def bench_eigen(tm: TrainedModel, peers, rep: Repeats) -> Section:
    sec = Section("eigen", f"3. Top Hessian eigenvalue to {EIG_TOL:g} relative")
    model, data = tm.model, tm.data
    ref, ref_hvps, ref_conv = compute_fv_top_eig(model, data, "lanczos", torch.float64, 1e-10)
    sec.values.append(("reference: famviz Lanczos in float64, tol 1e-10 (untimed)",
                       f"{ref:.8g} ({ref_hvps} HVPs, converged {ref_conv})"))
    fns: dict[str, Callable[[], object]] = {}
    results: dict[str, tuple[str, float, str]] = {}  # key -> (label, value, hvps text)

    for method in ("lanczos", "power"):
        val, hvps, conv = compute_fv_top_eig(model, data, method)
        key = f"fv_{method}"
        results[key] = (f"famviz {method}", val, f"{hvps} HVPs, converged {conv}")
        fns[key] = lambda m=method: compute_fv_top_eig(model, data, m)

    if peers.get("pyhessian") is None:
        sec.notes.append(f"PyHessian skipped: {peers.get('pyhessian:error')}")
    else:
        ph = PyHessianRunner(peers["pyhessian"], model, *data)
        val = ph.top_eigenvalue(EIG_TOL, EIG_MAX_ITER)
        hvps = ph.count_top_eigenvalue_hvps(EIG_TOL, EIG_MAX_ITER)
        results["ph"] = ("PyHessian eigenvalues (power)", val, f"{hvps} HVPs")
        fns["ph"] = lambda: ph.top_eigenvalue(EIG_TOL, EIG_MAX_ITER)

    if peers.get("hessian_eigenthings") is None:
        sec.notes.append(f"hessian-eigenthings skipped: {peers.get('hessian_eigenthings:error')}")
    else:
        he = EigenthingsRunner(peers["hessian_eigenthings"], model, *data)
        val, iters, conv = he.power(EIG_TOL, EIG_MAX_ITER)
        results["he_power"] = ("eigenthings power_iteration_one", val,
                               f"{iters} HVPs, converged {conv}")
        fns["he_power"] = lambda: he.power(EIG_TOL, EIG_MAX_ITER)
        steps = he.lanczos_min_steps(EIG_TOL, LANCZOS_SCAN)
        if steps is None:
            sec.notes.append(f"eigenthings Lanczos did not meet tol within {LANCZOS_SCAN} steps")
        else:
            val, conv = he.lanczos(steps, EIG_TOL)
            results["he_lanczos"] = ("eigenthings lanczos (steps calibrated)", val,
                                     f"{steps} HVPs, converged {conv}")
            fns["he_lanczos"] = lambda: he.lanczos(steps, EIG_TOL)
            sec.notes.append(f"hessian-eigenthings' lanczos has no early stop: it was given the "
                             f"fewest steps ({steps}) that meet its own residual test, found in "
                             "an untimed calibration run (this favours the peer)")

    all_ok = True
    for key, (label, val, hvps) in results.items():
        err = rel_diff(val, ref)
        ok = err <= 1e-3
        all_ok &= ok
        sec.values.append((label, f"{val:.8g} ({hvps}); rel. error {err:.1e} "
                                  f"{'<= 1e-4' if err <= 1e-4 else '> 1e-4'}"))
    ok, worst = agree([v for _, v, _ in results.values()], 1e-3)
    sec.checks.append(f"all eigenvalues agree: largest rel. diff {worst:.1e} (need <= 1e-3): "
                      f"{'ok' if ok and all_ok else 'DISAGREE'}")

    t = timed(sec, fns, **rep.kw(rep.medium))
    peer_keys = [k for k in ("ph", "he_power", "he_lanczos") if k in t]
    if not peer_keys:
        sec.rows.append(Row("eigen", "famviz lanczos", t["fv_lanczos"].median, "no peer", None,
                            None, 1.0))
        return sec
    fastest = min(peer_keys, key=lambda k: t[k].median)
    for fv_key in ("fv_lanczos", "fv_power"):
        sec.rows.append(Row("eigen", results[fv_key][0] + f" ({results[fv_key][2].split(',')[0]})",
                            t[fv_key].median,
                            "fastest peer: " + results[fastest][0]
                            + f" ({results[fastest][2].split(',')[0]})",
                            t[fastest].median, paired_ratio(t[fv_key], t[fastest]),
                            1.0 if fv_key == "fv_lanczos" else None, ok and all_ok))
    for k in peer_keys:
        if k != fastest:
            sec.rows.append(Row("eigen", "famviz lanczos", t["fv_lanczos"].median,
                                results[k][0] + f" ({results[k][2].split(',')[0]})",
                                t[k].median, paired_ratio(t["fv_lanczos"], t[k]), None,
                                ok and all_ok))
    return sec


def bench_kappa(tm: TrainedModel, peers, rep: Repeats) -> Section:
    sec = Section("kappa", f'4. Relative flatness kappa of layer "{LAYER}" (10 x 64 weights)')
    model, data, X = tm.model, tm.data, tm.X
    vals = {
        "closed_form": compute_kappa(model, data, "closed_form"),
        "exact": compute_kappa(model, data, "exact"),
        "bruteforce": compute_kappa_bruteforce(model, data),
    }
    n_hvps = fv.relative_flatness(model, data, layer=LAYER, method="exact").num_hvps
    sec.values.append(("famviz relative_flatness closed_form", f"{vals['closed_form']:.8g}"))
    sec.values.append(("famviz relative_flatness exact", f"{vals['exact']:.8g} ({n_hvps} HVPs)"))
    sec.values.append(("famviz.oracles.relative_flatness_bruteforce (float32, 640x640 Hessian)",
                       f"{vals['bruteforce']:.8g}"))
    ok, worst = agree(list(vals.values()), 1e-4)
    sec.checks.append(f"closed form / exact / brute force: largest rel. diff {worst:.1e} "
                      f"(need <= 1e-4): {'ok' if ok else 'DISAGREE'}")

    fast = timed(sec, {"closed": lambda: compute_kappa(model, data, "closed_form"),
                       "fwd": lambda: compute_forward(model, X)},
                 **rep.kw(rep.fast, rep.min_sample))
    slow = timed(sec, {"closed": lambda: compute_kappa(model, data, "closed_form"),
                       "exact": lambda: compute_kappa(model, data, "exact"),
                       "brute": lambda: compute_kappa_bruteforce(model, data)},
                 **rep.kw(rep.slow))
    sec.rows.append(Row("kappa", "famviz kappa closed_form", fast["closed"].median,
                        "1 forward pass, no grad", fast["fwd"].median,
                        paired_ratio(fast["closed"], fast["fwd"]), 3.0, ok, "forward passes"))
    sec.rows.append(Row("kappa", f"famviz kappa exact ({n_hvps} HVPs)", slow["exact"].median,
                        "famviz kappa closed_form", slow["closed"].median,
                        paired_ratio(slow["exact"], slow["closed"]), None, ok))
    sec.rows.append(Row("kappa", "oracles.relative_flatness_bruteforce", slow["brute"].median,
                        "famviz kappa closed_form", slow["closed"].median,
                        paired_ratio(slow["brute"], slow["closed"]), None, ok))
    return sec


BENCHES = {"trace": bench_trace, "hutchinson": bench_hutchinson, "eigen": bench_eigen,
           "kappa": bench_kappa}


# =============================================================================== printing


def print_header(tm: TrainedModel, threads: int, peers, rep: Repeats, quick: bool) -> None:
    print("famviz curvature benchmark" + (" (--quick)" if quick else ""))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"torch.get_num_threads() = {threads}, float32, CPU")
    print(tm.describe())
    versions = ", ".join(f"{d} {peer_version(d)}" for d in
                         ("backpack-for-pytorch", "PyHessian", "hessian-eigenthings"))
    print(f"peers: {versions}")
    for name in ("backpack", "pyhessian", "hessian_eigenthings"):
        if peers.get(name) is None:
            print(f"  {name} NOT AVAILABLE: {peers.get(name + ':error')}")
    print(f"timing: warm-up, then medians of interleaved rounds (fast calls: {rep.fast} rounds, "
          f"Hutchinson/eigen: {rep.medium}, brute force: {rep.slow}); "
          "ratio = median of per-round ratios")


def print_section(sec: Section) -> None:
    print()
    print(sec.title)
    for what, value in sec.values:
        print(f"  {what}: {value}")
    for check in sec.checks:
        print(f"  check: {check}")
    for note in sec.notes:
        print(f"  note: {note}")
    rows = [[r.ours, fmt_time(r.ours_time), r.other, fmt_time(r.other_time),
             fmt_ratio(r.ratio), r.unit] for r in sec.rows]
    print(table(["famviz", "time", "versus", "time", "ratio", "unit"], rows))


def print_summary(sections: list[Section]) -> None:
    rows = [[r.section, r.ours, fmt_time(r.ours_time), r.other, fmt_time(r.other_time),
             fmt_ratio(r.ratio), f"<= {r.goal:g}x" if r.goal else "", r.verdict]
            for sec in sections for r in sec.rows if r.goal is not None]
    print()
    print(table(["", "famviz", "time", "versus", "time", "ratio", "goal", ""], rows,
                title="Summary (goals: ratio famviz / other)"))


# =================================================================================== main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch intra-op threads, the same for every library (default "
                        f"{DEFAULT_THREADS}: on a shared machine more threads make every op wait "
                        "for a busy core; 0 = torch's own default)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; valid: {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads or None)
    rep = repeats_for(args.quick)
    start = time.perf_counter()
    peers = import_peers()
    tm = trained_digits_mlp(seed=SEED)
    print_header(tm, threads, peers, rep, args.quick)
    sections = []
    for name in args.only:
        sec = BENCHES[name](tm, peers, rep)
        print_section(sec)
        sections.append(sec)
    print_summary(sections)
    if torch.get_num_threads() != threads:
        print(f"WARNING: the thread count changed during the run: {torch.get_num_threads()}")
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
