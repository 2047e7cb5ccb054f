"""Real-browser tests: famviz's widgets in JupyterLab and in Voilà, driven by Playwright.

Playwright drives Debian's Chromium (``/usr/bin/chromium``; ``make test`` installs it), never a
browser downloaded by ``playwright install``. Without it these tests skip locally and fail in CI
(where ``CI`` is set). Each server runs from a session fixture on a free loopback port, on a
temporary copy of ``notebooks/`` with its own Jupyter config, runtime, data and settings
directories, so nothing is written into the repository or the user's Jupyter setup.

Screenshots go to ``$FAMVIZ_ARTIFACTS`` (``make screenshots`` sets ``docs/images``), else to
``build/browser-artifacts/``; a failed test leaves ``failure-<test>.png`` and ``.log`` (the
server's log) in ``$FAMVIZ_FAILURES``, else beside the screenshots. Run only these tests with
``pytest tests/browser``; leave them out with ``-m "not browser"``. ``FAMVIZ_BROWSER_NOTEBOOKS``
serves another folder instead of ``notebooks/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
# FAMVIZ_BROWSER_NOTEBOOKS: another folder to serve instead of notebooks/ (e.g. stand-ins that
# follow the widgets' DOM contract, or a patched copy, to work on the tests or the dashboards)
NOTEBOOKS = Path(os.environ.get("FAMVIZ_BROWSER_NOTEBOOKS") or REPO / "notebooks")
# the Jupyter data directory holding famviz's Voilà template (voila/templates/famviz)
VOILA_TEMPLATES = REPO / "share" / "jupyter"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = "apt-get update && apt-get install -y --no-install-recommends chromium"
# a dashboard is about 1200 px wide; device scale 1 keeps the PNGs small
VIEWPORT = {"width": 1400, "height": 1000}
SERVER_START_TIMEOUT = 180  # s; a loaded 2-core machine can be 5-25x slower than an idle one

# Timeouts (ms) for Playwright's expect(): kernel start, running a notebook, a widget update.
KERNEL_TIMEOUT = 120_000
RUN_TIMEOUT = 300_000
UPDATE_TIMEOUT = 120_000
TRAIN_TIMEOUT = 300_000


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "browser: real-browser test (Playwright + Chromium); deselect with -m 'not browser'",
    )
    # raised by pytest-playwright's own base_url fixture, not by these tests
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Session-scoped fixtures defined as instance methods"
        ":pytest.PytestRemovedIn10Warning",
    )


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.browser)


# --------------------------------------------------------------------------------------------
# browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_executable():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing; install Debian's Chromium: {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args, chromium_executable):
    return {
        **browser_type_launch_args,
        "executable_path": chromium_executable,
        "args": CHROMIUM_ARGS,
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": VIEWPORT, "device_scale_factor": 1}


def _directory(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    path = Path(value).resolve() if value else default
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def artifacts_dir():
    """Where the screenshots go: $FAMVIZ_ARTIFACTS, else build/browser-artifacts/."""
    return _directory("FAMVIZ_ARTIFACTS", REPO / "build" / "browser-artifacts")


@pytest.fixture(scope="session")
def failures_dir(artifacts_dir):
    """Where a failed test leaves its page and server log: $FAMVIZ_FAILURES, else beside the
    screenshots (`make screenshots` keeps them out of docs/images)."""
    path = _directory("FAMVIZ_FAILURES", artifacts_dir)
    for old in path.glob("failure-*"):  # from an earlier run
        old.unlink()
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"famviz_rep_{report.when}", report)
    return report


@pytest.fixture
def failure_artifacts(request, failures_dir):
    """Collects (page, server) of a test; if the test fails, saves a screenshot of the page and
    the tail of the server's log next to the other artifacts, and prints the log tail."""
    watched = {}
    yield watched
    report = getattr(request.node, "famviz_rep_call", None)
    if report is None or not report.failed:
        return
    stem = "failure-" + re.sub(r"[^\w.-]+", "_", request.node.name).strip("_")
    page = watched.get("page")
    if page is not None:
        try:
            page.screenshot(path=str(failures_dir / f"{stem}.png"), full_page=True)
        except Exception as exc:  # noqa: BLE001 - the page may be gone; the log still helps
            print(f"(no failure screenshot: {exc})")
    server = watched.get("server")
    if server is not None:
        tail = server.log_tail()
        (failures_dir / f"{stem}.log").write_text(tail)
        print(f"--- {server.name} log (tail) ---\n{tail}")


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A Jupyter-style server in its own process group, logging to a file."""

    def __init__(self, name, argv, env, cwd, log_path, ready_path):
        self.name = name
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        self._log = open(log_path, "ab")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kernels are stopped with it
        )
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, n_chars=6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def _wait_ready(self, ready_path):
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        last_error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=10) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last_error = exc
            time.sleep(0.25)
        raise RuntimeError(
            f"{self.name} did not answer {ready_path} within {SERVER_START_TIMEOUT} s "
            f"(last error: {last_error}); log tail:\n{self.log_tail()}"
        )

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        # kernels started by the server share its process group; make sure none survive
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not self._log.closed:
            self._log.close()


def start_server(name, argv, env, cwd, log_path, ready_path, attempts=3) -> Server:
    """Start a server on a free port; try another port if the chosen one was taken meanwhile."""
    for attempt in range(attempts):
        try:
            return Server(name, argv, env, cwd, log_path, ready_path)
        except RuntimeError as exc:
            taken = "already in use" in str(exc) or "Address in use" in str(exc)
            if not taken or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _jupyter_env(base: Path) -> dict:
    """Environment for a server: every Jupyter directory in `base`, so the user's own config,
    kernelspecs, workspaces and settings play no part, and nothing is written outside."""
    dirs = {
        "JUPYTER_CONFIG_DIR": base / "config",
        "JUPYTER_RUNTIME_DIR": base / "runtime",
        "JUPYTER_DATA_DIR": base / "data",
        "JUPYTERLAB_SETTINGS_DIR": base / "settings",
        "JUPYTERLAB_WORKSPACES_DIR": base / "workspaces",
        "IPYTHONDIR": base / "ipython",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({k: str(v) for k, v in dirs.items()})
    env["PYTHONUNBUFFERED"] = "1"
    # the kernels' models are small; on a shared 2-core machine one BLAS thread is steadier
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    # the tests pass --IdentityProvider.token= / no token; a token from the caller must not win
    env.pop("JUPYTER_TOKEN", None)
    return env


def _write_lab_settings(settings_dir: Path):
    files = {
        # no news / update toast over the page
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
        # every cell in the DOM (no windowing), so widgets below the fold can be found
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for rel, content in files.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


def _copy_notebooks(root: Path) -> Path:
    """A private copy of notebooks/ (executed notebooks and checkpoints are written there)."""
    if NOTEBOOKS.is_dir():
        shutil.copytree(
            NOTEBOOKS, root, dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
        )
    return root


def require_notebook(root: Path, name: str) -> str:
    if not (root / name).is_file():
        pytest.fail(f"notebooks/{name} does not exist (the test opens it)", pytrace=False)
    return name


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory, chromium_executable):
    base = tmp_path_factory.mktemp("lab")
    env = _jupyter_env(base)
    _write_lab_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))
    root = _copy_notebooks(base / "root")
    argv = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", "--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.allow_root=True", "--IdentityProvider.token=",
        "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
        "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.expose_app_in_browser=True",
    ]
    server = start_server("JupyterLab", argv, env, root, base / "lab.log", "/api/status")
    server.root = root
    yield server
    server.stop()


@pytest.fixture(scope="session")
def voila_server(tmp_path_factory, chromium_executable):
    base = tmp_path_factory.mktemp("voila")
    env = _jupyter_env(base)
    # famviz's Voilà template (share/jupyter/voila/templates/famviz: nothing from a CDN),
    # found through JUPYTER_PATH, as `make voila` does
    env["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(VOILA_TEMPLATES), env.get("JUPYTER_PATH")) if p)
    root = _copy_notebooks(base / "root")
    argv = [
        sys.executable, "-m", "voila", "--no-browser", "--port={port}", "--Voila.ip=127.0.0.1",
        "--Voila.port_retries=0", "--show_tracebacks=True", "--template=famviz", str(root),
    ]
    # Voilà serves its directory listing at / once it is up; notebooks are run per page load
    server = start_server("Voila", argv, env, root, base / "voila.log", "/")
    server.root = root
    yield server
    server.stop()


def record_external_requests(page, server) -> list[str]:
    """Start recording every request `page` makes to a host other than `server` (the page must
    work offline: no CDN, no fonts, no telemetry). Returns the list, filled as the page runs;
    call before the page is opened."""
    local = urlsplit(server.url).netloc
    external: list[str] = []

    def on_request(request):
        parts = urlsplit(request.url)
        if parts.scheme not in ("data", "blob", "about") and parts.netloc != local:
            external.append(request.url)

    page.on("request", on_request)
    return external


# --------------------------------------------------------------------------------------------
# the ReparamExplorer check shared by the JupyterLab and the Voilà test
# --------------------------------------------------------------------------------------------

# a readout value: 4 significant digits, e.g. 47.09, 0.01235 or 1.235e+05
NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"


def check_alpha_invariance(widget, presses=3):
    """T1 in the browser: move the first α slider of a ReparamExplorer (`widget`, the locator of
    its root) with the keyboard; Tr(H)'s readout must change and κ's must stay identical.
    Returns (kappa, trace before, trace after) as displayed."""
    from playwright.sync_api import expect

    kappa = widget.locator('.famviz-value[data-measure="relative_flatness"]').first
    trace = widget.locator('.famviz-value[data-measure="hessian_trace"]').first
    expect(kappa).to_have_text(re.compile(f"^{NUMBER}$"), timeout=RUN_TIMEOUT)
    expect(trace).to_have_text(re.compile(f"^{NUMBER}$"), timeout=UPDATE_TIMEOUT)
    kappa_before = kappa.inner_text().strip()
    trace_before = trace.inner_text().strip()

    handle = widget.locator(".famviz-alpha .noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(presses):
        handle.press("ArrowRight")

    # first wait for the update to land (a number other than the old Tr(H)), then compare κ
    changed = re.compile(rf"^(?!\s*{re.escape(trace_before)}\s*$){NUMBER}$")
    expect(trace).to_have_text(changed, timeout=UPDATE_TIMEOUT)
    expect(kappa).to_have_text(kappa_before, timeout=UPDATE_TIMEOUT)
    return kappa_before, trace_before, trace.inner_text().strip()


# Each plotly figure inside `root` has been drawn with data (a trace with points). The
# dashboards draw their figures through ipywidgets Outputs (famviz.widgets._base.PlotView);
# numpy arrays arrive as plotly typed arrays ({dtype, bdata, shape}), lists as arrays. While an
# Output re-renders, the old plot can briefly sit beside the new one: the last one counts.
PLOTS_HAVE_DATA = """(root) => {
  const plots = [...root.querySelectorAll('.famviz-plot')].map(
    (o) => [...o.querySelectorAll('.js-plotly-plot')].pop());
  const hasPoints = (t) => ['x', 'y', 'z'].some((k) => t[k] && (t[k].length > 0 || t[k].bdata));
  return plots.length > 0 && plots.every((p) => p && Array.isArray(p.data) && p.data.some(hasPoints));
}"""

# Layout (issue 13, item 4), read from the page: per plot of a dashboard, the widths of its
# plotly svg and of its Output (the container), and every legend, colorbar title, axis title
# and annotation whose box reaches outside the svg (clipped). 3-D scenes draw their axis
# titles into a WebGL canvas, not the DOM; their scene must fit the svg.
PLOTS_LAYOUT = """(root) => [...root.querySelectorAll('.famviz-plot')].map((o) => {
  const p = [...o.querySelectorAll('.js-plotly-plot')].pop();
  const svg = p && p.querySelector('.main-svg');
  if (!svg) return {cls: o.className, missing: true};
  const box = svg.getBoundingClientRect(), out = o.getBoundingClientRect();
  const parts = ['.legend', '.cbtitle', '.g-xtitle', '.g-ytitle', '[class^="g-x2title"]',
                 '[class^="g-y2title"]', '[class*="title"] text', '.annotation', '.gl-container'];
  const clipped = [];
  for (const sel of parts) {
    for (const el of p.querySelectorAll(sel)) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 || r.height === 0) continue;
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 ||
          r.bottom > box.bottom + 1) {
        clipped.push(`${sel} "${(el.textContent || '').trim().slice(0, 40)}" ` +
          `[${Math.round(r.left - box.left)}, ${Math.round(r.right - box.left)}] x ` +
          `[${Math.round(r.top - box.top)}, ${Math.round(r.bottom - box.top)}] in ` +
          `${Math.round(box.width)} x ${Math.round(box.height)}`);
      }
    }
  }
  return {cls: o.className.split(' ').filter((c) => c !== 'famviz-plot' && c.startsWith('famviz'))
            .join(' '), svg: Math.round(box.width), container: Math.round(out.width), clipped};
})"""


def check_layout(widget):
    """Every plot of the dashboard `widget` fits its container (svg width <= the Output's
    width) and shows its legend, colorbar title, axis titles and annotations whole (inside the
    svg). Returns what was measured."""
    plots = widget.evaluate(PLOTS_LAYOUT)
    assert plots, "no plots found"
    problems = [p for p in plots if p.get("missing") or p["svg"] > p["container"] + 1
                or p["clipped"]]
    assert not problems, f"plots that do not fit or are clipped: {problems}"
    return plots


# What each figure of a dashboard shows, read from the page: per plot (in DOM order) its
# title, number of traces, trace names, each trace's z shape ("rows, cols") and first y values.
PLOTS_READ = """(root) => [...root.querySelectorAll('.famviz-plot')].map((o) => {
  const p = [...o.querySelectorAll('.js-plotly-plot')].pop();
  if (!p || !Array.isArray(p.data)) return null;
  const shape = (z) => !z ? null : (z.shape !== undefined ? String(z.shape).replace(/\\s/g, '')
    : `${z.length},${z[0] ? z[0].length : 0}`);
  const head = (y) => Array.isArray(y) ? y.slice(0, 3) : (y && y.bdata ? 'typed' : null);
  return {cls: o.className, title: p.layout.title ? (p.layout.title.text || null) : null,
          traces: p.data.length, names: p.data.map((t) => t.name || null),
          z: p.data.map((t) => shape(t.z)), y: p.data.map((t) => head(t.y))};
})"""


def check_plots_have_data(widget, timeout=UPDATE_TIMEOUT):
    """Every figure in the dashboard `widget` (a locator) shows at least one trace with points;
    fails with what the page shows otherwise."""
    from playwright.sync_api import Error as PlaywrightError

    handle = widget.element_handle(timeout=timeout)
    try:
        widget.page.wait_for_function(PLOTS_HAVE_DATA, arg=handle, timeout=timeout, polling=250)
    except PlaywrightError as exc:
        raise AssertionError(
            f"a plotly figure has no data: {handle.evaluate(PLOTS_READ)}") from exc


def read_plots(widget) -> list[dict | None]:
    """What the dashboard's figures show on the page (see PLOTS_READ)."""
    return widget.evaluate(PLOTS_READ)


