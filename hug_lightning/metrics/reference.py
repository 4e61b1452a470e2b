"""The pivots and NCC reference means of :class:`~hug_lightning.metrics.collapse.NCFeatureStats`.

Pivots (per class, raw and spherical) are what the sums accumulate around; the NCC reference
means are what nearest-class-centre predictions compare features to. Both are buffers, not
states: identical on all ranks, kept by ``reset``, set together by
:meth:`PivotReference.set_reference` (usually to the previous epoch's means).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from hug_lightning.metrics import functional_states as FS  # noqa: N812


class PivotReference:
    """Mixin of :class:`~hug_lightning.metrics.collapse.NCFeatureStats`: its pivot and NCC
    reference buffers. The metric provides ``num_classes``, ``dim``, ``spherical``, ``ncc``,
    ``nc_states()`` and ``means()``; it calls :meth:`_register_reference` in ``__init__``."""

    num_classes: int
    dim: int
    spherical: bool
    ncc: bool
    pivot: Tensor
    pivot_sph: Tensor
    ref_means: Tensor
    ref_valid: Tensor
    _has_reference: bool
    _computed: Any

    def _register_reference(self, acc_dtype: torch.dtype) -> None:
        """Register the pivot buffers (and the NCC reference's, with ``ncc``): zero, no
        reference yet."""
        zeros = torch.zeros(self.num_classes, self.dim, dtype=acc_dtype)
        self.register_buffer("pivot", zeros.clone())
        if self.spherical:
            self.register_buffer("pivot_sph", zeros.clone())
        if self.ncc:
            self.register_buffer("ref_means", zeros.clone())
            self.register_buffer("ref_valid", torch.zeros(self.num_classes, dtype=torch.bool))
        self._has_reference = False

    def set_reference(
        self,
        means: Tensor | None,
        means_sph: Tensor | None = None,
        *,
        pivot: bool = True,
        ncc: bool = True,
    ) -> None:
        """Set per-class pivots and NCC reference means (pass identical values on every rank).

        Already accumulated sums are re-based exactly to the new pivots (free when empty, i.e.
        right after ``reset``); NCC counts already made keep their old reference. Rows that are
        not finite (absent classes) keep their previous pivot and are never NCC-predicted.

        Args:
            means: ``(K, d)`` class means, e.g. :meth:`means` of the previous epoch or of the
                train collector; ``None`` clears the NCC reference (pivots unchanged).
            means_sph: Spherical pivots; default ``normalize(means)``.
            pivot: Update the pivots. ncc: Update the NCC reference.
        """
        if means is None:
            self._has_reference = False
            if self.ncc:
                self.ref_valid.zero_()
            return
        means = means.detach().to(device=self.pivot.device, dtype=self.pivot.dtype)
        valid = torch.isfinite(means).all(dim=1)
        if pivot:
            if means_sph is None:
                means_sph = F.normalize(torch.nan_to_num(means), dim=1)
            for sfx, new in (("", means), ("_sph", means_sph)):
                if sfx and not self.spherical:
                    continue
                old = getattr(self, "pivot" + sfx)
                new = new.detach().to(old)
                keep = valid[:, None] & torch.isfinite(new).all(1, keepdim=True)
                new = torch.where(keep, new, old)
                for name, value in FS.rebase_states(self.nc_states(), old, new, sfx).items():
                    setattr(self, name, value)
                old.copy_(new)
        if ncc and self.ncc:
            self.ref_means.copy_(torch.nan_to_num(means))
            self.ref_valid.copy_(valid)
            self._has_reference = bool(valid.any())
        self._computed = None

    def roll_reference(self) -> None:
        """Use the means of the last ``compute`` as pivots and NCC reference (epoch-end idiom)."""
        self.set_reference(self.means(), self.means(spherical=True) if self.spherical else None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kw: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        if self.ncc:
            self._has_reference = bool(self.ref_valid.any())


__all__ = ["PivotReference"]
