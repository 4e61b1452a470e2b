"""``python -m hug_lightning.experiments {list,run,table}``: the grid runner's command line.

* ``list``: the shipped grids (``hug_lightning.configs/grids``) with their entries and seeds;
* ``run GRID [--seeds 0 1] [--out runs] [--jobs 1] [--dry-run] [--extra ARGS...]``: run (or
  resume) every entry x seed, then write ``<out>/<grid>/results.md`` and ``results.csv``;
  ``--extra`` must come last: everything after it is appended to each ``fit`` command
  (e.g. ``--extra --config gpu.yaml``);
* ``table GRID [--seeds 0 1] [--out runs]``: rebuild the two tables from the runs' ``result.json``
  files (of those seeds; default: every seed found).

``GRID`` is a YAML file or the name of a shipped grid (``paper_cifar10``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from hug_lightning.experiments.grid import Grid, load_grid, runner_flags, shipped_grids
from hug_lightning.experiments.results import build_table, markdown, write_csv
from hug_lightning.experiments.runner import dry_run, grid_runs, run_all

SEED_FOLDER = re.compile(r"^seed(0|-?[1-9][0-9]*)$")  # a run folder, as grid_runs names it


def collect_results(grid: Grid, out: str | Path,
                    seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The ``result.json`` of the finished runs of the grid's current entries, for ``seeds``
    (default: every seed found): the files the runner skips as done,
    ``<out>/<grid>/<entry>/seed<k>/result.json``, each as the run of its folder (a copy such
    as ``seed0.bak/`` or ``<entry>_old/`` is left out, as is a removed entry's folder)."""
    base = Path(out) / grid.name
    results = []
    for entry in grid.entries:
        for path in sorted((base / entry.name).glob("seed*/result.json")):
            match = SEED_FOLDER.match(path.parent.name)
            seed = int(match.group(1)) if match else None
            if seed is not None and (seeds is None or seed in set(seeds)):
                results.append({**json.loads(path.read_text()), "entry": entry.name,
                                "seed": seed})
    return results


def write_tables(grid: Grid, out: str | Path, seeds: Sequence[int] | None = None) -> Path | None:
    """Write ``results.md`` and ``results.csv`` of a grid; returns the Markdown path.

    ``results.md`` also names the runs of ``seeds`` (default: the grid's) with no result yet
    (unfinished or failed). Returns ``None`` (and writes nothing) when no run has finished yet.
    """
    results = collect_results(grid, out, seeds)
    if not results:
        return None
    columns, rows = build_table(results, order=[e.name for e in grid.entries])
    done = {(r["entry"], r["seed"]) for r in results}
    missing = [f"{e.name} seed {s}" for e in grid.entries
               for s in dict.fromkeys(seeds or grid.seeds) if (e.name, s) not in done]
    base = Path(out) / grid.name
    write_csv(base / "results.csv", columns, rows)
    md = base / "results.md"
    md.write_text(markdown(grid.name, grid.description, columns, rows, missing))
    return md


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hug_lightning.experiments",
                                     description="Run grids of hug-lightning experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the shipped grids")
    run = sub.add_parser("run", help="run (or resume) a grid, then write its results table")
    run.add_argument("grid", help="grid YAML file or shipped grid name")
    run.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the grid's)")
    run.add_argument("--out", default="runs", help="output folder (default: runs)")
    run.add_argument("--jobs", type=int, default=1, help="runs at the same time (default: 1)")
    run.add_argument("--dry-run", action="store_true", help="print the commands only")
    run.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                     help="arguments appended to every fit command (must come last)")
    table = sub.add_parser("table", help="rebuild results.md/results.csv from finished runs")
    table.add_argument("grid", help="grid YAML file or shipped grid name")
    table.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: all)")
    table.add_argument("--out", default="runs", help="output folder (default: runs)")
    return parser


def _list() -> int:
    grids = shipped_grids()
    for name, path in grids.items():
        grid = load_grid(path)
        print(f"{name}  ({path})")
        if grid.description:
            print(f"  {grid.description.splitlines()[0]}")
        print(f"  seeds: {list(grid.seeds)}; entries: {', '.join(e.name for e in grid.entries)}")
    if not grids:
        print("no shipped grids found")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (1: a run failed, 130: interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    own = {"--dry-run", "--seeds", "--out", "--jobs"}  # swallowed by --extra's REMAINDER
    misplaced = [a for a in getattr(args, "extra", []) if a.split("=")[0] in own]
    if misplaced:
        parser.error(f"{', '.join(misplaced)} after --extra would be passed to every fit: put "
                     "the runner's own options before --extra (it must come last).")
    why = runner_flags(getattr(args, "extra", []), "--extra")
    if why is not None:
        parser.error(why)
    if args.command == "list":
        return _list()
    try:
        grid = load_grid(args.grid)
    except (OSError, ValueError, TypeError) as err:  # a clear line, not a traceback
        parser.error(str(err))
    if args.command == "table":
        md = write_tables(grid, args.out, args.seeds)
        if md is None:
            which = f" of seed(s) {', '.join(map(str, args.seeds))}" if args.seeds else ""
            print(f"no finished run{which} under {Path(args.out) / grid.name}", file=sys.stderr)
            return 1
        print(md.read_text())
        return 0
    runs = grid_runs(grid, args.seeds or grid.seeds, Path(args.out))
    if args.dry_run:
        dry_run(runs, args.extra)
        return 0
    counts = run_all(runs, args.extra, jobs=args.jobs)
    md = write_tables(grid, args.out, args.seeds)  # --seeds: the table of those seeds
    if md is not None:
        print(md.read_text())
        print(f"table: {md} and {md.with_suffix('.csv')}")
    print(f"{grid.name}: {counts['done']} run(s) done, {counts['skipped']} skipped, "
          f"{counts['failed']} failed, {counts['interrupted']} interrupted")
    if counts["interrupted"]:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 1 if counts["failed"] else 0
