"""The grid runner: a tiny UFM grid end to end, table numbers from the logs, resume, dry run."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from hug_lightning.cli import main as cli_main
from hug_lightning.experiments import load_grid, main, shipped_grids
from hug_lightning.experiments import process, runner
from hug_lightning.experiments.results import build_table, markdown

TINY_ARGS = {
    "model.init_args.backbone.init_args.dim": 16,
    "data.init_args.samples_per_class": 5,
    "data.init_args.steps_per_epoch": 5,
    "trainer.max_epochs": 4,
    "trainer.check_val_every_n_epoch": 2,
    "trainer.enable_model_summary": False,
    "nc.figures_every": 0,
    "nc.spherical": False,
}
TINY_GRID = {
    "description": "Tiny UFM grid (test).",
    "seeds": [0, 1],
    "common": {"args": TINY_ARGS},
    "entries": [{"name": "ce", "configs": ["ufm_ce.yaml"]},  # packaged config names
                {"name": "hug", "configs": ["ufm_hug.yaml"]}],
}
NC_COLUMNS = ["nc1_pinv", "gnc2_min_angle_weights", "nc3_self_duality", "ncc_accuracy"]


def last_event_value(folder: Path, tag: str) -> float:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return max(events.Scalars(tag), key=lambda e: e.step).value


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_counted(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[list[str]]]:
    """Run the experiments CLI, recording every subprocess it launches."""
    launched: list[list[str]] = []
    real = process.launch

    def counting(cmd: list[str], log_file: Path) -> int:
        launched.append(cmd)
        return real(cmd, log_file)

    monkeypatch.setattr(process, "launch", counting)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return main(argv), launched


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny grid, run once (2 entries x 2 seeds, 2 at a time)."""
    tmp = tmp_path_factory.mktemp("grid")
    grid = tmp / "tiny.yaml"
    grid.write_text(yaml.safe_dump(TINY_GRID, sort_keys=False))
    out = tmp / "runs"
    with pytest.MonkeyPatch.context() as mp:
        rc, launched = run_counted(["run", str(grid), "--out", str(out), "--jobs", "2"], mp)
    return {"grid": grid, "out": out, "base": out / "tiny", "rc": rc, "launched": launched}


def test_grid_writes_table_from_logs(tiny):
    base = tiny["base"]
    assert tiny["rc"] == 0
    fits = [c for c in tiny["launched"] if c[3] == "fit"]
    tests = [c for c in tiny["launched"] if c[3] == "test"]
    assert len(fits) == 4 and len(tests) == 4 and len(tiny["launched"]) == 8
    assert all(c[1:3] == ["-m", "hug_lightning"] for c in tiny["launched"])
    for entry in ("ce", "hug"):
        for seed in (0, 1):
            run = base / entry / f"seed{seed}"
            result = json.loads((run / "result.json").read_text())
            assert (result["entry"], result["seed"]) == (entry, seed)
            config = yaml.safe_load((run / "fit" / "config.yaml").read_text())
            assert config["seed_everything"] == seed
            best = Path(result["best_ckpt"])  # validation ran: the best one, not last.ckpt
            assert best.parent == run / "fit" / "checkpoints" and best.name != "last.ckpt"
            assert result["test_command"][-2:] == ["--ckpt_path", str(best)]

    rows = read_csv(base / "results.csv")
    assert [(r["entry"], r["seed"]) for r in rows] == [
        ("ce", "0"), ("ce", "1"), ("ce", "mean"), ("ce", "std"),
        ("hug", "0"), ("hug", "1"), ("hug", "mean"), ("hug", "std")]
    columns = list(rows[0])[2:]  # test/acc, any other test/* logged (e.g. ECE), fit, NC
    assert columns[0] == "test/acc" and columns[-5:] == ["val/acc_best", *NC_COLUMNS]
    assert all(c.startswith("test/") and c != "test/loss" for c in columns[:-5])
    by_key = {(r["entry"], r["seed"]): r for r in rows}
    # numbers are those of the runs' own event files
    assert float(by_key["ce", "0"]["test/acc"]) == last_event_value(base / "ce/seed0/test",
                                                                     "test/acc")
    assert float(by_key["hug", "1"]["nc1_pinv"]) == last_event_value(
        base / "hug/seed1/fit", "nc/train_eval/nc1_pinv")
    assert float(by_key["hug", "0"]["gnc2_min_angle_weights"]) == last_event_value(
        base / "hug/seed0/fit", "nc/train_eval/gnc2_min_angle_weights")
    values = [float(by_key["hug", s]["nc1_pinv"]) for s in ("0", "1")]
    assert float(by_key["hug", "mean"]["nc1_pinv"]) == pytest.approx(statistics.fmean(values))
    assert float(by_key["hug", "std"]["nc1_pinv"]) == pytest.approx(statistics.stdev(values))

    md = (base / "results.md").read_text()
    assert "Tiny UFM grid (test)." in md and md.count("mean ± std (n=2)") == 2
    assert md.count("| entry | seed | test/acc |") == 1 and "| nc1_pinv |" in md


