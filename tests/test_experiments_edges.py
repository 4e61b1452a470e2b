"""The grid runner's edges: bad grid files, seeds, which folders make the table, children."""

from __future__ import annotations

import pytest

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
