"""slice_2d(..., executor=...): the grid cut into pieces on workers gives the serial values
exactly."""

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest

import famviz as fv
from famviz import landscape as ls
from famviz.landscape import parallel

from helpers import tiny_mlp


@pytest.fixture(scope="module")
def setup():
    (X, y), (Xt, yt) = fv.data.digits(test_size=0.25, seed=0)
    data, test = (X[:120].double(), y[:120] % 5), (Xt[:50].double(), yt[:50] % 5)
    model = tiny_mlp([64, 12, 5], seed=0)
    d1, d2 = ls.random_direction(model, seed=1), ls.random_direction(model, seed=2)
    serial = ls.slice_2d(model, data, d1, d2, steps=(9, 7), test_data=test)
    return model, data, test, d1, d2, serial


def same(a, b):
    for f in ("values", "accuracy", "test_values", "test_accuracy"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert a.centre_loss == b.centre_loss


@pytest.mark.parametrize("pieces", [1, 3, 100])
def test_threads_any_number_of_pieces(setup, pieces, monkeypatch):
    model, data, test, d1, d2, serial = setup
    monkeypatch.setattr(parallel, "DEFAULT_PIECES", pieces)
    with ThreadPoolExecutor(2) as pool:
        same(serial, ls.slice_2d(model, data, d1, d2, steps=(9, 7), test_data=test,
                                 executor=pool))


def test_process_pool(setup):
    model, data, test, d1, d2, _ = setup
    # data in batches, as from a DataLoader: the workers get the batches read here
    batches = [(data[0][i:i + 50], data[1][i:i + 50]) for i in range(0, 120, 50)]
    serial = ls.slice_2d(model, batches, d1, d2, steps=(9, 7), test_data=test)
    with ProcessPoolExecutor(2) as pool:
        same(serial, ls.slice_2d(model, batches, d1, d2, steps=(9, 7), test_data=test,
                                 executor=pool))


def test_pieces_are_aligned_to_the_engine_chunks(setup):
    model, data, test, d1, d2, _ = setup
    engines = ls.slices._prepare(model, data, None, [d1, d2], "cross_entropy", None, None,
                                 "eval", ls.DEFAULT_MEMORY_BUDGET)
    submitted = []

    class Recorder(ThreadPoolExecutor):
        def submit(self, fn, job, coords, threads):
            submitted.append(len(coords))
            return super().submit(fn, job, coords, threads)

    coords = np.zeros((63, 2))
    with Recorder(1) as pool:
        parallel.evaluate(engines, {"model": model, "data": data, "test_data": None,
                                    "directions": [d1, d2], "loss": "cross_entropy",
                                    "dtype": None, "device": None, "bn": "eval",
                                    "memory_budget": ls.DEFAULT_MEMORY_BUDGET},
                          coords, pool, pieces=4)
    chunk = engines[0].chunk
    assert sum(submitted) == 63 and all(n % chunk == 0 for n in submitted[:-1])


def test_bad_executor(setup):
    model, data, _, d1, d2, _ = setup
    with pytest.raises(TypeError, match="Executor"):
        ls.slice_2d(model, data, d1, d2, steps=5, executor="dask")
