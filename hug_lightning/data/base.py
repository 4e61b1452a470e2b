"""Base DataModule: loaders, DDP-exact evaluation sharding, and the hooks subclasses fill.

A subclass sets ``self.num_classes`` in ``__init__`` (so LightningCLI can link it to the model
before anything is loaded) and implements :meth:`build_datasets`, which assigns
``self.train_set``, ``self.val_set``, ``self.test_set`` (and optionally ``self.predict_set``,
``self.train_eval_set``: the training images with the evaluation transform, and
``self.class_names``: the name of each label, which ``predict`` writes next to the indices;
a subclass that renumbers the labels it read, merging classes, sets them anew, else ``predict``
writes no names).

Batch size semantics: ``batch_size`` is **per process** (per GPU). Under DDP the global batch
is ``batch_size * devices * num_nodes``; scale the learning rate accordingly.

Training batches come from an :class:`EpochShardSampler`: ``DistributedSampler``'s order
(for ``seed_everything`` seed ``s``: its seed ``1000003 s``, plus the epoch; sharded across
processes), resumable mid-epoch, with per-sample augmentation keys. Validation, test and
predict loaders use :class:`ShardedEvalSampler`, which splits the set without padding, so
every sample is counted exactly once in the metrics even when the set's size does not divide
by the number of processes.

Several nodes: Lightning calls ``prepare_data`` on the first process of each node
(``prepare_data_per_node``, left at its default ``True``), so a node-local ``root`` is checked
(ImageNet) or downloaded (CIFAR) on its own node; nodes sharing a ``root`` download one at a time
(:mod:`hug_lightning.data.download_lock`). ``setup`` runs on every process and reads its own
node's ``root``; only global rank 0 writes into the run folder (``class_counts.json``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from hug_lightning.cli_errors import ConfigError
from hug_lightning.ddp_errors import agreed
from hug_lightning.data.loading import (EpochShardSampler, ResumableDataLoader, global_seed,
                                        next_train_batch)
from hug_lightning.data.samplers import ShardedEvalSampler


class DataNotFoundError(FileNotFoundError):
    """The data set is not where the configuration says it is (message says what to do)."""


class BadDataError(ValueError):
    """The data files are there but unreadable or inconsistent: a corrupt image, a label out
    of range (the message names the file and says what to do)."""


class ClassificationDataModule(LightningDataModule):
    """Shared loader logic of the image-classification DataModules.

    Args:
        batch_size: Samples per batch **per process** (global batch = batch_size x world size).
        eval_batch_size: Batch size of validation/test/predict loaders (default: batch_size).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin host memory for faster copies to the GPU.
        drop_last: Drop the last incomplete training batch.
        seed: Seed of everything random in the data (splits, subsets), not of the shuffling
            (that follows ``seed_everything``).
    """

    num_classes: int

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be positive (or null: batch_size), got "
                             f"{eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None  # training images, evaluation transform
        # the name of each label (a WNID, a CIFAR class name) once known, else None: `predict`
        # writes them next to the label indices
        self.class_names: list[str] | None = None

    # -------------------------------------------------------------- hooks for subclasses
    def build_datasets(self, stage: str) -> None:
        """Assign ``train_set``, ``val_set``, ``test_set`` (and ``predict_set``) for ``stage``."""
        raise NotImplementedError

    def needs_train_set(self, stage: str) -> bool:
        """Whether ``stage`` reads the training images: not to test or predict, nor to validate
        in a data module whose ``val_split`` attribute is 0 (it validates on the test split;
        ``build_datasets`` then leaves the training images unread)."""
        if stage in ("test", "predict"):
            return False
        return stage != "validate" or bool(getattr(self, "val_split", True))

    def setup(self, stage: str) -> None:
        # once per data module, except that a module set up without its training set (to test,
        # predict, or validate on the test split) builds again when it is then used to fit
        if self.train_set is None and (self.needs_train_set(stage) or self.test_set is None):
            self.run_agreed(lambda: self.build_datasets(stage), "setting up the data")

    def run_agreed(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on every process; under DDP an error met by all is reported once, one met
        by some stops the others (see :func:`hug_lightning.ddp_errors.agreed`)."""
        # the trainer's processes: not the default group's, still there after a DDP fit when
        # one process alone then runs a 1-device trainer (that would wait forever)
        if self.trainer is not None and self.trainer.world_size > 1:
            return agreed(fn, what)
        return fn()

    # -------------------------------------------------------------- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }

    def _require(self, name: str) -> Dataset:
        dataset = getattr(self, name)
        if dataset is None:
            hint = ("call setup() first, or build it in build_datasets()" +
                    (" (the training set with the evaluation transform, which the NC eval pass "
                     "reads; or set --nc.eval_pass false)" if name == "train_eval_set" else ""))
            raise RuntimeError(f"{type(self).__name__}: {name} is not built; {hint}.")
        return dataset

    def _next_train_batch(self) -> int:
        """Index of the next training batch of the current epoch (>0 on a mid-epoch resume)."""
        return next_train_batch(self.trainer)

    def _train_set(self) -> Dataset:
        """The training set; a :class:`ConfigError` when ``drop_last`` would leave this process
        no batch (Lightning then trains nothing, or a scheduler fails on 0 total steps)."""
        dataset = self._require("train_set")
        world = self.trainer.world_size if self.trainer is not None else 1
        per_process = math.ceil(len(dataset) / world)  # the sampler pads to equal shards
        if self.drop_last and per_process < self.batch_size:
            raise ConfigError(
                f"drop_last true with batch_size {self.batch_size} leaves no training batch: "
                f"the training set has {len(dataset)} samples ({per_process} per process). Set "
                f"--data.init_args.batch_size to at most {per_process}, or drop_last false.")
        return dataset

    def train_dataloader(self) -> DataLoader:
        dataset = self._train_set()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = EpochShardSampler(dataset, world, rank, shuffle=True, seed=global_seed())
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            next_batch_fn=self._next_train_batch,
            **self._loader_kwargs(),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = ShardedEvalSampler(dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require("val_set"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require("test_set"))

    def train_eval_dataloader(self) -> DataLoader:
        """The training set with the evaluation transform (for the NC eval pass)."""
        return self._eval_loader(self._require("train_eval_set"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set or self._require("test_set"))
