"""Every option, config key, metric and path README.md names exists in the code.

The options are read from the README itself (its inline code and ``bash`` blocks), so a flag
renamed in the code, or a new README sentence naming one that does not exist, fails here. Each
``hug-lightning`` option is parsed by the parser of its subcommand (``--print_config``, which
parses without instantiating anything) on top of ``configs/cifar10_hug.yaml``, whose classes
(``ClassifierModule`` with a HUG head, ``CIFAR10DataModule``) own the ``--model.init_args.*`` and
``--data.init_args.*`` options the README names; the printed value must be the one given.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shlex

import pytest
import yaml

from conftest import REPO
from hug_lightning.cli import main
from hug_lightning.experiments.cli import _parser as experiments_parser
from hug_lightning.heads import HUGHead
from hug_lightning.metrics import METRIC_NAMES

README = (REPO / "README.md").read_text()
BASE = ["--config", str(REPO / "configs" / "cifar10_hug.yaml")]
SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: flags the README names without a value, or with a placeholder (N, k, G, <same>): one to parse
VALUES = {
    "--ckpt_path": "last", "--config": "cifar10_hug", "--data.init_args.root": "/data/cifar10",
    "--robust.pgd_steps": "5", "--robust.max_batches": "2", "--trainer.max_steps": "100",
    "--trainer.num_nodes": "2", "--trainer.devices": "2", "--last.every_n_train_steps": "100",
    "--trainer.accumulate_grad_batches": "2", "--checkpoint.dirpath": "checkpoints",
    "--init.path": "last.ckpt", "--init.skip": "[head]",
    "--layer_nc.metrics": "[nc1_pinv, nc1_cdnv]", "--layer_nc.buffer_batches": "8",
    "--nc.eval_pass_every": "2", "--trainer.limit_train_batches": "5",
    "--checkpoint.*": None,  # a wildcard: one option of the group stands for it
    "--trainer.callbacks": "lightning.pytorch.callbacks.LearningRateMonitor",
    "--model.init_args.optimizer": '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}',
    # the README's example head lives in the user's package: a shipped head stands in for it
    "--model.init_args.head.class_path": "hug_lightning.heads.CrossEntropyHead",
}
PLACEHOLDERS = {"N", "k", "G", "...", "<same>", "0/1"}
#: options of other programs, named in the same sentences; checked against those programs below
EXPERIMENTS = {"--extra", "--dry-run", "--seeds"}
TORCHRUN = {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
            "--rdzv-*", "--node-rank", "--master-addr", "--master-port"}
NOT_OURS = {"--logdir": "tensorboard", "--requeue": "sbatch", "--signal": "sbatch",
            "--key": "a placeholder (`--key value`)"}
#: what the README says the command does NOT have
ABSENT = {"--optimizer"}


def _spans() -> list[str]:
    """Inline code (across line breaks) and the lines of ``bash`` blocks, whitespace joined."""
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("  #")[0] for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    spans = [" ".join(s.split()) for s in [*inline, *lines]]
    spans = [re.sub(r"^\$\{\w+:\+(.*)\}$", r"\1", s) for s in spans]  # ${VAR:+--flag value}
    # `key.path: value` (a YAML key in the text) is the flag --key.path value
    return [f"--{m[1]} {m[2]}" if (m := re.match(r"^([a-z_]+(?:\.\w+)+): (\S+)$", s)) else s
            for s in spans]


def _hug_commands() -> list[tuple[str, list[str]]]:
    """(subcommand, arguments) of every README span that holds ``hug-lightning`` options."""
    commands = []
    for span in _spans():
        if span.startswith(("#SBATCH", ".venv/bin/tensorboard", "python3 -m venv")) or \
                "--" not in span or span.startswith(("bench/", "python bench/", "python -c")):
            continue
        tokens = shlex.split(span)
        if "hug_lightning" in tokens:  # torchrun ... -m hug_lightning fit ...
            tokens = tokens[tokens.index("hug_lightning") + 1:]
        if tokens[:3] == ["python", "-m", "hug_lightning.experiments"]:
            tokens = tokens[tokens.index("--extra") + 1:] if "--extra" in tokens else []
        if tokens[:1] == ["--extra"]:
            tokens = tokens[1:]
        tokens = tokens[1:] if tokens[:1] == ["hug-lightning"] else tokens
        sub = tokens.pop(0) if tokens[:1] and tokens[0] in SUBCOMMANDS else "fit"
        tokens = tokens[1:] if tokens[:1] == ["..."] else tokens  # `fit ... --flag value`
        if any(t.startswith("--robust.") or t == "best" for t in tokens):
            sub = "test" if sub == "fit" else sub  # test-time options; `best` is evaluation's
        if tokens[:1] == ["fit|validate|test|predict"] or "--help" in tokens or \
                any(t.endswith(".help") for t in tokens):
            continue  # the help texts: test_help_commands_run
        if not any(t.startswith("--") for t in tokens) or \
                any(t in EXPERIMENTS | TORCHRUN | set(NOT_OURS) | ABSENT for t in tokens):
            continue
        commands.append((sub, tokens))
    return commands


def _expand(tokens: list[str]) -> list[list[str]]:
    """Fill placeholders; ``last|best`` gives one argument list per alternative."""
    out: list[list[str]] = [[]]
    i = 0
    while i < len(tokens):
        flag, i = tokens[i], i + 1
        values = []
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(tokens[i])
            i += 1
        if flag in VALUES and VALUES[flag] is None:  # `--checkpoint.*`
            flag, values = "--checkpoint.monitor", ["val/loss"]
        elif flag in VALUES and (not values or set(values) & PLACEHOLDERS or
                                 flag == "--model.init_args.head.class_path"):
            values = [VALUES[flag]]
        if flag == "--config" and values and values[0].startswith("logs/"):
            values = [f"configs/{values[0].split('/')[1]}.yaml"]  # what that run saved
        if flag == "--config" and values and values[0].startswith("configs/"):
            values = [str(REPO / values[0])]
        alternatives = values[0].split("|") if len(values) == 1 and "|" in values[0] else [None]
        out = [[*done, flag, *([alt] if alt else values)] for done in out for alt in alternatives]
    return out


def _print_config(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exited:
        main([*args, "--print_config"])
    return exited.value.code, out.getvalue(), err.getvalue()


CASES = list(dict.fromkeys((sub, tuple(args)) for sub, tokens in _hug_commands()
                           for args in _expand(tokens)))


def test_the_readme_names_enough_options():
    flags = {a for _, args in CASES for a in args if a.startswith("--")}
    assert len(flags) >= 30, sorted(flags)  # the extraction still finds the README's options
    assert {"--nc.eval_pass", "--model.init_args.compile_options", "--last.every_n_train_steps",
            "--data.init_args.device_resident", "--trainer.callbacks+"} <= flags


@pytest.mark.parametrize("sub,args", CASES, ids=[" ".join([s, *a])[:80] for s, a in CASES])
def test_readme_option_is_accepted(sub, args):
    args = list(args)
    code, out, err = _print_config([sub, *BASE, *args])
    assert code == 0, f"hug-lightning {sub} rejects the README's {' '.join(args)}:\n{err[-2000:]}"
    printed = yaml.safe_load(out)
    for flag, value in zip(args, args[1:]):
        if not flag.startswith("--") or flag in ("--config", "--ckpt_path") or \
                value.startswith("--") or "+" in flag:
            continue
        node = printed
        for key in flag[2:].split("."):
            node = node[key] if isinstance(node, dict) else None  # a list: callbacks, plugins
        expected = yaml.safe_load(value)
        if node is not None and not isinstance(node, dict):  # class paths: the parse checked
            assert node == expected or str(node) == str(expected), (flag, node, expected)


def test_absent_options_are_rejected():
    for flag in ABSENT:
        code, _, err = _print_config(["fit", *BASE, flag, "torch.optim.SGD"])
        assert code == 2 and flag in err


def test_help_commands_run():
    for args, shown in ((["fit", "--help"], "--nc.eval_pass"),
                        (["fit", "--model.help", "hug_lightning.module.ClassifierModule"],
                         "--model.compile_options")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 0 and shown in out.getvalue(), args


def _other_flags(names: set[str]) -> set[str]:
    found = set()
    for span in _spans():
        for token in shlex.split(span.replace("${", "").replace("}", "")):
            flag = token.split("=")[0]
            if flag in names or flag.startswith("--rdzv-") and "--rdzv-*" in names:
                found.add(flag)
    return found


def test_other_programs_options_exist():
    run = experiments_parser().parse_args(["run", "paper_cifar10", "--seeds", "0", "1", "--dry-run",
                                           "--extra", "--robust.enabled", "true"])
    assert run.seeds == [0, 1] and run.dry_run and run.extra == ["--robust.enabled", "true"]
    assert _other_flags(EXPERIMENTS) == EXPERIMENTS
    from torch.distributed.run import get_args_parser
    known = {s for a in get_args_parser()._actions for s in a.option_strings}
    for flag in _other_flags(TORCHRUN) - {"--rdzv-*"}:
        assert flag in known or flag.replace("-", "_") in known, f"torchrun has no {flag}"
    for script, flag in re.findall(r"`(?:python )?(bench/\w+\.py) [^`]*?(--[\w-]+)", README):
        assert f'add_argument("{flag}"' in (REPO / script).read_text(), (script, flag)


def test_yaml_blocks_parse(tmp_path):
    """A ```yaml block in the README is a config fragment: it parses on top of cifar10_hug."""
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", README, flags=re.S)):
        path = tmp_path / f"readme_block_{i}.yaml"
        path.write_text(block)
        code, _, err = _print_config(["fit", *BASE, "--config", str(path)])
        assert code == 0, f"README yaml block {i}:\n{block}\n{err[-2000:]}"


def test_hug_head_options_are_its_arguments():
    options = re.split(r"Gradient\s+accumulation", README.split("Options (all in `--help`)")[1])[0]
    named = set(re.findall(r"`([a-z_]+)`", options)) - {"hard", "soft", "class_balanced",
                                                          "per_sample"}
    assert len(named) >= 10, named
    assert named <= set(inspect.signature(HUGHead).parameters), \
        named - set(inspect.signature(HUGHead).parameters)


def test_metric_names_exist():
    named = set(re.findall(r"`(?:nc/\w+/)?((?:g?nc\d|ncc)_\w+)`", README))
    named |= {n for group in re.findall(r"--nc\.metrics '\[([^\]]*)\]'", README.replace("\n", " "))
              for n in re.split(r",\s*", group)} - {"default"}
    assert len(named) >= 6, named
    assert named <= set(METRIC_NAMES), named - set(METRIC_NAMES)


def test_named_paths_exist():
    paths = set(re.findall(r"(?<![\w/.])((?:configs|hug_lightning|bench|notebooks|tests|\.ci)"
                           r"/[\w./*-]*\w)", README))
    assert len(paths) >= 15, paths
    missing = [p for p in sorted(paths) if not list(REPO.glob(p))]
    assert not missing, f"README names paths that do not exist: {missing}"



def _resolve(dotted: str) -> object:
    """The object a dotted ``hug_lightning.module.Class.attr`` name names (longest module)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_named_python_objects_exist():
    """``hug_lightning.x.Y`` names, ``ClassifierModule.attr`` and the hooks the README lists."""
    # installed from configs/ by pyproject.toml's package-dir (not a folder of the source tree)
    dotted = set(re.findall(r"\bhug_lightning(?:\.[A-Za-z_]\w*)+", README)) - {
        "hug_lightning.configs"}
    assert '"hug_lightning.configs" = "configs"' in (REPO / "pyproject.toml").read_text()
    dotted |= {f"hug_lightning.module.{m}" for m in re.findall(r"`(ClassifierModule\.\w+)", README)}
    hooks = re.search(r"overrides\s+one\s+hook\s+of\s+`ClassifierModule`\s+\((.*?);", README,
                      flags=re.S)[1]
    dotted |= {f"hug_lightning.module.ClassifierModule.{h}"
               for h in re.findall(r"`(\w+)`", hooks)}
    assert len(dotted) >= 15, dotted
    for name in sorted(dotted):
        _resolve(name)  # raises, naming what is missing


def test_named_config_keys_exist():
    """Keys the README names in running text (`data.init_args.batch_size`) are in the config."""
    keys = set(re.findall(r"`((?:trainer|model|data|logger)(?:\.\w+)+)`", README))
    keys.discard("trainer.callback_metrics")  # the Trainer's attribute, named as such
    assert len(keys) >= 5, keys
    # the num_classes link's target is left out of printed configs, but a given one parses
    keys.discard(linked := "model.init_args.num_classes")
    assert _print_config(["fit", *BASE, f"--{linked}", "10"])[0] == 0
    code, out, _ = _print_config(["fit", *BASE])
    printed = yaml.safe_load(out)
    for key in sorted(keys):
        node = printed["trainer"] if key.startswith("logger.") else printed
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"README names {key}: no {part!r}"
            node = node[part]
