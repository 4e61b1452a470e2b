"""``NCFeatureStats``: a DDP-correct one-pass neural-collapse collector (torchmetrics Metric).

Usage (one instance per stage / dataloader)::

    nc = NCFeatureStats(num_classes=K, dim=d)
    nc.update(features.detach(), labels, logits=logits, weight=mask)   # every step, no sync
    values = nc.compute(W=head.class_vectors, b=head.class_bias)       # epoch end, all ranks
    nc.reset(); nc.roll_reference()        # this epoch's means -> next epoch's pivot/NCC ref

Design decisions:

* states are fixed-shape float64 sums with ``dist_reduce_fx="sum"`` (see
  :mod:`.functional_states`), ``persistent=True`` (mid-epoch resume; ``metric.persistent(False)``
  drops them from checkpoints); counts are float64 because samples may carry real weights;
* accumulation stays float64 under ``metric.to(torch.bfloat16)``, ``parent.half()`` and
  Lightning's precision plugins; only :meth:`set_dtype` changes the accumulation dtype (e.g.
  float32 on MPS); ``update`` runs no collective; the sync performs **one** ``all_reduce(SUM)``
  per state (both from the base class, :class:`~.sum_metric.SumStateMetric`);
* ``compute(W=None, b=None)`` syncs and returns a dict of float64 scalars; torchmetrics forwards
  the arguments. Callers that cannot pass them (``MetricCollection.compute()``) use
  :meth:`set_classifier` first. ``compute_with_cache`` defaults to False because the cache would
  ignore a changed ``W``. ``forward`` only accumulates (a per-batch NC value is meaningless);
* pivots and NCC reference means are buffers, not states (identical on all ranks, kept by
  ``reset``), both set by :meth:`set_reference`; NCC runs on raw features (Euclidean nearest
  reference mean, ties to the lowest index) and is counted only when references are set and
  ``logits`` (with bias) are passed;
* with ``MetricCollection`` pass ``compute_groups=False``: two collectors have identical state
  names and shapes, so compute groups would merge them and share sums accumulated against
  different pivots and references.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from hug_lightning.metrics import functional as NF  # noqa: N812
from hug_lightning.metrics import functional_states as FS  # noqa: N812
from hug_lightning.metrics.reference import PivotReference
from hug_lightning.metrics.sum_metric import SumStateMetric, all_reduce_sync

__all__ = ["NCCollector", "NCFeatureStats", "all_reduce_sync"]


class NCFeatureStats(PivotReference, SumStateMetric):
    """One-pass, DDP-summable neural-collapse statistics of (penultimate) features.

    Args:
        num_classes: ``K``.
        dim: Feature width ``d``.
        spherical: Also accumulate statistics of ``x / |x|`` (``*_sph`` metrics).
        track_cov: Accumulate the ``d x d`` second moments needed by ``nc1_pinv``.
        ncc: Keep the NCC counters (``nc4_ncc_mismatch``, ``ncc_accuracy``, ``linear_accuracy``).
        metrics: Subset of :data:`functional.METRIC_NAMES` to report (default: all but the
            one-vs-rest distances, ``functional.DEFAULT_NAMES``; ``"default"`` names that
            set); states that no selected metric needs (``S``, spherical twins, NCC
            counters) are skipped.
        global_mean: ``"class"`` (average of class means, default) or ``"sample"``.
        centered: Unit-vector NC2/GNC2 metrics (cosine std, max-angle deviation, ETF distance,
            max cosine, energies) on centred (default) or uncentred class means; equinorm is
            always on the centred means.
        acc_dtype: Accumulation dtype (float64; float32 only where float64 is unavailable).
        compute_device: Where ``compute`` runs its float64 linear algebra after the sync:
            ``"cpu"`` (default: a few hundred tiny operations, faster on the host than as GPU
            kernel launches; the states cross once) or ``None`` for the states' device.
        kwargs: torchmetrics ``Metric`` options (``process_group``, ``dist_sync_fn``, ...).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        num_classes: int,
        dim: int,
        spherical: bool = True,
        track_cov: bool = True,
        ncc: bool = True,
        metrics: Sequence[str] | None = None,
        global_mean: Literal["class", "sample"] = "class",
        centered: bool = True,
        acc_dtype: torch.dtype = torch.float64,
        compute_device: str | None = "cpu",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(acc_dtype=acc_dtype, **kwargs)
        self.compute_device = compute_device
        if int(num_classes) < 1 or int(dim) < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes}, {dim}")
        if global_mean not in ("class", "sample"):
            raise ValueError(f"global_mean must be 'class' or 'sample', got {global_mean!r}")
        want = NF.select_metrics(metrics)
        for flag, names, label in ((spherical, NF.SPH_NAMES, "spherical"),
                                   (track_cov, NF.COV_NAMES, "track_cov"),
                                   (ncc, NF.NCC_NAMES, "ncc")):  # fmt: skip
            if metrics is not None and not flag and want & set(names):
                raise ValueError(f"metrics {sorted(want & set(names))} need {label}=True")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.spherical = spherical and bool(want & set(NF.SPH_NAMES))
        self.track_cov = track_cov and bool(want & set(NF.COV_NAMES))
        self.ncc = ncc and bool(want & set(NF.NCC_NAMES))
        self.metrics, self.global_mean, self.centered = want, global_mean, centered
        states = FS.init_states(
            self.num_classes, self.dim, spherical=self.spherical, track_cov=self.track_cov,
            ncc=self.ncc, dtype=acc_dtype,
        )  # fmt: skip
        for name, default in states.items():
            self.add_state(name, default, dist_reduce_fx="sum", persistent=True)
        self._register_reference(acc_dtype)
        self._classifier: tuple[Tensor | None, Tensor | None] = (None, None)
        self._means: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ states
    def nc_states(self) -> dict[str, Tensor]:
        """Current (local, or synced inside ``compute``) states plus pivots, for functional use."""
        out = {name: getattr(self, name) for name in self._defaults}
        out["pivot"] = self.pivot
        if self.spherical:
            out["pivot_sph"] = self.pivot_sph
        return out

    # ------------------------------------------------------------------ accumulation
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        logits: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> None:
        """Accumulate a batch (no collective, no host sync).

        Args:
            features: ``(B, d)`` (or ``(..., d)``) features, any float dtype; cast to float64.
            labels: ``(B,)`` integer labels in ``[0, K)`` (checked for CPU tensors; on a GPU
                the check would wait for the device).
            logits: Optional ``(B, K)`` model scores, bias included; NCC counters are updated
                when these are given and reference means were set.
            weight: Optional ``(B,)`` non-negative weights; 0 drops a sample (padded duplicates
                of ``DistributedSampler``).
        """
        if features.shape[-1] != self.dim or features.shape[:-1] != labels.shape:  # no sync
            raise ValueError(f"NCFeatureStats(dim={self.dim}): features of shape "
                             f"{tuple(features.shape)} with labels of shape "
                             f"{tuple(labels.shape)}; expected (..., {self.dim}) and (...).")
        if labels.device.type == "cpu" and labels.numel():  # free there; on GPUs: a sync
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"NCFeatureStats(num_classes={self.num_classes}): label "
                                 f"{low if low < 0 else high} is outside [0, {self.num_classes}).")
        self._states_to_acc_dtype()  # guard against casts that bypassed _apply (e.g. loading)
        ref = self._has_reference and logits is not None
        FS.update_states(
            {name: getattr(self, name) for name in self._defaults},
            features.to(self.pivot.device),
            labels.to(self.pivot.device),
            weight=weight,
            logits=logits if ref else None,
            pivot=self.pivot,
            pivot_sph=self.pivot_sph if self.spherical else None,
            ref_means=self.ref_means if ref else None,
            ref_valid=self.ref_valid if ref else None,
        )

    def update_ncc(self, features: Tensor, labels: Tensor, predictions: Tensor) -> None:
        """Add a batch to the NCC counters only, against the current reference (no sync): the
        eval pass's second sweep (exact NC4). ``predictions``: the logits' argmax ``(B,)``."""
        if not (self.ncc and self._has_reference):
            raise RuntimeError("update_ncc needs ncc=True and a reference (set_reference).")
        FS.update_ncc_states({name: getattr(self, name) for name in FS.NCC_KEYS},
                             features.to(self.pivot.device), labels.to(self.pivot.device),
                             predictions, self.ref_means, self.ref_valid)

    def synced_means(self) -> Tensor:
        """Global class means ``(K, d)`` of the states so far (one all-reduce per state under
        DDP, local states kept; call on every rank); nan rows: absent classes."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=True):
            return NF.class_means(self.nc_states()).clone()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate only (same as :meth:`update`); returns ``None``."""
        self.update(*args, **kwargs)

    # ------------------------------------------------------------------ results
    def set_classifier(self, W: Tensor | None, b: Tensor | None = None) -> None:  # noqa: N803
        """Store ``W`` ``(K, d)`` and bias ``b`` ``(K,)`` for later argument-less ``compute()``."""
        self._classifier = (
            None if W is None else W.detach().to(torch.float64).clone(),
            None if b is None else b.detach().to(torch.float64).clone(),
        )
        self._computed = None

    def compute(
        self,
        W: Tensor | None = None,  # noqa: N803
        b: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Synced NC metrics (see :func:`functional.compute_nc_metrics`); call on every rank.

        Args:
            W: Classifier rows / class vectors ``(K, d)``; default: :meth:`set_classifier`'s.
            b: Bias ``(K,)`` (only ``bias_relation`` uses it).
        """
        if W is None:
            W = self._classifier[0]  # noqa: N806
            b = self._classifier[1] if b is None else b
        states = self.nc_states()
        if self.compute_device is not None:
            dev = torch.device(self.compute_device)
            states = {k: v.to(dev) for k, v in states.items()}
            W = None if W is None else W.detach().to(dev)  # noqa: N806
            b = None if b is None else b.detach().to(dev)
        self._means = {"raw": NF.class_means(states)}
        if self.spherical:
            self._means["sph"] = NF.class_means(states, spherical=True)
        return NF.compute_nc_metrics(
            states, W, b, self.metrics, global_mean=self.global_mean, centered=self.centered
        )

    def has_means(self) -> bool:
        """Whether :meth:`compute` has run (so :meth:`means` has values)."""
        return "raw" in self._means

    def means(self, spherical: bool = False) -> Tensor:
        """Global class means ``(K, d)`` from the last ``compute`` (nan rows: absent classes)."""
        key = "sph" if spherical else "raw"
        if key not in self._means:
            raise RuntimeError("call compute() first (and spherical=True needs spherical states)")
        return self._means[key].clone()

    def computed_means(self) -> dict[str, Tensor]:
        """The class means of the last ``compute`` (``"raw"``, and ``"sph"`` with spherical
        states; empty before any), on the CPU: for a checkpoint (they are not states)."""
        return {key: value.detach().cpu().clone() for key, value in self._means.items()}

    def restore_means(self, saved: dict[str, Tensor]) -> None:
        """Put back the means of :meth:`computed_means` (from a checkpoint): :meth:`means` and
        :meth:`has_means` then answer as after that ``compute`` (on this collector's device)."""
        self._means = {key: value.to(self.device, copy=True) for key, value in saved.items()}


NCCollector = NCFeatureStats
