"""Shared by the SLURM tests (tests/test_slurm*.py): the callbacks that send signals and log
what a run did (written as ``slurm_signals.py`` into the test's folder), a stand-in ``scontrol``
that records the requeue, and ``srun`` simulated: the tasks started here with the variables
SLURM gives each task (gloo on CPU). No SLURM is needed.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

SIGNALS = '''
import os
import signal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Checkpoint


class SignalAt(Callback):
    """Send ``name`` to this process on global rank ``rank`` before training step ``step``."""

    def __init__(self, rank: int, step: int, name: str) -> None:
        self.rank, self.step, self.name, self.sent = rank, step, name, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_rank == self.rank and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.name))


class SignalInEval(Callback):
    """Send ``name`` to this process at the first batch of a validate or predict."""

    def __init__(self, name: str) -> None:
        self.name, self.sent = name, False

    def _send(self, trainer):
        if not self.sent and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.name))

    def on_validation_batch_start(self, trainer, *args, **kwargs):
        self._send(trainer)

    def on_predict_batch_start(self, trainer, *args, **kwargs):
        self._send(trainer)


class ValLog(Callback):
    """Append ``<global step> <val/loss>`` to ``path`` after every validation of a fit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            with open(self.path, "a") as f:
                print(trainer.global_step, float(trainer.callback_metrics["val/loss"]), file=f)


class EpochLog(Checkpoint):  # a Checkpoint: Lightning calls it after the module's epoch end
    """Append ``<epoch> <global step> <train/acc>`` to ``path`` at every training epoch end."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        with open(self.path, "a") as f:
            print(trainer.current_epoch, trainer.global_step,
                  float(trainer.callback_metrics["train/acc"]), file=f)


class EmptyVal(Callback):
    """Give the fit a validation set of 0 batches (Lightning skips such a validation)."""

    def setup(self, trainer, pl_module, stage):
        trainer.datamodule.val_dataloader = lambda: torch.utils.data.DataLoader([])
'''

SCONTROL = '#!/bin/sh\necho "$@" >> "$(dirname "$0")/scontrol.calls"\n'


def slurm_port() -> tuple[str, int]:
    """A job id whose port (Lightning: 15000 + its last 4 digits) is free here."""
    rng = random.Random()
    for _ in range(200):
        digits = rng.randrange(10000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + digits))
            except OSError:
                continue
        return f"4{digits:04d}", 15000 + digits
    pytest.skip("no free port in 15000-24999")


def ufm_args(log: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hug_lightning", "fit", "--config", "ufm_hug",
            "--trainer.logger.init_args.save_dir", str(log), "--trainer.max_epochs", "4",
            "--data.init_args.samples_per_class", "5", "--data.init_args.steps_per_epoch", "3",
            "--model.init_args.backbone.init_args.dim", "8", "--nc.enabled", "false",
            "--trainer.check_val_every_n_epoch", "1", *extra]


def stand_ins(tmp_path: Path) -> None:
    """``slurm_signals.py`` (the callbacks above) and the stand-in ``bin/scontrol``."""
    (tmp_path / "slurm_signals.py").write_text(SIGNALS)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(SCONTROL)
    (tmp_path / "bin" / "scontrol").chmod(0o755)


def srun(tmp_path: Path, args: list[str], nodes: int = 2) -> list[subprocess.CompletedProcess]:
    """``srun --nodes <nodes> --ntasks-per-node 1 <args>``, run in ``tmp_path``."""
    job_id, _ = slurm_port()
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
            "PATH": os.pathsep.join([str(tmp_path / "bin"), os.environ.get("PATH", "")]),
            "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": "hug",
            "SLURM_NTASKS": str(nodes), "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        base.pop(key, None)
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": "0",
                                   "SLURM_NODEID": str(r)})
             for r in range(nodes)]
    out = []
    for proc in procs:
        try:
            err = proc.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the SLURM tasks hung:\n" + proc.communicate()[1][-3000:])
        out.append(subprocess.CompletedProcess(args, proc.returncode, "", err))
    return out


def requeue_and_restore(tmp_path: Path, common: list[str], log_callback: str, ext: str,
                         step: int, final_step: int, resumed: tuple[str, ...] = ()) -> dict:
    """An uninterrupted 2-epoch UFM fit (``ref``), one (``cut``, one simulated SLURM task) that
    gets SIGUSR1 before global step ``step`` and asks for one requeue, and one restored by
    Lightning from the ``hpc_ckpt_1.ckpt`` it wrote (``res``); ``log_callback`` of
    ``slurm_signals`` writes ``ref.<ext>`` and ``res.<ext>``. Checks that ``res`` ends with the
    weights of ``ref`` at ``final_step`` and returns the hpc checkpoint. ``resumed``: more
    arguments of ``cut`` and ``res`` (the requeued job's command is the same)."""
    stand_ins(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    common = ["--trainer.max_epochs", "2", *common]

    def log(name: str) -> list[str]:
        return ["--trainer.callbacks+", f"slurm_signals.{log_callback}",
                "--trainer.callbacks.path", str(tmp_path / f"{name}.{ext}")]

    ref = subprocess.run(ufm_args(tmp_path / "ref", *common, *log("ref")), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]
    signal_at = ["--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank",
                 "0", "--trainer.callbacks.step", str(step), "--trainer.callbacks.name",
                 "SIGUSR1"]
    cut = srun(tmp_path, ufm_args(tmp_path / "cut", *common, *resumed, *signal_at), nodes=1)[0]
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "SLURM auto-requeueing enabled" in cut.stderr
    assert len((tmp_path / "bin" / "scontrol.calls").read_text().splitlines()) == 1
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    res = srun(tmp_path, ufm_args(tmp_path / "res", *common, *resumed, *log("res")), nodes=1)[0]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in res.stderr  # Lightning restored it by itself
    one, two = (torch.load(next((tmp_path / name).rglob("last.ckpt")), weights_only=True)
                for name in ("ref", "res"))
    assert two["global_step"] == one["global_step"] == final_step
    for key in ("backbone.weight", "head.proxies"):
        torch.testing.assert_close(two["state_dict"][key], one["state_dict"][key], rtol=1e-5,
                                   atol=1e-6)
    return hpc
