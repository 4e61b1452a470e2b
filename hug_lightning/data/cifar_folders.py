"""The image-folder layout of the CIFAR data modules: ``<root>/train/<class>/*`` and
``<root>/test/<class>/*``, labels being the indices of the sorted class names.

Checked before anything is decoded: exactly ``num_classes`` class folders, the same names in
both splits, and images in every class folder; each problem is an error that says what to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor

from hug_lightning.data.base import DataNotFoundError
from hug_lightning.data.folders import (IMAGE_EXTENSIONS, decode_to_tensor, find_classes,
                                       scan_class_folders, warn_unequal_classes)


def class_folders(split_dir: Path, num_classes: int, name: str) -> list[str]:
    """The sorted class folders of one split; exactly ``num_classes`` of them, or an error.

    Args:
        split_dir: ``<root>/train`` or ``<root>/test``.
        num_classes: How many classes the data set has.
        name: The data set's name, for messages (``CIFAR-10``).
    """
    classes = find_classes(split_dir)
    if len(classes) != num_classes:
        raise DataNotFoundError(
            f"{split_dir} holds {len(classes)} class folders ({', '.join(classes[:12])}"
            f"{', ...' if len(classes) > 12 else ''}); {name} needs exactly "
            f"{num_classes}, one per class (labels are the sorted folder names). "
            + ("Remove the extra folders" if len(classes) > num_classes else
               "A partial extraction or copy? Complete it")
            + ", or point --data.init_args.root elsewhere.")
    return classes


def folder_classes(root: Path, num_classes: int, name: str) -> list[str]:
    """The class names of the folder layout: the same ``num_classes`` folders in ``train/``
    and ``test/`` (labels are the sorted names, so a renamed folder would shift them).

    Args:
        root: The folder holding ``train/`` and ``test/``.
        num_classes: How many classes the data set has.
        name: The data set's name, for messages.
    """
    train, test = (class_folders(root / split, num_classes, name) for split in ("train", "test"))
    if train != test:
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise DataNotFoundError(
            f"The class folders of {root / 'train'} and {root / 'test'} differ "
            f"(only in train: {', '.join(only_train)}; only in test: "
            f"{', '.join(only_test)}). Labels are the sorted folder names, so both splits "
            "need the same names: rename the folders so that they match."
        )
    return train


def load_folder_split(split_dir: Path, classes: list[str], name: str,
                      on_corrupt: Literal["raise", "skip"],
                      missing_message: Callable[[], str]) -> tuple[Tensor, Tensor]:
    """Decode one split's class folders into ``(N, 3, 32, 32)`` uint8 images and ``(N,)``
    labels, in one fixed shuffled order.

    Args:
        split_dir: ``<root>/train`` or ``<root>/test``.
        classes: The class names (:func:`folder_classes`).
        name: The data set's name, for messages (``CIFAR-10-LT``: compared as ``CIFAR-10``).
        on_corrupt: ``raise`` on an unreadable image file or ``skip`` it.
        missing_message: The data module's message for data not found (the accepted layouts).
    """
    _, samples = scan_class_folders(split_dir, classes)
    if not samples:
        raise DataNotFoundError(f"No image files under {split_dir}/<class>/. "
                                + missing_message())
    present = {label for _, label in samples}
    empty = [name for c, name in enumerate(classes) if c not in present]
    if empty:
        raise DataNotFoundError(
            f"{len(empty)} class folder(s) of {split_dir} hold no image files "
            f"({', '.join(empty)}); every class needs images "
            f"({', '.join(IMAGE_EXTENSIONS)}). Copy them there, or point "
            "--data.init_args.root at a complete copy.")
    warn_unequal_classes(samples, classes, split_dir, name.split("-LT")[0])
    images, labels = decode_to_tensor(samples, 32, on_corrupt=on_corrupt)
    # class folders come class by class: one fixed shuffle (seed 0, the same for every
    # run and rank) mixes them as torchvision's files are, so `limit_test_batches` and
    # the first batches of any evaluation see every class
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


__all__ = ["class_folders", "folder_classes", "load_folder_split"]
