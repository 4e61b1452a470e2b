"""Mistakes made while extending the template fail early with a message that says what to do
(found by using the documented extension points the way a researcher would)."""

from __future__ import annotations

import sys

import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch import nn

from hug_lightning.cli import ConfigError, console_main, main
from hug_lightning.heads import CrossEntropyHead, Head
from hug_lightning.module import ClassifierModule
from hug_lightning.ufm import UFMDataModule

TINY = ["--trainer.max_epochs", "1", "--data.init_args.samples_per_class", "4",
        "--data.init_args.steps_per_epoch", "2", "--model.init_args.backbone.init_args.dim", "16"]


def _ufm(tmp_path, *extra, run=True, config="ufm_ce"):
    return main([*(["fit"] if run else []), "--config", config,
                 "--trainer.logger.init_args.save_dir", str(tmp_path), *TINY, *extra], run=run)


class NoNumClasses(LightningDataModule):
    """Sets num_classes only in setup(): too late for the CLI's link."""

    def setup(self, stage: str) -> None:
        self.num_classes = 3


class LossOnlyHead(CrossEntropyHead):
    forward_train = Head.forward_train  # the base class's: it calls loss() and logits()

    def loss(self, features, labels):  # forgot the terms dict
        return nn.functional.cross_entropy(self.logits(features), labels)


class ExtraColumnHead(CrossEntropyHead):
    def logits(self, features):
        out = super().logits(features)
        return torch.cat([out, out[:, :1]], dim=1)


class SwappedHead(CrossEntropyHead):
    def __init__(self, in_features: int, num_classes: int) -> None:  # nn.Linear's order
        super().__init__(num_classes, in_features)


class BuggyHead(CrossEntropyHead):
    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__(num_classes, in_features)
        self.extra = nn.Linear(in_features)  # a bug in the user's own code


class KwargsModule(ClassifierModule):
    """Attributes set before super().__init__(), as the README says: *args/**kwargs."""

    def __init__(self, *args, **kwargs) -> None:
        self.marker = True
        super().__init__(*args, **kwargs)


class FeatureL2Module(ClassifierModule):
    """Adds a term on the features to the loss in an override of step()."""

    def __init__(self, *args, feat_l2: float = 0.0, **kwargs) -> None:
        self.feat_l2 = feat_l2
        super().__init__(*args, **kwargs)

    def step(self, batch, stage):
        out = super().step(batch, stage)
        out["loss"] = out["loss"] + self.feat_l2 * out["features"].pow(2).sum(1).mean()
        return out


class NoEvalSetData(UFMDataModule):
    train_eval_dataloader = None  # as a plain LightningDataModule: no eval-pass data


def test_data_module_without_num_classes_is_an_error(tmp_path):
    """The link used to be skipped silently: the model kept its default of 10 classes."""
    with pytest.raises(ConfigError, match="NoNumClasses must set an integer num_classes .* in "
                                          "its __init__, found None") as err:
        _ufm(tmp_path, "--data", f"{__name__}.NoNumClasses", run=False)
    # the reason alone: not jsonargparse's "Call to compute_fn of link ... with args (<the data
    # module's repr: one line per loader>) failed:" in front of it
    assert str(err.value).startswith("invalid configuration: the data module NoNumClasses")
    assert "\n" not in str(err.value) and "dataloader" not in str(err.value)


def test_optimizer_is_the_models_argument_only(tmp_path, capsys):
    """LightningCLI's --optimizer would replace the module's parameter groups, head lr scale
    and schedule without a word: the group does not exist."""
    with pytest.raises(SystemExit):
        _ufm(tmp_path, "--optimizer", "torch.optim.Adam", run=False)
    assert "--optimizer" in capsys.readouterr().err
    cli = _ufm(tmp_path, "--model.init_args.optimizer.init_args.lr", "0.25",
               "--model.init_args.head_lr_scale", "2", run=False)
    cli.trainer.strategy.connect(cli.model)
    optimizer = cli.model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"body": 0.25, "head": 0.5}


