"""Per-step learning-rate schedules that learn the run's length from the trainer.

LightningCLI injects the scheduler as a callable taking only the optimizer
(``LRSchedulerCallable``). Schedules that need the total number of optimizer steps read it
from :func:`total_steps_context`, which :class:`~hug_lightning.module.ClassifierModule` opens
around the call with ``trainer.estimated_stepping_batches`` (:func:`build_optimizers`); so a
YAML config says

.. code-block:: yaml

    scheduler:
      class_path: hug_lightning.optim.OneCycleLR
      init_args: {pct_start: 0.25}

and never repeats the number of epochs or batches. Both schedules step every batch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Literal

from torch.optim import Optimizer
from torch.optim import lr_scheduler

from hug_lightning.param_groups import apply_lr_scale

_TOTAL_STEPS: ContextVar[int | None] = ContextVar("hug_total_steps", default=None)


@contextlib.contextmanager
def total_steps_context(total_steps: int) -> Iterator[None]:
    """Make ``total_steps`` the default length of schedules built inside the block."""
    token = _TOTAL_STEPS.set(int(total_steps))
    try:
        yield
    finally:
        _TOTAL_STEPS.reset(token)


def resolve_total_steps(total_steps: int | None, who: str) -> int:
    """``total_steps`` if given, else the value of the enclosing :func:`total_steps_context`."""
    steps = total_steps if total_steps is not None else _TOTAL_STEPS.get()
    if steps is None:
        raise ValueError(
            f"{who}: total_steps is unknown. Pass total_steps=..., or build the schedule inside "
            "hug_lightning.optim.total_steps_context(n) (ClassifierModule does this for you)."
        )
    if steps < 1 or not math.isfinite(steps):
        raise ValueError(
            f"{who}: total_steps must be a positive finite number, got {steps}. "
            "Set trainer.max_epochs or trainer.max_steps."
        )
    return int(steps)


def run_length(trainer: Any, interval: str) -> int:
    """The run's length in scheduler steps (-1 when unbounded: :func:`resolve_total_steps`
    explains): the optimizer steps Lightning estimates (``step``), or the epochs that train
    (``epoch``: :func:`run_epochs`)."""
    if interval == "epoch":
        return run_epochs(trainer)
    steps = trainer.estimated_stepping_batches  # inf without max_epochs/max_steps
    return int(steps) if math.isfinite(steps) else -1


def run_epochs(trainer: Any) -> int:
    """The epochs a run trains, the last one possibly cut short: ``trainer.max_epochs``, or
    fewer when ``trainer.max_steps`` ends the run first (then ``ceil(max_steps / optimizer
    steps per epoch)``); -1 when unbounded."""
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps not in (None, -1) and getattr(trainer, "train_dataloader", 0) is None:
        trainer.fit_loop.setup_data()  # as estimated_stepping_batches does, but for max_epochs -1
    batches = getattr(trainer, "num_training_batches", math.inf)
    if max_steps not in (None, -1) and 0 < batches < math.inf:
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        epochs = min(epochs, math.ceil(max_steps / per_epoch))
    return max(1, int(epochs)) if math.isfinite(epochs) else -1  # as Lightning: max_epochs 0


def build_optimizers(groups: list[dict[str, Any]], optimizer: Callable[..., Optimizer],
                     scheduler: Callable[[Optimizer], Any] | None, interval: str, monitor: str,
                     total_steps: Callable[[], int]) -> Any:
    """What ``configure_optimizers`` returns: the optimizer over ``groups`` (with each group's
    ``lr_scale`` applied, see :func:`~hug_lightning.param_groups.apply_lr_scale`) and, with a
    ``scheduler`` factory, Lightning's scheduler config.

    Args:
        groups: Parameter groups passed to ``optimizer``.
        optimizer: Optimizer factory called with the groups.
        scheduler: Scheduler factory called with the optimizer, built inside
            :func:`total_steps_context`; ``None``: the optimizer alone is returned.
        interval: Step the scheduler every ``step`` or ``epoch``.
        monitor: The metric a ``ReduceLROnPlateau`` follows (it is stepped every epoch).
        total_steps: Called only when a scheduler is built: the run's length
            (:func:`run_length`).
    """
    built = apply_lr_scale(optimizer(groups))
    if scheduler is None:
        return built
    with total_steps_context(total_steps()):
        schedule = scheduler(built)
    return {
        "optimizer": built,
        "lr_scheduler": (
            {"scheduler": schedule, "interval": "epoch", "monitor": monitor}
            if isinstance(schedule, lr_scheduler.ReduceLROnPlateau)
            else {"scheduler": schedule, "interval": interval}),
    }


class OneCycleLR(lr_scheduler.OneCycleLR):
    """Smith's one-cycle schedule (warm-up to ``max_lr``, then anneal), stepped per batch.

    Args:
        optimizer: The optimizer (injected by the module).
        max_lr: Peak learning rate of the first parameter group, the others keeping their ratio
            to it (e.g. ``head_lr_scale``); ``None`` takes the optimizer's ``lr`` of each group.
        total_steps: Optimizer steps of the whole run; ``None`` takes it from the trainer.
        pct_start: Fraction of the steps spent increasing the learning rate.
        anneal_strategy: ``cos`` or ``linear`` annealing.
        div_factor: Initial lr is ``max_lr / div_factor``.
        final_div_factor: Final lr is ``initial_lr / final_div_factor``.
        three_phase: Use the three-phase variant of fastai.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float | None = None,
        total_steps: int | None = None,
        pct_start: float = 0.25,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ) -> None:
        steps = resolve_total_steps(total_steps, "OneCycleLR")
        # an explicit max_lr keeps each group's ratio to the first (head_lr_scale included)
        lrs = [g["lr"] for g in optimizer.param_groups]
        peak = lrs if max_lr is None else [max_lr * lr / lrs[0] if lrs[0] else max_lr for lr in lrs]
        super().__init__(
            optimizer,
            max_lr=peak,
            total_steps=steps,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            three_phase=three_phase,
            cycle_momentum=False,
        )

    def get_lr(self) -> list[float]:
        """torch's rule, except that a phase of zero length ends at its end value: torch divides
        by that length (0 when ``pct_start * total_steps`` is 1, e.g. a 4-step run at the
        default ``pct_start`` 0.25, or at the last step when ``pct_start`` is 1)."""
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"Tried to step {step} times. The specified number of total steps "
                             f"is {self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end = phase["end_step"]
                if step <= end or i == len(self._schedule_phases) - 1:
                    pct = (step - start) / (end - start) if end > start else 1.0
                    lrs.append(self._anneal_func(group[phase["start_lr"]],
                                                 group[phase["end_lr"]], pct))
                    break
                start = end
        return lrs

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore progress but keep this run's length (a resumed run may be longer)."""
        total, phases = self.total_steps, self._schedule_phases
        if state_dict.get("total_steps", total) != total:
            warnings.warn(
                f"OneCycleLR: the checkpoint's schedule had {state_dict['total_steps']} steps, "
                f"this run has {total}; continuing on the new schedule.",
                stacklevel=2,
            )
        super().load_state_dict(state_dict)
        if (self.total_steps, self._schedule_phases) != (total, phases):
            self.total_steps, self._schedule_phases = total, phases
            _apply_current_lr(self)  # the next step already follows the new schedule


