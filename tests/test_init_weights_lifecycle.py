"""The ``init`` group next to the rest of a fit: weight averaging, and a fit that fails.

Run A trains the UFM with cross-entropy; run B starts a HUG head on A's free features
(``--init.skip [head]``, hug_lightning/init_weights.py). References: A's checkpoint read with
``torch.load``, a fresh model built by the CLI without ``--init`` (the same seed), and weights
written into the model by the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from conftest import REPO
from hug_lightning.cli import main

DIM, PER_CLASS, K, STEPS = 8, 4, 10, 2  # the UFM: K * PER_CLASS free features of width DIM
# EMA that never updates within one epoch: Lightning copies its average (the weights the fit
# started from) into the model at the end of the fit, and swaps it in for each validation
EMA_LATER = ("--trainer.callbacks+", "lightning.pytorch.callbacks.EMAWeightAveraging",
             "--trainer.callbacks.update_every_n_steps", "0",
             "--trainer.callbacks.update_starting_at_epoch", "5")


def _args(config: str, logs: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / f"{config}.yaml"),
            "--trainer.logger.init_args.save_dir", str(logs),
            "--model.init_args.backbone.init_args.dim", str(DIM),
            "--data.init_args.samples_per_class", str(PER_CLASS),
            "--data.init_args.steps_per_epoch", str(STEPS), "--trainer.max_epochs", "1",
            "--nc.enabled", "false", "--trainer.enable_model_summary", "false", *extra]


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory) -> Path:
    """Run A: the UFM with cross-entropy, 2 epochs of 2 steps; its ``last.ckpt``."""
    cli = main(["fit", *_args("ufm_ce", tmp_path_factory.mktemp("a"),
                              "--trainer.max_epochs", "2")])
    return Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"


class Validated(Callback):
    """The free features each validation batch is scored with."""

    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.features.append(pl_module.backbone.weight.detach().clone())


def test_weight_averaging_starts_from_the_loaded_weights(ce_run, tmp_path):
    """``EMAWeightAveraging`` copies the model in its ``setup``, before the file is read: its
    copy (validated, and copied into the model at the end) held the fresh features."""
    a = torch.load(ce_run, map_location="cpu", weights_only=True)["state_dict"]
    b = main(_args("ufm_hug", tmp_path / "b", "--init.path", str(ce_run), "--init.skip",
                   "[head]", "--trainer.check_val_every_n_epoch", "1", *EMA_LATER), run=False)
    validated = Validated()
    b.trainer.callbacks.append(validated)
    b.trainer.fit(b.model, datamodule=b.datamodule)
    assert b.trainer.global_step == STEPS and len(validated.features) == 1
    assert torch.equal(validated.features[0], a["backbone.weight"])
    assert torch.equal(b.model.backbone.weight.detach(), a["backbone.weight"])
    fresh = main(_args("ufm_hug", tmp_path / "fresh"), run=False).model  # the skipped head
    assert torch.equal(b.model.head.proxies.detach(), fresh.head.proxies.detach())


class FailsInSetup(Callback):
    """A callback whose ``setup`` raises, after the init group's has hooked the restore."""

    def setup(self, trainer, pl_module, stage):
        raise RuntimeError("setup failed")


def test_a_failed_fit_leaves_no_load_behind(ce_run, tmp_path):
    """A fit that fails between the callbacks' ``setup`` and its restore gets no ``teardown``
    from Lightning: a later ``validate`` of the same trainer loaded the file into the model."""
    cli = main(_args("ufm_hug", tmp_path, "--init.path", str(ce_run), "--init.skip",
                     "[head]"), run=False)
    fails = FailsInSetup()
    cli.trainer.callbacks.append(fails)
    with pytest.raises(RuntimeError, match="setup failed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.callbacks.remove(fails)
    cli.model.backbone.materialize(K * PER_CLASS)
    with torch.no_grad():
        cli.model.backbone.weight.fill_(0.5)  # the weights the user validates
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert torch.equal(cli.model.backbone.weight.detach(),
                       torch.full((K * PER_CLASS, DIM), 0.5))
