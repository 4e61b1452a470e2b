"""Helpers for the 2-process CPU (gloo) DDP tests of the NC collector.

``ddp_worker`` runs in each spawned process: it joins a gloo group through a ``file://`` store,
feeds its share of every scenario to an ``NCFeatureStats``, counts the collectives used by
``compute`` (by wrapping ``torch.distributed.all_reduce`` / ``all_gather``) and saves the synced
results to ``out_dir/rank{r}.pt`` for the parent test to compare with a single-process run.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _counting(counts: dict[str, int], name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def make_scenarios(n: int, world_size: int, seed: int = 0) -> dict[str, list[list[dict]]]:
    """Per-scenario, per-rank lists of batches, as dicts ``{"idx": indices, "w": weights}``.

    * ``uneven``: rank 0 gets 70 % of the samples, ragged batch sizes on both ranks;
    * ``empty_rank``: the last rank never calls ``update``;
    * ``padded``: DistributedSampler-style interleaving, padded with duplicates of weight 0
      (plus a few extra weight-0 duplicates).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)

    def ragged(idx: torch.Tensor) -> list[dict]:
        out, start = [], 0
        while start < idx.numel():
            size = int(torch.randint(1, 17, (1,), generator=g))
            out.append({"idx": idx[start : start + size], "w": None})
            start += size
        return out

    cut = int(0.7 * n)
    uneven = [ragged(perm[:cut]), ragged(perm[cut:])] + [[] for _ in range(world_size - 2)]
    empty = [ragged(perm)] + [[] for _ in range(world_size - 1)]
    total = -(-n // world_size) * world_size
    padded_idx = torch.cat([perm, perm[: total - n]])
    weights = torch.cat([torch.ones(n), torch.zeros(total - n)])
    padded = []
    for r in range(world_size):
        idx, w = padded_idx[r::world_size], weights[r::world_size]
        extra = perm[r * 3 : r * 3 + 3]  # duplicates that must not count
        idx, w = torch.cat([idx, extra]), torch.cat([w, torch.zeros(3)])
        padded.append([{"idx": idx[i : i + 13], "w": w[i : i + 13]} for i in range(0, len(w), 13)])
    return {"uneven": uneven, "empty_rank": empty, "padded": padded}


def ddp_worker(rank: int, world_size: int, init_file: str, data_file: str, out_dir: str) -> None:
    """Body of one spawned rank (see module docstring)."""
    torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP pool in a forked child
    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    from hug_lightning.metrics import NCFeatureStats

    data = torch.load(data_file)
    x, y, logits = data["x"], data["y"], data["logits"]
    results = {}
    for name, per_rank in data["scenarios"].items():
        metric = NCFeatureStats(data["k"], x.shape[1])
        metric.set_reference(data["ref"])
        for batch in per_rank[rank]:
            i = batch["idx"]
            metric.update(x[i], y[i], logits=logits[i], weight=batch["w"])
        counts = {"all_reduce": 0, "all_gather": 0}
        orig = dist.all_reduce, dist.all_gather
        dist.all_reduce = _counting(counts, "all_reduce", orig[0])
        dist.all_gather = _counting(counts, "all_gather", orig[1])
        try:
            values = metric.compute(W=data["W"], b=data["b"])
        finally:
            dist.all_reduce, dist.all_gather = orig
        results[name] = {
            "values": values,
            "means": metric.means(),
            "synced_means": metric.synced_means(),  # the eval pass's NCC reference
            "counts": counts,
            "num_states": len(metric._defaults),
            "local_n": metric.n.clone(),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def start_workers(fn: Any, args: tuple, nprocs: int = 2, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` processes and wait for them, at most ``timeout_s``
    (a hung collective fails the test instead of hanging the suite).

    Uses ``fork`` where available: the children inherit the imported torch/torchmetrics, which
    makes the test take well under a second instead of ~9 s of re-imports with ``spawn``.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(fn, args, nprocs=nprocs, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError(f"DDP workers did not finish within {timeout_s} s")


def run_workers(world_size: int, tmp_path: Path, timeout_s: float = 120.0) -> None:
    """Start ``ddp_worker`` on ``world_size`` processes and wait (bounded) for them."""
    args = (world_size, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path))
    start_workers(ddp_worker, args, world_size, timeout_s)
