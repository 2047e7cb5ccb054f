"""famviz.models.resnet: structure, size, seeding, and κ of its layers against the oracle."""

import pytest
import torch
from torch import nn

import famviz as fv
from famviz.oracles import relative_flatness_bruteforce


def test_tiny_resnet_structure_and_output():
    net = fv.models.resnet((1, 2), (4, 8), num_classes=5, seed=0)
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 5)
    assert net(torch.zeros(2, 3, 9, 9)).shape == (2, 5)  # adaptive pooling: any size
    names = dict(net.named_modules())
    assert isinstance(names["layer1.0"], fv.models.BasicBlock)
    assert isinstance(names["layer1.0.shortcut"], nn.Sequential) and not names["layer1.0.shortcut"]
    assert names["layer2.0.conv1"].stride == (2, 2) and "layer2.0.shortcut.conv" in names
    assert names["layer2.1.conv1"].stride == (1, 1) and not names["layer2.1.shortcut"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 1 + 2 + 2 * 2 + 1
    assert names["fc"].in_features == 8 and names["conv1"].in_channels == 3


def test_resnet18_size():
    net = fv.models.resnet()
    assert sum(p.numel() for p in net.parameters()) == 11_173_962  # ResNet-18 for CIFAR-10
    assert [len(net.get_submodule(f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]


def test_resnet_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = fv.models.resnet((1, 1), (4, 8), seed=3)
    b = fv.models.resnet((1, 1), (4, 8), seed=3)
    c = fv.models.resnet((1, 1), (4, 8), seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(),
                               c.state_dict().values()):
        assert torch.equal(p, q), name
        if name.endswith("weight") and "bn" not in name:
            assert not torch.equal(p, r), name


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(blocks=(), widths=()), "one entry per stage"),
    (dict(blocks=(1, 1), widths=(4,)), "one entry per stage"),
    (dict(blocks=(1, 0), widths=(4, 8)), "blocks must hold positive integers"),
    (dict(blocks=(1,), widths=(4.0,)), "widths must hold positive integers"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(in_channels=True), "in_channels must be a positive integer"),
])
def test_resnet_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        fv.models.resnet(**kwargs)


def test_kappa_of_resnet_layers_against_the_oracle():
    net = fv.models.resnet((1, 1), (4, 4), num_classes=3, seed=1).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    X = torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    for layer in ("conv1", "layer1.0.conv2", "layer2.0.shortcut.conv", "fc"):
        kappa, _ = relative_flatness_bruteforce(net, (X, y), layer)
        # every layer of a ReLU ResNet is followed by piecewise-linear operations only
        r = fv.relative_flatness(net, (X, y), layer)
        assert r.method == "closed_form" and r.num_hvps == 0
        assert r.value == pytest.approx(kappa, rel=1e-5)
    # batch statistics are not linear in the layer's output: HVPs, and the same oracle value
    r = fv.relative_flatness(net, (X, y), "layer1.0.conv2", bn="train")
    assert r.method == "exact"
