"""A real 2-process DDP fit (gloo on CPU) through the console command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_args


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_two_process_fit_logs_once(cifar10_folder_root, tmp_path, launcher):
    """Lightning's own launcher (it starts the second process) and torchrun (both processes
    started outside, Lightning joins them: the multi-node route of the README). Then the same
    2-process fit resumed with `--ckpt_path last`: every rank resolves it and names the resumed
    config on its own, rank 0 alone writes, into the run's folder."""
    import torch

    args = tiny_args(cifar10_folder_root, tmp_path, "--trainer.strategy", "ddp",
                     "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                     "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    start = [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", "2"] if launcher == "torchrun" else [sys.executable]

    def fit(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*start, "-m", "hug_lightning", "fit", *args, *extra], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    proc = fit()
    assert "distributed_backend=gloo" in proc.stderr
    assert "All distributed processes registered" in proc.stderr
    # epoch values are reduced by the module/callbacks: no advice to add sync_dist
    assert "sync_dist=True" not in proc.stderr, proc.stderr[-3000:]
    runs = list((tmp_path / "cifar10_ce").glob("version_*"))
    assert len(runs) == 1, runs  # rank 0 alone created the run folder
    events = list(runs[0].glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # and only rank 0 wrote TensorBoard events
    assert (runs[0] / "config.yaml").is_file()
    ckpts = {p.name for p in (runs[0] / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts
    fit("--ckpt_path", "last", "--trainer.max_epochs", "3")
    assert list((tmp_path / "cifar10_ce").iterdir()) == runs  # no folder of its own
    assert {p.name for p in runs[0].glob("config*.yaml")} == {"config.yaml",
                                                              "config.resume-1.yaml"}
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 2  # one per command
    last = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 9  # 3 epochs of 3 steps: resumed


@pytest.mark.slow
def test_ddp_predict_shards_cover_the_set_once(cifar10_folder_root, tmp_path):
    """2-process `predict`: each rank writes its shard; `index` puts them back together, every
    test sample exactly once (unpadded), with the single-process predictions and features
    (`--predictions.features true`: each shard holds its own rows'); also from the
    device-resident loader, which Lightning cannot track (its `index` was -1)."""
    import torch

    ckpt_args = tiny_args(cifar10_folder_root, tmp_path, "--trainer.max_epochs", "1",
                          "--trainer.limit_predict_batches", "1.0")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hug_lightning", *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)

    proc = run("fit", *ckpt_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for devices, strategy, resident in (("1", "auto", "false"), ("2", "ddp", "false"),
                                        ("2", "ddp", "true")):
        proc = run("predict", *ckpt_args, "--ckpt_path", "last", "--trainer.devices", devices,
                   "--trainer.strategy", strategy, "--trainer.accelerator", "cpu",
                   "--data.init_args.device_resident", resident, "--predictions.features",
                   "true")
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "cifar10_ce").glob("version_*"), key=lambda p: int(p.name[8:]))
    single = torch.load(runs[1] / "predictions.pt", weights_only=True)
    for run_dir in runs[2:]:
        shards = [torch.load(run_dir / f"predictions-rank{r}.pt", weights_only=True)
                  for r in (0, 1)]
        index = torch.cat([s["index"] for s in shards])
        assert sorted(index.tolist()) == list(range(len(single["pred"])))  # each sample once
        order, single_order = index.argsort(), single["index"].argsort()
        for key in ("pred", "label"):
            merged = torch.cat([s[key] for s in shards])[order]
            torch.testing.assert_close(merged, single[key][single_order], msg=key)
        merged = torch.cat([s["features"] for s in shards])[order]
        assert merged.dtype == torch.float32 and merged.shape[0] == len(single["pred"])
        torch.testing.assert_close(merged, single["features"][single_order])


@pytest.mark.slow
def test_ddp_predict_of_the_ufm_indexes_every_sample_once(tmp_path):
    """The UFM's prediction loader was iterable: Lightning could not track indices and every
    rank wrote 0..N/2-1. Map-style now: the shards' indices cover the set exactly once."""
    import torch

    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "2",
            "--data.init_args.samples_per_class", "5", "--data.init_args.steps_per_epoch", "2",
            "--model.init_args.backbone.init_args.dim", "8"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def run(*extra: str) -> None:
        command, *flags = extra
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", command, "--config",
                               "ufm_hug", *logs, *flags], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("fit")
    run("predict", "--ckpt_path", "last")
    run("predict", "--ckpt_path", "last", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    runs = sorted((tmp_path / "ufm_hug").glob("version_*"), key=lambda p: int(p.name[8:]))
    single = torch.load(runs[1] / "predictions.pt", weights_only=True)
    shards = [torch.load(runs[2] / f"predictions-rank{r}.pt", weights_only=True) for r in (0, 1)]
    index = torch.cat([s["index"] for s in shards])
    assert sorted(index.tolist()) == list(range(50)) == single["index"].tolist()
    merged = torch.cat([s["pred"] for s in shards])[index.argsort()]
    assert torch.equal(merged, single["pred"])


@pytest.mark.slow
def test_ddp_hug_training_equals_one_process(tmp_path):
    """UFM with 5 samples per class: the 2 ranks' shards hold 3 and 2 of each class, so with
    per-rank class balancing the DDP gradient differs from one process (about 15 % on the
    features, measured); with the class counts all-reduced the weights are the same (also with
    the loss compiled), and so are the logged step values (the loss and its terms: averaged
    over the 2 processes)."""
    import torch

    from hug_lightning.experiments.results import read_scalars

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def weights(name: str, *extra: str) -> dict:
        args = ["--config", "ufm_hug", "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--trainer.logger.init_args.name", name, "--trainer.max_epochs", "1",
                "--data.init_args.samples_per_class", "5", "--data.init_args.steps_per_epoch",
                "3", "--model.init_args.backbone.init_args.dim", "8", "--nc.enabled", "false",
                "--trainer.log_every_n_steps", "1", *extra]
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", "fit", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = next((tmp_path / name).glob("version_0/checkpoints/last.ckpt"))
        return torch.load(ckpt, weights_only=True)["state_dict"]

    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    one = weights("one")
    synced = weights("synced", *ddp)
    local = weights("local", *ddp, "--model.init_args.head.init_args.sync_class_counts", "false")
    # the loss compiled: the counts' all_reduce is traced into the graph, same numbers
    compiled = weights("compiled", *ddp, "--model.init_args.compile_loss", "true",
                       "--model.init_args.compile_options", "{backend: aot_eager}")
    for key in ("backbone.weight", "head.proxies"):
        torch.testing.assert_close(synced[key], one[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled[key], one[key], rtol=1e-5, atol=1e-6)
    logged = {name: read_scalars(tmp_path / name / "version_0") for name in ("one", "synced")}
    for key in ("train/loss", "train/inter", "train/intra"):
        steps, values = zip(*logged["one"][key])
        assert steps == (0, 1, 2), (key, steps)
        assert [s for s, _ in logged["synced"][key]] == list(steps), key
        assert [v for _, v in logged["synced"][key]] == pytest.approx(values, rel=1e-5), key
    diff = (local["backbone.weight"] - one["backbone.weight"]).norm()
    assert diff > 0.01 * one["backbone.weight"].norm()  # the local balancing: not one process


@pytest.mark.slow
def test_ddp_robust_accuracy_equals_one_process(cifar10_folder_root, tmp_path):
    """`test` with the robustness evaluation on 1 and on 2 processes: the same robust
    accuracies. The noise and PGD's start were drawn per (rank, batch), so they changed with
    the number of processes; they are now drawn per image. The other test metrics too: the
    calibration (gathered scores, the checkpoint's T) and `hp/test_acc`, in one events file."""
    import json

    from hug_lightning.experiments.results import read_scalars

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = tiny_args(cifar10_folder_root, tmp_path, "--trainer.max_epochs", "1")

    def run(*extra: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", *extra], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("fit", *args)
    robust = ["--robust.enabled", "true", "--robust.attacks", "[pgd]", "--robust.eps",
              json.dumps([8 / 255]), "--robust.pgd_steps", "1", "--robust.severities", "[5]",
              "--robust.corruptions", "[gaussian_noise, shot_noise, impulse_noise]",
              "--trainer.limit_test_batches", "1.0", "--data.init_args.batch_size", "7"]
    # one epoch: its best checkpoint holds the last weights (`best` resolved by every rank)
    for devices, strategy, ckpt in (("1", "auto", "last"), ("2", "ddp", "best")):
        run("test", *args, *robust, "--ckpt_path", ckpt, "--trainer.devices", devices,
            "--trainer.strategy", strategy, "--trainer.accelerator", "cpu")
    runs = sorted((tmp_path / "cifar10_ce").glob("version_*"), key=lambda p: int(p.name[8:]))
    assert len(runs) == 3  # one new folder per `test`, none per rank
    assert len(list(runs[2].glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    one, two = ({k: v for k, v in read_scalars(r).items() if k.startswith(("test/", "hp/"))}
                for r in runs[1:3])
    assert {"test/robust/pgd_eps8", "test/robust/shot_noise_s5", "test/ece", "test/nll",
            "test/temperature", "hp/test_acc"} <= set(one)
    assert one.keys() == two.keys()
    for tag in one:
        if tag.startswith("test/robust/"):
            assert one[tag] == two[tag], tag
        else:  # sums in another order (test/loss): the last bits may differ
            assert [s for s, _ in one[tag]] == [s for s, _ in two[tag]], tag
            assert [v for _, v in one[tag]] == pytest.approx([v for _, v in two[tag]],
                                                              rel=1e-6, nan_ok=True), tag
    assert one["hp/test_acc"][-1][1] == one["test/acc"][-1][1]
