# famviz — two commands for a new user: `make lab` (set up, open the tutorials) and
# `make test` (set up, run the whole suite). Both create/update .venv as needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
# The torch build is chosen here, before anything else is installed (see README, "torch").
# A torch already in .venv is kept; pip is then pinned to it so no dependency can swap it.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
PIN    := $(VENV)/torch-pin.txt
STAMP  := $(VENV)/.famviz-installed
PYTEST_ARGS ?=

.PHONY: lab voila test screenshots bench install labextension clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(PIN): | $(PY)
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(PIN)

$(STAMP): pyproject.toml $(PIN)
	$(PY) -m pip install -c $(PIN) -e ".[dev,dask]"
	touch $(STAMP)

# famviz's JupyterLab extension (labextension/: a widget output that lost the race for its model
# after a page reload looks again), built with Node.js's npm into famviz/labextension and linked
# into .venv's JupyterLab, as `jupyter labextension develop` does. npm is installed from Debian
# when missing (sudo unless root); where that cannot be done, JupyterLab runs without the
# extension (a warning says so, and its browser test fails).
LABEXT_SRC := labextension/package.json labextension/package-lock.json labextension/src/index.js
LABEXT     := $(VENV)/share/jupyter/labextensions/famviz-jupyterlab/package.json
LAB_CORE    = $(shell $(PY) -c "import jupyterlab, pathlib; print(pathlib.Path(jupyterlab.__file__).parent / 'staging')")

$(LABEXT): $(LABEXT_SRC) | $(STAMP)
	@command -v npm >/dev/null || ! command -v apt-get >/dev/null || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends nodejs npm; } || \
	  echo "warning: could not install Node.js and npm from Debian"
	@if command -v npm >/dev/null; then set -ex; \
	  cd labextension && { npm ci --no-audit --no-fund || npm ci --no-audit --no-fund; } && \
	  rm -rf ../famviz/labextension && \
	  node node_modules/@jupyterlab/builder/lib/build-labextension.js --core-path "$(LAB_CORE)" . && \
	  cd .. && mkdir -p $(dir $(@D)) && ln -sfn ../../../../famviz/labextension $(@D); \
	else echo "warning: no npm: famviz's JupyterLab extension (labextension/) is not built;" \
	  "after a page reload a dashboard may show 'model not found'"; fi

labextension: $(LABEXT)

install: $(STAMP) $(LABEXT)

# JupyterLab refuses to run as root unless told to (containers, CI machines)
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True)

lab: $(STAMP) $(LABEXT)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks $(LAB_ARGS)

# the dashboards as an app, with famviz's Voilà template (share/jupyter/voila/templates/famviz:
# nothing loaded from a CDN, so the page works offline)
voila: $(STAMP)
	JUPYTER_PATH=$(CURDIR)/share/jupyter $(VENV)/bin/voila --template=famviz notebooks/dashboards.ipynb

# Debian's Chromium for the real-browser tests (tests/browser; Playwright drives it, never a
# browser from `playwright install`). Installed when missing, with sudo unless root. Where that
# cannot be done the browser tests skip (and fail in CI, where CI is set).
CHROMIUM := /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))

$(CHROMIUM):
	@if command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; \
	fi; test -x $@ || echo "warning: no $@; the browser tests (tests/browser) will skip"

# unit tests, doctests, the browser tests and the tutorials (each notebook run in a fresh
# kernel by nbmake); pytest's exit code 5 ("no tests collected") is not a failure
test: $(STAMP) $(LABEXT) $(CHROMIUM)
	$(PY) -m pytest --doctest-modules famviz tests --nbmake --nbmake-timeout=300 notebooks \
	  $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# the dashboards' PNGs for the README (docs/images/), taken in Voila by tests/browser
screenshots: $(STAMP) $(CHROMIUM)
	@test -x $(CHROMIUM) || { echo "$(CHROMIUM) is needed for screenshots"; exit 1; }
	FAMVIZ_ARTIFACTS=docs/images FAMVIZ_FAILURES=build/browser-artifacts \
	  $(PY) -m pytest tests/browser/test_voila.py -q $(PYTEST_ARGS)

$(VENV)/.famviz-bench: $(STAMP)
	$(PY) -m pip install -c $(PIN) -e ".[dev,dask,bench]"
	touch $@

# each script prints its table of times and same-process ratios (see benchmarks/README.md)
bench: $(VENV)/.famviz-bench
	for s in curvature landscape measures fam_cost fam_compare widgets volume study scale memory; do \
	  $(PY) -u benchmarks/$$s.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info famviz/labextension labextension/node_modules
