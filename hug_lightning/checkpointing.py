"""Checkpoints you can resume from: ``last.ckpt`` every epoch (and on demand every N steps),
and on interruption (SIGTERM or Ctrl-C during ``fit``).

* :class:`LastCheckpoint` keeps ``<run>/checkpoints/last.ckpt`` current. (Since Lightning 2.6 a
  ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when a top-k
  checkpoint is saved, i.e. when the metric improves, so it is usually *not* the last epoch.)

* SIGTERM (cluster pre-emption, ``kill``): Lightning finishes the current batch and raises
  ``SIGTERMException``; :class:`InterruptCheckpoint` then writes ``last.ckpt``.
* Ctrl-C: the first press is turned into the same request (the batch in progress finishes, the
  checkpoint is written, the run stops); a second press aborts at once.
* ``hug-lightning fit --config <same config> --ckpt_path last`` resumes the newest
  ``last.ckpt`` of that experiment in its own log folder (see :func:`find_last_checkpoint`).

Checkpoints are written at a batch boundary, so a resumed run continues exactly where the
interrupted one stopped (the data order and augmentations are keyed by seed, epoch and index).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


#: "SIGINT" or "SIGTERM" after an interrupted fit in this process (for the exit status)
LAST_INTERRUPT: str | None = None


class LastCheckpoint(ModelCheckpoint):
    """Write ``last.ckpt`` (overwritten) at every epoch end and optionally every N steps.

    Args:
        every_n_train_steps: Also save every this many optimizer steps (0: epoch ends only).
            Epoch ends and the end of training are saved as well, so the file always ends
            with the final weights.
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

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def _save_now(self, trainer: Trainer) -> None:
        """``last.ckpt`` at this point (Lightning's own ModelCheckpoint takes either step or
        epoch triggers, not both; every rank calls this, as ``save_checkpoint`` requires)."""
        if not self.save_top_k or self.dirpath is None or trainer.sanity_checking:
            return
        if self._last_global_step_saved == trainer.global_step:
            return  # the step trigger just wrote this state
        path = Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self._last_global_step_saved = trainer.global_step

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._every_n_train_steps:  # step mode: the epoch end as well
            self._save_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._every_n_train_steps:  # the final weights (the last step may not be a multiple)
            self._save_now(trainer)


class InterruptCheckpoint(Callback):
    """Write ``<checkpoint dir>/last.ckpt`` when ``fit`` is interrupted by SIGTERM or Ctrl-C.

    Args:
        enabled: Save on interruption (and turn the first Ctrl-C into a graceful stop).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.interrupted_by: str | None = None  # "SIGINT" or "SIGTERM" once interrupted
        self._previous_handler: Any = None
        self._trainer: Trainer | None = None
        self._aborted = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        if trainer is None or getattr(trainer, "received_sigterm", False):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._aborted = trainer is not None  # the second press: stop now, save nothing
            raise KeyboardInterrupt
        rank_zero_info("\nCtrl-C: finishing this batch and saving last.ckpt "
                       "(press Ctrl-C again to abort without saving).")
        trainer._signal_connector.received_sigterm = True  # same path as SIGTERM
        self.interrupted_by = "SIGINT"

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        self._trainer = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        self._restore()
        if not self.enabled or not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        global LAST_INTERRUPT
        self.interrupted_by = self.interrupted_by or (
            "SIGTERM" if isinstance(exception, SIGTERMException) else "SIGINT")
        LAST_INTERRUPT = self.interrupted_by
        if self._aborted:  # the batch in progress may be half done: no save (exit status 1)
            rank_zero_info("Aborted by a second Ctrl-C: nothing saved; --ckpt_path last resumes "
                           "from the last periodic save.")
            return
        if trainer.state.fn != "fit" or trainer.checkpoint_callback is None:
            return
        dirpath = trainer.checkpoint_callback.dirpath
        if dirpath is None:
            return
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(f"Interrupted at epoch {trainer.current_epoch}, step "
                       f"{trainer.global_step}: saved {path}. Resume with --ckpt_path last.")


def recorded_best_checkpoint(last: Path) -> Path | None:
    """The best file the ``ModelCheckpoint`` state inside ``last.ckpt`` records, if it still
    exists (as recorded, or next to ``last.ckpt`` for a moved run); None otherwise."""
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, or not loadable weights-only
        return None
    for key, value in (state.get("callbacks") or {}).items():
        path = value.get("best_model_path") if key.startswith("ModelCheckpoint") else None
        for candidate in (Path(path), last.parent / Path(path).name) if path else ():
            if candidate.is_file():
                return candidate
    return None


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """Newest ``<save_dir>/<name>/*/checkpoints/last.ckpt`` (by modification time), or None."""
    candidates = list(Path(save_dir, name).glob("*/checkpoints/last.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