def wait_for_plot(widget, plot_class: str, predicate: str, what: str, timeout=UPDATE_TIMEOUT):
    """Wait until the figure of the Output with class `plot_class` satisfies the JavaScript
    `predicate` (a function of PLOTS_READ's entry for it); fail with what the page shows."""
    from playwright.sync_api import Error as PlaywrightError

    handle = widget.element_handle(timeout=timeout)
    js = f"""([root, cls]) => {{
      const plots = ({PLOTS_READ})(root);
      const p = plots.find((q) => q && q.cls.split(' ').includes(cls));
      return !!p && ({predicate})(p);
    }}"""
    try:
        widget.page.wait_for_function(js, arg=[handle, plot_class], timeout=timeout,
                                      polling=250)
    except PlaywrightError as exc:
        raise AssertionError(f"{plot_class}: expected {what}; the page shows "
                             f"{[p for p in read_plots(widget) if p and plot_class in p['cls']]}"
                             ) from exc


# What the plotly figures in `root` show: a string that changes when any trace's data does.
PLOTS_SIGNATURE = """(root) => JSON.stringify([...root.querySelectorAll('.famviz-plot')].map(
  (o) => { const p = [...o.querySelectorAll('.js-plotly-plot')].pop();
           return p ? (p.data || []).map((t) => [t.x, t.y, t.z]) : null; }))"""


