"""Resuming a fit that has ``max_steps`` set from a checkpoint written at an epoch's end.

Lightning 2.6 takes every resume of a fit with ``max_steps`` set (not -1) for a restart inside
an epoch: ``_FitLoop.restarting`` is ``restarting and epoch_unfinished or
self._iteration_based_training()``, the last being ``trainer.max_steps != -1``. From a
checkpoint written at the end of an epoch (``last.ckpt``, the best checkpoint of the epoch's
validation, the epoch-end checkpoints of an ``every_n_epochs`` callback) the restored loop then
ends the finished epoch a second time after one more batch and loses that epoch's remaining
batches further on: the UFM config, 4 epochs of 20 steps with ``--trainer.max_steps 100000``
(never reached), cut after 2 epochs and resumed, ended at step 61 instead of 80, with another
model; ``max_epochs -1`` runs bounded by ``max_steps`` alone shift their epochs by a batch
(Lightning issues #19617 and its kin).

:func:`resume_as_epoch_training` makes such a fit resume as the same fit without ``max_steps``
does, which is exact (``tests/test_resume_exactness.py``): the fit loop's
``_iteration_based_training`` answers False for that trainer. ``max_steps`` still ends the fit:
the training epoch loop compares the global step with it by itself. A restart inside an epoch
(a SIGTERM checkpoint, a ``max_steps`` stop) is a restart either way, and a loader without a
length (an infinite iterable) never ends an epoch, so neither changes.
:meth:`~hug_lightning.loop.ClassifierLoop.on_load_checkpoint` calls it (before Lightning
restores the loops from the checkpoint).
"""

from __future__ import annotations

from typing import Any

__all__ = ["resume_as_epoch_training"]


def resume_as_epoch_training(trainer: Any) -> bool:
    """Make the fit loop of ``trainer`` resume as without ``max_steps`` (see the module
    docstring); call it before the loops are restored. Returns whether it changed anything:
    not without ``max_steps``, nor with a Lightning whose fit loop has no such method."""
    loop = getattr(trainer, "fit_loop", None)
    if getattr(trainer, "max_steps", -1) == -1 or not callable(
            getattr(loop, "_iteration_based_training", None)):
        return False
    # an attribute of this loop object, not of its class: other trainers keep Lightning's
    loop._iteration_based_training = _epoch_training
    return True


def _epoch_training() -> bool:
    return False
