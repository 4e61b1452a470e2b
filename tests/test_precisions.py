"""Trainer precisions other than 32-true: values that must not depend on the module's dtype.

Found by an audit of every ``--trainer.precision`` (32-true, 64-true, bf16-mixed, bf16-true,
16-mixed, 16-true) with the HUG and cross-entropy heads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_args
from datagen import write_cifar10_torchvision
from hug_lightning.classifier_metrics import FloatMaxMetric, FloatMeanMetric
from hug_lightning.cli import main
from test_nc_monitor import scalars


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float_mean_metric_sums_in_float32_after_a_half_cast(dtype):
    """``bf16-true`` / ``16-true`` cast the module with ``module.to(dtype)`` and move it again
    inside their forward context (default dtype half): torchmetrics cast the sums and the
    inputs of a ``MeanMetric`` with them. The mean of 200 batch losses must be the float64
    mean (a bf16 ``MeanMetric`` gave 0.60 for 0.70)."""
    metric = FloatMeanMetric().to(dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # what HalfPrecision.forward_context does
    try:
        metric.to("cpu")
    finally:
        torch.set_default_dtype(default)
    values = [0.7 + 0.001 * (i % 3) for i in range(200)]
    for value in values:
        metric.update(torch.tensor(value), weight=64)
    assert metric.mean_value.dtype == torch.float32 and metric.dtype == torch.float32
    assert float(metric.compute()) == pytest.approx(sum(values) / len(values), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_best_accuracy_stays_float32_after_a_half_cast(dtype):
    """``val_acc_best`` under ``bf16-true`` / ``16-true``: a cast ``MaxMetric`` kept 0.1748 for
    an accuracy of 0.175 (bf16). The maximum must be the float32 value given."""
    metric = FloatMaxMetric().to(dtype)
    for value in (0.1, 0.175, 0.15):
        metric.update(torch.tensor(value))
    assert metric.max_value.dtype == torch.float32
    assert float(metric.compute()) == float(torch.tensor(0.175, dtype=torch.float32))


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_val_loss_is_the_mean_of_the_batch_losses_under_half_true(tmp_path, no_checksum,
                                                                   precision):
    """Found by an audit: under ``bf16-true`` the logged ``val/loss`` was 2.156 for a mean of
    2.169 over the 40 validation batches (16-true: 2.1680 for 2.1689); the error grows with
    the number of batches. Reference: the same model's batch losses, recomputed in the
    trainer's precision context and averaged in float64."""
    root = write_cifar10_torchvision(tmp_path / "data", train_per_class=20, test_per_class=1)
    cli = main(["fit", *tiny_args(root, tmp_path / "logs", "--trainer.precision", precision,
                                  "--trainer.limit_train_batches", "2",
                                  "--trainer.limit_val_batches", "1.0",
                                  "--data.init_args.eval_batch_size", "1",
                                  "--calibration.enabled", "false")])
    logged = scalars(Path(cli.trainer.log_dir))["val/loss"]
    model, plugin = cli.model.eval(), cli.trainer.precision_plugin
    losses = []
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader():
            with plugin.forward_context():
                losses.append(float(model.step(plugin.convert_input(batch), "val")["loss"]))
    assert len(losses) == 40
    assert logged == [pytest.approx(sum(losses) / len(losses), rel=1e-6)]
