"""SLURM's auto-requeue (SIGUSR1): where and when a ``fit`` writes its ``hpc_ckpt_<n>.ckpt``
(:class:`RequeueSchedule`), and the requeue outside ``fit``, which writes none.

In ``fit``, :class:`~hug_lightning.interrupt.InterruptCheckpoint` takes the signal over and
agrees it between the processes like a stop (:class:`~hug_lightning.agreed_stop.AgreedStop`), so
Lightning's requeue (``hpc_ckpt_<n>.ckpt`` in the root folder, ``scontrol requeue``) runs on
every process at the same point, once per fit, and training goes on (Lightning ran it inside the
signal handler: a collective save wherever each process was, which hung the run). That point is
the end of the first agreed batch that closes a gradient accumulation window (the checkpoint
holds no partial gradients), or, when a validation follows that batch, the end of that
validation (a restart from a checkpoint written before it skips it), after every callback's (the
best-model decision on it is in the save), and for the epoch's own validation the epoch's end,
after ``LastCheckpoint``'s (ModelCheckpoint decides there); a validation of 0 batches (Lightning
skips it) counts as none; when that batch is its epoch's last and no validation follows, the
same point among the next epoch's batches (Lightning's restart from a checkpoint written after an
epoch's last batch skips that epoch's end hooks: training accuracy, plateau step), so a run
restored from it is the same run; except with epochs of one batch and no validation, where the
save after the next epoch's batch still skips that epoch's end. ``scontrol requeue`` follows the
save once training goes on (the next epoch's or batch's start, or a SIGTERM stop); a fit that
ends at that point (its last batch, ``max_steps``, an early stop) is not requeued and the hpc
checkpoint is removed, as if no signal had come.

Outside ``fit``, Lightning's handler saves ``hpc_ckpt_<n>.ckpt`` in the working folder and runs
``scontrol requeue`` in ``validate``, ``test`` and ``predict`` too. That checkpoint holds the
evaluated weights at global step 0 with no optimizer state, and Lightning restores the newest
one by itself in every later ``fit`` (or evaluation) under SLURM started in that folder without
``--ckpt_path``: a new experiment silently started from trained weights, with fresh optimizers.
Its save is also collective (a barrier), made inside the signal handler wherever each process
was, which can hang a multi-process evaluation. An evaluation has nothing to resume (the
requeued job runs it again from its start), so outside ``fit`` the requeue is asked without a
checkpoint (:func:`requeue_job`).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def accumulating(trainer: Trainer) -> bool:
    """Whether this training batch is inside a gradient accumulation window (its gradients are in
    no checkpoint). False with another Lightning version."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return bool(getattr(loop, "_should_accumulate", lambda: False)())


def validation_follows(trainer: Trainer) -> bool:
    """Whether a validation runs after this training batch (mid-epoch or at the epoch's end):
    Lightning's restart from a checkpoint written before it skips it. False with another
    Lightning version, and for a validation known to have no batches (Lightning skips it, and
    ``on_validation_end`` with it); one not yet set up counts as following."""
    fit_loop = getattr(trainer, "fit_loop", None)
    try:
        val_loop = fit_loop.epoch_loop.val_loop
        if val_loop._combined_loader is not None and not val_loop._should_reload_val_dl \
                and val_loop.skip:  # 0 batches: Lightning skips it, with all its hooks
            return False
        return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))
    except AttributeError:
        return False


