"""What ``train_bench.py``'s arms train: the backbone of a run and the data module over tensors.
"""

from __future__ import annotations

import argparse
from typing import Any

from torch import Tensor, nn

from hug_lightning.backbones import CifarResNet, SmallConvNet
from hug_lightning.data.cifar import CIFAR10DataModule


class TensorCIFAR(CIFAR10DataModule):
    """CIFAR-style DataModule over tensors already in memory (no files); any number of classes."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int = 10, **kwargs: Any) -> None:
        super().__init__(root="unused", download=False, val_split=0, **kwargs)
        self._tensors = (images, labels)
        self.num_classes = int(num_classes)

    def prepare_data(self) -> None:
        pass

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        images, labels = self._tensors
        return (images, labels) if train else (images[:2048], labels[:2048])


class NullBackbone(nn.Module):
    """A model that costs (almost) nothing: one tiny linear layer on 2x2 pixels. With it the
    step time of (a) and (b) is framework and data time only, so (b) - (a) per step is the host
    time Lightning and the module add (``--overhead``)."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x[:, :, :2, :2].flatten(1)).tanh()


def make_backbone(args: argparse.Namespace) -> nn.Module:
    """ResNet-18 (CIFAR stem); ``--small-width W``: SmallConvNet with ``4 W`` features."""
    if getattr(args, "overhead", False):
        return NullBackbone()
    if args.toy:
        return SmallConvNet(width=8)
    return SmallConvNet(width=args.small_width) if args.small_width else CifarResNet(depth=18)


__all__ = ["NullBackbone", "TensorCIFAR", "make_backbone"]
