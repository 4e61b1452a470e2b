"""Learning-rate schedules and parameter groups against formulas written here."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hug_lightning.backbones import SmallConvNet
from hug_lightning.heads import HUGHead
from hug_lightning.module import ClassifierModule
from hug_lightning.optim import OneCycleLR, WarmupCosineLR
from hug_lightning.param_groups import apply_lr_scale, parameter_groups


def _opt(lrs=(0.2, 0.1)):
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs],
                           momentum=0.9)


def _run(scheduler, steps):
    """Learning rates used by each of ``steps`` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_cosine_follows_its_formula():
    total, warmup, start, low = 40, 8, 0.01, 0.05
    sched = WarmupCosineLR(_opt(), warmup=warmup, total_steps=total, start_factor=start,
                           min_factor=low)

    def factor(t):  # linear warm-up, then cosine from 1 at t = warmup to `low` at t = total
        if t < warmup:
            return start + (1 - start) * t / warmup
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
    for t, (a, b) in enumerate(_run(sched, total)):
        assert a == pytest.approx(0.2 * factor(t), rel=1e-12)
        assert b == pytest.approx(0.1 * factor(t), rel=1e-12)


def test_warmup_fraction_is_rounded_to_the_nearest_step():
    """``warmup=0.1`` of 19 steps is 1.9: two warm-up steps (rounded), not one (floored)."""
    total, start = 19, 0.01
    sched = WarmupCosineLR(_opt((1.0,)), warmup=0.1, total_steps=total, start_factor=start)
    assert sched.warmup_steps == 2
    expected = [start, start + (1 - start) / 2] + [
        0.5 * (1 + math.cos(math.pi * (t - 2) / (total - 2))) for t in range(2, total)]
    assert [lr for (lr,) in _run(sched, total)] == pytest.approx(expected, rel=1e-12)


def test_warmup_zero_is_a_cosine_from_the_first_step():
    """No warm-up: the first step already uses the full learning rate, then the cosine."""
    total, low = 10, 0.1
    sched = WarmupCosineLR(_opt((1.0,)), warmup=0, total_steps=total, min_factor=low)
    expected = [low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert [lr for (lr,) in _run(sched, total)] == pytest.approx(expected, rel=1e-12)


def test_warmup_cosine_stays_at_min_factor_past_total_steps():
    """A run longer than ``total_steps`` (an explicit value shorter than the run) stays at
    ``min_factor * lr``; the cosine must not rise again after its end."""
    total, low = 10, 0.1
    sched = WarmupCosineLR(_opt((1.0,)), warmup=2, total_steps=total, min_factor=low)
    lrs = [lr for (lr,) in _run(sched, total + 5)]
    assert lrs[total:] == pytest.approx([low] * 5, rel=1e-12)


@pytest.mark.parametrize("pct, div, final", [(0.25, 25.0, 1e4), (0.4, 10.0, 100.0)])
def test_one_cycle_explicit_max_lr_keeps_group_ratios(pct, div, final):
    """An explicit max_lr is the first group's peak; the head's group keeps its scale (also at
    non-default factors: ignoring ``final_div_factor`` went unnoticed)."""
    total = 20
    sched = OneCycleLR(_opt((0.2, 0.1)), max_lr=1.0, total_steps=total, pct_start=pct,
                       div_factor=div, final_div_factor=final)
    up = pct * total - 1  # torch's phase boundary (steps)

    def lr(t, peak):  # cosine up from peak/div, then cosine down to peak/(div*final)
        cos = lambda a, b, x: b + (a - b) / 2 * (math.cos(math.pi * x) + 1)  # noqa: E731
        if t <= up:
            return cos(peak / div, peak, t / up)
        return cos(peak, peak / (div * final), (t - up) / (total - 1 - up))
    for t, (a, b) in enumerate(_run(sched, total)):
        assert a == pytest.approx(lr(t, 1.0), rel=1e-9)
        assert b == pytest.approx(lr(t, 0.5), rel=1e-9)


@pytest.mark.parametrize("anneal, three_phase", [("linear", False), ("cos", True)])
def test_one_cycle_anneal_strategy_and_three_phase(anneal, three_phase):
    """The options reach the schedule: linear interpolation; fastai's three phases (up to the
    peak, down to the initial rate in as many steps, then to the final rate)."""
    total, pct, peak, div, final = 20, 0.25, 0.2, 25.0, 1e4
    sched = OneCycleLR(_opt((peak,)), total_steps=total, pct_start=pct, anneal_strategy=anneal,
                       three_phase=three_phase)
    init, low, up = peak / div, peak / div / final, pct * total - 1  # torch's boundaries
    phases = ([(up, init, peak), (2 * up, peak, init), (total - 1, init, low)] if three_phase
              else [(up, init, peak), (total - 1, peak, low)])
    expected = []
    for t in range(total):  # the first phase whose end is not before t, from the last end
        i = next(i for i, (end, _, _) in enumerate(phases) if t <= end)
        (end, a, b), start = phases[i], phases[i - 1][0] if i else 0.0
        x = (t - start) / (end - start)
        expected.append(a + (b - a) * x if anneal == "linear"
                        else b + (a - b) / 2 * (math.cos(math.pi * x) + 1))
    assert [lr for (lr,) in _run(sched, total)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("cls", [WarmupCosineLR, OneCycleLR])
def test_resume_into_a_longer_run_uses_the_new_schedule_at_once(cls):
    first = cls(_opt(), total_steps=20)
    _run(first, 7)
    state = first.state_dict()
    longer = cls(_opt(), total_steps=40)
    reference = cls(_opt(), total_steps=40)
    _run(reference, 7)
    with pytest.warns(UserWarning, match="continuing on the new schedule"):
        longer.load_state_dict(state)
    # the 8th step already uses the 40-step schedule's value at step 7
    assert [g["lr"] for g in longer.optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in reference.optimizer.param_groups], rel=1e-12)


def test_unbounded_run_has_a_clear_schedule_error():
    model = ClassifierModule(backbone=SmallConvNet(width=4), scheduler=OneCycleLR)
    model._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"), max_epochs=-1)
    with pytest.raises(ValueError, match="Set trainer.max_epochs or trainer.max_steps"):
        model.configure_optimizers()


def test_parameter_groups_weight_decay_and_head_scale():
    model = ClassifierModule(backbone=SmallConvNet(width=4), head=HUGHead,
                             no_weight_decay=["norm", "bias"], head_lr_scale=0.5,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.4, weight_decay=1e-3))
    optimizer = model.configure_optimizers()
    by_name = {g["name"]: g for g in optimizer.param_groups}
    norm_or_bias = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) or n == "bias"}
    assert set(by_name) == {"body", "body_no_decay", "head"}
    assert {id(p) for p in by_name["body_no_decay"]["params"]} == norm_or_bias
    assert not norm_or_bias & {id(p) for p in by_name["body"]["params"]}
    assert by_name["body_no_decay"]["weight_decay"] == 0.0
    assert by_name["body"]["weight_decay"] == 1e-3
    assert [id(p) for p in by_name["head"]["params"]] == [id(model.head.proxies)]
    assert by_name["head"]["lr"] == pytest.approx(0.2) and by_name["body"]["lr"] == 0.4
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once


