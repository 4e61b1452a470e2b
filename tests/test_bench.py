"""The benchmarks stay runnable (toy sizes on the CPU; the GPU figures are in bench/RESULTS.md)."""

from __future__ import annotations

import pytest

from conftest import REPO, load_bench


def test_train_bench_toy_runs(capsys):
    out = load_bench("train_bench").main(["--toy"])
    assert out["a_plain_loop"] > 0 and out["b_lightning_device"] > 0
    assert out["b0_lightning_minimal"] > 0 and out["bcli_hug_lightning_fit"] > 0
    printed = capsys.readouterr().out
    assert "(b)/(a)" in printed and "(b)/(b0)" in printed and "of which Lightning" in printed
    assert "(b-cli)/(a)" in printed


def test_dynamo_summary_counts_frames_and_graph_breaks():
    import torch
    bench = load_bench("train_bench")

    def two_graphs(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    bench.reset_dynamo()
    torch._dynamo.reset()
    torch.compile(two_graphs, backend="eager")(torch.randn(3))
    stats = bench.dynamo_summary()
    assert stats["graph_breaks"] == 1 and stats["graphs"] == 2 and stats["frames"] >= 1
    assert "graph_break" in stats["top_break"]
    bench.reset_dynamo()
    assert bench.dynamo_summary() == {"frames": 0, "graphs": 0, "graph_breaks": 0}


def test_train_bench_overhead_probe(capsys):
    out = load_bench("train_bench").main(["--device", "cpu", "--overhead", "--measure", "a", "b",
                                          "--steps", "6", "--warmup", "2", "--repeats", "1"])
    assert out["a_plain_loop"] > 0 and out["b_lightning_device"] > 0
    printed = capsys.readouterr().out
    assert "NullBackbone" in printed and "(b) - (a) =" in printed and "batch 4" in printed


@pytest.mark.slow
def test_accuracy_runs_smoke(cifar10_folder_root, tmp_path):
    results = load_bench("accuracy_runs").main([
        "--root", str(cifar10_folder_root), "--device", "cpu", "--epochs", "1", "--seeds", "0",
        "--out", str(tmp_path), "--robust-batches", "1", "--limit-batches", "1"])
    for config in ("cifar10_ce", "cifar10_hug"):
        run = results[config][0]
        assert 0.0 <= run["test/acc"] <= 1.0 and "test/robust/pgd_eps8" in run


@pytest.mark.slow
def test_hug15_sweep_arguments_parse_in_parallel_children(cifar10_folder_root, tmp_path):
    """Every knob of the tuning sweep is a valid CLI override (run as 2 parallel subprocesses)."""
    module = load_bench("accuracy_runs")
    sweep = module.SWEEPS["hug15"]
    results = module.main([
        "--root", str(cifar10_folder_root), "--device", "cpu", "--epochs", "1", "--seeds", "0",
        "--sweep", "hug15", "--parallel", "2", "--out", str(tmp_path), "--robust-batches", "0",
        "--limit-batches", "1"])
    assert list(results) == [label for label, _, _ in sweep]
    for label, runs in results.items():
        assert len(runs) == 1, f"{label}: the run failed (see {tmp_path}/run*.log)"
        assert 0.0 <= runs[0]["test/acc"] <= 1.0


def test_every_sweep_entry_is_a_valid_configuration():
    """Each knob of every accuracy sweep parses and builds (no training): a typo would
    otherwise surface only on the GPU machine."""
    from hug_lightning.cli import main as cli_main
    module = load_bench("accuracy_runs")
    for name, sweep in module.SWEEPS.items():
        for label, config, extra in sweep:
            extra, _ = module.shift_seed(extra, 0)
            cli = cli_main(["--config", str(REPO / "configs" / f"{config}.yaml"), *extra,
                            "--data.init_args.download", "false"], run=False)
            assert cli.model.num_classes == 10, (name, label)


def test_a_seed_shifted_sweep_entry_keeps_one_seed_per_run(monkeypatch, tmp_path):
    """hug15b's "seed + 1" entry set --seed_everything 1 after the run's seed: with the default
    --seeds 0 1 both of its runs trained seed 1, and their mean +- std was of one seed."""
    module = load_bench("accuracy_runs")
    seeds: list[int] = []

    class FakeCLI:
        def __init__(self, argv):
            values = [argv[i + 1] for i, a in enumerate(argv) if a == "--seed_everything"]
            seeds.append(int(values[-1]))  # the last one wins
            self.trainer = self
            self.model = self.datamodule = None
            self.callback_metrics = {"test/acc": 0.5}

        def test(self, *args, **kwargs):
            pass

    monkeypatch.setattr(module, "cli_main", FakeCLI)
    index = next(i for i, (label, _, _) in enumerate(module.SWEEPS["hug15b"])
                 if "seed + 1" in label)
    results = module.main(["--root", str(tmp_path), "--device", "cpu", "--epochs", "1",
                           "--sweep", "hug15b", "--only", "1", str(index), "--seeds", "0", "1",
                           "--robust-batches", "0", "--out", str(tmp_path)])
    assert seeds == [0, 1, 1, 2] and all(len(runs) == 2 for runs in results.values())


def test_parallel_sweep_names_its_failed_runs_and_runs_a_repeated_seed_once(monkeypatch,
                                                                            tmp_path, capsys):
    """A failed parallel run was left out of the table with nothing but a shorter seed count,
    and `--seeds 0 0` ran (and wrote) one run twice, then crashed sorting the two."""
    module = load_bench("accuracy_runs")
    jobs_seen: list[list[tuple[int, int]]] = []

    def fake_parallel(args, jobs):
        jobs_seen.append(jobs)
        return [(i, s, None if i == 1 else {"test/acc": 0.5}) for i, s in jobs]

    monkeypatch.setattr(module, "run_parallel", fake_parallel)
    results = module.main(["--root", str(tmp_path), "--only", "0", "1", "0", "--seeds", "0",
                           "0", "--parallel", "2", "--out", str(tmp_path)])
    assert jobs_seen == [[(0, 0), (1, 0)]]
    assert [len(runs) for runs in results.values()] == [1, 0]
    out = capsys.readouterr().out
    label = module.SWEEPS["default"][1][0]
    assert f"FAILED, not in the table:\n* {label}, seed 0: see {tmp_path / 'run1_s0.log'}" in out


def test_profile_host_toy_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    module = load_bench("profile_host")
    # the package's functions by cumulative time: the step among the first 40 whatever the load
    # (with 5, a loaded machine's slow SVD in the NC compute pushed it out of the list)
    text = module.main(["--toy", "--top", "40"])
    assert "training_step" in text and "epoch" in text
    table = module.main(["--toy", "--compare", "--top", "5"])
    assert "| (a) | (b) |" in table and "aten::" in table


def test_lightning_clocks_stop_at_the_last_timed_step_not_at_the_end_of_the_fit(monkeypatch):
    """(b), (b0) and (b-cli) stopped their clock in on_train_end, so the fit's last epoch end
    (NC compute, checkpoint saves, any garbage collection there) counted as step time, once per
    fit; (a)'s clock stops after its last step. A 0.6 s epoch end must stay outside."""
    import argparse
    import time

    import torch
    bench = load_bench("train_bench")

    class SlowEpochEnd(bench.StepTimer):
        def on_train_epoch_end(self, trainer, pl_module):
            time.sleep(0.6)

    monkeypatch.setattr(bench, "StepTimer", SlowEpochEnd)
    args = argparse.Namespace(device="cpu", toy=False, overhead=True, small_width=0, steps=3,
                              warmup=1, batch_size=4, workers=0, compile=False,
                              compile_loss=False, bf16=False, channels_last=False)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)  # 16 steps per epoch
    labels = torch.arange(64) % 10
    for name, run in [("b", lambda: bench.lightning_run(images, labels, args)),
                      ("b0", lambda: bench.lightning_run(images, labels, args, minimal=True)),
                      ("bcli", lambda: bench.cli_measure(images, labels, args))]:
        window = args.steps * args.batch_size / run()["images_s"]
        assert window < 0.3, (name, window)


