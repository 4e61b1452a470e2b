"""A ClassifierModule set up for several processes still pickles.

Found by a review: under DDP ``setup`` gave the loss guard and the HUG head lambdas
(``reduce_max``, ``count_sync.reduce``): a module pickled after a multi-process fit in that
process (``torch.save(model)``, ``copy`` through pickle) failed with ``Can't pickle local
object``. They are module-level functions now; what they compute under two processes is
checked by ``tests/test_ddp_fit.py`` (HUG training with DDP equals one process).
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import torch

from hug_lightning.backbones import SmallConvNet
from hug_lightning.heads import HUGHead
from hug_lightning.module import ClassifierModule, global_max, global_sum


def test_a_module_set_up_for_two_processes_pickles():
    model = ClassifierModule(backbone=SmallConvNet(width=4), head=HUGHead, num_classes=3)
    model._trainer = SimpleNamespace(world_size=2, strategy=None)  # what setup reads
    model.setup("validate")  # "fit" also checks the loss policy against the processes
    model._trainer = None
    assert model.head.count_sync is not None and model.loss_guard.reduce_max is not None
    clone = pickle.loads(pickle.dumps(model))
    assert clone.head.count_sync.reduce is global_sum
    assert clone.head.count_sync.world_size == 2
    assert clone.loss_guard.reduce_max is global_max
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x))
