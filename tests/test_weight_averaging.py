"""Lightning's weight averaging callbacks in ``trainer.callbacks``: ``StochasticWeightAveraging``
(SWA) and ``WeightAveraging``, on the UFM (free features sized from the data) and on a CIFAR
run with BatchNorm, checked against means of the saved per-epoch (or per-step) weights; SWA
also on 2 DDP processes, against one."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import REPO, tiny_args
from hug_lightning.cli import main
from hug_lightning.experiments.results import read_scalars

# averages at the start of epochs swa_epoch_start - 1 .. max_epochs - 1 (0-based) the weights
# trained until then: those saved after epochs 0, 1 and 2 of 4 (the last epoch's are not in it)
SWA = ("--trainer.callbacks+", "lightning.pytorch.callbacks.StochasticWeightAveraging",
       "--trainer.callbacks.swa_lrs", "0.01", "--trainer.callbacks.swa_epoch_start", "2",
       "--trainer.max_epochs", "4", "--checkpoint.save_top_k", "-1")
AVERAGED_EPOCHS = (0, 1, 2)


class TermAtStep(Callback):
    """SIGTERM to this process once, at the start of the batch of global step 5."""

    def __init__(self) -> None:
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step == 5:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


sys.modules["tests_averaging_callbacks"] = type(sys)("tests_averaging_callbacks")
sys.modules["tests_averaging_callbacks"].TermAtStep = TermAtStep


def _ufm(log: Path, *extra: str) -> list[str]:
    """Full-batch UFM with MHE-HUG: 40 features of 16 dimensions, 3 steps per epoch."""
    return ["--config", str(REPO / "configs" / "ufm_hug.yaml"),
            "--trainer.logger.init_args.save_dir", str(log),
            "--model.init_args.backbone.init_args.dim", "16",
            "--data.init_args.samples_per_class", "4", "--data.init_args.steps_per_epoch", "3",
            "--trainer.check_val_every_n_epoch", "1", "--nc.figures_every", "0", *extra]


def _checkpoints(log_dir: str) -> tuple[dict[int, dict], dict]:
    """The state dicts of the per-epoch checkpoints (by epoch) and ``last.ckpt``'s."""
    folder = Path(log_dir) / "checkpoints"
    epochs = {int(p.name[5:8]): torch.load(p, weights_only=True)["state_dict"]
              for p in folder.glob("epoch*.ckpt")}
    return epochs, torch.load(folder / "last.ckpt", weights_only=True)["state_dict"]


def _mean(states: list[dict], name: str) -> torch.Tensor:
    return torch.stack([s[name].double() for s in states]).mean(0).float()


def test_swa_averages_the_ufm_features_and_proxies(tmp_path):
    """Found by an audit: SWA copies the model in its ``setup``, before ``configure_model``
    sized the free features (it does not call it, as ``WeightAveraging`` does): the copy had 0
    rows and the first update failed (size 0 vs 40). And ``last.ckpt`` held the last epoch's
    weights: SWA copies its average into a model without BatchNorm at the end of ``fit``,
    after the last checkpoint, so ``validate``/``test --ckpt_path last`` scored the
    un-averaged model."""
    cli = main(["fit", *_ufm(tmp_path, *SWA)])
    epochs, last = _checkpoints(cli.trainer.log_dir)
    assert sorted(epochs) == [0, 1, 2, 3]
    for name in ("backbone.weight", "head.proxies"):
        want = _mean([epochs[e] for e in AVERAGED_EPOCHS], name)
        assert want.shape == ((40, 16) if name.startswith("backbone") else (10, 16))
        torch.testing.assert_close(cli.model.state_dict()[name], want)
        torch.testing.assert_close(last[name], want)
        assert not torch.allclose(epochs[3][name], want)  # the last epoch's weights differ


def test_swa_resumed_inside_a_run_is_exact(tmp_path):
    """SIGTERM inside epoch 1 (the average holds epoch 0's weights), resumed from
    ``last.ckpt``: the same average, features and schedule as the uninterrupted run."""
    ref = main(["fit", *_ufm(tmp_path / "ref", *SWA)])
    with pytest.raises(SIGTERMException):
        main(["fit", *_ufm(tmp_path / "cut", *SWA,
                           "--trainer.callbacks+", "tests_averaging_callbacks.TermAtStep")])
    cut = main(["fit", *_ufm(tmp_path / "cut", *SWA), "--ckpt_path", "last"])
    assert cut.trainer.global_step == ref.trainer.global_step == 12
    a, b = _checkpoints(ref.trainer.log_dir)[1], _checkpoints(cut.trainer.log_dir)[1]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=name)


