"""ClassifierModule details that the CLI tests do not see."""

from __future__ import annotations

import pytest
import torch

from hug_lightning.backbones import SmallConvNet
from hug_lightning.heads import CrossEntropyHead
from hug_lightning.module import ClassifierModule


def _convs(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_converts_the_weights_and_changes_no_number():
    torch.manual_seed(0)
    plain = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead)
    fast = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead,
                            channels_last=True)
    fast.load_state_dict(plain.state_dict())  # copies values, keeps fast's layout
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _convs(fast.backbone))
    assert not all(w.is_contiguous(memory_format=torch.channels_last)
                   for w in _convs(plain.backbone))
    x = torch.randn(3, 3, 32, 32)
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    # and back: a channels-last checkpoint loads into a default module (other weights)
    other = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead).eval()
    assert not torch.allclose(other(x), fast(x))
    other.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fast(x), other(x), rtol=1e-5, atol=1e-5)


def test_current_fx_name_fast_path_keeps_module_attributes_intact():
    module = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead)
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step"
    assert "_current_fx_name" not in module._modules and "_current_fx_name" not in module._buffers
    module._current_fx_name = None
    assert module._current_fx_name is None
    module.extra = torch.nn.Linear(2, 2)  # other names still register as submodules
    assert "extra" in module._modules


def test_training_accuracy_counts_are_not_a_ddp_buffer_and_are_checkpointed():
    """DDP broadcasts registered buffers from rank 0 every forward: the per-rank counts must
    not be one (the 2-process equality is in test_nc_monitor); checkpoints still carry them,
    also those written when they were a buffer."""
    model = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead)
    assert "train_counts" not in dict(model.named_buffers())
    assert "train_counts" not in model.state_dict()
    model.train_counts = torch.tensor([3, 8])
    ckpt: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    fresh = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead)
    fresh.on_load_checkpoint(ckpt)
    assert fresh.train_counts.tolist() == [3, 8]
    legacy = {"state_dict": {**model.state_dict(), "train_counts": torch.tensor([5, 9])}}
    fresh.on_load_checkpoint(legacy)
    assert fresh.train_counts.tolist() == [5, 9] and "train_counts" not in legacy["state_dict"]
    fresh.load_state_dict(legacy["state_dict"])  # strict: nothing unexpected is left


class NoTermsStep(ClassifierModule):
    """A step written to the documented contract: loss, features, logits, labels (no terms)."""

    def step(self, batch, stage):
        out = super().step(batch, stage)
        return {k: out[k] for k in ("loss", "features", "logits", "labels")}


class Top2(ClassifierModule):
    """A metric added through configure_metrics + update_metrics."""

    def configure_metrics(self) -> None:
        super().configure_metrics()
        from torchmetrics.classification import MulticlassAccuracy
        self.val_top2 = MulticlassAccuracy(self.num_classes, top_k=2, average="micro")

    def update_metrics(self, out, stage) -> None:
        super().update_metrics(out, stage)
        if stage == "val":
            self.val_top2.update(out["logits"], out["labels"])
            self.log("val/top2", self.val_top2, on_epoch=True)


class ProjHead(CrossEntropyHead):
    """A head whose class vectors live in another space than the features (16-d)."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__(num_classes, 16)
        self.proj = torch.nn.Linear(in_features, 16)

    def logits(self, features):  # loss and forward_train go through it
        return super().logits(self.proj(features))


class WrongWidthStep(ClassifierModule):
    def step(self, batch, stage):
        out = super().step(batch, stage)
        return {**out, "features": out["features"][:, :3]}


def _ufm(tmp_path, *extra):
    from hug_lightning.cli import main
    return main(["fit", "--config", "ufm_ce", "--trainer.max_epochs", "2",
                 "--trainer.check_val_every_n_epoch", "1",
                 "--model.init_args.backbone.init_args.dim", "32",
                 "--trainer.logger.init_args.save_dir", str(tmp_path), *extra])


def test_extension_hooks_work_as_documented(tmp_path):
    cli = _ufm(tmp_path / "a", "--model.class_path", f"{__name__}.NoTermsStep")
    assert "train/acc" in cli.trainer.callback_metrics
    cli = _ufm(tmp_path / "b", "--model.class_path", f"{__name__}.Top2")
    top2 = float(cli.trainer.callback_metrics["val/top2"])
    assert float(cli.trainer.callback_metrics["val/acc"]) <= top2 <= 1.0
    with pytest.warns(UserWarning, match=r"class_vectors have shape \(10, 16\)"):
        cli = _ufm(tmp_path / "c", "--model.init_args.head", f"{__name__}.ProjHead")
    logged = cli.trainer.callback_metrics
    assert "nc/train_eval/nc1_pinv" in logged and "nc/train_eval/nc3_self_duality" not in logged
    with pytest.raises(ValueError, match="features of width 3, the module's feature_dim is 32"):
        _ufm(tmp_path / "d", "--model.class_path", f"{__name__}.WrongWidthStep")


@pytest.mark.parametrize("num_classes", [10, 100])
def test_top5_accuracy_from_100_classes_equals_a_direct_count(num_classes):
    """lightning-conventions.md section 5: top-1, plus top-5 on ImageNet-scale data. From
    ``top5_min_classes`` (100) classes on, validate and test also log ``*/acc_top5``: the share
    of samples whose label is among the 5 largest scores, counted here directly."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(70, 3, 32, 32)
    y = torch.randint(0, num_classes, (70,))
    model = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead,
                             num_classes=num_classes)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 16 + ... + 6: uneven last batch
    metrics = {**trainer.validate(model, loader, verbose=False)[0],
               **trainer.test(model, loader, verbose=False)[0]}
    with torch.no_grad():
        scores = model.eval()(x)
    top1 = (scores.argmax(1) == y).float().mean().item()
    assert metrics["val/acc"] == pytest.approx(top1, abs=1e-6)
    if num_classes < 100:
        assert "val/acc_top5" not in metrics and "test/acc_top5" not in metrics
        return
    top5 = sum(int(y[i] in scores[i].topk(5).indices) for i in range(len(y))) / len(y)
    assert 0 < top5 < 1 and top5 > top1
    assert metrics["val/acc_top5"] == pytest.approx(top5, abs=1e-6)
    assert metrics["test/acc_top5"] == pytest.approx(top5, abs=1e-6)
