"""Run a grid: ``fit`` then ``test`` of the best checkpoint, each in a subprocess, per run.

Layout of one run, ``<out>/<grid>/<entry>/seed<k>/``:

* ``fit/``: the fit's TensorBoard events, ``config.yaml``, ``checkpoints/`` (best + ``last.ckpt``);
* ``test/``: the events of ``test --config fit/config.yaml --ckpt_path <best checkpoint>``;
* ``fit.log``, ``test.log``: the subprocesses' output; ``fit_completed.json``: written by the
  fit itself when it ran to its end (:mod:`.callbacks`); ``fit.json``: the best checkpoint, once
  the fit is complete; ``result.json``: written last (the metrics read from the events).

Resume policy (rerun the same command): a run with ``result.json`` is skipped; a run whose fit
is complete (``fit.json``) only reruns the test; an unfinished fit with a
``fit/checkpoints/last.ckpt`` resumes from it (``--ckpt_path <last.ckpt>``: Lightning restores
weights, optimizer, scheduler, loops and callbacks; the events continue in ``fit/``); an
unfinished fit without it starts again in an emptied ``fit/``. Ctrl-C or SIGTERM stops the
runner's subprocesses so that each fit saves ``last.ckpt`` (:mod:`.process`).
The fit command a run was first given is recorded with a digest of each of its config files
(``fit_started.json``, then ``fit.json`` and ``result.json``): a rerun whose arguments or config
contents differ says so (a finished run is still skipped, an unfinished one still resumes).
"""

from __future__ import annotations

import json
import shlex
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from hug_lightning.checkpointing import recorded_best_checkpoint
from hug_lightning.experiments import process
from hug_lightning.experiments.commands import config_digests, what_changed
from hug_lightning.experiments.locks import alone
from hug_lightning.experiments.results import last_values
from hug_lightning.experiments.runs import Run, grid_runs

_PRINT_LOCK = threading.Lock()
BEST_PLACEHOLDER = "<best checkpoint of fit>"


def _say(message: str) -> None:
    with _PRINT_LOCK:
        print(message, flush=True)


def best_checkpoint(ckpt_dir: Path) -> Path:
    """Best checkpoint of a finished fit: the one the shipped ``checkpoint`` group's state in
    ``last.ckpt`` records (:func:`~hug_lightning.recorded_best.choose_recorded_best`: not that
    of another ``ModelCheckpoint`` the entry adds; several monitored ones and no shipped one's
    file: :class:`~hug_lightning.recorded_best.AmbiguousBestError`).

    Falls back to the only other ``.ckpt`` file, else to ``last.ckpt`` (no validation ran).
    """
    last = ckpt_dir / "last.ckpt"
    best = recorded_best_checkpoint(last)
    if best is not None:
        return best
    others = sorted(p for p in ckpt_dir.glob("*.ckpt") if not p.name.startswith("last"))
    if len(others) == 1 or (others and not last.is_file()):
        return others[0]
    if last.is_file():
        return last
    raise FileNotFoundError(f"No checkpoint in {ckpt_dir}.")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def _tested_checkpoint(run: Run) -> Path:
    """The entry's ``test_checkpoint``: the best one on validation, or ``last.ckpt``."""
    if run.entry.test_checkpoint == "last":
        return run.ckpt_dir / "last.ckpt"
    return best_checkpoint(run.ckpt_dir)


def _recorded_command(run: Run) -> tuple[list[str], list[list[str]] | None] | None:
    """The fit command a run was first given and its config files' digests: a finished run's
    (``result.json``), else the ones an unfinished fit was started with (``fit_started.json``);
    None for a new run. Runs recorded before digests were kept give None digests."""
    if run.result_file.is_file():
        result = json.loads(run.result_file.read_text())
        return result.get("fit_command", []), result.get("fit_config_digests")
    if run.started_file.is_file():
        started = json.loads(run.started_file.read_text())
        return started["command"], started.get("config_digests")
    return None


def _failed(run: Run, stage: str, rc: int) -> str:
    log = run.root / f"{stage}.log"
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    _say(f"[{run.entry.name} seed {run.seed}] {stage} FAILED, {process.describe_status(rc)} "
         f"(see {log}):\n{tail}")
    return "failed"


