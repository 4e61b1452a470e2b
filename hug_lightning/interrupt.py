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
SLURM's requeue signal (SIGUSR1, Lightning's auto-requeue) is agreed the same way, and its
save runs on every process at the same point, once per fit (where and when:
:mod:`hug_lightning.slurm_requeue`, whose :class:`~hug_lightning.slurm_requeue.RequeueSchedule`
this callback owns).
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
from hug_lightning.slurm_requeue import RequeueSchedule, requeue_job

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
        self.requeue_schedule = RequeueSchedule()  # SLURM's requeue save and its scontrol, in fit

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
        if self._trainer is not None and not self.requeue_schedule.agreed and not self._saving:
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
        self._trainer = trainer
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_signal)
        # Lightning registers its SIGTERM handler after on_fit_start, built from this method
        # (which broadcasts from inside the handler): ours records the request instead
        self._connector = getattr(trainer, "_signal_connector", None)
        # its SLURM requeue handler too, which saves (collective) inside the handler
        handler = getattr(self._connector, "_slurm_sigusr_handler_fn", None)
        self.requeue_schedule.start(trainer, handler)
        if self._connector is not None:
            self._connector._sigterm_notifier_fn = self._on_signal
            if self.requeue_schedule.handler is not None:
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
        self.requeue_schedule.hook_validation_end(trainer)  # the save after a validation
        self.stop.start()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requeue_schedule.epoch_start(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.requeue_schedule.requeue_if_saved(trainer)  # training goes on past the save: scontrol

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._trainer is None:
            return
        agreed = self.stop.step()
        self.requeue_schedule.after_batch(trainer, self.stop.requeue)
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
        self.requeue_schedule.validation_end(trainer)
        if self._stopping and self._trainer is not None:
            trainer._signal_connector.received_sigterm = True  # raised after this validation

    def after_checkpoints(self, trainer: Trainer) -> None:
        """The requeue save waiting for the epoch's end: called by :class:`LastCheckpoint` at its
        epoch end, after every other checkpoint callback's (it is the last one).

        Args:
            trainer: The trainer.
        """
        self.requeue_schedule.after_checkpoints()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop.finish()
        self.requeue_schedule.train_end(trainer)  # ended at the save point: no requeue

    def _restore(self) -> None:
        originals = getattr(self._connector, "_original_handlers", None)
        if isinstance(originals, dict) and originals.get(signal.SIGINT) == self._on_signal:
            # a fit ended by an exception: Lightning's teardown, after on_exception, puts back
            # the handlers it found after on_fit_start (ours): the previous one instead
            originals[signal.SIGINT] = self._previous_sigint
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._connector is not None and "_sigterm_notifier_fn" in vars(self._connector):
            del self._connector._sigterm_notifier_fn  # Lightning's own again (validate, test)
        if self._connector is not None and "_slurm_sigusr_handler_fn" in vars(self._connector):
            del self._connector._slurm_sigusr_handler_fn
        if self._epoch_loop is not None and "_broadcast_sigterm_tensor" in vars(self._epoch_loop):
            del self._epoch_loop._broadcast_sigterm_tensor
        self.requeue_schedule.detach()
        self._connector = self._trainer = self._epoch_loop = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        try:
            if isinstance(exception, SIGTERMException):  # stopped, not done: requeue as asked
                self.requeue_schedule.requeue_if_saved(trainer)
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


def _last_folder(trainer: Trainer) -> str | None:
    """The folder of ``last.ckpt``: the ``LastCheckpoint``'s (its epoch saves are there and
    ``--ckpt_path last`` looks there), else that of the trainer's first checkpoint callback
    (``trainer.checkpoint_callback``, which can be another one: ``--checkpoint.dirpath``)."""
    from hug_lightning.checkpointing import LastCheckpoint  # which imports this module

    last = [c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)]
    return (last or [trainer.checkpoint_callback])[0].dirpath
