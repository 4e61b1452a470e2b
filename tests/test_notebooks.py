"""The notebooks run end to end at tiny size (``HUG_NOTEBOOK_FAST=1``) and are saved clean."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# notebook 05 reads real CIFAR-10 images (as test_real_data.py does)
TARBALL = Path(os.environ.get("HUG_CIFAR10_JPG",
                              REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))


@pytest.fixture(scope="module")
def python3_kernel(tmp_path_factory) -> Path:
    """A ``python3`` kernel spec that starts this interpreter (not whatever ``python`` is)."""
    from ipykernel.kernelspec import write_kernel_spec

    jupyter_path = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(jupyter_path / "kernels" / "python3")
    return jupyter_path


def test_five_notebooks_saved_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_compare_runs.ipynb",
                                            "03_extend.ipynb", "04_transfer_and_features.ipynb",
                                            "05_layerwise_collapse.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name
        assert any(c.cell_type == "markdown" for c in nb.cells)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, python3_kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(python3_kernel))
    monkeypatch.setenv("HUG_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("HUG_NOTEBOOK_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    monkeypatch.delenv("RUNS_DIR", raising=False)
    if path.stem.startswith("05"):  # real CIFAR-10 images: a subset of the JPEG tarball
        if not TARBALL.is_file():
            pytest.skip(f"real CIFAR-10 tarball not found at {TARBALL} (set HUG_CIFAR10_JPG)")
        monkeypatch.setenv("HUG_CIFAR10_JPG", str(TARBALL))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*")), "no run was logged"
    if path.stem.startswith("02"):  # it compared two runs it trained itself
        assert {p.parent.parent.name for p in (tmp_path / "logs").rglob("events.*")} == {
            "ufm_ce", "ufm_hug"}
    if path.stem.startswith("04"):  # predicted the features of the three HUG fits it trained
        import torch

        saved = [torch.load(p, weights_only=True) for p in (tmp_path / "logs").rglob(
            "predictions.pt")]
        assert len(saved) == 3
        assert all(s["features"].shape == (100, 32) and s["features"].dtype == torch.float32
                   for s in saved)  # FAST: 10 classes x 10 samples, d = 32
    if path.stem.startswith("05"):  # every hooked layer logged once per epoch, both stages
        from hug_lightning.experiments import read_scalars

        for head, layers in (("ce", 3), ("hug", 4)):  # FAST: 3 blocks; HUG adds its embedding
            (run,) = (tmp_path / "logs" / f"layers_{head}").iterdir()
            scalars = read_scalars(run)
            tags = [t for t in scalars if t.startswith("nc_layers/")]
            per_stage = {stage: sum(t.split("/")[1] == stage for t in tags)
                         for stage in ("train_eval", "val")}  # the eval pass and the test images
            assert per_stage == {"train_eval": layers * 3, "val": layers * 3}, (head, tags)
            assert len(tags) == layers * 2 * 3, (head, tags)  # no other stage (train: not logged)
            assert all(len(scalars[t]) == 2 for t in tags)  # FAST: 2 epochs
            assert len(scalars["nc/train_eval/nc1_pinv"]) == 2  # the NC monitor's eval pass ran
