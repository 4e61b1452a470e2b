"""``predict`` writes what it computed: ``predictions.pt`` and ``.csv`` in the run folder.

Without a writer, Lightning's ``predict`` keeps the outputs in memory and a command-line run
throws them away. :class:`PredictionWriter` (the CLI's ``predictions`` group, on) concatenates
the outputs of :meth:`~hug_lightning.module.ClassifierModule.predict_step` over the whole
prediction set and saves

* ``predictions.pt``: a dict, ``index`` (the sample's index in the data set),
  ``pred`` (predicted class), ``label`` (when the data has labels) and ``logits`` (``N x K``;
  for HUG these are cosines to the proxies), loadable with ``torch.load(path)``;
* ``predictions.csv``: ``index,pred[,label][,pred_name][,label_name][,path]``, one row per
  sample; the names are the data module's ``class_names`` (CIFAR's class names, ImageNet's
  WNIDs; also ``class_names`` in ``predictions.pt``) when it has them; ``path`` (also a list
  in ``predictions.pt``) is the image file, for data sets read file by file (ImageNet). ``index``
  is the position in the data module's prediction (by default test) set, whose order for class
  folders is a fixed shuffle (seed 0) of the sorted files (torchvision's CIFAR: its own order).

With ``features`` on (``--predictions.features true``), ``predictions.pt`` also holds
``features``: the ``N x d`` float32 features the head sees
(:meth:`~hug_lightning.module.ClassifierModule.forward_features`, after the optional
embedding), in the rows of ``index``, for offline neural-collapse analysis. The writer asks the
module for them through its ``predict_features`` attribute (see :func:`predict_outputs`); the CSV
never holds them.

Under DDP every process writes its own shard, ``predictions-rank<r>.pt`` / ``.csv``; ``index``
puts them back together (the evaluation samplers do not pad, so every sample appears once).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

if TYPE_CHECKING:
    from hug_lightning.module import ClassifierModule


def predict_outputs(module: ClassifierModule, images: Tensor, features: bool) -> dict[str, Tensor]:
    """One batch's ``pred`` and ``logits``, and its ``features`` when asked: what
    :meth:`~hug_lightning.loop.ClassifierLoop.predict_step` returns, labels aside.

    Without features the logits are ``module(images)`` (a subclass's ``forward`` included). With
    them the features are computed once, ``module.forward_features(images)``, and the logits are
    ``module.head.logits(features)`` when ``forward`` is ``ClassifierModule``'s (which is exactly
    that: the same logits); a subclass overriding ``forward`` keeps its logits, at the cost of a
    second forward pass.

    Args:
        module: The module predicting (in eval mode, as ``predict`` puts it).
        images: The batch's images, on the module's device.
        features: Add ``features`` (``B x feature_dim``, in the forward's dtype).

    Returns:
        ``{"pred", "logits"}``, plus ``"features"`` when asked.
    """
    if not features:
        logits = module(images)
        return {"pred": logits.argmax(-1), "logits": logits}
    from hug_lightning.module import ClassifierModule  # here: module.py imports the loop

    found = module.forward_features(images)
    if type(module).forward is ClassifierModule.forward:
        logits = module.head.logits(found)
    else:
        logits = module(images)
    return {"pred": logits.argmax(-1), "logits": logits, "features": found}


class PredictionWriter(BasePredictionWriter):
    """Save the outputs of ``predict`` to the run folder (``trainer.log_dir``).

    With ``features`` on, the writer sets the module's ``predict_features`` attribute to
    ``True`` in its ``setup`` for ``predict`` and puts back the module's own value (``False``
    by default) in its ``teardown`` and when the run fails:
    :meth:`~hug_lightning.loop.ClassifierLoop.predict_step` returns ``features`` only then
    (Lightning keeps every batch's outputs until the end). A subclass with a ``predict_step``
    of its own reads that attribute the same way.

    Args:
        enabled: Write ``predictions.pt`` and ``predictions.csv`` at the end of ``predict``.
        logits: Also keep the ``N x K`` logits in ``predictions.pt`` (large for big ``K``).
        features: Also keep the ``N x d`` features the head sees (after the embedding), as
            float32, in ``predictions.pt`` (not in the CSV). Memory: ``N x d`` values held on
            the host until the end of ``predict``, in the forward's dtype (4 bytes each in
            float32: ImageNet val, 50,000 x 2,048, 410 MB; 2 under bf16, 8 under ``64-true``),
            and ``N x d x 4`` bytes more while the file is written.
    """

    def __init__(self, enabled: bool = True, logits: bool = True, features: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.enabled = enabled
        self.logits = logits
        self.features = features
        self.written: list[Path] = []
        self._asked: tuple[LightningModule, Any] | None = None  # (module, its earlier flag)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and self.enabled and self.features and self._asked is None:
            self._asked = (pl_module, getattr(pl_module, "predict_features", False))
            pl_module.predict_features = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._asked is not None:  # puts back what the module had (False by default)
            module, earlier = self._asked
            module.predict_features = earlier
            self._asked = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "predict")  # Lightning calls no teardown then

    @staticmethod
    def _flatten(nested: Sequence[Any]) -> list[Any]:
        """Lightning nests per-dataloader lists when there are several dataloaders."""
        if nested and isinstance(nested[0], list):
            return [item for group in nested for item in group]
        return list(nested)

    @staticmethod
    def _loader(trainer: Trainer) -> Any:
        """The prediction loader, or ``None`` when there are several (or none)."""
        loaders = getattr(trainer, "predict_dataloaders", None)
        if isinstance(loaders, (list, tuple)):
            return loaders[0] if len(loaders) == 1 else None
        return loaders

    def _dataset_paths(self, trainer: Trainer) -> Sequence[str] | None:
        """The image file of each sample, when the (single) prediction set keeps them (image
        folders read per file, e.g. ImageNet), else ``None``."""
        paths = getattr(getattr(self._loader(trainer), "dataset", None), "paths", None)
        return [str(p) for p in paths] if paths is not None else None

    @staticmethod
    def _class_names(trainer: Trainer, table: dict[str, Any]) -> list[str] | None:
        """The data module's ``class_names`` when they cover every label written, else None;
        also None (with a warning) when there are not ``num_classes`` of them: a subclass that
        renumbers the labels (merged classes) keeps the names of the labels it read."""
        datamodule = getattr(trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        if not names:
            return None
        num_classes = getattr(datamodule, "num_classes", None)
        if isinstance(num_classes, int) and len(names) != num_classes:
            rank_zero_warn(
                f"predict: {type(datamodule).__name__}.class_names has {len(names)} names for "
                f"its {num_classes} classes, so predictions.csv has no pred_name / label_name "
                "columns; a data module that renumbers its labels sets class_names (one per new "
                "label) in build_datasets.")
            return None
        written = [table[k] for k in ("pred", "label") if k in table]
        inside = all(0 <= int(t.min()) and int(t.max()) < len(names) for t in written)
        return [str(n) for n in names] if inside else None

    def _loader_indices(self, trainer: Trainer, n: int) -> list[int] | None:
        """The first ``n`` data set positions of a (single) prediction loader that lists them
        (``sample_indices()``, e.g. :class:`~hug_lightning.data.device_loader.DeviceBatchLoader`),
        else ``None``."""
        listed = getattr(self._loader(trainer), "sample_indices", None)
        found = listed() if callable(listed) else None
        return found[:n].tolist() if found is not None and len(found) >= n else None

    @staticmethod
    def _features(pl_module: LightningModule, outputs: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``{"features": N x d float32}`` from the outputs, or ``{}`` with a warning when the
        module's ``predict_step`` returned none."""
        if "features" not in outputs[0]:
            rank_zero_warn(
                f"predict: --predictions.features is on, but {type(pl_module).__name__}."
                "predict_step returned no `features`, so predictions.pt has none; a predict_step "
                "of its own adds them when `self.predict_features` is true (see "
                "hug_lightning.predictions.predict_outputs).")
            return {}
        return {"features": torch.cat([o["features"].detach().cpu().float() for o in outputs])}

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # same call on every rank
        outputs = [o for o in self._flatten(predictions) if isinstance(o, dict)]
        if not self.enabled or not outputs:
            return
        keys = [k for k in ("pred", "label", "logits") if k in outputs[0]
                and (k != "logits" or self.logits)]
        table = {k: torch.cat([o[k].detach().cpu() for o in outputs]) for k in keys}
        if self.features:
            table.update(self._features(pl_module, outputs))
        indices = [i for batch in self._flatten(batch_indices) for i in (batch or [])]
        n = len(table["pred"])
        if len(indices) != n:  # a loader Lightning cannot track (the device-resident one)
            indices = self._loader_indices(trainer, n) or indices
        if len(indices) == n:
            table["index"] = torch.as_tensor(indices, dtype=torch.long)
        elif trainer.world_size == 1:  # an iterable loader: Lightning cannot track indices,
            table["index"] = torch.arange(n)  # but one process sees the set in its order
        else:  # each rank's positions would repeat across the shards: say it, write -1
            table["index"] = torch.full((n,), -1, dtype=torch.long)
            rank_zero_warn("predict: the prediction loader does not let Lightning track sample "
                           "indices (an iterable data set), so under DDP `index` is -1 and the "
                           "shards cannot be merged by it; use a map-style data set "
                           "(CIFAR: device_resident false).")
        paths = self._dataset_paths(trainer)
        if paths is not None and len(indices) == n:
            table["path"] = [paths[i] for i in indices]
        names = self._class_names(trainer, table) if n else None
        named = {} if names is None else {f"{k}_name": [names[y] for y in table[k].tolist()]
                                          for k in ("pred", "label") if k in table}
        if names is not None:
            table["class_names"] = names
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        folder.mkdir(parents=True, exist_ok=True)
        pt_path, csv_path = folder / f"predictions{suffix}.pt", folder / f"predictions{suffix}.csv"
        torch.save(table, pt_path)
        rows = {**table, **named}
        columns = ["index", "pred"] + [c for c in ("label", "pred_name", "label_name", "path")
                                       if c in rows]
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(zip(*(rows[c] if isinstance(rows[c], list) else rows[c].tolist()
                                   for c in columns)))
        self.written = [pt_path, csv_path]
        rank_zero_info(f"predict: {n} predictions written to {pt_path} and {csv_path.name}")


__all__ = ["PredictionWriter", "predict_outputs"]