class _Net(nn.Module):
    """body (conv + LayerNorm), an embedding, a head with a bias and a frozen tensor, and one
    weight shared by body and head (it must be grouped once, where it is met first)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
        self.embedding = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.head.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.headless = nn.Linear(2, 2, bias=False)  # "head" is a prefix of its name only
        self.head.shared = self.body[0].weight


@pytest.mark.parametrize("exempt", [(), ("norm",), ("bias", "head"), ("embedding", "norm", "bias")])
def test_parameter_groups_function_against_a_listing(exempt):
    net, scale = _Net(), 0.25
    expected: dict[str, list[int]] = {}
    listing = [  # (parameter, in head, norm, bias, embedding), written out by hand
        (net.body[0].weight, False, False, False, False),
        (net.body[0].bias, False, False, True, False),
        (net.body[1].weight, False, True, False, False),
        (net.body[1].bias, False, True, True, False),
        (net.embedding.weight, False, False, False, True),
        (net.embedding.bias, False, False, True, True),
        (net.head.weight, True, False, False, False),
        (net.head.bias, True, False, True, False),
        (net.headless.weight, False, False, False, False),
    ]
    for param, head, norm, bias, emb in listing:
        kinds = {"head": head, "norm": norm, "bias": bias, "embedding": emb}
        name = ("head" if head else "body") + ("_no_decay" if any(kinds[k] for k in exempt)
                                               else "")
        expected.setdefault(name, []).append(id(param))
    groups = parameter_groups(net, exempt, head_lr_scale=scale)
    assert {g["name"]: [id(p) for p in g["params"]] for g in groups} == expected
    assert [g["name"] for g in groups] == sorted(expected, key=["body", "body_no_decay", "head",
                                                                "head_no_decay"].index)
    for g in groups:
        assert g.get("weight_decay", "default") == (0.0 if g["name"].endswith("_no_decay")
                                                    else "default")
        assert g.get("lr_scale", 1.0) == (scale if g["name"].startswith("head") else 1.0)
    optimizer = apply_lr_scale(torch.optim.SGD(groups, lr=0.8))
    assert [g["lr"] for g in optimizer.param_groups] == [
        0.8 * scale if g["name"].startswith("head") else 0.8 for g in optimizer.param_groups]
    assert all("lr_scale" not in g for g in optimizer.param_groups)


def test_unknown_no_weight_decay_kind_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown kinds \['bn'\]; choose from"):
        parameter_groups(_Net(), ["bn"])
    with pytest.raises(ValueError, match="unknown kinds"):  # at construction, not at fit
        ClassifierModule(backbone=SmallConvNet(width=4), no_weight_decay=["norm", "bn"])


def test_reduce_on_plateau_follows_a_logged_metric(tmp_path):
    """Offered by the scheduler type: it must run (monitor set, stepped per epoch)."""
    from hug_lightning.cli import main
    plateau = ('{"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", '
               '"init_args": {"patience": 0, "factor": 0.5}}')
    cli = main(["fit", "--config", "ufm_ce", "--model.init_args.scheduler", plateau,
                "--model.init_args.optimizer.init_args.lr", "0.1",
                "--model.init_args.scheduler_monitor", "train/acc", "--trainer.max_epochs", "4",
                "--trainer.logger.init_args.save_dir", str(tmp_path)])
    config = cli.trainer.lr_scheduler_configs[0]
    assert config.monitor == "train/acc" and config.interval == "epoch"
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] < 0.1  # it reduced at least once


class _LateMonitor(ClassifierModule):
    """Logs its plateau monitor, falling every epoch, after the base class's epoch end."""

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("late", -float(self.current_epoch))


