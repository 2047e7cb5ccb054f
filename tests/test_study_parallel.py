"""famviz.study on executors: a process pool and a real Dask LocalCluster on loopback (two
single-threaded worker processes) give exactly the serial table; a killed worker's run is
retried."""

import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from famviz.study import Spec, run
from test_study import TINY, same_table

distributed = pytest.importorskip("distributed")

SPEC = Spec(axes={"lr": [0.05, 0.2], "label_noise": [0.0, 0.2]}, seeds=[0], **TINY)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    return run(SPEC, tmp_path_factory.mktemp("serial"), progress=False)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       silence_logs=40)
    c = distributed.Client(cluster)
    c.run(__import__, "famviz.study.runner")  # each worker imports torch once, here
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def test_process_pool_gives_the_serial_table(serial, tmp_path):
    with ProcessPoolExecutor(2) as pool:
        same_table(serial, run(SPEC, tmp_path, executor=pool, progress=False))


def test_dask_local_cluster_gives_the_serial_table(serial, client, tmp_path):
    table = run(SPEC, tmp_path, executor=client.get_executor(), progress=False)
    same_table(serial, table)
    # the runs did happen on the workers, one torch thread each
    assert sum(client.run(lambda: 1).values()) == 2


def test_a_killed_worker_is_replaced_and_its_run_retried(client, tmp_path):
    slow = Spec(axes={"lr": [0.05, 0.1]}, seeds=[0],
                **{**TINY, "max_epochs": 60, "target_loss": 1e-9})
    pids = client.run(os.getpid)
    out = {}
    runner = threading.Thread(target=lambda: out.setdefault(
        "table", run(slow, tmp_path, executor=client.get_executor(), progress=False)))
    runner.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if keys]
        victim = next((pids[w] for w in busy if w in pids), None)
        time.sleep(0.05)
    assert victim is not None, "no worker ever started a run"
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=120)
    assert not runner.is_alive()
    table = out["table"]
    assert table["error"].isna().all() and len(table) == 2
    assert victim not in client.run(os.getpid).values()  # the nanny started a new worker
    same_table(table, run(slow, tmp_path / "serial", progress=False))


def test_slice_2d_on_dask_equals_the_serial_engine(client):
    import numpy as np

    import famviz as fv
    from famviz import landscape as ls

    (X, y), _ = fv.data.digits(seed=0)
    data = (X[:100].double(), y[:100])
    model = fv.models.mlp([64, 10, 10], seed=0).double()
    d1, d2 = ls.random_direction(model, seed=1), ls.random_direction(model, seed=2)
    serial = ls.slice_2d(model, data, d1, d2, steps=(11, 9))
    spread = ls.slice_2d(model, data, d1, d2, steps=(11, 9), executor=client.get_executor())
    assert np.array_equal(serial.values, spread.values)
    assert np.array_equal(serial.accuracy, spread.accuracy)
