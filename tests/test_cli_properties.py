"""Gaps found by mutation testing of the CLI, the checkpoint look-ups and the grid runner.

Expected values are written out by hand (file names, mean/std, exit statuses, run folders
built here), not computed with the code under test.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import REPO
from hug_lightning import cli, interrupt
from hug_lightning.checkpointing import recorded_best_checkpoint
from hug_lightning.experiments import load_grid, main as grid_main, process, runner
from hug_lightning.experiments.results import build_table


# --- packaged config names ------------------------------------------------------------------

def test_packaged_config_accepts_configs_prefix_and_equals_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: only the packaged copies exist
    found = cli.packaged_config("configs/debug.yaml")
    assert found is not None and found.name == "debug.yaml" and found.is_file()
    assert cli.packaged_config("debug") == found
    assert cli.packaged_config("no_such_config") is None
    out = cli.resolve_config_args(["fit", "--config", "configs/debug.yaml"])
    assert out[:2] == ["fit", "--config"] and Path(out[2]) == found
    out = cli.resolve_config_args(["fit", "--config=cifar10_ce"])
    assert out[1].startswith("--config=") and Path(out[1].split("=", 1)[1]).name == "cifar10_ce.yaml"
    assert Path(out[1].split("=", 1)[1]).is_file()
    elsewhere = ["fit", f"--config={tmp_path / 'x' / 'cifar10_ce.yaml'}"]
    assert cli.resolve_config_args(elsewhere) == elsewhere  # a mistyped path stays as given


# --- resumed config names -------------------------------------------------------------------

def test_resumed_config_name_takes_the_first_free_number(tmp_path):
    assert cli.resumed_config_name(tmp_path) == "config.yaml"  # nothing there: the first fit
    (tmp_path / "config.yaml").write_text("")
    assert cli.resumed_config_name(tmp_path) == "config.resume-1.yaml"
    (tmp_path / "config.resume-1.yaml").write_text("")
    (tmp_path / "config.resume-3.yaml").write_text("")
    assert cli.resumed_config_name(tmp_path) == "config.resume-2.yaml"


def test_evaluation_and_a_plain_resume_of_a_fixed_version_run(tmp_path):
    """`validate --ckpt_path last` with the run's version finds its last.ckpt and logs into a
    new folder (the run's config.yaml untouched, no warning about its dirpath); a resume that changes no model option warns
    about none (num_classes is linked from the data, not the user's: 20 here, the model's
    default is 10)."""
    import warnings

    args = ["--config", "ufm_hug_orthoplex", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.logger.init_args.version", "v", "--nc.enabled", "false"]
    cli.main(["fit", *args, "--trainer.max_epochs", "1"])
    run = tmp_path / "ufm_hug_orthoplex" / "v"
    config = (run / "config.yaml").read_bytes()
    with warnings.catch_warnings(record=True) as caught:  # a new folder: Lightning's note that
        warnings.simplefilter("always")  # ModelCheckpoint's state is not reloaded is noise
        evaluated = cli.main(["validate", *args, "--ckpt_path", "last"])
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert evaluated.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert Path(evaluated.trainer.log_dir) != run and (run / "config.yaml").read_bytes() == config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert not [w for w in caught if "NOT used" in str(w.message)]
    assert (run / "config.resume-1.yaml").is_file() and (run / "config.yaml").read_bytes() == config


def test_reasons_keep_only_the_rejection(tmp_path):
    text = ("Problem with given value for 'model.init_args.head':\n"
            "  - Expected a <class 'NoneType'>. Got value: {'class_path': 'x'}\n"
            "  - HUG: alpha and beta must be finite and >= 0\n"
            "Given value type: <class 'dict'>\nGiven value: {'class_path': 'x'}")
    assert cli._reasons(ValueError(text)) == "HUG: alpha and beta must be finite and >= 0"
    plain = "width must be > 0\nGiven value: {'width': 0}"
    assert cli._reasons(ValueError(plain)) == "width must be > 0"


# --- the console entry point and the log folder check ---------------------------------------

@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_console_exit_status_of_an_interrupted_fit(monkeypatch, signal_name, status):
    def interrupted(args=None, run=True):
        interrupt.LAST_INTERRUPT = signal_name
        raise SIGTERMException()

    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr(interrupt, "LAST_INTERRUPT", None)
    assert cli.console_main() == status


def test_console_exit_status_of_a_rejected_value_and_of_success(monkeypatch, capsys):
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)

    def rejected(args=None, run=True):
        raise cli.ConfigError("invalid configuration: width must be > 0")

    monkeypatch.setattr(cli, "main", rejected)
    assert cli.console_main() == 2
    err = capsys.readouterr().err
    assert err.startswith("hug-lightning: error: invalid configuration: width must be > 0\n")
    monkeypatch.setattr(cli, "main", lambda args=None, run=True: None)
    assert cli.console_main() == 0


@pytest.mark.parametrize("outcome", ["finished", "rejected"])
def test_console_destroys_the_process_group_it_leaves(tmp_path, monkeypatch, outcome):
    """Lightning leaves a gloo group to the interpreter's teardown, which can abort a finished
    DDP run (SIGABRT); the command destroys it, whether it finished or failed."""
    import torch.distributed as dist

    def run(args=None, run=True):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        if outcome == "rejected":
            raise cli.ConfigError("invalid configuration")

    monkeypatch.setattr(cli, "main", run)
    try:
        assert cli.console_main() == (0 if outcome == "finished" else 2)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_missing_data_or_run_is_one_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Real commands: data absent (download off), and `--ckpt_path last` before any run."""
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", "--config", "cifar10_ce",
                                     "--data.init_args.root", str(tmp_path / "none"),
                                     "--data.init_args.download", "false", *logs])
    assert cli.console_main() == 1
    err = capsys.readouterr().err
    assert err.startswith("hug-lightning: error: CIFAR-10 data not found in ")
    assert "Traceback" not in err and "--data.init_args.root" in err
    monkeypatch.setattr("sys.argv", ["hug-lightning", "test", "--config", "ufm_ce",
                                     "--ckpt_path", "last", *logs])
    assert cli.console_main() == 1
    err = capsys.readouterr().err
    assert err.startswith("hug-lightning: error: --ckpt_path last: no ") and "Traceback" not in err


