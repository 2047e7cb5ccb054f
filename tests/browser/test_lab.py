"""The dashboards in a real JupyterLab: open notebooks/dashboards.ipynb, Run All Cells from the
menu, change the controls of all three dashboards, save, **reload the page** and check that the
views rebuilt from the kernel's widget state draw what the kernel computed (not the first
picture), and that the readouts at α = 100 survive the reload."""

import json
import re

import pytest
from playwright.sync_api import expect

from .conftest import (
    KERNEL_TIMEOUT,
    RUN_TIMEOUT,
    TRAIN_TIMEOUT,
    UPDATE_TIMEOUT,
    VIEWPORT,
    check_alpha_invariance,
    check_function_check,
    check_layout,
    check_plots_have_data,
    check_reparam_at_alpha_100,
    record_external_requests,
    require_notebook,
    select_option,
    slider_keys,
    wait_for_plot,
)

NOTEBOOK = "dashboards.ipynb"

# The notebook panel is current, its document loaded, its kernel connected and idle. (The
# toolbar's idle indicator is not enough: a "Run All" sent before this can be lost.)
KERNEL_READY = """(path) => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.context || w.context.path !== path || !w.context.isReady) return false;
  const kernel = w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}"""

# Every code cell has run (an execution count, kernel idle again), or one raised: then its
# error, to fail at once instead of waiting out the timeout.
RUN_FINISHED = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const cells = w.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    const error = cell.outputs.toJSON().find((o) => o.output_type === 'error');
    if (error) return {error: `cell ${i}: ${error.ename}: ${error.evalue}`};
    if (cell.executionCount === null) return false;
  }
  const kernel = w.sessionContext.session.kernel;
  return kernel.status === 'idle' && !!document.querySelector('.famviz-training') && {ok: true};
}"""

SAVE = "() => window.jupyterapp.commands.execute('docmanager:save')"


def test_dashboards_in_jupyterlab_survive_a_reload(page, lab_server, artifacts_dir,
                                                   failure_artifacts):
    failure_artifacts.update(page=page, server=lab_server)
    require_notebook(lab_server.root, NOTEBOOK)

    external = record_external_requests(page, lab_server)
    page.goto(f"{lab_server.url}/lab/tree/{NOTEBOOK}", wait_until="domcontentloaded")
    page.wait_for_function(KERNEL_READY, arg=NOTEBOOK, timeout=KERNEL_TIMEOUT, polling=250)
    page.locator("#jp-menu-panel .lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    outcome = page.wait_for_function(RUN_FINISHED, timeout=RUN_TIMEOUT, polling=500).json_value()
    assert "error" not in outcome, f"the notebook raised: {outcome['error']}"
    prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt")
    texts = [t.strip() for t in prompts.all_inner_texts()]
    assert texts and all(re.fullmatch(r"\[\d+\]:", t) for t in texts), json.dumps(texts)

    reparam = page.locator(".famviz-reparam").first
    landscape = page.locator(".famviz-landscape").first
    training = page.locator(".famviz-training").first

    # change the controls: α to 100, the landscape to a 21 × 21 test-loss grid, one ASAM epoch
    check_plots_have_data(reparam)
    check_alpha_invariance(reparam)
    before = check_reparam_at_alpha_100(reparam)
    expect(landscape.locator(".famviz-status").first).to_contain_text(
        re.compile(r"41 × 41 grid drawn"), timeout=RUN_TIMEOUT)
    select_option(landscape, "resolution", "21")
    landscape.get_by_role("button", name="test", exact=True).click()
    expect(landscape.locator(".famviz-status").first).to_contain_text(
        re.compile(r"21 × 21 grid drawn after [\d.]+ s$"), timeout=UPDATE_TIMEOUT)
    slider_keys(training, ".widget-slider:has(label:text-is('epochs'))", "Home")
    training.get_by_role("button", name="ASAM", exact=True).click()
    training.locator(".famviz-start").first.click()
    status = training.locator(".famviz-status").first
    expect(status).to_contain_text(re.compile(r"^ASAM.*: finished 1 epochs"),
                                   timeout=TRAIN_TIMEOUT)
    label = status.inner_text().split(":")[0].strip()

    # layout in the notebook's cell: every plot fits its dashboard, nothing clipped
    for widget in (reparam, landscape, training):
        widget.scroll_into_view_if_needed()
        print("layout:", check_layout(widget))
    # offline: nothing was requested from any host but the JupyterLab server (checked again
    # after the reload)
    assert external == [], f"the page requested other hosts: {external}"

    # save (the outputs reference the widgets), reload: every view is rebuilt from state
    page.evaluate(SAVE)
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
                           timeout=UPDATE_TIMEOUT)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function(KERNEL_READY, arg=NOTEBOOK, timeout=KERNEL_TIMEOUT, polling=250)

    # Known upstream race, reported as an expected failure when seen: each widget output looks
    # its model up for at most 2 s (@jupyter-widgets/jupyterlab-manager's get_model) and gives
    # up without a last look when the page's main thread was busy past that time, e.g. drawing
    # the first dashboard, although the model was restored ("Error displaying widget: model
    # not found"; seen on the last dashboard, the TrainingExplorer). The kernel's widgets are
    # all there; in Voilà famviz's template avoids it (it draws widget outputs only after the
    # restore), JupyterLab offers no such hook. When every dashboard comes back, all must hold.
    lost = page.locator(".jupyter-widgets", has_text="Error displaying widget: model not found")
    for widget in (reparam, landscape, training):
        expect(widget.or_(lost).first).to_be_visible(timeout=UPDATE_TIMEOUT)
    assert external == [], f"the page requested other hosts: {external}"
    if lost.count():
        pytest.xfail(f"{lost.count()} dashboard(s) not rebuilt after the reload: 'model not "
                     "found' (known upstream race, see comment)")

    ratio = reparam.locator('.famviz-ratio[data-measure="hessian_trace"]').first
    expect(ratio).to_have_text(f"{before['hessian_trace']:.4g}×", timeout=UPDATE_TIMEOUT)
    check_function_check(reparam)
    wait_for_plot(reparam, "famviz-measures-plot",
                  f"(p) => Array.isArray(p.y[0]) && Math.abs(p.y[0][1] / "
                  f"{before['hessian_trace']} - 1) < 1e-3", "the bars at α = 100")
    for cls, title in (("famviz-surface-plot", "Loss surface (log10 test loss)"),
                       ("famviz-contour-plot", "Loss contours (log10 test loss)")):
        wait_for_plot(landscape, cls,
                      f"(p) => p.title === {title!r} && p.traces === 2 && p.z[0] === '21,21'",
                      f"{title!r}, a 21 × 21 grid")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1500})
    reparam.scroll_into_view_if_needed()
    reparam.screenshot(path=str(artifacts_dir / "lab-reparam.png"))

    wait_for_plot(training, "famviz-training-plot",
                  f"(p) => p.traces === 10 && p.names[5] === {label!r} && "
                  "Array.isArray(p.y[5]) && p.y[5].length === 1",
                  f"the ASAM run {label!r}")

    assert external == [], f"the page requested other hosts: {external}"
