"""Running a study: train and measure every config of a :class:`~famviz.study.Spec`, one JSON
file per finished run, on any ``concurrent.futures.Executor``.

The driver (the process calling :func:`run`) is the only one that writes files: workers return
rows, so a cluster's workers need no shared disk. A run is skipped when its file exists, which
makes a study resumable after Ctrl-C, a crash or a lost worker.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import time
import traceback
from concurrent.futures import Executor, as_completed
from pathlib import Path

import pandas as pd
import torch

from .. import fam
from ..reparam import consecutive_pairs, max_output_change
from ..measures.table import measure_all
from ..measures.relative import relative_flatness
from .scramble import scramble, scramble_inputs
from .spec import Spec
from .trainer import digits_data, digits_model, full_loss, sub_seed, train_to_target

__all__ = ["run", "run_one", "load", "METRICS", "KAPPA_STD"]

#: per-run metric columns besides the config, the measures and the bookkeeping
METRICS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "gap", "error_gap",
           "epochs", "steps")
#: κ in the std canonical form (``normalize_features=True``, dead features' columns zeroed),
#: next to measure_all's κ
KAPPA_STD = "relative_flatness_std"
#: suffixes: the measure after the T1+T3 scramble, and after the T2 scramble of the inputs
SCRAMBLED, T2 = "_scrambled", "_t2"

_RUNS = "runs"


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _accuracy(model, X, y) -> float:
    return float((model(X).argmax(dim=1) == y).double().mean()) if len(X) else math.nan


def kappa_std(model, data, layer: str) -> float:
    """κ in the std canonical form, after setting to 0 the columns of ``layer`` that read a
    feature which is 0 on every sample of ``data`` (a dead ReLU). Those columns do not change
    the function on ``data``, but the canonical form cannot rescale them (their std is 0), so
    they would carry any rescaling of the layers below into κ. NaN when no Linear layer feeds
    ``layer`` (the inputs are data: no canonical form)."""
    if not any(b == layer for _, b in consecutive_pairs(model)):
        return math.nan
    model = copy.deepcopy(model)
    module = dict(model.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model(data[0])
    finally:
        handle.remove()
    dead = seen[0].reshape(-1, module.in_features).abs().amax(dim=0) == 0
    with torch.no_grad():
        module.weight[:, dead] = 0.0
    return float(relative_flatness(model, data, layer, normalize_features=True,
                                   dtype=torch.float64))


def _measures(model, data, layer, spec: Spec, seed: int) -> dict[str, float]:
    table = measure_all(model, data, layer=layer, measures=spec.measures, seed=seed,
                        preset=spec.preset, dtype=torch.float64)
    out = table.values()
    out[KAPPA_STD] = kappa_std(model, data, layer)
    return out


def _compute(spec: Spec, config: dict) -> dict:
    if spec.custom:
        model = spec.make_model(dict(config))
        (X, y), (Xt, yt) = spec.make_data(dict(config))
    else:
        model = digits_model(config)
        (X, y), (Xt, yt) = digits_data(config)
    X, y, Xt, yt = (torch.as_tensor(a) for a in (X, y, Xt, yt))
    layer = spec.layer or fam.last_linear(model)
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("make_model returned a model without parameters: nothing to train")
    model, trained = train_to_target(model, (X.to(p.dtype), y), config, layer=layer,
                                     target_loss=spec.target_loss, max_epochs=spec.max_epochs)
    # everything measured in float64, on a copy
    m64 = copy.deepcopy(model).double().eval()
    X64, Xt64 = X.double(), Xt.double()
    row = {
        "train_loss": full_loss(m64, X64, y),
        "test_loss": full_loss(m64, Xt64, yt) if len(Xt) else math.nan,
        "train_accuracy": _accuracy(m64, X64, y),
        "test_accuracy": _accuracy(m64, Xt64, yt),
        "epochs": trained.epochs,
        "steps": trained.steps,
        "converged": trained.converged,
    }
    row["gap"] = row["test_loss"] - row["train_loss"]
    row["error_gap"] = row["train_accuracy"] - row["test_accuracy"]
    k = spec.measure_samples
    data = (X64[:k], y[:k]) if k is not None else (X64, y)
    mseed = sub_seed(config["seed"], "measures")
    t0 = time.perf_counter()
    plain = _measures(m64, data, layer, spec, mseed)
    row.update(plain)
    scrambled, applied = scramble(m64, layer, spec.scramble, sub_seed(config["seed"], "scramble"))
    row["scramble"] = applied
    row["scramble_output_change"] = max_output_change(m64, scrambled, X64)
    row.update({f"{n}{SCRAMBLED}": v for n, v in
                _measures(scrambled, data, layer, spec, mseed).items()})
    t2 = scramble_inputs(m64, layer, spec.scramble, sub_seed(config["seed"], "t2"))
    for name in ("relative_flatness", KAPPA_STD):
        if t2 is None or name not in plain:
            row[f"{name}{T2}"] = math.nan
    if t2 is not None:
        if "relative_flatness" in plain:
            row[f"relative_flatness{T2}"] = float(relative_flatness(t2, data, layer,
                                                                   dtype=torch.float64))
        row[f"{KAPPA_STD}{T2}"] = kappa_std(t2, data, layer)
    row["measure_seconds"] = time.perf_counter() - t0
    return row


def run_one(spec: Spec, config: dict) -> dict:
    """Train and measure one config; never raises for a failing run (its ``error`` column holds
    the traceback's last line and the row is kept). The global RNG and the thread count of the
    calling process are restored afterwards."""
    start = time.perf_counter()
    row = {"key": spec.key(config), "config": dict(config)}
    with torch.random.fork_rng(devices=[]), _threads(spec.threads):
        try:
            row.update(_compute(spec, config))
            row["error"] = None
        except Exception as exc:  # a failing config is recorded, never stops the study
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
    row["seconds"] = time.perf_counter() - start
    return row


# ------------------------------------------------------------------------------------ files


def _write(directory: Path, row: dict) -> None:
    path = directory / _RUNS / f"{row['key']}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(row))  # key order kept: the table's column order
    os.replace(tmp, path)  # atomic: a crash never leaves half a run behind


def _read(directory: Path, key: str) -> dict | None:
    path = directory / _RUNS / f"{key}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # unreadable: run it again


def _frame(spec: Spec, rows: list[dict]) -> pd.DataFrame:
    records = []
    for row in rows:
        config = row["config"]
        rec = {"key": row["key"], **{a: config[a] for a in spec.axes}, "seed": config["seed"]}
        rec.update({k: v for k, v in row.items()
                    if k not in ("key", "config", "traceback")})
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    first = ["key", *spec.axes, "seed", "converged", "error", "seconds"]
    if "converged" not in df:
        df["converged"] = False
    df["converged"] = df["converged"].fillna(False).astype(bool)
    df = df[[c for c in first if c in df] + [c for c in df if c not in first]]
    df.attrs["axes"] = list(spec.axes)
    return df


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="study", disable=not enabled)


def run(spec: Spec, directory, executor: Executor | None = None, *, progress: bool = True,
        retry_errors: bool = False) -> pd.DataFrame:
    """Train and measure every config of ``spec``; one row per run.

    For each network: :func:`famviz.measure_all` (``spec.measures``, ``spec.preset``) and κ in
    the std canonical form (``relative_flatness_std``) in float64 on ``spec.measure_samples``
    training samples; the same on a random function-preserving reparameterization of the
    network (columns ``<measure>_scrambled``: T1 with factors from U[5, 25] on every
    consecutive layer pair as Petzka et al. 2021, and T3 on the feature layer's rows; see
    :mod:`famviz.study.scramble`), and κ with and without std normalization after T2
    (``relative_flatness_t2``, ``relative_flatness_std_t2``); train/test loss and accuracy, the
    loss gap ``gap = test_loss - train_loss`` and the error gap ``error_gap =
    train_accuracy - test_accuracy``; ``epochs``, ``steps``, ``converged``, ``seconds``,
    ``error``.

    Args:
        spec: the study.
        directory: where each finished run is written at once (``runs/<key>.json``) and
            ``spec.json`` describes the study. Runs found there are not computed again.
        executor: None (in this process, with a progress bar) or any
            ``concurrent.futures.Executor``: a ``ProcessPoolExecutor``, or Dask's
            ``distributed.Client(...).get_executor()`` for a cluster. Results do not depend on
            it. Callables in ``spec`` must be picklable for other processes.
        progress: show a progress bar (``tqdm.auto``).
        retry_errors: run again the configs whose recorded run failed.

    Returns:
        A ``pandas.DataFrame`` in config order. Runs the executor lost (a worker that died more
        often than the executor retries, a broken pool) appear with their ``error`` but are not
        written, so running again retries them.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a famviz.study.Spec, got {type(spec).__name__}")
    if executor is not None and not isinstance(executor, Executor):
        raise TypeError("executor must be a concurrent.futures.Executor (e.g. "
                        "ProcessPoolExecutor(2) or distributed.Client().get_executor()), got "
                        f"{type(executor).__name__}")
    if executor is not None:
        try:  # other processes get the spec by pickle: fail now, not once per run
            pickle.dumps(spec)
        except Exception as exc:
            raise TypeError(
                f"the spec cannot be sent to other processes ({type(exc).__name__}: {exc}); "
                "make_model and make_data must be module-level functions (no lambdas or "
                "closures) when an executor is used") from None
    directory = Path(directory)
    (directory / _RUNS).mkdir(parents=True, exist_ok=True)
    (directory / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1, sort_keys=True))
    configs = spec.configs()
    keys = [spec.key(c) for c in configs]
    done: dict[str, dict] = {}
    for key in dict.fromkeys(keys):
        row = _read(directory, key)
        if row is not None and (row.get("error") is None or not retry_errors):
            done[key] = row
    todo = [(k, c) for k, c in zip(keys, configs) if k not in done]
    bar = _progress(len(todo), progress)
    try:
        if executor is None:
            for key, config in todo:
                row = run_one(spec, config)
                _write(directory, row)
                done[key] = row
                bar.update()
        else:
            futures = {executor.submit(run_one, spec, c): (k, c) for k, c in todo}
            try:
                for future in as_completed(futures):
                    key, config = futures[future]
                    try:
                        row = future.result()
                        _write(directory, row)
                    except Exception as exc:  # lost by the executor: kept out of the files
                        row = {"key": key, "config": config, "seconds": math.nan,
                               "error": f"{type(exc).__name__}: {exc} (not saved; run again)"}
                    done[key] = row
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()
    return _frame(spec, [done[k] for k in keys])