def plots_signature(widget) -> str:
    return widget.evaluate(PLOTS_SIGNATURE)


def check_plots_changed(widget, before: str, timeout=UPDATE_TIMEOUT):
    """The dashboard's plotly figures have been redrawn with new data since `before`
    (from :func:`plots_signature`): the figure views receive the kernel's updates."""
    from playwright.sync_api import Error as PlaywrightError

    handle = widget.element_handle(timeout=timeout)
    try:
        widget.page.wait_for_function(
            f"([root, before]) => ({PLOTS_SIGNATURE})(root) !== before",
            arg=[handle, before], timeout=timeout, polling=250,
        )
    except PlaywrightError as exc:
        raise AssertionError(
            "the dashboard's plotly figures did not change after the update (the figure views "
            "got no updates from the kernel)"
        ) from exc


# --------------------------------------------------------------------------------------------
# driving the controls
# --------------------------------------------------------------------------------------------


def slider_keys(widget, css: str, *keys: str, index: int = 0):
    """Press `keys` on the handle of the `index`-th ipywidgets slider matching `css` (e.g.
    ".famviz-alpha", or a description text via `.widget-slider:has-text(...)`)."""
    handle = widget.locator(f"{css} .noUi-handle").nth(index)
    handle.scroll_into_view_if_needed()
    handle.focus()
    for key in keys:
        handle.press(key)


