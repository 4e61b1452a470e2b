"""ECE / temperature fitting (hug_lightning.calibration) and the CalibrationMonitor callback."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from _ddp_helpers import start_workers
from conftest import tiny_args
from hug_lightning.calibration import (expected_calibration_error, fit_temperature,
                                       negative_log_likelihood, probabilities)
from hug_lightning.cli import main
from hug_lightning.evaluation import CalibrationMonitor
from hug_lightning.robustness import CorrectCounts



def synthetic(n: int, k: int = 10, scale: float = 3.0, seed: int = 0):
    """Scores ``z`` and labels drawn from ``softmax(z)``: ``softmax(z)`` is calibrated."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z, y


def manual_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Textbook top-label ECE with equal-width bins (lower edge exclusive, as in Guo et al.)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.double().mean() * (correct[mask].mean() - conf[mask].double().mean()).abs()
    return float(total)


# --------------------------------------------------------------------------- pure functions
def test_ece_of_hand_computed_example():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]]))
    labels = torch.tensor([0, 1, 1, 1])  # bin 0.9: acc 1/2; bin 0.7: acc 1
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.7)
    assert expected_calibration_error(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert probabilities(logits, 2.0)[0, 0].item() == pytest.approx(0.75, abs=1e-6)  # 3:1


def test_ece_matches_textbook_definition_on_cosines():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(500, 5, generator=g)  # non-negative cosines: must not be taken as probs
    labels = torch.randint(0, 5, (500,), generator=g)
    for t in (0.05, 1.0):
        got = expected_calibration_error(cos, labels, temperature=t).item()
        assert got == pytest.approx(manual_ece(torch.softmax(cos / t, -1), labels), abs=1e-5)


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    z, y = synthetic(200_000)
    assert expected_calibration_error(z, y).item() < 0.01
    assert expected_calibration_error(4 * z, y).item() > 0.15  # over-confident
    assert expected_calibration_error(z / 4, y).item() > 0.15  # under-confident


@pytest.mark.parametrize("t_true", [0.07, 1.0, 3.0])
def test_fit_temperature_recovers_known_temperature(t_true):
    z, y = synthetic(50_000)
    logits = (t_true * z).float()  # softmax(logits / t_true) = softmax(z): calibrated at t_true
    t = fit_temperature(logits, y)
    assert t == pytest.approx(t_true, rel=0.03)
    nll = negative_log_likelihood(logits, y, t).item()
    for other in (t_true, 0.9 * t, 1.1 * t):  # a minimum of the NLL
        assert nll <= negative_log_likelihood(logits, y, other).item() + 1e-6
    assert fit_temperature(logits, y) == t  # deterministic


def test_fit_temperature_does_not_depend_on_the_order_of_the_samples():
    """Under DDP the monitor gathers rank 0's shard, then rank 1's: another order of the same
    rows than one process's. The NLL summed in that order moved the golden-section search on a
    flat NLL (nearly uniform scores, as HUG's cosines or an untrained model give): the fitted T
    differed in the 6th digit (measured: 4.686451 vs 4.686445 in a 2-process UFM fit)."""
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        z = 0.05 * torch.randn(300, 10, generator=g)
        y = torch.randint(0, 10, (300,), generator=g)
        gathered = torch.cat([torch.arange(0, 300, 2), torch.arange(1, 300, 2)])
        assert fit_temperature(z[gathered], y[gathered]) == fit_temperature(z, y), seed
        shuffled = torch.randperm(300, generator=g)
        assert fit_temperature(z[shuffled], y[shuffled]) == fit_temperature(z, y), seed


def test_fit_temperature_separable_hits_lower_bound():
    logits = torch.eye(4).repeat(10, 1)  # every prediction right with a margin: NLL -> 0 at T -> 0
    labels = torch.arange(4).repeat(10)
    assert fit_temperature(logits, labels, bounds=(0.01, 10.0)) == pytest.approx(0.01, rel=1e-5)


# --------------------------------------------------------------------------- callback state
def test_state_dict_round_trip_and_fixed_temperature():
    cb = CalibrationMonitor()
    cb.temperature, cb.fitted = 0.0625, True
    fresh = CalibrationMonitor()
    fresh.load_state_dict(cb.state_dict())
    assert fresh.temperature == 0.0625 and fresh.fitted
    fixed = CalibrationMonitor(fit_temperature=False, temperature=0.1)
    fixed.load_state_dict(cb.state_dict())  # a fixed T is not replaced by a checkpoint's
    assert fixed.temperature == 0.1


def test_cli_fitted_temperature_is_checkpointed_and_used_at_test(cifar10_tv_root, no_checksum,
                                                                 tmp_path):
    cli = main(["fit", *tiny_args(cifar10_tv_root, tmp_path, config="cifar10_hug")])
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    t_val = val["val/temperature"]
    assert 0.005 < t_val < 1.0  # cosine scores need a small T
    ckpt = next((tmp_path / "cifar10_hug").glob("version_*/checkpoints/last.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]["CalibrationMonitor"]
    assert state["fitted"] and state["temperature"] == pytest.approx(t_val, rel=1e-6)

    cli = main(["test", *tiny_args(cifar10_tv_root, tmp_path, config="cifar10_hug"),
                "--ckpt_path", str(ckpt)])  # the `calibration` group is on by default
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert m["test/temperature"] == pytest.approx(t_val, rel=1e-6)
    model, dm = cli.model.eval(), cli.datamodule  # recompute on the 2 test batches (debug.yaml)
    logits, labels = [], []
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.test_dataloader()):
            if i == 2:
                break
            logits.append(model(x))
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert m["test/ece"] == pytest.approx(expected_calibration_error(logits, labels, t_val).item(),
                                          abs=1e-5)
    assert m["test/ece_raw"] == pytest.approx(expected_calibration_error(logits, labels).item(),
                                              abs=1e-5)
    assert m["test/nll"] == pytest.approx(
        negative_log_likelihood(logits, labels, t_val).item(), rel=1e-4)


# --------------------------------------------------------------------------- DDP (gloo, 2 ranks)
class _Stub:
    """What the callbacks use of the trainer and the module under DDP."""

    world_size = 2
    device = torch.device("cpu")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    z, y = synthetic(301, k=5)
    cut = 200  # uneven shards, as ShardedEvalSampler gives
    part = slice(0, cut) if rank == 0 else slice(cut, None)
    logits = CalibrationMonitor._gather(_Stub(), _Stub(), z[part].float())
    labels = CalibrationMonitor._gather(_Stub(), _Stub(), y[part])
    counts = CorrectCounts(2)
    counts.update(torch.tensor([rank + 1, 2 * rank]), 10 + rank)
    torch.save({"logits": logits, "labels": labels, "acc": counts.compute(),
                "t": fit_temperature(logits, labels)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gather_and_counts_match_single_process(tmp_path):
    start_workers(_ddp_worker, (str(tmp_path / "init"), str(tmp_path)))
    z, y = synthetic(301, k=5)
    t_single = fit_temperature(z.float(), y)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(res["logits"], z.float()) and torch.equal(res["labels"], y)
        assert res["t"] == t_single  # every rank fits the same T on the whole set
        assert torch.allclose(res["acc"], torch.tensor([3 / 21, 2 / 21], dtype=torch.float64))
    assert not math.isnan(t_single)


def test_warns_when_the_temperature_would_be_fitted_on_the_test_split():
    from types import SimpleNamespace

    from hug_lightning.evaluation import CalibrationMonitor
    with pytest.warns(UserWarning, match="fitted on the test data"):
        CalibrationMonitor().setup(SimpleNamespace(datamodule=SimpleNamespace(val_split=0)),
                                   None, "fit")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CalibrationMonitor().setup(SimpleNamespace(datamodule=SimpleNamespace(val_split=0.1)),
                                   None, "fit")


def _finish(cb, stage, logits, labels):
    """Run the monitor's epoch end on one process (a stand-in trainer and module)."""
    from types import SimpleNamespace
    logged = {}
    module = SimpleNamespace(num_classes=logits.shape[1], device=torch.device("cpu"),
                             log=lambda k, v, **_: logged.__setitem__(k, v))
    cb._logits, cb._labels = [logits], [labels]
    cb._finish(SimpleNamespace(world_size=1), module, stage)
    return logged


def test_test_time_warning_follows_where_the_temperature_was_fitted():
    """It followed the test run's val_split: silent for a T fitted on the test split in an
    earlier run (val_split 0 there), a false alarm for a held-out T evaluated with val_split 0."""
    import warnings
    from types import SimpleNamespace

    from hug_lightning.evaluation import CalibrationMonitor
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 5, generator=g), torch.randint(0, 5, (200,), generator=g)
    for val_split, fitted_on in ((0, "test"), (0.1, "val")):
        fit = CalibrationMonitor()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit.setup(SimpleNamespace(datamodule=SimpleNamespace(val_split=val_split)), None, "fit")
        _finish(fit, "val", logits, labels)
        assert fit.state_dict()["fitted_on"] == fitted_on
        test = CalibrationMonitor()
        test.load_state_dict(fit.state_dict())
        other = 0.1 if val_split == 0 else 0  # the test run's own setting must not matter
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            test.setup(SimpleNamespace(datamodule=SimpleNamespace(val_split=other)), None, "test")
            _finish(test, "test", logits, labels)
        optimistic = [w for w in caught if "fitted on the test split" in str(w.message)]
        assert len(optimistic) == (fitted_on == "test")
        assert not [w for w in caught if "fitted on the test data" in str(w.message)]


def test_temperature_at_its_search_bound_is_reported():
    from hug_lightning.evaluation import CalibrationMonitor
    labels = torch.arange(4) % 2
    separable = torch.nn.functional.one_hot(labels, 2).float() * 50  # every score certain
    with pytest.warns(UserWarning, match=r"temperature 0\.001 is at its search bound"):
        logged = _finish(CalibrationMonitor(), "val", separable, labels)
    assert logged["val/temperature"] == pytest.approx(1e-3)


def test_temperature_at_its_search_bound_is_reported_at_test_time():
    """The README says a T at its search bound is reported at test time; only the validation
    epoch that fitted it warned, so `test --ckpt_path` printed test/ece with T = 1e-3 silently."""
    import warnings
    labels = torch.arange(4) % 2
    separable = torch.nn.functional.one_hot(labels, 2).float() * 50
    fit = CalibrationMonitor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _finish(fit, "val", separable, labels)
    test = CalibrationMonitor()
    test.load_state_dict(fit.state_dict())
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(50, 2, generator=g), torch.randint(0, 2, (50,), generator=g)
    with pytest.warns(UserWarning, match=r"temperature 0\.001 .*at its search bound"):
        logged = _finish(test, "test", logits, y)
    assert logged["test/temperature"] == pytest.approx(1e-3)
    inside = CalibrationMonitor()
    inside.load_state_dict({"temperature": 0.2, "fitted": True, "fitted_on": "val"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _finish(inside, "test", logits, y)  # an ordinary T: no warning


@pytest.mark.parametrize("bounds", [(10.0, 1.0), (0.0, 10.0), (1.0, 1.0)])
def test_bad_search_bounds_are_refused_when_the_monitor_is_made(bounds):
    """They were accepted, and fit_temperature raised at the end of the first validation
    epoch, after a whole epoch of training."""
    with pytest.raises(ValueError, match=r"bounds must satisfy 0 < low < high"):
        CalibrationMonitor(bounds=bounds)


def test_zero_or_negative_temperature_is_refused():
    logits, labels = torch.randn(6, 3), torch.arange(6) % 3
    for fn in (expected_calibration_error, negative_log_likelihood):
        for t in (0.0, -1.0):
            with pytest.raises(ValueError, match="temperature must be positive"):
                fn(logits, labels, temperature=t)


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_outside_the_classes_are_refused(bad):
    """The ECE counted a label outside [0, K) (1-based classes, an ignore index) as a wrong
    prediction and returned a number; the NLL and the fit failed with an IndexError."""
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, bad])
    for fn in (expected_calibration_error, negative_log_likelihood, fit_temperature):
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
            fn(logits, labels)


def test_non_finite_scores_are_not_fitted():
    """A NaN score made every NLL NaN and the golden-section search walk to the upper bound:
    fit_temperature returned 1000 silently and the monitor stored it, with a warning blaming an
    untrained model or a separable validation set."""
    import warnings
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    for value in (float("nan"), float("inf")):
        bad = logits.clone()
        bad[5, 1] = value
        with pytest.raises(ValueError, match="1 of the 40 score rows are not finite"):
            fit_temperature(bad, labels)
        cb = CalibrationMonitor()
        cb.load_state_dict({"temperature": 0.2, "fitted": True, "fitted_on": "val"})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logged = _finish(cb, "val", bad, labels)
        messages = [str(w.message) for w in caught]
        assert any("not finite" in m for m in messages), messages
        assert not any("search bound" in m for m in messages), messages
        assert cb.temperature == 0.2 and logged["val/temperature"] == 0.2  # kept, not refitted


class _LoggingStub(_Stub):
    num_classes = 5

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, key: str, value: float, **_) -> None:
        self.logged[key] = float(value)


def _ddp_finish_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    z, y = synthetic(301, k=5)
    results = {}
    for name, cut in (("rank0_shorter", 101), ("rank1_empty", 301)):
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        cb, module = CalibrationMonitor(), _LoggingStub()
        for start in range(part.start or 0, part.stop or 301, 64):  # batches of 64
            stop = min(start + 64, part.stop or 301)
            cb._collect({"logits": z[start:stop].float(), "labels": y[start:stop]})
        cb._finish(_Stub(), module, "val")
        results[name] = module.logged
    torch.save(results, os.path.join(out_dir, f"finish{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_monitor_logs_the_single_process_values(tmp_path):
    """Every rank logs what one process logs on the whole set: a shorter first shard, an
    empty shard (the epoch end gathers; the fitted T, ECE and NLL are the whole set's)."""
    start_workers(_ddp_finish_worker, (str(tmp_path / "init"), str(tmp_path)))
    z, y = synthetic(301, k=5)
    t = fit_temperature(z.float(), y)
    single = {"val/temperature": t,
              "val/ece": expected_calibration_error(z.float(), y, t).item(),
              "val/ece_raw": expected_calibration_error(z.float(), y).item(),
              "val/nll": negative_log_likelihood(z.float(), y, t).item()}
    for r in range(2):
        res = torch.load(tmp_path / f"finish{r}.pt")
        for name, logged in res.items():
            assert logged.keys() == single.keys(), name
            for key, value in single.items():
                assert logged[key] == pytest.approx(value, rel=1e-6), (r, name, key)
