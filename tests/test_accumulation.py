"""Gradient accumulation (``trainer.accumulate_grad_batches: k``) with the HUG head.

Lightning divides each micro-batch's loss by ``k`` and sums the gradients, so sample ``i`` of
micro-batch ``j`` weighs ``1 / (k b_j)`` (``per_sample``: the full batch's ``1 / B`` when the
micro-batches are equal) or ``1 / (k |C_j| n_{j, y_i})`` (``class_balanced``: the full batch's
``1 / (|C| n_{y_i})`` only when every micro-batch holds the full batch's classes in the same
proportions). Checked on the loss against those closed forms, then on UFM fits against the
doubled batch, with the training accuracy and the NC collectors counting every micro-batch once.
"""

from __future__ import annotations

import sys

import pytest
import torch
from lightning.pytorch import Callback

from conftest import REPO
from hug_lightning.cli import main
from hug_lightning.experiments.results import read_scalars
from hug_lightning.losses import hug_loss

F64 = torch.float64


class SeenSamples(Callback):
    """The training samples the module's accuracy counted in each epoch (read before the
    module's ``on_train_epoch_end`` logs and resets the counts)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):  # noqa: ANN001
        self.seen.append(int(pl_module.train_accuracy.counts[1]))


sys.modules["tests_accumulation_callbacks"] = type(sys)("tests_accumulation_callbacks")
sys.modules["tests_accumulation_callbacks"].SeenSamples = SeenSamples


def _accumulated(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, sizes: list[int],
                 reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (features, proxies) as Lightning accumulates them: each micro-batch's loss
    divided by their number, summed; ``sizes`` cut the batch into micro-batches."""
    h, W = h.clone().requires_grad_(), W.clone().requires_grad_()
    for hj, yj in zip(h.split(sizes), y.split(sizes)):
        (hug_loss(hj, W, yj, intra_reduction=reduction).total / len(sizes)).backward()
    return h.grad, W.grad