def _plateau_fit(module_class: type, monitor: str) -> ClassifierModule:
    from lightning.pytorch import Trainer

    from hug_lightning.heads import CrossEntropyHead
    from hug_lightning.ufm import FreeFeatures, UFMDataModule

    model = module_class(backbone=FreeFeatures(dim=8), head=CrossEntropyHead,
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                         scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
                             o, patience=0), scheduler_monitor=monitor)
    Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0).fit(model, datamodule=UFMDataModule(num_classes=4,
                                                                      samples_per_class=4))
    return model


def test_plateau_monitor_logged_after_the_epoch_end_hook_keeps_lightnings_step():
    """The module takes the plateau step at the end of its on_train_epoch_end (so that the
    epoch's checkpoints hold it); a value logged later (here after super()) must still be the
    one used, as Lightning's own step does: a value improving every epoch (mode min, patience
    0) never reduces, where the previous epoch's value would have reduced at once."""
    with pytest.warns(UserWarning, match="changed after the module's on_train_epoch_end"):
        model = _plateau_fit(_LateMonitor, "late")
    scheduler = model.trainer.lr_scheduler_configs[0].scheduler
    assert [g["lr"] for g in model.trainer.optimizers[0].param_groups] == [0.1, 0.1]
    assert scheduler.best == -3.0 and scheduler.num_bad_epochs == 0


def test_plateau_monitor_never_logged_is_still_lightnings_error():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="conditioned on metric nope"):
        _plateau_fit(ClassifierModule, "nope")


class _Attention(nn.Module):
    """Layers of torchvision's ViT (MultiheadAttention: ``in_proj_bias``) and norms that are not
    batch, group or layer norms."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.rms = nn.RMSNorm(4)


@pytest.mark.parametrize("exempt", ["bias", "norm"])
def test_bias_and_norm_exemptions_cover_attention_and_instance_norms(exempt):
    net = _Attention()
    expected = {"bias": {net.attn.in_proj_bias, net.attn.out_proj.bias, net.inorm.bias},
                "norm": {net.inorm.weight, net.inorm.bias, net.rms.weight}}[exempt]
    groups = {g["name"]: {id(p) for p in g["params"]} for g in parameter_groups(net, [exempt])}
    assert groups["body_no_decay"] == {id(p) for p in expected}
    assert groups["body"] == {id(p) for p in net.parameters()} - groups["body_no_decay"]


@pytest.mark.parametrize("total, pct", [(4, 0.25), (10, 0.1), (5, 1.0)])
def test_one_cycle_with_a_one_step_or_whole_run_warm_up(total, pct):
    """pct_start * total_steps == 1 (a 4-step debug run at the default 0.25) or pct_start 1:
    torch divides by a phase of zero length (at construction, or at the run's last step)."""
    peak, div, final = 0.2, 25.0, 1e4
    sched = OneCycleLR(_opt((peak,)), total_steps=total, pct_start=pct)
    cos = lambda a, b, x: b + (a - b) / 2 * (math.cos(math.pi * x) + 1)  # noqa: E731
    if pct == 1.0:  # warm-up over the whole run, peak at the last step
        expected = [cos(peak / div, peak, t / (total - 1)) for t in range(total)]
    else:  # the one-step warm-up ends at step 0: the peak, then the anneal
        expected = [cos(peak, peak / (div * final), t / (total - 1)) for t in range(total)]
    assert [lr for (lr,) in _run(sched, total)] == pytest.approx(expected, rel=1e-12)
