"""The three dashboards as a Voilà app (notebooks/dashboards.ipynb): the ReparamExplorer keeps κ
and moves Tr(H) when α moves, the LandscapeExplorer draws a plotly figure, the TrainingExplorer
runs to the end. Saves a screenshot of each dashboard (`make screenshots`: docs/images/)."""

import re

from playwright.sync_api import expect

from .conftest import (
    RUN_TIMEOUT,
    TRAIN_TIMEOUT,
    check_alpha_invariance,
    check_plots_changed,
    check_plots_have_data,
    plots_signature,
    require_notebook,
)

NOTEBOOK = "dashboards.ipynb"
# plotly's toolbar appears on hover; keep it out of the README's pictures
SCREENSHOT_CSS = ".modebar-container { display: none !important; }"
TRACEBACK = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


def test_dashboards_in_voila(page, voila_server, artifacts_dir, failure_artifacts):
    failure_artifacts.update(page=page, server=voila_server)
    require_notebook(voila_server.root, NOTEBOOK)

    # Voilà runs every cell before the page is complete: do not wait for "load" here
    page.goto(f"{voila_server.url}/voila/render/{NOTEBOOK}", wait_until="commit")

    reparam = page.locator(".famviz-reparam").first
    landscape = page.locator(".famviz-landscape").first
    training = page.locator(".famviz-training").first
    # Voilà stops at a cell that raises and shows its traceback (--show_tracebacks): fail then,
    # with the traceback, instead of waiting out the timeout for the dashboards
    traceback = page.locator(TRACEBACK, has_text="Traceback (most recent call last)")
    expect(training.or_(traceback).first).to_be_visible(timeout=RUN_TIMEOUT)
    assert not traceback.count(), f"the notebook raised:\n{traceback.first.inner_text()}"
    for widget in (reparam, landscape, training):
        expect(widget).to_be_visible(timeout=RUN_TIMEOUT)

    check_plots_have_data(reparam)
    figures = plots_signature(reparam)
    check_alpha_invariance(reparam)
    check_plots_changed(reparam, figures)

    expect(landscape.locator(".js-plotly-plot").first).to_be_visible(timeout=RUN_TIMEOUT)
    # the coarse grid is refined in a background thread: the finest level must arrive too
    expect(landscape.locator(".famviz-status").first).to_contain_text(
        re.compile(r"41 × 41 grid drawn"), timeout=RUN_TIMEOUT)
    check_plots_have_data(landscape)

    status = training.locator(".famviz-status").first
    start = training.locator(".famviz-start").first
    start.scroll_into_view_if_needed()
    expect(start).to_be_enabled()
    start.click()
    expect(status).to_contain_text(re.compile("finished|stopped"), timeout=TRAIN_TIMEOUT)
    check_plots_have_data(training)

    page.mouse.move(0, 0)  # no hover labels in the pictures
    for name, widget in (("reparam", reparam), ("landscape", landscape), ("training", training)):
        widget.scroll_into_view_if_needed()
        widget.screenshot(path=str(artifacts_dir / f"{name}.png"), animations="disabled",
                          style=SCREENSHOT_CSS)
