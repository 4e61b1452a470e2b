"""Multi-node DDP as SLURM's ``srun`` starts it, simulated: no SLURM here, so the test starts the
2 tasks itself with the variables srun gives each task (2 nodes x 1 task, gloo on CPU), and a
stand-in ``scontrol`` on the PATH records the requeue instead of reaching a real cluster.

Lightning detects SLURM from these variables (``SLURMEnvironment``: ranks from ``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NODEID``; ``MASTER_ADDR`` from ``SLURM_NODELIST``, ``MASTER_PORT``
from the job id) and then installs its auto-requeue handlers, which the run must survive.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from _slurm_helpers import srun, stand_ins, ufm_args
from conftest import REPO


@pytest.mark.slow
def test_srun_two_nodes_requeue_signal_sigterm_and_resume(tmp_path):
    """2 simulated SLURM tasks, one per node: SIGUSR1 (Lightning's auto-requeue signal) to the
    second task alone, later SIGTERM to the first alone. Lightning saved the HPC checkpoint
    inside the signal handler, a collective wherever that task was: the run hung (both tasks
    waiting in different collectives). Now both write ``hpc_ckpt_1.ckpt`` after the same batch,
    the first asks ``scontrol`` to requeue the job once, training goes on; the SIGTERM stops both
    with ``last.ckpt`` and status 143, and ``--ckpt_path last`` ends with the weights of one
    process trained without interruption on the same global batch."""
    stand_ins(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run(ufm_args(tmp_path / "ref"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]

    signals = ["--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank", "1",
               "--trainer.callbacks.step", "2", "--trainer.callbacks.name", "SIGUSR1",
               "--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank", "0",
               "--trainer.callbacks.step", "7", "--trainer.callbacks.name", "SIGTERM"]
    tasks = srun(tmp_path, ufm_args(tmp_path / "cut", "--trainer.num_nodes", "2", *signals))
    assert "SLURM auto-requeueing enabled" in tasks[0].stderr  # Lightning saw SLURM
    assert "distributed_backend=gloo" in tasks[0].stderr
    assert [t.returncode for t in tasks] == [143, 143], tasks[0].stderr[-3000:]
    assert "Interrupted at epoch" in tasks[0].stderr
    calls = (tmp_path / "bin" / "scontrol.calls").read_text().splitlines()
    job_id = calls[0].split()[-1]
    assert calls == [f"requeue {job_id}"]  # rank 0 alone, once
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    last_path = next((tmp_path / "cut" / "ufm_hug").glob("version_0/checkpoints/last.ckpt"))
    last = torch.load(last_path, weights_only=True)
    assert 2 < hpc["global_step"] < last["global_step"] < 12
    assert sorted(p.name for p in tmp_path.glob("*ckpt*")) == ["hpc_ckpt_1.ckpt"]

    tasks = srun(tmp_path, ufm_args(tmp_path / "cut", "--trainer.num_nodes", "2",
                                 "--ckpt_path", "last"))
    assert [t.returncode for t in tasks] == [0, 0], tasks[0].stderr[-3000:]
    assert str(last_path) in tasks[0].stderr  # restored from last.ckpt, not the hpc one
    one = torch.load(next((tmp_path / "ref" / "ufm_hug").glob("version_0/checkpoints/last.ckpt")),
                     weights_only=True)
    two = torch.load(last_path, weights_only=True)
    assert two["global_step"] == one["global_step"] == 12
    for key in ("backbone.weight", "head.proxies"):
        torch.testing.assert_close(two["state_dict"][key], one["state_dict"][key], rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("fn", ["validate", pytest.param("predict", marks=pytest.mark.slow)])
def test_requeue_signal_outside_fit_writes_no_hpc_checkpoint(tmp_path, fn):
    """SIGUSR1 during a ``validate`` or ``predict`` under (simulated, one task) SLURM. Lightning's
    handler wrote ``hpc_ckpt_1.ckpt`` (the evaluated weights at global step 0, no optimizer
    state), which every later ``fit`` under SLURM in that folder restored by itself: a new run
    silently started from trained weights. Now the job is requeued once and nothing is saved."""
    stand_ins(tmp_path)
    args = [fn if a == "fit" else a for a in ufm_args(tmp_path / "log")]  # the fit's model, data
    args += ["--trainer.callbacks+", "slurm_signals.SignalInEval", "--trainer.callbacks.name",
             "SIGUSR1"]
    task = srun(tmp_path, args, nodes=1)[0]
    assert task.returncode == 0, task.stderr[-3000:]
    assert "SLURM auto-requeueing enabled" in task.stderr  # Lightning saw SLURM
    calls = (tmp_path / "bin" / "scontrol.calls").read_text().splitlines()
    assert calls == [f"requeue {calls[0].split()[-1]}"]
    assert not list(tmp_path.rglob("*.ckpt")), list(tmp_path.rglob("*.ckpt"))
