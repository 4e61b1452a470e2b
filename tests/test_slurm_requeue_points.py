"""Where SLURM's requeue (SIGUSR1) saves its ``hpc_ckpt_1.ckpt`` in a fit, and when it asks
``scontrol`` to requeue (:class:`hug_lightning.slurm_requeue.RequeueSchedule`): one simulated
SLURM task (see ``_slurm_helpers``), a run restored from that checkpoint by Lightning compared
with an uninterrupted one (weights, epoch ends, validations, best checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _slurm_helpers import requeue_and_restore, srun, stand_ins, ufm_args


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
    hpc = requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
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
    hpc = requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
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
    hpc = requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
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
    stand_ins(tmp_path)
    signal_at = ["--trainer.callbacks+", "slurm_signals.SignalAt", "--trainer.callbacks.rank",
                 "0", "--trainer.callbacks.step", str(step), "--trainer.callbacks.name",
                 "SIGUSR1"]
    cut = srun(tmp_path, ufm_args(tmp_path / "cut", "--trainer.max_epochs", "2",
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
    requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "4",
                                    "--trainer.max_epochs", "3", "--checkpoint.mode", "min"],
                         "ValLog", "val", step=3, final_step=12,
                         resumed=("--checkpoint.dirpath", str(ckpts)))
    ref = tmp_path / "ref"
    assert _best(tmp_path / "res") == _best(ref)
    ref_files = sorted(p.name for p in ref.rglob("epoch*.ckpt"))
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ref_files
