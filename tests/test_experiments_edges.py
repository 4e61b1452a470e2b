"""The grid runner's edges: bad grid files, seeds, which folders make the table, children."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from hug_lightning.experiments import collect_results, load_grid, main, write_tables
from hug_lightning.experiments import process, runner
from hug_lightning.experiments.results import build_table, markdown


@pytest.mark.parametrize("text, message", [
    (None, "No grid file"),
    ("entries: [\n", "not valid YAML"),
    ("seeds: 3\nentries: [{name: a, configs: [ufm_ce.yaml]}]\n", "seeds must be a list"),
    ("seeds: 0\nentries: [{name: a, configs: [ufm_ce.yaml]}]\n", "seeds must be a list"),
    ("seeds: [0, 0.5]\nentries: [{name: a, configs: [ufm_ce.yaml]}]\n", "seeds must be a list"),
    ("entries: [{name: a, configs: 5}]\n", "configs must be a file name or a list"),
    ("common: [ufm_ce.yaml]\nentries: [{name: a, configs: [ufm_ce.yaml]}]\n",
     "`common` must be a mapping"),
    ("entries: [{name: a, configs: [ufm_ce.yaml], args: 5}]\n", "must be a mapping or a list"),
])
@pytest.mark.parametrize("command", ["run", "table"])
def test_bad_grid_is_one_line_not_a_traceback(text, message, command, tmp_path, capsys):
    path = tmp_path / "g.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main([command, str(path), "--out", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("grid_seeds, argv", [([0, 0, 1], []), ([5], ["--seeds", "1", "0", "1"])])
def test_a_repeated_seed_is_one_run(grid_seeds, argv, tmp_path, capsys):
    """Two runs of one seed share its folder: with --jobs 2 both fits wrote into it at once."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"seeds": grid_seeds, "entries": [
        {"name": "a", "configs": ["ufm_ce.yaml"]}]}))
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path), *argv]) == 0
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# ")]
    assert heads == [f"# g / a / seed {s} (new)" for s in ([0, 1] if not argv else [1, 0])]


