"""The unconstrained-features model reaches the HU optimum of each regime (the shipped configs)."""

from __future__ import annotations

import math
import warnings

import lightning
import pytest
import torch

from conftest import REPO
from hug_lightning.cli import main
from hug_lightning.heads import HUGHead
from hug_lightning.ufm import FreeFeatures, UFMDataModule

# optimal minimum angle between K directions in R^d (simplex, orthoplex, Rankin and polygon regimes)
REGIMES = {
    "ufm_hug": math.degrees(math.acos(-1 / 9)),  # simplex K=10, d=512: 96.379
    "ufm_hug_orthoplex": 90.0,  # K=20=2d, d=10
    "ufm_hug_rankin": 90.0,  # K=100, d=64
    "ufm_hug_decagon": 36.0,  # K=10, d=2
}


@pytest.mark.parametrize("config", sorted(REGIMES))
def test_ufm_regime_reaches_optimum(config, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
                    "--trainer.logger.init_args.save_dir", str(tmp_path)])
    # the UFM validates on its training samples, separated perfectly: a temperature fitted
    # there ended at its search bound, and the Quickstart printed that warning
    assert not [w for w in caught if "search bound" in str(w.message)]
    # nor Lightning's about worker processes duplicating an IterableDataset's samples: the
    # full-batch loader has no workers and is no DataLoader now
    assert not [w for w in caught if "IterableDataset" in str(w.message)]
    metrics = cli.trainer.callback_metrics
    proxies = cli.model.head.class_vectors.detach()
    unit = torch.nn.functional.normalize(proxies.double(), dim=1)
    cos = unit @ unit.T - 2 * torch.eye(len(unit), dtype=torch.float64)
    min_angle = math.degrees(math.acos(float(cos.max())))  # independent of the logged value
    assert abs(min_angle - REGIMES[config]) < 0.5, (config, min_angle)
    assert abs(float(metrics["geometry/min_angle"]) - min_angle) < 1e-3
    assert float(metrics["train/intra"]) < 1e-2
    assert float(metrics["train/acc"]) == 1.0
    assert float(metrics["nc/train_eval/nc1_pinv"]) < 1e-3  # starts near 0.5


def test_free_features_size_from_data_and_checkpoint():
    feats = FreeFeatures(dim=4, seed=3)
    feats.bind_data(UFMDataModule(num_classes=3, samples_per_class=2))
    assert feats.weight.shape == (6, 4)
    assert torch.equal(feats.weight, FreeFeatures(dim=4, num_samples=6, seed=3).weight)
    restored = FreeFeatures(dim=4)
    restored.load_state_dict(feats.state_dict())  # sized by the stored tensor
    assert torch.equal(restored.weight, feats.weight)
    with pytest.raises(ValueError, match="holds 6 vectors"):
        feats.bind_data(UFMDataModule(num_classes=3, samples_per_class=3))
    with pytest.raises(RuntimeError, match="not sized"):
        FreeFeatures(dim=4)(torch.tensor([0]))


def test_free_features_start_uniform_in_the_papers_range():
    """U(-1/sqrt(d), 1/sqrt(d)) (hug-method.md, section 5): the bound is reached, not passed."""
    weight = FreeFeatures(dim=64, num_samples=500, seed=0).weight.detach()
    bound = 1 / math.sqrt(64)
    assert bound * 0.999 < float(weight.abs().max()) <= bound
    assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)  # uniform's std


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_free_features_are_independent_of_the_heads_draws(seed):
    """After ``seed_everything(seed)`` a head draws its class vectors from the global stream;
    the features' own generator once used the same seed, and feature row i started at a cosine
    of about -0.35 with class vector i (i < K; about 8 standard deviations at d = 512, the
    notebook 04 audit). Independent draws give cosines of standard deviation 1/sqrt(d)."""
    d, k = 512, 10
    lightning.seed_everything(seed, verbose=False)
    proxies = torch.nn.functional.normalize(HUGHead(k, d).proxies.detach(), dim=1)
    feats = torch.nn.functional.normalize(FreeFeatures(dim=d, num_samples=k).weight.detach(),
                                          dim=1)
    assert float((feats * proxies).sum(1).abs().max()) < 4.5 / math.sqrt(d)


