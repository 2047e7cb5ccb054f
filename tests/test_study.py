"""famviz.study: the spec, the serial runner, resuming, error rows, the scramble columns."""

import json
import math

import pandas as pd
import pytest
import torch

import famviz as fv
from famviz.study import Spec, run, runner

# a zoo that trains in well under a second per network
TINY = dict(base={"width": 8, "depth": 1, "train_size": 120, "batch_size": 40},
            measures=["relative_flatness", "hessian_trace", "fisher_rao_norm"],
            measure_samples=60, max_epochs=4)


def tiny(**kw):
    return Spec(**{"axes": {"lr": [0.05, 0.2]}, "seeds": [0, 1], **TINY, **kw})


def same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c not in ("seconds", "measure_seconds")]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    return directory, run(tiny(), directory, progress=False)


# ------------------------------------------------------------------------------------- spec


def test_configs_are_the_grid_times_the_seeds():
    s = Spec(axes={"width": [8, 16], "method": ["sgd", "fam", "sam"]}, seeds=[3, 4])
    configs = s.configs()
    assert len(configs) == 12
    assert {(c["width"], c["method"], c["seed"]) for c in configs} == {
        (w, m, sd) for w in (8, 16) for m in ("sgd", "fam", "sam") for sd in (3, 4)}
    assert len({s.key(c) for c in configs}) == 12
    assert configs[0]["lr"] == fv.study.DIGITS_DEFAULTS["lr"]


def test_key_depends_on_config_settings_and_version(monkeypatch):
    s = Spec(axes={"width": [8]})
    c = s.configs()[0]
    key = s.key(c)
    assert key == Spec(axes={"width": [8]}).key(c)
    assert key != Spec(axes={"width": [8]}, max_epochs=7).key(c)
    assert key != s.key({**c, "seed": 1})
    monkeypatch.setattr(fv, "__version__", "9.9.9")
    assert s.key(c) != key


@pytest.mark.parametrize("kwargs, match", [
    ({"axes": {}}, "non-empty"),
    ({"axes": {"widht": [8]}}, "unknown settings.*width"),
    ({"axes": {"width": []}}, "no values"),
    ({"axes": {"width": [8, 8]}}, "repeats"),
    ({"axes": {"optimizer": ["sgd", "rmsprop"]}}, "unknown optimizer 'rmsprop'; valid: sgd, adam"),
    ({"axes": {"method": ["fam", "gd"]}}, "unknown method 'gd'"),
    ({"axes": {"lr": [0.1, -1.0]}}, "lr must be > 0"),
    ({"axes": {"label_noise": [1.5]}}, "label_noise"),
    ({"axes": {"width": [8]}, "seeds": [0, 0]}, "distinct"),
    ({"axes": {"width": [8]}, "seeds": [1.5]}, "seeds"),
    ({"axes": {"width": [8]}, "measures": ["kappa"]}, "unknown measures.*relative_flatness"),
    ({"axes": {"width": [8]}, "preset": "slow"}, "unknown preset"),
    ({"axes": {"width": [8]}, "scramble": (0.0, 5.0)}, "scramble"),
    ({"axes": {"width": [8]}, "make_model": len}, "needs both"),
])
def test_bad_specs_are_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Spec(**kwargs)


def test_non_scalar_values_are_refused():
    with pytest.raises(TypeError, match="JSON scalars"):
        Spec(axes={"width": [[8, 8]]})
    with pytest.raises(TypeError, match="list of values"):
        Spec(axes={"width": 8})


# ----------------------------------------------------------------------------------- runner


def test_run_gives_one_row_per_config_with_every_column(tiny_run):
    directory, table = tiny_run
    assert len(table) == 4 and table["error"].isna().all()
    assert list(table.columns[:3]) == ["key", "lr", "seed"]
    for col in ["train_loss", "test_loss", "train_accuracy", "test_accuracy", "gap", "error_gap",
                "converged", "seconds", "epochs", "relative_flatness", "relative_flatness_std",
                "hessian_trace_scrambled", "relative_flatness_t2", "relative_flatness_std_t2"]:
        assert col in table, col
    assert (table["gap"] == table["test_loss"] - table["train_loss"]).all()
    assert (table["error_gap"] == table["train_accuracy"] - table["test_accuracy"]).all()
    assert len(list((directory / "runs").glob("*.json"))) == 4
    assert json.loads((directory / "spec.json").read_text())["axes"] == {"lr": [0.05, 0.2]}
    # a tiny zoo with 4 epochs does not reach cross-entropy 0.01
    assert not table["converged"].any() and (table["epochs"] == 4).all()