NAN_HEAD = """
from hug_lightning.heads import CrossEntropyHead


class NanHead(CrossEntropyHead):
    def forward_train(self, features, labels):
        out = super().forward_train(features, labels)
        return out._replace(loss=out.loss * float("nan"))
"""


def test_a_nonfinite_loss_is_one_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    """A real `fit` whose loss is NaN at its first step (nonfinite_loss: raise): exit status 1,
    the epoch, step and terms in one message (it printed a traceback)."""
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    (tmp_path / "nan_head.py").write_text(NAN_HEAD)
    monkeypatch.chdir(tmp_path)  # the command finds ./nan_head.py, as a user's own module
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", "--config", "ufm_ce",
                                     "--model.init_args.head", "nan_head.NanHead",
                                     "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.console_main() == 1
    err = capsys.readouterr().err
    assert err.startswith("hug-lightning: error: Non-finite training loss at epoch 0, global "
                          "step 0: loss=nan"), err[-2000:]
    assert "Traceback" not in err and "Lower the learning rate" in err


def test_unwritable_log_folder_is_an_error_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a file where the log folder's parent should be: mkdir fails
    with pytest.raises(PermissionError, match="Cannot write the log folder"):
        cli.check_writable(blocker / "logs")
    cli.check_writable(tmp_path / "new" / "logs")  # creatable: fine, and no probe left behind
    assert list((tmp_path / "new" / "logs").iterdir()) == []
    with pytest.raises(PermissionError, match="--trainer.logger.init_args.save_dir"):
        cli.main(["fit", "--config", "ufm_hug",
                  "--trainer.logger.init_args.save_dir", str(blocker / "logs")])