def epoch_ends(trainer: Trainer) -> bool:
    """Whether this training batch is its epoch's last: Lightning's restart from a checkpoint
    written after it counts the epoch as done and skips its end hooks. False with another
    Lightning version."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return bool(getattr(loop, "_num_ready_batches_reached", lambda: False)())


def save_hpc_checkpoint(trainer: Trainer) -> str:
    """Lightning's requeue save: its loggers finalized, then ``hpc_ckpt_<n>.ckpt`` in the root
    folder (collective: every process calls it at the same point). Returns its path."""
    for logger in trainer.loggers:  # as Lightning's handler: all metrics written
        logger.finalize("finished")
    path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
    trainer.save_checkpoint(path)
    return path


def requeue_job(trainer: Trainer, saved: str | None = None) -> None:
    """``scontrol requeue <job id>`` from the main process, as Lightning's handler does (safe in a
    signal handler: no collective). ``saved``: the hpc checkpoint written for it, if any."""
    if not trainer.is_global_zero:
        return
    fn = getattr(trainer.state.fn, "value", trainer.state.fn)
    rank_zero_info(f"Handling auto-requeue signal in {fn}: " + (
        f"requeuing after saving {saved}." if saved else
        "requeuing without a checkpoint (the requeued job runs it again from its start)."))
    array_job_id = os.getenv("SLURM_ARRAY_JOB_ID")
    job_id = (f"{array_job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job_id is not None
              else os.environ["SLURM_JOB_ID"])
    if not re.fullmatch("[0-9_-]+", job_id):
        rank_zero_warn(f"Not requeuing: unexpected SLURM job id {job_id!r}")
        return
    cmd = ["scontrol", "requeue", job_id]
    try:
        result = subprocess.call(cmd)
    except FileNotFoundError:  # as Lightning: once more through a shell
        result = subprocess.call(" ".join(cmd), shell=True)
    if result == 0:
        rank_zero_info(f"Requeued SLURM job: {job_id}")
    else:
        rank_zero_warn(f"Requeuing SLURM job {job_id} failed with error code {result}")


class RequeueSchedule:
    """The requeue save of one ``fit`` and its ``scontrol requeue``, at the points the module
    docstring gives.

    :class:`~hug_lightning.interrupt.InterruptCheckpoint` owns one and calls it from its hooks
    (every process, at the same points: the save is collective): :meth:`start` when the fit
    starts, :meth:`hook_validation_end` when training starts, :meth:`epoch_start`,
    :meth:`requeue_if_saved` at each training batch's start and on a SIGTERM stop,
    :meth:`after_batch` with the agreed request at each batch's end, :meth:`validation_end`,
    :meth:`after_checkpoints` (from ``LastCheckpoint``), :meth:`train_end` and :meth:`detach`
    when the fit ends.

    Attributes:
        handler: Lightning's SLURM requeue handler, taken over for this fit (None: no requeue
            save in it).
        agreed: Whether a requeue was agreed in this fit (acted on once per fit: SLURM signals
            each task, maybe batches apart).
        at: Where the agreed save waits: "batch", "next_epoch", "validation", "epoch_end"
            (None: it waits nowhere).
        saved: The hpc checkpoint written; ``scontrol requeue`` once training goes on past it.
    """

    def __init__(self) -> None:
        self.handler: Any = None
        self.agreed = False
        self.at: str | None = None
        self.saved: str | None = None
        self._trainer: Trainer | None = None
        self._strategy: Any = None  # its on_validation_end runs the save after a validation

    def start(self, trainer: Trainer, handler: Any) -> None:
        """A new fit; ``handler``: Lightning's requeue handler that it takes over, if any."""
        self.agreed, self.at, self.saved = False, None, None
        self._trainer, self.handler = trainer, handler

    def hook_validation_end(self, trainer: Trainer) -> None:
        """The save after a validation: after every callback's ``on_validation_end`` (the
        checkpoint callbacks run last: the best-model decision for that validation is in the
        save) and the module's; the strategy's hook comes after both."""
        strategy = getattr(trainer, "strategy", None)
        if self.handler is not None and callable(getattr(strategy, "on_validation_end", None)):
            own = strategy.on_validation_end

            def on_validation_end() -> None:
                own()
                self._after_validation(trainer)

            strategy.on_validation_end = on_validation_end
            self._strategy = strategy

    # a saved hpc checkpoint is followed by scontrol once training goes on (a fit that ends
    # there, at max_epochs, max_steps or an early stop, is not requeued: see train_end)
    def epoch_start(self, trainer: Trainer) -> None:
        """At a training epoch's start: a save still waiting moves to this epoch's batches."""
        if self.at in ("validation", "epoch_end"):  # skipped (no batches), or no
            self.at = "next_epoch"  # LastCheckpoint hook: the same point, next epoch
        self.requeue_if_saved(trainer)

    def requeue_if_saved(self, trainer: Trainer) -> None:
        """``scontrol requeue`` for the hpc checkpoint written, if any (training goes on)."""
        if self.saved is not None:
            saved, self.saved = self.saved, None
            requeue_job(trainer, saved)

    def after_batch(self, trainer: Trainer, requested: bool) -> None:
        """At a training batch's end; ``requested``: a requeue agreed at this batch."""
        if requested and not self.agreed and self.handler is not None:
            self.agreed = True  # once: the requeue is acted on at a resumable boundary
            self.at = "batch"
        elif self.at == "validation":  # the mid-epoch one had no batches: skipped
            self.at = "batch"
        if self.at in ("batch", "next_epoch") and not accumulating(trainer):
            if validation_follows(trainer):
                self.at = "validation"  # saved after it: a resume would skip it
            elif self.at == "batch" and epoch_ends(trainer):
                # a restore from here skips the epoch's end hooks (train/acc, the plateau
                # step, ...): the next epoch's batches instead, once (see the module docstring)
                self.at = "next_epoch"
            else:
                self._save()

    def validation_end(self, trainer: Trainer) -> None:
        """At the callbacks' ``on_validation_end``: the save after it, where the strategy's hook
        is not taken over (:meth:`hook_validation_end`)."""
        if self._strategy is None:  # not hooked after the checkpoint callbacks: here
            self._after_validation(trainer)

    def _after_validation(self, trainer: Trainer) -> None:
        if self.at == "validation" and not trainer.sanity_checking:
            if epoch_ends(trainer) and _last_checkpoint_hook(trainer):
                # the epoch's: ModelCheckpoint decides on it at the epoch's end (Lightning's
                # default with a validation every epoch), so the save follows that decision,
                # where last.ckpt is written (resumed exactly)
                self.at = "epoch_end"
            else:
                self._save()

    def after_checkpoints(self) -> None:
        """The save waiting for the epoch's end, after every checkpoint callback's."""
        if self.at == "epoch_end" and self._trainer is not None:
            self._save()

    def _save(self) -> None:
        """Lightning's requeue save (every process at the same point: it is collective); its
        ``scontrol requeue`` follows when training goes on."""
        self.at = None
        if self.handler is not None and self._trainer is not None:
            self.saved = save_hpc_checkpoint(self._trainer)

    def train_end(self, trainer: Trainer) -> None:
        """The fit ended at the save point: no requeue, its hpc checkpoint removed."""
        if self.saved is not None:  # the fit ended at that point: as without the signal
            saved, self.saved = Path(self.saved), None
            if trainer.is_global_zero:  # its only writer
                saved.unlink(missing_ok=True)
            rank_zero_info(f"Auto-requeue signal at the fit's end: not requeued, {saved.name} "
                           "removed (the fit is done; last.ckpt holds it).")

    def detach(self) -> None:
        """Give the strategy's ``on_validation_end`` back; no requeue save until :meth:`start`
        (nothing of this fit's left: a later fit that does not start it acts on none)."""
        if self._strategy is not None and "on_validation_end" in vars(self._strategy):
            del self._strategy.on_validation_end
        self.handler = self._trainer = self._strategy = None
        self.agreed, self.at, self.saved = False, None, None


def _last_checkpoint_hook(trainer: Trainer) -> bool:
    """Whether the trainer's last checkpoint callback is a ``LastCheckpoint`` (which calls
    :meth:`InterruptCheckpoint.after_checkpoints` at the epoch's end)."""
    from hug_lightning.checkpointing import LastCheckpoint  # imports this one (via interrupt)

    return bool(trainer.checkpoint_callbacks) \
        and isinstance(trainer.checkpoint_callbacks[-1], LastCheckpoint)
