"""The dashboards' latency, setup time and notebook sizes, measured where the user sees them.

* **α move in the browser** (the goal: <= 300 ms): notebooks/dashboards.ipynb's ReparamExplorer
  (the digits MLP 64-48-24-10, 600 samples, float64 — the default dtype) in a Voilà page in
  Debian's Chromium; from the key press on the α slider until the page has redrawn the bar
  chart with the new values (polled every animation frame). Once with one torch thread (what
  the notebooks set), once with torch's default (one per core), interleaved page by page.
* **α move in the kernel**, the same update without a browser, in one process: one thread
  against torch's default, interleaved; and the update against the core computations alone.
* **Setup**: notebooks/dashboards.ipynb executed top to bottom (nbclient, a fresh kernel).
* **Executed notebook sizes**: 00, 02 and dashboards executed and saved with their widget
  state, as a user's "save" would (``--notebooks DIR`` measures another copy, e.g. an older
  checkout, with ``PYTHONPATH`` pointing at its famviz).

    python benchmarks/widgets.py [--quick] [--skip-browser] [--notebooks DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt_ratio, fmt_time, paired_ratio, table, time_interleaved

import torch  # noqa: E402

import famviz as fv  # noqa: E402
from famviz.widgets import ReparamExplorer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.300
DEFAULT_THREADS = torch.get_num_threads()

BENCH_NOTEBOOK = """\
import torch
import famviz as fv
if {threads}:
    torch.set_num_threads({threads})
torch.manual_seed(0)
(X, y), (X_test, y_test) = fv.data.digits(test_size=0.25, seed=0)
init = fv.models.mlp([64, 48, 24, 10], activation="leaky_relu", seed=0)
model, _ = fv.fam.train(init, (X, y), (X_test, y_test), epochs=15, lr=0.05, seed=0,
                        progress=False, track_kappa=False)
print("torch threads:", torch.get_num_threads())
fv.widgets.ReparamExplorer(model, (X[:600], y[:600]), layer="2")
"""

# Tr(H)'s bar (the second) differs from `before`: the page has drawn the update
BAR_CHANGED = """(before) => {
  const o = document.querySelector('.famviz-measures-plot');
  const p = o && [...o.querySelectorAll('.js-plotly-plot')].pop();
  const y = p && p.data && p.data[0] && p.data[0].y;
  return Array.isArray(y) && y[1] !== before ? {t: performance.now(), y: y[1]} : false;
}"""


def tutorial_setup():
    """The dashboards notebook's model and data."""
    torch.manual_seed(0)
    (X, y), (Xt, yt) = fv.data.digits(test_size=0.25, seed=0)
    init = fv.models.mlp([64, 48, 24, 10], activation="leaky_relu", seed=0)
    model, _ = fv.fam.train(init, (X, y), (Xt, yt), epochs=15, lr=0.05, seed=0,
                            progress=False, track_kappa=False)
    return model, (X[:600], y[:600])


# ------------------------------------------------------------------------------------ kernel


def bench_kernel(repeats: int) -> list[list[str]]:
    """An α move headless: one thread vs the default, and the widget vs the core alone."""
    model, data = tutorial_setup()
    e = ReparamExplorer(model, data, layer="2")
    slider = e.alpha[("0", "2")]
    values = itertools.cycle([3.0, 0.3])

    def move():
        slider.value = next(values)
        assert e.error is None, e.error

    def one_thread():
        torch.set_num_threads(1)
        move()

    def default_threads():
        torch.set_num_threads(DEFAULT_THREADS)
        move()

    def core_only():  # the same computations without the widget (one thread)
        torch.set_num_threads(1)
        m = e.model()
        e._measure(m)
        e._function_change(m)
        e._slice(m, e._raw_direction)
        e._slice(m, fv.landscape.normalize_direction(e._direction, m))

    t = time_interleaved({"1": one_thread, "default": default_threads, "core": core_only},
                         repeats, warmup=2)
    torch.set_num_threads(1)
    return [
        ["α move, kernel, 1 thread", fmt_time(t["1"].median), "", "≤ 300 ms",
         "PASS" if t["1"].median <= GOAL else "MISS"],
        [f"α move, kernel, {DEFAULT_THREADS} threads (torch default)",
         fmt_time(t["default"].median), fmt_ratio(paired_ratio(t["default"], t["1"])),
         "≤ 300 ms", "PASS" if t["default"].median <= GOAL else "MISS"],
        ["α move, kernel, core computations alone", fmt_time(t["core"].median),
         fmt_ratio(paired_ratio(t["core"], t["1"])), "", ""],
    ]


