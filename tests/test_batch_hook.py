"""The batch contract: every stage reads a batch through ``ClassifierModule.unpack_batch``.

A data module yielding dict batches (``{"image": ..., "label": ...}``, as HuggingFace- or
torchgeo-style data do) and a module overriding only ``unpack_batch`` run ``fit`` with the NC
eval pass, ``validate``, ``test`` with the robustness evaluation and ``predict`` through the
CLI, with exactly the numbers of the same data in ``(images, labels)`` tuples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import Dataset

from conftest import tiny_args
from hug_lightning.backbones import SmallConvNet
from hug_lightning.cli import main
from hug_lightning.data import CIFAR10DataModule
from hug_lightning.evaluation import RobustnessEvaluation
from hug_lightning.experiments.results import read_scalars
from hug_lightning.loop import unpack_batch_of
from hug_lightning.module import ClassifierModule


class DictSamples(Dataset):
    """A data set's ``(image, label)`` samples as ``{"image": ..., "label": ...}`` dicts."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.accepts_keys = getattr(base, "accepts_keys", False)  # the keyed augmentation

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        image, label = self.base[item]
        return {"image": image, "label": label}


class DictCIFAR10(CIFAR10DataModule):
    """CIFAR-10 whose loaders yield dict batches (the default collate stacks each key)."""

    def build_datasets(self, stage: str) -> None:
        super().build_datasets(stage)
        for name in ("train_set", "train_eval_set", "val_set", "test_set", "predict_set"):
            if getattr(self, name) is not None:
                setattr(self, name, DictSamples(getattr(self, name)))


class DictModule(ClassifierModule):
    """Overrides only the batch hook."""

    def unpack_batch(self, batch):
        return batch["image"], batch.get("label")


ROBUST = ["--robust.enabled", "true", "--robust.attacks", "[fgsm, pgd]",
          "--robust.eps", json.dumps([8 / 255]), "--robust.pgd_steps", "1",
          "--robust.corruptions", "[gaussian_noise, contrast]", "--robust.severities", "[1]"]


def _stages(root: Path, log_dir: Path, dicts: bool) -> dict[str, object]:
    """Run fit (NC eval pass on), validate, test (robustness on) and predict; return every
    logged scalar of each stage and the saved predictions."""
    extra = ["--model.class_path", f"{__name__}.DictModule",
             "--data.class_path", f"{__name__}.DictCIFAR10"] if dicts else []
    args = tiny_args(root, log_dir, "--nc.eval_pass", "true", *extra)
    cli = main(["fit", *args])
    assert isinstance(cli.datamodule, DictCIFAR10) == dicts
    assert isinstance(cli.model, DictModule) == dicts
    out: dict[str, object] = {"fit": read_scalars(cli.trainer.log_dir)}
    ckpt = ["--ckpt_path", str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")]
    out["validate"] = read_scalars(main(["validate", *args, *ckpt]).trainer.log_dir)
    out["test"] = read_scalars(main(["test", *args, *ROBUST, *ckpt]).trainer.log_dir)
    run = Path(main(["predict", *args, *ckpt]).trainer.log_dir)
    out["predict"] = torch.load(run / "predictions.pt", weights_only=True)
    return out


def _nan_equal(scalars: dict) -> dict:
    """The scalars with NaN (``hp/*`` before their stage ran) as a string, equal to itself."""
    return {tag: [(step, "nan" if math.isnan(v) else v) for step, v in values]
            for tag, values in scalars.items()}


def test_dict_batches_give_the_numbers_of_tuple_batches(cifar10_tv_root, no_checksum,
                                                        tmp_path):
    tuples = _stages(cifar10_tv_root, tmp_path / "tuples", dicts=False)
    dicts = _stages(cifar10_tv_root, tmp_path / "dicts", dicts=True)
    assert {"train/loss", "val/acc", "nc/train_eval/nc1_trace_ratio"} <= set(tuples["fit"])
    assert {"val/acc", "val/loss"} <= set(tuples["validate"])
    assert {"test/acc", "test/robust/fgsm_eps8", "test/robust/pgd_eps8",
            "test/robust/contrast_s1"} <= set(tuples["test"])
    for stage in ("fit", "validate", "test"):  # every scalar at every step, exactly
        assert _nan_equal(dicts[stage]) == _nan_equal(tuples[stage]), stage
    assert set(dicts["predict"]) == set(tuples["predict"]) >= {"pred", "label", "logits"}
    for key, value in tuples["predict"].items():  # tensors, and the class_names list
        same = (dicts["predict"][key] == value if isinstance(value, list)
                else torch.equal(dicts["predict"][key], value))
        assert same, key


def _small_module(cls=ClassifierModule) -> ClassifierModule:
    return cls(backbone=SmallConvNet(width=4), num_classes=3)


def test_default_unpack_batch_reads_tuples_and_says_what_to_do_with_dicts():
    module = _small_module()
    x, y = torch.zeros(2, 3, 8, 8), torch.tensor([0, 2])
    for batch in ((x, y), [x, y], (x, y, "extra")):
        images, labels = module.unpack_batch(batch)
        assert images is x and labels is y
    for batch in ((x,), x):  # predict sets without labels
        images, labels = module.unpack_batch(batch)
        assert images is x and labels is None
    assert module.predict_step((x,), 0).keys() == {"pred", "logits"}
    with pytest.raises(TypeError, match=r"keys \['image', 'label'\]\): override unpack_batch"):
        module.unpack_batch({"image": x, "label": y})
    with pytest.raises(ValueError, match="the train step needs labels, and ClassifierModule."
                                         "unpack_batch gave none"):
        module.step((x,), "train")
    with pytest.raises(ValueError, match="RobustnessEvaluation needs labels"):
        RobustnessEvaluation(attacks=[], corruptions=[]).on_test_batch_end(
            None, module, {}, (x,), 0)


def test_callbacks_read_a_plain_modules_batch_as_a_tuple():
    """A plain LightningModule has no unpack_batch: batch[0], batch[1], as before."""
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    images, labels = unpack_batch_of(LightningModule(), (x, y, "extra"), "X")
    assert images is x and labels is y
    images, labels = unpack_batch_of(_small_module(DictModule), {"image": x, "label": y}, "X")
    assert images is x and labels is y
