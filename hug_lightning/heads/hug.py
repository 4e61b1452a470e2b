"""HUG head: learnable class proxies trained with the hyperspherical uniformity gap loss."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from hug_lightning.heads.base import Head, HeadOutput
from hug_lightning.losses.hug import CountSync, HUGConfig, check_inputs, hug_terms
from hug_lightning.losses.uniformity import l2_normalize, no_autocast


class HUGHead(Head):
    """Proxy head trained with HUG: ``alpha * inter(W) + beta * intra(h, W, y)``.

    The defaults reproduce the authors' released ``HUG_MHE`` (alpha = beta = 1, Riesz s = 2
    energy averaged over proxy pairs, class-balanced mean of the Euclidean distance between each
    normalized feature and the stop-gradient normalized proxy of its class). Prediction is the
    nearest proxy by cosine: :meth:`logits` returns the cosines, ``(B, K)`` in ``[-1, 1]``.
    The paper quotes alpha = 0.15 with beta = 0.015 (MHE, MHS) or 0.03 (MGD). The loss is
    computed in float32 under bf16/fp16 autocast, and both terms are computed (and logged as
    ``inter`` and ``intra``) even when their weight is 0, so the proxies never leave the graph.

    Distributed training (Lightning DDP: each rank computes the loss on its local batch and the
    gradients are averaged over the ``R`` ranks). The inter term uses all ``K`` proxies, which are
    identical on every rank, so its gradient is the same everywhere and the average equals the
    single-process gradient. The intra term is computed on the local batch:

    * ``sync_class_counts=True`` (default): the module gives the head a
      :class:`~hug_lightning.losses.hug.CountSync` under DDP; each step all-reduces the batch's
      ``K`` class counts (one small collective) and rank ``r`` weighs its sample ``i`` by
      ``R / (|C| n_{y_i})`` with ``C`` and ``n`` over the GLOBAL batch (``R / B`` for
      ``per_sample``). The average of the ranks' gradients is then exactly the single-process
      gradient on the global batch (tested with 2 processes), and the mean over ranks of the
      logged ``intra`` is its single-process value (each rank's own value is its share times R);
    * ``sync_class_counts=False``: each rank balances over its LOCAL batch, as the released code
      does per GPU: DDP optimizes ``(1/R) sum_r (1/|C_r|) sum_{c in C_r} mean_{i in r, y_i=c}
      dist_i``, i.e. sample ``i`` of rank ``r`` weighs ``1 / (R |C_r| n_{r,y_i})`` instead of
      ``1 / (|C| n_{y_i})``. With random shards this is far from one process (per-sample weights
      0.3x to 7x at K = 100, 512 per rank), unless every rank holds the same classes with
      ``n_{r,c} = n_c / R``. ``per_sample`` agrees with one process when the local batch sizes
      are equal.

    Gradient accumulation (``trainer.accumulate_grad_batches: k``): the loss is computed on each
    micro-batch, divided by ``k`` (Lightning), and the gradients are summed, so sample ``i`` of
    micro-batch ``j`` weighs ``1 / (k b_j)`` with ``per_sample``: exactly the full batch's
    ``1 / B`` when the ``k`` micro-batches have the same size (a shorter last micro-batch, or a
    last window of fewer than ``k`` batches, which Lightning still divides by ``k``, weighs
    otherwise). With ``class_balanced`` it weighs ``1 / (k |C_j| n_{j,y_i})`` instead of
    ``1 / (|C| n_{y_i})``: the classes are balanced per micro-batch, as per rank with
    ``sync_class_counts=False``, which equals the full batch only when every micro-batch holds
    its classes in the same proportions (measured on the UFM, 40 samples, 4 steps: batches of
    10 accumulated by 2 end 10 % away from batches of 20 on the features; tested against the
    closed forms). ``sync_class_counts`` balances each micro-step over the ranks, not over the
    window. The inter term's gradient is exact (it depends on the proxies only, unchanged
    within the window). The logged ``loss``, ``inter`` and ``intra`` of a step are the window's
    last micro-batch's.

    Args:
        num_classes: Number of classes ``K`` (at least 2). Filled in by the module.
        in_features: Feature width ``d``. Filled in by the module.
        variant: Inter-class uniformity term on the normalized proxies: ``"mhe"`` (minimum
            hyperspherical energy, Riesz energy averaged over pairs; released form), ``"mhs"``
            (maximum hyperspherical separation, ``-min`` pairwise squared distance) or ``"mgd"``
            (maximum Gram determinant, ``-logdet`` of the Gaussian-kernel Gram matrix, via a
            float64 LU: the slowest variant, about 3 ms of GPU time per step at K = 1000).
        alpha: Weight of the inter-class term, ``>= 0``.
        beta: Weight of the intra-class term, ``>= 0`` (alpha and beta cannot both be 0).
        energy_s: Riesz exponent of ``"mhe"``: 2 (released, ``1/||w_c - w_c'||^2``), 1
            (``1/||w_c - w_c'||``) or 0 (log energy ``log(1/||w_c - w_c'||)``).
        mhs_mode: ``"hard"`` (the authors' form: gradient only on the closest pair) or ``"soft"``
            (NOT the authors' form: smooth soft-min ``tau * logsumexp(-D^2/tau)`` over pairs).
            Hard MHS moves one pair per step: in the UFM it stalls short of the optimum
            (measured: 96.19 deg of 96.38 for K=10, d=512; 85 of 90 for the orthoplex; 51 of 90
            in the Rankin regime K=100, d=64), where ``"soft"`` reaches 89.2 in the Rankin one.
        mhs_tau: Temperature of the soft MHS, positive; used only with ``mhs_mode="soft"``.
        mgd_jitter: Added to the diagonal of the MGD Gram matrix before the log-determinant
            (``>= 0``; keeps it finite when proxies coincide).
        mgd_normalize: Divide the MGD ``-logdet`` by ``K`` (package default; a per-class scale
            comparable across ``K``). ``False`` gives the plain ``-logdet``.
        intra_power: 1 for the Euclidean distance ``||x_i - w_{y_i}||`` (released), 2 for the
            squared distance (stronger pull far from the proxy, weaker near it).
        intra_reduction: ``"class_balanced"`` (released: mean over the classes present in the
            batch of the per-class mean distance) or ``"per_sample"`` (plain mean over the batch).
        detach_proxy: Stop the intra term's gradient into the proxies (released: ``True``); the
            proxies then move only under the inter term and weight decay.
        eps: Floor on squared norms and squared distances, positive: rows with norm below
            ``sqrt(eps)`` are divided by ``sqrt(eps)`` (a zero feature gives a finite loss and
            gradient), the MHE energy uses ``max(||w_c - w_c'||^2, floor)`` with ``floor =
            max(eps, 64 machine epsilons)`` (``7.6e-6`` in float32: coincident proxies cost a
            large finite penalty, not NaN/Inf or rounding noise; being constant below the
            floor, it has no gradient there, so proxies closer than about 0.16 degree in float32
            are not pushed apart), and with ``intra_power=1`` the
            gradient of a distance below ``sqrt(eps)`` is set to 0 (the distance is exact).
        proxy_init: ``"normal"``: i.i.d. Gaussian rows normalized to unit norm; ``"orthogonal"``:
            ``nn.init.orthogonal_`` then rows normalized (orthonormal rows when ``K <= d``).
        sync_class_counts: Under DDP, make the intra term's class balancing (or batch mean)
            global: one all-reduce of ``K`` numbers per step (see "Distributed training" in
            the ``HUGHead`` class docstring).
        check_labels: Check that labels lie in ``[0, K)`` on every call, also on GPU (this reads the
            labels' min and max back to the host: a sync per step). Labels on CPU are always
            checked, since that costs no device sync. With the module's ``compile_loss`` the
            module checks them before the compiled step (inside it, the read would break the
            graph).
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        variant: Literal["mhe", "mhs", "mgd"] = "mhe",
        alpha: float = 1.0,
        beta: float = 1.0,
        energy_s: Literal[0, 1, 2] = 2,
        mhs_mode: Literal["hard", "soft"] = "hard",
        mhs_tau: float = 0.1,
        mgd_jitter: float = 1e-6,
        mgd_normalize: bool = True,
        intra_power: Literal[1, 2] = 1,
        intra_reduction: Literal["class_balanced", "per_sample"] = "class_balanced",
        detach_proxy: bool = True,
        eps: float = 1e-8,
        proxy_init: Literal["normal", "orthogonal"] = "normal",
        sync_class_counts: bool = True,
        check_labels: bool = False,
    ) -> None:
        super().__init__(num_classes, in_features)
        self.config = HUGConfig(
            variant=variant,
            alpha=float(alpha),
            beta=float(beta),
            energy_s=energy_s,
            mhs_mode=mhs_mode,
            mhs_tau=float(mhs_tau),
            mgd_jitter=float(mgd_jitter),
            mgd_normalize=mgd_normalize,
            intra_power=intra_power,
            intra_reduction=intra_reduction,
            detach_proxy=detach_proxy,
            eps=float(eps),
        )
        if proxy_init not in ("normal", "orthogonal"):
            raise ValueError(
                f"HUGHead: proxy_init must be 'normal' or 'orthogonal', got {proxy_init!r}."
            )
        self.proxy_init = proxy_init
        self.sync_class_counts = bool(sync_class_counts)
        #: set by the module under DDP (see ``sync_class_counts``); None: local statistics
        self.count_sync: CountSync | None = None
        self.check_labels = bool(check_labels)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the proxies again (``proxy_init``) and normalize the rows to unit norm."""
        with torch.no_grad():
            if self.proxy_init == "orthogonal":
                nn.init.orthogonal_(self.proxies)
            else:
                nn.init.normal_(self.proxies, std=1.0 / math.sqrt(self.in_features))
            self.proxies.copy_(l2_normalize(self.proxies, self.config.eps))

    @property
    def class_vectors(self) -> Tensor:
        return self.proxies

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_classes={self.num_classes}, in_features={self.in_features}, "
            f"variant={c.variant!r}, alpha={c.alpha}, beta={c.beta}"
        )

    def _validate(self, features: Tensor, labels: Tensor) -> None:
        check_inputs(features, self.proxies, labels)
        if torch.compiler.is_compiling():  # reading labels back is a graph break: the module
            return  # checks them before a compiled step (every batch when check_labels is set)
        if self.check_labels or labels.device.type == "cpu":  # CPU labels: free to check
            lo, hi = int(labels.min()), int(labels.max())
            for value in (lo, hi):
                if not 0 <= value < self.num_classes:
                    raise ValueError(
                        f"HUGHead: label {value} out of range for num_classes={self.num_classes} "
                        f"(labels must lie in [0, {self.num_classes - 1}])."
                    )

    def _sync(self) -> CountSync | None:
        return self.count_sync if self.sync_class_counts and self.training else None

    def logits(self, features: Tensor) -> Tensor:
        # float32 cosines also under bf16 autocast: bf16 resolves only ~4e-3 near 1, so close
        # proxies would tie or swap in the argmax
        with no_autocast(features.device.type):
            x = l2_normalize(features, self.config.eps)
            w = l2_normalize(self.proxies, self.config.eps)
            return x @ w.T

    def loss(self, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._validate(features, labels)
        out, _ = hug_terms(features, self.proxies, labels, self.config, self._sync())
        return out.total, {"inter": out.inter.detach(), "intra": out.intra.detach()}

    def forward_train(self, features: Tensor, labels: Tensor) -> HeadOutput:
        # the loss returns the normalized rows [x; w]: the logits reuse them (one matmul)
        self._validate(features, labels)
        out, unit = hug_terms(features, self.proxies, labels, self.config, self._sync())
        b = features.shape[0]
        with torch.no_grad(), no_autocast(features.device.type):  # float32 cosines
            logits = unit[:b] @ unit[b:].T
        terms = {"inter": out.inter.detach(), "intra": out.intra.detach()}
        return HeadOutput(out.total, terms, logits)


__all__ = ["HUGHead"]
