"""Training-order sampling that is seeded, sharded for DDP, keyed and resumable mid-epoch.

:class:`EpochShardSampler` draws the per-epoch permutation of ``DistributedSampler`` with seed
``ORDER_SEED_STRIDE * seed`` (so the generator gets ``ORDER_SEED_STRIDE * seed + epoch``: runs
with seeds ``s`` and ``s + 1`` do not share orders shifted by one epoch), padded to a multiple
of the world size, rank ``r`` taking every ``W``-th index, and yields ``(index, key)`` pairs to
data sets that declare ``accepts_keys = True`` (plain indices to others): the key (a hash of
seed, epoch and index) drives the sample's
augmentation (:mod:`hug_lightning.data.augment`). Lightning leaves a
``DistributedSampler`` subclass in place, so the same sampler serves 1 and N processes.

:class:`ResumableDataLoader` starts each epoch's iteration at the batch Lightning says comes
next: after a mid-epoch checkpoint is restored, the resumed run sees exactly the batches the
interrupted run had not yet seen, with the same augmentations.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Sized

import torch
from torch.utils.data import DataLoader, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from hug_lightning.data.augment import sample_keys


def global_seed(default: int = 0) -> int:
    """The seed set by ``seed_everything`` (``PL_GLOBAL_SEED``), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def next_train_batch(trainer: Any) -> int:
    """Index of the next training batch of ``trainer``'s current epoch (Lightning's restored
    batch progress: > 0 on a mid-epoch resume; 0 outside training or without a trainer)."""
    if trainer is None or not trainer.training:
        return 0
    load_pending_loader_states(trainer)
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def load_pending_loader_states(trainer: Any) -> None:
    """Give the training loaders the states saved in the checkpoint being resumed, where
    Lightning has not (called when an epoch's iteration starts).

    Lightning loads them when it sets up the training data after restoring the fit loop; a
    schedule sized by ``trainer.estimated_stepping_batches`` (``OneCycleLR``,
    ``WarmupCosineLR``) sets the data up earlier, in ``configure_optimizers``, and the states
    were never loaded (Lightning issue #20550), nor the loaders' seed and batch-size checks run.
    """
    loop = getattr(trainer, "fit_loop", None)
    states = getattr(loop, "_combined_loader_states_to_load", None)
    combined = getattr(loop, "_combined_loader", None)
    if not states or combined is None:
        return
    loop._combined_loader_states_to_load = []  # first: the loaders' checks call back here
    combined._load_state_dicts(states)


#: The order of epoch ``e`` under seed ``s`` is ``DistributedSampler``'s with seed
#: ``ORDER_SEED_STRIDE * s``: with its plain ``seed + epoch``, seed 1 would replay seed 0's
#: orders shifted by one epoch (runs meant as independent repeats would share them).
ORDER_SEED_STRIDE = 1_000_003


class EpochShardSampler(DistributedSampler):
    """Seeded per-epoch order, DDP shards, ``(index, key)`` items, optional start offset.

    Args:
        dataset: The training set (only its length is used).
        num_replicas: World size.
        rank: Global rank of this process.
        shuffle: Permute the indices every epoch (seeded by ``ORDER_SEED_STRIDE * seed + epoch``).
        seed: Seed of the order and of the augmentation keys.
        drop_last: Drop the tail instead of padding it to a multiple of the world size.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start = 0  # samples of this shard to skip (set for a resumed epoch)

    def shard_indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in order (DistributedSampler's rule)."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(ORDER_SEED_STRIDE * self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > n:
            reps = math.ceil((self.total_size - n) / n)
            order = torch.cat([order, order.repeat(reps)[: self.total_size - n]])
        return order[self.rank : self.total_size : self.num_replicas]

    def keyed_shard(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, keys)`` of this rank's remaining samples in the current epoch."""
        idx = self.shard_indices()[self.start :]
        return idx, sample_keys(self.seed, self.epoch, idx)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        idx, keys = self.keyed_shard()
        self.start = 0
        if getattr(self.dataset, "accepts_keys", False):
            return iter(zip(idx.tolist(), keys.tolist()))
        return iter(idx.tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochShardSampler` that resumes mid-epoch.

    Args:
        *args: As for ``DataLoader``; the sampler must be an :class:`EpochShardSampler` (or
            the ``SequentialSampler`` of Lightning's ``overfit_batches``, sharded by a plain
            ``DistributedSampler`` under DDP: not resumable).
        next_batch_fn: Returns the index of the next batch of the current epoch (Lightning's
            restored batch progress); called when an epoch's iteration starts.
        **kwargs: As for ``DataLoader``.
    """

    #: the option that sets the sampler's seed (named when a checkpoint's seed differs)
    seed_option = "seed_everything"

    def __init__(self, *args: Any, next_batch_fn: Callable[[], int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a SequentialSampler: Lightning's `overfit_batches` rebuilt the loader with one (the
        # same first batches every epoch, nothing to resume), sharded under DDP by a plain
        # DistributedSampler (a second rebuild)
        self.resumable = isinstance(self.sampler, EpochShardSampler)
        if not isinstance(self.sampler, (SequentialSampler, DistributedSampler)):
            raise TypeError("ResumableDataLoader needs an EpochShardSampler.")
        self.next_batch_fn = next_batch_fn

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.resumable:
            skip = int(self.next_batch_fn()) if self.next_batch_fn is not None else 0
            self.sampler.start = skip * int(self.batch_size or 1)
        yield from super().__iter__()

    # Lightning treats loaders with these methods as resumable (no "unreliable" warning);
    # the position itself comes from Lightning's own batch progress.
    def state_dict(self) -> dict[str, Any]:
        if not self.resumable:
            return {}
        return {"epoch": int(self.sampler.epoch), "seed": int(self.sampler.seed),
                "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.resumable:
            return
        if int(state_dict.get("seed", self.sampler.seed)) != int(self.sampler.seed):
            raise ValueError(
                f"The checkpoint's data order used seed {state_dict['seed']}, this run uses "
                f"{self.sampler.seed}: set {self.seed_option} to the original value to resume."
            )
        check_resumed_batch_size(state_dict, int(self.batch_size or 1), self.next_batch_fn)


def check_resumed_batch_size(state_dict: dict[str, Any], batch_size: int,
                             next_batch_fn: Callable[[], int] | None) -> None:
    """Refuse a mid-epoch resume at another batch size (the rest of the epoch starts at
    ``next batch x batch_size``, so samples would repeat or be skipped).

    Args:
        state_dict: The training loader's saved state (``batch_size``: absent in old ones).
        batch_size: This run's batch size per process.
        next_batch_fn: The index of the next batch of the restored epoch (0: an epoch end).

    Raises:
        ValueError: The batch sizes differ and the checkpoint is inside an epoch.
    """
    saved = state_dict.get("batch_size")
    if saved is not None and int(saved) != batch_size \
            and next_batch_fn is not None and next_batch_fn() > 0:
        raise ValueError(
            f"The checkpoint stopped inside an epoch with batch_size {saved} per process; this "
            f"run uses {batch_size}, so the rest of that epoch would repeat or skip "
            "samples. Resume with the original --data.init_args.batch_size (change it "
            "from a checkpoint saved at an epoch end).")
