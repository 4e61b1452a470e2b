"""LightningDataModules: CIFAR-10/100 (more in the sub-modules)."""

from hug_lightning.data.base import BadDataError, ClassificationDataModule, DataNotFoundError
from hug_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule

__all__ = [
    "BadDataError",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DataNotFoundError",
]
from hug_lightning.data.imagenet import ImageNetSubsetDataModule  # noqa: E402
from hug_lightning.data.long_tail import CIFAR10LTDataModule, CIFAR100LTDataModule  # noqa: E402

__all__ += ["CIFAR10LTDataModule", "CIFAR100LTDataModule", "ImageNetSubsetDataModule"]