def test_weight_averaging_of_every_step_on_the_ufm(tmp_path):
    """``WeightAveraging`` (an equal-weight average after every optimizer step) of the free
    features and proxies: the mean of the 12 steps' weights, which each step's checkpoint
    holds as ``current_model_state`` (its ``state_dict`` is the average)."""
    cli = main(["fit", *_ufm(tmp_path, "--trainer.max_epochs", "4",
                             "--trainer.callbacks+", "lightning.pytorch.callbacks.WeightAveraging",
                             "--checkpoint.monitor", "null", "--checkpoint.save_top_k", "-1",
                             "--checkpoint.every_n_train_steps", "1",
                             "--checkpoint.filename", "s{step:03d}")])
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    steps = [torch.load(folder / f"s{s:03d}.ckpt", weights_only=True) for s in range(1, 13)]
    last = torch.load(folder / "last.ckpt", weights_only=True)["state_dict"]
    for name in ("backbone.weight", "head.proxies"):
        want = _mean([s["current_model_state"] for s in steps], name)
        torch.testing.assert_close(cli.model.state_dict()[name], want)
        torch.testing.assert_close(last[name], want)


@pytest.mark.parametrize("device_resident", ["false", "true"])
def test_swa_with_batch_norm_on_cifar(cifar10_tv_root, no_checksum, tmp_path, device_resident):
    """A network with BatchNorm and the HUG head, with both CIFAR loaders: SWA copies its
    average in at the start of an extra epoch, which only recomputes the BatchNorm statistics
    (no step changes a weight); that epoch's validation and checkpoints are the averaged
    model's, and ``validate --ckpt_path last`` scores the same."""
    args = tiny_args(cifar10_tv_root, tmp_path, "--data.init_args.device_resident",
                     device_resident, "--trainer.limit_val_batches", "1.0", config="cifar10_hug")
    cli = main(["fit", *args, *SWA])
    epochs, last = _checkpoints(cli.trainer.log_dir)
    assert sorted(epochs) == [0, 1, 2, 3, 4] and cli.trainer.current_epoch == 5
    for name, _ in cli.model.named_parameters():
        want = _mean([epochs[e] for e in AVERAGED_EPOCHS], name)
        torch.testing.assert_close(epochs[4][name], want)
        torch.testing.assert_close(last[name], want)
    stats = [n for n in last if n.endswith("running_mean")]
    assert stats and all(not torch.equal(last[n], epochs[3][n]) for n in stats)
    fitted = float(cli.trainer.callback_metrics["val/loss"])
    validated = main(["validate", *args, "--ckpt_path", str(Path(cli.trainer.log_dir)
                                                         / "checkpoints" / "last.ckpt")])
    assert float(validated.trainer.callback_metrics["val/loss"]) == pytest.approx(fitted)


def test_a_copy_of_the_module_leaves_the_cli_behind(tmp_path):
    """The copy weight averaging makes of the module followed the CLI's optimizer factory (a
    partial holding the CLI) to the CLI, the trainer and the data module, and copied them all;
    now the factories are shared and nothing else is reached."""
    cli = main(["fit", *_ufm(tmp_path, "--trainer.max_epochs", "1")])
    memo: dict = {}
    copied = copy.deepcopy(cli.model, memo)
    reached = [type(v).__name__ for v in memo.values()
               if isinstance(v, (LightningCLI, Trainer, LightningDataModule))]
    assert reached == []
    assert copied.optimizer_factory is cli.model.optimizer_factory
    for name, value in cli.model.state_dict().items():
        assert torch.equal(copied.state_dict()[name], value), name
    assert copied.backbone.weight.data_ptr() != cli.model.backbone.weight.data_ptr()


@pytest.mark.slow
def test_swa_on_two_ddp_processes_equals_one(tmp_path):
    """Found by an audit: a 2-process DDP fit (Lightning's launcher) with SWA (or
    ``WeightAveraging``) failed in SWA's ``setup`` on rank 0 with ``cannot pickle
    '_thread.lock' object``: copying the module copied the CLI, whose launcher holds the other
    rank's process. Now rank 0's ``last.ckpt`` holds the mean of the per-epoch weights, the
    same as one process's (full-batch UFM, class counts synced: measured bit-identical), and
    ``validate --ckpt_path last`` on 2 processes scores that average."""
    one = main(["fit", *_ufm(tmp_path / "one", *SWA)])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    for command in (["fit", *SWA], ["validate", "--ckpt_path", "last"]):
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", command[0],
                               *_ufm(tmp_path / "two", *command[1:], *ddp)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "two" / "ufm_hug"
    epochs, last = _checkpoints(runs / "version_0")
    averaged = one.model.state_dict()
    for name in ("backbone.weight", "head.proxies"):
        torch.testing.assert_close(last[name], _mean([epochs[e] for e in AVERAGED_EPOCHS], name))
        torch.testing.assert_close(last[name], averaged[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(epochs[3][name], last[name])
    model = one.model.eval()
    with torch.no_grad():  # the HUG loss of the average on the 40 samples (4 per class)
        want = model.head.loss(model.backbone.weight, torch.arange(40) // 4)[0]
    validated = read_scalars(runs / "version_1")["val/loss"]
    assert validated[-1][1] == pytest.approx(float(want), rel=1e-5)
