"""The README stays true: its extension example runs, its commands name real files."""

from __future__ import annotations

import re
import sys
import types

from conftest import REPO
from hug_lightning.cli import main

README = (REPO / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_extension_example_trains_through_the_cli(tmp_path):
    module = types.ModuleType("readme_example")
    exec(compile(_python_blocks()[0], "README.md", "exec"), module.__dict__)  # noqa: S102
    sys.modules["readme_example"] = module
    try:
        cli = main(["fit", "--config", str(REPO / "configs" / "ufm_hug.yaml"),
                    "--model.init_args.head", '{"class_path": "readme_example.NormFaceHead"}',
                    "--model.init_args.backbone.init_args.dim", "16",
                    "--trainer.max_epochs", "10", "--nc.enabled", "false",
                    "--trainer.logger.init_args.save_dir", str(tmp_path)])
    finally:
        del sys.modules["readme_example"]
    assert type(cli.model.head).__name__ == "NormFaceHead"
    assert float(cli.trainer.callback_metrics["train/acc"]) == 1.0


def test_commands_name_existing_configs():
    for name in set(re.findall(r"configs/([\w]+)\.yaml", README)):
        assert (REPO / "configs" / f"{name}.yaml").is_file(), name
    quickstart = README.split("## Quickstart")[1].split("## ")[0]
    commands = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
    assert len(commands) == 2  # one runs the main job, one installs and runs the tests
    assert "pytest" in commands[1] and ".[dev]" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert "pytest" in ci and '".[dev]"' in ci