def execute(run: Run, extra: Sequence[str] = ()) -> str:
    """Run (or resume) one run; returns ``skipped``, ``done``, ``failed`` or ``interrupted``."""
    tag = f"[{run.entry.name} seed {run.seed}]"
    if process.STOP.is_set():
        return "interrupted"
    if run.result_file.is_file():
        change = what_changed(_recorded_command(run) or ([], None), run.fit_command(extra))
        if change:
            _say(f"{tag} done before with {change}: skipped, results kept. Delete "
                 f"{run.root} to rerun it with the current grid, configs and --extra arguments.")
        else:
            _say(f"{tag} done before: skipped")
        return "skipped"
    start = time.time()
    if not run.fit_file.is_file():
        last = run.ckpt_dir / "last.ckpt"
        resume = last if last.is_file() else None
        if resume is None and run.fit_dir.exists():
            shutil.rmtree(run.fit_dir)
        run.completed_file.unlink(missing_ok=True)
        cmd = run.fit_command(extra, resume)
        recorded = _recorded_command(run) if resume is not None else None
        if recorded is None:
            recorded = (cmd, config_digests(cmd))
            run.root.mkdir(parents=True, exist_ok=True)
            _write_json(run.started_file, {"command": cmd, "config_digests": recorded[1]})
        elif change := what_changed(recorded, cmd):
            _say(f"{tag} WARNING: resuming a fit started with {change}: the checkpoint's "
                 "model options stay, other options change mid-run, and the results keep the "
                 f"first command. Delete {run.root} to restart it with the current arguments.")
        first, first_digests = recorded
        _say(f"{tag} fit" + (f" (resuming from {resume})" if resume else ""))
        rc = process.launch(cmd, run.root / "fit.log")
        if process.STOP.is_set() or (rc == 0 and not run.completed_file.is_file()) \
                or rc in (130, 143):  # the fit itself was interrupted and saved last.ckpt
            _say(f"{tag} fit interrupted: rerun to resume from last.ckpt")
            return "interrupted"
        if rc != 0:
            return _failed(run, "fit", rc)
        best = _tested_checkpoint(run)
        _write_json(run.fit_file, {"best_ckpt": str(best), "command": first,
                                   "config_digests": first_digests})
    best = json.loads(run.fit_file.read_text())["best_ckpt"]
    if not Path(best).is_file():  # the output folder was moved since
        best = str(_tested_checkpoint(run))
    if run.test_dir.exists():
        shutil.rmtree(run.test_dir)
    cmd = run.test_command(best)
    _say(f"{tag} test {Path(best).name}")
    rc = process.launch(cmd, run.root / "test.log")
    if process.STOP.is_set():
        return "interrupted"
    if rc != 0:
        return _failed(run, "test", rc)
    fit = json.loads(run.fit_file.read_text())
    result = {"grid": run.grid, "entry": run.entry.name, "seed": run.seed, "best_ckpt": best,
              "fit_command": fit["command"], "fit_config_digests": fit.get("config_digests"),
              "test_command": cmd, "fit": last_values(run.fit_dir),
              "test": last_values(run.test_dir), "seconds": round(time.time() - start, 1)}
    _write_json(run.result_file, result)
    _say(f"{tag} done in {result['seconds']} s: test/acc = {result['test'].get('test/acc')}")
    return "done"


def _execute_or_fail(run: Run, extra: Sequence[str]) -> str:
    try:  # one runner per run: a second one of this grid skips it
        return alone(run.root, lambda: execute(run, extra), _say,
                     f"[{run.entry.name} seed {run.seed}]")
    except KeyboardInterrupt:
        process.STOP.set()
        return "interrupted"
    except Exception as err:  # one broken run must not stop the others
        _say(f"[{run.entry.name} seed {run.seed}] FAILED: {type(err).__name__}: {err}")
        return "failed"


def run_all(runs: Sequence[Run], extra: Sequence[str] = (), jobs: int = 1) -> dict[str, int]:
    """Execute runs, ``jobs`` at a time; returns how many were done/skipped/failed/interrupted.

    Runs go one per thread, each launching its own subprocesses; ``jobs > 1`` only makes sense
    when the runs fit the machine together (CPU runs, or several GPUs chosen per entry).
    """
    process.STOP.clear()
    statuses: list[str] = []
    with process.sigterm_as_interrupt():
        if jobs <= 1:
            statuses = [_execute_or_fail(r, extra) for r in runs]
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(_execute_or_fail, r, extra) for r in runs]
                try:
                    statuses = [f.result() for f in futures]
                except KeyboardInterrupt:  # only the main thread sees it: stop the children
                    process.STOP.set()
                    process.stop_children()
                    statuses = [f.result() for f in futures]
    counts = {"done": 0, "skipped": 0, "failed": 0, "interrupted": 0}
    for status in statuses:
        counts[status] += 1
    return counts


def dry_run(runs: Sequence[Run], extra: Sequence[str] = ()) -> None:
    """Print each run's commands (and whether it is done) without running anything."""
    for run in runs:
        state = ("done: skipped" if run.result_file.is_file() else
                 "fit done: test only" if run.fit_file.is_file() else
                 "resumes from last.ckpt" if (run.ckpt_dir / "last.ckpt").is_file() else "new")
        resume = run.ckpt_dir / "last.ckpt" if state.startswith("resumes") else None
        now = run.fit_command(extra, resume)
        saved = _recorded_command(run) if state.startswith(("done", "resumes")) else None
        change = what_changed(saved, now) if saved is not None else None
        if change:
            state += f", recorded with {change}" if change.startswith("another") \
                else f", {change}"
        print(f"# {run.grid} / {run.entry.name} / seed {run.seed} ({state})")
        print(shlex.join(now))
        tested = (str(run.ckpt_dir / "last.ckpt") if run.entry.test_checkpoint == "last"
                  else BEST_PLACEHOLDER)
        print(shlex.join(run.test_command(tested)))


__all__ = ["BEST_PLACEHOLDER", "Run", "best_checkpoint", "dry_run", "execute", "grid_runs",
           "run_all"]