def test_unwritable_log_folder_is_one_message_from_the_console(tmp_path, monkeypatch, capsys):
    """It was a traceback ending in the PermissionError (exit status 1), unlike missing data."""
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", "--config", "ufm_hug",
                                     "--trainer.logger.init_args.save_dir", str(blocker / "l")])
    assert cli.console_main() == 1
    err = capsys.readouterr().err
    assert err.startswith("hug-lightning: error: Cannot write the log folder ")
    assert "--trainer.logger.init_args.save_dir" in err and "Traceback" not in err


# --- checkpoint look-ups --------------------------------------------------------------------

def test_recorded_best_ignores_the_last_checkpoint_callbacks_state(tmp_path):
    """``last.ckpt`` also holds LastCheckpoint's state (a ModelCheckpoint subclass), whose
    best_model_path is last.ckpt itself: only the monitored ModelCheckpoint's counts."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    last, best = ckpts / "last.ckpt", ckpts / "epoch003-val_acc0.9.ckpt"
    best.write_bytes(b"x")
    torch.save({"callbacks": {"LastCheckpoint": {"best_model_path": str(last)},
                              "ModelCheckpoint{'monitor': 'val/acc'}":
                                  {"best_model_path": str(best)}}}, last)
    assert recorded_best_checkpoint(last) == best


def test_best_checkpoint_fallbacks(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    with pytest.raises(FileNotFoundError):
        runner.best_checkpoint(ckpt_dir)
    (ckpt_dir / "last.ckpt").write_bytes(b"not a checkpoint")  # records nothing
    assert runner.best_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"  # no validation ran
    (ckpt_dir / "epoch001.ckpt").write_bytes(b"x")
    assert runner.best_checkpoint(ckpt_dir) == ckpt_dir / "epoch001.ckpt"  # the only other
    (ckpt_dir / "epoch002.ckpt").write_bytes(b"x")
    assert runner.best_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"  # ambiguous: last
    (ckpt_dir / "last.ckpt").unlink()
    assert runner.best_checkpoint(ckpt_dir) == ckpt_dir / "epoch001.ckpt"


# --- the grid runner ------------------------------------------------------------------------

def _grid(tmp_path: Path, seeds=(0, 1)) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "seeds": list(seeds), "entries": [
        {"name": "ce", "configs": ["ufm_ce.yaml"]}]}))
    return path


def _finished(grid_path: Path, out: Path, seed: int, acc: float, command=None) -> Path:
    grid = load_grid(grid_path)
    run = runner.grid_runs(grid, [seed], out)[0]
    run.root.mkdir(parents=True)
    (run.root / "result.json").write_text(json.dumps({
        "grid": "g", "entry": "ce", "seed": seed,
        "fit_command": command or run.fit_command([], None),
        "fit": {}, "test": {"test/acc": acc}}))
    return run.root


def test_table_mean_and_sample_std_over_three_seeds():
    results = [{"entry": "e", "seed": s, "fit": {}, "test": {"test/acc": v}}
               for s, v in ((2, 0.6), (0, 0.1), (1, 0.2))]
    _, rows = build_table(results)
    assert [r["seed"] for r in rows] == [0, 1, 2, "mean", "std"]
    assert rows[3]["test/acc"] == pytest.approx(0.3)  # (0.1 + 0.2 + 0.6) / 3 (median: 0.2)
    # sample std: sqrt((0.2^2 + 0.1^2 + 0.3^2) / 2) = sqrt(0.07)
    assert rows[4]["test/acc"] == pytest.approx(0.07 ** 0.5)
    assert rows[3]["n"] == rows[4]["n"] == 3


def test_no_false_stale_warning_for_a_resumed_fit_or_another_interpreter(tmp_path, capsys):
    grid_path, out = _grid(tmp_path), tmp_path / "runs"
    run = runner.grid_runs(load_grid(grid_path), [0], out)[0]
    saved = ["/other/env/bin/python", *run.fit_command([], None)[1:],
             "--ckpt_path", str(run.ckpt_dir / "last.ckpt")]  # resumed once, elsewhere
    _finished(grid_path, out, 0, 0.5, command=saved)
    assert runner.execute(run) == "skipped"
    said = capsys.readouterr().out
    assert "done before: skipped" in said and "another fit command" not in said


def test_dry_run_states_and_resume_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(process, "launch", lambda *a: pytest.fail("dry run launched a process"))
    grid_path, out = _grid(tmp_path, seeds=(0, 1, 2, 3)), tmp_path / "runs"
    base = out / "g" / "ce"
    _finished(grid_path, out, 0, 0.5)
    (base / "seed1").mkdir(parents=True)
    (base / "seed1" / "fit.json").write_text("{}")
    last = base / "seed2" / "fit" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    assert grid_main(["run", str(grid_path), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [ln for ln in lines if ln.startswith("# ")]
    assert heads == ["# g / ce / seed 0 (done: skipped)", "# g / ce / seed 1 (fit done: test only)",
                     "# g / ce / seed 2 (resumes from last.ckpt)", "# g / ce / seed 3 (new)"]
    fits = [ln for ln in lines if " -m hug_lightning fit " in ln]
    assert fits[2].endswith(f"--ckpt_path {last.resolve()}")
    assert all("--ckpt_path" not in ln for i, ln in enumerate(fits) if i != 2)


def test_extra_reaches_every_fit_of_a_real_run_but_not_the_test(tmp_path, monkeypatch, capsys):
    launched: list[list[str]] = []

    def fail(cmd, log_file):
        launched.append(cmd)
        return 1

    monkeypatch.setattr(process, "launch", fail)
    grid_path, out = _grid(tmp_path), tmp_path / "runs"
    assert grid_main(["run", str(grid_path), "--out", str(out), "--extra",
                      "--trainer.max_epochs", "3"]) == 1
    assert len(launched) == 2 and all(c[3] == "fit" for c in launched)
    for cmd in launched:
        i = cmd.index("--trainer.max_epochs")
        assert cmd[i + 1] == "3" and i < cmd.index("--seed_everything")
    assert grid_main(["run", str(grid_path), "--out", str(out), "--dry-run", "--extra",
                      "--trainer.max_epochs", "3"]) == 0
    tests = [ln for ln in capsys.readouterr().out.splitlines() if " -m hug_lightning test " in ln]
    assert len(tests) == 2 and all("max_epochs" not in ln for ln in tests)


def test_run_with_seeds_tabulates_only_those_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "launch", lambda *a: pytest.fail("finished runs relaunched"))
    grid_path, out = _grid(tmp_path), tmp_path / "runs"
    _finished(grid_path, out, 0, 0.2)
    _finished(grid_path, out, 1, 0.6)
    assert grid_main(["run", str(grid_path), "--out", str(out), "--seeds", "1"]) == 0
    with open(out / "g" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["test/acc"]) for r in rows] == [("1", "0.6"), ("mean", "0.6"),
                                                          ("std", "")]


def test_fit_that_exits_0_without_its_completion_marker_is_interrupted(tmp_path, monkeypatch,
                                                                        capsys):
    """`fit` driven from Python exits 0 after a SIGTERM: without fit_completed.json the run is
    not complete, so no fit.json and no test."""
    launched: list[list[str]] = []

    def exits_0(cmd, log_file):
        launched.append(cmd)
        return 0

    monkeypatch.setattr(process, "launch", exits_0)
    run = runner.grid_runs(load_grid(_grid(tmp_path)), [0], tmp_path / "runs")[0]
    assert runner.execute(run) == "interrupted"
    assert len(launched) == 1 and not run.fit_file.exists() and not run.result_file.exists()
    assert "fit interrupted" in capsys.readouterr().out


def test_unfinished_fit_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    launched: list[list[str]] = []
    monkeypatch.setattr(process, "launch", lambda cmd, log: launched.append(cmd) or 1)
    run = runner.grid_runs(load_grid(_grid(tmp_path)), [0], tmp_path / "runs")[0]
    last = run.root / "fit" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    assert runner.execute(run) == "failed"
    assert launched[0][-2:] == ["--ckpt_path", str(last)] and last.is_file()
    launched.clear()
    last.unlink()  # no last.ckpt: the fit starts again in an emptied fit/
    (run.root / "fit" / "events.out.tfevents.stale").write_text("")
    assert runner.execute(run) == "failed"
    assert "--ckpt_path" not in launched[0]
    assert not (run.root / "fit" / "events.out.tfevents.stale").exists()


# ------------------------------------------------------------ defects found by that audit
def test_short_config_flag_finds_packaged_configs(tmp_path, monkeypatch):
    """LightningCLI accepts `-c` for `--config`; the packaged-name lookup now does too."""
    from hug_lightning.cli import packaged_config, resolve_config_args
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "-c", "cifar10_ce"]) == [
        "fit", "-c", str(packaged_config("cifar10_ce"))]


def test_moved_output_folder_is_not_another_fit_command(tmp_path, capsys):
    """A finished run whose output folder was moved (or whose packaged configs live in another
    environment's site-packages) is the same command: no 'another fit command' warning."""
    import json

    from hug_lightning.experiments import runner
    from hug_lightning.experiments.grid import load_grid
    grid = load_grid("paper_cifar10")
    old = runner.grid_runs(grid, [0], tmp_path / "A")[0]
    saved = old.fit_command([], None)
    saved[saved.index("--config") + 1] = "/elsewhere/site-packages/hug_lightning/configs/" + \
        Path(saved[saved.index("--config") + 1]).name
    new = runner.grid_runs(grid, [0], tmp_path / "B")[0]
    new.root.mkdir(parents=True)
    new.result_file.write_text(json.dumps({"fit_command": saved}))
    assert runner.execute(new) == "skipped"
    out = capsys.readouterr().out
    assert "done before: skipped" in out and "another fit command" not in out
    # a real difference is still reported
    new.result_file.write_text(json.dumps({"fit_command": saved + ["--trainer.max_epochs", "9"]}))
    assert runner.execute(new) == "skipped"
    assert "another fit command" in capsys.readouterr().out


def test_a_model_num_classes_replaced_by_the_data_link_is_reported():
    """`num_classes` is linked from the data module and wins over the model's own value: a
    differing value given for the model is reported instead of silently replaced."""
    args = ["--config", "ufm_hug", "--trainer.logger", "false"]
    with pytest.warns(UserWarning, match=r"num_classes=5 is not used: .* num_classes=10"):
        built = cli.main([*args, "--model.init_args.num_classes", "5"], run=False)
    assert built.model.num_classes == 10
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # the same value: nothing to report
        warnings.simplefilter("always")
        cli.main([*args, "--model.init_args.num_classes", "10"], run=False)
    assert not [w for w in caught if "is not used" in str(w.message)]


def test_run_without_logger_never_replaces_the_users_config_yaml(tmp_path, monkeypatch):
    """Without a logger the resolved config is saved in the working folder, where the user's
    own `config.yaml` (often the --config input itself) was overwritten."""
    monkeypatch.chdir(tmp_path)
    mine = "# my commented config\n" + (REPO / "configs" / "ufm_ce.yaml").read_text()
    (tmp_path / "config.yaml").write_text(mine)
    args = ["fit", "--config", "config.yaml", "--trainer.logger", "false",
            "--trainer.max_epochs", "1", "--data.init_args.samples_per_class", "2",
            "--data.init_args.steps_per_epoch", "1", "--model.init_args.backbone.init_args.dim",
            "8", "--trainer.check_val_every_n_epoch", "1"]
    for n in (1, 2):
        cli.main(args)
        assert (tmp_path / "config.yaml").read_text() == mine
        assert "max_epochs: 1" in (tmp_path / f"config-{n}.yaml").read_text()


def test_batch_limit_written_as_1_is_one_batch(tmp_path):
    """jsonargparse read `limit_train_batches: 1` as 1.0 (all batches: Union[float, int] from
    Python's typing cache); as written it means one batch, 1.0 still means all."""
    extra = tmp_path / "limits.yaml"
    extra.write_text("trainer:\n  limit_train_batches: 1\n  limit_val_batches: 1.0\n")
    args = ["--config", "ufm_ce", "--config", str(extra), "--trainer.logger.init_args.save_dir",
            str(tmp_path), "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches",
            "1", "--trainer.limit_predict_batches", "0.5"]  # the last flag wins
    built = cli.main(args, run=False)
    t = built.trainer
    assert (t.limit_train_batches, t.limit_val_batches, t.limit_test_batches) == (1, 1.0, 1)
    assert isinstance(t.limit_train_batches, int) and isinstance(t.limit_val_batches, float)
    assert t.limit_predict_batches == 0.5
    assert built.config.trainer.limit_train_batches == 1  # what config.yaml records
    fit = cli.main(["fit", *args[:-4], "--trainer.max_epochs", "1",
                    "--data.init_args.steps_per_epoch", "5"])
    assert fit.trainer.global_step == 1  # one batch, not 5
    saved = yaml.safe_load(Path(fit.trainer.log_dir, "config.yaml").read_text())
    assert saved["trainer"]["limit_train_batches"] == 1
    # as the int 1: the file said 1.0 (`1.0 == 1`), which, used again, ran on every batch
    assert type(saved["trainer"]["limit_train_batches"]) is int
    again = cli.main(["fit", "--config", str(Path(fit.trainer.log_dir, "config.yaml")),
                      "--trainer.logger.init_args.save_dir", str(tmp_path / "again")])
    assert again.trainer.global_step == 1


def test_print_config_keeps_a_batch_limit_of_1(tmp_path, capsys):
    """--print_config wrote `limit_train_batches: 1.0`: the printed config, run again, trained
    on all batches instead of one."""
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", "ufm_ce", "--trainer.limit_train_batches", "1",
                  "--trainer.limit_val_batches", "1.0", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert type(printed["limit_train_batches"]) is int and printed["limit_train_batches"] == 1
    assert type(printed["limit_val_batches"]) is float  # 1.0 (all batches) stays 1.0


# ------------------------------------------------------------ grid runner: resumed fits
def test_resumed_fit_with_another_command_is_announced_and_keeps_the_first(tmp_path, monkeypatch,
                                                                          capsys):
    """A grid changed while a fit was unfinished resumed silently, and the results recorded the
    new command (later reruns then skipped it as 'the same'); a fit interrupted on its own
    (exit 130/143) was reported FAILED."""
    launched: list[list[str]] = []
    statuses = iter([143, 0])

    def launch(cmd, log_file):
        launched.append(cmd)
        status = next(statuses)
        if status == 0:  # a complete fit: its marker, a checkpoint and a resume config
            run.completed_file.write_text("{}")
            (run.fit_dir / "config.resume-1.yaml").write_text("")
            (run.fit_dir / "config.resume-2.yaml").write_text("")
        return status

    monkeypatch.setattr(process, "launch", launch)
    run = runner.grid_runs(load_grid(_grid(tmp_path)), [0], tmp_path / "runs")[0]
    assert runner.execute(run) == "interrupted"  # 143: the fit saved last.ckpt and stopped
    assert "fit interrupted: rerun to resume" in capsys.readouterr().out
    first = json.loads(run.started_file.read_text())["command"]
    assert first == launched[0]
    last = run.ckpt_dir / "last.ckpt"
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_bytes(b"x")
    monkeypatch.setattr(runner, "_tested_checkpoint", lambda r: last)
    monkeypatch.setattr(runner, "last_values", lambda d: {})
    tested: list[list[str]] = []

    def launch_test(cmd, log_file):
        if "test" in cmd:
            tested.append(cmd)
            return 0
        return launch(cmd, log_file)

    monkeypatch.setattr(process, "launch", launch_test)
    assert runner.execute(run, ["--trainer.max_epochs", "9"]) == "done"
    out = capsys.readouterr().out
    assert "resuming a fit started with another fit command" in out
    assert json.loads(run.fit_file.read_text())["command"] == first
    assert json.loads(run.result_file.read_text())["fit_command"] == first
    # the test reads the config the last (resumed) fit saved: its data paths are current
    assert tested[0][tested[0].index("--config") + 1].endswith("config.resume-2.yaml")
    assert runner.execute(run, ["--trainer.max_epochs", "9"]) == "skipped"
    assert "done before with another fit command" in capsys.readouterr().out


def test_edits_inside_a_config_file_are_a_change_of_command(tmp_path, monkeypatch, capsys):
    """The runner compared command lines only: a config file edited between two runs of the
    grid gave 'done before: skipped' (and resumed unfinished fits silently) though every run
    was now defined differently."""
    config = tmp_path / "mine.yaml"
    config.write_text((REPO / "configs" / "ufm_ce.yaml").read_text())
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(yaml.safe_dump({"name": "g", "seeds": [0, 1], "entries": [
        {"name": "ce", "configs": [str(config), "debug.yaml"]}]}))
    out = tmp_path / "runs"
    done, unfinished = runner.grid_runs(load_grid(grid_path), [0, 1], out)
    statuses = iter([0, 0, 143])

    def launch(cmd, log_file):
        run = done if "seed0" in " ".join(cmd) else unfinished
        status = next(statuses)
        if status == 0 and cmd[3] == "fit":
            run.completed_file.write_text("{}")
        return status

    monkeypatch.setattr(process, "launch", launch)
    monkeypatch.setattr(runner, "_tested_checkpoint", lambda r: config)
    monkeypatch.setattr(runner, "last_values", lambda d: {})
    assert runner.execute(done) == "done" and runner.execute(unfinished) == "interrupted"
    (unfinished.ckpt_dir).mkdir(parents=True)
    (unfinished.ckpt_dir / "last.ckpt").write_bytes(b"x")
    capsys.readouterr()
    assert runner.execute(done) == "skipped"
    runner.dry_run([done, unfinished])
    assert "edited" not in capsys.readouterr().out  # unchanged: no warning
    config.write_text(config.read_text() + "\nseed_everything: 7\n")
    assert runner.execute(done) == "skipped"
    assert "done before with config files edited since (mine.yaml)" in capsys.readouterr().out
    runner.dry_run([done, unfinished])
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# ")]
    assert heads == ["# g / ce / seed 0 (done: skipped, config files edited since (mine.yaml))",
                     "# g / ce / seed 1 (resumes from last.ckpt, config files edited since "
                     "(mine.yaml))"]
    monkeypatch.setattr(process, "launch", lambda cmd, log_file: 143)
    runner.execute(unfinished)
    assert ("resuming a fit started with config files edited since (mine.yaml)"
            in capsys.readouterr().out)


def test_read_scalars_keeps_the_newest_value_of_a_step_written_twice(tmp_path):
    """A fit killed after logging and resumed logs the same steps again."""
    import time
    from torch.utils.tensorboard import SummaryWriter

    from hug_lightning.experiments.results import read_scalars
    for values in ((1.0, 2.0, 3.0), (20.0, 30.0, 40.0)):  # steps 0-2, then 1-3 again
        writer = SummaryWriter(str(tmp_path))
        start = 0 if values[0] == 1.0 else 1
        for step, value in enumerate(values, start):
            writer.add_scalar("train/loss", value, step)
        writer.close()
        time.sleep(0.05)
    assert read_scalars(tmp_path)["train/loss"] == [(0, 1.0), (1, 20.0), (2, 30.0), (3, 40.0)]


def test_dry_run_names_the_checkpoint_the_test_will_use(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "seeds": [0], "entries": [
        {"name": "lt", "configs": ["ufm_ce.yaml"], "test_checkpoint": "last"},
        {"name": "ce", "configs": ["ufm_ce.yaml"]}]}))
    runs = runner.grid_runs(load_grid(path), [0], tmp_path / "runs")
    runner.dry_run(runs)
    out = capsys.readouterr().out.splitlines()
    assert out[2].endswith("--ckpt_path " + str(runs[0].ckpt_dir / "last.ckpt"))
    assert out[5].endswith("--ckpt_path '<best checkpoint of fit>'")


