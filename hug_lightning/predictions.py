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

Under DDP every process writes its own shard, ``predictions-rank<r>.pt`` / ``.csv``; ``index``
puts them back together (the evaluation samplers do not pad, so every sample appears once).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class PredictionWriter(BasePredictionWriter):
    """Save the outputs of ``predict`` to the run folder (``trainer.log_dir``).

    Args:
        enabled: Write ``predictions.pt`` and ``predictions.csv`` at the end of ``predict``.
        logits: Also keep the ``N x K`` logits in ``predictions.pt`` (large for big ``K``).
    """

    def __init__(self, enabled: bool = True, logits: bool = True) -> None:
        super().__init__(write_interval="epoch")
        self.enabled = enabled
        self.logits = logits
        self.written: list[Path] = []

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

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # same call on every rank
        outputs = [o for o in self._flatten(predictions) if isinstance(o, dict)]
        if not self.enabled or not outputs:
            return
        keys = [k for k in ("pred", "label", "logits") if k in outputs[0]
                and (k != "logits" or self.logits)]
        table = {k: torch.cat([o[k].detach().cpu() for o in outputs]) for k in keys}
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


__all__ = ["PredictionWriter"]