def select_option(widget, description: str, label: str):
    """Choose `label` in the ipywidgets Dropdown whose description is `description`."""
    box = widget.locator(".widget-dropdown", has=widget.page.locator(
        "label", has_text=re.compile(f"^{re.escape(description)}$")))
    box.locator("select").select_option(label=label)


def check_reparam_at_alpha_100(widget):
    """α of the first pair to 100 (the slider's End): κ's ratio reads 1, Tr(H) and λ_max have
    moved by more than 10×, the function check reads ~0 with words that agree, and the bar
    chart on the page shows the readout's ratios."""
    from playwright.sync_api import expect

    slider_keys(widget, ".famviz-alpha", "End")
    expect(widget.locator(".famviz-alpha .widget-readout").first).to_have_text(
        "100", timeout=UPDATE_TIMEOUT)
    ratio = lambda name: widget.locator(f'.famviz-ratio[data-measure="{name}"]').first  # noqa
    expect(ratio("relative_flatness")).to_have_text("1×", timeout=UPDATE_TIMEOUT)
    expect(ratio("hessian_trace")).not_to_have_text(re.compile(r"^\s*\d\.\d*×"),
                                                    timeout=UPDATE_TIMEOUT)
    numbers = {n: float(ratio(n).inner_text().strip().rstrip("×"))
               for n in ("relative_flatness", "hessian_trace", "hessian_top_eigenvalue")}
    assert numbers["relative_flatness"] == 1.0
    assert numbers["hessian_trace"] > 10 and numbers["hessian_top_eigenvalue"] > 10, numbers
    check_function_check(widget)
    check_trace_bar(widget, numbers["hessian_trace"])
    return numbers