def test_checkpoint_of_another_class_count_is_one_clear_error(tmp_path):
    """It printed 'num_classes=3 is not used' (a value the user never set), then a
    size-mismatch traceback."""
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1",
            "--data.init_args.steps_per_epoch", "1", "--data.init_args.samples_per_class", "2",
            "--model.init_args.backbone.init_args.dim", "8"]
    cli.main(["fit", "--config", "ufm_ce", *logs, "--data.init_args.num_classes", "3"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    with pytest.raises(cli.ConfigError, match=r"checkpoint's model has num_classes=3, the data "
                                              r"module UFMDataModule has 10 classes"):
        cli.main(["test", "--config", "ufm_ce", *logs, "--ckpt_path", str(ckpt)])


@pytest.mark.parametrize("size", [0, 5000])
def test_truncated_last_checkpoint_is_named_in_one_message(tmp_path, size, monkeypatch, capsys):
    """A save cut by SIGKILL left last.ckpt truncated: resume failed with torch.load's bare
    'OSError: [Errno 22] Invalid argument' (no file name), evaluation with a wrong reason."""
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1",
            "--data.init_args.steps_per_epoch", "1", "--data.init_args.samples_per_class", "2",
            "--model.init_args.backbone.init_args.dim", "8"]
    cli.main(["fit", "--config", "ufm_ce", *logs])
    last = next(tmp_path.rglob("last.ckpt"))
    last.write_bytes(last.read_bytes()[:size])
    for sub in ("fit", "test"):
        with pytest.raises(cli.RunNotFoundError, match=rf"{last.name} cannot be read .*truncated"):
            cli.main([sub, "--config", "ufm_ce", *logs, "--ckpt_path", "last"])
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", "--config", "ufm_ce", *logs,
                                     "--ckpt_path", "last"])
    assert cli.console_main() == 1 and str(last) in capsys.readouterr().err


