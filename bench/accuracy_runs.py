"""CIFAR-10: cross-entropy vs MHE-HUG with the shipped configs, several seeds, one table.

Each run is ``fit`` (train on all 50,000 images, validate on the test split) followed by ``test``
of the final weights with the robustness evaluation (FGSM/PGD at 2/255 and 8/255, three
corruptions; ``--robust-batches`` batches) and calibration (ECE, HUG temperature fitted on the
validation split). Prints a Markdown table; ``--json`` keeps every logged metric.

GPU: ``python bench/accuracy_runs.py --root <cifar10 folder> --epochs 15 --seeds 0 1``
CPU smoke test: ``--device cpu --epochs 1 --limit-batches 2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hug_lightning.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
COLUMNS = {
    "test/acc": "test acc", "test/ece": "ECE", "test/robust/fgsm_eps2": "FGSM 2/255",
    "test/robust/pgd_eps2": "PGD 2/255", "test/robust/fgsm_eps8": "FGSM 8/255",
    "test/robust/pgd_eps8": "PGD 8/255", "test/robust/corruption_mean": "corruptions",
    "nc/val/nc1_pinv": "NC1 (val)", "geometry/min_angle": "min angle (deg)",
}


def one_run(config: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    argv = [
        "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
        "--data.init_args.root", args.root, "--data.init_args.download", "false",
        "--data.init_args.val_split", "0", "--seed_everything", str(seed),
        "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(Path(args.out) / "logs"),
        "--robust.enabled", "true", "--robust.max_batches", str(args.robust_batches),
        "--robust.corruptions", "[gaussian_noise, contrast, jpeg_compression]",
        "--robust.severities", "[3, 5]",
    ]
    if args.device == "cuda":
        argv += ["--config", str(REPO / "configs" / "gpu.yaml"),
                 "--data.init_args.device_resident", "true"]
    else:
        argv += ["--config", str(REPO / "configs" / "debug.yaml"),
                 "--trainer.limit_train_batches", str(args.limit_batches),
                 "--trainer.limit_val_batches", str(args.limit_batches),
                 "--trainer.limit_test_batches", str(args.limit_batches),
                 "--model.init_args.backbone", '{"class_path": "hug_lightning.backbones.SmallConvNet"}']
    start = time.perf_counter()
    cli = cli_main(argv)
    fit_s = time.perf_counter() - start
    fit_metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    cli.trainer.test(cli.model, datamodule=cli.datamodule)  # the final weights
    metrics = {**fit_metrics, **{k: float(v) for k, v in cli.trainer.callback_metrics.items()}}
    metrics["s_per_epoch"] = fit_s / args.epochs
    return metrics


def table(results: dict[str, list[dict[str, float]]]) -> str:
    cols = [*COLUMNS.values(), "s/epoch (fit)"]
    lines = ["| config | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for config, runs in results.items():
        cells = []
        for key in [*COLUMNS, "s_per_epoch"]:
            vals = [r[key] for r in runs if key in r]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.4g}")
            else:
                cells.append(f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}")
        lines.append(f"| {config} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="CIFAR-10 folder (either layout)")
    parser.add_argument("--configs", nargs="+", default=["cifar10_ce", "cifar10_hug"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--robust-batches", type=int, default=4)
    parser.add_argument("--limit-batches", type=int, default=2, help="CPU smoke test only")
    parser.add_argument("--out", default="accuracy_runs")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {c: [] for c in args.configs}
    for seed in args.seeds:
        for config in args.configs:
            results[config].append(one_run(config, seed, args))
            print(f"done {config} seed {seed}: test/acc {results[config][-1].get('test/acc')}",
                  flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n### CIFAR-10, {args.epochs} epochs, seeds {args.seeds}\n\n{table(results)}")
    return results


if __name__ == "__main__":
    main()
