"""``torch.compile`` in :class:`~hug_lightning.module.ClassifierModule`: its options, checked once,
and the head's training step, compiled on first use.

The module compiles two parts, each on request: the backbone (``compile``: in place, so
checkpoints keep their keys) and the head's training step (``compile_loss``:
:meth:`Head.forward_train <hug_lightning.heads.base.Head.forward_train>`, i.e. the loss, its
terms and the logits). The HUG losses are written to trace without a graph break (no
``.item()``, no data-dependent shape); compiling the step fuses their few dozen small kernels,
which matters where the step is bound by kernel launches (small backbones, large batches on
fast GPUs). Both take the same ``compile_options``: the keyword arguments of
:func:`torch.compile` (``mode``, ``dynamic``, ``fullgraph``, ``backend``, ``options``...).

By default a second batch size (the epoch's last, partial batch) makes dynamo recompile the
graph for dynamic shapes, which then also serves the full batches (validation, under no_grad,
gets graphs of its own). ``compile_options: {dynamic: false}`` gives each size its own static
graph instead (more compile time, one graph per size: training, last batch, validation...);
``data.drop_last: true`` avoids the training one.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from hug_lightning.heads.base import Head, HeadOutput


def check_compile_options(options: Mapping[str, Any] | None, compile: bool,
                          compile_loss: bool) -> dict[str, Any]:
    """Return ``options`` as a dict of :func:`torch.compile` keyword arguments.

    Raises:
        ValueError: a name that ``torch.compile`` does not take, or options given while
            neither ``compile`` nor ``compile_loss`` is on (they would do nothing).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"compile_options must be a mapping of torch.compile arguments, got "
                         f"{type(options).__name__}.")
    allowed = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(str(name) for name in options if name not in allowed)
    if unknown:
        raise ValueError(f"compile_options: torch.compile takes no argument {unknown}; it "
                         f"takes {allowed}.")
    if options and not (compile or compile_loss):
        raise ValueError("compile_options is set but nothing is compiled: also set compile "
                         "(the backbone) and/or compile_loss (the head's loss), or drop it.")
    return dict(options)


class HeadStep:
    """Calls ``head.forward_train(features, labels)``, compiled when ``options`` is not None.

    The compiled function is the head class's own ``forward_train`` (a subclass's override
    included), taking the head as its first argument: a deep copy of the module (weight
    averaging) then trains its own head, not the original's. It is built at the first call
    and never pickled (``ddp_spawn`` pickles the module before any step).

    Args:
        options: Keyword arguments of :func:`torch.compile`, or ``None`` to call the head
            eagerly.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = None if options is None else dict(options)
        self._compiled: dict[type, Callable[..., HeadOutput]] = {}

    @property
    def compiled(self) -> bool:
        """Whether the head's step is compiled."""
        return self.options is not None

    def __call__(self, head: Head, features: Tensor, labels: Tensor) -> HeadOutput:
        if self.options is None:
            return head.forward_train(features, labels)
        kind = type(head)
        fn = self._compiled.get(kind)
        if fn is None:
            fn = self._compiled[kind] = torch.compile(kind.forward_train, **self.options)
        return fn(head, features, labels)

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options, "_compiled": {}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(options={self.options!r})"