@pytest.mark.parametrize("flags, header", [
    (["--model", "hug_lightning.module.ClassifierModule", "--model.head.help",
      "hug_lightning.heads.HUGHead"], "Proxy head trained with HUG"),
    (["--data.help", "hug_lightning.data.CIFAR10LTDataModule"],
     "Long-tailed CIFAR-10 (LDAM protocol):"),
])
def test_class_help_reads_without_the_docstring_around_it(capsys, flags, header):
    """`--*.help` shows each class's summary line and its Args: they said `see "Distributed
    training" above` (a docstring section the help does not show) and `Arguments: see
    :class:`_LongTailCIFAR`` (a private class) in the summary."""
    with pytest.raises(SystemExit):
        cli.main(["fit", *flags])
    out = capsys.readouterr().out
    assert header in out
    assert " above" not in out and "_LongTailCIFAR" not in out


def test_a_command_does_not_show_lightnings_leafspec_deprecation(tmp_path):
    """Lightning 2.6.6's pytree copy builds torch's deprecated ``LeafSpec``: every command
    printed a FutureWarning about `isinstance(treespec, LeafSpec)` that no user can act on.
    Run as a user runs it (pytest's own warning filters would hide the command's)."""
    import subprocess
    import sys

    from conftest import REPO
    proc = subprocess.run(
        [sys.executable, "-m", "hug_lightning", "fit", "--config", "ufm_hug",
         "--trainer.max_epochs", "1", "--nc.enabled", "false",
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Trainer.fit` stopped" in proc.stderr  # the fit ran (its log is on stderr)
    assert "LeafSpec" not in proc.stderr + proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_gpu_preset_without_a_gpu_is_one_line_that_says_what_to_do(tmp_path, monkeypatch,
                                                                        capsys):
    """`--config gpu.yaml` (the README's second command) on a laptop: Lightning's Trainer
    raised `MisconfigurationException: No supported gpu backend found!` with a traceback
    (exit status 1). Now the command's configuration error: exit status 2, one message naming
    the flag, nothing started."""
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", "--config", "ufm_hug", "--config",
                                     "gpu", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.console_main() == 2
    err = capsys.readouterr().err
    assert err.startswith("hug-lightning: error: invalid configuration: No supported gpu backend "
                          "found!"), err
    assert "--trainer.accelerator cpu" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("version_*"))
    with pytest.raises(cli.ConfigError, match="can not run on your system.*accelerator cpu"):
        cli.main(["fit", "--config", "ufm_hug", "--trainer.accelerator", "cuda",
                  "--trainer.logger.init_args.save_dir", str(tmp_path)])  # Python: an exception
