"""The hug-lightning command end to end on generated data in both CIFAR layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, tiny_args
from datagen import CIFAR10_CLASSES
from hug_lightning.cli import main


def _run_dir(log_dir: Path, name: str = "cifar10_ce") -> list[Path]:
    return sorted((log_dir / name).glob("version_*"))


@pytest.mark.parametrize("layout", ["torchvision", "folder"])
def test_fit_validate_test_predict(layout, cifar10_tv_root, cifar10_folder_root, no_checksum,
                                   tmp_path):
    root = cifar10_tv_root if layout == "torchvision" else cifar10_folder_root
    cli = main(["fit", *tiny_args(root, tmp_path)])
    run = _run_dir(tmp_path)[0]
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and len(ckpts) == 2  # best on val/acc + last
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert cli.model.num_classes == 10  # linked from the data module
    events = EventAccumulator(str(run))
    events.Reload()
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # HPARAMS tab
    assert "hp/val_acc_best" in events.Tags()["scalars"]  # a real metric, no hp_metric=-1
    assert "hp_metric" not in events.Tags()["scalars"]

    last = run / "checkpoints" / "last.ckpt"
    cli = main(["validate", *tiny_args(root, tmp_path), "--ckpt_path", str(last)])
    assert "val/acc" in cli.trainer.callback_metrics
    cli = main(["test", *tiny_args(root, tmp_path), "--ckpt_path", str(last)])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    cli = main(["predict", *tiny_args(root, tmp_path), "--ckpt_path", str(last)])
    preds = cli.trainer.predict_loop.predictions
    assert preds and preds[0]["pred"].shape == preds[0]["label"].shape
    saved = torch.load(Path(cli.trainer.log_dir) / "predictions.pt", weights_only=True)
    assert torch.equal(saved["pred"], torch.cat([p["pred"] for p in preds]))
    assert torch.equal(saved["label"], torch.cat([p["label"] for p in preds]))
    assert saved["logits"].shape == (len(saved["pred"]), 10)
    assert torch.equal(saved["index"], torch.arange(len(saved["pred"])))  # unshuffled set
    assert saved["class_names"] == CIFAR10_CLASSES  # the pickles' meta file, the folder names
    rows = (Path(cli.trainer.log_dir) / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,pred,label,pred_name,label_name"
    assert len(rows) == len(saved["pred"]) + 1
    pred, label = int(saved["pred"][0]), int(saved["label"][0])
    assert rows[1] == f"0,{pred},{label},{CIFAR10_CLASSES[pred]},{CIFAR10_CLASSES[label]}"


def test_config_saved_twice_does_not_crash(cifar10_folder_root, tmp_path):
    args = tiny_args(cifar10_folder_root, tmp_path, "--trainer.logger.init_args.version", "fixed")
    main(["fit", *args])
    main(["fit", *args])  # same log folder: config.yaml is overwritten
    assert (tmp_path / "cifar10_ce" / "fixed" / "config.yaml").is_file()


def test_print_config_round_trip(cifar10_folder_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *tiny_args(cifar10_folder_root, tmp_path), "--print_config"])
    first = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    second = capsys.readouterr().out
    assert yaml.safe_load(first) == yaml.safe_load(second)
    assert yaml.safe_load(first)["model"]["init_args"]["backbone"]["class_path"].endswith(
        "SmallConvNet")


def test_test_from_run_config_reproduces_val_acc(cifar10_folder_root, tmp_path):
    """`test --config <run>/config.yaml --ckpt_path <best>` rebuilds the trained model."""
    args = tiny_args(cifar10_folder_root, tmp_path, "--data.init_args.val_split", "0",
                     "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1.0",
                     "--trainer.limit_test_batches", "1.0")
    cli = main(["fit", *args])
    ckpt_cb = cli.trainer.checkpoint_callback
    best_path, best_score = ckpt_cb.best_model_path, float(ckpt_cb.best_model_score)
    ckpt = torch.load(best_path, weights_only=True, map_location="cpu")  # plain hparams only
    assert ckpt["hyper_parameters"]["_class_path"] == "hug_lightning.module.ClassifierModule"
    run_config = Path(cli.trainer.log_dir) / "config.yaml"
    cli = main(["test", "--config", str(run_config), "--ckpt_path", best_path])
    # val_split=0: validation ran on the test split, so test/acc must equal the best val/acc
    assert float(cli.trainer.callback_metrics["test/acc"]) == best_score


def test_resume_from_last_checkpoint(cifar10_folder_root, tmp_path):
    args = tiny_args(cifar10_folder_root, tmp_path, "--trainer.limit_train_batches", "3")
    cli = main(["fit", *args, "--trainer.max_epochs", "1"])
    assert cli.trainer.global_step == 3
    best = float(cli.trainer.callback_metrics["val/acc_best"])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert (state["epoch"], state["global_step"]) == (0, 3)
    assert float(state["state_dict"]["val_acc_best.max_value"]) == best
    # the best validation accuracy survives a resume (no validation after it here)
    cli = main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", str(last),
                "--trainer.limit_val_batches", "0"])
    assert float(cli.model.val_acc_best.max_value) == best  # the restored state
    cli = main(["fit", *args, "--trainer.max_epochs", "3", "--ckpt_path", str(last)])
    # two more epochs of 3 batches on top of the restored epoch 0 / step 3
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 9
    assert float(cli.trainer.callback_metrics["val/acc_best"]) >= best
    assert cli.trainer.fit_loop.epoch_progress.total.completed == 3
    resumed_run = Path(cli.trainer.log_dir)
    assert (resumed_run / "checkpoints" / "last.ckpt").is_file()


def test_evaluate_last_and_best_of_a_resumed_run(cifar10_folder_root, tmp_path):
    """`test|validate --ckpt_path best|last` in a new process find the run's checkpoints (plain
    Lightning would evaluate the untrained model for `last` and fail for `best`), and never
    write into the training run's folder (a resumed run's config names its version)."""
    args = tiny_args(cifar10_folder_root, tmp_path, "--data.init_args.val_split", "0",
                     "--trainer.limit_val_batches", "1.0", "--trainer.limit_test_batches", "1.0")
    main(["fit", *args, "--trainer.max_epochs", "1"])
    cli = main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])  # resumed
    run = Path(cli.trainer.log_dir)
    best = cli.trainer.checkpoint_callback
    best_path, best_score = best.best_model_path, float(best.best_model_score)
    # the first fit's config is kept; the resume's own (naming the run's version) is next to it
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 1
    run_config = run / "config.resume-1.yaml"
    saved = run_config.read_bytes()
    assert yaml.safe_load(saved)["trainer"]["max_epochs"] == 2
    assert yaml.safe_load(saved)["trainer"]["logger"]["init_args"]["version"] == run.name
    cli = main(["test", "--config", str(run_config), "--ckpt_path", "best"])
    assert cli.trainer.ckpt_path == best_path
    assert float(cli.trainer.callback_metrics["test/acc"]) == best_score  # val_split 0
    assert Path(cli.trainer.log_dir) != run and run_config.read_bytes() == saved
    cli = main(["validate", "--config", str(run_config), "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    cli = main(["fit", *args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert Path(cli.trainer.log_dir) == run and (run / "config.resume-2.yaml").is_file()
    assert (run / "config.yaml").read_bytes() != (run / "config.resume-2.yaml").read_bytes()
    with pytest.raises(FileNotFoundError, match="no .*last.ckpt found"):
        main(["test", "--config", str(run_config), "--ckpt_path", "last",
              "--trainer.logger.init_args.name", "never_trained"])


def test_evaluate_best_of_a_run_without_last_checkpoints(cifar10_folder_root, tmp_path):
    """`--last.enabled false`: `best` is found through the newest file ModelCheckpoint wrote
    (each records the best so far), not refused for want of a last.ckpt."""
    args = tiny_args(cifar10_folder_root, tmp_path, "--data.init_args.val_split", "0",
                     "--trainer.limit_val_batches", "1.0", "--checkpoint.save_top_k", "2")
    cli = main(["fit", *args, "--trainer.max_epochs", "3", "--last.enabled", "false"])
    files = sorted(p.name for p in (Path(cli.trainer.log_dir) / "checkpoints").iterdir())
    assert len(files) == 2 and "last.ckpt" not in files, files
    best_path = cli.trainer.checkpoint_callback.best_model_path
    cli = main(["test", *args, "--ckpt_path", "best"])
    assert cli.trainer.ckpt_path == best_path


def test_unknown_config_key_is_a_clear_error(cifar10_folder_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", *tiny_args(cifar10_folder_root, tmp_path), "--model.init_args.lernrate",
              "0.1"])
    assert exc.value.code != 0
    assert "lernrate" in capsys.readouterr().err


def test_a_command_without_config_says_how_to_give_one(capsys):
    """No --config: jsonargparse's 'required: fit.data, fit.model' alone left a new user
    guessing; the message names the flag and every shipped config, each usable by name."""
    with pytest.raises(SystemExit) as exc:
        main(["fit"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fit.data, fit.model" in err and "--config" in err
    shipped = sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))
    listed = err.rsplit("shipped: ", 1)[1].split()
    assert [name.rstrip(",") for name in listed] == shipped


def test_a_missing_argument_of_a_given_class_gets_no_config_hint(capsys):
    """The hint is for a command without model or data. A config that names a class missing a
    required argument (here torch.nn.Linear's in_features) gave them: 'a model and data come
    from a config' misled there (the nested message mentions the key "model")."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", "ufm_ce", "--model.init_args.backbone", "torch.nn.Linear"])
    err = capsys.readouterr().err
    assert "required: in_features, out_features" in err and "come from a config" not in err


def test_packaged_config_by_name(cifar10_folder_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the packaged copy is used
    with pytest.raises(SystemExit):
        main(["fit", "--config", "cifar10_ce", "--print_config"])
    assert "CIFAR10DataModule" in capsys.readouterr().out
    (tmp_path / "cifar10_ce").mkdir()  # a run folder of that name (save_dir .) is no config
    with pytest.raises(SystemExit):
        main(["fit", "--config", "cifar10_ce", "--print_config"])
    assert "CIFAR10DataModule" in capsys.readouterr().out
    # a mistyped path elsewhere must not silently become the packaged config
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "myexp" / "cifar10_ce.yaml"), "--print_config"])
    assert "CIFAR10DataModule" not in capsys.readouterr().out


