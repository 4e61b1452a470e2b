"""Multi-node DDP as SLURM's ``srun`` starts it, simulated: no SLURM here, so the test starts the
2 tasks itself with the variables srun gives each task (2 nodes x 1 task, gloo on CPU), and a
stand-in ``scontrol`` on the PATH records the requeue instead of reaching a real cluster.

Lightning detects SLURM from these variables (``SLURMEnvironment``: ranks from ``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NODEID``; ``MASTER_ADDR`` from ``SLURM_NODELIST``, ``MASTER_PORT``
from the job id) and then installs its auto-requeue handlers, which the run must survive.
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


def _slurm_port() -> tuple[str, int]:
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


def _ufm(log: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hug_lightning", "fit", "--config", "ufm_hug",
            "--trainer.logger.init_args.save_dir", str(log), "--trainer.max_epochs", "4",
            "--data.init_args.samples_per_class", "5", "--data.init_args.steps_per_epoch", "3",
            "--model.init_args.backbone.init_args.dim", "8", "--nc.enabled", "false",
            "--trainer.check_val_every_n_epoch", "1", *extra]


def _stand_ins(tmp_path: Path) -> None:
    """``slurm_signals.py`` (the callbacks above) and the stand-in ``bin/scontrol``."""
    (tmp_path / "slurm_signals.py").write_text(SIGNALS)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(SCONTROL)
    (tmp_path / "bin" / "scontrol").chmod(0o755)


def _srun(tmp_path: Path, args: list[str], nodes: int = 2) -> list[subprocess.CompletedProcess]:
    """``srun --nodes <nodes> --ntasks-per-node 1 <args>``, run in ``tmp_path``."""
    job_id, _ = _slurm_port()
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


@pytest.mark.slow
def test_srun_two_nodes_requeue_signal_sigterm_and_resume(tmp_path):
    """2 simulated SLURM tasks, one per node: SIGUSR1 (Lightning's auto-requeue signal) to the
    second task alone, later SIGTERM to the first alone. Lightning saved the HPC checkpoint
    inside the signal handler, a collective wherever that task was: the run hung (both tasks
    waiting in different collectives). Now both write ``hpc_ckpt_1.ckpt`` after the same batch,
    the first asks ``scontrol`` to requeue the job once, training goes on; the SIGTERM stops both
    with ``last.ckpt`` and status 143, and ``--ckpt_path last`` ends with the weights of one
    process trained without interruption on the same global batch."""
    _stand_ins(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run(_ufm(tmp_path / "ref"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]

    signals = ["--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank", "1",
               "--trainer.callbacks.step", "2", "--trainer.callbacks.name", "SIGUSR1",
               "--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank", "0",
               "--trainer.callbacks.step", "7", "--trainer.callbacks.name", "SIGTERM"]
    tasks = _srun(tmp_path, _ufm(tmp_path / "cut", "--trainer.num_nodes", "2", *signals))
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

    tasks = _srun(tmp_path, _ufm(tmp_path / "cut", "--trainer.num_nodes", "2",
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


def _requeue_and_restore(tmp_path: Path, common: list[str], log_callback: str, ext: str,
                         step: int, final_step: int, resumed: tuple[str, ...] = ()) -> dict:
    """An uninterrupted 2-epoch UFM fit (``ref``), one (``cut``, one simulated SLURM task) that
    gets SIGUSR1 before global step ``step`` and asks for one requeue, and one restored by
    Lightning from the ``hpc_ckpt_1.ckpt`` it wrote (``res``); ``log_callback`` of
    ``slurm_signals`` writes ``ref.<ext>`` and ``res.<ext>``. Checks that ``res`` ends with the
    weights of ``ref`` at ``final_step`` and returns the hpc checkpoint. ``resumed``: more
    arguments of ``cut`` and ``res`` (the requeued job's command is the same)."""
    _stand_ins(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    common = ["--trainer.max_epochs", "2", *common]

    def log(name: str) -> list[str]:
        return ["--trainer.callbacks+", f"slurm_signals.{log_callback}",
                "--trainer.callbacks.path", str(tmp_path / f"{name}.{ext}")]

    ref = subprocess.run(_ufm(tmp_path / "ref", *common, *log("ref")), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]
    signal_at = ["--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank",
                 "0", "--trainer.callbacks.step", str(step), "--trainer.callbacks.name",
                 "SIGUSR1"]
    cut = _srun(tmp_path, _ufm(tmp_path / "cut", *common, *resumed, *signal_at), nodes=1)[0]
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "SLURM auto-requeueing enabled" in cut.stderr
    assert len((tmp_path / "bin" / "scontrol.calls").read_text().splitlines()) == 1
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    res = _srun(tmp_path, _ufm(tmp_path / "res", *common, *resumed, *log("res")), nodes=1)[0]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in res.stderr  # Lightning restored it by itself
    one, two = (torch.load(next((tmp_path / name).rglob("last.ckpt")), weights_only=True)
                for name in ("ref", "res"))
    assert two["global_step"] == one["global_step"] == final_step
    for key in ("backbone.weight", "head.proxies"):
        torch.testing.assert_close(two["state_dict"][key], one["state_dict"][key], rtol=1e-5,
                                   atol=1e-6)
    return hpc


@pytest.mark.slow
def test_requeue_waits_for_the_accumulation_window_and_the_validation(tmp_path):
    """One simulated SLURM task, ``accumulate_grad_batches`` 2, SIGUSR1 before the first batch
    of a window. The requeue saved ``hpc_ckpt_1.ckpt`` at once, inside the window, whose first
    gradient no checkpoint holds: the run restored from it (Lightning's own restore, no
    ``--ckpt_path``) ended with other weights than an uninterrupted one. Now the save waits for
    the window's end, and, since a validation (here the epoch's) follows that batch and a restart
    from a checkpoint written before it skips it, for that validation's end: the restored run ends
    with the uninterrupted run's weights and logs the same validations after the checkpoint."""
    # global step 1 starts at the epoch's third batch, the first of its second window
    hpc = _requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
                                          "--trainer.accumulate_grad_batches", "2"],
                               "ValLog", "val", step=1, final_step=4)
    ref_vals = [v.split() for v in (tmp_path / "ref.val").read_text().splitlines()]
    res_vals = [v.split() for v in (tmp_path / "res.val").read_text().splitlines()]
    assert [int(s) for s, _ in ref_vals] == [2, 4]
    after = [(int(s), float(v)) for s, v in ref_vals if int(s) > hpc["global_step"]]
    assert [int(s) for s, _ in res_vals] == [s for s, _ in after]
    for (_, v), (_, w) in zip(res_vals, after):
        assert float(v) == pytest.approx(w, rel=1e-5)


@pytest.mark.slow
def test_requeue_at_an_epochs_last_batch_waits_for_the_next_epoch(tmp_path):
    """Found in review: one simulated SLURM task, SIGUSR1 before the last batch of an epoch that
    no validation follows (``check_val_every_n_epoch`` 2). The requeue saved ``hpc_ckpt_1.ckpt``
    after that batch, before the epoch's end hooks, and Lightning's restore counts such an epoch
    as done: the restored run never ran epoch 0's end (its training accuracy, plateau step,
    ...), and epoch 1's ``train/acc`` mixed both epochs' counts (0.3425, uninterrupted 0.52).
    Now the save waits for the next epoch's first batch: the restored run runs the epoch ends
    of the uninterrupted run after the checkpoint, with its values, and ends with its weights."""
    # global step 3 starts epoch 0's last batch
    hpc = _requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
                                          "--trainer.check_val_every_n_epoch", "2"],
                               "EpochLog", "ep", step=3, final_step=8)

    def ends(name: str) -> list[tuple[int, int, float]]:
        return [(int(e), int(s), float(a)) for e, s, a in
                (line.split() for line in (tmp_path / name).read_text().splitlines())]

    ref_ends = ends("ref.ep")
    assert [(e, s) for e, s, _ in ref_ends] == [(0, 4), (1, 8)]
    after = [end for end in ref_ends if end[1] > hpc["global_step"]]
    assert after and ends("res.ep") == after  # accuracies of whole batches: exact


