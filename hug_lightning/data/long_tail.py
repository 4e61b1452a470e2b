"""Long-tailed CIFAR-10/100 (CIFAR-LT), the protocol of LDAM (Cao et al., NeurIPS 2019).

The training set keeps ``n_c`` images of class ``c``: with the exponential profile
``n_c = floor(n_max * ratio ** (-c / (K - 1)))`` for ``c = 0..K-1`` (5,000 down to 50 per class
for CIFAR-10 at ratio 100, 12,406 images; 500 down to 5 for CIFAR-100, 10,847 images); with
the step profile the first ``K // 2`` classes keep ``n_max`` and the others
``floor(n_max / ratio)``. ``n_max`` is the class size of the balanced training set (5,000 /
500); where some classes hold fewer images (a partial copy, files skipped by ``on_corrupt:
skip``), the largest ``n_max`` whose profile every class can fill: a class short of images it
does not need changes nothing (a tail class keeps 50 of 5,000), one short of its ``n_c`` scales
the whole profile down. Which images a class keeps is drawn with ``seed`` (the same on every rank
and run; LDAM's own NumPy draw picks other images, with the same counts). The test set stays
balanced.

Validation: ``val_split=0`` (default, as in LDAM) validates on the balanced test set (and
``validate`` then reads no training image). A
positive ``val_split`` holds out a class-stratified part of the long-tailed training set (each
class gives ``round(val_split * n_c)``, rounding half to even, and keeps at least one training
image), so that validation set is long-tailed too, and a tail class gives none when
``val_split * n_c`` rounds to 0 (below 0.5); the log line states the training ratio left after
it.

The class counts are logged, kept in ``class_counts`` and written as ``class_counts.json``
into the log folder of every trainer that sets the module up (rank 0; the sets themselves are
built once) and as TensorBoard text ``data/class_counts``.

Checkpoints record the training selection (its counts, options and a digest of the image
indices): ``fit --ckpt_path`` on another selection (another ratio, profile, seed or
``val_split``, or changed image folders) is an error, not a run that goes on with other images.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from hug_lightning.cli_errors import ConfigError
from hug_lightning.data.arrays import TensorImageDataset
from hug_lightning.data.base import BadDataError
from hug_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule, _CIFARDataModule
from hug_lightning.data.splits import seeded_choice, stratified_split


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                     imbalance_type: Literal["exp", "step"] = "exp") -> list[int]:
    """Images per class of the LDAM profiles (see the module docstring)."""
    if num_classes < 2:
        raise ValueError(f"A long-tailed profile needs at least 2 classes, got {num_classes}.")
    if not imbalance_ratio >= 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}.")
    if imbalance_type == "exp":
        # + 1e-9: n_max * r ** -1 can round to just below an integer (98 * 49 ** -1 =
        # 1.9999999999999998), which the floor would turn into a count one short of n_max / r
        return [math.floor(n_max * imbalance_ratio ** (-c / (num_classes - 1)) + 1e-9)
                for c in range(num_classes)]
    if imbalance_type == "step":
        head = num_classes // 2
        return [n_max] * head + [math.floor(n_max / imbalance_ratio)] * (num_classes - head)
    raise ValueError(f"imbalance_type must be 'exp' or 'step', got {imbalance_type!r}.")


def profile_n_max(available: Sequence[int], imbalance_ratio: float,
                  imbalance_type: Literal["exp", "step"] = "exp") -> int:
    """The largest ``n_max`` (at most the largest class) whose profile asks no class ``c`` for
    more than its ``available[c]`` images; at least the smallest class (every profile fits it).
    """
    def fits(n_max: int) -> bool:
        counts = long_tail_counts(n_max, len(available), imbalance_ratio, imbalance_type)
        return all(k <= n for k, n in zip(counts, available))

    low, high = min(available), max(available)  # fits(low); the counts grow with n_max
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def select_per_class(labels: Tensor, counts: Sequence[int], seed: int) -> Tensor:
    """Sorted indices keeping ``counts[c]`` seeded samples of each class ``c``."""
    keep = []
    for c, k in enumerate(counts):
        idx = (labels == c).nonzero().flatten()
        if k > len(idx):
            raise ValueError(f"Class {c} has {len(idx)} images, fewer than the {k} asked for.")
        keep.append(idx[seeded_choice(len(idx), k, seed, c)])
    return torch.cat(keep).sort().values


class _LongTailCIFAR(_CIFARDataModule):
    """Long-tailed CIFAR (LDAM): see the module docstring of ``hug_lightning.data.long_tail``.

    Args:
        root: Folder with torchvision's CIFAR files or ``train/`` + ``test/`` class folders.
        download: Download with torchvision into ``root`` when neither layout is there.
        imbalance_ratio: ``n_max / n_min``, the largest over the smallest class size (>= 1;
            10 and 100 in the literature).
        imbalance_type: ``exp`` (exponential profile, LDAM's default) or ``step``.
        val_split: 0 validates on the balanced test set (LDAM); a fraction (float) or count
            (int) holds out a class-stratified part of the long-tailed training set.
        batch_size: Training batch size **per process** (global = batch_size x world size).
        eval_batch_size: Batch size for validation, test and predict (default: batch_size).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory.
        drop_last: Drop the last incomplete training batch.
        seed: Seed of the images kept per class and of the validation split.
        augment: Random crop (4-pixel zero padding) and horizontal flip on training images.
        on_corrupt: ``raise`` on an unreadable image file (the message names it) or ``skip`` it.
        device_resident: Keep the images on the accelerator and build batches there.
    """

    def __init__(
        self,
        root: str | None = None,
        download: bool = True,
        imbalance_ratio: float = 100.0,
        imbalance_type: Literal["exp", "step"] = "exp",
        val_split: int | float = 0,
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
        super().__init__(root, download, val_split, batch_size, eval_batch_size, num_workers,
                         pin_memory, drop_last, seed, augment, on_corrupt, device_resident)
        long_tail_counts(1, self.num_classes, imbalance_ratio, imbalance_type)  # checks args
        self.imbalance_ratio = float(imbalance_ratio)
        self.imbalance_type = imbalance_type
        self.class_counts: dict[str, Any] = {}
        self._train_digest: str | None = None  # of the training (and held-out) indices
        self._replaced_counts: tuple[Path, str] | None = None  # (file, its text before setup)

    def build_datasets(self, stage: str) -> None:
        test_images, test_labels = self.load_split(train=False)
        self.test_set = TensorImageDataset(test_images, test_labels, self.eval_transform())
        counts: dict[str, Any] = {"test": self._bincount(test_labels)}
        if not self.val_split:  # the balanced test set (also to validate without training images)
            self.val_set = self.test_set
        if self.needs_train_set(stage):
            images, labels = self.load_split(train=True)
            available = self._bincount(labels)
            if min(available) == 0:  # no ratio helps: say which classes have no image
                absent = [c for c, n in enumerate(available) if n == 0]
                raise BadDataError(
                    f"The training set of {self.root} has no readable image of classes "
                    f"{absent[:20]}; {self.name} needs every class: copy or replace them there.")
            n_max = profile_n_max(available, self.imbalance_ratio, self.imbalance_type)
            target = long_tail_counts(n_max, self.num_classes, self.imbalance_ratio,
                                      self.imbalance_type)
            if n_max < max(available):  # one more image per class is more than some hold
                wanted = long_tail_counts(n_max + 1, self.num_classes, self.imbalance_ratio,
                                          self.imbalance_type)
                short = [f"{c}: {n} of {k}" for c, (k, n) in enumerate(zip(wanted, available))
                         if k > n]
                rank_zero_warn(
                    f"{self.name}: the training images of {self.root} cannot fill the profile "
                    f"from {max(available)} images (class {', '.join(short[:10])} wanted), so it "
                    f"starts from n_max {n_max}: {sum(target)} training images.")
            empty = [c for c, n in enumerate(target) if n == 0]
            if empty:
                raise ConfigError(
                    f"imbalance_ratio={self.imbalance_ratio:g} leaves no training image for "
                    f"classes {empty[:20]} (n_max {n_max}: the most images a profile can "
                    f"start from in {self.root}); use imbalance_ratio <= {n_max}.")
            full = TensorImageDataset(images, labels, None, select_per_class(labels, target,
                                                                             self.seed))
            train_idx, val_idx = stratified_split(full.targets, self.val_split, self.seed)
            self.train_set = full.subset(train_idx, self.train_transform())
            self.train_eval_set = full.subset(train_idx, self.eval_transform())
            self.val_set = (full.subset(val_idx, self.eval_transform()) if len(val_idx)
                            else self.test_set)
            self._train_digest = hashlib.sha1(b"".join(
                idx.numpy().astype("<i8").tobytes() + b"|"
                for idx in (self.train_set.indices, full.indices[val_idx]))).hexdigest()
            counts.update(n_max=n_max, long_tail=target,
                          train=self._bincount(self.train_set.targets),
                          val=self._bincount(self.val_set.targets),
                          val_source="train" if len(val_idx) else "test")
        self.class_counts = {"dataset": self.name, "imbalance_ratio": self.imbalance_ratio,
                             "imbalance_type": self.imbalance_type, "seed": self.seed, **counts}
        if "train" in counts:
            train = counts["train"]
            held_out = (f"; {sum(counts['val'])} held out for validation, training ratio now "
                        f"{max(train) / max(min(train), 1):.3g}" if counts["val_source"] == "train"
                        else "")
            rank_zero_info(f"{self.name} (ratio {self.imbalance_ratio:g}, {self.imbalance_type}): "
                           f"{sum(train)} training images, per class {train}{held_out}")

    def setup(self, stage: str) -> None:
        super().setup(stage)  # builds the sets once (again only for a stage that needs more)
        # into the log folder of every trainer that uses this module, not only the first's
        self.run_agreed(self.save_class_counts, "writing class_counts.json")

    def _bincount(self, labels: Tensor) -> list[int]:
        return torch.bincount(labels, minlength=self.num_classes).tolist()

    def save_class_counts(self) -> Path | None:
        """Write ``class_counts.json`` into the trainer's log folder (rank 0, with a logger)."""
        self._replaced_counts = None  # of this trainer's folder only, not an earlier run's
        trainer = self.trainer
        if trainer is None or not trainer.loggers:
            return None
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if log_dir is None or not trainer.is_global_zero:
            return None
        path = Path(log_dir) / "class_counts.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():  # a resume into the run's folder: put back if the resume is refused
            self._replaced_counts = (path, path.read_text())
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.class_counts.items()]
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one line per entry
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):  # TensorBoard
                add_text("data/class_counts", "    " + json.dumps(self.class_counts), 0)
        return path

    def state_dict(self) -> dict[str, Any]:
        """The training selection, saved in checkpoints (see :meth:`load_state_dict`)."""
        if self._train_digest is None:  # set up for test / predict only
            return {}
        return {"class_counts": self.class_counts, "val_split": self.val_split,
                "train_digest": self._train_digest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a fit on another training selection than the checkpoint's: the run
        would go on with other images, its class counts no longer those it reports."""
        saved = state_dict.get("train_digest")
        fn = getattr(getattr(self.trainer, "state", None), "fn", "fit")
        if saved is None or self._train_digest is None or fn != "fit":
            return  # no record (an older checkpoint), or an evaluation: not trained on
        if saved == self._train_digest:
            return
        if self._replaced_counts is not None:  # this setup rewrote the run's file: undo it
            path, text = self._replaced_counts
            path.write_text(text)

        def describe(counts: dict[str, Any], val_split: Any) -> str:
            ratio = counts.get("imbalance_ratio")
            return (f"imbalance_ratio {ratio:g}, " if isinstance(ratio, float) else "") + (
                f"{counts.get('imbalance_type')}, seed {counts.get('seed')}, val_split "
                f"{val_split}: {sum(counts.get('train', []))} training images, per class "
                f"{counts.get('train')}")

        ckpt = describe(state_dict.get("class_counts", {}), state_dict.get("val_split"))
        now = describe(self.class_counts, self.val_split)
        same = (" with the same options: the images under the root changed (a file added, "
                "removed or skipped by on_corrupt skip), or the seeded draw did (another torch "
                "version)" if ckpt == now else "")
        raise ConfigError(
            f"The checkpoint was trained on other {self.name} training images than this run "
            f"selects{same}. Checkpoint: {ckpt}. This run: {now}. Resuming would train the rest "
            "of the run on them: pass the --data.init_args options it was trained with (its run's "
            "config.yaml) and the same data, or start a new run.")


class CIFAR10LTDataModule(_LongTailCIFAR, CIFAR10DataModule):
    """Long-tailed CIFAR-10 (LDAM protocol).

    Arguments: see :class:`_LongTailCIFAR`.
    """

    name = "CIFAR-10-LT"
    default_root = "data/cifar10"


class CIFAR100LTDataModule(_LongTailCIFAR, CIFAR100DataModule):
    """Long-tailed CIFAR-100 (LDAM protocol).

    Arguments: see :class:`_LongTailCIFAR`.
    """

    name = "CIFAR-100-LT"
    default_root = "data/cifar100"
