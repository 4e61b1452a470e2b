"""A TQDM progress bar that redraws at most every ``min_interval_s`` seconds.

Lightning's ``TQDMProgressBar`` redraws after every batch (``refresh_rate=1``): it formats the
bar and its metrics and writes them to the terminal, about 0.2 ms of host time per batch on a
CPU core (``bench/train_bench.py --overhead --measure bcli``). At the hundred-odd steps per
second of a small model on a current GPU that is a few per cent of every step, spent on
redraws faster than anyone can read. :class:`ThrottledProgressBar` shows the same bar and the
same values, redrawn at most ten times a second (tqdm's own default interval), and always after
the last batch of a loop. ``hug-lightning`` uses it unless the configuration names a progress
bar of its own (``trainer.callbacks``) or turns the bar off (``trainer.enable_progress_bar``).

Lightning's bar closes its bars only at a loop's normal end. A run that ends with an exception
(an error, Ctrl-C, SIGTERM) left them open: the traceback began on the bar's line, and in a
notebook or any process that goes on, the open bar was drawn again when it was garbage
collected, a stray ``Epoch 0:  86%| 6/7`` in a later cell's output. This one closes them in
``on_exception``.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class ThrottledProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose per-batch redraws are at least ``min_interval_s`` apart.

    Args:
        min_interval_s: Shortest time between two redraws of a bar (the last batch of a loop is
            always drawn). 0 redraws on every batch, as Lightning's bar does.
        refresh_rate: As ``TQDMProgressBar``: draw only every this many batches (0: no bar).
        process_position: As ``TQDMProgressBar``.
        leave: As ``TQDMProgressBar``.
    """

    def __init__(self, min_interval_s: float = 0.1, refresh_rate: int = 1,
                 process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position,
                         leave=leave)
        if min_interval_s < 0:
            raise ValueError(f"ThrottledProgressBar: min_interval_s={min_interval_s} must be "
                             ">= 0")
        self.min_interval_s = float(min_interval_s)
        self._last_draw: dict[str, float] = {}
        self._clock = time.monotonic

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:  # noqa: ANN001
        """Close every bar of the loop the exception ended (as its normal end would: the
        training bar's line is left, ended, before the traceback)."""
        super().on_exception(trainer, pl_module, exception)
        for stage in ("train", "val", "test", "predict"):
            bar = getattr(self, f"_{stage}_progress_bar", None)
            if bar is not None:
                bar.close()  # a second close does nothing

    def _due(self, stage: str, batch_idx: int, bar: Any) -> bool:
        """Whether this batch's redraw of ``bar`` happens (the last batch always does). Only a
        batch that ``refresh_rate`` lets draw takes the interval's slot: otherwise batches
        skipped by ``refresh_rate`` could take every slot, and the bar never moved."""
        total = getattr(bar, "total", None)
        if not self._should_update(batch_idx + 1, total):
            return False
        now = self._clock()
        if (total is not None and batch_idx + 1 >= total) or \
                now - self._last_draw.get(stage, float("-inf")) >= self.min_interval_s:
            self._last_draw[stage] = now
            return True
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch,  # noqa: ANN001
                           batch_idx) -> None:
        if self._due("train", batch_idx, self.train_progress_bar):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                                dataloader_idx: int = 0) -> None:
        if self._due("val", batch_idx, self.val_progress_bar):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx,
                                            dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                          dataloader_idx: int = 0) -> None:
        if self._due("test", batch_idx, self.test_progress_bar):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx,
                                      dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                             dataloader_idx: int = 0) -> None:
        if self._due("predict", batch_idx, self.predict_progress_bar):
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx,
                                         dataloader_idx)


__all__ = ["ThrottledProgressBar"]