@pytest.mark.slow
def test_requeue_before_a_validation_of_no_batches_saves_at_the_next_point(tmp_path):
    """Reported: one simulated SLURM task, a validation set of 0 batches, SIGUSR1 before an
    epoch's last batch. The save waited for the end of the epoch's validation, which Lightning
    skips (no batches, no hooks): no ``hpc_ckpt_1.ckpt`` and no requeue for the rest of the fit,
    so SLURM's kill lost the work. Now a skipped validation counts as none: the save comes at the
    next epoch's first batch (as after an epoch's last batch that no validation follows), and the
    run restored from it has the uninterrupted run's epoch ends and weights."""
    # global step 3 starts epoch 0's last batch
    hpc = _requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
                                          "--trainer.callbacks+", "slurm_signals.EmptyVal"],
                               "EpochLog", "ep", step=3, final_step=8)
    assert hpc["global_step"] == 5
    ref, res = ((tmp_path / f"{name}.ep").read_text().splitlines() for name in ("ref", "res"))
    assert [line.split()[:2] for line in ref] == [["0", "4"], ["1", "8"]]
    assert res == ref[1:]  # accuracies of whole batches: exact


@pytest.mark.slow
@pytest.mark.parametrize("step, extra", [
    (7, []),  # the fit's last batch (max_epochs 2), its validation follows
    (3, ["--trainer.max_epochs", "4", "--trainer.callbacks+", "EarlyStopping",
         "--trainer.callbacks.monitor", "val/acc", "--trainer.callbacks.mode", "max",
         "--trainer.callbacks.stopping_threshold", "0.0"]),  # an early stop at epoch 0's end
], ids=["max_epochs", "early_stop"])
def test_requeue_signal_as_the_fit_ends_requeues_nothing(tmp_path, step, extra):
    """Found checking the above: SIGUSR1 before the batch whose validation ends the fit (its
    last batch; or an early stop, decided at that epoch's end after the save). The requeue ran
    after that validation: a finished run requeued, and the requeued job's ``--ckpt_path last``
    resumed the early-stopped run for another epoch. Now ``scontrol requeue`` waits for training
    to go on past the save; a fit that ends there ends as without the signal: no requeue, no
    hpc checkpoint left (a later ``fit`` in the folder would restore it by itself)."""
    _stand_ins(tmp_path)
    signal_at = ["--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank",
                 "0", "--trainer.callbacks.step", str(step), "--trainer.callbacks.name",
                 "SIGUSR1"]
    cut = _srun(tmp_path, _ufm(tmp_path / "cut", "--trainer.max_epochs", "2",
                               "--data.init_args.steps_per_epoch", "4", *extra, *signal_at),
                nodes=1)[0]
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "SLURM auto-requeueing enabled" in cut.stderr
    assert "Auto-requeue signal at the fit's end: not requeued" in cut.stderr
    assert not (tmp_path / "bin" / "scontrol.calls").exists()
    assert not list(tmp_path.glob("hpc_ckpt_*")), list(tmp_path.glob("hpc_ckpt_*"))
    last = torch.load(next((tmp_path / "cut").rglob("last.ckpt")), weights_only=True)
    assert last["global_step"] == (4 if extra else 8)


