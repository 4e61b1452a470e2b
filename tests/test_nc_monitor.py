"""NeuralCollapseMonitor inside real fits: logged values, DDP equality, config switches."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from hug_lightning.cli import main

SIMPLEX_10 = 96.37937  # arccos(-1/9) in degrees


def ufm_args(log_dir: Path, *extra: str, name: str = "ufm") -> list[str]:
    return [
        "--config", str(REPO / "configs" / "ufm_ce.yaml"),
        "--trainer.logger.init_args.save_dir", str(log_dir),
        "--trainer.logger.init_args.name", name,
        "--model.init_args.backbone.init_args.dim", "32",
        "--data.init_args.samples_per_class", "10",
        *extra,
    ]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def eval_features(cli) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained model's float32 eval-mode features (as float64) and labels over the
    training-eval set: the reference the eval pass is checked against."""
    model = cli.model.eval()
    with torch.no_grad():
        batches = [(model.forward_features(x), y) for x, y in
                   cli.datamodule.train_eval_dataloader()]
    assert batches[0][0].dtype == torch.float32
    return torch.cat([f for f, _ in batches]).double(), torch.cat([y for _, y in batches])


def test_ufm_fit_logs_collapse(tmp_path):
    cli = main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "60")])
    logged = scalars(Path(cli.trainer.log_dir))
    nc1 = logged["nc/train_eval/nc1_pinv"]
    assert nc1[-1] < 1e-3 * nc1[0], (nc1[0], nc1[-1])  # within-class variability collapses
    assert abs(logged["nc/train_eval/gnc2_min_angle_means"][-1] - SIMPLEX_10) < 0.5
    assert abs(logged["nc/train_eval/gnc2_min_angle_weights"][-1] - SIMPLEX_10) < 0.5
    assert logged["nc/val/ncc_accuracy"][-1] == 1.0
    assert abs(logged["geometry/min_angle"][-1] - SIMPLEX_10) < 0.5


@pytest.mark.parametrize("eval_pass", ["false", "true"])
def test_validation_at_an_epoch_end_uses_that_epochs_training_means(tmp_path, eval_pass):
    """Validation inside fit runs with trainer.training False: the reference was only computed
    at on_train_epoch_end, after validation, so nc/val/ncc_* came one epoch late (none at
    epoch 0, and a checkpoint monitoring them stopped the fit). All NC values are logged at
    the step of Lightning's own epoch values."""
    cli = main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "2",
                                 "--trainer.check_val_every_n_epoch", "1", "--nc.train", "true",
                                 "--nc.eval_pass", eval_pass,
                                 "--data.init_args.steps_per_epoch", "3",
                                 "--checkpoint.monitor", "nc/val/ncc_accuracy")])
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["nc/val/ncc_accuracy"] == steps["val/acc"] == [2, 5]  # epochs 0 and 1
    assert steps["nc/train/nc1_pinv"] == steps["train/acc"] == [2, 5]
    assert cli.trainer.checkpoint_callback.best_model_path  # the monitor found its key


def test_eval_pass_ncc_uses_that_passs_own_class_means(tmp_path):
    """Papyan's NC4 / NCC accuracy (nc-metrics.md 3.3): the eval pass's features against their
    own class means, here recomputed from the final model with a per-class loop. Scoring them
    against the previous pass's means logged nothing at the first pass and lagged values after.
    """
    cli = main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "2",
                                 "--data.init_args.steps_per_epoch", "2",
                                 "--model.init_args.optimizer.init_args.lr", "0.3")])
    logged = scalars(Path(cli.trainer.log_dir))
    names = ("nc4_ncc_mismatch", "ncc_accuracy", "linear_accuracy")
    assert all(len(logged[f"nc/train_eval/{n}"]) == 2 for n in names)  # epochs 0 and 1
    model = cli.model.eval()
    feats, labels = eval_features(cli)
    with torch.no_grad():
        linear = model.head.logits(feats.float()).argmax(1)
    means = torch.stack([feats[labels == c].mean(0) for c in range(10)])
    ncc = torch.stack([((means - f) ** 2).sum(1).argmin() for f in feats])
    want = {"nc4_ncc_mismatch": (ncc != linear).double().mean(),
            "ncc_accuracy": (ncc == labels).double().mean(),
            "linear_accuracy": (linear == labels).double().mean()}
    assert 0 < want["ncc_accuracy"] < 1  # features still moving: a lag would show
    for name in names:
        assert logged[f"nc/train_eval/{name}"][-1] == pytest.approx(float(want[name]), abs=1e-6)