def test_table_reads_the_runs_folders_not_their_copies(tmp_path):
    """A copy of a run (``seed0.bak``) or of an entry (``ce_old``: kept before a rerun) made
    the same run a second row, counted twice in the mean; a folder the runner skips as done
    (an entry renamed by moving its folder) was left out of the table."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "seeds": [0, 1], "entries": [
        {"name": "ce", "configs": ["ufm_ce.yaml"]}, {"name": "new", "configs": ["ufm_ce.yaml"]}]}))
    grid = load_grid(path)
    out = tmp_path / "runs"
    for folder, entry, seed, acc in [("ce/seed0", "ce", 0, 0.5), ("ce/seed0.bak", "ce", 0, 0.1),
                                     ("ce/seed00", "ce", 0, 0.1), ("ce_old/seed1", "ce", 1, 0.1),
                                     ("ce/seed1", "ce", 1, 0.7), ("new/seed0", "old", 0, 0.9)]:
        (out / "g" / folder).mkdir(parents=True)
        (out / "g" / folder / "result.json").write_text(json.dumps({
            "grid": "g", "entry": entry, "seed": seed, "fit": {}, "test": {"test/acc": acc}}))
    found = {(r["entry"], r["seed"]): r["test"]["test/acc"] for r in collect_results(grid, out)}
    assert found == {("ce", 0): 0.5, ("ce", 1): 0.7, ("new", 0): 0.9}
    assert len(collect_results(grid, out)) == 3
    assert [r["seed"] for r in collect_results(grid, out, seeds=[1])] == [1]
    assert runner.execute(runner.grid_runs(grid, [0], out)[1]) == "skipped"  # new/seed0: done
    md = write_tables(grid, out)
    assert "| **ce** | **mean ± std (n=2)** | 0.6 ± 0.14 |" in md.read_text()


def test_a_child_started_as_the_runner_is_interrupted_is_stopped(tmp_path, monkeypatch):
    """With --jobs > 1 a worker can start a child between its STOP check and registering the
    child, while the main thread stops the registered ones: that child ran on unstopped (a
    whole fit) and the runner waited for it after Ctrl-C or SIGTERM."""
    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def popen_then_interrupt(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        process.STOP.set()  # the main thread's interrupt, before the child is registered
        process.stop_children(grace_s=5)
        return proc

    monkeypatch.setattr(process.subprocess, "Popen", popen_then_interrupt)
    process.STOP.clear()
    rc: list[int] = []
    worker = threading.Thread(target=lambda: rc.append(process.launch(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "child.log")))
    try:
        start = time.monotonic()
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "the child was not stopped"
        assert rc == [-signal.SIGTERM] and time.monotonic() - start < 20
    finally:
        for proc in started:
            proc.kill()
        worker.join()
        process.STOP.clear()


def test_a_killed_fit_says_how_it_ended(tmp_path, monkeypatch, capsys):
    """A fit ended by SIGKILL (the OOM killer) left a log without an error and the runner said
    only FAILED: its exit status was lost."""
    real_launch = process.launch
    suicide = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    monkeypatch.setattr(process, "launch", lambda cmd, log_file: real_launch(suicide, log_file))
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"]}]}))
    run = runner.grid_runs(load_grid(path), [0], tmp_path / "runs")[0]
    assert runner.execute(run) == "failed"
    said = capsys.readouterr().out
    assert "fit FAILED, killed by SIGKILL (out of memory?" in said
    assert "killed by SIGKILL" in (run.root / "fit.log").read_text()
    assert process.describe_status(1) == "exit status 1"


def test_a_mean_over_fewer_runs_says_so():
    """A metric logged by 2 of 3 seeds was averaged over 2 under a 'mean ± std (n=3)' head."""
    results = [{"entry": "a", "seed": s, "fit": {},
                "test": {"test/acc": 0.5 + s / 10, **({"test/ece": 0.1 * s} if s else {})}}
               for s in range(3)]
    columns, rows = build_table(results)
    line = next(ln for ln in markdown("g", "", columns, rows).splitlines() if "**a**" in ln)
    assert line == "| **a** | **mean ± std (n=3)** | 0.6 ± 0.1 | 0.15 ± 0.071 (n=2) |"


# --- behaviour no test pinned (a mutation of each went unnoticed) ----------------------------
def test_entry_settings_come_after_common_ones(tmp_path):
    """Later flags win: an entry's args and test_args override common's; common's configs come
    after the entry's (as grid.py documents); every test_arg reaches the test command."""
    (tmp_path / "preset.yaml").write_text("trainer:\n  max_epochs: 2\n")
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"common": {
        "configs": ["preset.yaml"], "args": {"trainer.max_epochs": 3},
        "test_args": {"trainer.limit_test_batches": 1}}, "entries": [
        {"name": "a", "configs": ["ufm_ce.yaml"], "args": {"trainer.max_epochs": 4},
         "test_args": ["--trainer.limit_test_batches", "2"]}]}))
    run = runner.grid_runs(load_grid(path), [0], tmp_path / "runs")[0]
    fit = run.fit_command()
    configs = [Path(fit[i + 1]).name for i, a in enumerate(fit) if a == "--config"]
    assert configs == ["ufm_ce.yaml", "preset.yaml"]
    values = [fit[i + 1] for i, a in enumerate(fit) if a == "--trainer.max_epochs"]
    assert values == ["3", "4"]
    test = run.test_command("best.ckpt")
    values = [test[i + 1] for i, a in enumerate(test) if a == "--trainer.limit_test_batches"]
    assert values == ["1", "2"] and test.index("--config") < test.index("--ckpt_path")


def test_a_config_in_the_current_folder_comes_before_one_next_to_the_grid(tmp_path,
                                                                         monkeypatch):
    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here, there):
        folder.mkdir()
        (folder / "c.yaml").write_text("{}\n")
    (there / "g.yaml").write_text(yaml.safe_dump({"entries": [{"name": "a",
                                                               "configs": ["c.yaml"]}]}))
    monkeypatch.chdir(here)
    assert load_grid(there / "g.yaml").entries[0].configs == ((here / "c.yaml").resolve(),)
    monkeypatch.chdir(tmp_path)
    assert load_grid(there / "g.yaml").entries[0].configs == ((there / "c.yaml").resolve(),)


def _one_run(tmp_path: Path) -> runner.Run:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"]}]}))
    return runner.grid_runs(load_grid(path), [0], tmp_path / "runs")[0]


def test_a_moved_best_checkpoint_is_found_again(tmp_path, monkeypatch):
    run = _one_run(tmp_path)
    run.ckpt_dir.mkdir(parents=True)
    (run.ckpt_dir / "epoch001.ckpt").write_bytes(b"")
    run.fit_file.write_text(json.dumps({"best_ckpt": "/moved/away/epoch001.ckpt",
                                        "command": [], "config_digests": None}))
    tested: list[list[str]] = []
    monkeypatch.setattr(process, "launch", lambda cmd, log: tested.append(cmd) or 0)
    monkeypatch.setattr(runner, "last_values", lambda d: {})
    assert runner.execute(run) == "done"
    assert tested[0][-2:] == ["--ckpt_path", str(run.ckpt_dir / "epoch001.ckpt")]


