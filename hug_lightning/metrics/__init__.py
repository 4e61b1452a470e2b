"""Neural-collapse metrics: pure functions from one-pass sum states, and a torchmetrics collector.

* :mod:`.functional_states`: the DDP-summable sufficient statistics (init / update / rebase).
* :mod:`.functional` and :mod:`.functional_geometry`: states (and classifier ``W, b``) -> metrics,
  float64, no Lightning; :func:`compute_nc_metrics` returns the names in :data:`METRIC_NAMES`.
* :mod:`.ovr`: the one-vs-rest distance (Jiang GNC2) with its certified error, on request.
* :mod:`.collapse`: :class:`NCFeatureStats`, the epoch collector (one ``all_reduce`` per state).

Conventions (class-average global mean,
``Sigma_W`` with 1/N, ddof 1, NC1-pinv with 1/K_eff and rank min(K_eff-1, d), Galanti's CDNV,
energies as means over unordered pairs).
"""

from hug_lightning.metrics.collapse import NCCollector, NCFeatureStats, all_reduce_sync
from hug_lightning.metrics.functional import (
    METRIC_NAMES,
    class_means,
    class_variances,
    compute_nc_metrics,
    nc1_cdnv,
    nc1_pinv,
    nc1_trace_ratio,
    within_class_cov,
    within_class_trace,
)
from hug_lightning.metrics.functional_geometry import (
    cosine_stats,
    equinorm,
    etf_distance,
    log_energy,
    nc3_cos,
    nc3_self_duality,
    riesz_energy,
)
from hug_lightning.metrics.ovr import one_vs_rest_distance
from hug_lightning.metrics.functional_states import (
    feature_states,
    init_states,
    ncc_predict,
    rebase_states,
    update_states,
)

__all__ = [
    "METRIC_NAMES",
    "NCCollector",
    "NCFeatureStats",
    "all_reduce_sync",
    "class_means",
    "class_variances",
    "compute_nc_metrics",
    "cosine_stats",
    "equinorm",
    "etf_distance",
    "feature_states",
    "init_states",
    "log_energy",
    "nc1_cdnv",
    "nc1_pinv",
    "nc1_trace_ratio",
    "nc3_cos",
    "nc3_self_duality",
    "ncc_predict",
    "one_vs_rest_distance",
    "rebase_states",
    "riesz_energy",
    "update_states",
    "within_class_cov",
    "within_class_trace",
]
