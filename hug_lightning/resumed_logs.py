"""A fit resumed into its own folder continues the run's logs from its checkpoint's step.

A fit killed without a save (SIGKILL, a lost node, the out-of-memory killer) has logged past
its last checkpoint. ``fit --ckpt_path last`` resumes from that checkpoint in the same folder
and logs those steps again: ``metrics.csv`` (kept by :mod:`hug_lightning.csv_history`) had
their rows twice, and TensorBoard's Python reader (``EventAccumulator``, ``tensorboard
--load_fast=false``) each value twice, the curves running back and forth (its Rust data
server, ``--load_fast=true``, showed each step once).
:class:`ResumedLogCut` drops what earlier fits logged from the resumed fit's first step on, as
its first training batch starts, so the folder reads as one uninterrupted run:

* TensorBoard: a ``SessionLog.START`` event at that step in this fit's event file, what
  ``SummaryWriter(purge_step=...)`` writes (the writer is open before the step is known):
  TensorBoard hides the folder's earlier events at that step or later, scalars, images and
  histograms alike (the ``hp/*`` values and the NC figures included; the HPARAMS declaration,
  at step 0, stays);
* CSV: the rows of ``metrics.csv`` at that step or later move to ``metrics.cut-<n>.csv``.

The step is that of the resumed fit's first training batch: Lightning logs a batch's values at
the training loop's ``_batches_that_stepped`` counter, which the batch then advances, and a
validation's and an epoch's end values at the step of the batch they follow. What the
checkpointed fit logged up to its save has lower steps, the epoch's end values written after an
epoch-end save too (its last batch's step); whatever it logged later has that step or more.
The cut is made before anything of the fit logs there (the callback goes first): as that batch
starts, the counter then as Lightning's restart set it (one added to a counter saved before a
batch advanced it: in ``on_train_batch_end``, at the end of a mid-epoch validation), so none of
its rules is repeated here; or as the batch's epoch starts when the restored epoch was done (an
epoch-end save, after its last batch advanced the counter), since the epoch-start hooks log at
that step too (``LearningRateMonitor``). Only a fit resumed into the folder of its checkpoint is
cut (:func:`~hug_lightning.hp_tab.resumed_in_place`); under DDP the first process writes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.csv_logs import CSVLogger as FabricCSVLogger
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from hug_lightning.hp_tab import resumed_in_place
from hug_lightning.metrics.direct_log import batches_that_stepped

__all__ = ["ResumedLogCut", "cut_csv"]


def cut_csv(path: Path, step: int) -> int:
    """Move the rows of a CSV logger's ``metrics.csv`` logged at ``step`` or later (a row
    without a step stays) to ``metrics.cut-<n>.csv`` beside it (the first free ``n``: nothing
    is lost, TensorBoard only hides its events too); ``metrics.csv`` is written back as the
    logger writes it. Returns how many rows moved."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)

    def later(row: dict[str, str]) -> bool:
        return (row.get("step") or "").isdigit() and int(row["step"]) >= step

    cut = [row for row in rows if later(row)]
    if cut:
        n = 1
        while (aside := path.with_name(f"{path.stem}.cut-{n}{path.suffix}")).exists():
            n += 1
        for target, kept in ((aside, cut), (path, [row for row in rows if not later(row)])):
            with open(target, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=reader.fieldnames or [])
                writer.writeheader()
                writer.writerows(kept)
    return len(cut)


class ResumedLogCut(Callback):
    """Cut the logs of a fit resumed into its own folder at the step of its first training batch
    (see the module docstring). The CLI puts it first among the callbacks of ``fit --ckpt_path
    last``: the cut comes before anything of the fit logs at that step, also in the hooks that
    come before the batch (``LearningRateMonitor`` logs at an epoch's start). A fit into a new
    folder, or not resumed, is left alone."""

    def __init__(self) -> None:
        self._due = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._due = trainer.is_global_zero and resumed_in_place(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._cut(trainer)  # a new epoch (the restored one was done): logs start here

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._cut(trainer)  # inside the restored epoch (no epoch start): its first batch

    def _cut(self, trainer: Trainer) -> None:
        step = batches_that_stepped(trainer) if self._due else None
        self._due = False
        if step is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and resumed_in_place(trainer, logger):
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                writer = logger.experiment  # what SummaryWriter(purge_step=step) writes first
                writer._get_file_writer().add_event(
                    Event(step=step, session_log=SessionLog(status=SessionLog.START)))
                writer.flush()
            elif isinstance(logger, FabricCSVLogger):  # pytorch's CSVLogger subclasses it
                path = Path(logger.log_dir, "metrics.csv")  # kept by csv_history
                if path.is_file():
                    cut_csv(path, step)
