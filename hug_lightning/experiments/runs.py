"""One run of a grid, ``(entry, seed)``, and its folder ``<out>/<grid>/<entry>/seed<k>/``.

What the folder holds and the commands that fill it (``fit``, then ``test`` of the chosen
checkpoint); :mod:`.runner` executes them and decides what a rerun resumes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hug_lightning.experiments.callbacks import marker_callback_args
from hug_lightning.experiments.grid import Entry, Grid


@dataclass(frozen=True)
class Run:
    """One (entry, seed) of a grid and its folder ``<out>/<grid>/<entry>/seed<k>``."""

    grid: str
    entry: Entry
    seed: int
    root: Path

    @property
    def fit_dir(self) -> Path:
        return self.root / "fit"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def ckpt_dir(self) -> Path:
        return self.fit_dir / "checkpoints"

    @property
    def result_file(self) -> Path:
        return self.root / "result.json"

    @property
    def fit_file(self) -> Path:
        return self.root / "fit.json"

    @property
    def completed_file(self) -> Path:
        return self.root / "fit_completed.json"

    def logger_args(self, version: str) -> list[str]:
        """Put the TensorBoard folder at ``root/<version>``."""
        return ["--trainer.logger.init_args.save_dir", str(self.root.parent),
                "--trainer.logger.init_args.name", self.root.name,
                "--trainer.logger.init_args.version", version]

    def fit_command(self, extra: Sequence[str] = (), resume: Path | None = None) -> list[str]:
        """``python -m hug_lightning fit`` with the entry's configs, overrides, seed and folders."""
        cmd = [sys.executable, "-m", "hug_lightning", "fit"]
        for config in self.entry.configs:
            cmd += ["--config", str(config)]
        cmd += [*self.entry.args, *extra, "--seed_everything", str(self.seed),
                *self.logger_args("fit"), "--checkpoint.dirpath", str(self.ckpt_dir),
                *marker_callback_args(self.completed_file)]
        if resume is not None:
            cmd += ["--ckpt_path", str(resume)]
        return cmd

    def fit_config(self) -> Path:
        """The config the fit saved last: ``config.yaml``, or the newest
        ``config.resume-<n>.yaml`` of a resumed fit (its data paths may have changed)."""
        resumes = sorted(self.fit_dir.glob("config.resume-*.yaml"),
                         key=lambda p: int(p.stem.rsplit("-", 1)[-1]))
        return resumes[-1] if resumes else self.fit_dir / "config.yaml"

    def test_command(self, ckpt: str) -> list[str]:
        """``test`` with the fit's saved config (:meth:`fit_config`) and the chosen checkpoint."""
        return [sys.executable, "-m", "hug_lightning", "test",
                "--config", str(self.fit_config()), *self.entry.test_args,
                *self.logger_args("test"), "--ckpt_path", ckpt]

    @property
    def started_file(self) -> Path:
        """The command the fit was first started with (a resume may be given another)."""
        return self.root / "fit_started.json"


def grid_runs(grid: Grid, seeds: Sequence[int], out: Path) -> list[Run]:
    """All runs of a grid, entry by entry, seed by seed (a repeated seed once: its runs would
    share one folder)."""
    base = Path(out).resolve() / grid.name
    return [Run(grid.name, e, s, base / e.name / f"seed{s}")
            for e in grid.entries for s in dict.fromkeys(int(s) for s in seeds)]


__all__ = ["Run", "grid_runs"]
