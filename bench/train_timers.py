"""The clocks of ``train_bench.py``'s Lightning arms: timed training steps and whole epochs.

Both synchronize the device before reading the clock, as the plain loop (a) does.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback


def sync_device(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA only), so that a clock reading counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time of the training batches after ``warmup`` (device synchronized).

    With ``steps`` the clock stops at the end of training batch ``warmup + steps``, as the plain
    loop's does: the end of the fit (the last epoch-end hooks: NC compute, checkpoint saves,
    logger flush) comes once per fit, not per step, and stays out of the window."""

    def __init__(self, warmup: int, steps: int | None = None) -> None:
        self.warmup, self.t0, self.t1, self.steps = warmup, 0.0, 0.0, 0
        self.stop = None if steps is None else warmup + steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.warmup:
            sync_device(pl_module.device)
            self.t0 = time.perf_counter()

    def _end(self, trainer, pl_module) -> None:  # noqa: ANN001
        sync_device(pl_module.device)
        self.t1 = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    def on_train_batch_end(self, trainer, pl_module, outputs, batch,  # noqa: ANN001
                           batch_idx) -> None:
        if trainer.global_step == self.stop:
            self._end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.stop is None or trainer.global_step < self.stop:  # stopped early
            self._end(trainer, pl_module)


class EpochTimer(Callback):
    """Wall time of each whole epoch, epoch-end hooks (NC compute, logging) included.

    An epoch runs from one ``on_train_epoch_start`` to the next (or to ``on_train_end``), so
    everything Lightning, the module and the callbacks do at the epoch's end is inside it.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def _stamp(self, pl_module) -> None:  # noqa: ANN001
        sync_device(pl_module.device)
        self.stamps.append(time.perf_counter())

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._stamp(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._stamp(pl_module)

    def epoch_seconds(self, skip: int = 1) -> float:
        """Mean epoch time after the first ``skip`` epochs (cuDNN autotuning, allocator)."""
        times = [b - a for a, b in zip(self.stamps, self.stamps[1:])][skip:]
        return sum(times) / max(len(times), 1)


__all__ = ["EpochTimer", "StepTimer", "sync_device"]