def _gpu_session_commands() -> list[tuple[str, list[str]]]:
    """``(script, arguments)`` of every ``python3 bench/X.py`` command in gpu_session.sh."""
    import re
    import shlex
    text = (REPO / "bench" / "gpu_session.sh").read_text().replace("\\\n", " ")
    subs = {"${SWEEP_NAME:-hug15b}": "hug15b", "$RES": "/tmp/res", "$OUT": "/tmp/out"}
    commands = []
    for match in re.finditer(r"python3 bench/(\w+)\.py ([^|>\n]*?)\s*(?:2?>>?|\||\n)", text):
        args = match.group(2)
        for key, value in subs.items():
            args = args.replace(key, value)
        commands.append((match.group(1), shlex.split(args)))
    return commands


def test_every_gpu_session_command_parses(monkeypatch):
    """The GPU call comes once per lucky session: a renamed flag must fail here, not there."""
    import argparse

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    commands = _gpu_session_commands()
    assert {name for name, _ in commands} == {"train_bench", "profile_host", "accuracy_runs"}
    assert len(commands) == 7, commands
    for name, args in commands:
        with pytest.raises(Parsed):
            load_bench(name).main(args)  # argparse's SystemExit on a bad flag fails here


def test_gpu_session_returns_its_files_in_one_archive():
    """The device tool returns at most 8 files from $OUT; the script wrote 9 (11 with SWEEP=1),
    so one or more of them never came back. Everything now goes to $OUT/results.tgz."""
    import re
    import subprocess
    text = (REPO / "bench" / "gpu_session.sh").read_text()
    assert set(re.findall(r"\$OUT/([\w.-]*\w)", text)) == {"results.tgz", "results.tgz.part"}
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_session.sh")], check=True)


