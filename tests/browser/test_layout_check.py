"""The layout check of the browser tests (conftest.check_layout) on hand-made pages: it passes
a plot that fits and names a plot wider than its container and a title outside the svg."""

import pytest

from .conftest import check_layout


def plot_page(svg_width: int, container_width: int, title_x: int) -> str:
    return f"""<div class="famviz-test" style="width: 900px">
      <div class="famviz-plot famviz-demo-plot" style="width: {container_width}px">
        <div class="js-plotly-plot" style="position: relative">
          <svg class="main-svg" width="{svg_width}" height="200" style="display: block">
            <g class="g-xtitle"><text x="{title_x}" y="190">epoch</text></g>
          </svg>
        </div>
      </div>
    </div>"""


def test_a_plot_that_fits_passes(page):
    page.set_content(plot_page(svg_width=400, container_width=400, title_x=180))
    (plot,) = check_layout(page.locator(".famviz-test"))
    assert plot == {"cls": "famviz-demo-plot", "svg": 400, "container": 400, "clipped": []}


@pytest.mark.parametrize(("svg_width", "title_x", "words"), [
    (500, 180, "'svg': 500, 'container': 400"),  # wider than its container
    (400, 380, "g-xtitle \"epoch\""),  # the axis title runs past the svg's right edge
])
def test_a_plot_too_wide_or_clipped_fails(page, svg_width, title_x, words):
    page.set_content(plot_page(svg_width=svg_width, container_width=400, title_x=title_x))
    with pytest.raises(AssertionError, match="do not fit or are clipped") as info:
        check_layout(page.locator(".famviz-test"))
    assert words in str(info.value)
