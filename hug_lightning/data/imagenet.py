"""ImageNet subsets from a local copy in class folders: ImageNet-100, Imagenette, Imagewoof, all.

Layout (ImageNet is never downloaded): ``<root>/train/<wnid>/*.JPEG``, the official training
images, and ``<root>/val/<wnid>/*.JPEG``, the official validation images moved into class folders.
A subset is a list of WNIDs: ``imagenet100`` (CMC), ``imagenette``, ``imagewoof`` (fastai),
shipped in ``hug_lightning/data/class_lists/``; ``full`` (every class folder of ``train/``); or
a text file with one WNID per line (``#`` comments). Labels are the indices of the **sorted**
WNIDs of the subset. Images are decoded per sample, in the DataLoader workers
(:class:`~hug_lightning.data.image_files.ImageFileDataset`, importable from here too).
"""

from __future__ import annotations

import os
import re
import zlib
from importlib import resources
from itertools import groupby
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchvision.transforms import v2

from hug_lightning.cli_errors import ConfigError
from hug_lightning.data.base import ClassificationDataModule, DataNotFoundError
from hug_lightning.data.folders import IMAGE_EXTENSIONS, find_classes, scan_class_folders
from hug_lightning.data.image_files import ImageFileDataset
from hug_lightning.data.splits import check_val_split, seeded_choice, stratified_split

BUILTIN_SUBSETS = ("imagenet100", "imagenette", "imagewoof")
_WNID = re.compile(r"n\d{8}")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_TO_FLOAT = (v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))


def _listing(names: Sequence[str], limit: int = 20) -> str:  # names shown in one error message
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_class_list(path: str | Path) -> list[str]:
    """Class names (WNIDs) of a class-list file: one per line, ``#`` starts a comment, no
    duplicates. Words after the name are a description and ignored, as in ImageNet's
    ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``); a second WNID on a line
    is an error (it would otherwise be dropped)."""
    # utf-8-sig: a byte-order mark (Windows editors write one) would be part of the first name
    text = (Path(path) if isinstance(path, str) else path).read_text(encoding="utf-8-sig")
    names = []
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        extra = [tok.rstrip(",;") for tok in tokens[1:] if _WNID.fullmatch(tok.rstrip(",;"))]
        if extra:
            raise ValueError(f"Class list {path}, line {number}: one class per line, found "
                             f"{tokens[0]} and {', '.join(extra)}. Put each WNID on its own line.")
        names.append(tokens[0])
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups or not names:
        raise ValueError(f"Class list {path} " + (f"names some classes twice: {_listing(dups)}."
                                                  if dups else "holds no class names."))
    return names


def resolve_classes(subset: str, root: Path) -> list[str]:
    """Sorted class folder names (WNIDs) of ``subset`` (see the module docstring)."""
    if subset in BUILTIN_SUBSETS:
        return sorted(read_class_list(resources.files("hug_lightning.data") / "class_lists"
                                      / f"{subset}.txt"))
    if subset == "full":
        train = root / "train"
        classes = find_classes(train) if train.is_dir() else []
        if not classes:
            raise DataNotFoundError(
                f"subset 'full' takes every class folder of {train.resolve()}, but "
                f"{'it holds none' if train.is_dir() else 'that folder does not exist'}. "
                + layout_help(root))
        return classes
    path = Path(subset).expanduser()
    if not path.is_file():
        raise ValueError(f"subset {subset!r} is neither one of {', '.join(BUILTIN_SUBSETS)}, "
                         "full, nor an existing class-list file (one WNID per line).")
    return sorted(read_class_list(path))


def layout_help(root: Path) -> str:  # what the data folder must look like, what to do
    return (f"Expected layout: {root.resolve() / 'train'}/<wnid>/*.JPEG and "
            f"{root.resolve() / 'val'}/<wnid>/*.JPEG (validation images in class folders, see "
            "the README). ImageNet is never downloaded; point --data.init_args.root at your copy.")