def test_train_bench_json_keeps_the_runs_before_a_crash_or_a_time_limit(monkeypatch, tmp_path):
    """The JSON was written only at the very end: a stage cut by gpu_session.sh's time limit
    (the torch.compile one compiles four models) lost every figure it had measured."""
    import json
    bench = load_bench("train_bench")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the time limit struck during (b)

    monkeypatch.setattr(bench, "lightning_run", killed)
    path = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--overhead", "--measure", "a", "b", "--steps", "2",
                    "--warmup", "1", "--repeats", "1", "--num-images", "64", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["partial"] and saved["repeats"]["a_plain_loop"][0] > 0


def test_loss_bench_loop_reference_is_the_vectorized_loss(monkeypatch):
    """loss_bench timed its per-class loop against HUG-MHE without ever comparing their values:
    the loop/MHE speed-up would have held for a loop computing something else."""
    import torch
    from hug_lightning.losses import hug_loss
    bench = load_bench("loss_bench")
    g = torch.Generator().manual_seed(0)
    for K, B in [(10, 64), (100, 48)]:  # at K = 100 many classes are absent from the batch
        h = torch.randn(B, 16, generator=g, dtype=torch.float64, requires_grad=True)
        W = torch.randn(K, 16, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, K, (B,), generator=g)
        loop, vectorized = bench.loop_reference(h, W, y), hug_loss(h, W, y).total
        torch.testing.assert_close(loop, vectorized)
        for a, b in zip(torch.autograd.grad(loop, (h, W)), torch.autograd.grad(vectorized, (h, W))):
            torch.testing.assert_close(a, b)
    monkeypatch.setattr(bench, "loop_reference", lambda h, W, y: 2 * hug_loss(h, W, y).total)
    with pytest.raises(AssertionError, match="loop reference"):
        bench.main(["--quick", "--classes", "10", "--repeats", "1"])


def test_profile_compare_profiles_every_timed_step_with_a_short_warmup(monkeypatch):
    """With --warmup 1 the profiler's schedule (2 warm-up steps) outlasted the run: 2 of the 3
    steps were profiled, and their times divided by 3."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    module = load_bench("profile_host")
    counts = []
    original = module._op_times

    def spy(prof, cuda, steps):
        counts.append([e.count for e in prof.key_averages() if e.key.startswith("Optimizer.step")])
        return original(prof, cuda, steps)

    monkeypatch.setattr(module, "_op_times", spy)
    module.main(["--compare", "--device", "cpu", "--steps", "3", "--warmup", "1",
                 "--num-images", "64", "--batch-size", "2", "--top", "1"])
    assert counts == [[3], [3]]


def test_parallel_sweep_json_keeps_the_runs_finished_before_a_time_limit(monkeypatch, tmp_path):
    """--parallel wrote its JSON only after the last run: a sweep cut by gpu_session.sh's time
    limit lost the metrics of every fit that had finished."""
    import json
    from pathlib import Path
    module = load_bench("accuracy_runs")
    label = module.SWEEPS["default"][0][0]

    class FakeRun:  # the first run finishes, the second is still running when the limit strikes
        def __init__(self, argv, **kwargs):
            self.index, self.returncode = int(argv[argv.index("--only") + 1]), 0
            if self.index == 0:
                out = argv[argv.index("--json") + 1]
                Path(out).write_text(json.dumps({label: [{"test/acc": 0.5}]}))

        def poll(self):
            if self.index:
                raise KeyboardInterrupt
            return 0

    monkeypatch.setattr(module.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(module.time, "sleep", lambda s: None)
    path = tmp_path / "sweep.json"
    with pytest.raises(KeyboardInterrupt):
        module.main(["--root", str(tmp_path), "--parallel", "2", "--seeds", "0", "--out",
                     str(tmp_path), "--json", str(path)])
    assert json.loads(path.read_text()) == {label: [{"test/acc": 0.5}]}
