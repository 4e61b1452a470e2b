"""ClassifierModule details that the CLI tests do not see."""

from __future__ import annotations

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
    # and back: a channels-last checkpoint loads into a default module
    plain.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


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
