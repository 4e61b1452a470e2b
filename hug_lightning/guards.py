"""Input and numerical guards used by the training loop: labels in range, finite losses, and
the shapes a backbone and a head give (the contract of the extension hooks).

They are written to cost nothing on GPUs in the common case: a check that needs the value of a
device tensor on the host (``.item()``) stalls the CUDA stream, so on accelerators labels are
checked on the first batch of each stage only, and the loss's finiteness flag is copied to the
host asynchronously and read a few steps later (the error still names the step it came from);
shape checks read no values.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from hug_lightning.cli_errors import ConfigError
from hug_lightning.data.splits import out_of_range_label


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss is NaN or Inf and the policy is ``raise``."""


def check_policy_for_processes(policy: str, world_size: int) -> None:
    """Raise a :class:`~hug_lightning.cli_errors.ConfigError` for ``nonfinite_loss: skip`` with
    more than one process: Lightning cannot skip a training step under DDP (a step returning
    None stops the run at the first non-finite loss). The command line checks it before the
    processes start (one message); the module's ``setup`` again, for ``Trainer.fit``."""
    if policy == "skip" and world_size > 1:
        raise ConfigError(
            f"invalid configuration: nonfinite_loss=skip works in one process only, this fit "
            f"has {world_size}: under DDP Lightning cannot skip a training step (a step "
            "returning None stops the run at the first non-finite loss). Use "
            "--model.init_args.nonfinite_loss raise with DDP.")


def check_labels(labels: Tensor, num_classes: int, stage: str, always: bool = False) -> None:
    """Raise a clear ``ValueError`` when a label is outside ``[0, num_classes)``.

    On the CPU every batch is checked (free); on accelerators only when ``always`` is set,
    because reading the minimum back to the host waits for the device.
    """
    if labels.device.type != "cpu" and not always:
        return
    bad = out_of_range_label(labels, num_classes)
    if bad is not None:
        raise ValueError(
            f"{stage}: label {bad} is outside [0, {num_classes}) (num_classes={num_classes}). "
            "Check that the data module's num_classes matches its labels, or that the model's "
            "num_classes is linked from the data (`data.num_classes`)."
        )


def check_backbone_width(backbone: torch.nn.Module, given: torch.nn.Module) -> int:
    """The backbone's feature width ``num_features``, or a ``TypeError`` when it is missing or
    not an integer (``given`` is the backbone argument, named when a hook replaced it)."""
    width = getattr(backbone, "num_features", None)
    if not isinstance(width, int):
        built = (type(given).__name__ if backbone is given else
                 f"{type(backbone).__name__} (returned by configure_backbone for "
                 f"{type(given).__name__})")
        raise TypeError(
            f"The backbone {built} must expose its feature width as an integer attribute "
            "`num_features` (the backbones in hug_lightning.backbones do; a wrapper built in "
            "configure_backbone must set it too)."
        )
    return width


def check_features(features: Tensor, feature_dim: int, stage: str) -> None:
    """Raise a ``ValueError`` unless ``features`` is ``(batch, feature_dim)`` (shapes: no
    sync)."""
    if features.dim() != 2 or features.shape[1] != feature_dim:
        raise ValueError(
            f"{stage}: the features fed to the head have shape {tuple(features.shape)}, "
            f"expected (batch, {feature_dim}). The backbone's `num_features` must equal "
            "the width it outputs (and images must have the size the backbone expects).")


def check_logits(logits: Tensor, batch: int, num_classes: int, stage: str, head: str) -> None:
    """Raise a ``ValueError`` unless the logits are ``(batch, num_classes)`` (shapes only: no
    sync).

    Args:
        logits: What the head gave for ``batch`` features.
        batch: Number of features fed to the head.
        num_classes: The module's number of classes.
        stage: ``train``, ``val`` or ``test``: the message starts with it.
        head: The head's class name, named in the message.
    """
    if logits.shape != (batch, num_classes):
        raise ValueError(
            f"{stage}: {head} gave logits of shape "
            f"{tuple(logits.shape)}, expected (batch, num_classes) = "
            f"({batch}, {num_classes}).")