class ImageNetSubsetDataModule(ClassificationDataModule):
    """A class subset of a local ImageNet, optionally with fewer training images per class.

    Training images per class are drawn by :func:`seeded_choice` over the sorted file names,
    seeded by ``seed`` and the class's WNID (the same images of a class on every rank and run,
    and in every subset that holds the class); validation and test images are never
    sub-sampled.

    Args:
        root: Folder holding ``train/<wnid>/`` and ``val/<wnid>/``.
        subset: ``imagenet100`` (CMC), ``imagenette``, ``imagewoof``, ``full`` (all class
            folders of ``train/``) or the path of a class-list file (one WNID per line; words
            after it, as in ``LOC_synset_mapping.txt``, are ignored).
        images_per_class: Keep at most this many training images per class (``None``: all).
        fraction: Keep this fraction (in ``(0, 1]``) of each class's training images, rounded
            half to even as Python's ``round`` (0.5 of 5 keeps 2), at least 1; exclusive with
            ``images_per_class``.
        val_split: Validation images held out of the (sub-sampled) training set: about this
            many (int) or this fraction (float), drawn per class with ``seed`` (each class
            gives ``round(fraction * n_c)`` and keeps at least one training image). 0: validate
            on the official ``val/`` (no ``train/`` needed then), which ``test`` always uses.
        image_size: Side of the (random-resized or center) crops fed to the model.
        resize_size: Shorter side after the evaluation resize, before the center crop.
        augment: Random-resized crop and horizontal flip for training (else the eval transform).
        on_corrupt: ``raise`` on an unreadable file (the message names it), or ``skip``: warn
            and return the next readable image of its class (lengths and DDP shards unchanged).
            In validation, test and predict sets that image is scored in the file's place
            (``predictions.csv``'s row of the file holds its prediction): evaluate with
            ``raise``, or replace the files, where that matters.
        batch_size: Training batch size **per process** (global = batch_size x world size).
        eval_batch_size: Batch size for validation, test and predict (default: batch_size).
        num_workers: DataLoader worker processes (JPEG decoding runs there).
        pin_memory: Pin host memory.
        drop_last: Drop the last incomplete training batch.
        seed: Seed of the per-class image selection and of the validation split.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD  # used by the robustness evaluation

    def __init__(
        self,
        root: str = "data/imagenet",
        subset: str = "imagenet100",
        images_per_class: int | None = None,
        fraction: float | None = None,
        val_split: int | float = 0,
        image_size: int = 224,
        resize_size: int = 256,
        augment: bool = True,
        on_corrupt: Literal["raise", "skip"] = "raise",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last, seed)
        if images_per_class is not None and fraction is not None:
            raise ValueError("Give images_per_class or fraction, not both; got "
                             f"{images_per_class} and {fraction}.")
        if images_per_class is not None and images_per_class < 1:
            raise ValueError(
                f"images_per_class must be >= 1 (or null: all), got {images_per_class}.")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1] (or null: all), got {fraction}.")
        if min(image_size, resize_size) < 1 or on_corrupt not in ("raise", "skip"):
            raise ValueError(f"Need positive image_size, resize_size and on_corrupt raise|skip, "
                             f"got {image_size}, {resize_size}, {on_corrupt!r}.")
        self.root, self.subset = Path(root).expanduser(), subset
        self.val_split = check_val_split(val_split)
        self.images_per_class, self.fraction = images_per_class, fraction
        self.image_size, self.resize_size = int(image_size), int(resize_size)
        self.augment, self.on_corrupt = bool(augment), on_corrupt
        self.classes: list[str] = resolve_classes(subset, self.root)
        self.num_classes, self.class_names = len(self.classes), list(self.classes)

    def _layout_hints(self, splits: Sequence[str]) -> list[str]:
        """Likely causes of a layout error: a root one level too deep, unextracted class tars."""
        hints = []
        if sum(1 for e in os.scandir(self.root) if e.is_dir() and _WNID.fullmatch(e.name)) >= 2:
            hints.append(f"{self.root.resolve()} itself holds WNID folders: it looks like a "
                         "train/ or val/ folder, point --data.init_args.root at its parent")
        tars = [s for s in splits if (self.root / s).is_dir()
                and any(e.name.endswith(".tar") for e in os.scandir(self.root / s))]
        if tars:
            hints.append(f"{' and '.join(tars)} hold .tar files: extract each class archive "
                         "into its own <wnid>/ folder first")
        return hints

    def check_layout(self, splits: Sequence[str] = ("train", "val")) -> None:
        """Raise ONE :class:`DataNotFoundError` listing every missing folder and class."""
        if not self.root.is_dir():
            raise DataNotFoundError(f"ImageNet root {self.root.resolve()} does not exist. "
                                    + layout_help(self.root))
        problems = []
        for split in splits:
            folder = self.root / split
            if not folder.is_dir():
                problems.append(f"the folder {folder.resolve()} does not exist")
                continue
            missing = [c for c in self.classes if not (folder / c).is_dir()]
            if missing:
                flat = any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
                           for e in os.scandir(folder))
                problems.append(
                    f"{len(missing)} of the {self.num_classes} class folders are missing in "
                    f"{folder.resolve()}: {_listing(missing)}" + (
                        " (it holds the images directly: sort them into class folders with "
                        "valprep.sh, or move the folder away and let torchvision sort the "
                        "archive; see the README)" if flat else ""))
        if problems:
            problems += self._layout_hints(splits)
            raise DataNotFoundError(
                f"ImageNet subset {self.subset!r} under {self.root.resolve()}: "
                + "; ".join(problems) + ". " + layout_help(self.root))

    def splits(self, stage: str | None) -> tuple[str, ...]:
        """The folders ``stage`` reads: val/ alone to test, predict, validate with val_split 0."""
        return ("train", "val") if self.needs_train_set(stage or "fit") else ("val",)

    def prepare_data(self) -> None:  # verify only: never downloads
        self.check_layout(self.splits(getattr(getattr(self.trainer, "state", None), "fn", None)))

    def state_dict(self) -> dict[str, list[str]]:
        """The subset's WNIDs in label order, saved in checkpoints (see :meth:`load_state_dict`)."""
        return {"classes": list(self.classes)}

    def load_state_dict(self, state_dict: dict[str, list[str]]) -> None:
        """Refuse a checkpoint trained on other classes: with as many classes (``imagenette``
        vs ``imagewoof``, an edited class-list file) its label indices would silently mean
        other WNIDs."""
        saved = state_dict.get("classes")
        if saved is not None and list(saved) != self.classes:
            gone = sorted(set(saved) - set(self.classes))
            new = sorted(set(self.classes) - set(saved))
            raise ConfigError(
                f"The checkpoint's model was trained on other ImageNet classes than subset "
                f"{self.subset!r} ({self.num_classes} classes) holds: only in the checkpoint: "
                f"{_listing(gone) or 'none'}; only in this subset: {_listing(new) or 'none'}. "
                "Its labels would mean other WNIDs: pass the --data.init_args.subset it was "
                "trained with (its config.yaml), or train a new model.")

    def scan(self, split: str) -> list[tuple[Path, int]]:
        """``(path, label)`` of every image of the subset's classes in ``split``."""
        _, samples = scan_class_folders(self.root / split, self.classes)
        present = {y for _, y in samples}
        empty = [wnid for c, wnid in enumerate(self.classes) if c not in present]
        if empty:
            raise DataNotFoundError(
                f"{len(empty)} class folders of {(self.root / split).resolve()} hold no image "
                f"files: {_listing(empty)}. " + layout_help(self.root))
        return samples

    def select_train(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """Apply ``images_per_class`` / ``fraction`` (seeded per class) to sorted samples."""
        kept: list[tuple[Path, int]] = []
        keys = self.keys  # one checksum per class, not the whole list per class
        for c, group in groupby(samples, key=lambda s: s[1]):  # samples are sorted by class
            items = list(group)
            k = (min(self.images_per_class, len(items)) if self.images_per_class is not None
                 else len(items) if self.fraction is None
                 else min(len(items), max(1, round(self.fraction * len(items)))))
            kept.extend(items[i] for i in seeded_choice(len(items), k, self.seed, keys[c]))
        return kept

    @property
    def keys(self) -> list[int]:
        """Per class, the seed key of its image choices: a checksum of its WNID, not its label."""
        return [zlib.crc32(wnid.encode()) for wnid in self.classes]

    def train_transform(self) -> Callable[[Tensor], Tensor]:
        """RandomResizedCrop(image_size) and horizontal flip, then normalization."""
        if not self.augment:
            return self.eval_transform()
        return v2.Compose([v2.RandomResizedCrop(self.image_size, antialias=True),
                           v2.RandomHorizontalFlip(), *_TO_FLOAT])

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        """Resize(resize_size) and CenterCrop(image_size), then normalization."""
        return v2.Compose([v2.Resize(self.resize_size, antialias=True),
                           v2.CenterCrop(self.image_size), *_TO_FLOAT])

    def build_datasets(self, stage: str) -> None:
        self.check_layout(self.splits(stage))
        test = self.scan("val")  # class by class: one fixed shuffle mixes the classes, so
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0)).tolist()
        test = [test[i] for i in order]  # `limit_test_batches` and first batches see them all
        self.test_set = ImageFileDataset(test, self.eval_transform(), self.on_corrupt)
        self.val_set = self.test_set  # unless a val_split holds training images out, below
        if "train" not in self.splits(stage):
            return
        full = ImageFileDataset(self.select_train(self.scan("train")), None, self.on_corrupt)
        # per class (each keeps at least one training image), then one fixed shuffle so that
        # `limit_val_batches` sees every class
        train_idx, val_idx = stratified_split(full.labels, self.val_split, self.seed, self.keys)
        val_idx = val_idx[torch.randperm(len(val_idx),
                                         generator=torch.Generator().manual_seed(self.seed))]
        self.train_set = full.subset(train_idx, self.train_transform())
        self.train_eval_set = full.subset(train_idx, self.eval_transform())
        if len(val_idx):
            self.val_set = full.subset(val_idx, self.eval_transform())
        rank_zero_info(f"ImageNet subset {self.subset}: {self.num_classes} classes, "
                       f"{len(self.train_set)} train / {len(self.val_set)} val / "
                       f"{len(self.test_set)} test images")
