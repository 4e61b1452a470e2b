"""Samplers that keep evaluation exact under DDP."""

from __future__ import annotations

from typing import Iterator, Sized

from torch.utils.data.distributed import DistributedSampler


class ShardedEvalSampler(DistributedSampler):
    """Deterministic, unpadded sharding for validation/test/predict under DDP.

    ``DistributedSampler`` pads the index list with repeated samples so every rank gets the
    same number of batches; those duplicates are then counted twice by every metric. Here rank
    ``r`` of ``W`` takes indices ``r, r + W, r + 2W, ...`` and nothing else: shards differ in
    length by at most one, cover the data set exactly once, and need no gradient sync
    (evaluation has none). Lightning leaves a ``DistributedSampler`` subclass in place.

    Args:
        dataset: The evaluation data set.
        num_replicas: World size.
        rank: This process's global rank.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