def test_eval_pass_above_its_memory_cap_scores_ncc_lagged_and_says_so(tmp_path, monkeypatch):
    from hug_lightning.metrics import eval_pass

    monkeypatch.setattr(eval_pass, "EXACT_NCC_MAX_BYTES", 100)
    with pytest.warns(UserWarning, match="NC eval pass: .* previous pass's class means"):
        cli = main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "2",
                                     "--data.init_args.steps_per_epoch", "2")])
    logged = scalars(Path(cli.trainer.log_dir))
    assert len(logged["nc/train_eval/nc1_pinv"]) == 2
    assert len(logged["nc/train_eval/ncc_accuracy"]) == 1  # no reference at the first pass


def test_monitor_switches_and_subset(tmp_path):
    cli = main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "2", "--nc.enabled", "false")])
    assert not [k for k in cli.trainer.callback_metrics if k.startswith("nc/")]
    cli = main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "2",
                                 "--nc.metrics", "[nc1_pinv, ncc_accuracy]")])
    names = {k.split("/")[-1] for k in cli.trainer.callback_metrics if k.startswith("nc/")}
    assert names == {"nc1_pinv", "ncc_accuracy"}


def test_collectors_are_separate_and_checkpointed(tmp_path):
    cli = main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "2", "--nc.train", "true")])
    monitor = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "NeuralCollapseMonitor")
    cols = list(monitor.collectors.values())
    assert len(cols) == 3 and len({id(c.s) for c in cols}) == 3  # no shared (merged) states
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    saved = next(v for k, v in ckpt["callbacks"].items() if "NeuralCollapseMonitor" in k)
    assert set(saved["collectors"]) == {"train", "train_eval", "val"}
    fresh = type(monitor)(train=True, eval_pass=True)
    fresh.load_state_dict(saved)  # before setup: kept and applied once the collectors exist
    fresh.setup(cli.trainer, cli.model, "fit")
    for name, col in fresh.collectors.items():
        for key, value in saved["collectors"][name].items():
            assert torch.equal(col.state_dict()[key].cpu(), value), (name, key)
    assert saved["collectors"]["train"]["pivot"].shape == (10, 32)


