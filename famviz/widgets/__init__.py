"""Interactive dashboards for JupyterLab (and Voilà): ipywidgets controls and plotly figures
(shown through ``Output`` widgets, see :class:`famviz.widgets._base.PlotView`) on top of the
famviz core; all the mathematics lives in the core.

* :class:`ReparamExplorer` — rescale layers and neurons (T1, T2, T3, T5) and watch which
  flatness measures move;
* :class:`LandscapeExplorer` — 2-D loss surfaces, a coarse grid at once, then refined;
* :class:`TrainingExplorer` — SGD, FAM, SAM or ASAM with live curves, the previous run beside.

Each dashboard displays itself when it is the last expression of a cell, shows errors from its
callbacks in its own output area, and keeps its last result in ``.result``.
"""

from .landscape import LandscapeExplorer, LandscapeResult
from .reparam import DEFAULT_MEASURES, ReparamExplorer, ReparamResult
from .training import TrainingExplorer, TrainingRun

__all__ = [
    "ReparamExplorer",
    "ReparamResult",
    "DEFAULT_MEASURES",
    "LandscapeExplorer",
    "LandscapeResult",
    "TrainingExplorer",
    "TrainingRun",
]
