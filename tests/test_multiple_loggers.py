"""``trainer.logger`` as a list (``[CSVLogger, TensorBoardLogger]``): what only TensorBoard
takes (the NC figures, histograms and Projector embedding, the HPARAMS tab) reaches every
TensorBoard logger, whatever its place in the list, and the scalars reach every logger.

The figures and the tab went to ``trainer.logger``, the first logger only: with the CSV logger
first, the TensorBoard run had no image, histogram, embedding or hyperparameters at all.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from hug_lightning.cli import main

CSV = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "csv"}}
TB = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
      "init_args": {"name": "tb", "default_hp_metric": False}}


def _fit(save_dir: Path, loggers: list[dict]) -> None:
    """Two epochs of the UFM with figures every epoch, logging to ``loggers`` in ``save_dir``."""
    loggers = [{**logger, "init_args": {**logger["init_args"], "save_dir": str(save_dir)}}
               for logger in loggers]
    main(["fit", "--config", "ufm_hug", "--trainer.logger", json.dumps(loggers),
          "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
          "--nc.figures_every", "1", "--data.init_args.num_classes", "4",
          "--data.init_args.samples_per_class", "8", "--data.init_args.steps_per_epoch", "2",
          "--model.init_args.backbone.init_args.dim", "8"])


def _non_scalars(tb_run: Path) -> dict[str, list[int]]:
    """``{tag: steps}`` of the TensorBoard run's images, histograms and hparams summaries, and
    the Projector embeddings (``projector/<tensor path>``)."""
    found: dict[str, list[int]] = {}
    for events in sorted(tb_run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                plugin = value.metadata.plugin_data.plugin_name
                if kind in ("image", "histo") or plugin in ("images", "histograms", "hparams"):
                    found.setdefault(value.tag, []).append(event.step)
    projector = tb_run / "projector_config.pbtxt"
    for line in projector.read_text().splitlines() if projector.is_file() else ():
        if "tensor_path" in line:
            found[f"projector/{line.split(':', 1)[1].strip()}"] = []
    return found


def test_figures_and_hparams_reach_tensorboard_in_either_place(tmp_path):
    _fit(tmp_path / "alone", [TB])
    reference = _non_scalars(tmp_path / "alone" / "tb" / "version_0")
    assert {"nc_fig/cos_means", "nc_fig/intra_cos", "_hparams_/experiment"} <= set(reference)
    assert any(tag.startswith("projector/") for tag in reference)
    for order in ([CSV, TB], [TB, CSV]):
        save_dir = tmp_path / "_".join(logger["init_args"]["name"] for logger in order)
        _fit(save_dir, order)
        assert _non_scalars(save_dir / "tb" / "version_0") == reference, order
        with open(save_dir / "csv" / "version_0" / "metrics.csv") as f:  # scalars: every one
            columns = next(csv.reader(f))
        assert "val/acc" in columns and "nc/train_eval/nc1_pinv" in columns, order
