"""Stop ``fit`` cleanly on SIGTERM or Ctrl-C, in one process or under DDP, and save ``last.ckpt``.

A signal reaches the processes of a DDP job at different moments, or only one of them (``kill``
on the main process, a scheduler signalling one task). If each process stopped where its own
signal landed, they would leave the training loop at different batches, and the checkpoint save
that follows, which is collective (a barrier, the module's and the NC monitor's reductions),
would hang. Lightning 2.6's own SIGTERM handler has this problem: it issues a broadcast from
inside the signal handler, wherever the process happens to be.

So the signal handlers here only record the request. Once per training batch,
:class:`AgreedStop` shares it between the processes, and every process stops after the same
batch:

* one process: the request is acted on after the batch in progress;
* several processes: each one's request goes into an all-reduce (max) on a CPU (gloo) group,
  started without waiting at the end of batch *i* and read at the end of batch *i + 1*, so the
  step never waits for the GPU or for the other processes. Every process stops after batch
  *i + 1*, whichever of them got the signal.

Then Lightning raises ``SIGTERMException`` on every process at that batch boundary,
:class:`InterruptCheckpoint` writes ``last.ckpt`` (all processes together) and the command exits
with status 143 (SIGTERM) or 130 (Ctrl-C). A second Ctrl-C aborts at once without saving.
SLURM's requeue signal (SIGUSR1, Lightning's auto-requeue) is agreed the same way: Lightning's
requeue (``hpc_ckpt_<n>.ckpt`` in the root folder, ``scontrol requeue``) runs on every process
at the same point, once per fit, and training goes on (Lightning ran it inside the signal
handler: a collective save wherever each process was, which hung the run). That point is the end
of the first agreed batch that closes a gradient accumulation window (the checkpoint holds no
partial gradients), or, when a validation follows that batch, the end of that validation (a
restart from a checkpoint written before it skips it), after every callback's (the best-model
decision on it is in the save), and for the epoch's own validation the epoch's end, after
``LastCheckpoint``'s (ModelCheckpoint decides there); a validation of 0 batches (Lightning skips
it) counts as none; when that batch is its epoch's last and no
validation follows, the same point among the next epoch's batches (Lightning's restart from a
checkpoint written after an epoch's last batch skips that epoch's end hooks: training accuracy,
plateau step), so a run restored from it is the same run; except with epochs of one batch and
no validation, where the save after the next epoch's batch still skips that epoch's end.
``scontrol requeue`` follows the save once training goes on (the next epoch's or batch's start,
or a SIGTERM stop); a fit that ends at that point (its last batch, ``max_steps``, an early stop)
is not requeued and the hpc checkpoint is removed, as if no signal had come.
A request that arrives during validation is acted on at the next training batch; if the
stopping batch is followed by a validation (the epoch's last batch, or a ``val_check_interval``
one), that validation runs to its end first, so no epoch loses its ``val/*`` values or its
best-checkpoint decision. A request after the last training batch lets the fit finish normally.
In ``validate``, ``test`` and ``predict``, SIGUSR1 requeues without a checkpoint
(:mod:`hug_lightning.slurm_requeue` says why).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hug_lightning.agreed_stop import AgreedStop
from hug_lightning.slurm_requeue import (accumulating, epoch_ends, requeue_job,
                                         save_hpc_checkpoint, validation_follows)

__all__ = ["AgreedStop", "InterruptCheckpoint"]

#: "SIGINT" or "SIGTERM" after an interrupted fit in this process (for the exit status)
LAST_INTERRUPT: str | None = None


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while the agreement runs."""


