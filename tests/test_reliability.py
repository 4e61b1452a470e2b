"""Reliability: exact resume after interruption, numerical faults, bad input, determinism."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from conftest import REPO, tiny_args
from datagen import CIFAR10_CLASSES, write_image_folder
from hug_lightning.backbones import SmallConvNet
from hug_lightning.cli import main
from hug_lightning.guards import NonFiniteLossError
from hug_lightning.heads import CrossEntropyHead


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("rel"), CIFAR10_CLASSES,
                              train_per_class=10, test_per_class=3)


def _args(root: Path, log: Path, *extra: str) -> list[str]:
    return tiny_args(root, log, "--trainer.deterministic", "true",
                     "--model.init_args.scheduler", "null",
                     "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0",
                     "--data.init_args.batch_size", "16", "--trainer.max_epochs", "3",
                     "--nc.train", "true", *extra)


def _final_state(log: Path) -> dict:
    ckpt = max(log.glob("cifar10_ce/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(ckpt, weights_only=True)
    nc = next(v for k, v in state["callbacks"].items() if "NeuralCollapseMonitor" in k)
    return {"weights": state["state_dict"], "nc": nc["collectors"], "step": state["global_step"]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for stage, states in a["nc"].items():
        for key, value in states.items():
            assert torch.allclose(value, b["nc"][stage][key], rtol=1e-12, atol=1e-12,
                                  equal_nan=True), (stage, key)


ONE_CYCLE_15 = ("--model.init_args.scheduler", '{"class_path": "hug_lightning.optim.OneCycleLR", '
                '"init_args": {"total_steps": 15}}')  # 3 epochs x 5 steps, whatever max_steps


@pytest.mark.parametrize("device_resident, scheduler", [("false", ()), ("true", ()),
                                                        ("false", ONE_CYCLE_15)])
def test_mid_epoch_resume_is_exact(small_root, tmp_path, device_resident, scheduler):
    """Same weights (and NC sums) as the uninterrupted run; with a one-cycle schedule the
    learning rate of every resumed step must be restored as well."""
    extra = ("--data.init_args.device_resident", device_resident, *scheduler)
    main(["fit", *_args(small_root, tmp_path / "ref", *extra)])
    main(["fit", *_args(small_root, tmp_path / "cut", *extra, "--trainer.max_steps", "7",
                        "--last.every_n_train_steps", "1")])
    main(["fit", *_args(small_root, tmp_path / "cut", *extra, "--ckpt_path", "last")])
    assert len(list((tmp_path / "cut" / "cifar10_ce").iterdir())) == 1  # resumed in place
    _assert_same(_final_state(tmp_path / "ref"), _final_state(tmp_path / "cut"))


def test_resume_after_a_max_steps_stop_without_step_saves_is_exact(small_root, tmp_path):
    """Found by an audit: without ``--last.every_n_train_steps``, a fit stopped by max_steps
    inside an epoch wrote ``last.ckpt`` at the epoch-end hooks, with the epoch marked done:
    ``--ckpt_path last`` went on with the next epoch, silently skipping the rest of the
    interrupted one (and its validation). It must end with the uninterrupted run's weights."""
    extra = ("--data.init_args.device_resident", "true")
    main(["fit", *_args(small_root, tmp_path / "ref", *extra)])
    main(["fit", *_args(small_root, tmp_path / "cut", *extra, "--trainer.max_steps", "7")])
    main(["fit", *_args(small_root, tmp_path / "cut", *extra, "--ckpt_path", "last")])
    _assert_same(_final_state(tmp_path / "ref"), _final_state(tmp_path / "cut"))


