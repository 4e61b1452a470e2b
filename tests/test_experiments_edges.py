"""The grid runner's edges: bad grid files, seeds, which folders make the table, children."""

from __future__ import annotations

import pytest
import yaml

from hug_lightning.experiments import main


@pytest.mark.parametrize("text, message", [
    (None, "No grid file"),
    ("entries: [\n", "not valid YAML"),
    ("seeds: 3\nentries: [{name: a, configs: [ufm_ce.yaml]}]\n", "seeds must be a list"),
    ("seeds: [0, 0.5]\nentries: [{name: a, configs: [ufm_ce.yaml]}]\n", "seeds must be a list"),
    ("entries: [{name: a, configs: 5}]\n", "configs must be a file name or a list"),
    ("common: [ufm_ce.yaml]\nentries: [{name: a, configs: [ufm_ce.yaml]}]\n",
     "`common` must be a mapping"),
    ("entries: [{name: a, configs: [ufm_ce.yaml], args: 5}]\n", "must be a mapping or a list"),
])
@pytest.mark.parametrize("command", ["run", "table"])
def test_bad_grid_is_one_line_not_a_traceback(text, message, command, tmp_path, capsys):
    path = tmp_path / "g.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main([command, str(path), "--out", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("grid_seeds, argv", [([0, 0, 1], []), ([5], ["--seeds", "1", "0", "1"])])
def test_a_repeated_seed_is_one_run(grid_seeds, argv, tmp_path, capsys):
    """Two runs of one seed share its folder: with --jobs 2 both fits wrote into it at once."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"seeds": grid_seeds, "entries": [
        {"name": "a", "configs": ["ufm_ce.yaml"]}]}))
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path), *argv]) == 0
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# ")]
    assert heads == [f"# g / a / seed {s} (new)" for s in ([0, 1] if not argv else [1, 0])]