class InterruptCheckpoint(Callback):
    """Write ``<checkpoint dir>/last.ckpt`` when ``fit`` is interrupted by SIGTERM or Ctrl-C.

    The stop happens at a training-batch boundary agreed by all processes (see the module
    docstring), so it also works under DDP, whichever process gets the signal. This callback
    takes over Lightning's SIGTERM handler during ``fit``, and runs Lightning's SLURM requeue
    (SIGUSR1) at an agreed batch boundary instead of inside the signal handler (outside
    ``fit``: a requeue without a checkpoint).

    Args:
        enabled: Save on interruption (and turn the first Ctrl-C into a graceful stop).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.interrupted_by: str | None = None  # "SIGINT" or "SIGTERM" once the stop is agreed
        self.stop = AgreedStop()
        self._previous_sigint: Any = None
        self._trainer: Trainer | None = None
        self._connector: Any = None
        self._epoch_loop: Any = None
        self._aborted = False
        self._stopping = False  # received_sigterm set: Lightning raises after this batch
        self._saving = False  # the interrupt save is being written
        self._waits_for_validation = 0
        self._requeue_fn: Any = None  # Lightning's SLURM requeue (save hpc_ckpt, scontrol)
        self._requeued = False  # once per fit: SLURM signals each task, maybe batches apart
        # agreed, waiting: "batch", "next_epoch", "validation", "epoch_end"
        self._requeue_at: str | None = None
        self._hpc_saved: str | None = None  # written; scontrol once training goes on past it
        self._strategy: Any = None  # its on_validation_end runs the save after a validation

    # -- signal handlers: record only ------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        if self._trainer is None:  # not installed outside fit; as the default handlers
            raise KeyboardInterrupt if name == "SIGINT" else SystemExit(128 + signum)
        if self._saving:  # a second signal must not cut the save it asked for
            rank_zero_info(f"{name} ignored: writing last.ckpt, wait for it to finish.")
            return
        if name == "SIGINT" and self.stop.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._aborted = True  # the second press: stop now, save nothing
            raise KeyboardInterrupt
        if not self.stop.requested:
            rank_zero_info(f"\n{'Ctrl-C' if name == 'SIGINT' else 'SIGTERM'}: stopping after "
                           "this training batch and saving last.ckpt"
                           + (" (press Ctrl-C again to abort without saving)."
                              if name == "SIGINT" else "."))
        self.stop.request(name)

    def _on_requeue_signal(self, signum: Any, frame: Any) -> None:
        if self._trainer is not None and not self._requeued and not self._saving:
            self.stop.request_requeue()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # validate, test, predict: SLURM's requeue without Lightning's checkpoint (see
        # hug_lightning.slurm_requeue); set before Lightning registers its handlers
        connector = getattr(trainer, "_signal_connector", None)
        if self.enabled and stage != "fit" and connector is not None \
                and hasattr(connector, "_slurm_sigusr_handler_fn"):
            self._connector = connector
            connector._slurm_sigusr_handler_fn = lambda signum, frame: requeue_job(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            self._restore()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        self.stop, self.interrupted_by, self._aborted = AgreedStop(), None, False  # a new fit
        self._stopping, self._saving, self._waits_for_validation = False, False, 0
        self._requeued, self._requeue_at, self._hpc_saved = False, None, None
        self._trainer = trainer
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_signal)
        # Lightning registers its SIGTERM handler after on_fit_start, built from this method
        # (which broadcasts from inside the handler): ours records the request instead
        self._connector = getattr(trainer, "_signal_connector", None)
        if self._connector is not None:
            self._connector._sigterm_notifier_fn = self._on_signal
            # its SLURM requeue handler too, which saves (collective) inside the handler
            self._requeue_fn = getattr(self._connector, "_slurm_sigusr_handler_fn", None)
            if self._requeue_fn is not None:
                self._connector._slurm_sigusr_handler_fn = self._on_requeue_signal

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._trainer is None:
            return
        handler = signal.getsignal(signal.SIGTERM)
        if self._on_signal not in getattr(handler, "signal_handlers", [handler]):
            signal.signal(signal.SIGTERM, self._on_signal)  # another Lightning version
        # Lightning 2.6 also broadcasts rank 0's flag and reads it back with .item() at every
        # step under DDP (a host-device sync per step with NCCL); the agreement replaces it
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _no_broadcast
            self._epoch_loop = loop
        # the save after a validation: after every callback's on_validation_end (the checkpoint
        # callbacks run last: the best-model decision for that validation is in the save) and
        # the module's; the strategy's hook comes after both
        strategy = getattr(trainer, "strategy", None)
        if self._requeue_fn is not None and callable(getattr(strategy, "on_validation_end", None)):
            own = strategy.on_validation_end

            def on_validation_end() -> None:
                own()
                self._after_validation(trainer)

            strategy.on_validation_end = on_validation_end
            self._strategy = strategy
        self.stop.start()

    # a saved hpc checkpoint is followed by scontrol once training goes on (a fit that ends
    # there, at max_epochs, max_steps or an early stop, is not requeued: see on_train_end)
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._requeue_at in ("validation", "epoch_end"):  # skipped (no batches), or no
            self._requeue_at = "next_epoch"  # LastCheckpoint hook: the same point, next epoch
        self._requeue_if_saved(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._requeue_if_saved(trainer)

    def _requeue_if_saved(self, trainer: Trainer) -> None:
        if self._hpc_saved is not None:
            saved, self._hpc_saved = self._hpc_saved, None
            requeue_job(trainer, saved)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._trainer is None:
            return
        agreed = self.stop.step()
        if self.stop.requeue and not self._requeued and self._requeue_fn is not None:
            self._requeued = True  # once: the requeue is acted on at a resumable boundary
            self._requeue_at = "batch"
        elif self._requeue_at == "validation":  # the mid-epoch one had no batches: skipped
            self._requeue_at = "batch"
        if self._requeue_at in ("batch", "next_epoch") and not accumulating(trainer):
            if validation_follows(trainer):
                self._requeue_at = "validation"  # saved after it: a resume would skip it
            elif self._requeue_at == "batch" and epoch_ends(trainer):
                # a restore from here skips the epoch's end hooks (train/acc, the plateau
                # step, ...): the next epoch's batches instead, once (see the module docstring)
                self._requeue_at = "next_epoch"
            else:
                self._requeue_now()
        if agreed and not self.interrupted_by:
            self.interrupted_by = agreed
            if not self.stop.requested:  # another process got the signal
                rank_zero_info(f"\n{agreed} received by another process: stopping at the "
                               "next batch boundary and saving last.ckpt.")
        if self.interrupted_by and not self._stopping and self._resumable_stop(trainer):
            self._stopping = True
            # Lightning raises SIGTERMException at the end of this batch (on every process)
            trainer._signal_connector.received_sigterm = True

    def _resumable_stop(self, trainer: Trainer) -> bool:
        """Whether a stop after this batch resumes exactly (the same answer on every process:
        it depends on the batch index and the run's settings only). Not inside a gradient
        accumulation window (its gradients are not in checkpoints), not before a mid-epoch
        validation (Lightning's restart would shift later validations by a batch; the stop
        waits one batch, once), and not after the fit's last batch (the fit just finishes)."""
        try:
            loop = trainer.fit_loop.epoch_loop
            if loop._should_accumulate():
                return False
            last = loop.batch_progress.is_last_batch
            if (not last and self._waits_for_validation == 0
                    and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)):
                self._waits_for_validation += 1
                return False
        except AttributeError:  # another Lightning version: stop here
            return True
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        return not ((trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps)
                    or (last and max_epochs is not None
                        and trainer.current_epoch + 1 >= max_epochs))

    # Lightning's validation loop raises at its next batch once received_sigterm is set, which
    # would lose the epoch-end validation that follows the stopping batch: the flag is held
    # while that validation runs to its end.
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stopping and self._trainer is not None:
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._strategy is None:  # not hooked after the checkpoint callbacks: here
            self._after_validation(trainer)
        if self._stopping and self._trainer is not None:
            trainer._signal_connector.received_sigterm = True  # raised after this validation

    def _after_validation(self, trainer: Trainer) -> None:
        if self._requeue_at == "validation" and not trainer.sanity_checking:
            if epoch_ends(trainer) and _last_checkpoint_hook(trainer):
                # the epoch's: ModelCheckpoint decides on it at the epoch's end (Lightning's
                # default with a validation every epoch), so the save follows that decision,
                # where last.ckpt is written (resumed exactly)
                self._requeue_at = "epoch_end"
            else:
                self._requeue_now()

    def after_checkpoints(self, trainer: Trainer) -> None:
        """The save waiting for the epoch's end: called by :class:`LastCheckpoint` at its epoch
        end, after every other checkpoint callback's (it is the last one)."""
        if self._requeue_at == "epoch_end" and self._trainer is not None:
            self._requeue_now()

    def _requeue_now(self) -> None:
        """Lightning's requeue save (every process at the same point: it is collective); its
        ``scontrol requeue`` follows when training goes on."""
        self._requeue_at = None
        if self._requeue_fn is not None and self._trainer is not None:
            self._hpc_saved = save_hpc_checkpoint(self._trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop.finish()
        if self._hpc_saved is not None:  # the fit ended at that point: as without the signal
            saved, self._hpc_saved = Path(self._hpc_saved), None
            if trainer.is_global_zero:  # its only writer
                saved.unlink(missing_ok=True)
            rank_zero_info(f"Auto-requeue signal at the fit's end: not requeued, {saved.name} "
                           "removed (the fit is done; last.ckpt holds it).")

    def _restore(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._connector is not None and "_sigterm_notifier_fn" in vars(self._connector):
            del self._connector._sigterm_notifier_fn  # Lightning's own again (validate, test)
        if self._connector is not None and "_slurm_sigusr_handler_fn" in vars(self._connector):
            del self._connector._slurm_sigusr_handler_fn
        if self._epoch_loop is not None and "_broadcast_sigterm_tensor" in vars(self._epoch_loop):
            del self._epoch_loop._broadcast_sigterm_tensor
        if self._strategy is not None and "on_validation_end" in vars(self._strategy):
            del self._strategy.on_validation_end
        self._connector = self._trainer = self._epoch_loop = self._requeue_fn = None
        self._strategy = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        try:
            if isinstance(exception, SIGTERMException):  # stopped, not done: requeue as asked
                self._requeue_if_saved(trainer)
            if self.enabled and isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
                self._saving = True  # the handlers stay ours until the save is written
                self._save_on_interrupt(trainer, exception)
        finally:
            self._saving = False
            self._restore()

    def _save_on_interrupt(self, trainer: Trainer, exception: BaseException) -> None:
        global LAST_INTERRUPT
        self.interrupted_by = self.interrupted_by or (
            "SIGTERM" if isinstance(exception, SIGTERMException) else "SIGINT")
        LAST_INTERRUPT = self.interrupted_by
        if self._aborted:  # the batch in progress may be half done: no save (exit status 1)
            rank_zero_info("Aborted by a second Ctrl-C: nothing saved; --ckpt_path last resumes "
                           "from the last periodic save.")
            return
        step_log = getattr(trainer.lightning_module, "step_log", None)
        if step_log is not None:  # step values still on their way from the device: they are
            step_log.flush(trainer)  # logged, as at the end of a fit (the run resumes after)
        self.stop.finish()
        if trainer.state.fn != "fit" or trainer.checkpoint_callback is None \
                or trainer.fast_dev_run:  # checkpointing is off in a fast_dev_run
            return
        dirpath = _last_folder(trainer)
        if dirpath is None:
            return
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)  # every process: the save is collective
        rank_zero_info(f"Interrupted at epoch {trainer.current_epoch}, step "
                       f"{trainer.global_step}: saved {path}. Resume with --ckpt_path last.")


def _last_checkpoint_hook(trainer: Trainer) -> bool:
    """Whether the trainer's last checkpoint callback is a ``LastCheckpoint`` (which calls
    :meth:`InterruptCheckpoint.after_checkpoints` at the epoch's end)."""
    from hug_lightning.checkpointing import LastCheckpoint  # which imports this module

    return bool(trainer.checkpoint_callbacks) \
        and isinstance(trainer.checkpoint_callbacks[-1], LastCheckpoint)


def _last_folder(trainer: Trainer) -> str | None:
    """The folder of ``last.ckpt``: the ``LastCheckpoint``'s (its epoch saves are there and
    ``--ckpt_path last`` looks there), else that of the trainer's first checkpoint callback
    (``trainer.checkpoint_callback``, which can be another one: ``--checkpoint.dirpath``)."""
    from hug_lightning.checkpointing import LastCheckpoint  # which imports this module

    last = [c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)]
    return (last or [trainer.checkpoint_callback])[0].dirpath
