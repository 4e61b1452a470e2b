"""Backbones: CIFAR ResNets against the literature's sizes, torchvision models by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hug_lightning.backbones import CifarResNet
from hug_lightning.backbones.torchvision_models import TorchvisionBackbone


@pytest.mark.parametrize("depth, width", [(18, 512), (34, 512), (50, 2048)])
def test_cifar_resnet_widths_and_stem(depth, width):
    net = CifarResNet(depth=depth).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, width) == (2, net.num_features)
        assert net.forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)  # stride 8


def test_cifar_resnet18_has_the_usual_size():
    """11,173,962 parameters with a 10-class linear head (kuangliu/pytorch-cifar ResNet18)."""
    net = CifarResNet(depth=18)
    head = nn.Linear(net.num_features, 10)
    assert sum(p.numel() for p in [*net.parameters(), *head.parameters()]) == 11_173_962


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("mobilenet_v3_small", 64),
                                        ("googlenet", 64)])
def test_torchvision_models_lose_their_classifier(name, size):
    """Features of width ``num_features``, a plain tensor in training mode too (GoogLeNet's
    auxiliary heads off), and every parameter reached by a loss on the features (DDP needs
    that)."""
    net = TorchvisionBackbone(name).train()
    out = net(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, net.num_features)
    assert net.num_features != 1000  # not the ImageNet logits
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet_nine"), "unknown model name"),
    (dict(name="squeezenet1_1"), "ends in a convolution"),
    (dict(name="resnet18", weights="bogus"), "no weights 'bogus'; choose DEFAULT, IMAGENET1K_V1"),
])
def test_torchvision_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TorchvisionBackbone(**kwargs)
