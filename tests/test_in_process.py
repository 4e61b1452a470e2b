"""What a notebook or script meets after ``main([...])`` returns or raises in its own process:
the process's state after a fit that ended with an exception, and the torch flags and
environment variables a run set (hug_lightning.process_state).

A command-line run ends its process; an in-process one leaves the process to later cells, so a
fit must give back what it took (the SIGINT handler, the deterministic and cuDNN flags,
``PL_GLOBAL_SEED``...) on every way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import REPO
from hug_lightning.cli import main
from hug_lightning.process_state import FOUND_KEY, ProcessState

SET_BY_A_RUN = ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


class StopAt(Callback):
    """At the start of training batch 2: raises (a bug in user code) or sends SIGTERM."""

    def __init__(self, how: str = "error") -> None:
        self.how = how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2 and trainer.current_epoch == 0:
            if self.how == "error":
                raise RuntimeError("a bug in a callback")
            signal.raise_signal(signal.SIGTERM)


sys.modules["tests_in_process_callbacks"] = type(sys)("tests_in_process_callbacks")
class Record(Callback):
    """Records the process's flags and variables at the start of each fit (class-wide list)."""

    seen: list[dict] = []

    def on_fit_start(self, trainer, pl_module):
        Record.seen.append(_state())


sys.modules["tests_in_process_callbacks"].StopAt = StopAt
sys.modules["tests_in_process_callbacks"].Record = Record


def _state() -> dict:
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "benchmark": torch.backends.cudnn.benchmark,
            "matmul": torch.get_float32_matmul_precision(),
            **{key: os.environ.get(key) for key in (*SET_BY_A_RUN, FOUND_KEY)}}


#: a fresh process's (torch's defaults, none of the variables)
FRESH = {"deterministic": False, "warn_only": False, "cudnn_deterministic": False,
         "benchmark": False, "matmul": "highest", **dict.fromkeys((*SET_BY_A_RUN, FOUND_KEY))}


@pytest.fixture
def fresh_process(monkeypatch):
    """The process as a fresh one has it (as ``FRESH``) for the test, put back after it."""
    before = _state()
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = torch.backends.cudnn.benchmark = False
    for key in (*SET_BY_A_RUN, FOUND_KEY):
        monkeypatch.setenv(key, "")  # so that monkeypatch puts back what was there (or none)
        monkeypatch.delenv(key)
    Record.seen.clear()
    assert _state() == FRESH
    yield
    torch.use_deterministic_algorithms(before["deterministic"], warn_only=before["warn_only"])
    torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = before["benchmark"]


def _ufm(log: Path, *extra: str) -> list[str]:
    """A tiny UFM fit (4 classes, 5 steps per epoch, 2 epochs)."""
    return ["fit", "--config", "ufm_ce", "--trainer.logger.init_args.save_dir", str(log),
            "--trainer.max_epochs", "2", "--data.init_args.num_classes", "4",
            "--data.init_args.samples_per_class", "8", "--data.init_args.steps_per_epoch", "5",
            "--model.init_args.backbone.init_args.dim", "8", "--nc.enabled", "false",
            "--trainer.enable_progress_bar", "false", *extra]


