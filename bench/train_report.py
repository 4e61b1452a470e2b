"""The results of ``train_bench.py``: best of the repeats, ratios, a Markdown table, JSON;
and the ``torch._dynamo`` counters of ``--compile`` runs.
"""

from __future__ import annotations

import argparse
import json

import torch


def dynamo_summary() -> dict[str, int | str]:
    """Compact ``torch._dynamo`` counters since the last :func:`reset_dynamo`: frames compiled,
    distinct graphs, graph breaks, and the most frequent break reason (``--compile`` runs)."""
    from torch._dynamo.utils import counters
    breaks = counters["graph_break"]
    out = {"frames": int(counters["frames"]["total"]),
           "graphs": int(counters["stats"]["unique_graphs"]),
           "graph_breaks": int(sum(breaks.values()))}
    if breaks:
        reason, n = breaks.most_common(1)[0]
        out["top_break"] = f"{n}x {reason[:120]!r}"
    return out


def reset_dynamo() -> None:
    from torch._dynamo.utils import counters
    counters.clear()


def report(args: argparse.Namespace, runs: dict[str, list[float]],
           compile_stats: dict[str, dict[str, int | str]]) -> dict[str, float]:
    """Print the table of the measured ``runs`` (every repeat of each measurement) and their
    ratios, write ``args.json``; returns the best values and the ratios."""
    # best of the repeats: highest throughput, shortest epoch
    res = {k: (min(v) if k.startswith("epoch") else max(v)) for k, v in runs.items()}
    ratios: dict[str, float] = {}

    def ratio(name: str, num: str, den: str) -> None:
        if num in res and den in res:
            ratios[name] = res[num] / res[den]

    ratio("(b)/(a) device-resident Lightning vs plain loop", "b_lightning_device", "a_plain_loop")
    ratio("(b0)/(a) bare LightningModule vs plain loop", "b0_lightning_minimal", "a_plain_loop")
    ratio("(b)/(b0) ClassifierModule vs bare LightningModule", "b_lightning_device",
          "b0_lightning_minimal")
    ratio("(b-cli)/(a) `hug-lightning fit` (all defaults) vs plain loop",
          "bcli_hug_lightning_fit", "a_plain_loop")
    ratio("(b-cli)/(b) the command's defaults vs a bare Trainer", "bcli_hug_lightning_fit",
          "b_lightning_device")
    ratio("(b)/(c) device-resident vs classic DataLoader", "b_lightning_device",
          "c_lightning_dataloader")
    ratio("HUG step / CE step", "b_lightning_device", "b_hug")
    for k in (10, 100):
        ratio(f"collectors on / off, epoch time, K={k}", f"epoch_s_K{k}_nc_on",
              f"epoch_s_K{k}_nc_off")
    ratio("eval-pass epoch / collectors-off epoch, K=100", "epoch_s_K100_eval_pass",
          "epoch_s_K100_nc_off")
    ratio("eval-pass epoch / train-collector epoch, K=100", "epoch_s_K100_eval_pass",
          "epoch_s_K100_nc_on")
    ratio("eval-pass epoch, float32 pass / bf16 pass, K=100", "epoch_s_K100_eval_pass",
          "epoch_s_K100_eval_pass_bf16")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    model_name = ("NullBackbone (overhead probe)" if args.overhead else
                  f"SmallConvNet width {args.small_width} (d={4 * args.small_width})"
                  if args.small_width else "ResNet-18 CIFAR stem")
    print(f"\n### train_bench on {device_name} (batch {args.batch_size}, "
          f"{'toy SmallConvNet' if args.toy else model_name}, "
          f"{'bf16-mixed, channels_last' if args.bf16 else 'fp32'}"
          f"{', torch.compile' if args.compile else ', eager'}"
          f"{', loss compiled' if args.compile_loss else ''}; best of {args.repeats})\n")
    print("| measurement | value | all repeats |\n|---|---|---|")
    for key, value in res.items():
        unit = "s" if key.startswith("epoch") else "images/s"
        every = ", ".join(f"{v:,.3f}" if unit == "s" else f"{v:,.0f}" for v in runs[key])
        print(f"| {key} | {value:,.3f} {unit} | {every} |")
    for key, value in ratios.items():
        print(f"| {key} | {value:.3f} | |")
    if "a_plain_loop" in res and "b_lightning_device" in res:
        ms = {k: 1e3 * args.batch_size / v for k, v in res.items() if not k.startswith("epoch")}
        a, b = ms["a_plain_loop"], ms["b_lightning_device"]
        split = ""
        if "b0_lightning_minimal" in ms:
            b0 = ms["b0_lightning_minimal"]
            split = f", of which Lightning (b0) - (a) = {b0 - a:.3f} ms"
        print(f"| per step: (a) {a:.3f} ms, (b) {b:.3f} ms, "
              f"(b) - (a) = {b - a:.3f} ms{split} | | |")
    for key, stats in compile_stats.items():
        print(f"| torch.compile, {key}: " + ", ".join(f"{k} {v}" for k, v in stats.items())
              + " | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "repeats": runs, "ratios": ratios, "device": device_name,
                       "compile": args.compile, "compile_loss": args.compile_loss,
                       "dynamo": compile_stats}, f, indent=1)
    return {**res, **ratios}


__all__ = ["dynamo_summary", "report", "reset_dynamo"]
