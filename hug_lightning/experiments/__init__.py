"""Experiment grids: run entries x seeds (fit, then test of the best checkpoint), tabulate.

Command line (``python -m hug_lightning.experiments``)::

    list                                   # the shipped grids
    run GRID [--seeds 0 1 2] [--out runs] [--jobs 1] [--dry-run] [--extra ARGS...]
    table GRID [--seeds 0 1] [--out runs]  # rebuild the results tables from finished runs

A grid (:mod:`.grid`) names entries, each a list of config files and CLI overrides; each
(entry, seed) is one run in ``<out>/<grid>/<entry>/seed<k>/``: ``python -m hug_lightning fit``
(seed via ``--seed_everything``), then ``test --ckpt_path <best checkpoint>``, each in a
subprocess (:mod:`.runner`, which also documents the resume policy). The table
(``<out>/<grid>/results.md`` and ``results.csv``, :mod:`.results`) reads every number from the
runs' TensorBoard events. Shipped grids: ``configs/grids/*.yaml``.

From Python::

    from hug_lightning.experiments import main, read_scalars
    main(["run", "my_grid.yaml", "--seeds", "0", "1"])
    read_scalars("runs/my_grid/ce/seed0/fit")["val/acc"]   # [(step, value), ...]
"""

from hug_lightning.experiments.cli import collect_results, main, write_tables
from hug_lightning.experiments.grid import Entry, Grid, load_grid, shipped_grids
from hug_lightning.experiments.results import NC_COLUMNS, last_values, read_scalars
from hug_lightning.experiments.runner import Run, best_checkpoint, grid_runs, run_all

__all__ = [
    "NC_COLUMNS",
    "Entry",
    "Grid",
    "Run",
    "best_checkpoint",
    "collect_results",
    "grid_runs",
    "last_values",
    "load_grid",
    "main",
    "read_scalars",
    "run_all",
    "shipped_grids",
    "write_tables",
]
