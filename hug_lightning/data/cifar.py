"""CIFAR-10 and CIFAR-100 DataModules, from torchvision's format or from image folders.

Two on-disk layouts are accepted under ``root``:

1. torchvision's own: ``<root>/cifar-10-batches-py/`` or ``<root>/cifar-100-python/``
   (what ``torchvision.datasets.CIFAR10(root, download=True)`` writes);
2. image folders: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``, labels being the
   indices of the sorted class names (for CIFAR both orders equal the official label order).

Either way the images are decoded once into a uint8 tensor ``(N, 3, 32, 32)`` held in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchvision import datasets
from torchvision.transforms import v2

from hug_lightning.data.arrays import TensorImageDataset
from hug_lightning.data.augment import KeyedCropFlip
from hug_lightning.data.base import ClassificationDataModule, DataNotFoundError
from hug_lightning.data.cifar_folders import folder_classes, load_folder_split
from hug_lightning.data.device_loader import DeviceBatchLoader
from hug_lightning.data.download_lock import download_lock
from hug_lightning.data.loading import EpochShardSampler, global_seed
from hug_lightning.data.splits import check_label_range, check_val_split, split_indices


class _CIFARDataModule(ClassificationDataModule):
    """Shared implementation of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`.

    Args:
        root: Folder holding torchvision's ``cifar-10-batches-py/`` (``cifar-100-python/``)
            or ``train/<class>/`` + ``test/<class>/`` image folders. ``None``: ``data/cifar10``
            (``data/cifar100``).
        download: Download with torchvision into ``root`` when neither layout is there.
        val_split: Held-out part of the training set for validation: a count (int) or a
            fraction (float in (0, 1)), drawn with ``seed``; 0 validates on the test split
            (then all 50,000 training images are trained on, as in most papers).
        batch_size: Training batch size **per process** (global = batch_size x world size).
        eval_batch_size: Batch size for validation, test and predict (default: batch_size).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory.
        drop_last: Drop the last incomplete training batch.
        seed: Seed of the validation split.
        augment: Random crop (4-pixel zero padding) and horizontal flip on training images.
        on_corrupt: ``raise`` on an unreadable image file (the message names it) or ``skip`` it.
        device_resident: Keep the uint8 images on the accelerator and build each batch there
            (gather, crop, flip, normalize: no DataLoader workers). The same batches as the
            CPU path for the same seed; on a CPU-only machine it runs on the CPU. The
            transform hooks are not called on this path: a subclass that overrides
            ``train_transform`` or ``eval_transform`` is an error with it.
    """

    name = "CIFAR"
    tv_class: type[datasets.CIFAR10] = datasets.CIFAR10
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    num_classes = 0
    default_root = "data/cifar"

    def __init__(
        self,
        root: str | None = None,
        download: bool = True,
        val_split: int | float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        augment: bool = True,
        on_corrupt: Literal["raise", "skip"] = "raise",
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last, seed)
        self.device_resident = bool(device_resident)
        self._device_copies: list[tuple[Any, ...]] = []  # see _on_device
        if self.device_resident:
            # the device path builds its batches itself (gather, crop, flip, normalize with
            # `mean`/`std`) and never calls the transform hooks: a subclass's own transforms
            # would be ignored without a word
            overridden = [name for name in ("train_transform", "eval_transform")
                          if getattr(type(self), name) is not getattr(_CIFARDataModule, name)]
            if overridden:
                raise ValueError(
                    f"device_resident=true builds batches on the device with its own crop, "
                    f"flip and normalization and does not call "
                    f"{type(self).__name__}.{' or .'.join(overridden)}(), which this class "
                    "overrides; set device_resident false to use them.")
        self.root = Path(root if root is not None else self.default_root).expanduser()
        self.download = bool(download)
        self.val_split = check_val_split(val_split)
        self.augment = bool(augment)
        self.on_corrupt = on_corrupt

    # ------------------------------------------------------------------ layout and download
    @property
    def tv_dir(self) -> Path:
        return self.root / self.tv_class.base_folder

    def layout(self) -> Literal["torchvision", "folder"] | None:
        """Which accepted layout ``root`` holds, or ``None``."""
        if self.tv_dir.is_dir() and any(self.tv_dir.iterdir()):
            return "torchvision"
        if (self.root / "train").is_dir() and (self.root / "test").is_dir():
            return "folder"
        return None

    def missing_message(self, cause: BaseException | None = None) -> str:
        msg = (
            f"{self.name} data not found in {self.root.resolve()}. Accepted layouts:\n"
            f"  1. torchvision's format: {self.tv_dir}/ (what torchvision downloads);\n"
            f"  2. image folders: {self.root / 'train'}/<class>/*.png|jpg and "
            f"{self.root / 'test'}/<class>/*.png|jpg.\n"
            "Point --data.init_args.root at such a folder"
            + (", or set --data.init_args.download true to download it (needs network)."
               if not self.download else ".")
        )
        if cause is not None:
            msg += (f"\nThe download failed ({type(cause).__name__}: {cause}): without network, "
                    "copy the data into that folder in one of the layouts above.")
        return msg

    def prepare_data(self) -> None:
        """Download with torchvision when no accepted layout is present; check the class
        folders of the folder layout (before the run folder is created).

        Lightning runs this on the first process of every node (``prepare_data_per_node``), so
        node-local roots get their own download. Nodes sharing ``root`` download one at a time
        (:func:`~hug_lightning.data.download_lock.download_lock`): the first fetches, the
        others wait, then torchvision finds the files there, checksums them and fetches
        nothing."""
        layout = self.layout()
        if layout == "folder":
            folder_classes(self.root, self.num_classes, self.name)
        if layout is not None:
            return
        if self.root.name == self.tv_class.base_folder:  # one level too deep: no nested download
            raise DataNotFoundError(
                f"--data.init_args.root points into torchvision's folder {self.root.resolve()}; "
                f"point it at the folder that holds {self.tv_class.base_folder}/ "
                f"({self.root.resolve().parent}).")
        if not self.download:
            raise DataNotFoundError(self.missing_message())
        with download_lock(self.root):  # another node may be downloading into a shared root
            try:  # torchvision skips the fetch when the files are there and intact
                for train in (True, False):
                    self.tv_class(str(self.root), train=train, download=True)
            except Exception as err:  # network errors come in many types (URLError, OSError..)
                raise DataNotFoundError(self.missing_message(err)) from err

    # ------------------------------------------------------------------ loading
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Decode one split into ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` labels."""
        layout = self.layout()
        if layout is None:
            raise DataNotFoundError(self.missing_message())
        if layout == "torchvision":
            try:
                ds = self.tv_class(str(self.root), train=train, download=False)
            except RuntimeError as err:  # torchvision's integrity (checksum) check failed
                raise DataNotFoundError(
                    f"{self.tv_dir} is incomplete or corrupted ({err}). Delete it and run with "
                    "--data.init_args.download true, or copy a complete download there."
                ) from err
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(ds.targets, dtype=torch.long)
            source, self.class_names = str(self.tv_dir), list(ds.classes)
        else:
            split_dir = self.root / ("train" if train else "test")
            classes = folder_classes(self.root, self.num_classes, self.name)
            images, labels = load_folder_split(split_dir, classes, self.name, self.on_corrupt,
                                               self.missing_message)
            source, self.class_names = str(split_dir), list(classes)
        check_label_range(labels, self.num_classes, source)
        return images, labels

    def train_transform(self) -> Callable[..., Tensor]:
        """4-pixel zero-padded random crop and horizontal flip (keyed), then normalization."""
        if not self.augment:
            return self.eval_transform()
        return KeyedCropFlip(self.mean, self.std, pad=4, flip=True)

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        """Normalization only."""
        return v2.Compose(self._to_float())

    def _to_float(self) -> list:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    # ------------------------------------------------------------------ device-resident path
    def _device_loader(self, dataset: TensorImageDataset, train: bool) -> DeviceBatchLoader:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if device.type == "cpu" and not self._device_copies:  # once per set-up
            rank_zero_info("device_resident: the trainer runs on the CPU, so the images stay in "
                           "host memory and the main process builds each batch (the same "
                           "batches; num_workers and pin_memory are not used).")
        images, labels = self._on_device(dataset, device)
        # Lightning's `overfit_batches` turns a DataLoader's shuffling off; this loader is not
        # one it can rebuild: the same first batches every epoch, as on the CPU path
        shuffle = not (trainer is not None and trainer.overfit_batches > 0)
        sampler = (EpochShardSampler(dataset, world, rank, shuffle=shuffle, seed=global_seed())
                   if train else None)
        return DeviceBatchLoader(
            images, labels,
            self.batch_size if train else self.eval_batch_size, self.mean, self.std, device,
            sampler=sampler, augment=train and self.augment, drop_last=train and self.drop_last,
            next_batch_fn=self._next_train_batch if train else None, world_size=world, rank=rank,
        )

    def _on_device(self, dataset: TensorImageDataset, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
        """The set's images and labels on ``device``, copied once per set: the training loader
        and the NC eval pass's loader (made anew every epoch), both over the training images,
        share one copy."""
        def same(a: Tensor | None, b: Tensor | None) -> bool:
            return a is b or (a is not None and b is not None and torch.equal(a, b))

        for images, indices, dev, copies in self._device_copies:
            if images is dataset.images and dev == device and same(indices, dataset.indices):
                return copies
        idx = dataset.indices if dataset.indices is not None else slice(None)
        copies = (dataset.images[idx].to(device).contiguous(),
                  dataset.labels[idx].to(device).long())
        self._device_copies.append((dataset.images, dataset.indices, device, copies))
        return copies

    def teardown(self, stage: str) -> None:
        self._device_copies = []  # the loaders keep what they still use
        super().teardown(stage)

    def train_dataloader(self) -> Any:
        if self.device_resident:
            return self._device_loader(self._train_set(), train=True)
        return super().train_dataloader()

    def _eval_loader(self, dataset: Any) -> Any:
        if self.device_resident and isinstance(dataset, TensorImageDataset):
            return self._device_loader(dataset, train=False)
        return super()._eval_loader(dataset)

    def build_datasets(self, stage: str) -> None:
        test_images, test_labels = self.load_split(train=False)
        self.test_set = TensorImageDataset(test_images, test_labels, self.eval_transform())
        if not self.val_split:
            self.val_set = self.test_set
        if not self.needs_train_set(stage):
            return
        images, labels = self.load_split(train=True)
        full = TensorImageDataset(images, labels)
        train_idx, val_idx = split_indices(len(full), self.val_split, self.seed)
        self.train_set = full.subset(train_idx, self.train_transform())
        self.train_eval_set = full.subset(train_idx, self.eval_transform())
        self.val_set = (full.subset(val_idx, self.eval_transform()) if len(val_idx)
                        else self.test_set)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (10 classes, 50,000 training and 10,000 test images of 32x32 pixels).

    Arguments: see :class:`_CIFARDataModule`.
    """

    name = "CIFAR-10"
    tv_class = datasets.CIFAR10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    num_classes = 10
    default_root = "data/cifar10"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (100 fine classes, 50,000 training and 10,000 test images of 32x32 pixels).

    Arguments: see :class:`_CIFARDataModule`.
    """

    name = "CIFAR-100"
    tv_class = datasets.CIFAR100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    num_classes = 100
    default_root = "data/cifar100"
