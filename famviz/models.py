"""Small models for the tutorials and tests, built from seeded generators (the global RNG is
never touched)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["mlp", "cnn", "ACTIVATIONS"]

#: activation name -> module factory
ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _init_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialize every Linear/Conv2d like PyTorch's default (Kaiming-uniform), from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / fan_in**0.5
                module.weight.uniform_(-bound, bound, generator=gen)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=gen)
    return model


def mlp(
    widths: Sequence[int],
    activation: str = "relu",
    bias: bool = True,
    seed: int = 0,
) -> nn.Sequential:
    """A fully connected network ``Linear, act, Linear, act, ..., Linear`` as ``nn.Sequential``.

    Module names are the Sequential indices: for ``widths=[64, 128, 64, 10]`` the Linear layers
    are ``"0"``, ``"2"`` and ``"4"``; ``"4"`` is the last (feature) layer.

    Args:
        widths: layer widths from input to output, at least two.
        activation: one of :data:`ACTIVATIONS`.
        bias: whether Linear layers have biases.
        seed: initialization seed.

    >>> m = mlp([64, 128, 64, 10], seed=0)
    >>> [name for name, mod in m.named_children() if isinstance(mod, nn.Linear)]
    ['0', '2', '4']
    """
    widths = list(widths)
    if len(widths) < 2 or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths needs at least two positive sizes, got {widths}")
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if i < len(widths) - 2:
                layers.append(_activation(activation))
    return _init_(nn.Sequential(*layers), seed)


def cnn(channels: Sequence[int] = (8, 16), hidden: int = 64, num_classes: int = 10, seed: int = 0):
    """A small CNN for 8x8 digits given as flat 64-vectors; it ends in two Linear layers.

    ``Unflatten -> [Conv3x3, ReLU] x len(channels) with one 2x2 max-pool after the first ->
    Flatten -> Linear(hidden) -> ReLU -> Linear(num_classes)``. The Linear layers are named
    ``"fc1"`` and ``"fc2"`` (the feature layer).

    >>> import torch
    >>> cnn(seed=0)(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    """
    channels = list(channels)
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"channels needs at least one positive size, got {channels}")
    body: list[tuple[str, nn.Module]] = [("unflatten", nn.Unflatten(1, (1, 8, 8)))]
    c_in, size = 1, 8
    with torch.random.fork_rng(devices=[]):  # the layers' own init draws from the global RNG
        for i, c_out in enumerate(channels):
            body += [(f"conv{i + 1}", nn.Conv2d(c_in, c_out, 3, padding=1)),
                     (f"act{i + 1}", nn.ReLU())]
            if i == 0:
                body.append(("pool", nn.MaxPool2d(2)))
                size //= 2
            c_in = c_out
        body += [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c_in * size * size, hidden)),
            ("act_fc", nn.ReLU()),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]
    return _init_(nn.Sequential(OrderedDict(body)), seed)
