"""Pickling a ClassifierModule built by the CLI (``torch.save(model)``, a ``ddp_spawn`` fit).

Found by an audit: the module kept the CLI's optimizer and scheduler factories, jsonargparse
partials holding the CLI's instantiator, hence the CLI, its trainer and its data module. A
pickled module took them all along (352,703 bytes for an 800-parameter UFM; 19.6 MB for a
tiny device-resident CIFAR fit whose weights are 128 KB) or failed when one of them did not
pickle. The module now keeps plain partials (:func:`hug_lightning.factories.plain_factory`).
"""

from __future__ import annotations

import functools
import io
import pickle

import torch
from jsonargparse._instantiation import ClassInstantiator, call_without_instantiate_context
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from conftest import REPO
from hug_lightning.cli import main
from hug_lightning.factories import plain_factory
from hug_lightning.optim import WarmupCosineLR

# the optimizer and scheduler of the fit below, as its arguments give them
LR, MOMENTUM, DECAY, WARMUP, EPOCHS, STEPS = 0.3, 0.9, 5e-4, 2, 2, 3


class _Types(pickle.Pickler):
    """A pickler that records the types of the objects it writes."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.types: set[type] = set()

    def reducer_override(self, obj):
        self.types.add(type(obj))
        return NotImplemented


def _fit(tmp_path) -> LightningCLI:
    return main(["fit", "--config", str(REPO / "configs" / "ufm_hug.yaml"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--model.init_args.backbone.init_args.dim", "16",
                 "--data.init_args.samples_per_class", "4",
                 "--data.init_args.steps_per_epoch", str(STEPS),
                 "--trainer.max_epochs", str(EPOCHS), "--nc.figures_every", "0",
                 "--trainer.enable_progress_bar", "false",
                 "--model.init_args.optimizer.init_args.lr", str(LR),
                 "--model.init_args.optimizer.init_args.weight_decay", str(DECAY),
                 "--model.init_args.scheduler.init_args.warmup", str(WARMUP)])


def _groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's hyperparameters and its parameters' shapes."""
    return [{**{k: v for k, v in g.items() if k != "params"},
             "shapes": [tuple(p.shape) for p in g["params"]]} for g in optimizer.param_groups]


def test_a_pickled_module_leaves_the_cli_behind(tmp_path):
    """The pickle of a fitted module holds no CLI, trainer, data module or jsonargparse
    object, and the unpickled module builds the optimizer and schedule the fit used."""
    cli = _fit(tmp_path)
    buffer = io.BytesIO()
    pickler = _Types(buffer)
    pickler.dump(cli.model)
    reached = sorted(t.__name__ for t in pickler.types
                     if issubclass(t, (LightningCLI, Trainer, LightningDataModule))
                     or t.__module__.startswith("jsonargparse"))
    assert reached == []
    sent = pickle.loads(buffer.getvalue())
    sent.trainer = cli.trainer  # the run length of the schedule comes from the trainer
    want, got = cli.model.configure_optimizers(), sent.configure_optimizers()
    assert type(got["optimizer"]) is type(want["optimizer"]) is torch.optim.SGD
    assert _groups(got["optimizer"]) == _groups(want["optimizer"])
    for group in got["optimizer"].param_groups:  # lr: the warm-up's first factor (0.01)
        assert (group["initial_lr"], group["momentum"], group["nesterov"]) == (LR, MOMENTUM, True)
        assert group["lr"] == LR * 0.01
    assert {g["weight_decay"] for g in got["optimizer"].param_groups} == {DECAY}
    schedule, reference = got["lr_scheduler"]["scheduler"], want["lr_scheduler"]["scheduler"]
    assert type(schedule) is type(reference) is WarmupCosineLR
    assert got["lr_scheduler"]["interval"] == want["lr_scheduler"]["interval"] == "step"
    assert (schedule.total_steps, schedule.warmup_steps) == (EPOCHS * STEPS, WARMUP)
    assert (schedule.start_factor, schedule.min_factor, schedule.base_lrs) == \
        (reference.start_factor, reference.min_factor, reference.base_lrs)


def test_a_partial_whose_class_an_instantiator_claims_is_kept():
    """Only a class that jsonargparse's instantiator calls as is loses the instantiator: one
    claimed by a registered instantiator (here every Optimizer) keeps it, and so does
    anything that is not a jsonargparse partial."""
    def build(cls, *args, **kwargs):
        return cls(*args, **kwargs)

    params = [torch.nn.Parameter(torch.zeros(2))]
    claimed = functools.partial(call_without_instantiate_context,
                                ClassInstantiator({(torch.optim.Optimizer, True): build}),
                                torch.optim.SGD, lr=0.1)
    assert plain_factory(claimed) is claimed
    other = functools.partial(call_without_instantiate_context,
                              ClassInstantiator({(LightningModule, True): build}),
                              torch.optim.SGD, lr=0.1, momentum=0.5)
    plain = plain_factory(other)
    assert (plain.func, plain.args, plain.keywords) == \
        (torch.optim.SGD, (), {"lr": 0.1, "momentum": 0.5})
    assert plain(params).defaults == other(params).defaults
    for kept in (torch.optim.SGD, None, functools.partial(torch.optim.SGD, lr=0.1), build):
        assert plain_factory(kept) is kept
