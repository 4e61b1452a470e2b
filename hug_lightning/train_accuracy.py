"""The epoch's training accuracy as two counters, exact over processes and across a resume.

:class:`~hug_lightning.module.ClassifierModule` counts correct and seen training samples with
3 small kernels per step (no host sync), sums the counts over processes at the end of the
epoch, and keeps them in checkpoints so that a run resumed mid-epoch logs the same accuracy.

No Lightning import: the trainer is used through ``world_size`` and ``strategy.reduce``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: the checkpoint key of the counts (and their ``state_dict`` key when they were a buffer)
KEY = "train_counts"


class TrainAccuracy:
    """Correct and seen training samples of the current epoch, on this process.

    Not a registered buffer: DDP broadcasts buffers from rank 0 before every forward, which
    would replace each rank's counts by rank 0's (see :meth:`save`). A plain tensor instead,
    moved to the data's device at the first update.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(2, dtype=torch.long)  # (correct, seen)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Count one batch's correct predictions (``argmax`` of ``logits``) and samples."""
        counts = self.counts
        if counts.device != labels.device:  # a plain tensor: follows the data once
            self.counts = counts = counts.to(labels.device)
        counts[0] += (logits.argmax(-1) == labels).sum()
        counts[1] += labels.shape[0]  # a scalar argument: no host-to-device copy

    def summed(self, trainer: Any | None) -> Tensor:
        """A copy of the counts, summed over processes when ``trainer`` runs several (a
        collective call: every rank must make it)."""
        counts = self.counts.clone()
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return counts

    def compute_and_reset(self, trainer: Any | None) -> Tensor:
        """The epoch's accuracy over every process (float64, 0 when nothing was seen); the
        counts restart from zero."""
        counts = self.summed(trainer)
        self.counts.zero_()
        return counts[0].double() / counts[1].clamp_min(1)

    def save(self, checkpoint: dict[str, Any], trainer: Any | None) -> None:
        """Store the counts summed over processes (Lightning saves on every rank, so the
        reduction is collective)."""
        checkpoint[KEY] = self.summed(trainer).cpu()

    def load(self, checkpoint: dict[str, Any], rank: int) -> None:
        """Restore the counts on rank 0 (they are already the sum over processes; older
        checkpoints stored them as a module buffer, in ``state_dict``); other ranks restart
        from zero. Both keys are removed from ``checkpoint``."""
        saved = checkpoint.pop(KEY, None)
        legacy = checkpoint.get("state_dict", {}).pop(KEY, None)
        saved = saved if saved is not None else legacy
        self.counts = (saved.clone().long() if saved is not None and rank == 0
                       else torch.zeros(2, dtype=torch.long))
