"""TensorBoard figures of the class geometry, drawn with torch alone (no matplotlib needed).

* ``nc_fig/cos_means`` and ``nc_fig/cos_class_vectors``: K x K cosine heat maps (blue -1,
  white 0, red +1) of the centred class means and of the head's class vectors;
* ``nc_fig/angles_means`` / ``nc_fig/angles_class_vectors``: histograms of the pairwise angles
  in degrees;
* ``nc_fig/feature_norms``: histogram of feature norms on (this rank's) validation batches;
* ``nc_fig/intra_cos``: histogram of the cosines between same-class features, and
  ``nc_fig/val_features``: a Projector embedding (labels as metadata), both of a fixed sample
  (:class:`FeatureSample`: up to 1000 validation features of the epoch, class-balanced, this
  rank's).
"""

from __future__ import annotations

from pathlib import Path
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


def figure_epoch(every: int, trainer: Any) -> bool:
    """Whether ``trainer``'s epoch logs figures: every ``every``-th epoch (0: never), on rank 0
    (the only one that logs them, so the only one that collects for them)."""
    return bool(every) and (trainer.current_epoch + 1) % every == 0 and trainer.is_global_zero


def intra_class_cosines(features: Tensor, labels: Tensor) -> Tensor:
    """Cosines of every same-class pair ``i < j`` of a sample of features."""
    u = F.normalize(features.detach().double(), dim=1)
    i, j = torch.triu_indices(u.shape[0], u.shape[0], offset=1)
    same = labels[i] == labels[j]
    return (u @ u.T)[i[same], j[same]].clamp(-1.0, 1.0)


def keep_earlier_embeddings(writer: Any, step: int) -> None:
    """Let a new ``SummaryWriter`` append to the run folder's ``projector_config.pbtxt``.

    The writer rewrites that file with the embeddings it added itself (its own
    ``_projector_config``), so in a fit resumed into its folder (``--ckpt_path last``, the grid
    runner's resume) the Projector lost every earlier epoch's embedding. Before the writer's
    first embedding (at ``step``), the file's entries logged before ``step`` are read into its
    config; those at ``step`` or later (a resume from an earlier checkpoint logs them again)
    are left out, so none is listed twice (another kind of writer, without ``get_logdir``, or
    an unreadable file: nothing is done).
    """
    get_logdir = getattr(writer, "get_logdir", None)
    if hasattr(writer, "_projector_config") or not callable(get_logdir):
        return
    path = Path(get_logdir()) / "projector_config.pbtxt"
    if not path.is_file():
        return
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    try:
        config = text_format.Parse(path.read_text(), ProjectorConfig())
    except (OSError, text_format.ParseError):
        return
    earlier = [e for e in config.embeddings if not _logged_from(e.tensor_path, step)]
    del config.embeddings[:]
    config.embeddings.extend(earlier)
    writer._projector_config = config


def _logged_from(tensor_path: str, step: int) -> bool:
    """Whether an embedding's ``<step:05d>/<tag>/tensors.tsv`` was logged at ``step`` or later."""
    first = tensor_path.split("/", 1)[0]
    return first.isdigit() and int(first) >= step


class FeatureSample:
    """A class-balanced sample of an epoch's features and labels (float32, on the CPU): at
    most ``ceil(size / num_classes)`` per class, the first met of each (a validation set stored
    class by class, as image folders are, would otherwise give one class). It feeds the
    Projector embedding ``nc_fig/val_features`` and the histogram ``nc_fig/intra_cos``.
    """

    def __init__(self, size: int = 1000, num_classes: int | None = None) -> None:
        self.size = int(size)
        self.num_classes = num_classes
        self.clear()

    def clear(self) -> None:
        """Forget the sample (at the start of an epoch)."""
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.counts: Tensor | None = None

    def add(self, features: Tensor, labels: Tensor) -> None:
        """Keep the rows of a batch whose class is not full yet (one class without
        ``num_classes``)."""
        k = int(self.num_classes or 1)
        cap, left = -(-self.size // k), self.size - sum(len(y) for y in self.labels)
        if self.counts is None:
            self.counts = torch.zeros(k, dtype=torch.long)
        if left <= 0 or bool((self.counts >= cap).all()):
            return
        y = labels.detach().long().cpu()
        group = y if k > 1 else torch.zeros_like(y)
        one_hot = F.one_hot(group, k)
        place = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # rank of the row within its class
        keep = self.counts[group] + place < cap
        keep &= keep.cumsum(0) <= left
        if bool(keep.any()):
            self.counts += torch.bincount(group[keep], minlength=k)
            self.features.append(features.detach()[keep.to(features.device)].float().cpu())
            self.labels.append(y[keep])

    def log(self, logger: Any, step: int) -> None:
        """Add the embedding and the histogram to a TensorBoard logger (others: nothing)."""
        writer = getattr(logger, "experiment", None)
        if not self.features or writer is None or not hasattr(writer, "add_embedding"):
            return
        x, y = torch.cat(self.features), torch.cat(self.labels)
        keep_earlier_embeddings(writer, step)
        # labels as a single metadata column, without metadata_header (PyTorch #38564)
        writer.add_embedding(x, metadata=y.tolist(), global_step=step, tag="nc_fig/val_features")
        cos = intra_class_cosines(x, y)
        if cos.numel():
            writer.add_histogram("nc_fig/intra_cos", cos, step)
