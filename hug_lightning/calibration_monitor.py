"""CalibrationMonitor: the softmax temperature fitted on validation scores, ECE and NLL logged.

An ordinary Lightning callback (the CLI's ``calibration`` group, on by default), re-exported by
:mod:`hug_lightning.evaluation` (``hug_lightning.evaluation.CalibrationMonitor`` keeps working,
in Python and as a ``class_path``). The metrics themselves are the pure functions of
:mod:`hug_lightning.calibration`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning import calibration as cal

# reduced over processes by the monitor's own all-gather: global already
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\("
                        r"'(val|test)/(ece|ece_raw|nll|temperature)'")


class CalibrationMonitor(Callback):
    """Fit the softmax temperature on validation scores; log ECE and NLL at validation and test.

    Each validation epoch (not the sanity check) the scores and labels of every batch are kept
    on the CPU; under DDP they are gathered from all processes at the epoch end (padded
    ``all_gather``, exact for uneven shards), so every process fits the same ``T`` on the whole
    validation set (:func:`hug_lightning.calibration.fit_temperature`: deterministic and
    blind to the gather's row order: the single-process ``T`` of the same scores). Logged:
    ``val/temperature``, ``val/ece`` and ``val/nll`` (with that ``T``; optimistic, since ``T`` is
    fitted on the same data), ``val/ece_raw`` (``T = 1``); at test ``test/ece`` and ``test/nll``
    with the stored ``T``, ``test/ece_raw`` and ``test/temperature``. ``T`` is part of the
    callback's ``state_dict``, so it is saved in checkpoints and restored by ``test --ckpt_path``.
    Probabilities are ``softmax(scores / T)``; see ``hug_lightning.calibration``.

    Args:
        enabled: Turn the monitor on or off.
        fit_temperature: Fit ``T`` by minimizing the validation NLL (needed for HUG, whose
            cosine scores give nearly uniform probabilities at ``T = 1``; for cross-entropy it is
            post-hoc temperature scaling). ``False`` keeps ``temperature`` fixed.
        temperature: ``T`` used before any fit, or always when ``fit_temperature`` is false.
        n_bins: Number of equal-width confidence bins of the ECE.
        bounds: Search interval of the fitted ``T``.
    """

    def __init__(self, enabled: bool = True, fit_temperature: bool = True,
                 temperature: float = 1.0, n_bins: int = 15,
                 bounds: tuple[float, float] = (1e-3, 1e3)) -> None:
        super().__init__()
        if temperature <= 0 or n_bins < 1:
            raise ValueError("temperature and n_bins must be positive.")
        if not 0 < float(bounds[0]) < float(bounds[1]):
            raise ValueError(f"CalibrationMonitor: bounds must satisfy 0 < low < high (the "
                             f"search interval of T, e.g. [0.001, 1000]), got {bounds}.")
        self.enabled, self.fit_temperature = enabled, fit_temperature
        self.temperature, self.fitted = float(temperature), False
        #: "test" when T was fitted on a validation set that was the test split (val_split 0)
        self.fitted_on: str | None = None
        self._val_is_test = False
        self.n_bins, self.bounds = int(n_bins), (float(bounds[0]), float(bounds[1]))
        self._logits: list[Tensor] = []
        self._labels: list[Tensor] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        self._val_is_test = getattr(dm, "val_split", None) == 0
        if (self.enabled and self.fit_temperature and self._val_is_test
                and stage in ("fit", "validate")):
            rank_zero_warn("CalibrationMonitor: val_split is 0, so validation runs on the test "
                           "split and the temperature behind test/ece is fitted on the test "
                           "data. Set --data.init_args.val_split (e.g. 0.1) for a held-out "
                           "calibration split.")

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "fitted": self.fitted,
                "fitted_on": self.fitted_on}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.fit_temperature and state_dict.get("fitted", False):
            self.temperature, self.fitted = float(state_dict["temperature"]), True
            self.fitted_on = state_dict.get("fitted_on")

    # ------------------------------------------------------------------ collection
    def _reset(self, *_: Any) -> None:
        self._logits, self._labels = [], []

    def _collect(self, outputs: Any) -> None:
        if isinstance(outputs, dict) and "logits" in outputs and "labels" in outputs:
            self._logits.append(outputs["logits"].detach().float().cpu())
            self._labels.append(outputs["labels"].detach().long().cpu())

    @staticmethod
    def _gather(trainer: Trainer, pl_module: LightningModule, rows: Tensor) -> Tensor:
        """Concatenate ``rows`` of every process (uneven counts: pad, all_gather, trim)."""
        if trainer.world_size == 1:
            return rows
        device = pl_module.device
        sizes = pl_module.all_gather(torch.tensor(rows.shape[0], device=device)).view(-1)
        pad = torch.zeros((int(sizes.max()),) + tuple(rows.shape[1:]), dtype=rows.dtype,
                          device=device)
        pad[: rows.shape[0]] = rows.to(device)
        out = pl_module.all_gather(pad)
        return torch.cat([out[r, : int(n)] for r, n in enumerate(sizes)]).cpu()

    def _at_bound(self) -> bool:
        low, high = self.bounds
        return not low * 1.05 < self.temperature < high / 1.05

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Gather the epoch's scores, fit ``T`` (validation) and log ECE / NLL."""
        k = int(getattr(pl_module, "num_classes", 1))  # shape of an empty shard
        logits = torch.cat(self._logits) if self._logits else torch.zeros(0, k)
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long)
        self._reset()
        logits, labels = (self._gather(trainer, pl_module, t) for t in (logits, labels))
        if logits.shape[0] == 0:
            return
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        if stage == "val" and self.fit_temperature and bad:
            rank_zero_warn(f"CalibrationMonitor: {bad} of the {logits.shape[0]} validation "
                           "score rows are not finite (a diverged model?): the temperature is "
                           f"not fitted this epoch (kept at {self.temperature:.4g}), and this "
                           "epoch's ECE and NLL mean nothing.")
        elif stage == "val" and self.fit_temperature:
            self.temperature = cal.fit_temperature(logits, labels, self.bounds)
            self.fitted, self.fitted_on = True, "test" if self._val_is_test else "val"
            if self._at_bound():
                rank_zero_warn(
                    f"CalibrationMonitor: the fitted temperature {self.temperature:.4g} is at "
                    f"its search bound {self.bounds} ({logits.shape[0]} validation samples): "
                    "the validation scores carry no usable confidence (an untrained model, or "
                    "a tiny or perfectly separated validation set), so ECE/NLL with it mean "
                    "little.")
        elif stage == "test" and self.fit_temperature and not self.fitted:
            rank_zero_warn("CalibrationMonitor: no fitted temperature (no validation epoch ran "
                           f"and the checkpoint holds none); test/ece uses T = {self.temperature}.")
        elif stage == "test" and self.fitted_on == "test":
            rank_zero_warn("CalibrationMonitor: this temperature was fitted on the test split "
                           "(the run had val_split 0): test/ece and test/nll are optimistic.")
        if stage == "test" and self.fitted and self._at_bound():
            rank_zero_warn(f"CalibrationMonitor: the temperature {self.temperature:.4g} behind "
                           f"test/ece and test/nll is at its search bound {self.bounds}: the "
                           "validation scores it was fitted on carried no usable confidence, "
                           "so these values mean little.")
        t = self.temperature
        for name, value in (
            ("ece", cal.expected_calibration_error(logits, labels, t, self.n_bins)),
            ("ece_raw", cal.expected_calibration_error(logits, labels, 1.0, self.n_bins)),
            ("nll", cal.negative_log_likelihood(logits, labels, t)),
            ("temperature", t),
        ):
            pl_module.log(f"{stage}/{name}", float(value), sync_dist=False)

    # ------------------------------------------------------------------ hooks
    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                                dataloader_idx: int = 0) -> None:
        if self.enabled and not trainer.sanity_checking:
            self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                          dataloader_idx: int = 0) -> None:
        if self.enabled:
            self._collect(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled:
            self._finish(trainer, pl_module, "test")


__all__ = ["CalibrationMonitor"]
