"""SLURM's auto-requeue (SIGUSR1): where a ``fit`` may write its ``hpc_ckpt_<n>.ckpt``, and the
requeue outside ``fit``, which writes none.

Lightning's handler saves ``hpc_ckpt_<n>.ckpt`` in the working folder and runs ``scontrol
requeue`` in ``validate``, ``test`` and ``predict`` too. That checkpoint holds the evaluated
weights at global step 0 with no optimizer state, and Lightning restores the newest one by itself
in every later ``fit`` (or evaluation) under SLURM started in that folder without
``--ckpt_path``: a new experiment silently started from trained weights, with fresh optimizers.
Its save is also collective (a barrier), made inside the signal handler wherever each process
was, which can hang a multi-process evaluation. An evaluation has nothing to resume (the
requeued job runs it again from its start), so outside ``fit`` the requeue is asked without a
checkpoint (:func:`requeue_job`).
"""

from __future__ import annotations

import os
import re
import subprocess

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def accumulating(trainer: Trainer) -> bool:
    """Whether this training batch is inside a gradient accumulation window (its gradients are in
    no checkpoint). False with another Lightning version."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return bool(getattr(loop, "_should_accumulate", lambda: False)())


def validation_follows(trainer: Trainer) -> bool:
    """Whether a validation runs after this training batch (mid-epoch or at the epoch's end):
    Lightning's restart from a checkpoint written before it skips it. False with another
    Lightning version, and for a validation known to have no batches (Lightning skips it, and
    ``on_validation_end`` with it); one not yet set up counts as following."""
    fit_loop = getattr(trainer, "fit_loop", None)
    try:
        val_loop = fit_loop.epoch_loop.val_loop
        if val_loop._combined_loader is not None and not val_loop._should_reload_val_dl \
                and val_loop.skip:  # 0 batches: Lightning skips it, with all its hooks
            return False
        return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))
    except AttributeError:
        return False


def epoch_ends(trainer: Trainer) -> bool:
    """Whether this training batch is its epoch's last: Lightning's restart from a checkpoint
    written after it counts the epoch as done and skips its end hooks. False with another
    Lightning version."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return bool(getattr(loop, "_num_ready_batches_reached", lambda: False)())


def save_hpc_checkpoint(trainer: Trainer) -> str:
    """Lightning's requeue save: its loggers finalized, then ``hpc_ckpt_<n>.ckpt`` in the root
    folder (collective: every process calls it at the same point). Returns its path."""
    for logger in trainer.loggers:  # as Lightning's handler: all metrics written
        logger.finalize("finished")
    path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
    trainer.save_checkpoint(path)
    return path


def requeue_job(trainer: Trainer, saved: str | None = None) -> None:
    """``scontrol requeue <job id>`` from the main process, as Lightning's handler does (safe in a
    signal handler: no collective). ``saved``: the hpc checkpoint written for it, if any."""
    if not trainer.is_global_zero:
        return
    fn = getattr(trainer.state.fn, "value", trainer.state.fn)
    rank_zero_info(f"Handling auto-requeue signal in {fn}: " + (
        f"requeuing after saving {saved}." if saved else
        "requeuing without a checkpoint (the requeued job runs it again from its start)."))
    array_job_id = os.getenv("SLURM_ARRAY_JOB_ID")
    job_id = (f"{array_job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job_id is not None
              else os.environ["SLURM_JOB_ID"])
    if not re.fullmatch("[0-9_-]+", job_id):
        rank_zero_warn(f"Not requeuing: unexpected SLURM job id {job_id!r}")
        return
    cmd = ["scontrol", "requeue", job_id]
    try:
        result = subprocess.call(cmd)
    except FileNotFoundError:  # as Lightning: once more through a shell
        result = subprocess.call(" ".join(cmd), shell=True)
    if result == 0:
        rank_zero_info(f"Requeued SLURM job: {job_id}")
    else:
        rank_zero_warn(f"Requeuing SLURM job {job_id} failed with error code {result}")
