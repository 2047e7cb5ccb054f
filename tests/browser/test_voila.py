"""The three dashboards as a Voilà app (notebooks/dashboards.ipynb), served with famviz's Voilà
template (share/jupyter/voila/templates/famviz: nothing from a CDN; the page must request
nothing from other hosts). Voilà runs the notebook before the page connects, so every figure
view here is made late, from the widgets' state: the test changes every control and checks
that the page draws what the kernel computed.
Saves a screenshot of each dashboard at the end (`make screenshots`: docs/images/)."""

import re

from playwright.sync_api import expect

from .conftest import (
    RUN_TIMEOUT,
    UPDATE_TIMEOUT,
    change_landscape_controls,
    check_alpha_invariance,
    check_function_check,
    check_landscape_drawn,
    check_layout,
    check_plots_changed,
    check_plots_have_data,
    check_reparam_at_alpha_100,
    check_training_drawn,
    plots_signature,
    record_external_requests,
    require_notebook,
    run_training,
    slider_keys,
)

NOTEBOOK = "dashboards.ipynb"
# plotly's toolbar appears on hover; keep it out of the README's pictures
SCREENSHOT_CSS = ".modebar-container { display: none !important; }"
TRACEBACK = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


#: how long the whole page may take to render (all cells run, every dashboard shown)
PAGE_TIMEOUT = 180_000


def test_dashboards_in_voila(page, voila_server, artifacts_dir, failure_artifacts):
    failure_artifacts.update(page=page, server=voila_server)
    require_notebook(voila_server.root, NOTEBOOK)

    external = record_external_requests(page, voila_server)
    # Voilà runs every cell before the page is complete: do not wait for "load" here
    page.goto(f"{voila_server.url}/voila/render/{NOTEBOOK}", wait_until="commit")

    reparam = page.locator(".famviz-reparam").first
    landscape = page.locator(".famviz-landscape").first
    training = page.locator(".famviz-training").first
    # Voilà stops at a cell that raises and shows its traceback (--show_tracebacks): fail then,
    # with the traceback, instead of waiting out the timeout for the dashboards
    traceback = page.locator(TRACEBACK, has_text="Traceback (most recent call last)")
    # A dashboard the page could not draw: this stopped the page after the first dashboard in
    # about one load in two before famviz's Voilà template drew the widget outputs only once
    # every model is restored (see share/jupyter/voila/templates/famviz/index.html.j2). Fail
    # at once with it rather than waiting out the timeout.
    lost = page.locator(".famviz-lost, .jupyter-widgets",
                        has_text=re.compile("Error displaying widget"))
    # a complete page takes about a minute here
    expect(training.or_(traceback).or_(lost).first).to_be_visible(timeout=PAGE_TIMEOUT)
    assert not lost.count(), f"a dashboard was not drawn: {lost.first.inner_text()}"
    assert not traceback.count(), f"the notebook raised:\n{traceback.first.inner_text()}"
    for widget in (reparam, landscape, training):
        expect(widget).to_be_visible(timeout=RUN_TIMEOUT)

    # ReparamExplorer: a small α move, then α = 100, then the softmax shift
    check_plots_have_data(reparam)
    figures = plots_signature(reparam)
    check_alpha_invariance(reparam)
    check_plots_changed(reparam, figures)
    check_reparam_at_alpha_100(reparam)
    slider_keys(reparam, ".widget-slider:has(label:text-matches('^T5 shift'))", "End")
    expect(reparam.locator(".famviz-table th", has_text="T5").first).to_be_visible(
        timeout=UPDATE_TIMEOUT)
    check_function_check(reparam)

    # LandscapeExplorer: the first grid, then every control
    expect(landscape.locator(".famviz-status").first).to_contain_text(
        re.compile(r"41 × 41 grid drawn"), timeout=RUN_TIMEOUT)
    check_plots_have_data(landscape)
    change_landscape_controls(landscape)
    check_landscape_drawn(landscape)

    # TrainingExplorer: 2 epochs of FAM, then ASAM; the page shows both runs, named
    slider_keys(training, ".widget-slider:has(label:text-is('epochs'))", "Home", "ArrowRight")
    first = run_training(training, "FAM")
    second = run_training(training, "ASAM")
    check_training_drawn(training, second, first, epochs=2)

    # layout in a 1280-px page: every plot fits its dashboard, nothing clipped
    page.set_viewport_size({"width": 1280, "height": 1000})
    for widget in (reparam, landscape, training):
        widget.scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # plotly's responsive resize follows the window's
        print("layout:", check_layout(widget))

    page.mouse.move(0, 0)  # no hover labels in the pictures
    for name, widget in (("reparam", reparam), ("landscape", landscape), ("training", training)):
        widget.scroll_into_view_if_needed()
        widget.screenshot(path=str(artifacts_dir / f"{name}.png"), animations="disabled",
                          style=SCREENSHOT_CSS)

    # offline: nothing was requested from any host but the Voilà server
    assert external == [], f"the page requested other hosts: {external}"
