"""Packaging: the import layers, the public names, and environment.yml agreeing with
pyproject.toml."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

import famviz as fv

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names of the PyPI packages that are named differently there
CONDA_NAMES = {"torch": "pytorch"}


def test_core_imports_neither_plotly_nor_ipywidgets():
    code = (
        "import sys, famviz, famviz.measures, famviz.reparam, famviz.oracles; "
        "bad = [m for m in ('plotly', 'ipywidgets', 'anywidget') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_public_api_names_exist():
    for name in fv.__all__:
        assert hasattr(fv, name), name
    for name in ("relative_flatness", "hessian_trace", "hessian_top_eigenvalue"):
        assert callable(getattr(fv, name))
    for name in ("scale_layers", "scale_neurons", "shift_logits", "normalize_features",
                 "max_output_change"):
        assert callable(getattr(fv.reparam, name))


def _split_requirement(req: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", req)
    assert m, req
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"][0] == "conda-forge"
    deps = env["dependencies"]
    conda = dict(_split_requirement(d) for d in deps if isinstance(d, str))
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1 and any(
        re.fullmatch(r"-e\s+\.(\[.*\])?", line) for line in pip_sections[0]
    ), "environment.yml must install the project itself with pip"
    assert "python" in conda and "pip" in conda
    # Node.js builds famviz's JupyterLab extension (labextension/, `make labextension`)
    assert "nodejs" in conda, "environment.yml must provide Node.js for labextension/"
    wanted = {}
    for req in pyproject["project"]["dependencies"]:
        name, spec = _split_requirement(req)
        wanted[CONDA_NAMES.get(name, name)] = spec
    got = {k: v for k, v in conda.items() if k not in ("python", "pip", "nodejs")}
    assert got == wanted
    assert conda["python"] == pyproject["project"]["requires-python"]


def test_readme_example_runs():
    """The README's Python example is executed, so it stays true."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    kappa = namespace["kappa"]
    rescaled = namespace["fv"].relative_flatness(namespace["same_function"],
                                                 (namespace["X"], namespace["y"]), layer="4")
    assert abs(float(rescaled) - float(kappa)) <= 1e-4 * float(kappa)


def test_readme_quick_start_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make lab" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_sources_compile_without_warnings():
    """Catches invalid escape sequences in docstrings full of LaTeX (use r-strings)."""
    import warnings

    for path in sorted((ROOT / "famviz").rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(), str(path), "exec")
