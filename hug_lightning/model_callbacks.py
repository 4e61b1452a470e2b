"""Callbacks a model returns from ``configure_callbacks``, next to the CLI's own.

At the start of each ``fit`` / ``validate`` / ``test`` / ``predict``, Lightning attaches the
callbacks that ``LightningModule.configure_callbacks`` returns: it removes every trainer
callback whose type the returned ones are (or subclass), appends them, and puts the checkpoint
callbacks last, in their order. In the CLI's trainer, a subclass of ``ClassifierModule``
returning ``ModelCheckpoint(monitor="val/loss")`` (Lightning's own example) thus

* removed the ``checkpoint`` group's ``ModelCheckpoint`` (best on ``val/acc``: what
  ``--ckpt_path best`` loads) with nothing but Lightning's one-line note;
* ran that callback after :class:`~hug_lightning.checkpointing.LastCheckpoint`: ``last.ckpt``
  was written before its decision on the epoch (a resume restored its state one epoch old and
  left a file on disk it no longer knew of), ``trainer.checkpoint_callback`` (in-process
  ``ckpt_path="best"``) was ``LastCheckpoint`` (it loaded ``last.ckpt``), and SLURM's requeue
  save in an epoch's last batch no longer waited for the epoch's checkpoint decisions
  (:mod:`slurm_requeue` looks for ``LastCheckpoint`` last: the run restored from it recorded
  no best file of the model's callback);

and a returned ``TQDMProgressBar`` or ``RichProgressBar`` drew next to the CLI's
:class:`~hug_lightning.progress.ThrottledProgressBar` (no subclass of it: not replaced), every
line twice.

:func:`keep_template_callbacks` makes the model's callbacks add to the CLI's, as the same
callbacks in ``trainer.callbacks`` do:

* a ``ModelCheckpoint`` of the model's runs next to the ``checkpoint`` group's, which stays
  "best" (one with the group's state key, i.e. the same monitor, mode and intervals, replaces
  it, as Lightning would: two would share one state in the checkpoint);
* the group's is the first checkpoint callback (when it keeps a file: the CLI's trainer has it
  so from the start, :func:`checkpoint_order`), ``LastCheckpoint`` the last, the model's in
  between;
* a progress bar of the model's replaces the trainer's (Lightning draws one); with the
  trainer's turned off (``enable_progress_bar=False``: it has none), there is none.

Everything else follows Lightning's rule: a returned ``LastCheckpoint``,
``InterruptCheckpoint``, ``NeuralCollapseMonitor``, ``EarlyStopping``... (or a subclass)
replaces the trainer's of its type, and a returned ``ModelCheckpoint`` replaces every
``ModelCheckpoint`` of the user's ``trainer.callbacks`` (only the group's is kept aside).
"""

from __future__ import annotations

from typing import Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, Checkpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_info

from hug_lightning.checkpointing import LastCheckpoint


def _among(callback: Callback, callbacks: Sequence[Callback]) -> bool:
    return any(callback is c for c in callbacks)


def checkpoint_order(callbacks: Sequence[Callback], group: Callback | None) -> list[Callback]:
    """``callbacks`` with the checkpoint callbacks last: ``group`` (the ``checkpoint``
    group's) first among them when it keeps a file, else just before ``LastCheckpoint``;
    every ``LastCheckpoint`` last (its ``last.ckpt`` records the others' decisions on the
    epoch); the other callbacks in their order."""
    rest = [c for c in callbacks if not isinstance(c, Checkpoint)]
    checkpoints = [c for c in callbacks if isinstance(c, Checkpoint)]
    last = [c for c in checkpoints if isinstance(c, LastCheckpoint) and c is not group]
    others = [c for c in checkpoints if c is not group and not _among(c, last)]
    if group is None or not _among(group, checkpoints):
        return [*rest, *others, *last]
    if getattr(group, "save_top_k", 1) == 0:  # keeps no best file: "best" is another's
        return [*rest, *others, group, *last]
    return [*rest, group, *others, *last]


def merge_model_callbacks(before: Sequence[Callback], after: Sequence[Callback],
                          group: Callback | None) -> list[Callback]:
    """The trainer's callbacks once the model's are attached.

    Args:
        before: The trainer's callbacks before Lightning attached the model's.
        after: Lightning's result, attached without ``group`` (so not replaced by type).
        group: The ``checkpoint`` group's ``ModelCheckpoint`` to put back (None: none).
    """
    added = [c for c in after if not _among(c, before)]
    callbacks = list(after)
    if any(isinstance(c, ProgressBar) for c in added):  # one bar: the model's
        off = not any(isinstance(c, ProgressBar) for c in before)  # enable_progress_bar=False
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)
                     or (_among(c, added) and not off)]
        if off:
            rank_zero_info("The progress bar from configure_callbacks is not used: the "
                           "trainer's is off (enable_progress_bar=False).")
    if group is not None:
        same = [c for c in added if getattr(c, "state_key", None) == group.state_key]
        if same:
            rank_zero_info(f"configure_callbacks returned {type(same[0]).__name__} with the "
                           f"`checkpoint` group's settings ({group.state_key}): it replaces "
                           "the group's (its file is what --ckpt_path best loads).")
            group = same[0]  # in the group's place: first (in-process ckpt_path="best")
        else:
            callbacks.append(group)
    if not added and group is None:
        return callbacks
    return checkpoint_order(callbacks, group)


class _AttachModelCallbacks:
    """The trainer's ``_attach_model_callbacks`` as :func:`keep_template_callbacks` sets it: an
    object of this module, not a closure, so that the trainer still pickles (``ddp_spawn``
    sends it to its processes; ``torch.save`` of a module reaches it through the CLI's
    factories). It calls the connector class's own method, never the instance attribute it
    replaces (itself).

    Args:
        trainer: The trainer whose connector this replaces the method of.
        group: The ``checkpoint`` group's ``ModelCheckpoint`` (None: none).
    """

    def __init__(self, trainer: Trainer, group: Callback | None) -> None:
        self.trainer = trainer
        self.group = group

    def __call__(self) -> None:
        trainer, group = self.trainer, self.group
        connector = trainer._callback_connector
        before = list(trainer.callbacks)
        hidden = group if group is not None and _among(group, before) else None
        trainer.callbacks = [c for c in before if c is not hidden]  # not replaced by type
        try:
            type(connector)._attach_model_callbacks(connector)
        finally:
            trainer.callbacks = merge_model_callbacks(before, trainer.callbacks, hidden)


def keep_template_callbacks(trainer: Trainer, group: Callback | None) -> None:
    """Attach the model's ``configure_callbacks`` to ``trainer`` as the module docstring says,
    in every later ``fit`` / ``validate`` / ``test`` / ``predict`` of it. Nothing with another
    Lightning version (one without ``_attach_model_callbacks``)."""
    connector = getattr(trainer, "_callback_connector", None)
    if not callable(getattr(type(connector), "_attach_model_callbacks", None)):
        return
    connector._attach_model_callbacks = _AttachModelCallbacks(trainer, group)


__all__ = ["checkpoint_order", "keep_template_callbacks", "merge_model_callbacks"]