def check_trace_bar(widget, ratio: float):
    """The bars a ReparamExplorer draws on the page are the ratios of its readout (the
    kernel's figure): Tr(H)'s bar stands at `ratio`."""
    wait_for_plot(widget, "famviz-measures-plot",
                  f"(p) => Array.isArray(p.y[0]) && Math.abs(p.y[0][1] / {ratio} - 1) < 1e-3",
                  f"Tr(H)'s bar at {ratio}")


def check_function_check(widget):
    """The function check reads ~0 and says the function is unchanged."""
    from playwright.sync_api import expect

    check = widget.locator(".famviz-function-check").first
    expect(check).to_have_attribute("data-same", "true", timeout=UPDATE_TIMEOUT)
    value = float(widget.locator('.famviz-value[data-measure="max_output_change"]')
                  .first.inner_text())
    assert value < 1e-9, value
    expect(check.locator(".famviz-verdict")).to_have_text(
        "the function is unchanged (rounding only)")


# --------------------------------------------------------------------------------------------
# the LandscapeExplorer and TrainingExplorer checks shared by the JupyterLab and the Voilà test
# --------------------------------------------------------------------------------------------

def change_landscape_controls(landscape):
    """Every control of the LandscapeExplorer once; ends at 21 × 21, Hessian directions,
    test loss, linear scale."""
    from playwright.sync_api import expect

    status = landscape.locator(".famviz-status").first
    select_option(landscape, "normalize", "layer")
    seed = landscape.locator(".widget-inline-hbox:has(label:text-is('seed')) input").first
    seed.fill("5")
    seed.press("Enter")
    slider_keys(landscape, ".widget-slider", "ArrowLeft")  # span
    select_option(landscape, "resolution", "21")
    select_option(landscape, "directions", "Hessian top-2")
    landscape.get_by_role("button", name="test", exact=True).click()
    landscape.locator("input[type=checkbox]").first.uncheck()
    expect(status).to_contain_text(re.compile(r"21 × 21 grid drawn after [\d.]+ s$"),
                                   timeout=UPDATE_TIMEOUT)


