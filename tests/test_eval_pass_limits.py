"""The NC eval pass reads as many batches as ``--trainer.limit_train_batches`` lets training
read: ``debug.yaml``'s quick check (5 batches) ran the pass over the whole training set (238 s
against 12 s on the real CIFAR-10 copy, measured in the README walkthrough)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import tiny_args
from hug_lightning.cli import main
from hug_lightning.metrics import eval_pass


@pytest.mark.parametrize("limit, length, want", [
    (1.0, 7, None), (2, 7, 2), (1, 7, 1), (0.5, 7, 3), (0.01, 7, 1), (None, 7, None)])
def test_batch_limit_applies_the_training_limit_as_lightning_does(limit, length, want):
    trainer = SimpleNamespace(limit_train_batches=limit)
    assert eval_pass.batch_limit(trainer, list(range(length))) == want


def test_batch_limit_of_a_loader_without_length_is_the_whole_pass():
    assert eval_pass.batch_limit(SimpleNamespace(limit_train_batches=0.5), iter(range(3))) is None


@pytest.mark.parametrize("limit, batches", [("1", 1), ("2", 2), ("1.0", 3)])
def test_a_fit_limited_to_n_batches_runs_an_eval_pass_of_n_batches(
        cifar10_folder_root, tmp_path, monkeypatch, limit, batches):
    """160 training images, eval batches of 64: 3 batches in the pass unless limited; the
    samples the pass fed its collector are counted through its batch unpacking."""
    seen: list[int] = []
    unpack = eval_pass.unpack_batch_of

    def counting(module, batch, where):  # noqa: ANN001
        images, labels = unpack(module, batch, where)
        seen.append(len(labels))
        return images, labels

    monkeypatch.setattr(eval_pass, "unpack_batch_of", counting)
    cli = main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--nc.eval_pass", "true",
                                  "--trainer.limit_train_batches", limit,
                                  "--data.init_args.eval_batch_size", "64")])
    assert cli.trainer.current_epoch == 1 and "nc/train_eval/nc1_pinv" in \
        cli.trainer.callback_metrics
    assert len(seen) == batches, seen
    assert sum(seen) == min(64 * batches, 160)
