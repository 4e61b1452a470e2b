"""The stop (and SLURM requeue) request that every process of a run acts on after the same
training batch: the agreement behind :mod:`hug_lightning.interrupt` (its docstring says why)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_CODES = {"SIGTERM": 1, "SIGINT": 2}  # agreed by max: Ctrl-C wins the exit status
_NAMES = {code: name for name, code in _CODES.items()}


class AgreedStop:
    """A stop request that every process acts on after the same training batch.

    Call :meth:`start` once when training starts (on every process), :meth:`request` from a
    signal handler, :meth:`step` at the end of every training batch (on every process, the same
    number of times) and :meth:`finish` when training ends. ``step`` returns the agreed request
    ("SIGTERM", "SIGINT" or None): the same value on every process at the same batch.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self.requeue_requested = False  # SLURM's requeue signal, agreed on its own
        self.requeue = False  # the requeue agreed at the last step
        self._group: Any = None
        self._buffer: torch.Tensor | None = None
        self._work: Any = None

    @property
    def distributed(self) -> bool:
        return self._group is not None

    def start(self) -> None:
        """Set up the sharing (collective: every process calls it at the same point)."""
        self.finish()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a CPU group: reading the result never waits for the GPU (NCCL would)
            self._group = dist.new_group(backend="gloo")

    def request(self, name: str) -> None:
        """Record a request (safe in a signal handler: no I/O, no collective)."""
        self.requested = self.requested or name

    def request_requeue(self) -> None:
        """Record a requeue request (safe in a signal handler)."""
        self.requeue_requested = True

    def step(self) -> str | None:
        """The agreed request at this batch boundary (one batch late under DDP); sets
        :attr:`requeue` when a requeue is agreed at this boundary (then its request is reset)."""
        if not self.distributed:
            self.requeue, self.requeue_requested = self.requeue_requested, False
            return self.requested
        agreed = [0, 0]
        if self._work is not None:
            self._work.wait()  # started a batch ago: long done
            agreed = self._buffer.tolist()  # a CPU tensor: no device sync
        self.requeue = bool(agreed[1])
        self.requeue_requested = self.requeue_requested and not self.requeue  # acted on now
        self._buffer = torch.tensor([_CODES.get(self.requested or "", 0),
                                     int(self.requeue_requested)], dtype=torch.int32)
        self._work = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, group=self._group,
                                     async_op=True)
        return _NAMES.get(agreed[0])

    def finish(self) -> None:
        """Wait for the last sharing started (every process started it) and stop sharing."""
        if self._work is not None:
            self._work.wait()
        self._work = self._buffer = self._group = None
