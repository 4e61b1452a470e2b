"""``last.ckpt`` when a data error ends ``fit``: a corrupt image met mid-epoch loses no work.

A :class:`~hug_lightning.data.base.BadDataError` (a
:class:`~hug_lightning.data.folders.CorruptImageError` of an image decoded per sample, also as
re-raised by a DataLoader worker, which keeps its class) raised while the next training batch
is fetched stops ``fit`` between two batches. The fit loop's counters then say what was
trained: every batch it counts completed, none after it. A loader that reads ahead may fail on
a later batch than the next one; that changes nothing, the counters are what is saved and a
resume starts at the first batch they do not count
(:class:`~hug_lightning.data.loading.ResumableDataLoader`).
:class:`~hug_lightning.checkpointing.LastCheckpoint` then writes ``last.ckpt``: the same state
as a SIGTERM stop after that batch (:mod:`hug_lightning.interrupt`), so replacing the file and
running ``fit --ckpt_path last`` ends with the weights of a run that never met the error. The
error's message says where the file is and how to resume, or why nothing was saved:

* one process only: under DDP the other processes may be inside the next batch's gradient
  all-reduce, or gone, and the save is collective (it would hang). Resume from the last
  periodic save (``last.ckpt`` every epoch, ``--last.every_n_train_steps N``);
* at a batch boundary of the training loop only (not in a validation, a sanity check, the
  setup or inside a training step), after the end of a gradient-accumulation window (its
  gradients are not in checkpoints) and not right after a mid-epoch validation (Lightning's
  restart would shift the later logged steps by one);
* at the first batch of an epoch the epoch-end save is that state: it is named when it is
  current (``--last.every_n_epochs 1``, the default), nothing is written;
* nothing when this fit trained no batch (the checkpoint it resumed from still holds it all).

Other exceptions (a NaN loss, a bug in user code) save nothing: the state they leave is not
known to be consistent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from hug_lightning.data.base import BadDataError

RESUME = ("to go on exactly where this run stopped, replace the file (deleting it would change "
          "the data set, hence the order of the epoch's other images) and run the same fit "
          "command with --ckpt_path last; or add --data.init_args.on_corrupt skip to it to go "
          "on without that image.")


def unresumable(trainer: Trainer) -> str | None:
    """Why ``last.ckpt`` written now, after an error, would not resume exactly (None: it
    would; at an epoch's first batch, see :func:`save_after_data_error`)."""
    if trainer.world_size > 1:
        return ("under DDP the other processes may still be training (a save is collective "
                "and would hang), so only single-process runs save on a data error")
    if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
        return "the error came outside the training batches"
    try:
        loop = trainer.fit_loop.epoch_loop
        now = loop.batch_progress.current
        if not now.ready == now.started == now.processed == now.completed:
            return "the error came inside a training batch (half done)"
        if now.completed == 0:
            return None
        if loop._should_accumulate():
            return ("the last batch trained is inside a gradient-accumulation window (its "
                    "gradients are not in checkpoints)")
        if loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return ("a mid-epoch validation followed the last batch trained (a restart there "
                    "would shift the later logged steps)")
    except AttributeError:  # another Lightning version: not known to resume exactly
        return "this Lightning version's fit loop is not the one this save was checked with"
    return None


def save_after_data_error(callback: Any, trainer: Trainer, exception: BaseException) -> None:
    """Write ``last.ckpt`` after a data error that ends ``fit`` when a resume from it is exact,
    and add to the error's message where it is and how to resume, or why nothing was saved.

    Args:
        callback: The :class:`~hug_lightning.checkpointing.LastCheckpoint` (its folder, its
            ``trained_this_fit`` flag and its save).
        trainer: The trainer whose ``fit`` raised.
        exception: The exception; only a :class:`BadDataError` is acted on.
    """
    if not isinstance(exception, BadDataError) or not callback.trained_this_fit \
            or not callback.save_top_k or callback.dirpath is None \
            or getattr(trainer, "fast_dev_run", False):
        return  # another error, or nothing trained by this fit: the message stays as it is
    path = Path(callback.dirpath) / f"{callback.filename}{callback.FILE_EXTENSION}"
    reason = unresumable(trainer)
    epoch, step = trainer.current_epoch, trainer.global_step
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed if reason is None else 0
    note = None
    if reason is None and done == 0:  # the epoch's first batch: the epoch-end save holds it all
        if callback._last_global_step_saved == step and path.is_file():
            note = f"{path} (saved at the end of epoch {epoch - 1}, step {step}) holds every " \
                   "batch trained: "
        else:
            reason = "no batch of this epoch was trained and the epoch's start was not saved"
    elif reason is None:
        try:
            step_log = getattr(trainer.lightning_module, "step_log", None)
            if step_log is not None:  # values still on their way from the device: logged
                step_log.flush(trainer)
            callback._save_now(trainer)
            note = f"Saved {path} after {done} training batch(es) of epoch {epoch} (step {step}): "
        except Exception as err:  # the data error stays the error raised
            reason = f"writing it failed ({type(err).__name__}: {err})"
    text = (note + RESUME if note else f"Nothing saved to {path}: {reason}; --ckpt_path last "
            "resumes from the last periodic save.")
    if exception.args and isinstance(exception.args[0], str):
        exception.args = (f"{exception.args[0].rstrip()} {text}", *exception.args[1:])
    else:
        exception.add_note(text)
