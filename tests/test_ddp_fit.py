"""A real 2-process DDP fit (gloo on CPU) through the console command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_args


@pytest.mark.slow
def test_ddp_two_process_fit_logs_once(cifar10_folder_root, tmp_path):
    args = tiny_args(cifar10_folder_root, tmp_path, "--trainer.strategy", "ddp",
                     "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                     "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hug_lightning", "fit", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distributed_backend=gloo" in proc.stderr
    assert "All distributed processes registered" in proc.stderr
    runs = list((tmp_path / "cifar10_ce").glob("version_*"))
    assert len(runs) == 1, runs  # rank 0 alone created the run folder
    events = list(runs[0].glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # and only rank 0 wrote TensorBoard events
    assert (runs[0] / "config.yaml").is_file()
    ckpts = {p.name for p in (runs[0] / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts
