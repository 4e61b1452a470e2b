"""The ``init`` group: a new fit from another run's weights (hug_lightning/init_weights.py).

Run A trains the UFM with cross-entropy; run B starts a HUG head on A's free features
(``--init.skip [head]``). References: A's checkpoint read here with ``torch.load``, a fresh model
built by the CLI without ``--init`` (the same seed), and an uninterrupted run for the resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from torch import nn

from conftest import REPO
from hug_lightning.cli import main
from hug_lightning.cli_errors import ConfigError
from hug_lightning.init_weights import InitFileError, InitWeights

DIM, PER_CLASS, K, STEPS = 8, 4, 10, 2  # the UFM: K * PER_CLASS free features of width DIM


def _args(config: str, logs: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
            "--trainer.logger.init_args.save_dir", str(logs),
            "--model.init_args.backbone.init_args.dim", str(DIM),
            "--data.init_args.samples_per_class", str(PER_CLASS),
            "--data.init_args.steps_per_epoch", str(STEPS), "--trainer.max_epochs", "1",
            "--nc.enabled", "false", "--trainer.enable_model_summary", "false", *extra]


def _last(cli) -> Path:
    return Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory) -> Path:
    """Run A: the UFM with cross-entropy, one epoch of 2 steps; its ``last.ckpt``."""
    logs = tmp_path_factory.mktemp("a")
    return _last(main(_args("ufm_ce", logs, "--trainer.max_epochs", "2",
                            "--trainer.check_val_every_n_epoch", "1")))


class AtTrainStart(Callback):
    """The model's tensors, the loop counters and the optimizer's state once the fit has set
    up and restored everything (the first training batch is next)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.step, self.epoch = trainer.global_step, trainer.current_epoch
        self.optimizer_state = dict(trainer.optimizers[0].state)


def _fit_watched(args: list[str]) -> tuple[object, AtTrainStart]:
    cli = main(args[1:], run=False)  # run=False: no subcommand
    watch = AtTrainStart()
    cli.trainer.callbacks.append(watch)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, watch


def test_hug_head_on_a_ce_backbone_starts_afresh(ce_run, tmp_path):
    a = torch.load(ce_run, map_location="cpu", weights_only=True)
    assert a["global_step"] == 2 * STEPS and a["optimizer_states"][0]["state"]  # A trained
    cli, watch = _fit_watched(_args("ufm_hug", tmp_path, "--init.path", str(ce_run),
                                    "--init.skip", "[head]"))
    # the backbone (free features) is A's, exactly; before A's training they were the seed's
    assert watch.state["backbone.weight"].shape == (K * PER_CLASS, DIM)
    assert torch.equal(watch.state["backbone.weight"], a["state_dict"]["backbone.weight"])
    # the head is the one a fresh model of the same seed builds (the CLI without --init)
    fresh = main(_args("ufm_hug", tmp_path / "fresh")[1:], run=False).model
    assert torch.equal(watch.state["head.proxies"], fresh.head.proxies.detach())
    assert not any(k.startswith("head.fc") for k in watch.state)  # no CE tensor came along
    # not a resume: epoch 0, step 0, an optimizer without momentum buffers; A's best accuracy
    # (a metric state in its state_dict) is not carried over
    assert (watch.step, watch.epoch, watch.optimizer_state) == (0, 0, {})
    assert float(a["state_dict"]["val_acc_best.max_value"]) > float("-inf")
    assert watch.state["val_acc_best.max_value"] == fresh.val_acc_best.max_value
    assert cli.trainer.global_step == STEPS  # the whole epoch budget (A's epochs not counted)
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["init"] == {"path": str(ce_run), "skip": ["head"], "strict": True}


def test_strict_names_the_keys_and_says_what_to_do(ce_run, tmp_path):
    with pytest.raises(ConfigError) as err:  # a CE checkpoint into a HUG model, no skip
        main(_args("ufm_hug", tmp_path, "--init.path", str(ce_run)))
    text = str(err.value)
    assert "model tensors not in the file (1): head.proxies (10, 8)" in text
    assert "file tensors not in the model (2): head.fc.weight (10, 8), head.fc.bias (10,)" in text
    assert "--init.skip '[head]'" in text and "--init.strict false" in text
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before any training
    with pytest.raises(ConfigError) as err:  # 5 classes of width 6: other shapes, named
        main(_args("ufm_ce", tmp_path, "--init.path", str(ce_run),
                   "--data.init_args.num_classes", "5",
                   "--model.init_args.backbone.init_args.dim", "6"))
    assert f"backbone.weight file ({K * PER_CLASS}, {DIM}) model ({5 * PER_CLASS}, 6)" \
        in str(err.value)
    assert f"head.fc.weight file ({K}, {DIM}) model (5, 6)" in str(err.value)
    with pytest.raises(ConfigError, match=r"--init.skip \['heads'\]: no key"):
        main(_args("ufm_hug", tmp_path, "--init.path", str(ce_run), "--init.skip", "[heads]"))


def test_not_strict_loads_what_fits_and_warns(ce_run, tmp_path):
    a = torch.load(ce_run, map_location="cpu", weights_only=True)["state_dict"]
    with pytest.warns(UserWarning, match="1 model tensors missing from the file and 0 of other "
                                         "shapes.*2 file tensors not in the model"):
        _, watch = _fit_watched(_args("ufm_hug", tmp_path, "--init.path", str(ce_run),
                                        "--init.strict", "false"))
    assert torch.equal(watch.state["backbone.weight"], a["backbone.weight"])
    fresh = main(_args("ufm_hug", tmp_path / "fresh")[1:], run=False).model
    assert torch.equal(watch.state["head.proxies"], fresh.head.proxies.detach())


def test_a_bare_state_dict_with_wrapper_prefixes(ce_run, tmp_path):
    """``torch.save(model.state_dict())`` of a DDP-wrapped, compiled model: ``module.`` and
    ``_orig_mod.`` are dropped."""
    a = torch.load(ce_run, map_location="cpu", weights_only=True)["state_dict"]
    bare = tmp_path / "weights.pt"
    torch.save({f"module.{k.replace('backbone.', 'backbone._orig_mod.')}": v
                for k, v in a.items()}, bare)
    _, watch = _fit_watched(_args("ufm_ce", tmp_path, "--init.path", str(bare)))
    for key in ("backbone.weight", "head.fc.weight", "head.fc.bias"):
        assert torch.equal(watch.state[key], a[key]), key


def test_whole_components_only(monkeypatch):
    """``skip: [head]`` leaves ``head`` fresh and loads ``head_x``; a module wrapped by
    ``torch.compile`` (keys with ``_orig_mod``) loads a plain module's tensors."""
    source = nn.ModuleDict({"head": nn.Linear(2, 2), "head_x": nn.Linear(2, 2)})
    target = nn.ModuleDict({"head": nn.Linear(2, 2), "head_x": torch.compile(nn.Linear(2, 2))})
    assert "head_x._orig_mod.weight" in target.state_dict()
    before = target["head"].weight.detach().clone()
    monkeypatch.setattr("hug_lightning.init_weights.read_state_dict",
                        lambda path: dict(source.state_dict()))
    InitWeights(path="file.pt", skip=["head"]).load_into(target)
    assert torch.equal(target["head"].weight, before)
    assert torch.equal(target["head_x"].weight, source["head_x"].weight)
    assert torch.equal(target["head_x"].bias, source["head_x"].bias)


def test_missing_or_unreadable_file_before_training(tmp_path, monkeypatch, capsys):
    gone = tmp_path / "no" / "last.ckpt"
    with pytest.raises(InitFileError, match=f"--init.path {gone}: no such file"):
        main(_args("ufm_hug", tmp_path / "logs", "--init.path", str(gone)))
    assert not list(tmp_path.rglob("*.ckpt"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InitFileError, match=f"--init.path {junk}: cannot be read"):
        main(_args("ufm_hug", tmp_path / "logs", "--init.path", str(junk)))
    torch.save([torch.zeros(1)], junk)
    with pytest.raises(InitFileError, match="holds a list, neither a Lightning checkpoint"):
        main(_args("ufm_hug", tmp_path / "logs", "--init.path", str(junk)))
    from hug_lightning.cli import console_main  # the command: one message, exit status 1
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["hug-lightning", *_args("ufm_hug", tmp_path / "logs",
                                                             "--init.path", str(gone))])
    assert console_main() == 1
    message = capsys.readouterr().err
    assert f"--init.path {gone}: no such file" in message and "Traceback" not in message


def test_a_resumed_fit_does_not_read_the_file(ce_run, tmp_path):
    """B for 1 epoch, its file moved away, resumed for a 2nd epoch: the same weights as B run
    for 2 epochs at once (no schedule: a cosine one learns the run's length); ``validate`` with
    B's saved config ignores the group too."""
    init = tmp_path / "a.ckpt"
    shutil.copy(ce_run, init)
    b_args = _args("ufm_hug", tmp_path / "b", "--init.path", str(init), "--init.skip", "[head]",
                   "--model.init_args.scheduler", "null")
    main(b_args)
    whole = main([*_args("ufm_hug", tmp_path / "whole", "--init.path", str(init),
                         "--init.skip", "[head]", "--model.init_args.scheduler", "null"),
                  "--trainer.max_epochs", "2"])
    init.rename(tmp_path / "moved.ckpt")
    resumed = main([*b_args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == whole.trainer.global_step == 2 * STEPS
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    run = Path(resumed.trainer.log_dir)
    main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", "last"])


def test_slurm_auto_restore_does_not_read_the_file(ce_run, tmp_path, monkeypatch):
    """Under SLURM, Lightning restores the newest ``hpc_ckpt_<n>.ckpt`` of its root folder by
    itself (no ``--ckpt_path``): that fit is a resume too, and the moved file is not read."""
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "hug", "SLURM_NTASKS": "1",
                       "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1",
                       "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    init, job = tmp_path / "a.ckpt", tmp_path / "job"
    shutil.copy(ce_run, init)
    args = _args("ufm_hug", tmp_path / "logs", "--init.path", str(init), "--init.skip", "[head]",
                 "--trainer.default_root_dir", str(job))
    b = main(args)  # no hpc checkpoint yet: loads the file
    b_state = torch.load(_last(b), map_location="cpu", weights_only=True)
    job.mkdir(exist_ok=True)
    shutil.copy(_last(b), job / "hpc_ckpt_1.ckpt")
    init.rename(tmp_path / "moved.ckpt")
    cli, watch = _fit_watched([*args, "--trainer.max_epochs", "2"])
    assert cli.trainer.ckpt_path == str(job / "hpc_ckpt_1.ckpt")
    assert watch.step == STEPS
    for key, value in b_state["state_dict"].items():
        assert torch.equal(watch.state[key], value), key


def test_the_readme_command_on_generated_cifar(cifar10_tv_root, no_checksum, tmp_path):
    """README's CE -> HUG example (cifar10_ce, then cifar10_hug, whose BN-linear embedding the
    CE run does not have): ``[head]`` alone is an error naming the embedding, ``[head,
    embedding]`` starts with the CE run's backbone (BatchNorm statistics included)."""
    from conftest import tiny_args

    ce = main(["fit", *tiny_args(cifar10_tv_root, tmp_path, "--trainer.max_epochs", "1")])
    ckpt = _last(ce)
    hug = tiny_args(cifar10_tv_root, tmp_path, "--init.path", str(ckpt), config="cifar10_hug")
    with pytest.raises(ConfigError, match=r"(?s)embedding\.0\.weight.*--init.skip '\[embedding, "
                                          r"head\]'") as err:
        main(["fit", *hug, "--init.skip", "[head]"])
    assert "head" not in str(err.value).split("\n")[1]  # skipped: neither missing nor unexpected
    _, watch = _fit_watched(["fit", *hug, "--init.skip", "[head, embedding]"])
    a = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    backbone = [k for k in a if k.startswith("backbone.")]
    assert any(k.endswith("running_var") for k in backbone)
    for key in backbone:
        assert torch.equal(watch.state[key], a[key]), key


@pytest.mark.slow
def test_two_ddp_processes_start_as_one(ce_run, tmp_path):
    """Each DDP process reads the file before the model is wrapped: the 2-process fit (gloo,
    Lightning's launcher) ends with one process's weights."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def weights(name: str, *extra: str) -> dict:
        args = [*_args("ufm_hug", tmp_path, "--init.path", str(ce_run), "--init.skip",
                       "[head]", "--trainer.logger.init_args.name", name, *extra)]
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("tensors loaded, 1 left at their initialisation") == 1
        ckpt = tmp_path / name / "version_0" / "checkpoints" / "last.ckpt"
        return torch.load(ckpt, weights_only=True)["state_dict"]

    one = weights("one")
    ddp = weights("ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    for key in ("backbone.weight", "head.proxies"):
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6)