# ----------------------------------------------------------------------------------- browser


def bench_browser(moves: int) -> list[list[str]]:
    sys.path.insert(0, str(REPO))
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, _jupyter_env, start_server

    if not Path(CHROMIUM).exists():
        return [["α move in the browser", "skipped: no " + CHROMIUM, "", "", ""]]
    base = Path(tempfile.mkdtemp(prefix="famviz-bench-"))
    env = _jupyter_env(base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's own default, not the tests'
        env.pop(var, None)
    root = base / "root"
    root.mkdir()
    import nbformat

    for name, threads in (("one", 1), ("default", 0)):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(BENCH_NOTEBOOK.format(threads=threads))]
        nbformat.write(nb, root / f"bench_{name}.ipynb")
    argv = [sys.executable, "-m", "voila", "--no-browser", "--port={port}",
            "--Voila.ip=127.0.0.1", "--Voila.port_retries=0", str(root)]
    server = start_server("Voila", argv, env, root, base / "voila.log", "/")
    times: dict[str, list[float]] = {"one": [], "default": []}
    loads: dict[str, list[float]] = {"one": [], "default": []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for name in ["one", "default"] * 2:  # interleaved page by page
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                t0 = time.perf_counter()
                page.goto(f"{server.url}/voila/render/bench_{name}.ipynb", wait_until="commit")
                page.wait_for_function(BAR_CHANGED, arg=None, timeout=300_000, polling=100)
                loads[name].append(time.perf_counter() - t0)
                handle = page.locator(".famviz-alpha .noUi-handle").first
                handle.focus()
                before = page.evaluate(BAR_CHANGED, None)["y"]
                for k in range(moves):
                    start = page.evaluate("() => performance.now()")
                    handle.press("ArrowRight" if k % 2 == 0 else "ArrowLeft")
                    done = page.wait_for_function(BAR_CHANGED, arg=before, timeout=60_000,
                                                  polling="raf").json_value()
                    before = done["y"]
                    if k:  # the first move warms up
                        times[name].append((done["t"] - start) / 1e3)
                page.close()
            browser.close()
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        ["α move, browser (key → bars redrawn), 1 thread", fmt_time(med["one"]), "",
         "≤ 300 ms", "PASS" if med["one"] <= GOAL else "MISS"],
        ["α move, browser, torch default threads", fmt_time(med["default"]),
         fmt_ratio(med["default"] / med["one"]), "≤ 300 ms",
         "PASS" if med["default"] <= GOAL else "MISS"],
        ["page load to first bars (Voilà runs the notebook), 1 thread",
         fmt_time(statistics.median(loads["one"])), "", "", ""],
    ]


# --------------------------------------------------------------------------------- notebooks


def bench_notebooks(folder: Path) -> list[list[str]]:
    """Execute notebooks and save them with widget state; report time and size."""
    import nbformat
    from nbclient import NotebookClient

    rows = []
    out = Path(tempfile.mkdtemp(prefix="famviz-nb-"))
    for name in ("00_quickstart", "02_reparameterization_invariance", "dashboards"):
        nb = nbformat.read(folder / f"{name}.ipynb", 4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=600, kernel_name="python3", store_widget_state=True,
                       resources={"metadata": {"path": str(folder)}}).execute()
        seconds = time.perf_counter() - start
        path = out / f"{name}.ipynb"
        nbformat.write(nb, path)
        rows.append([f"{name}.ipynb executed (fresh kernel)", fmt_time(seconds),
                     f"{path.stat().st_size / 1e6:.2f} MB", "", ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--skip-browser", action="store_true", help="no Voilà/Chromium part")
    ap.add_argument("--notebooks", type=Path, default=REPO / "notebooks",
                    help="the notebooks to execute and weigh (default: notebooks/)")
    ap.add_argument("--only-notebooks", action="store_true", help="only the notebook part")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; torch's default thread count here: {DEFAULT_THREADS}; "
          f"{os.cpu_count()} CPUs\n")
    start = time.perf_counter()
    rows = []
    if not args.only_notebooks:
        rows += bench_kernel(3 if args.quick else 9)
        if not args.skip_browser:
            rows += bench_browser(4 if args.quick else 9)
    rows += bench_notebooks(args.notebooks)
    print(table(["what", "median time", "÷ 1 thread / size", "goal", "verdict"], rows,
                title="Dashboards: latency, setup, notebook size"))
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
