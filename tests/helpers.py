"""Helpers shared by the tests."""

import torch

import famviz as fv


def tiny_mlp(widths, seed=0, activation="relu", bias=True):
    return fv.models.mlp(widths, activation=activation, bias=bias, seed=seed).double()


def model_state(model):
    """Everything about a model that famviz must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
    }


def assert_same_state(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


def assert_call_leaves_caller_alone(call, model, data):
    """``call(model, data)`` must leave the model, the data and the global RNG as they were."""
    X, y = data
    copy = (X.clone(), y.clone())
    before = model_state(model)
    rng = torch.get_rng_state()
    call(model, copy)
    assert_same_state(before, model_state(model))
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used"
    assert torch.equal(copy[0], X) and torch.equal(copy[1], y)
