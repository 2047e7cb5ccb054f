"""The ReparamExplorer in a real JupyterLab: open the tutorial, Run All Cells from the menu,
move an α slider with the keyboard and watch κ stay put while Tr(H) moves."""

import json
import re

from playwright.sync_api import expect

from .conftest import (
    KERNEL_TIMEOUT,
    RUN_TIMEOUT,
    VIEWPORT,
    check_alpha_invariance,
    check_plots_changed,
    check_plots_have_data,
    plots_signature,
    require_notebook,
)

NOTEBOOK = "02_reparameterization_invariance.ipynb"

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
  return kernel.status === 'idle' && !!document.querySelector('.famviz-reparam') && {ok: true};
}"""


def test_reparam_explorer_in_jupyterlab(page, lab_server, artifacts_dir, failure_artifacts):
    failure_artifacts.update(page=page, server=lab_server)
    require_notebook(lab_server.root, NOTEBOOK)

    page.goto(f"{lab_server.url}/lab/tree/{NOTEBOOK}", wait_until="domcontentloaded")
    page.wait_for_function(KERNEL_READY, arg=NOTEBOOK, timeout=KERNEL_TIMEOUT, polling=250)

    page.locator("#jp-menu-panel .lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    outcome = page.wait_for_function(RUN_FINISHED, timeout=RUN_TIMEOUT, polling=500).json_value()
    assert "error" not in outcome, f"the notebook raised: {outcome['error']}"
    # every code cell's prompt is a number ([12]:), none pending ([*]:) or unrun ([ ]:)
    prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt")
    texts = [t.strip() for t in prompts.all_inner_texts()]
    assert texts and all(re.fullmatch(r"\[\d+\]:", t) for t in texts), json.dumps(texts)

    widget = page.locator(".famviz-reparam").first
    expect(widget).to_be_visible()
    check_plots_have_data(widget)
    figures = plots_signature(widget)
    check_alpha_invariance(widget)
    check_plots_changed(widget, figures)

    # the dashboard is taller than the notebook area of a 1000 px window: make room for it
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1500})
    widget.scroll_into_view_if_needed()
    widget.screenshot(path=str(artifacts_dir / "lab-reparam.png"))
    page.screenshot(path=str(artifacts_dir / "lab-page.png"), full_page=True)
