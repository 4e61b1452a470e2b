"""Epoch-end values written straight to the loggers, at the step of Lightning's own epoch values.

Used by :class:`~hug_lightning.metrics.callback.NeuralCollapseMonitor` for its ``nc/*`` values
and figures: values already identical on every rank need none of ``pl_module.log``'s
reduction, and its per-key cost adds up over dozens of metrics per stage.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from torch import Tensor


def epoch_log_step(trainer: Trainer) -> int:
    """The step at which Lightning writes epoch-end values (``val/acc``, ``train/acc``), so that
    values logged directly line up with them in TensorBoard: its logger step counter, which
    the training loop has already advanced when ``on_train_epoch_end`` runs (Lightning steps
    it back by one for its own epoch logging there)."""
    steps = batches_that_stepped(trainer)
    if steps is None:  # not Lightning's loop (a stand-in trainer): its global step
        return int(getattr(trainer, "global_step", 0))
    return max(steps - 1, 0) if trainer.training else steps


def batches_that_stepped(trainer: Trainer) -> int | None:
    """Lightning's logger step counter (the training loop's ``_batches_that_stepped``), or
    ``None`` for a trainer without Lightning's loop."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    steps = getattr(loop, "_batches_that_stepped", None)
    return None if steps is None else int(steps)


def log_direct(trainer: Trainer, values: dict[str, Tensor]) -> None:
    """Log ``values`` (``{key: scalar tensor}``) to every logger and to
    ``trainer.callback_metrics``.

    Not through ``pl_module.log``: its result collection costs about 1 ms of Python per key,
    and with ~35 metrics per stage that alone made the NC collectors cost a fifth of a short GPU
    epoch. Nothing is lost by going direct when the values are already identical on every rank
    (computed after an all-reduce, no reduction left to do): loggers get them at the step of
    Lightning's own epoch values (:func:`epoch_log_step`; rank 0 writes), and
    ``callback_metrics`` has them for ``ModelCheckpoint`` / ``EarlyStopping`` monitors.
    """
    named = {key: value.detach().float().cpu() for key, value in values.items()}
    trainer.callback_metrics.update(named)
    if trainer.loggers:
        scalars = {key: float(value) for key, value in named.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=epoch_log_step(trainer))


__all__ = ["batches_that_stepped", "epoch_log_step", "log_direct"]