def test_resume_says_which_model_options_the_checkpoint_replaces(tmp_path):
    args = ["--config", "ufm_hug", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    with pytest.warns(UserWarning, match=r"NOT used: init_args.optimizer.init_args.lr: 0.5 -> 1"):
        main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last",
              "--model.init_args.optimizer.init_args.lr", "0.5"])


def test_console_entry_points_help():
    for cmd in (["hug-lightning"], [sys.executable, "-m", "hug_lightning"]):
        exe = Path(sys.executable).parent / "hug-lightning" if cmd == ["hug-lightning"] else None
        argv = [str(exe)] if exe is not None else cmd
        out = subprocess.run([*argv, "fit", "--help"], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "--data" in out.stdout and "--model" in out.stdout
        # a fresh process lists the template's own model and UFM data among the known
        # subclasses (it named neither: only imported classes are listed)
        listed = "".join(out.stdout.split())
        assert "hug_lightning.module.ClassifierModule" in listed
        assert "hug_lightning.ufm.UFMDataModule" in listed
        # --ckpt_path says what `last` means here, not Lightning's "the previous trainer.fit call"
        assert "thenewestlast.ckptofthisexperiment" in listed
        assert "previous``trainer.fit``call" not in listed


def test_evaluation_help_says_what_ckpt_path_last_and_best_mean(capsys):
    for subcommand in ("validate", "test", "predict"):
        with pytest.raises(SystemExit):
            main([subcommand, "--help"])
        listed = "".join(capsys.readouterr().out.split())
        assert "'last'/'best':thelastorthebestcheckpointofthenewestrun" in listed, subcommand
        assert "previous``trainer.fit``call" not in listed
        start = listed.index("Checkpointtoload")  # plain text, no reST markup
        assert "``" not in listed[start:listed.index("untrainedmodelisused", start)]


def test_main_with_args_ignores_the_notebook_kernels_argv(tmp_path, monkeypatch):
    """main([...]) in a notebook warned that LightningCLI got both args and command-line
    arguments: sys.argv[1:] were the kernel's own (`-f kernel.json`), not the user's."""
    import warnings

    argv = ["ipykernel_launcher.py", "-f", str(tmp_path / "kernel.json")]
    monkeypatch.setattr(sys, "argv", list(argv))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["--config", "ufm_ce", "--trainer.logger.init_args.save_dir",
                    str(tmp_path), "--model.init_args.backbone.init_args.dim", "8"], run=False)
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert sys.argv == argv  # given back
    assert cli.model.feature_dim == 8  # the args were used