def test_free_features_options_and_ufm_labels():
    """init_scale scales the bound, seed picks the draw, sample i has label i // n (the
    documented layout); found by mutation testing (none of the three was checked)."""
    weight = FreeFeatures(dim=16, num_samples=200, init_scale=0.5, seed=1).weight.detach()
    assert 0.999 * 0.5 / 4 < float(weight.abs().max()) <= 0.5 / 4
    other = FreeFeatures(dim=16, num_samples=200, init_scale=0.5, seed=2).weight.detach()
    assert not torch.equal(weight, other)
    data = UFMDataModule(num_classes=3, samples_per_class=4)
    assert data.labels.tolist() == [c for c in range(3) for _ in range(4)]


@pytest.mark.slow
def test_ufm_cross_entropy_reaches_the_simplex(tmp_path):
    """ufm_ce.yaml's stated result (no test ran it): classifier rows at the simplex ETF,
    features collapsed to their class means (about 20 s on a CPU)."""
    cli = main(["fit", "--config", str(REPO / "configs" / "ufm_ce.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path)])
    unit = torch.nn.functional.normalize(cli.model.head.class_vectors.detach().double(), dim=1)
    cos = (unit @ unit.T)[~torch.eye(len(unit), dtype=torch.bool)]
    assert float(cos.max()) == pytest.approx(-1 / 9, abs=1e-3)
    assert float(cos.min()) == pytest.approx(-1 / 9, abs=1e-3)  # equiangular, not just the min
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/acc"]) == 1.0
    assert float(metrics["nc/train_eval/nc1_pinv"]) < 1e-3


def test_weight_averaging_copies_sized_features(tmp_path):
    """Found by an audit: the free features were sized in the module's ``setup``, which
    Lightning calls after the callbacks' ``setup``, where ``EMAWeightAveraging`` copies the
    model (calling ``configure_model`` first, the hook meant for it): the copy had 0 rows and
    the first average update failed (size 0 vs N)."""
    cli = main(["fit", "--config", str(REPO / "configs" / "ufm_ce.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--model.init_args.backbone.init_args.dim", "8",
                "--data.init_args.samples_per_class", "4", "--trainer.max_epochs", "2",
                "--trainer.callbacks+", "lightning.pytorch.callbacks.EMAWeightAveraging"])
    averaged = cli.trainer.callbacks[0]._average_model.module
    assert averaged.backbone.weight.shape == cli.model.backbone.weight.shape == (40, 8)


def test_mini_batch_ufm_trains_with_overfit_batches():
    """Found in review: the mini-batch UFM's resumable loader refused the sequential sampler
    Lightning swaps in for ``overfit_batches`` (a TypeError; its plain loader took it)."""
    from lightning.pytorch import Trainer

    from hug_lightning.heads import CrossEntropyHead
    from hug_lightning.module import ClassifierModule

    data = UFMDataModule(num_classes=4, samples_per_class=4, batch_size=8)
    model = ClassifierModule(backbone=FreeFeatures(dim=8), head=CrossEntropyHead)
    trainer = Trainer(accelerator="cpu", max_epochs=2, overfit_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2


def test_resumable_loader_takes_the_ddp_sampler_lightning_adds_for_overfit_batches():
    """Under DDP, Lightning shards the sequential loader of ``overfit_batches`` with a plain
    ``DistributedSampler`` (a second rebuild): taken too, without resuming (no skip, no state)."""
    from torch.utils.data import TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from hug_lightning.data.loading import ResumableDataLoader

    data = TensorDataset(torch.arange(8))
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=False)
    loader = ResumableDataLoader(data, batch_size=2, sampler=sampler, next_batch_fn=lambda: 1)
    assert [b[0].tolist() for b in loader] == [[1, 3], [5, 7]] and loader.state_dict() == {}
    with pytest.raises(TypeError, match="needs an EpochShardSampler"):
        ResumableDataLoader(data, batch_size=2, shuffle=True)  # a RandomSampler: not resumable
