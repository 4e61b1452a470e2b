"""Checkpoints written after an epoch's last training batch, before that epoch's end.

A ``ModelCheckpoint`` with ``every_n_train_steps`` whose step falls on an epoch's last batch
saves in ``on_train_batch_end``, before the epoch's validation and its ``on_train_epoch_end``
hooks. Lightning 2.6 restores such a file as a finished epoch (``_FitLoop.reset``: a restart
on a train batch end at the epoch's last batch counts the epoch as processed and completed):
the resumed fit goes on with the next epoch's batches and runs none of that epoch's validation
(``val/*``, ``nc/val/*``, the best-checkpoint decision), none of its ``on_train_epoch_end``
hooks (``train/acc``, the class-vector geometry, the NC monitor's epoch end and eval pass, the
plateau step, the epoch-end checkpoints) and none of the next epoch's ``on_train_epoch_start``
hooks. What those hooks reset went on into the next epoch: its ``train/acc`` counted both
epochs (the mini-batch UFM of the tests, 5 steps per epoch, resumed from the step-10 file:
0.525 at step 14 where the uninterrupted run logged 0.75), and the NC monitor scored the next
epoch against pivots one epoch older (``nc/train_eval/pivot_cond`` 28.86 instead of 13.64; its
``train`` collector, when on, summed both epochs). The weights stay exact (and the learning
rates, but for a ``ReduceLROnPlateau`` step skipped with the epoch's end).

* :class:`~hug_lightning.checkpointing.LastCheckpoint` writes no such file: its step save
  passes over an epoch's last batch, whose state the epoch-end save writes after that end.
* For a file from another checkpoint callback, :func:`restart_skips_epoch_end` tells when the
  fit starts; :class:`~hug_lightning.loop.ClassifierLoop` then warns and restarts the training
  accuracy counts (the next epoch's ``train/acc`` is exact; the skipped epoch's is not
  logged). The rest of the list above is not recovered.

No Lightning import: the trainer is used through its loops' attributes (Lightning 2.6).
"""

from __future__ import annotations

from typing import Any

__all__ = ["epoch_end_skipped_message", "restart_skips_epoch_end"]


def restart_skips_epoch_end(trainer: Any) -> bool:
    """Whether this fit resumed from a checkpoint written after an epoch's last training batch,
    before that epoch's end, which Lightning counts as done (see the module docstring). Valid
    from ``on_train_start`` (the fit loop's restart stage is set) until the first batch. False
    with a Lightning whose loops lack these attributes."""
    fit_loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(fit_loop, "epoch_loop", None)
    try:
        return bool(getattr(trainer, "ckpt_path", None)
                    and epoch_loop.restarted_on_train_batch_end
                    and epoch_loop.batch_progress.is_last_batch
                    and epoch_loop.batch_progress.current.ready >= trainer.num_training_batches)
    except AttributeError:
        return False


def epoch_end_skipped_message(trainer: Any) -> str:
    """The warning for such a resume: which file, which epoch, what is lost, what to do."""
    epoch = int(trainer.current_epoch) - 1
    return (f"{trainer.ckpt_path} was written after epoch {epoch}'s last training batch, before "
            f"its end (a ModelCheckpoint every_n_train_steps save): Lightning resumes with "
            f"epoch {epoch + 1} and skips epoch {epoch}'s validation and end hooks (train/acc, "
            f"the NC epoch end, its checkpoints, the plateau step) and epoch {epoch + 1}'s start "
            "hooks. The training accuracy counts restart at zero; the NC monitor's values of "
            f"epoch {epoch + 1} differ from an uninterrupted run's. For an exact resume use a "
            "checkpoint written at an epoch's end or inside an epoch (last.ckpt of "
            "--last.every_n_train_steps is never written there).")
