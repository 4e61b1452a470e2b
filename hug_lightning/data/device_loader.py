"""Device-resident batches: the uint8 data set lives on the accelerator, augmented per batch.

A classic DataLoader decodes, crops and flips one image at a time in CPU worker processes, which
cannot feed a current GPU on CIFAR (tens of thousands of images/s against a GPU that trains on
more). :class:`DeviceBatchLoader` keeps the ``(N, 3, 32, 32)`` uint8 images on the device (150 MB
for CIFAR) and builds each batch there with a handful of kernels: gather the batch's images,
padded random crop + flip (one gather, :func:`~hug_lightning.data.augment.pad_crop_flip`),
normalization.

* Order and sharding are :class:`~hug_lightning.data.loading.EpochShardSampler`'s (the order of
  ``DistributedSampler`` with a strided seed, plus the epoch), and the crop offsets and flips
  are the same keyed hash as the CPU path: for the same seed and epoch both paths produce
  identical batches.
* Without a GPU it runs on the CPU (same code), e.g. in tests.
* Lightning sets the epoch through ``loader.sampler.set_epoch`` and the loader resumes mid-epoch
  at the batch Lightning reports, like :class:`~hug_lightning.data.loading.ResumableDataLoader`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from hug_lightning.data.augment import (
    channel_stats,
    crop_flip_params,
    normalize,
    pad_crop_flip,
    sample_keys,
)
from hug_lightning.data.loading import EpochShardSampler, check_resumed_batch_size


class DeviceBatchLoader:
    """Iterable of ``(images, labels)`` batches made on ``device`` from uint8 images.

    Args:
        images: ``(N, C, H, W)`` uint8 images (moved to ``device`` once).
        labels: ``(N,)`` int64 labels.
        batch_size: Samples per batch (per process).
        mean: Per-channel mean of images scaled to [0, 1].
        std: Per-channel standard deviation.
        device: Where the data and the batches live.
        sampler: Order and shard (training); ``None`` gives this rank's unpadded evaluation
            shard ``rank, rank + W, ...`` in order.
        augment: Padded random crop and horizontal flip (training).
        pad: Zero padding of the crop.
        drop_last: Drop the last incomplete batch.
        out_dtype: dtype of the normalized images (float32; bfloat16 halves their bytes).
        next_batch_fn: Index of the next batch of the epoch (Lightning's progress), for resuming.
        world_size: Number of processes (evaluation shards).
        rank: This process's rank (evaluation shards).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        sampler: EpochShardSampler | None = None,
        augment: bool = False,
        pad: int = 4,
        drop_last: bool = False,
        out_dtype: torch.dtype = torch.float32,
        next_batch_fn: Callable[[], int] | None = None,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device, non_blocking=True).contiguous()
        self.labels = labels.to(self.device, non_blocking=True).long()
        self.batch_size = int(batch_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._stats = channel_stats(self.mean, self.std, self.device)  # once: no copy per batch
        self.sampler = sampler
        self.augment, self.pad = bool(augment), int(pad)
        self.drop_last = bool(drop_last)
        self.out_dtype = out_dtype
        self.next_batch_fn = next_batch_fn
        self.world_size, self.rank = int(world_size), int(rank)
        self.batch_sampler = None  # what Lightning's loader checks look for

    def _order(self) -> tuple[Tensor, Tensor | None]:
        if self.sampler is None:
            return torch.arange(self.rank, self.images.shape[0], self.world_size), None
        self.sampler.start = 0
        idx = self.sampler.shard_indices()
        return idx, sample_keys(self.sampler.seed, self.sampler.epoch, idx)

    def sample_indices(self) -> Tensor | None:
        """Positions in the data set of the samples an evaluation loader yields, in order (this
        rank's shard: what the prediction writer records as ``index``); ``None`` for training
        (a new order every epoch)."""
        return self._order()[0] if self.sampler is None else None

    @property
    def dataset_len(self) -> int:
        """Samples of the data set the loader draws from, over all processes (what
        ``len(loader.dataset)`` is for a DataLoader; e.g. the NC eval pass sizes its buffers
        by it)."""
        return int(self.images.shape[0])

    def _num_samples(self) -> int:
        if self.sampler is None:
            return len(range(self.rank, self.images.shape[0], self.world_size))
        return self.sampler.num_samples

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # one host-to-device copy and one hash per epoch; per batch only slices, the gather,
        # crop/flip and normalization (a few kernels, no host synchronisation)
        idx, keys = self._order()
        idx = idx.to(self.device)
        params = None
        if self.augment and keys is not None:
            params = crop_flip_params(keys.to(self.device), self.pad)
        skip = int(self.next_batch_fn()) if self.next_batch_fn is not None else 0
        for b in range(skip, len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.make_batch(idx[sl], None if params is None else tuple(p[sl] for p in params))

    def make_batch(self, idx: Tensor, crop_flip: tuple[Tensor, Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, Tensor]:
        """The normalized images and labels of the samples ``idx``.

        Args:
            idx: Sample indices on the loader's device.
            crop_flip: Per-sample ``(dx, dy, flip)`` of :func:`crop_flip_params`, or ``None``
                for no augmentation.
        """
        x = self.images.index_select(0, idx)
        if crop_flip is not None:
            x = pad_crop_flip(x, *crop_flip, self.pad)
        x = normalize(x, *self._stats, self.out_dtype)
        return x, self.labels.index_select(0, idx)

    # Lightning treats loaders with these methods as resumable; the position comes from
    # Lightning's batch progress (next_batch_fn).
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {"epoch": 0}
        return {"epoch": int(self.sampler.epoch), "seed": int(self.sampler.seed),
                "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint whose data order came from another seed, or that stopped inside
        an epoch with another batch size (as the CPU path)."""
        seed = getattr(self.sampler, "seed", None)
        if seed is not None and int(state_dict.get("seed", seed)) != int(seed):
            raise ValueError(
                f"The checkpoint's data order used seed {state_dict['seed']}, this run uses "
                f"{seed}: set seed_everything to the original value to resume."
            )
        if self.sampler is not None:
            check_resumed_batch_size(state_dict, self.batch_size, self.next_batch_fn)
