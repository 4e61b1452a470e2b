"""``SumStateMetric``: a torchmetrics Metric whose states are all float SUMs in one dtype.

The base of :class:`~hug_lightning.metrics.collapse.NCFeatureStats`; it holds the two ways such
a metric departs from torchmetrics' defaults:

* the sync performs **one** ``all_reduce(SUM)`` per state instead of torchmetrics'
  ``all_gather`` of every rank's copy (:func:`all_reduce_sync`, also the checkpoint and
  class-count sums' collective);
* the states (and floating buffers) stay in the accumulation dtype (float64 by default) under
  ``metric.to(torch.bfloat16)``, ``parent.half()`` and Lightning's precision plugins
  (``_apply`` keeps their dtype, moving only their device); only :meth:`set_dtype` changes it
  (e.g. float32 on MPS).

Subclasses add their states with ``dist_reduce_fx="sum"``, all floating point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors


def all_reduce_sync(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """``dist_sync_fn`` for SUM states: one ``all_reduce`` on a copy, as a one-element list.

    torchmetrics stacks the list and applies ``dim_zero_sum``, which is then a no-op; transient
    memory is one state copy instead of ``world_size`` copies.
    """
    out = tensor.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
    return [out]


class SumStateMetric(Metric):
    """A Metric of floating SUM states kept in ``acc_dtype``, synced by one ``all_reduce`` each.

    Args:
        acc_dtype: Accumulation dtype of the states (float64; float32 only where float64 is
            unavailable).
        kwargs: torchmetrics ``Metric`` options (``process_group``, ``dist_sync_fn``, ...);
            ``dist_sync_fn`` defaults to :func:`all_reduce_sync`.
    """

    def __init__(self, acc_dtype: torch.dtype = torch.float64, **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", all_reduce_sync)
        super().__init__(**kwargs)
        self._acc_dtype = acc_dtype

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> torch.nn.Module:
        """Move states/buffers with ``fn`` but keep their dtype unless :meth:`set_dtype` is used."""
        if self._dtype_convert:  # the sanctioned path: set_dtype
            out = super()._apply(lambda t: fn(t) if t.is_floating_point() else t, exclude_state)
            self._acc_dtype = getattr(self, next(iter(self._defaults))).dtype  # any: all float
            return out

        def keep_dtype(t: Tensor) -> Tensor:
            moved = fn(t)
            if t.is_floating_point() and moved.dtype != t.dtype:
                return t.to(device=moved.device)  # lossless: same values, new device only
            return moved

        return super()._apply(keep_dtype, exclude_state)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group=None) -> None:
        """SUM-reduce every state with one ``all_reduce`` (the default gather is not used)."""
        if dist_sync_fn not in (all_reduce_sync, gather_all_tensors):  # user-supplied function
            return super()._sync_dist(dist_sync_fn, process_group)
        group = process_group or self.process_group
        for name in self._reductions:
            setattr(self, name, all_reduce_sync(getattr(self, name), group)[0])
        return None

    def _states_to_acc_dtype(self) -> None:
        """Cast back the states that left the accumulation dtype by a path that bypassed
        ``_apply`` (e.g. loading a state dict)."""
        for name in self._defaults:
            if getattr(self, name).dtype != self._acc_dtype:
                setattr(self, name, getattr(self, name).to(self._acc_dtype))


__all__ = ["SumStateMetric", "all_reduce_sync"]
