"""Backbones: modules mapping images to penultimate features, with a ``num_features`` width."""

from hug_lightning.backbones.resnet_cifar import CifarResNet
from hug_lightning.backbones.small import SmallConvNet
from hug_lightning.backbones.torchvision_models import TorchvisionBackbone

__all__ = ["CifarResNet", "SmallConvNet", "TorchvisionBackbone"]