@pytest.mark.parametrize("head, error, message", [
    ("LossOnlyHead", TypeError, r"LossOnlyHead.loss must return \(total, terms\)"),
    ("ExtraColumnHead", ValueError, r"logits of shape \(\d+, 11\), expected \(batch, "
                                    r"num_classes\) = \(\d+, 10\)"),
])
def test_head_contract_is_checked_at_the_first_step(tmp_path, head, error, message):
    with pytest.raises(error, match=message):
        _ufm(tmp_path, "--model.init_args.head", f"{__name__}.{head}")


def test_head_with_swapped_constructor_arguments_is_an_error():
    with pytest.raises(TypeError, match=r"SwappedHead was built with num_classes=8 for "
                                        r"num_classes=10 \(in_features=8\).* positionally"):
        ClassifierModule(backbone=_free_features(), head=SwappedHead, num_classes=10)


def test_error_in_the_users_own_constructor_names_its_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        _ufm(tmp_path, "--model.init_args.head", f"{__name__}.BuggyHead", run=False)
    line = BuggyHead.__init__.__code__.co_firstlineno + 2
    assert f"(raised in {__file__}:{line})" in str(err.value)
    assert "out_features" in str(err.value)


def test_error_in_generated_library_code_names_no_user_line(tmp_path):
    """HUG's options are checked in a dataclass, whose generated ``__init__`` has the file name
    ``<string>``: the error said "(raised in <string>:15)", as if it were the user's code."""
    with pytest.raises(ConfigError) as err:
        _ufm(tmp_path, "--model.init_args.head.init_args.alpha", "-1", run=False,
             config="ufm_hug")
    assert "alpha and beta must be finite and >= 0" in str(err.value)
    assert "raised in" not in str(err.value)


def test_installed_script_finds_classes_in_the_working_folder(tmp_path, monkeypatch):
    """`python -m` puts the working folder on sys.path; the console script must as well."""
    (tmp_path / "my_heads_xyz.py").write_text("VALUE = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    found = {}

    def fake_main(args=None):
        import my_heads_xyz
        found["value"] = my_heads_xyz.VALUE

    monkeypatch.setattr("hug_lightning.cli.main", fake_main)
    assert console_main() == 0 and found == {"value": 7}


def test_kwargs_subclass_gets_no_false_num_classes_warning(tmp_path, recwarn):
    cli = _ufm(tmp_path, "--model.class_path", f"{__name__}.KwargsModule", run=False)
    assert cli.model.marker and cli.model.num_classes == 10
    assert not [w for w in recwarn if "is not used" in str(w.message)]
    with pytest.warns(UserWarning, match="num_classes=7 is not used"):  # a real mismatch
        _ufm(tmp_path, "--model.class_path", f"{__name__}.KwargsModule",
             "--model.init_args.num_classes", "7", run=False)


def test_step_override_can_add_a_feature_term_to_the_loss(tmp_path):
    """step() returns features with their graph; the *_step methods detach them after."""
    batch = (torch.arange(8), torch.arange(8) % 4)
    grads = []
    for l2 in (0.0, 10.0):
        torch.manual_seed(0)
        module = FeatureL2Module(backbone=_free_features(), num_classes=4, feat_l2=l2)
        module.step(batch, "train")["loss"].backward()
        grads.append(module.backbone.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    torch.manual_seed(0)
    module = FeatureL2Module(backbone=_free_features(), num_classes=4, feat_l2=10.0)
    assert not module._eval_step(batch, "val")["features"].requires_grad


def _free_features():
    from hug_lightning.ufm import FreeFeatures
    return FreeFeatures(dim=8, num_samples=8, seed=0)


def test_eval_pass_without_its_data_fails_before_training(tmp_path):
    """It failed at the end of epoch 0, after that epoch's work (and no checkpoint); it is the
    command's one-line error (a ConfigError), not a traceback."""
    from hug_lightning.cli_errors import ConfigError
    with pytest.raises(ConfigError, match="--nc.eval_pass true needs the training images .* "
                                        "NoEvalSetData must provide train_eval_dataloader"):
        _ufm(tmp_path, "--data.class_path", f"{__name__}.NoEvalSetData",
             "--data.init_args.num_classes", "10", "--data.init_args.samples_per_class", "4")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_head_predict_is_the_argmax_of_logits():
    head = CrossEntropyHead(5, 3)
    x = torch.randn(6, 3)
    assert isinstance(head, Head) and torch.equal(head.predict(x), head.logits(x).argmax(-1))
