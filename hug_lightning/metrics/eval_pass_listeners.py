"""Other callbacks' share of the NC eval pass: the listener protocol and its discovery.

:func:`~hug_lightning.metrics.eval_pass.run_eval_pass` (the NC monitor's eval-mode forward over
the training images with the evaluation transform) tells every callback of the trainer that
implements :class:`EvalPassListener` what it does, so that a callback can record what it needs
(e.g. :class:`~hug_lightning.metrics.layers.LayerNCMonitor`'s forward hooks on intermediate
layers) during that pass's own forwards, with no second pass:

1. ``eval_pass_start(trainer, pl_module)`` before the first batch (the module in eval mode);
2. ``eval_pass_batch(labels)`` before each batch's forward, with that batch's labels on the
   module's device: the forwards until the next call (under the pass's precision context) are
   that batch's;
3. ``eval_pass_end(trainer, pl_module)`` after the last batch, on every process (collectives
   are allowed there: every process runs the pass, in the same order of listeners).

A pass that raises calls no ``eval_pass_end``: the exception reaches Lightning, which calls the
callbacks' ``on_exception``. Nothing depends on the order of the callbacks: the listeners are
looked up when the pass starts. :func:`runs_eval_pass` tells a listener at setup whether any
callback will run the pass (the NC monitor's ``runs_eval_pass``: ``--nc.enabled true`` and
``--nc.eval_pass true``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor


@runtime_checkable
class EvalPassListener(Protocol):
    """A callback that records during the NC eval pass (see the module docstring)."""

    def eval_pass_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before the first batch of the pass."""

    def eval_pass_batch(self, labels: Tensor) -> None:
        """Before the forward of a batch with these labels."""

    def eval_pass_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After the last batch, on every process."""


def eval_pass_listeners(trainer: Any) -> list[EvalPassListener]:
    """The trainer's callbacks that implement :class:`EvalPassListener`, in the trainer's order."""
    return [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, EvalPassListener)]


def runs_eval_pass(trainer: Any) -> bool:
    """Whether one of the trainer's callbacks runs the eval pass (its ``runs_eval_pass`` true)."""
    return any(getattr(cb, "runs_eval_pass", False) for cb in getattr(trainer, "callbacks", []))


__all__ = ["EvalPassListener", "eval_pass_listeners", "runs_eval_pass"]