def _best(run: Path) -> tuple[str, float]:
    """The best file's name and score that ``run``'s ``last.ckpt`` records."""
    state = torch.load(next(run.rglob("last.ckpt")), weights_only=True)["callbacks"]
    best = next(v for k, v in state.items() if k.startswith("ModelCheckpoint"))
    return Path(best["best_model_path"]).name, float(best["best_model_score"])


@pytest.mark.slow
def test_requeue_after_a_validation_keeps_its_best_checkpoint_decision(tmp_path):
    """Reported: the hpc checkpoint written after a validation came before ModelCheckpoint's
    decision on it (checkpoint callbacks run last), so a run restored from it (here into the
    same checkpoint folder, ``--checkpoint.dirpath``) did not know that validation's best file:
    it kept another one as best, next to the first. Now the save follows every callback's
    ``on_validation_end``: the restored run ends with the best file and score of an
    uninterrupted run, and the same files."""
    ckpts = tmp_path / "ckpts"
    # the lowest val/acc is the best: the first validation's (0.48, 0.78, 0.84), whose end the
    # save follows
    _requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
                                    "--trainer.max_epochs", "3", "--checkpoint.mode", "min"],
                         "ValLog", "val", step=3, final_step=12,
                         resumed=("--checkpoint.dirpath", str(ckpts)))
    ref = tmp_path / "ref"
    assert _best(tmp_path / "res") == _best(ref)
    ref_files = sorted(p.name for p in ref.rglob("epoch*.ckpt"))
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ref_files


@pytest.mark.parametrize("fn", ["validate", pytest.param("predict", marks=pytest.mark.slow)])
def test_requeue_signal_outside_fit_writes_no_hpc_checkpoint(tmp_path, fn):
    """SIGUSR1 during a ``validate`` or ``predict`` under (simulated, one task) SLURM. Lightning's
    handler wrote ``hpc_ckpt_1.ckpt`` (the evaluated weights at global step 0, no optimizer
    state), which every later ``fit`` under SLURM in that folder restored by itself: a new run
    silently started from trained weights. Now the job is requeued once and nothing is saved."""
    _stand_ins(tmp_path)
    args = [fn if a == "fit" else a for a in _ufm(tmp_path / "log")]  # the fit's model, data
    args += ["--trainer.callbacks+", "slurm_signals.SignalInEval", "--trainer.callbacks.name",
             "SIGUSR1"]
    task = _srun(tmp_path, args, nodes=1)[0]
    assert task.returncode == 0, task.stderr[-3000:]
    assert "SLURM auto-requeueing enabled" in task.stderr  # Lightning saw SLURM
    calls = (tmp_path / "bin" / "scontrol.calls").read_text().splitlines()
    assert calls == [f"requeue {calls[0].split()[-1]}"]
    assert not list(tmp_path.rglob("*.ckpt")), list(tmp_path.rglob("*.ckpt"))
