"""The command line round trip: run a spec file into a directory, resume it, report on it."""

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from famviz.study.__main__ import main

SPEC = {
    "axes": {"lr": [0.05, 0.2], "width": [8, 12]},
    "seeds": [0],
    "base": {"depth": 1, "train_size": 120, "batch_size": 40},
    "measures": ["relative_flatness", "hessian_trace"],
    "measure_samples": 60,
    "max_epochs": 3,
    "target_loss": 2.5,  # reached after an epoch or so: the runs count as converged
}


def test_cli_round_trip(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, "-m", "famviz.study", "run", str(spec), str(out),
                           "--quiet"], capture_output=True, text=True, check=True)
    assert "4 runs" in done.stdout and "0 failed" in done.stdout
    assert len(list((out / "runs").glob("*.json"))) == 4
    rep = subprocess.run([sys.executable, "-m", "famviz.study", "report", str(out)],
                         capture_output=True, text=True, check=True)
    assert "relative_flatness" in rep.stdout and "hessian_trace" in rep.stdout
    corr = pd.read_csv(out / "report" / "correlations.csv", index_col=0)
    assert list(corr.index) == ["relative_flatness", "hessian_trace", "relative_flatness_std"]
    assert (corr["n"] == 4).all()
    for name in ("tau.html", "psi.html", "scatter.html"):
        assert (out / "report" / name).stat().st_size > 1000
    # a second run resumes: nothing left to compute
    assert main(["run", str(spec), str(out), "--quiet"]) == 0


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"axes": {"widht": [8]}}))
    with pytest.raises(SystemExit, match="unknown settings"):
        main(["run", str(bad), str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no spec.json"):
        main(["report", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["run", str(bad), str(tmp_path / "x"), "--workers", "2", "--scheduler", "tcp://a:1"])
