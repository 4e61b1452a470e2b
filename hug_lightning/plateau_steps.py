"""``ReduceLROnPlateau`` steps taken before the epoch's checkpoints, so that a resume is exact.

Lightning (2.6) steps a plateau scheduler after every ``on_train_epoch_end`` hook, so the
checkpoints written in those hooks (``last.ckpt``, a ``ModelCheckpoint`` saving at the epoch
end) held the scheduler and the learning rates from before that epoch's step, and a fit
resumed from one counts the epoch as done and never took the step; Lightning also skips the
step at the end of an epoch that a fit resumed inside (``fit_loop.restarting``: the monitored
value is not in the checkpoint). Each resume dropped one plateau step.

:class:`PlateauSteps` takes the step itself at the end of the module's ``on_train_epoch_end``,
once the module and the other callbacks have logged the epoch's values and before the
checkpoint callbacks (which Lightning calls last), with the value Lightning would pass
(``trainer.callback_metrics[monitor]``, the same on every process), also in an epoch resumed
inside; Lightning's own call at that epoch end is then skipped (see :meth:`PlateauSteps.taken`).
No Lightning import: the trainer and module are used through their attributes.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

#: the checkpoint key of :meth:`PlateauSteps.save`'s state
KEY = "plateau_steps"


class PlateauSteps:
    """The epoch-end steps of a module's ``ReduceLROnPlateau`` schedulers (``interval:
    epoch``).

    Attributes:
        epoch: The last epoch whose steps were taken (``None``: none yet in this fit).
        values: The monitored values of the checkpoint this fit resumed (each monitor's last
            logged value when it was written): the value of a monitor not logged again since
            the restore, which the uninterrupted fit would still read from
            ``trainer.callback_metrics`` (e.g. a ``ModelCheckpoint`` file written after the
            last batch's validation: a resume runs only that epoch's end).
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.values: dict[str, float] = {}
        self._before: dict[int, tuple[float, dict, list[float]]] = {}  # undo, by scheduler id

    def reset(self) -> None:
        """Forget everything (a new fit; a resume restores the state after ``setup``)."""
        self.epoch, self.values, self._before = None, {}, {}

    def epoch_end(self, module: Any) -> None:
        """Step every plateau scheduler due at this epoch end, as Lightning would, through
        ``module.lr_scheduler_step``. Nothing when the epoch stopped before its last batch
        (``max_steps``), in manual optimization, when this epoch's steps were taken already
        (an epoch end run again after a restore) or when a monitored value is missing
        (Lightning's own call then raises or warns, as before)."""
        trainer = module.trainer
        epoch = trainer.current_epoch
        due = [config for config in self._configs(trainer)
               if (epoch + 1) % config.frequency == 0]
        if not due or not module.automatic_optimization or self.epoch == epoch \
                or not trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            return
        values = [self._value(trainer, config.monitor) for config in due]
        if any(value is None for value in values):
            return
        self._before = {}
        for config, value in zip(due, values):
            scheduler = config.scheduler
            self._before[id(scheduler)] = (float(value), copy.deepcopy(scheduler.state_dict()),
                                           [g["lr"] for g in scheduler.optimizer.param_groups])
            module.lr_scheduler_step(scheduler, value)
        self.epoch = epoch

    def taken(self, scheduler: Any, metric: Any | None, trainer: Any) -> bool:
        """Whether Lightning's call ``lr_scheduler_step(scheduler, metric)`` is for a plateau
        step that :meth:`epoch_end` took at this epoch end (the module then skips it).

        When Lightning's value differs from the one used (the monitored value was logged
        after the module's ``on_train_epoch_end``: by an override after ``super()``, or by a
        checkpoint callback), that step is undone and Lightning's stands, as without this
        class; a warning says that the epoch's checkpoints hold the step taken with the
        earlier value."""
        if self.epoch is None or self.epoch != trainer.current_epoch \
                or not any(c.scheduler is scheduler for c in self._configs(trainer)):
            return False
        before = self._before.get(id(scheduler))
        if before is None or metric is None or _same(float(metric), before[0]):
            return True  # (no record: an epoch end run again after a restore)
        value, state, lrs = before
        scheduler.load_state_dict(state)
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        del self._before[id(scheduler)]
        warnings.warn(
            f"ReduceLROnPlateau: its monitored value changed after the module's "
            f"on_train_epoch_end ({value} there, {float(metric)} at Lightning's step), so the "
            "checkpoints written at this epoch end hold the step taken with the earlier value "
            "and a fit resumed from them is not exact. Log the monitored value before that "
            "hook's end (an override: before calling super().on_train_epoch_end()).",
            stacklevel=2)
        return False

    def _value(self, trainer: Any, monitor: str) -> Any | None:
        value = trainer.callback_metrics.get(monitor)
        return value if value is not None else self.values.get(monitor)

    @staticmethod
    def _configs(trainer: Any) -> list[Any]:
        return [config for config in getattr(trainer, "lr_scheduler_configs", None) or []
                if isinstance(config.scheduler, ReduceLROnPlateau) and config.interval == "epoch"]

    def save(self, checkpoint: dict[str, Any], trainer: Any | None) -> None:
        """Store the epoch whose steps were taken and each plateau monitor's last value (the
        same on every process, as Lightning's step assumes)."""
        values = {}
        for config in self._configs(trainer) if trainer is not None else ():
            value = self._value(trainer, config.monitor)
            if value is not None:
                values[config.monitor] = float(value)
        checkpoint[KEY] = {"epoch": self.epoch, "values": values}

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Restore them (none from a checkpoint written without them)."""
        state = checkpoint.pop(KEY, None) or {}
        self.epoch, self.values = state.get("epoch"), dict(state.get("values") or {})
        self._before = {}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
