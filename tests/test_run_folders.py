"""``never_into_a_run_folder``: evaluations leave a training run's version folder alone."""

from __future__ import annotations

import pytest
from lightning.pytorch.utilities import rank_zero_only

from hug_lightning.run_folders import never_into_a_run_folder, run_folder


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
