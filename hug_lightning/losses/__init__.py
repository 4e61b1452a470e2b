"""Pure HUG loss functions (no Lightning): inter-class uniformity terms and the HUG loss."""

from hug_lightning.losses.hug import (
    HUGConfig,
    HUGLossOutput,
    check_inputs,
    class_balanced_weights,
    hug_loss,
    hug_terms,
)
from hug_lightning.losses.uniformity import (
    InterSpec,
    as_loss_dtype,
    l2_normalize,
    mgd_loss,
    mhs_loss,
    pairwise_sq_distances,
    riesz_energy,
)

__all__ = [
    "HUGConfig",
    "HUGLossOutput",
    "InterSpec",
    "as_loss_dtype",
    "check_inputs",
    "class_balanced_weights",
    "hug_loss",
    "hug_terms",
    "l2_normalize",
    "mgd_loss",
    "mhs_loss",
    "pairwise_sq_distances",
    "riesz_energy",
]