def load(directory, spec: Spec | None = None) -> pd.DataFrame:
    """The table of the finished runs in ``directory``: those of ``spec`` in config order, or
    (without a spec) every run file, with the axes of ``spec.json``."""
    directory = Path(directory)
    if spec is not None:
        rows = [r for r in (_read(directory, spec.key(c)) for c in spec.configs())
                if r is not None]
        if not rows:
            raise ValueError(f"{directory} holds no finished run of this spec")
        return _frame(spec, rows)
    meta = directory / "spec.json"
    if not meta.exists():
        raise ValueError(f"{directory} has no spec.json: not a study directory "
                         "(famviz.study.run writes one)")
    described = json.loads(meta.read_text())
    rows = [json.loads(p.read_text()) for p in sorted((directory / _RUNS).glob("*.json"))]
    if not rows:
        raise ValueError(f"{directory} holds no finished runs")

    class _Axes:  # the part of a Spec that _frame reads
        axes = described["axes"]

    axes, seeds = described["axes"], described["seeds"]

    def position(row):  # config order, as Spec.configs() lists them; foreign runs last
        c = row["config"]
        at = [values.index(c.get(a)) if c.get(a) in values else len(values)
              for a, values in axes.items()]
        return [*at, seeds.index(c["seed"]) if c["seed"] in seeds else len(seeds)]

    rows.sort(key=position)
    return _frame(_Axes, rows)