@pytest.mark.slow
def test_ddp_logs_the_single_process_numbers(tmp_path):
    """lr=0 keeps the features fixed: 2 gloo processes must log the 1-process NC values and
    accuracies. 100 classes of 3 samples (uneven per rank): top-5 accuracy is on; the HPARAMS
    tab's metrics, the fitted temperature and ECE are the 1-process ones, written as often (not
    once per rank); the figures of every epoch reach rank 0's events (no hang: rank 0 alone
    collects and draws them). The layer-NC monitor on the backbone's output, all three stages
    (``train_eval`` recorded during the eval pass): the 1-process values, the NC monitor's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--trainer.max_epochs", "2", "--nc.train", "true",
              "--model.init_args.optimizer.init_args.lr", "0.0",
              "--model.init_args.optimizer.init_args.weight_decay", "0.0",
              "--trainer.check_val_every_n_epoch", "1", "--nc.figures_every", "1",
              "--data.init_args.num_classes", "100", "--data.init_args.samples_per_class", "3",
              "--calibration.enabled", "true",  # off in the UFM configs; fixed features here
              "--layer_nc.layers", "[backbone]", "--layer_nc.stages", "[train, val, train_eval]"]
    runs, figures = {}, {}
    for devices, strategy in (("1", "auto"), ("2", "ddp")):
        args = ufm_args(tmp_path / devices, *common, "--trainer.devices", devices,
                        "--trainer.strategy", strategy)
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", "fit", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = (tmp_path / devices / "ufm").glob("version_*")
        assert len(list(run.glob("events.out.tfevents.*"))) == 1  # rank 0's only
        runs[devices] = scalars(run)
        events = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0})
        events.Reload()
        figures[devices] = {kind: {t: [e.step for e in getattr(events, kind.title())(t)]
                                   for t in events.Tags()[kind]}
                            for kind in ("images", "histograms")}
        projector = (run / "projector_config.pbtxt").read_text()
        assert projector.count("nc_fig/val_features") == 2, projector  # one per epoch
    single, ddp = runs["1"], runs["2"]
    tags = [t for t in single if t.startswith("nc/")]
    assert len(tags) > 30 and set(tags) == {t for t in ddp if t.startswith("nc/")}
    layer_tags = [t for t in single if t.startswith("nc_layers/")]
    assert len(layer_tags) == 3 * 3 and set(layer_tags) == {t for t in ddp if "nc_layers/" in t}
    for run, stage, name in itertools.product((single, ddp), ("train", "val", "train_eval"),
                                              ("nc1_pinv", "nc1_trace_ratio")):
        assert torch.allclose(torch.tensor(run[f"nc_layers/{stage}/backbone/{name}"]),
                              torch.tensor(run[f"nc/{stage}/{name}"]), rtol=1e-5), (stage, name)
    # train/acc: per-rank counts summed (not rank 0's twice)
    tags += layer_tags + ["train/acc", "val/acc"]
    tags += ["val/acc_top5", "hp/val_acc_best", "hp/nc1_pinv", "val/temperature", "val/ece",
             "val/nll"]
    for tag in tags:
        a, b = torch.tensor(single[tag]), torch.tensor(ddp[tag])
        assert a.shape == b.shape, (tag, a, b)  # as many writes: none per rank
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True), (tag, a, b)
    assert 0 < single["val/acc_top5"][-1] < 1 and single["hp/val_acc_best"][0] != \
        single["hp/val_acc_best"][0]  # the declaration: NaN, then the values
    assert single["val/temperature"] == ddp["val/temperature"]  # order-free fit: to the bit
    assert figures["2"] == figures["1"]  # every figure, at every epoch's step
    assert {"nc_fig/cos_means", "nc_fig/cos_class_vectors"} <= set(figures["2"]["images"])
    assert "nc_fig/intra_cos" in figures["2"]["histograms"]


def _fake_module(k: int, d: int):
    from types import SimpleNamespace

    from hug_lightning.heads import CrossEntropyHead
    trainer = SimpleNamespace(callback_metrics={}, loggers=[], global_step=0, current_epoch=0,
                              is_global_zero=True, logger=None)
    return SimpleNamespace(head=CrossEntropyHead(k, d), trainer=trainer, num_classes=k,
                           feature_dim=d)


def test_every_validation_scores_against_the_training_means():
    """Two validations in one epoch (``val_check_interval < 1``): the second must not use the
    first one's own means as its NCC reference."""
    from hug_lightning.metrics import NCFeatureStats
    from hug_lightning.metrics.callback import NeuralCollapseMonitor
    module = _fake_module(2, 2)
    monitor = NeuralCollapseMonitor(metrics=["ncc_accuracy"])
    monitor.collectors = {s: NCFeatureStats(2, 2, metrics=["ncc_accuracy"])
                          for s in ("train", "val")}
    train_x = torch.tensor([[0.0, 0.0], [2.0, 0.0]]).repeat(4, 1)  # means (0, 0) and (2, 0)
    monitor.collectors["train"].update(train_x, torch.tensor([0, 1] * 4))
    monitor.collectors["val"].set_reference(monitor._finish("train", module))
    # validation class 0 sits at x = 1.5: nearer the class-1 training mean; class 1 at x = 3
    val_x = torch.tensor([[1.5, 0.1], [3.0, 0.1], [1.5, -0.1], [3.0, -0.1]])
    val = {"features": val_x, "labels": torch.tensor([0, 1, 0, 1]),
           "logits": module.head.logits(val_x)}
    for _ in range(2):
        monitor._update("val", val)
        monitor._finish("val", module)
        assert module.trainer.callback_metrics["nc/val/ncc_accuracy"].item() == 0.5


def test_figures_use_computed_means_before_the_first_eval_pass(monkeypatch):
    """``figures_every`` with ``eval_pass_every > 1``: epoch 0 has no eval-pass means yet."""
    from hug_lightning.metrics import NCFeatureStats
    from hug_lightning.metrics import callback as cb
    module = _fake_module(3, 4)
    module.trainer.loggers = [object()]  # one logger (the figures are drawn for each)
    monitor = cb.NeuralCollapseMonitor(eval_pass=True, eval_pass_every=2, figures_every=1)
    monitor.collectors = {s: NCFeatureStats(3, 4) for s in ("train", "train_eval")}
    monitor.collectors["train"].update(torch.randn(9, 4), torch.arange(9) % 3)
    monitor.collectors["train"].compute()
    seen = []
    monkeypatch.setattr(cb, "log_figures", lambda logger, step, means, w, norms: seen.append(means))
    monitor._maybe_figures(module.trainer, module)
    assert len(seen) == 1 and torch.equal(seen[0], monitor.collectors["train"].means())