def check_landscape_drawn(landscape):
    """The page draws the last setting: 21 × 21 test-loss grids, linear, two traces each."""
    for cls, title in (("famviz-surface-plot", "Loss surface (test loss)"),
                       ("famviz-contour-plot", "Loss contours (test loss)")):
        wait_for_plot(landscape, cls,
                      f"(p) => p.title === {title!r} && p.traces === 2 && p.z[0] === '21,21'",
                      f"{title!r}, 2 traces, a 21 × 21 grid")


def run_training(training, method: str) -> str:
    """Choose `method`, move its strength one step, start, wait; returns the run's label as
    the status line gives it (e.g. "ASAM ρ=0.63")."""
    from playwright.sync_api import expect

    status = training.locator(".famviz-status").first
    training.get_by_role("button", name=method, exact=True).click()
    slider = ".widget-slider:has(label:text-is('FAM λ'))" if method == "FAM" else \
        ".widget-slider:has(label:text-is('SAM ρ'))"
    slider_keys(training, slider, "ArrowRight")
    start = training.locator(".famviz-start").first
    start.scroll_into_view_if_needed()
    expect(start).to_be_enabled()
    start.click()
    expect(status).to_contain_text(re.compile(rf"^{method}.*: (finished|stopped)"),
                                   timeout=TRAIN_TIMEOUT)
    return status.inner_text().split(":")[0].strip()


def check_training_drawn(training, current: str, previous: str, epochs: int):
    """The page draws the last two runs: `previous` in grey, `current` with `epochs` epochs."""
    from playwright.sync_api import expect

    expect(training.locator(".famviz-epoch").first).to_have_text(f"{epochs} / {epochs}")
    wait_for_plot(
        training, "famviz-training-plot",
        f"(p) => p.traces === 10 && p.names[0] === {previous!r} && p.names[5] === {current!r}"
        f" && Array.isArray(p.y[5]) && p.y[5].length === {min(epochs, 3)}",
        f"previous run {previous!r}, current {current!r} with {epochs} epochs")
