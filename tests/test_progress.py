"""progress=True shows a tqdm bar on the measures that evaluate the loss many times, prints
nothing when off, and changes no number."""

from __future__ import annotations

import pytest
import torch

import famviz as fv

(_X, _Y), _ = fv.data.digits(test_size=0.25, seed=0)
DATA = (_X[:40].double(), _Y[:40])


def model():
    return fv.models.mlp([64, 6, 10], seed=0).double()


CALLS = {
    "eps_sharpness": lambda p: fv.eps_sharpness(model(), DATA, steps=3, progress=p),
    "adaptive_sharpness": lambda p: fv.adaptive_sharpness(model(), DATA, steps=3, progress=p),
    "average_flatness": lambda p: fv.average_flatness(model(), DATA, samples=3, seed=0,
                                                      progress=p),
    "worst_case_flatness": lambda p: fv.worst_case_flatness(model(), DATA, steps=3,
                                                            progress=p),
    "pac_bayes_flatness": lambda p: fv.pac_bayes_flatness(model(), DATA, samples=2, steps=3,
                                                          seed=0, progress=p),
    "basin_volume": lambda p: fv.basin_volume(model(), DATA, samples=2, steps=3, seed=0,
                                              progress=p),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_bar_counts_the_evaluations_and_changes_nothing(name, capsys):
    quiet = CALLS[name](False)
    assert capsys.readouterr().err == ""
    shown = CALLS[name](True)
    err = capsys.readouterr().err
    assert name in err and "evaluation" in err
    assert float(shown) == float(quiet) or (float(shown) != float(shown)
                                            and float(quiet) != float(quiet))
    with pytest.raises(TypeError, match="progress must be True or False"):
        CALLS[name]("yes")
    assert torch.is_grad_enabled()
