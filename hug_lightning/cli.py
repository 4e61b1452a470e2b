"""The ``hug-lightning`` command: LightningCLI with the project's defaults.

``hug-lightning fit|validate|test|predict --config <yaml> [--key value ...]`` and
``python -m hug_lightning ...`` both call :func:`main`, which is also usable from Python and
notebooks (``main(["fit", "--config", "configs/ufm_hug.yaml"])``).

What it adds to a plain ``LightningCLI``:

* subclass mode for model and data (``class_path`` + ``init_args``), so any subclass of
  ``LightningModule`` / ``LightningDataModule`` in an importable module can be selected;
* ``data.num_classes`` linked into ``model.init_args.num_classes`` at instantiation (an error
  when the data module has none);
* no ``--optimizer`` / ``--lr_scheduler`` groups: the model's ``optimizer`` and ``scheduler``
  arguments (``--model.init_args.optimizer``) build them, with its parameter groups;
* the ``hug-lightning`` script puts the working folder on ``sys.path`` (as ``python -m`` does),
  so ``class_path: my_module.MyHead`` finds ``./my_module.py``;
* groups ``checkpoint`` (the best on ``val/acc``), ``last`` (``last.ckpt`` every epoch),
  ``nc`` (:class:`~hug_lightning.metrics.callback.NeuralCollapseMonitor`, on), ``layer_nc``
  (NC1 of intermediate layers, off), ``interrupt`` (SIGTERM / Ctrl-C write ``last.ckpt``),
  ``calibration`` (ECE, on), ``robust`` (FGSM/PGD and corruptions at test time, off),
  ``predictions`` (``predict``'s files) and ``init`` (a new fit from another run's weights);
  a model's ``configure_callbacks`` adds to them (:mod:`hug_lightning.model_callbacks`);
* ``--trainer.limit_train_batches 1`` (and the other batch limits) means one batch, as written
  (jsonargparse read it as ``1.0``, all batches: :mod:`hug_lightning.batch_limits`);
* an unwritable log folder is an error before any work;
* TensorBoard by default (``logs/<name>/version_N``, ``default_hp_metric=False``), the
  resolved ``config.yaml`` saved next to the events (overwritten when it exists, except by a
  fit resumed into the same folder: that one writes ``config.resume-<n>.yaml``);
* ``--config NAME`` also finds the YAML files shipped in the package (``hug_lightning.configs``),
  so an installed copy runs ``hug-lightning fit --config cifar10_ce`` from any folder.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from hug_lightning import __version__, interrupt, module, ufm
from hug_lightning.batch_limits import restore_integer_ones
from hug_lightning.cli_errors import (ConfigError, LogFolderError, RunNotFoundError, _reasons,
                                      _user_frame, accelerator_hint, data_num_classes, one_message)
from hug_lightning.config_files import (CommandParser, free_config_name, packaged_config,
                                        resolve_config_args, resumed_config_name)
from hug_lightning.checkpointing import LastCheckpoint
from hug_lightning.csv_history import keep_csv_history
from hug_lightning.data.base import BadDataError, DataNotFoundError
from hug_lightning.ddp_errors import (PEER_MESSAGE, peer_failure, release_process_group, report,
                                     stop_children)
from hug_lightning.evaluation import CalibrationMonitor, RobustnessEvaluation
from hug_lightning.guards import FiniteLossGuard, NonFiniteLossError, check_policy_for_processes
from hug_lightning.init_weights import InitFileError, InitWeights
from hug_lightning.interrupt import InterruptCheckpoint
from hug_lightning.metrics.callback import NeuralCollapseMonitor
from hug_lightning.metrics.layers import LayerNCMonitor, drop_idle_layer_nc
from hug_lightning.model_callbacks import checkpoint_order, keep_template_callbacks
from hug_lightning.model_options import (flat, warn_replaced_by_checkpoint,
                                         warn_replaced_num_classes)
from hug_lightning.predictions import PredictionWriter
from hug_lightning.process_state import ProcessState
from hug_lightning.progress import ThrottledProgressBar
from hug_lightning.resumed_logs import ResumedLogCut
from hug_lightning.run_folders import (check_writable, describe_ckpt_path, evaluation_warnings,
                                       loggers_init_args, never_into_a_run_folder,
                                       resolve_evaluated, resolve_last, run_folder, share_version)

# Lightning 2.6.6's pytree copy makes torch 2.14 warn that LeafSpec is deprecated: not ours
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "hug_lightning", "default_hp_metric": False},
    },
}
#: imported so that ``--help`` names them: its lists of known subclasses hold imported classes only
KNOWN_CLASSES = (module.ClassifierModule, ufm.UFMDataModule)
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "checkpoint.monitor": "val/acc",
    "checkpoint.mode": "max",
    "checkpoint.save_last": False,  # last.ckpt comes from the `last` group (LastCheckpoint)
    "checkpoint.save_top_k": 1,
    "checkpoint.auto_insert_metric_name": False,
    "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}-val_acc{val/acc:.4f}",
    "checkpoint.enable_version_counter": False,
}


class HUGLightningCLI(LightningCLI):
    """LightningCLI with the links, callbacks and defaults of hug_lightning."""

    def instantiate_classes(self) -> None:
        """Build everything; a rejected value raises :class:`ConfigError` with the reason only."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:  # the last: the
            where = _user_frame(err)  # Trainer's (accelerator, devices, strategy, precision)
            raise ConfigError(f"invalid configuration: {_reasons(err)}{accelerator_hint(err)}"
                              + (f" (raised in {where})" if where else "")) from err
        warn_replaced_num_classes(self.config, self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, with ``limit_*_batches: 1`` as one batch (see :mod:`batch_limits`) and
        a :class:`~hug_lightning.progress.ThrottledProgressBar` unless the configuration names
        a progress bar or turns it off."""
        ones = {key: 1 for key in getattr(self, "_integer_ones", ()) if key not in kwargs}
        config = self._get(self.config_init, "trainer", default={}) or {}
        given = config.get("callbacks")
        given = [] if given is None else list(given) if isinstance(given, list) else [given]
        extra = [self._get(self.config_init, key)
                 for key in self._parser(self.subcommand).callback_keys]
        if "callbacks" not in kwargs and config.get("enable_progress_bar") is not False and \
                not any(isinstance(c, ProgressBar) for c in [*given, *extra]):
            kwargs["callbacks"] = [*given, ThrottledProgressBar()]
        trainer = super().instantiate_trainer(**kwargs, **ones)
        # trainer.checkpoint_callback (in-process ckpt_path="best") is the group's, as on the CLI
        group = self._get(self.config_init, "checkpoint", default=None)
        # an idle layer_nc (no layers) is left out: Lightning calls every callback every step
        trainer.callbacks = checkpoint_order(drop_idle_layer_nc(trainer.callbacks), group)
        keep_template_callbacks(trainer, group)  # a model's configure_callbacks adds to them
        share_version(trainer.loggers)  # a list's loggers of one experiment: one folder
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Lightning (>= 2.6) rebuilds the model from the checkpoint's hyperparameters when
        ``--ckpt_path`` is given, replacing model options set in the YAML or on the command
        line without a word: say which ones."""
        sub = self.config.get("subcommand")
        before = flat(self.config[sub].get("model")) if sub else {}
        super()._parse_ckpt_path()
        if sub:
            warn_replaced_by_checkpoint(before, flat(self.config[sub].get("model")))

    def _run_subcommand(self, subcommand: str) -> None:
        guard = getattr(self.model, "loss_guard", None)
        if subcommand == "fit" and isinstance(guard, FiniteLossGuard):  # before the DDP
            check_policy_for_processes(guard.policy, self.trainer.world_size)  # launch: once
        if subcommand == "fit" and getattr(self, "_resumes_in_place", False):
            keep_csv_history(self.trainer.loggers)  # Lightning's CSVLogger deletes it
            self.trainer.callbacks.insert(0, ResumedLogCut())  # what a killed fit logged later
        try:
            with evaluation_warnings(subcommand, getattr(self, "_resumes_in_place", False)):
                super()._run_subcommand(subcommand)
        except BaseException as err:
            stop_children(self.trainer, err)  # they would wait in a collective (NCCL: 30 min)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.init_args.num_classes",
                              compute_fn=data_num_classes, apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_lightning_class_args(NeuralCollapseMonitor, "nc")
        parser.add_lightning_class_args(LayerNCMonitor, "layer_nc")  # off: no layers
        parser.add_lightning_class_args(LastCheckpoint, "last")
        parser.add_lightning_class_args(InterruptCheckpoint, "interrupt")
        parser.add_lightning_class_args(CalibrationMonitor, "calibration")  # cheap: on
        parser.add_lightning_class_args(RobustnessEvaluation, "robust")
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # predict only
        parser.add_lightning_class_args(InitWeights, "init")  # fit only: no resume's weights
        parser.set_defaults({"robust.enabled": False})  # opt-in: PGD costs steps x fwd+bwd

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        raw = sys.argv[1:] if args is None else args
        written = list(raw) if isinstance(raw, (list, tuple)) else []
        describe_ckpt_path(parsers := getattr(self, "_subcommand_parsers", {}))  # for --help
        for each in (parser, *parsers.values()):
            each.written_args = written  # what their dumps (--print_config) write back as 1
        argv, sys.argv = sys.argv, sys.argv if args is None else sys.argv[:1]
        try:  # main(args) in a notebook: Lightning warned about the kernel's own sys.argv
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv
        cfg = self.config.get(self.config.get("subcommand") or "", self.config)
        # the saved config.yaml says 1, as written (IntegerOnesParser); instantiation parses it
        # as 1.0 again, so instantiate_trainer passes the same keys as 1
        self._integer_ones = (restore_integer_ones(written, cfg["trainer"])
                              if cfg.get("trainer") is not None else [])
        loggers = loggers_init_args(cfg)
        logger = loggers[0] if loggers else None  # the run's: Lightning checkpoints into it
        for save_dir in dict.fromkeys(str(each.get("save_dir") or ".") for each in loggers
                                      if each is not None):
            check_writable(Path(save_dir))  # each logger's: a list may log to several
        subcommand = self.config.get("subcommand")
        self._resumes_in_place = False
        if subcommand == "fit":
            if cfg.get("ckpt_path") == "last":
                resolve_last(cfg, loggers)
            folder = run_folder(logger) if cfg.get("ckpt_path") and logger is not None else None
            if folder is not None:  # a resume into the run's own folder keeps its config
                self._resumes_in_place = True
                self.save_config_kwargs = {**self.save_config_kwargs,
                                           "config_filename": resumed_config_name(folder)}
        elif subcommand in ("validate", "test", "predict"):
            if cfg.get("ckpt_path") in ("last", "best"):
                resolve_evaluated(cfg, logger, str(cfg.get("ckpt_path")))
            if logger is not None:
                never_into_a_run_folder(logger, subcommand, loggers[1:])
        if subcommand and logger is None:  # no version folder: the config goes to the
            # trainer's root (the working folder by default), maybe next to the user's own
            root = Path(str(cfg.get("trainer", {}).get("default_root_dir") or "."))
            self.save_config_kwargs = {**self.save_config_kwargs,
                                       "config_filename": free_config_name(root)}


def console_main() -> int:
    """Entry point of the ``hug-lightning`` script and ``python -m hug_lightning``.

    Exit status: 0 when the subcommand finished; 130 (Ctrl-C) or 143 (SIGTERM) when ``fit`` was
    interrupted and saved ``last.ckpt`` (with ``--interrupt.enabled false`` Lightning handles
    signals and nothing is saved; Lightning alone would exit with 0), so shells and job
    schedulers can tell an interrupted run from a finished one; 2 for a rejected configuration
    value and 1 for missing data, a missing run to resume/evaluate, an unwritable log folder,
    an unreadable ``--init.path`` or unreadable or inconsistent data files (a corrupt image, a
    label out of range, found in this process or a DataLoader worker) or a non-finite training
    loss: one message saying what to do, no traceback. Under DDP the message names the process
    (``[rank 1/2]``), an error every process met is printed once, and a process stopped by
    another's failure says so in one line (exit status 1): :mod:`hug_lightning.ddp_errors`.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        # as `python -m hug_lightning` does: `class_path: my_module.MyHead` finds ./my_module.py
        sys.path.insert(0, os.getcwd())
    try:
        main(args=None)
    except SIGTERMException:
        return 130 if interrupt.LAST_INTERRUPT == "SIGINT" else 143
    except ConfigError as err:
        if os.environ.get("HUG_LIGHTNING_TRACEBACK"):
            raise
        report(f"{err}\n(fix what it names: a YAML value or --key flag, or a class; "
               "HUG_LIGHTNING_TRACEBACK=1 shows the traceback)")
        return 2
    except (DataNotFoundError, RunNotFoundError, LogFolderError, BadDataError,
            NonFiniteLossError, InitFileError) as err:
        if os.environ.get("HUG_LIGHTNING_TRACEBACK"):
            raise
        report(f"{one_message(err)}\n(HUG_LIGHTNING_TRACEBACK=1 shows the traceback)")
        return 1
    except Exception as err:  # a collective failed because another DDP process ended
        if os.environ.get("HUG_LIGHTNING_TRACEBACK") or not peer_failure(err):
            raise
        if not getattr(err, "quiet", False):  # quiet: the same error, which that one reports
            report(PEER_MESSAGE)
        return 1
    finally:
        release_process_group()
    return 0


def main(args: ArgsType = None, run: bool = True) -> HUGLightningCLI:
    """Run the command line (``args=None`` reads ``sys.argv``); returns the CLI object.

    The process's deterministic-algorithms and cuDNN flags, float32 matmul precision and the
    variables ``seed_everything`` and ``deterministic`` set (``PL_GLOBAL_SEED``,
    ``PL_SEED_WORKERS``, ``CUBLAS_WORKSPACE_CONFIG``) are as before the call once it returns
    or raises (:mod:`hug_lightning.process_state`): a later call gets what its own
    configuration says. With ``run=False`` a call that returns keeps them, for the caller's
    ``cli.trainer.fit(...)``.

    Args:
        args: Arguments as on the command line (list of strings) or a config dict.
        run: Run the subcommand; ``False`` only instantiates model, data and trainer.
    """
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    if args is None:  # command line: resolve packaged config names in sys.argv itself
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    elif isinstance(args, (list, tuple)):
        args = resolve_config_args([str(a) for a in args])
    # run=False: the caller runs cli.trainer, with what its configuration set
    with ProcessState.given_back(unless_returned=not run):
        return HUGLightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            # --version: "<prog> 0.1.0"
            parser_kwargs={"default_env": False, "version": __version__},
            parser_class=CommandParser,  # dumps keep `limit_*_batches: 1` as 1 (one batch)
            # the model builds its optimizer (parameter groups, head lr scale, schedule length):
            # LightningCLI's --optimizer / --lr_scheduler would replace all of that silently
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


__all__ = ["CHECKPOINT_DEFAULTS", "TRAINER_DEFAULTS", "ConfigError", "HUGLightningCLI",
           "RunNotFoundError", "check_writable", "console_main", "data_num_classes",
           "free_config_name", "main", "packaged_config", "release_process_group",
           "resolve_config_args", "resumed_config_name"]
