"""``--predictions.features true``: ``predict`` saves the features the head sees.

Every expected value is computed here: the features by ``model.forward_features`` on the
prediction set's samples (looked up by ``index``), the logits by a run with the option off, the
NC metrics by :func:`~hug_lightning.metrics.functional.compute_nc_metrics` on the saved features
against the values the NC monitor logs when it validates on the same samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_args
from hug_lightning.backbones import SmallConvNet
from hug_lightning.cli import main
from hug_lightning.metrics.functional import MEANS_NAMES, NC1_NAMES, SPH_NAMES, compute_nc_metrics
from hug_lightning.metrics.functional_states import feature_states
from hug_lightning.module import ClassifierModule
from hug_lightning.predictions import PredictionWriter


class DoubledLogits(ClassifierModule):
    """A subclass whose ``forward`` is not features-then-head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x) + 1


def _module(cls=ClassifierModule) -> ClassifierModule:
    torch.manual_seed(0)
    return cls(backbone=SmallConvNet(width=4), num_classes=3, embedding_dim=5).eval()


def _trainer(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                           global_rank=0, world_size=1)


def test_predict_saves_the_features_of_each_row_and_the_same_logits(cifar10_folder_root,
                                                                   tmp_path):
    """Through the CLI, with an embedding (the features are its output, 6 wide): the saved
    features are ``forward_features`` of the sample each row's ``index`` names; the logits,
    predictions and indices are those of a run without features, bit for bit; by default there
    are none, neither in the file nor in what ``predict_step`` returned. The NC metrics of the
    saved features are those the monitor logs validating on the same 64 test samples."""
    args = tiny_args(cifar10_folder_root, tmp_path, "--model.init_args.embedding_dim", "6")
    main(["fit", *args])
    last = next((tmp_path / "cifar10_ce").glob("version_0/checkpoints/last.ckpt"))
    off = main(["predict", *args, "--ckpt_path", str(last)])
    assert all("features" not in p for p in off.trainer.predict_loop.predictions)
    without = torch.load(Path(off.trainer.log_dir) / "predictions.pt", weights_only=True)
    assert "features" not in without
    cli = main(["predict", *args, "--ckpt_path", str(last), "--predictions.features", "true"])
    run = Path(cli.trainer.log_dir)
    saved = torch.load(run / "predictions.pt", weights_only=True)
    for key in ("index", "pred", "label", "logits"):
        assert torch.equal(saved[key], without[key]), key
    assert (run / "predictions.csv").read_text() == \
        (Path(off.trainer.log_dir) / "predictions.csv").read_text()  # no features in the CSV
    features = saved["features"]
    assert features.dtype == torch.float32 and features.shape == (len(saved["index"]), 6)
    assert cli.model.predict_features is False  # put back after predict
    model, dataset = cli.model.eval(), cli.trainer.predict_dataloaders.dataset
    images = torch.stack([dataset[i][0] for i in saved["index"].tolist()])
    with torch.no_grad():
        torch.testing.assert_close(features, model.forward_features(images))
        torch.testing.assert_close(saved["logits"], model.head.logits(model.forward_features(
            images)))
    # the NC monitor on the same samples: validate reads the test set with val_split 0
    val = main(["validate", *args, "--ckpt_path", str(last), "--data.init_args.val_split", "0"])
    logged = {k[len("nc/val/"):]: float(v) for k, v in val.trainer.callback_metrics.items()
              if k.startswith("nc/val/")}
    mine = compute_nc_metrics(feature_states(features, saved["label"], 10))
    names = [n for n in ("k_eff", *NC1_NAMES, *SPH_NAMES, *MEANS_NAMES)
             if n in logged and n != "pivot_cond"]  # pivot_cond: the accumulation's, not data's
    assert len(names) > 20 and logged["k_eff"] == len(saved["label"].unique())
    for name in names:
        assert math.isclose(logged[name], float(mine[name]), rel_tol=1e-5, abs_tol=1e-9), name


