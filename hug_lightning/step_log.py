"""Training-step values (loss, loss terms, learning rate) logged without waiting for the GPU.

``pl_module.log("train/loss", loss, prog_bar=True)`` costs a host synchronisation on every
training step in Lightning 2.x, not only on the logged ones: once a ``prog_bar`` value has been
logged in an epoch, the result collection converts its cached tensor with ``.item()`` at the end
of every following batch of that epoch (``_LoggerConnector.on_batch_end``, whether or not a
progress bar is shown; Lightning issue #21232), and a float logged that way (the learning rate)
is first copied to the device from pageable memory. Each such read drains the CUDA queue, so
the host's Python (Lightning's loop included) can no longer overlap with the GPU's work.

:class:`StepLog` takes the same values on the steps Lightning would log
(``trainer.log_every_n_steps``) and writes them once the device has produced them:

* the tensors are stacked into one vector (averaged over processes under DDP, like
  ``sync_dist=True``, but with one bare all-reduce for all of them and no barrier) and
  copied to pinned host memory without blocking, with a CUDA event behind the copy;
* :meth:`StepLog.poll`, called every step, writes the entries whose event has completed (usually
  the next step) to every logger at the step they belong to, and to
  ``trainer.progress_bar_metrics``, ``trainer.callback_metrics`` and ``trainer.logged_metrics``;
* :meth:`StepLog.flush` waits for the rest (when a validation of the fit starts, at the end
  of each training epoch and of training), so validation and epoch-end monitors
  (``EarlyStopping(monitor="train/loss")``) see the last logged value;
  ``record(..., wait=True)`` writes at once, for a callback that reads a value in the same
  batch (``ModelCheckpoint(monitor="train/loss", every_n_train_steps=...)``): one wait for
  the device per logged step, only then.

On the CPU the copy is immediate and the values are written at once. What is not written yet
when a run dies of an exception (at most a step or two of logs) is lost; a stop by SIGTERM or
Ctrl-C that saves ``last.ckpt`` (:class:`~hug_lightning.interrupt.InterruptCheckpoint`), or a
data error that does (:mod:`hug_lightning.data_error_save`), writes it first.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from hug_lightning.metrics.direct_log import batches_that_stepped
from hug_lightning.metrics.sum_metric import all_reduce_sync

#: entries still in flight before the oldest is waited for (the queue is rarely one step deep)
MAX_PENDING = 16


def logged_step(trainer: Trainer) -> int:
    """The step Lightning's logger connector gives the values logged in this training step:
    ``_batches_that_stepped`` when the batch starts (it is advanced after the write)."""
    steps = batches_that_stepped(trainer)
    return int(getattr(trainer, "global_step", 0)) if steps is None else steps


class _Entry:
    def __init__(self, step: int, epoch: int, names: list[str], host: Tensor | None,
                 event: Any, floats: dict[str, float], prog_bar: Collection[str]) -> None:
        self.step, self.epoch, self.names, self.host = step, epoch, names, host
        self.event, self.floats, self.prog_bar = event, floats, prog_bar

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def values(self) -> dict[str, float]:
        if self.event is not None:
            self.event.synchronize()
        read = self.host.tolist() if self.host is not None else []  # host memory: no GPU wait
        return {**dict(zip(self.names, read)), **self.floats}


class StepLog:
    """Step values queued on the device and written when ready (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: list[_Entry] = []

    def record(self, trainer: Trainer, values: Mapping[str, Tensor | float],
               prog_bar: Collection[str] = (), sync_dist: bool = False,
               wait: bool = False) -> None:
        """Queue ``values`` (scalar tensors or Python numbers) for this step.

        Args:
            trainer: The running trainer (its loggers, step counters and metric dicts).
            values: ``{key: value}``; tensors are detached, floats are written as given.
            prog_bar: Keys also shown in the progress bar.
            sync_dist: Average the tensors over processes (every rank must call this).
            wait: Write everything queued now, waiting for the device if need be (for a
                callback that reads one of these keys in this batch).
        """
        tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
        if tensors:  # those on the first tensor's device; others (a CPU learning-rate tensor
            # next to a CUDA loss) are read as numbers, which costs nothing on the host
            device = next(iter(tensors.values())).device
            tensors = {k: v for k, v in tensors.items() if v.device == device}
        floats = {k: float(v) for k, v in values.items() if k not in tensors}
        host, event = None, None
        if tensors:
            vector = torch.stack([v.detach().float().reshape(()) for v in tensors.values()])
            if sync_dist and trainer.world_size > 1:  # a bare all-reduce: Lightning's
                # strategy.reduce puts a barrier first, which blocks the host under NCCL
                vector = all_reduce_sync(vector)[0].div_(trainer.world_size)
            host, event = self._to_host(vector)
        self._pending.append(_Entry(logged_step(trainer), trainer.current_epoch,
                                    list(tensors), host, event, floats, prog_bar))
        if wait:
            self.flush(trainer)
        else:
            self.poll(trainer)

    @staticmethod
    def _to_host(vector: Tensor) -> tuple[Tensor, Any]:
        """A host copy of ``vector`` and an event completed with it (``None``: complete)."""
        if vector.device.type != "cuda":
            return vector.to("cpu", copy=True), None
        host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
        host.copy_(vector, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def poll(self, trainer: Trainer) -> None:
        """Write the queued entries whose values have reached the host, oldest first."""
        while self._pending and (self._pending[0].ready() or len(self._pending) > MAX_PENDING):
            self._write(trainer, self._pending.pop(0))

    def flush(self, trainer: Trainer) -> None:
        """Wait for and write every queued entry."""
        while self._pending:
            self._write(trainer, self._pending.pop(0))

    def clear(self) -> None:
        """Drop the queue (a new fit)."""
        self._pending.clear()

    @staticmethod
    def _write(trainer: Trainer, entry: _Entry) -> None:
        values = entry.values()
        as_tensors = {k: torch.tensor(v) for k, v in values.items()}
        _metric_dict(trainer, "callback_metrics").update(as_tensors)
        _metric_dict(trainer, "logged_metrics").update(as_tensors)
        _metric_dict(trainer, "progress_bar_metrics").update(
            {k: values[k] for k in entry.prog_bar if k in values})
        if trainer.loggers and values:
            scalars = {**values, "epoch": entry.epoch}  # Lightning adds the epoch to step logs
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=entry.step)
                logger.save()  # as Lightning does after each write (CSVLogger writes its file)


def _metric_dict(trainer: Trainer, name: str) -> dict:
    """The logger connector's own dict behind ``trainer.<name>``: the public property first
    merges the result collection in, which can compute (and all-reduce) epoch values, and
    entries are written when their copy completes, which differs between processes."""
    stored = getattr(getattr(trainer, "_logger_connector", None), f"_{name}", None)
    return stored if isinstance(stored, dict) else getattr(trainer, name)


__all__ = ["MAX_PENDING", "StepLog", "logged_step"]
