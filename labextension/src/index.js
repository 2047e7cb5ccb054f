// famviz's JupyterLab extension: a widget output that lost the race for its model looks again.
//
// When a notebook is reopened (a page reload, say), each widget output asks the widget manager
// for its model while the manager fetches the models from the kernel. The lookup in
// @jupyter-widgets/jupyterlab-manager polls for 2 s and, if the manager has finished restoring
// by then, shows "Error displaying widget: model not found". It checks the clock before it
// looks: when the page's main thread was busy past the 2 s (drawing the first dashboard, say)
// and the restore finished meanwhile, it gives up without looking at the model that is now
// there. famviz's dashboards are large enough to hit this on a reload.
//
// The fix: a widget output that ends with that message renders once more. The manager has
// finished restoring, so the second lookup finds a model the kernel has at once, and a model
// that really is gone shows the same message 2 s later.

import { IJupyterWidgetRegistry } from '@jupyter-widgets/base';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';

const WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json';
const NOT_FOUND = 'Error displaying widget: model not found';

/** Patch the widget renderer's class (shared by every notebook) once. Returns whether it is
 * patched. */
function lookAgainOnNotFound(rendermime) {
  let probe;
  try {
    probe = rendermime.createRenderer(WIDGET_VIEW);
  } catch (err) {
    return false; // no widget renderer on this page: nothing to patch
  }
  const proto = Object.getPrototypeOf(probe);
  probe.dispose();
  const original = proto.renderModel;
  if (typeof original !== 'function') {
    return false;
  }
  if (original.famvizUnpatched) {
    return true;
  }
  async function renderModel(model) {
    await original.call(this, model);
    if (!this.isDisposed && this.node.textContent === NOT_FOUND) {
      this.removeClass('jupyter-widgets');
      await original.call(this, model);
    }
  }
  // kept for the browser test that reproduces the race with the unpatched method
  renderModel.famvizUnpatched = original;
  proto.renderModel = renderModel;
  return true;
}

const plugin = {
  id: 'famviz-jupyterlab:widget-lookup',
  description: 'A widget output that lost the race for its model after a reload looks again.',
  autoStart: true,
  requires: [IRenderMimeRegistry],
  // not used, but activating after the widget manager's plugin puts its renderer in place
  optional: [IJupyterWidgetRegistry],
  activate: (app, rendermime) => {
    if (!lookAgainOnNotFound(rendermime)) {
      console.warn('famviz-jupyterlab: no widget renderer found; nothing patched');
    }
  },
};

export default plugin;
