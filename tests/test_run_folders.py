"""``never_into_a_run_folder``: evaluations leave a training run's version folder alone;
``check_writable`` leaves other processes' probes alone; ``evaluation_warnings``: a resume in
place is not told that its own checkpoint folder is not empty."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lightning.pytorch.utilities import rank_zero_only

from hug_lightning.run_folders import check_writable, never_into_a_run_folder, run_folder


@pytest.mark.parametrize("rank", [0, 1])
def test_an_evaluation_leaves_a_run_folder_and_says_so_once(tmp_path, capsys, monkeypatch, rank):
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    logger = {"save_dir": str(tmp_path), "name": "exp", "version": "version_3"}
    assert run_folder(logger) == tmp_path / "exp" / "version_3"
    never_into_a_run_folder(logger, "test")  # no run there yet: the version is kept
    assert logger["version"] == "version_3" and capsys.readouterr().err == ""
    run_folder(logger).mkdir(parents=True)
    (run_folder(logger) / "config.yaml").write_text("trainer: {}\n")
    never_into_a_run_folder(logger, "test")
    assert logger["version"] is None  # on every process
    err = capsys.readouterr().err  # the notice: once, by the first process only
    assert (err.count("holds a run") == 1) if rank == 0 else err == ""
    logger["version"] = 3  # an int version names version_3 as well
    assert run_folder(logger) == tmp_path / "exp" / "version_3"


def test_the_write_check_leaves_another_nodes_probe_alone(tmp_path):
    """Two nodes sharing the log folder check it at the same moment, and their processes can
    have the same id (one container per node). The probe was ``.hug_write_test_<pid>``: this
    process deleted the other's, whose own delete then failed ("cannot write the log folder";
    seen with two PID namespaces, each checking 200 times). The other node's probe, in flight here
    under this process's id, must survive the check, and the check must leave nothing."""
    other = tmp_path / f".hug_write_test_{os.getpid()}"
    other.write_text("node 1")
    check_writable(tmp_path)
    assert other.read_text() == "node 1"
    assert [p.name for p in tmp_path.iterdir()] == [other.name]


def _dir_not_empty(caught) -> list[str]:
    return [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]


def test_a_resume_in_place_does_not_warn_that_its_own_checkpoint_folder_is_not_empty(tmp_path):
    """`fit --ckpt_path last` resumes into the run's folder, whose checkpoints/ holds the file
    it resumes from: Lightning's 'Checkpoint directory ... exists and is not empty' only alarmed
    there. A new fit given that folder (--checkpoint.dirpath) still gets the warning."""
    import warnings

    from hug_lightning import cli

    args = ["--config", "ufm_hug", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--nc.enabled", "false", "--trainer.enable_model_summary", "false"]
    cli.main(["fit", *args, "--trainer.max_epochs", "1"])
    checkpoints = tmp_path / "ufm_hug" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = cli.main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert resumed.trainer.current_epoch == 2 and Path(resumed.trainer.log_dir).name == "version_0"
    assert _dir_not_empty(caught) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["fit", *args, "--trainer.max_epochs", "1", "--checkpoint.dirpath",
                  str(checkpoints)])
    assert len(_dir_not_empty(caught)) == 1, [str(w.message) for w in caught]