def _apply_current_lr(scheduler: lr_scheduler.LRScheduler) -> None:
    """Set the groups' learning rates to the schedule's value at its restored step (after a
    resume into a run of another length; otherwise the first step would use the old value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns
        lrs = scheduler.get_lr()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)


class WarmupCosineLR(lr_scheduler.LambdaLR):
    """Linear warm-up from ``start_factor * lr`` to ``lr``, then cosine decay to
    ``min_factor * lr``.

    Args:
        optimizer: The optimizer (injected by the module).
        warmup: Warm-up length: a fraction of the run when below 1, else a number of steps.
        total_steps: Optimizer steps of the whole run; ``None`` takes it from the trainer.
        start_factor: Learning-rate factor at step 0.
        min_factor: Learning-rate factor reached at ``total_steps`` (the usual convention: the
            last step taken, ``total_steps - 1``, is one cosine step above it, so
            ``min_factor = 0`` never spends a step at learning rate 0).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: float = 0.05,
        total_steps: int | None = None,
        start_factor: float = 0.01,
        min_factor: float = 0.0,
    ) -> None:
        steps = resolve_total_steps(total_steps, "WarmupCosineLR")
        if warmup < 0:
            raise ValueError(f"WarmupCosineLR: warmup must be >= 0, got {warmup}.")
        self.total_steps = steps
        self.warmup_steps = int(round(warmup * steps)) if warmup < 1 else int(warmup)
        self.start_factor = float(start_factor)
        self.min_factor = float(min_factor)
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate after ``step`` optimizer steps."""
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_factor + (1.0 - self.min_factor) * cosine

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore progress but keep this run's length (a resumed run may be longer)."""
        length = (self.total_steps, self.warmup_steps)
        super().load_state_dict(state_dict)
        if (self.total_steps, self.warmup_steps) != length:
            warnings.warn(
                f"WarmupCosineLR: the checkpoint's schedule had {self.total_steps} steps, this "
                f"run has {length[0]}; continuing on the new schedule.", stacklevel=2)
            self.total_steps, self.warmup_steps = length
            _apply_current_lr(self)