@pytest.mark.parametrize("how, raised", [("error", RuntimeError), ("sigterm", SIGTERMException)])
def test_a_fit_ended_by_an_exception_gives_ctrl_c_back(tmp_path, how, raised):
    """Found by an audit: after a fit that ended with an error or an interrupt, Ctrl-C was
    still handled by that fit's InterruptCheckpoint (Lightning's teardown, which runs after
    ``on_exception``, put back the handlers it had found after ``on_fit_start``: ours). The
    handler set before the fit (the test's own here) is the one in place after it."""
    def mine(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with pytest.raises(raised):
            main(_ufm(tmp_path, "--trainer.callbacks+", "tests_in_process_callbacks.StopAt",
                      "--trainer.callbacks.how", how))
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


RECORD = ("--trainer.callbacks+", "tests_in_process_callbacks.Record")
DETERMINISTIC = ("--trainer.deterministic", "true", "--trainer.benchmark", "true",
                 "--seed_everything", "123")


@pytest.mark.parametrize("ends", ["returns", "raises"])
def test_a_run_gives_back_the_flags_and_variables_it_set(tmp_path, fresh_process, ends):
    """Found by an audit: ``--trainer.deterministic true`` (Lightning's Trainer sets
    ``torch.use_deterministic_algorithms``, ``cudnn.benchmark`` and ``CUBLAS_WORKSPACE_CONFIG``
    for the process) and ``seed_everything`` (``PL_GLOBAL_SEED``, ``PL_SEED_WORKERS``) stayed
    set after ``main`` returned or raised. The run has them (recorded at its start); after it,
    the process is as before."""
    stop = ("--trainer.callbacks+", "tests_in_process_callbacks.StopAt") if ends == "raises" \
        else ()
    if ends == "raises":
        with pytest.raises(RuntimeError, match="a bug in a callback"):
            main(_ufm(tmp_path, *DETERMINISTIC, *RECORD, *stop))
    else:
        main(_ufm(tmp_path, *DETERMINISTIC, *RECORD))
    during = Record.seen[0]
    assert during["deterministic"] and during["benchmark"]
    assert (during["CUBLAS_WORKSPACE_CONFIG"], during["PL_GLOBAL_SEED"],
            during["PL_SEED_WORKERS"]) == (":4096:8", "123", "1")
    assert _state() == FRESH


def test_a_later_run_gets_what_its_own_configuration_says(tmp_path, fresh_process):
    """After a deterministic, autotuned run with seed 123, a run whose configuration says
    nothing of them is neither, and ``seed_everything: true`` gives it the seed it has in a
    fresh process (Lightning: ``PL_GLOBAL_SEED``, else 0; here: the same run made first), not
    123 (before: deterministic and autotuned, seed 123)."""
    first = main(_ufm(tmp_path, "--seed_everything", "true", *RECORD)).config["fit"]
    main(_ufm(tmp_path, *DETERMINISTIC))
    later = main(_ufm(tmp_path, "--seed_everything", "true", *RECORD)).config["fit"]
    assert later["seed_everything"] == first["seed_everything"] != 123
    assert Record.seen[1] == Record.seen[0]
    assert not Record.seen[1]["deterministic"] and not Record.seen[1]["benchmark"]


def test_run_false_keeps_them_for_the_callers_fit(tmp_path, fresh_process):
    """``main(..., run=False)`` hands back a trainer to run: the flags its configuration set
    stay (the caller's ``trainer.fit`` would otherwise run without them)."""
    main(_ufm(tmp_path, *DETERMINISTIC)[1:], run=False)  # no subcommand
    state = _state()
    assert state["deterministic"] and state["benchmark"] and state["PL_GLOBAL_SEED"] == "123"
    assert state[FOUND_KEY] is None


def test_a_process_started_by_lightnings_launcher_gives_back_the_launchers(monkeypatch):
    """DDP without torchrun: Lightning's launcher starts the other processes during the run
    (its ``PL_GLOBAL_SEED`` set), as new runs of the script. A later run of that script must
    find in them what it finds in the launching process (there: given back, none), or the
    processes draw different seeds (seed_everything: true) and data shards."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("PL_GLOBAL_SEED", "123")
    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    launchers = {"CUBLAS_WORKSPACE_CONFIG": None, "PL_GLOBAL_SEED": None,
                 "PL_SEED_WORKERS": None}
    monkeypatch.setenv(FOUND_KEY, json.dumps(launchers))
    ProcessState.capture().restore()
    assert {key: os.environ.get(key) for key in launchers} == launchers
    assert FOUND_KEY not in os.environ  # given back: its later runs record their own
    monkeypatch.setenv(FOUND_KEY, json.dumps(launchers))
    monkeypatch.setenv("LOCAL_RANK", "0")  # the launching process itself: its own values
    os.environ["PL_GLOBAL_SEED"] = "7"
    state = ProcessState.capture()
    os.environ["PL_GLOBAL_SEED"] = "8"
    state.restore()
    assert os.environ["PL_GLOBAL_SEED"] == "7" and json.loads(os.environ[FOUND_KEY]) == launchers


TWO_DDP_RUNS = """
import json, os, sys
from lightning.pytorch import Callback
from hug_lightning.cli import main
from hug_lightning.data.loading import global_seed

class Rec(Callback):
    def __init__(self, tag: str = ""):
        self.tag = tag

    def on_fit_start(self, trainer, pl_module):
        with open(f"{sys.argv[1]}/{self.tag}-{trainer.global_rank}.json", "w") as f:
            json.dump([os.environ.get("PL_GLOBAL_SEED"), global_seed()], f)

sys.modules["rec"] = type(sys)("rec")
sys.modules["rec"].Rec = Rec
for tag, seed in (("A", "5"), ("B", "false"), ("C", "false"), ("D", "false")):
    if tag == "C":  # the script's own seed, set between runs: on every process alike
        os.environ["PL_GLOBAL_SEED"] = "42"
    main(["fit", "--config", "ufm_hug", "--trainer.logger.init_args.save_dir", sys.argv[1],
          "--trainer.max_epochs", "1", "--data.init_args.samples_per_class", "5",
          "--data.init_args.steps_per_epoch", "2", "--model.init_args.backbone.init_args.dim",
          "8", "--nc.enabled", "false", "--calibration.enabled", "false", "--trainer.devices",
          "2", "--trainer.strategy", "ddp", "--trainer.callbacks+", "rec.Rec",
          "--trainer.callbacks.tag", tag, "--seed_everything", seed])
"""


@pytest.mark.slow
def test_a_script_of_two_ddp_runs_gives_each_its_own_seed_on_every_process(tmp_path):
    """Lightning's launcher starts process 1 in run A, as a new run of the script, which then
    makes run B there too. Run B (``seed_everything: false``) has no ``PL_GLOBAL_SEED`` (the
    data seed of a fresh process, 0) on both processes: before, both had run A's 5; giving back
    each process's own found values gave process 1 run A's 5 and process 0 none (different
    data seeds, so overlapping shards). The script then sets ``PL_GLOBAL_SEED`` 42 itself,
    for runs C and D: both have it on both processes (before a review's fix, process 1 still
    held run A's hand-off, gave back none after C where process 0 gave back 42, and D had
    [None, 0] there)."""
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_DDP_RUNS)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in (*SET_BY_A_RUN, FOUND_KEY):  # a fresh script's
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert seen == {"A-0": ["5", 5], "A-1": ["5", 5], "B-0": [None, 0], "B-1": [None, 0],
                    "C-0": ["42", 42], "C-1": ["42", 42], "D-0": ["42", 42], "D-1": ["42", 42]}
