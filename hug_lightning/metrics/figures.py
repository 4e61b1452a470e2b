"""TensorBoard figures of the class geometry, drawn with torch alone (no matplotlib needed).

* ``nc_fig/cos_means`` and ``nc_fig/cos_class_vectors``: K x K cosine heat maps (blue -1,
  white 0, red +1) of the centred class means and of the head's class vectors;
* ``nc_fig/angles_means`` / ``nc_fig/angles_class_vectors``: histograms of the pairwise angles
  in degrees;
* ``nc_fig/feature_norms``: histogram of feature norms on (this rank's) validation batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor


def cosine_matrix(vectors: Tensor, centre: bool = False) -> Tensor:
    """``(K, K)`` cosines between rows (optionally centred by their mean); NaN rows dropped."""
    v = vectors.detach().double()
    v = v[torch.isfinite(v).all(dim=1)]
    if centre:
        v = v - v.mean(dim=0, keepdim=True)
    u = F.normalize(v, dim=1)
    return (u @ u.T).clamp(-1.0, 1.0)


def heatmap_image(values: Tensor, scale: int = 4) -> Tensor:
    """``(3, K*scale, K*scale)`` RGB image of values in [-1, 1] with a blue-white-red map."""
    v = values.float().clamp(-1, 1)
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    red = 1.0 - neg
    green = 1.0 - pos - neg
    blue = 1.0 - pos
    img = torch.stack([red, green, blue]).clamp(0, 1)
    return img.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def pairwise_angles(cos: Tensor) -> Tensor:
    """Angles in degrees of the strict upper triangle of a cosine matrix."""
    i, j = torch.triu_indices(cos.shape[0], cos.shape[0], offset=1)
    return torch.rad2deg(torch.arccos(cos[i, j]))


def log_figures(logger: Any, step: int, means: Tensor, class_vectors: Tensor | None,
                feature_norms: Tensor | None = None) -> None:
    """Add the figures to a TensorBoard logger (does nothing for other loggers); without
    ``class_vectors`` only the figures of the class means."""
    writer = getattr(logger, "experiment", None)
    if writer is None or not hasattr(writer, "add_image"):
        return
    k = means.shape[0]
    scale = max(1, 256 // max(k, 1))
    pairs = [("means", means, True)]
    if class_vectors is not None:
        pairs.append(("class_vectors", class_vectors, False))
    for tag, vectors, centre in pairs:
        cos = cosine_matrix(vectors.cpu(), centre=centre)
        if cos.shape[0] < 2:
            continue
        writer.add_image(f"nc_fig/cos_{tag}", heatmap_image(cos, scale), step)
        writer.add_histogram(f"nc_fig/angles_{tag}", pairwise_angles(cos), step)
    if feature_norms is not None and feature_norms.numel():
        writer.add_histogram("nc_fig/feature_norms", feature_norms, step)