def test_a_validation_at_a_max_steps_stop_is_in_last_ckpt_and_resume_is_exact(small_root,
                                                                              tmp_path):
    """Found by a review: at a max_steps stop inside an epoch ``last.ckpt`` was written at the
    step's batch end, before the validation that step runs (val_check_interval), and not after:
    it recorded no best checkpoint though one was written (``test --ckpt_path best`` failed, or
    took an older one). The resume from it must still end as the uninterrupted run."""
    extra = ("--data.init_args.device_resident", "true", "--trainer.val_check_interval", "3")
    main(["fit", *_args(small_root, tmp_path / "ref", *extra)])
    main(["fit", *_args(small_root, tmp_path / "cut", *extra, "--trainer.max_steps", "3")])
    ckpt_dir = next((tmp_path / "cut").glob("cifar10_ce/*/checkpoints"))
    best = [p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"]
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    recorded = [v["best_model_path"] for k, v in state["callbacks"].items()
                if k.startswith("ModelCheckpoint")]
    assert len(best) == 1 and recorded == [str(best[0])]  # the validation at step 3 wrote it
    main(["fit", *_args(small_root, tmp_path / "cut", *extra, "--ckpt_path", "last")])
    _assert_same(_final_state(tmp_path / "ref"), _final_state(tmp_path / "cut"))


def test_mid_epoch_resume_with_another_batch_size_is_an_error(small_root, tmp_path):
    """The rest of the epoch was taken at the new batch size's offset: 24 of 104 samples seen
    twice, silently (found by the reliability audit)."""
    main(["fit", *_args(small_root, tmp_path, "--trainer.max_steps", "2",
                        "--last.every_n_train_steps", "1")])
    with pytest.raises(ValueError, match="stopped inside an epoch with batch_size 16 per "
                                         "process; this run uses 8"):
        main(["fit", *_args(small_root, tmp_path, "--data.init_args.batch_size", "8",
                            "--ckpt_path", "last")])
    main(["fit", *_args(small_root, tmp_path, "--ckpt_path", "last")])  # same size: resumes


@pytest.mark.slow
def test_mid_epoch_resume_under_ddp_keeps_every_ranks_nc_sums(small_root, tmp_path):
    """2 processes: the checkpoint held rank 0's partial NC sums only, and every rank loaded
    them, so after a mid-epoch resume rank 0's part counted twice and rank 1's was lost. The
    saved sums are now over all ranks (rank 0 continues from them, the others from zero)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator",
           "cpu", "--data.init_args.batch_size", "8")

    def fit(log: Path, *extra: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "hug_lightning", "fit",
                               *_args(small_root, log, *ddp, *extra)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    fit(tmp_path / "ref", "--trainer.max_epochs", "2")
    fit(tmp_path / "cut", "--trainer.max_epochs", "2", "--trainer.max_steps", "7",
        "--last.every_n_train_steps", "1")  # 5 steps per epoch: stops inside epoch 1
    fit(tmp_path / "cut", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    _assert_same(_final_state(tmp_path / "ref"), _final_state(tmp_path / "cut"))  # weights
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def epoch_1(log: Path) -> dict[str, float]:  # the resumed epoch's NC values, as logged
        events = EventAccumulator(str(next(log.glob("cifar10_ce/version_*"))),
                                  size_guidance={"scalars": 0})
        events.Reload()
        return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]
                if tag.startswith("nc/train/")}

    ref, cut = epoch_1(tmp_path / "ref"), epoch_1(tmp_path / "cut")
    assert "nc/train/nc1_pinv" in ref and set(ref) == set(cut)
    for tag, value in ref.items():
        assert cut[tag] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), tag


def _wait_for_a_step(log: Path, since: float, proc: subprocess.Popen) -> None:
    """Wait until the run writes a checkpoint (training has started), at most 5 minutes."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.stat().st_mtime > since for p in log.glob("cifar10_ce/*/checkpoints/last.ckpt")):
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_fault_injection_kill_and_resume(small_root, tmp_path):
    """Kill the training process at random moments (SIGTERM, Ctrl-C, SIGKILL) and resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ref = _args(small_root, tmp_path / "ref", "--trainer.max_epochs", "30")
    subprocess.run([sys.executable, "-m", "hug_lightning", "fit", *ref], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=600)
    cut = _args(small_root, tmp_path / "cut", "--trainer.max_epochs", "30")
    every_step = ["--last.every_n_train_steps", "1"]  # SIGKILL leaves only periodic saves
    rng = random.Random(1234)
    resumed = 0
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL, None):
        resume = ["--ckpt_path", "last"] if (tmp_path / "cut").exists() else []
        periodic = every_step if sig is not None else []  # the last run saves like the reference
        proc = subprocess.Popen([sys.executable, "-m", "hug_lightning", "fit", *cut, *resume,
                                 *periodic],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if sig is not None:
            _wait_for_a_step(tmp_path / "cut", since=time.time(), proc=proc)
            time.sleep(rng.uniform(0.1, 1.5))  # then a random number of steps (~10 ms each)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
        finished = "`Trainer.fit` stopped" in err
        if sig in (signal.SIGTERM, signal.SIGINT) and not finished:
            assert "saved" in err and "last.ckpt" in err, err[-2000:]
            assert proc.returncode == (130 if sig == signal.SIGINT else 143), proc.returncode
        resumed += bool(resume)
    assert proc.returncode == 0, err[-3000:]
    assert resumed >= 2
    _assert_same(_final_state(tmp_path / "ref"), _final_state(tmp_path / "cut"))


@pytest.mark.slow
def test_ddp_sigterm_to_any_process_saves_and_resumes(small_root, tmp_path):
    """2 processes, SIGTERM at a random moment to the main process, to the other one, then to
    both: every time both stop after the same batch, write last.ckpt together and exit 143, and
    the resumed run ends with the weights and NC sums of a run never interrupted. (Lightning's
    own handler broadcasts from inside the signal handler: about half such runs hung.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator",
           "cpu", "--data.init_args.batch_size", "8", "--trainer.max_epochs", "30")

    def launch(log: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hug_lightning", "fit",
                                 *_args(small_root, log, *ddp, *extra)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group: os.killpg

    def finish(proc: subprocess.Popen) -> str:
        try:
            return proc.communicate(timeout=240)[1]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the interrupted DDP fit hung:\n" + proc.communicate()[1][-3000:])

    ref = launch(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, finish(ref)[-3000:]
    rng = random.Random(7)
    interrupted = 0
    for target in ("main", "other", "all", None):
        resume = ["--ckpt_path", "last"] if (tmp_path / "cut").exists() else []
        proc = launch(tmp_path / "cut", *resume)
        if target is not None:
            _wait_for_a_step(tmp_path / "cut", since=time.time(), proc=proc)
            time.sleep(rng.uniform(0.1, 1.5))
            if target == "main":
                os.kill(proc.pid, signal.SIGTERM)
            elif target == "other":  # the rank-1 process Lightning started
                children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                          text=True).stdout.split()
                assert len(children) == 1, children
                os.kill(int(children[0]), signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
        err = finish(proc)
        if target is not None and "`Trainer.fit` stopped" not in err:
            assert proc.returncode == 143, (target, err[-3000:])
            assert "saved" in err and "last.ckpt" in err, err[-3000:]
            interrupted += 1
    assert proc.returncode == 0, err[-3000:]
    assert interrupted >= 2
    _assert_same(_final_state(tmp_path / "ref"), _final_state(tmp_path / "cut"))


class _NaNAfter(CrossEntropyHead):
    """Cross-entropy head whose loss becomes NaN from the 3rd call on (fault injection)."""

    calls = 0

    def loss(self, features, labels):
        total, terms = super().loss(features, labels)
        type(self).calls += 1
        if type(self).calls >= 3:
            total = total * float("nan")
        return total, terms

    def forward_train(self, features, labels):
        return super(CrossEntropyHead, self).forward_train(features, labels)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_loss(small_root, tmp_path, policy):
    _NaNAfter.calls = 0
    args = _args(small_root, tmp_path, "--model.init_args.head",
                 '{"class_path": "tests_nan_head.NaNHead"}',
                 "--model.init_args.nonfinite_loss", policy, "--trainer.max_epochs", "1")
    if policy == "raise":
        with pytest.raises(NonFiniteLossError, match=r"epoch 0, global step 2: loss=nan, ce="):
            main(["fit", *args])
    else:
        cli = main(["fit", *args])
        assert cli.model.loss_guard.skipped == 3  # 5 batches, NaN from the 3rd on
        assert float(cli.trainer.callback_metrics["train/skipped_batches"]) == 3
        assert all(torch.isfinite(p).all() for p in cli.model.parameters())
        # the count survives a resume: one more epoch skips 5 more batches
        cli = main(["fit", *args[:-2], "--trainer.max_epochs", "2", "--ckpt_path", "last"])
        assert cli.model.loss_guard.skipped == 8
        assert float(cli.trainer.callback_metrics["train/skipped_batches"]) == 8


sys.modules["tests_nan_head"] = type(sys)("tests_nan_head")
sys.modules["tests_nan_head"].NaNHead = _NaNAfter


class _PoisonBatch(Callback):
    """NaN pixels in the 2nd training batch: BatchNorm sees them in the forward."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            batch[0].fill_(float("nan"))


sys.modules["tests_nan_head"].PoisonBatch = _PoisonBatch


def test_skipped_nan_batch_leaves_batchnorm_statistics_intact(small_root, tmp_path):
    cli = main(["fit", *_args(small_root, tmp_path, "--model.init_args.nonfinite_loss", "skip",
                              "--trainer.max_epochs", "1",
                              "--trainer.callbacks+=tests_nan_head.PoisonBatch")])
    assert cli.model.loss_guard.skipped == 1
    norms = [m for m in cli.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(torch.isfinite(b).all() for m in norms for b in m.buffers())
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["val/loss"])))


class _LyingBackbone(nn.Module):
    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallConvNet(width=4)  # outputs 16 features

    def forward(self, x):
        return self.net(x)


def test_feature_width_mismatch_is_clear(small_root, tmp_path):
    sys.modules["tests_nan_head"].LyingBackbone = _LyingBackbone
    with pytest.raises(ValueError, match=r"shape \(16, 16\), expected \(batch, 8\)"):
        main(["fit", *_args(small_root, tmp_path, "--model.init_args.backbone",
                            '{"class_path": "tests_nan_head.LyingBackbone"}')])


def test_same_seed_same_results_on_cpu(small_root, tmp_path):
    for name in ("a", "b"):
        main(["fit", *_args(small_root, tmp_path / name, "--trainer.max_epochs", "1")])
    _assert_same(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))
    main(["fit", *_args(small_root, tmp_path / "c", "--trainer.max_epochs", "1",
                        "--seed_everything", "1")])
    other = _final_state(tmp_path / "c")["weights"]
    assert any(not torch.equal(v, other[k])
               for k, v in _final_state(tmp_path / "a")["weights"].items())


@pytest.mark.slow
def test_ddp_evaluation_counts_each_sample_once(tmp_path):
    """39 validation images over 2 processes: the metrics equal the single-process ones."""
    root = write_image_folder(tmp_path / "odd", CIFAR10_CLASSES, train_per_class=4,
                              test_per_class=4)
    next((root / "test" / "cat").iterdir()).unlink()  # 39 test images: an odd count
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = _args(root, tmp_path / "fit", "--data.init_args.val_split", "0",
                 "--trainer.max_epochs", "1")
    cli = main(["fit", *base])
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    n_val = len(cli.datamodule.val_set)
    assert n_val % 2 == 1
    values = {}
    for devices, strategy in (("1", "auto"), ("2", "ddp")):
        out = tmp_path / f"metrics{devices}.txt"
        script = tmp_path / "validate.py"  # a file: Lightning's DDP launcher re-runs it per rank
        script.write_text(
            "import sys\nfrom hug_lightning.cli import main\n"
            "cli = main()\nm = cli.trainer.callback_metrics\n"
            f"if cli.trainer.is_global_zero:\n    open({str(out)!r}, 'w').write("
            "repr({k: float(v) for k, v in m.items()}))\n")
        args = ["validate", *_args(root, tmp_path / devices, "--data.init_args.val_split", "0"),
                "--trainer.devices", devices, "--trainer.strategy", strategy,
                "--ckpt_path", str(ckpt)]
        proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        values[devices] = eval(out.read_text())  # noqa: S307 (our own repr)
    for key in ("val/acc", "val/loss"):
        assert values["1"][key] == pytest.approx(values["2"][key], rel=1e-6), key


def test_step_saves_still_end_with_the_final_weights(small_root, tmp_path):
    """`--last.every_n_train_steps 3` with 5 steps per epoch: saves at steps 3, 5 (epoch end),
    6, 9, 10 (epoch end and end of training): last.ckpt holds the final step."""
    cli = main(["fit", *_args(small_root, tmp_path, "--trainer.max_epochs", "2",
                              "--last.every_n_train_steps", "3")])
    assert cli.trainer.global_step == 10
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["global_step"] == 10
    for key, value in cli.model.state_dict().items():
        assert torch.equal(state["state_dict"][key], value.cpu()), key


def test_second_ctrl_c_aborts_without_saving():
    from types import SimpleNamespace

    from hug_lightning.interrupt import InterruptCheckpoint
    saved = []
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"),
                              _signal_connector=SimpleNamespace(received_sigterm=False),
                              checkpoint_callback=SimpleNamespace(dirpath="x"),
                              save_checkpoint=saved.append, current_epoch=0, global_step=1)
    cb = InterruptCheckpoint()
    cb._trainer = trainer
    cb._on_signal(signal.SIGINT, None)  # first press: finish the batch, then save
    assert not trainer._signal_connector.received_sigterm  # only at the batch end
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer._signal_connector.received_sigterm and cb.interrupted_by == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        cb._on_signal(signal.SIGINT, None)  # second press: stop now
    cb.on_exception(trainer, None, KeyboardInterrupt())
    assert saved == []
    signal.signal(signal.SIGINT, signal.default_int_handler)
