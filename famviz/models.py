"""Small models for the tutorials and tests, built from seeded generators (the global RNG is
never touched)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .replica import preserve_global_rng

__all__ = ["mlp", "cnn", "resnet", "BasicBlock", "ACTIVATIONS"]

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
    with preserve_global_rng():  # nn.Linear's own init draws from the global RNG
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
    with preserve_global_rng():  # the layers' own init draws from the global RNG
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


class BasicBlock(nn.Module):
    """The residual block of He et al. (2016): ``relu(bn2(conv2(relu(bn1(conv1(x))))) +
    shortcut(x))``, two 3x3 convolutions without bias; the shortcut is the identity, or a 1x1
    convolution with BatchNorm when the stride or the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(c_out)),
            ]))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def resnet(
    blocks: Sequence[int] = (2, 2, 2, 2),
    widths: Sequence[int] = (64, 128, 256, 512),
    num_classes: int = 10,
    in_channels: int = 3,
    seed: int = 0,
) -> nn.Sequential:
    """A CIFAR-style ResNet (He et al. 2016) with BatchNorm, for 32x32 images (any size works:
    the head pools adaptively).

    ``conv1 (3x3, stride 1) -> bn1 -> relu -> layer1 ... layerK -> pool -> flatten -> fc``:
    stage ``layer{i+1}`` holds ``blocks[i]`` :class:`BasicBlock` of width ``widths[i]``, the
    first with stride 2 from the second stage on. The defaults are ResNet-18 for CIFAR-10
    (11.2 M parameters); tests and tutorials use tiny ones such as ``resnet((1, 1), (4, 8))``.
    Convolutions and the Linear head are initialized like PyTorch's default from ``seed``,
    BatchNorm with weight 1 and bias 0; the global RNG is never touched.

    Relative flatness applies to every Conv2d (e.g. ``"layer1.0.conv1"``) and to ``"fc"``.

    Args:
        blocks: BasicBlocks per stage, one positive count per stage.
        widths: channels per stage, as many as ``blocks``.
        num_classes: outputs of ``fc``.
        in_channels: input channels (3 for RGB).
        seed: initialization seed.

    >>> import torch
    >>> net = resnet((1, 1), (4, 8), num_classes=5, seed=0)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 5])
    >>> sum(p.numel() for p in resnet().parameters())
    11173962
    """
    blocks, widths = list(blocks), list(widths)
    if not blocks or len(blocks) != len(widths):
        raise ValueError(f"blocks and widths need one entry per stage (at least one), got "
                         f"blocks={blocks}, widths={widths}")
    for name, values in (("blocks", blocks), ("widths", widths)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must hold positive integers, got {values}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    with preserve_global_rng():  # the layers' own init draws from the global RNG
        body: list[tuple[str, nn.Module]] = [
            ("conv1", nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(widths[0])),
            ("relu", nn.ReLU()),
        ]
        c_in = widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(c_in if j == 0 else width, width, 2 if i > 0 and j == 0 else 1)
                     for j in range(count)]
            body.append((f"layer{i + 1}", nn.Sequential(*stage)))
            c_in = width
        body += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                 ("fc", nn.Linear(c_in, num_classes))]
    return _init_(nn.Sequential(OrderedDict(body)), seed)