def test_version_flag_prints_the_package_version(capsys):
    """`hug-lightning --version` (lightning-conventions.md 7.2, torchgeo's `parser_kwargs`
    version): it printed `unrecognized arguments: --version` and exited with 2."""
    import hug_lightning

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out.split()  # "<prog> 0.1.0": "hug-lightning 0.1.0"
    assert len(printed) == 2 and printed[1] == hug_lightning.__version__, printed


def test_package_version_has_one_source():
    """pyproject.toml reads the version from `hug_lightning.__version__` (dynamic), so the
    installed metadata and `--version` cannot disagree (lightning-conventions.md 7.1)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "hug_lightning.__version__"}


def _hparams_tab(run: Path) -> tuple[dict, set]:
    """TensorBoard HPARAMS tab of a run: (hyperparameters, declared metric tags)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    values = {key: getattr(value, value.WhichOneof("kind"))
              for key, value in start.session_start_info.hparams.items()}
    return values, {info.name.tag for info in exp.experiment.metric_infos}


def test_hparams_tab_has_the_batch_size_and_the_final_nc1(tmp_path):
    """lightning-conventions.md section 5: the HPARAMS tab pairs loss type, alpha/beta,
    feature dimension, LR *and batch size* with best val acc *and final NC1*. The data
    module's options were missing (it saves no hyperparameters) and NC1 was no tab metric."""
    main(["fit", "--config", "ufm_hug", "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--trainer.max_epochs", "2", "--model.init_args.backbone.init_args.dim", "16",
          "--data.init_args.batch_size", "25", "--data.init_args.steps_per_epoch", "2"])
    run = _run_dir(tmp_path, "ufm_hug")[0]
    values, metrics = _hparams_tab(run)
    assert values["head/init_args/variant"] == "mhe" and values["head/init_args/beta"] == 1.0
    assert values["data/batch_size"] == 25 and values["data/samples_per_class"] == 50
    assert values["data/class_path"] == "hug_lightning.ufm.UFMDataModule"
    assert {"hp/val_acc_best", "hp/test_acc", "hp/nc1_pinv"} <= metrics
    events = EventAccumulator(str(run))
    events.Reload()
    nc1 = events.Scalars("hp/nc1_pinv")
    assert nc1[-1].value == pytest.approx(events.Scalars("nc/train_eval/nc1_pinv")[-1].value)


def test_lightning_pin_excludes_versions_without_the_subclass_ckpt_fix():
    """`test --config <run>/config.yaml --ckpt_path ...` rebuilds the model from the
    checkpoint's hyperparameters; in subclass mode (this CLI) that failed before Lightning
    2.6.0 (#21246, lightning-conventions.md 2.9/2.10: "Require Lightning >= 2.6"). The pin
    allowed 2.5.5 and 2.5.6."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (lightning,) = [Requirement(d) for d in deps if Requirement(d).name == "lightning"]
    assert not any(lightning.specifier.contains(v) for v in ("2.5.5", "2.5.6"))
    assert lightning.specifier.contains("2.6.0") and lightning.specifier.contains("2.6.6")
