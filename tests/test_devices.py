"""Every device torch has here (the CPU, and CUDA where a GPU is present) gives the CPU's
numbers: no code path assumes the CPU."""

from __future__ import annotations

import pytest
import torch

import famviz as fv
from famviz import fam
from famviz import landscape as L

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
X, Y = _X[:64].double(), _Y[:64]

CALLS = {
    "relative_flatness": lambda m, d: fv.relative_flatness(m, d, "2").value,
    "relative_flatness_exact": lambda m, d: fv.relative_flatness(m, d, "0", method="exact").value,
    "hessian_trace": lambda m, d: fv.hessian_trace(m, d).value,
    "hutchinson": lambda m, d: fv.hessian_trace(m, d, method="hutchinson", probes=3,
                                                seed=0).value,
    "lanczos": lambda m, d: fv.hessian_top_eigenvalue(m, d, k=2, seed=0).eigenvalues,
    "power": lambda m, d: fv.hessian_top_eigenvalue(m, d, method="power", seed=0,
                                                    tol=1e-10).eigenvalues,
    "frobenius": lambda m, d: fv.hessian_frobenius(m, d).value,
    "eps_sharpness": lambda m, d: fv.eps_sharpness(m, d, seed=0, steps=3).value,
    "fisher_rao": lambda m, d: fv.fisher_rao_norm(m, d).value,
    "slice_2d": lambda m, d: L.slice_2d(m, d, L.random_direction(m, seed=0),
                                        L.random_direction(m, seed=1), steps=3).values,
    "trajectory": lambda m, d: L.trajectory_directions(
        [{k: v * (1 + 0.1 * i + 0.01 * i * i) for k, v in m.state_dict().items()}
         for i in range(4)], k=2, model=m).coords,
    "penalty": lambda m, d: float(fam.penalty(m, d, "2")),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CALLS))
def test_device_gives_the_cpu_numbers(name, device):
    ref = CALLS[name](fv.models.mlp([64, 8, 10], seed=0).double(), (X, Y))
    model = fv.models.mlp([64, 8, 10], seed=0).double().to(device)
    got = CALLS[name](model, (X.to(device), Y.to(device)))
    assert torch.allclose(torch.as_tensor(got, dtype=torch.float64).cpu(),
                          torch.as_tensor(ref, dtype=torch.float64), rtol=1e-7, atol=1e-12)