class RunningStatsSnapshot:
    """The running statistics of a module's BatchNorm-type layers, saved before a forward and
    put back when the batch is skipped: a NaN in the inputs reaches ``running_mean`` and
    ``running_var`` during the forward, before the loss is seen, and would make every later
    evaluation NaN. One fused copy per step (``nonfinite_loss: skip`` only).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.saved: list[Tensor] = []
        self.buffers: list[Tensor] = []

    def save(self) -> None:
        # collected at every call: `module.to(...)` replaces buffer tensors
        self.buffers = [b for m in self.module.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                        for b in m.buffers(recurse=False)]
        same = len(self.saved) == len(self.buffers) and all(
            a.shape == b.shape and a.device == b.device and a.dtype == b.dtype
            for a, b in zip(self.saved, self.buffers))
        if not same:
            self.saved = [b.detach().clone() for b in self.buffers]
        elif self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)


class FiniteLossGuard:
    """Stops (or skips a batch) when the loss is NaN or Inf.

    Args:
        policy: ``raise`` stops with a message naming epoch, step and loss terms; ``skip``
            makes the step return ``None`` so no update happens, and counts skips.
        reduce_max: Optional function taking a tensor flag and returning its maximum over
            processes; with ``skip`` under DDP all ranks must skip together.
    """

    def __init__(
        self,
        policy: Literal["raise", "skip"] = "raise",
        reduce_max: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {policy!r}.")
        self.policy = policy
        self.reduce_max = reduce_max
        self.skipped = 0
        self._pending: list[tuple] = []

    @staticmethod
    def _describe(terms: dict[str, Tensor], loss: Tensor) -> str:
        parts = [f"loss={float(loss):.6g}"] + [f"{k}={float(v):.6g}" for k, v in terms.items()]
        return ", ".join(parts)

    def _fail(self, loss: Tensor, terms: dict[str, Tensor], epoch: int, step: int) -> None:
        raise NonFiniteLossError(
            f"Non-finite training loss at epoch {epoch}, global step {step}: "
            f"{self._describe(terms, loss)}. Lower the learning rate or check the data for "
            "NaNs" + (", or set model.init_args.nonfinite_loss=skip to skip such batches "
                      "(one process only)." if self.reduce_max is None else ".")
        )

    def check(self, loss: Tensor, terms: dict[str, Tensor], epoch: int, step: int) -> bool:
        """Return ``True`` to proceed with this batch, ``False`` to skip it (or raise)."""
        loss = loss.detach()
        if self.policy == "skip":
            bad = (~torch.isfinite(loss)).to(torch.float32)
            if self.reduce_max is not None:
                bad = self.reduce_max(bad)
            if bool(bad > 0):
                self.skipped += 1
                return False
            return True
        if loss.device.type != "cuda":
            if not bool(torch.isfinite(loss)):
                self._fail(loss, terms, epoch, step)
            return True
        # CUDA: copy a finiteness flag to pinned host memory without blocking and look at it
        # once its event has completed (a few steps later): no stall of the stream
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(torch.isfinite(loss), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, flag, loss, {k: v.detach() for k, v in terms.items()},
                              epoch, step))
        while self._pending and (self._pending[0][0].query() or len(self._pending) > 64):
            self._resolve(self._pending.pop(0))
        return True

    def _resolve(self, item: tuple) -> None:
        event, flag, loss, terms, epoch, step = item
        event.synchronize()
        if not bool(flag):
            self._pending.clear()
            self._fail(loss, terms, epoch, step)

    def flush(self) -> None:
        """Resolve every pending check (called at the end of each training epoch)."""
        while self._pending:
            self._resolve(self._pending.pop(0))
