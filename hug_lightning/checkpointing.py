"""Checkpoints you can resume from: ``last.ckpt`` every epoch (and on demand every N steps),
on interruption (SIGTERM or Ctrl-C during ``fit``) and when a data error (a corrupt image)
ends ``fit`` mid-epoch.

* :class:`LastCheckpoint` keeps ``<run>/checkpoints/last.ckpt`` current. (Since Lightning 2.6 a
  ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when a top-k
  checkpoint is saved, i.e. when the metric improves, so it is usually *not* the last epoch.)

* SIGTERM (cluster pre-emption, ``kill``) or a first Ctrl-C: the batch in progress finishes
  (on every process under DDP), :class:`~hug_lightning.interrupt.InterruptCheckpoint` writes
  ``last.ckpt`` and the run stops; a second Ctrl-C aborts at once (see
  :mod:`hug_lightning.interrupt`).
* A data error (:class:`~hug_lightning.data.base.BadDataError`, e.g. a corrupt image met by
  a DataLoader worker) between two training batches of a single-process fit: ``last.ckpt`` at
  the last batch trained, and the error's message says so (see
  :mod:`hug_lightning.data_error_save`: not under DDP, where the save could hang).
* With ``StochasticWeightAveraging`` on a model without BatchNorm (the UFM), ``last.ckpt`` is
  written again at the end of the fit, with the averaged weights Lightning copies in then.
* ``hug-lightning fit --config <same config> --ckpt_path last`` resumes the newest
  ``last.ckpt`` of that experiment in its own log folder (see :func:`find_last_checkpoint`).

Checkpoints are written at a batch boundary, so a resumed run continues exactly where the
interrupted one stopped (the data order and augmentations are keyed by seed, epoch and index).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from hug_lightning.data_error_save import save_after_data_error
from hug_lightning.interrupt import InterruptCheckpoint
from hug_lightning.recorded_best import recorded_best_checkpoint  # which "best" (re-exported)
from hug_lightning.slurm_requeue import epoch_ends

__all__ = ["AtomicCheckpointIO", "InterruptCheckpoint", "LastCheckpoint",
           "find_last_checkpoint", "recorded_best_checkpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic for local files on any file system.

    The checkpoint goes to ``.<name>.part`` in the target's own folder, is flushed to disk,
    then renamed over the target (``os.replace``): a kill at any moment leaves the previous
    file or the new one, never a truncated one. Lightning's own save writes its temporary file
    in ``$TMPDIR`` and moves it, which is a copy when the logs are on another file system
    (node-local ``/tmp``, logs on NFS/Lustre): a kill during that copy truncated ``last.ckpt``
    with the previous one already gone. Remote paths (``s3://`` ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(fs._strip_protocol(str(path)))
        target.parent.mkdir(parents=True, exist_ok=True)
        # one writer: the global rank 0. Lightning takes any file whose name holds "hpc_ckpt_"
        # for an HPC checkpoint (its number: the name's digits), so a part left by a kill
        # (.hpc_ckpt_2.ckpt.part) made a SLURM restart look for a missing hpc_ckpt_2.ckpt
        part = target.with_name(f".{target.name}.part".replace("hpc_ckpt_", "hpc-ckpt-"))
        try:
            with open(part, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, target)
        except BaseException:
            part.unlink(missing_ok=True)
            raise


def use_atomic_checkpoint_io(trainer: Trainer) -> None:
    """Make the trainer's checkpoint writes atomic (:class:`AtomicCheckpointIO`), unless the
    user configured a writer of their own (only Lightning's default one is replaced)."""
    strategy = trainer.strategy
    io = getattr(strategy, "_checkpoint_io", None)
    if io is None or type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is None:  # AsyncCheckpointIO
        io.checkpoint_io = AtomicCheckpointIO()  # its base writer (Lightning's default otherwise)


class LastCheckpoint(ModelCheckpoint):
    """Keep ``last.ckpt``: at every epoch end, optionally every N steps, and on a data error.

    The file is overwritten each time. A data error that ends a single-process ``fit`` between
    two training batches writes it too (see :mod:`hug_lightning.data_error_save`).

    Args:
        every_n_train_steps: Also save every this many optimizer steps (0: epoch ends only),
            except at an epoch's last batch (a resume from there skipped the epoch's end:
            :mod:`hug_lightning.epoch_end_restart`). Epoch ends and the end of training are
            saved as well, so the file always ends with the final weights.
        every_n_epochs: Save every this many epochs (when ``every_n_train_steps`` is 0).
        enabled: Keep ``last.ckpt`` at all.
    """

    def __init__(self, every_n_train_steps: int = 0, every_n_epochs: int = 1,
                 enabled: bool = True) -> None:
        super().__init__(filename="last", monitor=None, save_top_k=1 if enabled else 0,
                         save_last=False, every_n_train_steps=every_n_train_steps or None,
                         every_n_epochs=0 if every_n_train_steps else every_n_epochs,
                         enable_version_counter=False,
                         # after the epoch's last hooks, also in epochs without validation
                         save_on_train_epoch_end=True)
        self.trained_this_fit = False  # a training batch completed in this fit

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_atomic_checkpoint_io(trainer)  # every checkpoint of the run, best ones included
        self.trained_this_fit = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # not the step save at an epoch's last batch: Lightning resumes such a file as a done
        # epoch and skips its end (hug_lightning.epoch_end_restart); the epoch-end save follows
        if not (self._every_n_train_steps and epoch_ends(trainer)):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.trained_this_fit = True
        # a max_steps stop inside an epoch: save here, where a resume continues that epoch (at
        # the epoch-end hooks the epoch is already marked done, and a resume would skip its
        # rest); the epoch-end save then sees this step saved and is skipped
        if self._max_steps_stop_inside_epoch(trainer) \
                and self._last_global_step_saved != trainer.global_step:
            self._save_now(trainer)

    @staticmethod
    def _max_steps_stop_inside_epoch(trainer: Trainer) -> bool:
        """``fit`` has reached ``max_steps`` before the last batch of its epoch."""
        progress = trainer.fit_loop.epoch_loop.batch_progress
        inside = (not progress.is_last_batch
                  and progress.current.ready < trainer.num_training_batches)
        return (trainer.state.fn == TrainerFn.FITTING and 0 < trainer.max_steps
                and trainer.max_steps <= trainer.global_step and inside)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # a validation at that max_steps stop (val_check_interval) runs after the save above:
        # save again, still resumable inside the epoch, so that last.ckpt records what it
        # changed (the best checkpoint `--ckpt_path best` and the grid runner read from it:
        # the `checkpoint` group's ModelCheckpoint, which the CLI puts before this one)
        if not trainer.sanity_checking and self._max_steps_stop_inside_epoch(trainer):
            self._save_now(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        save_after_data_error(self, trainer, exception)

    def _save_now(self, trainer: Trainer) -> None:
        """``last.ckpt`` at this point (Lightning's own ModelCheckpoint takes either step or
        epoch triggers, not both; every rank calls this, as ``save_checkpoint`` requires).
        Nothing under ``fast_dev_run``, which disables checkpointing (its folder is then the
        working directory)."""
        if not self.save_top_k or self.dirpath is None or trainer.sanity_checking \
                or trainer.fast_dev_run:
            return
        path = Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self._last_global_step_saved = trainer.global_step

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_epoch_end_in_step_mode(trainer)
        for callback in trainer.callbacks:  # SLURM's requeue save after an epoch's validation:
            if isinstance(callback, InterruptCheckpoint):  # after the best-model decision on it
                callback.after_checkpoints(trainer)

    def _save_epoch_end_in_step_mode(self, trainer: Trainer) -> None:
        if not self._every_n_train_steps:
            return
        # step mode: the epoch end as well, even when the step trigger saved this global step
        # (the epoch's validation and NC values came after that save), except at a max_steps
        # stop inside the epoch, where that step save is the state to resume from
        loop = getattr(trainer.fit_loop, "epoch_loop", None)
        complete = getattr(getattr(loop, "batch_progress", None), "is_last_batch", True)
        if complete or self._last_global_step_saved != trainer.global_step:
            self._save_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._every_n_train_steps and self._last_global_step_saved != trainer.global_step:
            self._save_now(trainer)  # the final weights (the last step may not be a multiple)
        elif swa_copied_at_train_end(trainer):
            self._save_now(trainer)  # the averaged weights, not the last epoch's


def swa_copied_at_train_end(trainer: Trainer) -> bool:
    """``StochasticWeightAveraging`` has copied its averaged weights into the model in its
    ``on_train_end`` (this callback's runs after it: Lightning puts checkpoint callbacks last),
    after the last epoch's checkpoints: its own condition, for a fit that ran to its last
    epoch. Not after the extra epoch it adds to a model with BatchNorm (the average is copied at
    its start, to recompute the BatchNorm statistics, and its checkpoints hold it)."""
    for swa in trainer.callbacks:
        if not isinstance(swa, StochasticWeightAveraging) or swa._average_model is None \
                or swa._model_contains_batch_norm is None:  # its on_fit_start did not run
            continue
        last = trainer.current_epoch - 1
        if swa._model_contains_batch_norm and swa._max_epochs != -1 and last == swa.swa_end + 1:
            return False
        return last == swa.swa_end or swa._max_epochs == -1
    return False


def find_last_checkpoint(save_dir: str | Path, name: str,
                         filename: str = "last.ckpt") -> Path | None:
    """Newest ``<save_dir>/<name>/*/checkpoints/<filename>`` (by modification time), or None;
    ``filename`` may be a pattern (``*.ckpt``: the newest checkpoint of any name)."""
    candidates = list(Path(save_dir, name).glob(f"*/checkpoints/{filename}"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
