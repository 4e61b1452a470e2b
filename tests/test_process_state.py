"""ProcessState across the runs of one script, in the launching process and in the processes
Lightning's launcher starts (:mod:`hug_lightning.process_state`).

The launcher starts DDP processes as new runs of the same script, with the environment of the
moment (the launching run's ``PL_GLOBAL_SEED``) and :data:`FOUND_KEY`. Every statement of the
script then runs in both; what a run gives back must be the same in both, or a later run draws
different seeds (``seed_everything: true``) or data orders (:func:`global_seed`) per process.
These tests play one script's timeline in the launching process and in a started one (the
environment as the launcher passes it) and compare the two: the reference is the launching
process, which has no hand-off.
"""

from __future__ import annotations

import os

import pytest

from hug_lightning.cli import main
from hug_lightning.process_state import ENV_KEYS, FOUND_KEY, ProcessState


@pytest.fixture
def clean_env(monkeypatch):
    """No run's variables, no hand-off, not a started process (monkeypatch puts them back)."""
    for key in (*ENV_KEYS, FOUND_KEY, "LOCAL_RANK"):
        monkeypatch.setenv(key, "")  # recorded: whatever the test sets is undone after it
        monkeypatch.delenv(key)
    return monkeypatch


def _env() -> dict:
    return {key: os.environ.get(key) for key in ENV_KEYS}


def _script(started: dict | None, run_false: bool = False) -> list[dict]:
    """One script: run A (DDP, seed 5: the launcher starts the others during it), then the
    script's own ``PL_GLOBAL_SEED = 42`` (or a ``run=False`` call seeding 9, kept for the
    caller's fit), then runs B and C that set nothing. ``started``: None plays the launching
    process, else the environment the launcher passes to a started process. Returns the
    variables after each run."""
    launcher_env = None
    if started is not None:
        for key, value in started.items():
            os.environ[key] = value
    after = []
    with ProcessState.given_back():  # run A
        os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"] = "5", "1"
        if started is None:  # Lightning's launcher: os.environ.copy() with LOCAL_RANK 1
            launcher_env = {**os.environ, "LOCAL_RANK": "1"}
            os.environ["LOCAL_RANK"] = "0"  # as the launcher sets it in its own process
    after.append(_env())
    if run_false:
        with ProcessState.given_back(unless_returned=True):
            os.environ["PL_GLOBAL_SEED"] = "9"
    else:
        os.environ["PL_GLOBAL_SEED"] = "42"
    for _ in "BC":
        with ProcessState.given_back():
            pass
        after.append(_env())
    _script.launcher_env = launcher_env
    return after


@pytest.mark.parametrize("run_false", [False, True])
def test_a_started_process_gives_back_what_the_launching_one_does(clean_env, run_false):
    """Found by a review: a started process kept :data:`FOUND_KEY` (the values at the
    launching run's start) for all its runs, so once the script changed ``PL_GLOBAL_SEED``
    after that run (42, or 9 from a ``run=False`` call) its later runs gave back none where
    the launching process gave back the new value: run C then had seed 42 on process 0 and
    none on process 1 (before the fix: [.., {42}, {42}] vs [.., {None}, {None}])."""
    launching = _script(None, run_false)
    started_env = {key: value for key, value in _script.launcher_env.items()
                   if key in (*ENV_KEYS, FOUND_KEY, "LOCAL_RANK")}
    for key in (*ENV_KEYS, FOUND_KEY, "LOCAL_RANK"):
        clean_env.delenv(key, raising=False)
    started = _script(started_env, run_false)
    seed = "9" if run_false else "42"
    assert [each["PL_GLOBAL_SEED"] for each in launching] == [None, seed, seed]
    assert started == launching
    assert FOUND_KEY not in os.environ


def test_a_run_false_first_call_keeps_the_hand_off_for_the_next(clean_env):
    """A started process whose first call is ``run=False`` (nothing given back yet) keeps
    :data:`FOUND_KEY`: its next run gives back the launching process's values."""
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("PL_GLOBAL_SEED", "5")
    clean_env.setenv(FOUND_KEY, '{"PL_GLOBAL_SEED": "3"}')
    with ProcessState.given_back(unless_returned=True):
        pass
    assert os.environ[FOUND_KEY] == '{"PL_GLOBAL_SEED": "3"}'
    with ProcessState.given_back():
        pass
    assert os.environ.get("PL_GLOBAL_SEED") == "3" and FOUND_KEY not in os.environ


@pytest.mark.parametrize("argv", [["fit", "--help"], ["fit", "--no-such-option", "1"]])
def test_help_and_parse_errors_give_back_and_still_exit(clean_env, capsys, argv):
    """jsonargparse's ``--help`` and argument errors end ``main`` with SystemExit: it reaches
    the caller (not swallowed) and the process's variables are as before."""
    clean_env.setenv("PL_GLOBAL_SEED", "77")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--config", "ufm_ce"])
    assert exit_info.value.code == (0 if "--help" in argv else 2)
    assert _env() == {"CUBLAS_WORKSPACE_CONFIG": None, "PL_GLOBAL_SEED": "77",
                      "PL_SEED_WORKERS": None}
    assert FOUND_KEY not in os.environ
    capsys.readouterr()
