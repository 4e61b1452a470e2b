"""A CSV logger resumed into its own version folder keeps the run's ``metrics.csv``.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it opens a version folder that is not
empty ("Previous log files in this directory will be deleted"), so ``fit --ckpt_path last``
resuming in place lost every row the run had logged before. :func:`keep_csv_history` puts the
file back once the logger has opened its folder, with its header as the logger's columns: the
resumed fit appends to it, and a column it adds rewrites the file with the wider header, rows
kept (the logger's own handling of new columns). The rows of the steps the resumed fit runs
again (a killed fit logged past its checkpoint) move to ``metrics.cut-<n>.csv`` when its
training starts (:mod:`hug_lightning.resumed_logs`).
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.csv_logs import CSVLogger as FabricCSVLogger
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def keep_csv_history(loggers: list[Any]) -> list[Path]:
    """Open each CSV logger of ``loggers`` (TensorBoard and others are left alone) whose version
    folder holds a ``metrics.csv``, keeping that file; returns the files kept.

    Call it before the logger's first write, on a fit resumed in place only: anywhere else the
    logger's fresh start is wanted (an evaluation never reuses a run's folder).
    """
    kept = []
    for logger in loggers:
        if not isinstance(logger, FabricCSVLogger):  # pytorch's CSVLogger subclasses it
            continue
        path = Path(logger.log_dir, "metrics.csv")
        if not path.is_file():
            continue
        content = path.read_bytes()
        header = next(csv.reader(io.StringIO(content.decode("utf-8"))), [])
        with warnings.catch_warnings():  # its "will be deleted": not here
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = logger.experiment  # opening the folder deletes metrics.csv
        path.write_bytes(content)
        writer.metrics_keys = list(header)  # the columns, in the file's order, to append to
        kept.append(path)
    return kept