def test_resume_skips_finished_runs(tiny, monkeypatch):
    base = tiny["base"]
    before = {p: p.stat().st_mtime_ns for p in base.glob("*/seed*/result.json")}
    old_acc = json.loads((base / "hug/seed1/result.json").read_text())["test"]["test/acc"]
    (base / "ce/seed0/result.json").unlink()  # fit finished, test lost: reruns the test only
    (base / "hug/seed1/result.json").unlink()  # fit interrupted: resumes from last.ckpt
    (base / "hug/seed1/fit.json").unlink()
    rc, launched = run_counted(["run", str(tiny["grid"]), "--out", str(tiny["out"]), "--jobs", "2"],
                               monkeypatch)
    assert rc == 0
    assert sorted((Path(c[c.index("--config") + 1]).parts[-4:-2], c[3]) for c in launched
                  if c[3] == "test") == [(("ce", "seed0"), "test"), (("hug", "seed1"), "test")]
    fits = [c for c in launched if c[3] == "fit"]
    assert len(launched) == 3 and len(fits) == 1
    assert fits[0][-2:] == ["--ckpt_path", str(base / "hug/seed1/fit/checkpoints/last.ckpt")]
    for path, mtime in before.items():  # the other runs were not touched
        if path.parts[-3:-1] not in (("ce", "seed0"), ("hug", "seed1")):
            assert path.stat().st_mtime_ns == mtime
    new = json.loads((base / "hug/seed1/result.json").read_text())
    assert new["test"]["test/acc"] == old_acc  # same best checkpoint tested again
    assert len(read_csv(base / "results.csv")) == 8

    # `table` rebuilds the same files from the finished runs
    md, rows = (base / "results.md").read_text(), read_csv(base / "results.csv")
    (base / "results.md").unlink()
    (base / "results.csv").unlink()
    assert main(["table", str(tiny["grid"]), "--out", str(tiny["out"])]) == 0
    assert (base / "results.md").read_text() == md and read_csv(base / "results.csv") == rows


@pytest.mark.slow
def test_interrupted_runner_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    """SIGTERM to the runner: the fit saves last.ckpt, nothing is marked done; a rerun resumes."""
    grid = tmp_path / "long.yaml"
    args = {**TINY_ARGS, "trainer.max_epochs": 10**6}
    grid.write_text(yaml.safe_dump({"entries": [{"name": "ce", "configs": ["ufm_ce.yaml"],
                                                 "args": args}]}))
    out, run = tmp_path / "runs", tmp_path / "runs" / "long" / "ce" / "seed0"
    last = run / "fit" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "hug_lightning.experiments", "run", str(grid),
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert last.is_file(), proc.communicate()[0] if proc.poll() is not None else "no last.ckpt"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, output
    assert "Interrupted at epoch" in (run / "fit.log").read_text()
    assert "# exit status 143 (runner interrupted)" in (run / "fit.log").read_text()  # as saved
    assert not any((run / f).exists() for f in ("fit.json", "fit_completed.json", "result.json"))
    epoch = torch.load(last, weights_only=True, map_location="cpu")["epoch"]

    # rerun (shortened to one more epoch): resumes from last.ckpt, then tests the best checkpoint
    rc, launched = run_counted(["run", str(grid), "--out", str(out), "--extra",
                                "--trainer.max_epochs", str(epoch + 1)], monkeypatch)
    assert rc == 0 and [c[3] for c in launched] == ["fit", "test"]
    assert launched[0][-2:] == ["--ckpt_path", str(last)]
    assert (run / "result.json").is_file()
    assert torch.load(last, weights_only=True, map_location="cpu")["epoch"] >= epoch