def test_scramble_separates_invariant_measures(tiny_run):
    _, t = tiny_run
    # κ of the output layer: T1 on both pairs (no T3 above the output layer) leaves it equal
    assert (t["scramble"] == "T1 x1").all()
    assert (t["scramble_output_change"] < 1e-9).all()
    rel = lambda a, b: ((t[a] - t[b]).abs() / t[a].abs()).max()  # noqa: E731
    assert rel("relative_flatness", "relative_flatness_scrambled") < 1e-10
    assert rel("relative_flatness_std", "relative_flatness_std_scrambled") < 1e-10
    assert rel("fisher_rao_norm", "fisher_rao_norm_scrambled") < 1e-10
    assert rel("hessian_trace", "hessian_trace_scrambled") > 0.5
    # T2 moves κ, and the std normalization undoes that
    assert rel("relative_flatness", "relative_flatness_t2") > 0.1
    assert rel("relative_flatness_std", "relative_flatness_std_t2") < 1e-10


def test_scramble_with_t3_on_a_hidden_feature_layer(tmp_path):
    spec = Spec(axes={"lr": [0.1]}, layer="0", **TINY)
    t = run(spec, tmp_path, progress=False)
    assert t.loc[0, "scramble"] == "T1 x1, T3"
    # no Linear layer below "0": no T2, no std canonical form
    assert math.isnan(t.loc[0, "relative_flatness_t2"])
    assert math.isnan(t.loc[0, "relative_flatness_std"])
    assert abs(t.loc[0, "relative_flatness_scrambled"] / t.loc[0, "relative_flatness"] - 1) < 1e-10


def test_runs_are_deterministic_and_leave_the_global_state_alone(tiny_run, tmp_path):
    _, table = tiny_run
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    again = run(tiny(), tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    same_table(table, again)


def test_a_second_run_reads_every_run_from_disk(tiny_run, monkeypatch):
    directory, table = tiny_run
    monkeypatch.setattr(runner, "run_one", lambda *a: pytest.fail("recomputed a finished run"))
    pd.testing.assert_frame_equal(run(tiny(), directory, progress=False), table)
    pd.testing.assert_frame_equal(fv.study.load(directory), table)


def test_an_interrupted_study_resumes_with_only_the_missing_runs(tiny_run, tmp_path, monkeypatch):
    _, table = tiny_run
    real, calls = runner.run_one, []

    def interrupted(spec, config):
        calls.append(config)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(spec, config)

    monkeypatch.setattr(runner, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(), tmp_path, progress=False)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    calls.clear()
    monkeypatch.setattr(runner, "run_one", lambda s, c: calls.append(c) or real(s, c))
    resumed = run(tiny(), tmp_path, progress=False)
    assert len(calls) == 2
    same_table(table, resumed)


def test_a_config_that_raises_becomes_an_error_row(tmp_path):
    # 5000 training samples do not exist: that run fails, the others complete
    spec = Spec(axes={"train_size": [100, 5000]}, seeds=[0],
                **{**TINY, "base": {"width": 8, "depth": 1, "batch_size": 50}})
    t = run(spec, tmp_path, progress=False)
    assert t["error"].isna().tolist() == [True, False]
    assert "train_size 5000 exceeds" in t.loc[1, "error"]
    assert math.isfinite(t.loc[0, "relative_flatness"]) and math.isnan(t.loc[1, "gap"])
    saved = json.loads((tmp_path / "runs" / f"{t.loc[1, 'key']}.json").read_text())
    assert "Traceback" in saved["traceback"]
    # kept on a second run; retried on request
    assert run(spec, tmp_path, progress=False)["error"].notna().sum() == 1
    assert run(spec, tmp_path, progress=False, retry_errors=True)["error"].notna().sum() == 1


def test_a_diverging_run_becomes_an_error_row(tmp_path):
    spec = Spec(axes={"lr": [0.05, 1e30]}, seeds=[0], **TINY)
    t = run(spec, tmp_path, progress=False)
    assert t["error"].isna().tolist() == [True, False]
    assert t.loc[1, "error"].startswith("FloatingPointError") and "lower lr" in t.loc[1, "error"]
    assert not t.loc[1, "converged"]


def make_model(config):
    return torch.nn.Sequential(torch.nn.Linear(2, config["hidden"]), torch.nn.ReLU(),
                               torch.nn.Linear(config["hidden"], 2))


def make_data(config):
    return fv.data.moons(n_samples=80, seed=config["seed"])


def test_a_zoo_of_your_own(tmp_path):
    spec = Spec(axes={"hidden": [4, 6]}, seeds=[0], make_model=make_model, make_data=make_data,
                measures=["relative_flatness"], max_epochs=3, base={"lr": 0.1})
    t = run(spec, tmp_path, progress=False)
    assert t["error"].isna().all() and list(t["hidden"]) == [4, 6]
    assert json.loads((tmp_path / "spec.json").read_text())["zoo"]["make_model"].endswith(
        "make_model")


def test_run_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="Spec"):
        run({"axes": {}}, tmp_path)
    with pytest.raises(TypeError, match="Executor"):
        run(tiny(), tmp_path, executor=object())
    from concurrent.futures import ThreadPoolExecutor

    local = Spec(axes={"hidden": [4]}, make_model=lambda c: None, make_data=make_data)
    with ThreadPoolExecutor(1) as pool, pytest.raises(TypeError, match="module-level"):
        run(local, tmp_path, executor=pool)
