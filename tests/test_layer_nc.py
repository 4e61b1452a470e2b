"""LayerNCMonitor (``--layer_nc``): NC1 of intermediate layers against a reference in the test
(validation and eval-pass features), buffered vs unbuffered updates, 1 vs 2 DDP processes (here
for ``val``; ``train_eval`` in tests/test_nc_monitor.py's DDP run), the CLI group, bad names,
stages and outputs, hook removal."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, tiny_args
from hug_lightning.cli import main
from hug_lightning.cli_errors import ConfigError
from hug_lightning.metrics import layers as layers_module
from hug_lightning.metrics.collapse import NCFeatureStats
from hug_lightning.metrics.layers import LayerNCMonitor, pool_output
from hug_lightning.module import ClassifierModule

#: SmallConvNet(width=8): three conv-BN-ReLU-max-pool stages (8, 16, 32 channels), then the
#: average pool's (B, 32, 1, 1) and the backbone's (B, 32) output
LAYERS = ["backbone.features.3", "backbone.features.7", "backbone.features.11", "backbone.pool",
          "backbone"]
FLAG = "[" + ", ".join(LAYERS) + "]"


def reference_features(model: torch.nn.Module, loader) -> tuple[dict, torch.Tensor]:
    """Each layer's output of the eval-mode model over ``loader``, averaged over every axis
    after the channels (written here, not the callback's pooling), in float64."""
    modules, feats, labels = dict(model.named_modules()), {name: [] for name in LAYERS}, []

    def keep(name, module, args, out):  # noqa: ANN001
        feats[name].append(out.detach().reshape(out.shape[0], out.shape[1], -1)
                           .mean(dim=-1).double())

    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: keep(n, m, a, o))
               for n in LAYERS]
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                model(x)
                labels.append(y)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(f) for n, f in feats.items()}, torch.cat(labels)