def test_failed_run_is_reported_and_not_marked_done(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "bad.yaml"
    grid.write_text(yaml.safe_dump({"entries": [{"name": "typo", "configs": ["ufm_ce.yaml"],
                                                 "args": {"model.init_args.lernrate": 0.1}}]}))
    rc, launched = run_counted(["run", str(grid), "--out", str(tmp_path / "runs")], monkeypatch)
    assert rc == 1 and len(launched) == 1  # the fit failed: no test
    run = tmp_path / "runs" / "bad" / "typo" / "seed0"
    assert not (run / "result.json").exists() and "lernrate" in (run / "fit.log").read_text()
    assert "1 failed" in capsys.readouterr().out


def test_dry_run_prints_shipped_grids_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(process, "launch", lambda *a: pytest.fail("dry run launched a process"))
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert set(shipped_grids()) == {"paper_cifar10", "paper_cifar100", "long_tail"}
    assert all(name in listed for name in shipped_grids())
    commands = {}
    for name in shipped_grids():
        grid = load_grid(name)
        argv = ["run", name, "--dry-run", "--seeds", "0", "1", "--out", str(tmp_path),
                "--extra", "--config", "gpu.yaml"]
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        fits = [ln for ln in lines if " -m hug_lightning fit " in ln]
        tests = [ln for ln in lines if " -m hug_lightning test " in ln]
        assert len(fits) == len(tests) == 2 * len(grid.entries)
        assert all("--config gpu.yaml --seed_everything" in ln for ln in fits)
        # each run prints "# <grid> / <entry> / seed <k> (<state>)", its fit and test commands
        heads = [ln.split(" / ") for ln in lines if ln.startswith("# ")]
        assert all(h[0] == f"# {name}" and h[2].endswith("(new)") for h in heads)
        commands[name] = {f"{h[1]}/{h[2].split()[1]}": fit for h, fit in zip(heads, fits)}
    # the runner's own options after --extra would reach every fit: refused before any run
    with pytest.raises(SystemExit):
        main(["run", "paper_cifar10", "--out", str(tmp_path), "--extra", "--config",
              "gpu.yaml", "--dry-run"])
    assert "put the runner's own options before --extra" in capsys.readouterr().err
    paper = commands["paper_cifar10"]
    assert set(e.name for e in load_grid("paper_cifar10").entries) == {
        "ce", "mhe_paper", "mhs_paper", "mgd_paper", "mhe_tuned", "mhs_tuned", "mgd_tuned"}
    assert "cifar10_hug_mgd.yaml" in paper["mgd_paper/1"]
    assert "--model.init_args.head.init_args.beta 0.03" in paper["mgd_paper/1"]
    assert "--model.init_args.head.init_args.alpha 0.15" in paper["mhs_paper/0"]
    assert "--model.init_args.head.init_args.beta 0.015" in paper["mhe_paper/0"]
    assert "alpha" not in paper["mhe_tuned/0"] and "cifar10_ce.yaml" in paper["ce/0"]
    assert "cifar100_hug_mhs.yaml" in commands["paper_cifar100"]["mhs_tuned/0"]
    assert "--data.init_args.imbalance_ratio 10" in commands["long_tail"]["cifar100_r10_hug/0"]
    assert "--data.init_args.imbalance_ratio 100" in commands["long_tail"]["cifar10_r100_ce/1"]


def test_table_columns_and_summary_rows():
    """Robust / ECE metrics are picked up generically; per-severity values fold into the mean."""
    fit = {"val/acc_best": 0.9, "nc/train/nc1_pinv": 0.5, "geometry/min_angle": 90.0,
           "nc/val/ncc_accuracy": 0.8}
    test = {"test/acc": 0.8, "test/loss": 0.7, "test/ece": 0.05, "test/robust/pgd_eps8": 0.1,
            "test/robust/contrast_s3": 0.4, "test/robust/corruption_mean": 0.5}
    results = [{"entry": "b", "seed": s, "fit": fit, "test": {**test, "test/acc": 0.8 + s / 10}}
               for s in (1, 0)] + [{"entry": "a", "seed": 0, "fit": {}, "test": {"test/acc": 0.5}}]
    columns, rows = build_table(results, order=["b", "a"])
    assert columns == ["test/acc", "test/ece", "test/robust/corruption_mean",
                       "test/robust/pgd_eps8", "val/acc_best", "nc1_pinv",
                       "gnc2_min_angle_weights", "ncc_accuracy"]
    assert [(r["entry"], r["seed"]) for r in rows] == [
        ("b", 0), ("b", 1), ("b", "mean"), ("b", "std"), ("a", 0), ("a", "mean"), ("a", "std")]
    assert rows[0]["gnc2_min_angle_weights"] == 90.0  # fallback: geometry/min_angle
    assert rows[2]["test/acc"] == pytest.approx(0.85) and rows[6]["test/acc"] is None  # 1 seed
    md = markdown("g", "", columns, rows)
    assert "| **b** | **mean ± std (n=2)** | 0.85 ± 0.071 |" in md
    assert "| **a** | **mean ± std (n=1)** | 0.5 |" in md


@pytest.mark.parametrize("grid, entry, key, value", [
    ("paper_cifar10", "mgd_paper", "beta", 0.03),
    ("long_tail", "cifar100_r10_hug", "imbalance_ratio", 10.0),
])
def test_shipped_grid_commands_parse(grid, entry, key, value, tmp_path, capsys):
    run = next(r for r in runner.grid_runs(load_grid(grid), [0], tmp_path) if r.entry.name == entry)
    with pytest.raises(SystemExit) as exc:
        cli_main(run.fit_command()[3:] + ["--print_config"])
    assert exc.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    section = (config["model"]["init_args"]["head"]["init_args"] if key == "beta"
               else config["data"]["init_args"])
    assert section[key] == value and config["seed_everything"] == 0


@pytest.mark.parametrize("grid, message", [
    ({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"], "arg": {}}]}, "unknown key"),
    ({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"]}] * 2}, "duplicate entry"),
    ({"entries": [{"name": "a b", "configs": ["ufm_ce.yaml"]}]}, "must match"),
    ({"entries": [{"name": "a", "configs": ["no_such_config.yaml"]}]}, "no_such_config"),
    ({"seeds": [0]}, "no entries"),
    ({"entries": [{"name": "a", "configs": ["ufm_ce.yaml"], "test_checkpoint": "first"}]},
     "test_checkpoint must be 'best' or 'last'"),
])
def test_bad_grids_are_clear_errors(grid, message, tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_grid(path)


def test_long_tail_grid_tests_the_final_checkpoint(tmp_path):
    """Its configs validate on the test set: the best-on-validation checkpoint would be chosen
    on test data."""
    grid = load_grid("long_tail")
    assert {e.test_checkpoint for e in grid.entries} == {"last"}
    assert {e.test_checkpoint for e in load_grid("paper_cifar10").entries} == {"best"}
    run = runner.grid_runs(grid, [0], tmp_path)[0]
    run.ckpt_dir.mkdir(parents=True)
    for name in ("last.ckpt", "epoch001-val_acc0.9.ckpt"):
        (run.ckpt_dir / name).write_bytes(b"")
    assert runner._tested_checkpoint(run) == run.ckpt_dir / "last.ckpt"


def test_table_and_skips_follow_the_current_grid(tmp_path, capsys):
    """A renamed entry's old results stay out of the table, `--seeds` selects seeds, and a run
    finished with another fit command is skipped with a warning saying how to rerun it."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "seeds": [0, 1], "entries": [
        {"name": "ce", "configs": ["ufm_ce.yaml"]}]}))
    grid = load_grid(path)
    out = tmp_path / "runs"
    for entry, seed in (("ce", 0), ("ce", 1), ("old_name", 0)):
        folder = out / "g" / entry / f"seed{seed}"
        folder.mkdir(parents=True)
        command = runner.grid_runs(grid, [seed], out)[0].fit_command([], None)
        (folder / "result.json").write_text(json.dumps({
            "grid": "g", "entry": entry, "seed": seed, "fit_command": command,
            "fit": {}, "test": {"test/acc": 0.5 + 0.1 * seed}}))
    from hug_lightning.experiments import collect_results
    assert sorted((r["entry"], r["seed"]) for r in collect_results(grid, out)) == [
        ("ce", 0), ("ce", 1)]
    assert [r["seed"] for r in collect_results(grid, out, seeds=[1])] == [1]
    run = runner.grid_runs(grid, [0], out)[0]
    assert runner.execute(run) == "skipped"
    assert "another fit command" not in capsys.readouterr().out
    assert runner.execute(run, ["--trainer.max_epochs", "3"]) == "skipped"
    assert "done before with another fit command" in capsys.readouterr().out
