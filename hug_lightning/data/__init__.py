"""LightningDataModules: CIFAR-10/100 (more in the sub-modules)."""

from hug_lightning.data.base import ClassificationDataModule, DataNotFoundError
from hug_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DataNotFoundError",
]