def nc1_reference(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Tr(Sw)/Tr(Sb), Tr(Sw Sb^+)/K and CDNV by the textbook formulas (per-class loop)."""
    classes = [c for c in y.unique().tolist()]
    mus = torch.stack([x[y == c].mean(0) for c in classes])
    centred = mus - mus.mean(0)  # the class-average global mean
    sw = sum((x[y == c] - mus[i]).T @ (x[y == c] - mus[i]) for i, c in enumerate(classes))
    sw = sw / len(x)
    sb = centred.T @ centred / len(classes)
    var = torch.stack([((x[y == c] - mus[i]) ** 2).sum(1).mean() for i, c in enumerate(classes)])
    cdnv = [(var[i] + var[j]) / (2 * (mus[i] - mus[j]).square().sum())
            for i, j in itertools.combinations(range(len(classes)), 2)]
    return {"nc1_trace_ratio": float(sw.trace() / sb.trace()),
            "nc1_pinv": float((sw @ torch.linalg.pinv(sb, hermitian=True)).trace() / len(classes)),
            "nc1_cdnv": float(torch.stack(cdnv).mean())}


def no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks for m in model.modules())


def test_values_equal_the_reference_of_the_validation_features(cifar10_folder_root, tmp_path,
                                                               monkeypatch):
    """A fit with all three stages on, a sanity check, the NC eval pass and a second forward in
    every validation step (as an attack would): the validation values are those of the
    validation images through the final weights, pooled, the first forward of each batch only;
    the ``train_eval`` ones those of the training images with the evaluation transform through
    the final weights in eval mode (the last eval pass runs after the last training batch).
    (The reference pools in float32, as the callback does: pooled in float64, nc1_pinv of the
    first layer, nearly collapsed, Tr Sw / Tr Sb = 3e-4, differs by 8e-6 relative.)"""
    step = ClassifierModule.validation_step

    def two_forwards(self, batch, batch_idx):  # noqa: ANN001
        out = step(self, batch, batch_idx)
        self(torch.flip(batch[0], dims=[-1]) * 3.0)  # not counted
        return out

    monkeypatch.setattr(ClassifierModule, "validation_step", two_forwards)
    cli = main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--layer_nc.layers", FLAG,
                                  "--layer_nc.stages", "[val, train, train_eval]",
                                  "--trainer.limit_val_batches", "1.0",
                                  "--trainer.num_sanity_val_steps", "1",
                                  "--nc.eval_pass", "true", "--trainer.max_epochs", "2")])
    logged = cli.trainer.callback_metrics
    assert no_hooks(cli.model)
    for stage, loader, n in (("val", cli.datamodule.val_dataloader(), 40),
                             ("train_eval", cli.datamodule.train_eval_dataloader(), 160)):
        feats, labels = reference_features(cli.model, loader)
        assert len(labels) == n and len(labels.unique()) >= 2
        for layer in LAYERS:
            for name, want in nc1_reference(feats[layer], labels).items():
                got = float(logged[f"nc_layers/{stage}/{layer}/{name}"])
                assert got == pytest.approx(want, rel=1e-6), (stage, layer, name, got, want)
    for layer in LAYERS:
        assert f"nc_layers/train/{layer}/nc1_pinv" in logged  # train-mode: logged, not checked
    for stage, name in itertools.product(("val", "train", "train_eval"),
                                         ("nc1_pinv", "nc1_trace_ratio")):
        # the backbone's output is what the NC monitor collects: its values, train-mode too
        assert float(logged[f"nc_layers/{stage}/backbone/{name}"]) == pytest.approx(
            float(logged[f"nc/{stage}/{name}"]), rel=1e-6), (stage, name)


def test_ufm_features_equal_the_nc_monitors(tmp_path):
    """The UFM's batches of (sample index, label), its backbone's (B, d) output: the NC
    monitor's values in both stages, over 3 epochs (class-mean pivots from the second on)."""
    cli = main(["fit", "--config", str(REPO / "configs" / "ufm_ce.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--model.init_args.backbone.init_args.dim", "16",
                "--data.init_args.samples_per_class", "6", "--trainer.max_epochs", "3",
                "--trainer.check_val_every_n_epoch", "1", "--nc.train", "true",
                "--layer_nc.layers", "[backbone]", "--layer_nc.stages", "[train, val]",
                "--layer_nc.metrics", "[nc1_pinv, nc1_trace_ratio, nc2_etf_dist_means]"])
    logged = cli.trainer.callback_metrics
    for stage, name in itertools.product(("val", "train"),
                                         ("nc1_pinv", "nc1_trace_ratio", "nc2_etf_dist_means")):
        assert float(logged[f"nc_layers/{stage}/backbone/{name}"]) == pytest.approx(
            float(logged[f"nc/{stage}/{name}"]), rel=1e-6), (stage, name)


def test_pooling_and_bad_outputs():
    x = torch.randn(3, 4, 5, 6, dtype=torch.bfloat16)
    pooled = pool_output("a", x)
    assert pooled.dtype == torch.float32
    assert torch.allclose(pooled, x.float().mean(dim=(2, 3)))
    tokens = torch.randn(3, 7, 4, dtype=torch.float64)
    assert torch.equal(pool_output("b", tokens), tokens.mean(dim=1))  # (B, T, C): over T
    with pytest.raises(TypeError, match="layer 'c'.*tuple"):
        pool_output("c", (x, x))
    with pytest.raises(TypeError, match="layer 'c'.*dict"):
        pool_output("c", {"out": x})
    with pytest.raises(ValueError, match=r"layer 'd' has shape \(3, 4, 5, 6, 1\)"):
        pool_output("d", x[..., None])
    flat = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    kept = pool_output("e", flat)
    flat.relu_()  # the next module's in-place op: the buffered features keep their values
    assert torch.equal(kept, torch.tensor([[1.0, -2.0], [-3.0, 4.0]]))


def layer_fit(root, log_dir, monkeypatch, *extra: str) -> tuple[list[dict], list[int]]:
    """A 2-epoch fit with the ``train`` stage only (5 batches of 32 per epoch, the NC monitor
    off): the float64 values the monitor logs at each epoch, and the batch size of each
    collector update."""
    logged, sizes = [], []
    log, update = layers_module.log_direct, NCFeatureStats.update

    def keep(trainer, values):  # noqa: ANN001
        logged.append({k: v.double().clone() for k, v in values.items()})
        log(trainer, values)

    def count(self, features, labels, **kwargs):  # noqa: ANN001
        sizes.append(len(labels))
        return update(self, features, labels, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(layers_module, "log_direct", keep)
        patch.setattr(NCFeatureStats, "update", count)
        main(["fit", *tiny_args(root, log_dir, "--layer_nc.layers", FLAG, "--nc.enabled", "false",
                                "--layer_nc.stages", "[train]", "--trainer.max_epochs", "2",
                                *extra)])
    return logged, sizes


def test_buffered_updates_equal_unbuffered_ones(cifar10_folder_root, tmp_path, monkeypatch):
    """buffer_batches 3 (5 batches: one update of 96, the epoch end's of 64 per layer) and 100
    (the epoch end's update only) log the values of one update per batch, to float64 rounding,
    at both epochs (the second around the first's class means)."""
    runs = {b: layer_fit(cifar10_folder_root, tmp_path / b, monkeypatch,
                         "--layer_nc.buffer_batches", b) for b in ("1", "3", "100")}
    assert runs["1"][1] == [32] * 5 * 2 * len(LAYERS)
    assert runs["3"][1] == ([96] * len(LAYERS) + [64] * len(LAYERS)) * 2
    assert runs["100"][1] == [160] * 2 * len(LAYERS)
    single = runs["1"][0]
    assert len(single) == 2 and len(single[0]) == 3 * len(LAYERS)
    for b in ("3", "100"):
        for epoch, (want, got) in enumerate(zip(single, runs[b][0])):
            assert want.keys() == got.keys()
            for key in want:
                assert torch.allclose(got[key], want[key], rtol=1e-12, atol=0), \
                    (b, epoch, key, float(got[key]), float(want[key]))


def test_bad_name_lists_close_matches(cifar10_folder_root, tmp_path):
    with pytest.raises(ConfigError, match=r"'backbone\.feature\.3' \(close: backbone\.features"
                                          r"\.3.*'layer4'.*named_modules"):
        main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--layer_nc.layers",
                                "[backbone.feature.3, layer4]")])
    for off in (["--nc.eval_pass", "false"], ["--nc.eval_pass", "true", "--nc.enabled", "false"]):
        with pytest.raises(ConfigError, match="train_eval records the NC monitor's eval pass, "
                                              "which is off: set --nc.eval_pass true"):
            main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--layer_nc.layers", FLAG,
                                    "--layer_nc.stages", "[val, train_eval]", *off)])


