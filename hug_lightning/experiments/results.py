"""Read the runs' TensorBoard events and write the grid's results table (Markdown and CSV).

Every number comes from the runs' own event files: a run's ``result.json`` holds the last
logged value of every scalar of its ``fit`` and ``test`` folders, and the table picks:

* every ``test/*`` scalar the test run logged (``test/acc`` first, then ``test/ece``, then the
  others sorted, e.g. ``test/robust/<attack>_eps<k>``, ``test/robust/corruption_mean``), except
  ``test/loss`` and, when ``test/robust/corruption_mean`` is logged, the per-severity
  ``test/robust/<corruption>_s<k>`` values (they stay in ``result.json``);
* ``val/acc_best`` from the fit run;
* the final neural-collapse metrics of :data:`NC_COLUMNS`, each from the first stage logged.

Rows: one per run, then per entry ``mean ± std`` over its seeds (sample std, ddof 1; only the
mean for a single seed); a cell whose metric only some of the runs logged says over how many
(``0.91 (n=2)`` in a ``n=3`` row). In the CSV the summary is two rows with seed ``mean`` and
``std``.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

#: Table column -> tags tried in order (the last logged value of the first one present).
NC_COLUMNS: dict[str, tuple[str, ...]] = {
    "nc1_pinv": ("nc/train_eval/nc1_pinv", "nc/train/nc1_pinv", "nc/val/nc1_pinv"),
    "gnc2_min_angle_weights": ("nc/train_eval/gnc2_min_angle_weights",
                               "nc/train/gnc2_min_angle_weights",
                               "nc/val/gnc2_min_angle_weights", "geometry/min_angle"),
    "nc3_self_duality": ("nc/train_eval/nc3_self_duality", "nc/train/nc3_self_duality",
                         "nc/val/nc3_self_duality"),
    "ncc_accuracy": ("nc/val/ncc_accuracy", "nc/train_eval/ncc_accuracy",
                     "nc/train/ncc_accuracy"),
}
FIT_COLUMNS = ("val/acc_best",)
_SEVERITY = re.compile(r"^test/robust/.+_s\d+$")


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a TensorBoard log folder: ``{tag: [(step, value), ...]}`` by step.

    Event files of a resumed run are read in order; values re-logged after a restart replace
    the older ones (TensorBoard's purge of orphaned steps). A missing folder gives ``{}``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(run_dir).is_dir():
        return {}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        latest: dict[int, tuple[float, float]] = {}  # step -> (wall time, value): newest wins
        for e in events.Scalars(tag):
            if int(e.step) not in latest or e.wall_time >= latest[int(e.step)][0]:
                latest[int(e.step)] = (e.wall_time, float(e.value))
        out[tag] = [(step, value) for step, (_, value) in sorted(latest.items())]
    return out


def last_values(run_dir: str | Path) -> dict[str, float]:
    """The last logged value (highest step, latest write) of every scalar of a log folder."""
    return {tag: values[-1][1] for tag, values in read_scalars(run_dir).items() if values}


def test_columns(results: list[dict[str, Any]]) -> list[str]:
    """The ``test/*`` columns of the table (see the module docstring)."""
    tags = {t for r in results for t in r.get("test", {}) if t.startswith("test/")}
    tags.discard("test/loss")
    if "test/robust/corruption_mean" in tags:
        tags = {t for t in tags if not _SEVERITY.match(t)}
    first = [t for t in ("test/acc", "test/ece") if t in tags]
    return first + sorted(tags - set(first))


def row_values(result: dict[str, Any], columns: list[str]) -> dict[str, float]:
    """Values of one run for the table's columns (absent ones left out)."""
    test, fit = result.get("test", {}), result.get("fit", {})
    out = {c: test[c] for c in columns if c in test}
    out.update({c: fit[c] for c in columns if c in fit})
    for column, tags in NC_COLUMNS.items():
        if column in columns:
            tag = next((t for t in tags if t in fit), None)
            if tag is not None:
                out[column] = fit[tag]
    return out


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _summary(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def build_table(results: list[dict[str, Any]], order: list[str] | None = None
                ) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows: each run, then the entry's summary (``seed`` = ``mean``/``std``)."""
    entries = list(dict.fromkeys([*(order or []), *sorted({r["entry"] for r in results})]))
    columns = test_columns(results) + list(FIT_COLUMNS) + list(NC_COLUMNS)
    per_run = {id(r): row_values(r, columns) for r in results}
    columns = [c for c in columns if any(c in v for v in per_run.values())]
    rows: list[dict[str, Any]] = []
    for entry in entries:
        runs = sorted((r for r in results if r["entry"] == entry), key=lambda r: r["seed"])
        if not runs:
            continue
        rows += [{"entry": entry, "seed": r["seed"], **per_run[id(r)]} for r in runs]
        mean_row: dict[str, Any] = {"entry": entry, "seed": "mean", "n": len(runs)}
        std_row: dict[str, Any] = {"entry": entry, "seed": "std", "n": len(runs)}
        mean_row["counts"] = {}  # values behind each column's mean, when not every run's
        for c in columns:
            vals = [per_run[id(r)][c] for r in runs if c in per_run[id(r)]]
            mean_row[c], std_row[c] = _summary(vals)
            if len(vals) != len(runs):
                mean_row["counts"][c] = len(vals)
        rows += [mean_row, std_row]
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """CSV with full-precision values (empty cell: not logged)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["entry", "seed", *columns])
        for row in rows:
            cells = [row.get(c) for c in columns]
            writer.writerow([row["entry"], row["seed"],
                             *("" if v is None else repr(float(v)) for v in cells)])


def markdown(title: str, description: str, columns: list[str], rows: list[dict[str, Any]],
             missing: Sequence[str] = ()) -> str:
    """The Markdown table: run rows, then a bold ``mean ± std (n=...)`` row per entry; then
    the ``missing`` runs (``"<entry> seed <k>"``: no result, not in the table), if any."""
    lines = [f"# Results: {title}", ""]
    if description:
        lines += [description, ""]
    lines += ["| entry | seed | " + " | ".join(columns) + " |",
              "|---|---|" + "---:|" * len(columns)]
    stds = {r["entry"]: r for r in rows if r["seed"] == "std"}
    for row in rows:
        if row["seed"] == "std":
            continue
        if row["seed"] == "mean":
            std = stds[row["entry"]]
            cells = [_fmt(row[c]) + ("" if std[c] is None or row[c] is None
                                     else f" ± {std[c]:.2g}")
                     + (f" (n={row['counts'][c]})" if c in row.get("counts", {}) else "")
                     for c in columns]
            head = [f"**{row['entry']}**", f"**mean ± std (n={row['n']})**"]
        else:
            cells = [_fmt(row.get(c)) for c in columns]
            head = [row["entry"], str(row["seed"])]
        lines.append("| " + " | ".join(head + cells) + " |")
    nc = ", ".join(f"`{c}` from {' / '.join(f'`{t}`' for t in tags)}"
                   for c, tags in NC_COLUMNS.items() if c in columns)
    lines += ["", "Last logged values, read from each run's TensorBoard events (`fit/`, `test/`)."]
    if nc:
        lines.append(f"NC metrics (first tag logged): {nc}.")
    if missing:
        lines += ["", f"Not in the table (no result: unfinished or failed): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"

