"""``trainer.logger`` as a list (``[CSVLogger, TensorBoardLogger]``): what only TensorBoard
takes (the NC figures, histograms and Projector embedding, the HPARAMS tab) reaches every
TensorBoard logger, whatever its place in the list, and the scalars reach every logger. The
CLI's run folders (``--ckpt_path last|best``, the write check) take a list as well.

The figures and the tab went to ``trainer.logger``, the first logger only: with the CSV logger
first, the TensorBoard run had no image, histogram, embedding or hyperparameters at all.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from lightning.pytorch.loggers import Logger
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from hug_lightning.cli import main
from hug_lightning.cli_errors import LogFolderError

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


def _run(subcommand: str, save_dir: Path, loggers: list[dict], *extra: str):
    """``subcommand`` of the UFM (validation every epoch) logging to ``loggers`` under
    ``save_dir``; returns the CLI."""
    loggers = [{**logger, "init_args": {**logger["init_args"],
                                        "save_dir": str(save_dir / logger["init_args"].pop(
                                            "save_dir", ""))}}
               for logger in json.loads(json.dumps(loggers))]
    return main([subcommand, "--config", "ufm_hug", "--trainer.logger", json.dumps(loggers),
                 "--trainer.check_val_every_n_epoch", "1", "--nc.figures_every", "0",
                 "--data.init_args.num_classes", "4", "--data.init_args.samples_per_class", "8",
                 "--data.init_args.steps_per_epoch", "2",
                 "--model.init_args.backbone.init_args.dim", "8", *extra])


def _epochs(metrics: Path) -> list[int]:
    """The epochs of a CSV logger's validation rows (``val/acc`` logged)."""
    with open(metrics) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/acc")]


@pytest.mark.parametrize("csv_place", ["same", "own"])
def test_a_list_of_loggers_resumes_in_place_and_evaluates_in_new_folders(tmp_path, csv_place):
    """``trainer.logger: [TensorBoardLogger, CSVLogger]``: ``--ckpt_path last|best`` stopped
    with "needs a TensorBoard/CSV logger"; with one experiment the CSV logger wrote the next
    version (``version_1``) beside TensorBoard's. The run is the first logger's folder (its
    checkpoints); every logger resumes into its own folder of the run (the run's version, also
    under another save_dir/name), the CSV rows before the resume kept; an evaluation logs into
    a new version for every logger."""
    tb = {**TB, "init_args": {**TB["init_args"], "name": "exp"}}
    other = {"name": "exp"} if csv_place == "same" else {"name": "csv", "save_dir": "csvroot"}
    loggers = [tb, {**CSV, "init_args": other}]
    run = tmp_path / "exp" / "version_0"
    csv_run = run if csv_place == "same" else tmp_path / "csvroot" / "csv" / "version_0"
    first = _run("fit", tmp_path, loggers, "--trainer.max_epochs", "1")
    assert [Path(logger.log_dir) for logger in first.trainer.loggers] == [run, csv_run]
    assert _epochs(csv_run / "metrics.csv") == [0]
    cli = _run("fit", tmp_path, loggers, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert cli.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert [Path(logger.log_dir) for logger in cli.trainer.loggers] == [run, csv_run]
    assert (run / "config.yaml").is_file() and (run / "config.resume-1.yaml").is_file()
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # both fits' TensorBoard events
    assert _epochs(csv_run / "metrics.csv") == [0, 1]  # the first fit's row kept, one added
    best = cli.trainer.checkpoint_callback.best_model_path
    kept = (csv_run / "metrics.csv").read_bytes()
    cli = _run("test", tmp_path, loggers, "--ckpt_path", "best")
    assert cli.trainer.ckpt_path == best and Path(best).parent.parent == run
    new = [run.with_name("version_1"), csv_run.with_name("version_1")]
    assert [Path(logger.log_dir) for logger in cli.trainer.loggers] == new
    assert (new[1] / "metrics.csv").is_file() and (csv_run / "metrics.csv").read_bytes() == kept


def test_the_write_check_covers_every_loggers_folder(tmp_path):
    """The check ran for a single logger only: a list's unwritable save_dir failed later."""
    (tmp_path / "a_file").write_text("")
    loggers = [TB, {**CSV, "init_args": {"name": "csv", "save_dir": "a_file/logs"}}]
    with pytest.raises(LogFolderError, match="a_file/logs"):
        _run("fit", tmp_path, loggers, "--trainer.max_epochs", "1")


class SaveDirLogger(Logger):
    """A logger with a ``save_dir`` and no ``version`` option (as MLflow's): not a run folder."""

    def __init__(self, save_dir: str = "./other") -> None:
        super().__init__()
        self._save_dir = save_dir

    name = property(lambda self: "other")
    version = property(lambda self: "run")
    save_dir = property(lambda self: self._save_dir)

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001
        pass

    def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001
        pass


def test_a_logger_without_version_folders_is_left_alone(tmp_path):
    """``--ckpt_path last`` set ``version`` on every logger with a ``save_dir``: one that takes
    no such option failed the parse ("Option 'version' is not accepted", exit 2), and a
    ``version`` would be W&B's run id."""
    other = {"class_path": f"{__name__}.SaveDirLogger", "init_args": {"save_dir": "other"}}
    tb = {**TB, "init_args": {**TB["init_args"], "name": "exp"}}
    run = tmp_path / "exp" / "version_0"
    _run("fit", tmp_path, [tb, other], "--trainer.max_epochs", "1", "--nc.enabled", "false")
    cli = _run("fit", tmp_path, [tb, other], "--trainer.max_epochs", "2", "--nc.enabled",
               "false", "--ckpt_path", "last")
    assert cli.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert [type(logger) for logger in cli.trainer.loggers][1] is SaveDirLogger
    assert Path(cli.trainer.loggers[0].log_dir) == run
    cli = main(["validate", "--config", str(run / "config.resume-1.yaml"), "--ckpt_path", "last"])
    assert Path(cli.trainer.loggers[0].log_dir) == run.with_name("version_1")