def _weighted_intra_grad(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """d/dh of ``sum_i weights_i ||h_i/|h_i| - w_{y_i}/|w_{y_i}|||`` (the intra term, proxies
    held fixed), written out."""
    h = h.clone().requires_grad_()
    x = h / h.norm(dim=1, keepdim=True)
    w = (W / W.norm(dim=1, keepdim=True))[y]
    (weights * (x - w).norm(dim=1)).sum().backward()
    return h.grad


def _balanced_weights(y: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``1 / (k |C_j| n_{j, y_i})`` for sample ``i`` of micro-batch ``j`` (``k`` micro-batches)."""
    out = []
    for yj in y.split(sizes):
        counts = torch.bincount(yj).to(F64)
        out.append(1 / (len(sizes) * (counts > 0).sum() * counts[yj]))
    return torch.cat(out)


def test_accumulated_hug_gradient_against_the_closed_forms():
    torch.manual_seed(0)
    # the 2 halves hold the 4 classes in different proportions (class 3 only in the second)
    y = torch.tensor([0, 0, 0, 0, 1, 2, 1, 1, 2, 3, 3, 3])
    h, W = torch.randn(12, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    full = {red: _accumulated(h, W, y, [12], red) for red in ("per_sample", "class_balanced")}
    # per_sample, equal micro-batches: the full batch's gradient
    acc = _accumulated(h, W, y, [6, 6], "per_sample")
    torch.testing.assert_close(acc[0], full["per_sample"][0])
    # unequal ones: 1 / (k b_j) per sample instead of 1 / B
    acc = _accumulated(h, W, y, [8, 4], "per_sample")
    want = torch.cat([torch.full((8,), 1 / 16, dtype=F64), torch.full((4,), 1 / 8, dtype=F64)])
    torch.testing.assert_close(acc[0], _weighted_intra_grad(h, W, y, want))
    # class_balanced: balanced per micro-batch, not over the batch
    acc = _accumulated(h, W, y, [6, 6], "class_balanced")
    torch.testing.assert_close(acc[0], _weighted_intra_grad(h, W, y, _balanced_weights(y, [6, 6])))
    torch.testing.assert_close(full["class_balanced"][0],
                               _weighted_intra_grad(h, W, y, _balanced_weights(y, [12])))
    gap = (acc[0] - full["class_balanced"][0]).norm() / full["class_balanced"][0].norm()
    assert gap > 0.1, gap
    # ... equal again when every micro-batch holds the classes in the batch's proportions
    stratified = torch.tensor([0, 0, 1, 1, 2, 3, 0, 0, 1, 1, 2, 3])
    torch.testing.assert_close(_accumulated(h, W, stratified, [6, 6], "class_balanced")[0],
                               _accumulated(h, W, stratified, [12], "class_balanced")[0])
    # the proxies' gradient (the inter term; detach_proxy stops the intra one): the same
    torch.testing.assert_close(acc[1], full["class_balanced"][1])


@pytest.mark.parametrize("reduction", ["per_sample", "class_balanced"])
def test_ufm_with_accumulation_against_the_doubled_batch(tmp_path, reduction):
    """UFM (no BatchNorm), 2 epochs: batches of 10 with ``accumulate_grad_batches: 2`` take the
    same optimizer steps on the same samples as batches of 20 (the sampler's order cut in
    two). ``per_sample``: the same weights; ``class_balanced``: other features (measured 10 %
    apart). Either way the training accuracy and the NC collectors of the train batches count
    each micro-batch once: the same values as the doubled batch where the weights agree, and
    in the first epoch (a free feature moves only with its own sample's loss term, and weight
    decay, so each is read at the same value in both runs: the first time its sample is seen)."""

    def fit(name: str, batch: int, accumulate: int) -> tuple[dict, dict]:
        cli = main(["fit", "--config", str(REPO / "configs" / "ufm_hug.yaml"),
                    "--trainer.logger.init_args.save_dir", str(tmp_path),
                    "--trainer.logger.init_args.name", name, "--trainer.max_epochs", "2",
                    "--model.init_args.backbone.init_args.dim", "8",
                    "--model.init_args.head.init_args.intra_reduction", reduction,
                    "--data.init_args.samples_per_class", "4",
                    "--data.init_args.batch_size", str(batch),
                    "--trainer.accumulate_grad_batches", str(accumulate),
                    "--trainer.check_val_every_n_epoch", "1", "--nc.train", "true",
                    "--nc.eval_pass", "false", "--nc.figures_every", "0",
                    "--trainer.callbacks+", "tests_accumulation_callbacks.SeenSamples"])
        assert cli.trainer.global_step == 4
        seen = [c.seen for c in cli.trainer.callbacks if isinstance(c, SeenSamples)]
        assert seen == [[40, 40]]  # every sample once per epoch, micro-batches included
        return cli.model.state_dict(), read_scalars(cli.trainer.log_dir)

    (acc, acc_log), (big, big_log) = fit("acc", 10, 2), fit("big", 20, 1)
    counted = [k for k in big_log if k.startswith("nc/train/") or k == "train/acc"]
    assert "nc/train/nc1_cdnv" in counted and "train/acc" in counted
    same_weights = reduction == "per_sample"
    first_epoch = big_log["train/acc"][0][0]  # the step of the first epoch's values
    assert big_log["nc/train/nc1_cdnv"][0][0] == first_epoch  # compared in both modes
    for key in counted:  # (the NCC counters start in the second epoch: no reference before)
        want = big_log[key] if same_weights else [(s, v) for s, v in big_log[key]
                                                   if s == first_epoch]
        got = acc_log[key][:len(want)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), key
    torch.testing.assert_close(acc["head.proxies"], big["head.proxies"])
    features = (acc["backbone.weight"] - big["backbone.weight"]).norm()
    if same_weights:
        assert features <= 1e-5 * big["backbone.weight"].norm()
    else:
        assert features > 0.05 * big["backbone.weight"].norm()