def test_hooks_removed_after_a_failure(cifar10_folder_root, tmp_path, monkeypatch):
    step = ClassifierModule.validation_step

    def failing(self, batch, batch_idx):  # noqa: ANN001
        step(self, batch, batch_idx)
        assert not no_hooks(self)  # the hooks were on
        raise RuntimeError("boom")

    monkeypatch.setattr(ClassifierModule, "validation_step", failing)
    cli = main(tiny_args(cifar10_folder_root, tmp_path, "--layer_nc.layers", FLAG), run=False)
    with pytest.raises(RuntimeError, match="boom"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert no_hooks(cli.model)


def test_cli_group_parses_and_is_left_out_when_off(cifar10_folder_root, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--layer_nc.layers", FLAG,
                                "--print_config")])
    config = yaml.safe_load(out.getvalue())
    assert config["layer_nc"]["layers"] == LAYERS and config["layer_nc"]["stages"] == ["val"]
    off = main(tiny_args(cifar10_folder_root, tmp_path), run=False)
    assert not any(isinstance(c, LayerNCMonitor) for c in off.trainer.callbacks)
    on = main(tiny_args(cifar10_folder_root, tmp_path, "--layer_nc.layers", FLAG), run=False)
    assert sum(isinstance(c, LayerNCMonitor) for c in on.trainer.callbacks) == 1


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_ddp_logs_the_single_process_numbers(cifar10_folder_root, tmp_path):
    """`validate` of the seeded initial weights on 1 and on 2 gloo processes (unpadded shards
    of 20 images each): the same values (written as float32 by the logger)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for devices, strategy in (("1", "auto"), ("2", "ddp")):
        args = tiny_args(cifar10_folder_root, tmp_path / devices, "--layer_nc.layers", FLAG,
                         "--trainer.devices", devices, "--trainer.strategy", strategy,
                         "--trainer.limit_val_batches", "1.0", "--nc.enabled", "false")
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", "validate", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = (tmp_path / devices / "cifar10_ce").glob("version_*")
        runs[devices] = {k: v for k, v in scalars(run).items() if k.startswith("nc_layers/")}
    assert len(runs["1"]) == 3 * len(LAYERS) and runs["1"].keys() == runs["2"].keys()
    for tag, values in runs["1"].items():
        assert torch.allclose(torch.tensor(values), torch.tensor(runs["2"][tag]), rtol=2.5e-7,
                              atol=0), (tag, values, runs["2"][tag])