@pytest.mark.parametrize("cls", [ClassifierModule, DoubledLogits])
def test_predict_step_adds_features_only_when_asked_and_keeps_forward(cls):
    """The flag adds ``forward_features(x)`` and changes no logit: ``ClassifierModule``'s are
    ``head.logits`` of those features (computed once), a subclass's are its own ``forward``."""
    module, x, y = _module(cls), torch.rand(4, 3, 8, 8), torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        plain = module.predict_step((x, y), 0)
        module.predict_features = True
        asked = module.predict_step((x, y), 0)
        assert plain.keys() == {"pred", "logits", "label"}
        assert asked.keys() == {"pred", "logits", "label", "features"}
        assert torch.equal(asked["features"], module.forward_features(x))
        expected = module.head.logits(module.forward_features(x))
        if cls is DoubledLogits:
            expected = 2 * expected + 1
        for out in (plain, asked):
            assert torch.equal(out["logits"], expected)
            assert torch.equal(out["pred"], expected.argmax(-1))


def test_writer_asks_the_module_for_one_predict_only():
    """The writer sets ``predict_features`` in its setup for predict only, and puts back what
    the module had in its teardown, or when the run fails (Lightning calls no teardown then)."""
    module, x = _module(), torch.rand(2, 3, 8, 8)
    writer = PredictionWriter(features=True)
    for stage in ("fit", "validate", "test"):
        writer.setup(None, module, stage)
        assert module.predict_features is False
    PredictionWriter(features=False).setup(None, module, "predict")
    PredictionWriter(enabled=False, features=True).setup(None, module, "predict")
    assert module.predict_features is False and "features" not in module.predict_step((x,), 0)
    writer.setup(None, module, "predict")
    assert "features" in module.predict_step((x,), 0)
    writer.teardown(None, module, "predict")
    assert module.predict_features is False and "features" not in module.predict_step((x,), 0)
    writer.setup(None, module, "predict")
    writer.on_exception(None, module, RuntimeError("interrupted"))
    assert module.predict_features is False
    module.predict_features = True  # set by the user: kept
    writer.setup(None, module, "predict")
    writer.teardown(None, module, "predict")
    assert module.predict_features is True


def test_writer_saves_float32_features_in_row_order(tmp_path):
    """bf16 features (a bf16-mixed predict) are saved as float32, concatenated in the order of
    the batches, next to ``index``; the CSV is unchanged; off, the file has none."""
    feats = [torch.randn(2, 3).bfloat16(), torch.randn(1, 3).bfloat16()]
    outs = [{"pred": torch.tensor([1, 0]), "label": torch.tensor([1, 1]), "features": feats[0]},
            {"pred": torch.tensor([0]), "label": torch.tensor([0]), "features": feats[1]}]
    PredictionWriter(features=True).write_on_epoch_end(_trainer(tmp_path), None, outs,
                                                       [[[7, 3], [5]]])
    saved = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert saved["index"].tolist() == [7, 3, 5] and saved["features"].dtype == torch.float32
    assert torch.equal(saved["features"], torch.cat([f.float() for f in feats]))
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows == ["index,pred,label", "7,1,1", "3,0,1", "5,0,0"]
    PredictionWriter().write_on_epoch_end(_trainer(tmp_path), None, outs, [[[7, 3], [5]]])
    assert "features" not in torch.load(tmp_path / "predictions.pt", weights_only=True)


def test_writer_says_when_a_predict_step_of_its_own_returned_no_features(tmp_path):
    outs = [{"pred": torch.tensor([1, 0])}]
    with pytest.warns(UserWarning, match=r"Mine\.predict_step returned no `features`.*"
                                         r"self\.predict_features"):
        PredictionWriter(features=True).write_on_epoch_end(
            _trainer(tmp_path), type("Mine", (), {})(), outs, [[[0, 1]]])
    assert torch.load(tmp_path / "predictions.pt", weights_only=True)["pred"].tolist() == [1, 0]