def test_a_stale_completion_marker_does_not_complete_a_new_fit(tmp_path, monkeypatch):
    run = _one_run(tmp_path)
    run.root.mkdir(parents=True)
    run.completed_file.write_text("{}")  # from an earlier fit of this folder
    monkeypatch.setattr(process, "launch", lambda cmd, log: 0)  # exits 0, never completes
    assert runner.execute(run) == "interrupted" and not run.fit_file.exists()


def test_a_second_grid_run_in_the_same_process_runs_after_an_interrupted_one(tmp_path,
                                                                          monkeypatch):
    """From Python (a notebook) the grid is run again after a Ctrl-C: it must not stop at
    once on the first run's interruption."""
    run = _one_run(tmp_path)
    monkeypatch.setattr(process, "launch", lambda cmd, log: 1)
    process.STOP.set()
    try:
        assert runner.run_all([run]) == {"done": 0, "skipped": 0, "failed": 1,
                                         "interrupted": 0}
    finally:
        process.STOP.clear()


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True);"
                             " time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout.readline()  # the handler is set
    with process._LOCK:
        process._LIVE.add(proc)
    try:
        start = time.monotonic()
        process.stop_children(grace_s=0.5)
        assert proc.poll() == -signal.SIGKILL and time.monotonic() - start < 10
    finally:
        with process._LOCK:
            process._LIVE.discard(proc)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("args, message", [
    ({"args": {"seed_everything": 5}}, "the runner sets --seed_everything"),
    ({"args": ["--checkpoint.dirpath=/tmp/x"]}, "the runner sets --checkpoint.dirpath"),
    ({"test_args": {"ckpt_path": "last"}}, "test_args: the runner sets --ckpt_path"),
])
def test_a_flag_the_runner_sets_is_refused_in_a_grid(args, message, tmp_path):
    """`seed_everything: 5` in an entry ran seed 0 (the runner's flag came later) and the run
    was tabulated as seed 0: what the grid asked for was silently dropped."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"],
                                                 **args}]}))
    with pytest.raises(ValueError, match=message):
        load_grid(path)
    if "test_args" not in args:  # the test command may take a seed: its own
        return
    path.write_text(yaml.safe_dump({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"],
                                                 "test_args": {"seed_everything": 5}}]}))
    assert load_grid(path).entries[0].test_args == ("--seed_everything", "5")


def test_a_flag_the_runner_sets_is_refused_after_extra(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"]}]}))
    with pytest.raises(SystemExit) as exc:
        main(["run", str(path), "--dry-run", "--out", str(tmp_path), "--extra",
              "--seed_everything", "5"])
    assert exc.value.code == 2
    assert "--extra: the runner sets --seed_everything" in capsys.readouterr().err


def test_a_run_held_by_another_runner_is_skipped_not_run_twice(tmp_path, monkeypatch, capsys):
    """The same grid started twice (by mistake, or to share the runs between two GPUs): the
    second runner emptied the first's fit/ and both fitted into the same folder."""
    fcntl = pytest.importorskip("fcntl")
    run = _one_run(tmp_path)
    launched: list[list[str]] = []
    monkeypatch.setattr(process, "launch", lambda cmd, log: launched.append(cmd) or 1)
    run.root.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; "
                               f"f = open({str(run.root / 'run.lock')!r}, 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline()  # the other runner holds the run
        assert runner.run_all([run])["skipped"] == 1 and not launched
        assert "[a seed 0] running in another runner: skipped" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert runner.run_all([run])["failed"] == 1 and len(launched) == 1  # free again
    with open(run.root / "run.lock") as f:  # and released after the run
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_a_killed_child_takes_the_processes_it_started_along(tmp_path):
    """A DDP fit's other ranks are its own children: killing only the fit after the grace left
    them running (holding their GPUs for the next run)."""
    grandchild = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "time.sleep(60)")
    child = ("import signal, subprocess, sys, time; "
             "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             "print(p.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    below = int(proc.stdout.readline())
    with process._LOCK:
        process._LIVE.add(proc)
    try:
        assert process.descendants(proc.pid) == [below]
        process.stop_children(grace_s=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(below):
            time.sleep(0.1)
        assert not _alive(below)
    finally:
        with process._LOCK:
            process._LIVE.discard(proc)
        for pid in (proc.pid, below):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_results_md_names_the_runs_it_lacks(tmp_path):
    """A failed or unfinished run had no row and no mention: the table read as complete."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "seeds": [0, 1], "entries": [
        {"name": "ce", "configs": ["ufm_ce.yaml"]}, {"name": "hug", "configs": ["ufm_ce.yaml"]}]}))
    grid, out = load_grid(path), tmp_path / "runs"
    for folder in ("ce/seed0", "hug/seed1"):
        (out / "g" / folder).mkdir(parents=True)
        (out / "g" / folder / "result.json").write_text(json.dumps({"fit": {}, "test": {
            "test/acc": 0.5}}))
    md = write_tables(grid, out).read_text()
    assert "Not in the table (no result: unfinished or failed): ce seed 1, hug seed 0." in md
    md = write_tables(grid, out, seeds=[1]).read_text()
    assert "Not in the table (no result: unfinished or failed): ce seed 1." in md
    (out / "g" / "ce/seed1").mkdir(parents=True)
    (out / "g" / "ce/seed1/result.json").write_text(json.dumps({"fit": {}, "test": {}}))
    assert "Not in the table" not in write_tables(grid, out, seeds=[1]).read_text()


def test_finished_runs_in_a_read_only_folder_are_still_skipped(tmp_path, monkeypatch):
    run = _one_run(tmp_path)
    run.root.mkdir(parents=True)
    run.result_file.write_text(json.dumps({"fit_command": run.fit_command(), "fit": {},
                                           "test": {}}))
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if "a" in mode or "w" in mode:
            raise PermissionError(13, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    assert runner.run_all([run])["skipped"] == 1


def test_entry_names_differing_only_in_case_are_duplicates(tmp_path):
    """`MHE` and `mhe` are one folder on macOS and Windows: the second entry's runs were
    skipped as done (or resumed) with the first one's results."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"entries": [{"name": "mhe", "configs": ["ufm_ce.yaml"]},
                                                {"name": "MHE", "configs": ["ufm_hug.yaml"]}]}))
    with pytest.raises(ValueError, match="duplicate entry name 'MHE'.*differ only in case"):
        load_grid(path)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_a_fit_left_running_by_a_killed_runner_keeps_its_run(tmp_path, monkeypatch, capsys):
    """A runner killed with SIGKILL leaves its fit running (a DDP fit with its ranks), which
    trains on into the run folder; the lock went with the runner, so a rerun resumed a second
    fit into the same folder beside it. The fit now holds the run's lock until it ends."""
    pytest.importorskip("fcntl")
    run = _one_run(tmp_path)
    fit = [sys.executable, "-c", "import time; time.sleep(60)"]
    old_runner = subprocess.Popen([sys.executable, "-c", (
        "from pathlib import Path\n"
        "from hug_lightning.experiments import locks, process\n"
        f"root = Path({str(run.root)!r})\n"
        "with locks.run_lock(root):\n"
        f"    process.launch({fit!r}, root / 'fit.log')\n")])
    orphan = None
    lock = run.root / "run.lock"
    try:  # the fit's pid as the lock names it: another child (the imports may start
        deadline = time.monotonic() + 60  # short-lived helpers) is not the fit
        while orphan is None and time.monotonic() < deadline and old_runner.poll() is None:
            named = re.findall(r"^fit (\d+)$", lock.read_text() if lock.is_file() else "", re.M)
            orphan = int(named[0]) if named else time.sleep(0.05)
        assert orphan is not None, "the runner did not start its fit"
        assert orphan in process.descendants(old_runner.pid)
        old_runner.kill()  # the runner dies, its fit runs on
        old_runner.wait()
        assert _alive(orphan)
        launched: list[list[str]] = []
        monkeypatch.setattr(process, "launch", lambda cmd, log: launched.append(cmd) or 1)
        assert runner.run_all([run])["skipped"] == 1 and not launched
        said = capsys.readouterr().out
        assert "[a seed 0] running in another runner: skipped" in said
        assert f"fit {orphan}" in said  # the message names the process to wait for or stop
    finally:
        old_runner.kill()
        if orphan is not None:
            os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.run_all([run])["failed"] == 1 and len(launched) == 1  # free once it ended


def test_table_of_seeds_without_results_names_the_seeds(tmp_path, capsys):
    """`table --seeds 5` with seeds 0 and 1 finished said only 'no finished run under ...'."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "entries": [
        {"name": "a", "configs": ["ufm_ce.yaml"]}]}))
    run = tmp_path / "runs" / "g" / "a" / "seed0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"fit": {}, "test": {"test/acc": 0.5}}))
    out = str(tmp_path / "runs")
    assert main(["table", str(path), "--out", out, "--seeds", "5"]) == 1
    assert "no finished run of seed(s) 5 under" in capsys.readouterr().err
    assert main(["table", str(path), "--out", out]) == 0