@pytest.mark.parametrize("fp32", [True, False])
def test_eval_pass_features_are_float32_under_bf16_mixed(tmp_path, no_checksum, fp32):
    """nc-metrics.md 3.4: bf16 features floor the apparent within-class variability; the eval
    pass runs with autocast off, so its NC1 is that of a float32 forward (recomputed here);
    ``eval_pass_fp32 false`` keeps the trainer's bf16 (visibly different numbers)."""
    from conftest import tiny_args
    from datagen import write_cifar10_torchvision

    root = write_cifar10_torchvision(tmp_path / "data", train_per_class=5, test_per_class=1)
    cli = main(["fit", *tiny_args(root, tmp_path / "logs", "--trainer.precision", "bf16-mixed",
                                  "--trainer.limit_train_batches", "2", "--nc.eval_pass", "true",
                                  "--nc.eval_pass_fp32", str(fp32).lower())])
    logged = scalars(Path(cli.trainer.log_dir))["nc/train_eval/nc1_trace_ratio"]
    feats, labels = eval_features(cli)
    assert len(labels) == 40
    means = torch.stack([feats[labels == c].mean(0) for c in range(10)])
    within = (feats - means[labels]).square().sum(1).mean()
    between = (means - means.mean(0)).square().sum(1).mean()
    want = float(within / between)
    if fp32:
        assert logged == [pytest.approx(want, rel=1e-5)]
    else:  # bf16 rounding of every feature coordinate
        assert abs(logged[0] - want) > 1e-4 * want


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_eval_pass_runs_under_true_precisions(tmp_path, no_checksum, precision):
    """Found by an audit: the eval pass fed the loader's float32 images to a bf16 / float64
    model (Lightning's loops convert inputs with the precision plugin; the pass did not), so
    ``--trainer.precision bf16-true`` or ``64-true`` with ``--nc.eval_pass true`` crashed at
    the end of the first epoch."""
    from conftest import tiny_args
    from datagen import write_cifar10_torchvision

    root = write_cifar10_torchvision(tmp_path / "data", train_per_class=5, test_per_class=1)
    cli = main(["fit", *tiny_args(root, tmp_path / "logs", "--trainer.precision", precision,
                                  "--trainer.limit_train_batches", "2", "--nc.eval_pass", "true")])
    logged = scalars(Path(cli.trainer.log_dir))["nc/train_eval/nc1_trace_ratio"]
    assert len(logged) == 1 and logged[0] == logged[0]  # one epoch, not NaN


def test_weight_averaging_leaves_the_training_values_alone(tmp_path):
    """Found by an audit: with ``EMAWeightAveraging`` in ``trainer.callbacks`` (whose hooks
    run before the monitor's), the averaged weights swapped in at the start of a validation
    epoch were those the monitor's epoch-end training values used: class-vector metrics of
    ``nc/train/*`` and the whole eval pass were the averaged model's in epochs with a
    validation and the trained model's in the others. A validation must change none of them."""
    ema = ("--trainer.callbacks+", "lightning.pytorch.callbacks.EMAWeightAveraging",
           "--trainer.callbacks.decay", "0.5", "--trainer.max_epochs", "2", "--nc.train", "true")
    logged = []
    for run, val in (("val", ("--trainer.check_val_every_n_epoch", "1")),
                     ("no_val", ("--trainer.limit_val_batches", "0"))):
        cli = main(["fit", *ufm_args(tmp_path / run, *ema, *val)])
        logged.append({tag: values for tag, values in scalars(Path(cli.trainer.log_dir)).items()
                       if tag.startswith(("nc/train/", "nc/train_eval/"))})
    assert "nc/train/gnc2_min_angle_weights" in logged[1] and len(logged[1]) > 40
    assert logged[0] == logged[1]


def test_figures_reach_tensorboard(tmp_path):
    """``--nc.figures_every``: the cosine heat maps and angle histograms of the class means and
    class vectors, the feature-norm histogram, and (lightning-conventions.md section 5, item 4)
    a histogram of intra-class cosines and a Projector embedding of a fixed sample of
    validation features with their labels. No test read any of them back."""
    main(["fit", *ufm_args(tmp_path, "--trainer.max_epochs", "1", "--nc.figures_every", "1",
                           "--trainer.check_val_every_n_epoch", "1")])
    run = tmp_path / "ufm" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"nc_fig/cos_means", "nc_fig/cos_class_vectors"} <= set(tags["images"])
    assert {"nc_fig/angles_means", "nc_fig/angles_class_vectors", "nc_fig/feature_norms",
            "nc_fig/intra_cos"} <= set(tags["histograms"])
    intra = events.Histograms("nc_fig/intra_cos")[-1].histogram_value
    assert intra.num == 10 * (10 * 9 // 2)  # 10 classes x 10 samples: 45 same-class pairs each
    assert -1.0 - 1e-6 <= intra.min <= intra.max <= 1.0 + 1e-6
    projector = (run / "projector_config.pbtxt").read_text()
    assert "nc_fig/val_features" in projector
    folder = next(run.rglob("tensors.tsv")).parent  # <step>/<escaped tag>/
    rows = (folder / "tensors.tsv").read_text().splitlines()
    labels = (folder / "metadata.tsv").read_text().split()
    assert len(rows) == len(labels) == 100 and len(rows[0].split("\t")) == 32
    assert sorted(set(labels)) == [str(c) for c in range(10)]
