"""Several nodes sharing folders: data downloads and run folders (simulated on one machine)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets.utils import extract_archive

from conftest import REPO, tiny_args
from datagen import write_cifar10_torchvision
from hug_lightning.data import CIFAR10DataModule


def test_two_nodes_download_cifar_into_a_shared_root_once(tmp_path, monkeypatch, no_checksum):
    """Lightning runs ``prepare_data`` on the first process of every node. Into a root the
    nodes share, both fetched the archive into the same file at once: the second one's write
    (``open(..., "wb")``) truncated the first one's, whose checksum then failed (seen with two
    torchrun "nodes" and this stand-in for the network: the run stopped, "download failed").
    Here two such callers, the second starting while the first is fetching: one fetch, both
    find the data."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # what the network would deliver
        tar.add(write_cifar10_torchvision(tmp_path / "src", 2, 1) / "cifar-10-batches-py",
                arcname="cifar-10-batches-py")
    payload, fetches = archive.read_bytes(), []

    def fetch(url, download_root, filename=None, md5=None, **kwargs):  # slow, in chunks
        fetches.append(threading.current_thread().name)
        target = Path(download_root) / filename
        with open(target, "wb") as f:
            for i in range(0, len(payload), max(len(payload) // 10, 1)):
                f.write(payload[i:i + max(len(payload) // 10, 1)])
                f.flush()
                time.sleep(0.03)
        if target.read_bytes() != payload:  # torchvision's md5 check after the fetch
            raise RuntimeError("File not found or corrupted.")
        extract_archive(str(target), download_root)

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fetch)
    shared, errors = tmp_path / "shared", []

    def node() -> None:
        try:
            CIFAR10DataModule(root=str(shared), download=True).prepare_data()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    nodes = [threading.Thread(target=node, name=f"node{n}") for n in range(2)]
    nodes[0].start()
    time.sleep(0.1)  # the second node starts while the first is fetching
    nodes[1].start()
    for t in nodes:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in nodes)
    assert errors == [] and fetches == ["node0"]
    dm = CIFAR10DataModule(root=str(shared), download=False, val_split=0)
    dm.setup("fit")
    assert len(dm.train_set) == 20  # 2 per class, as written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_share_the_log_folder(cifar10_folder_root, tmp_path):
    """The README's multi-node route: ``torchrun --nnodes 2`` started once per "node" (here two
    on one machine, one process each, gloo), each node with its own copy of the data and its own
    working folder, both logging into one shared folder: one run folder, written by the first
    node alone (its config, events and checkpoints once), the second node's process rank 1."""
    node_data = tmp_path / "node1_data"
    shutil.copytree(cifar10_folder_root, node_data)
    logs, port = tmp_path / "shared_logs", _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    procs = []
    for node, root in enumerate((cifar10_folder_root, node_data)):
        (tmp_path / f"node{node}").mkdir()
        args = tiny_args(root, logs, "--trainer.strategy", "ddp", "--trainer.num_nodes", "2",
                         "--trainer.devices", "1", "--trainer.accelerator", "cpu",
                         "--trainer.limit_train_batches", "2")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
             "1", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port",
             str(port), "-m", "hug_lightning", "fit", *args], cwd=tmp_path / f"node{node}",
            env={**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = []
    for proc in procs:
        try:
            errs.append(proc.communicate(timeout=120)[1])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two nodes hung:\n" + proc.communicate()[1][-3000:])
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in errs[1]
    runs = list((logs / "cifar10_ce").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in runs[0].glob("*.yaml")) == ["config.yaml", "hparams.yaml"]
    assert "last.ckpt" in {p.name for p in (runs[0] / "checkpoints").iterdir()}
    assert sorted(p.name for p in logs.iterdir()) == ["cifar10_ce"]  # no probe left either
    for node in (0, 1):  # nothing in the nodes' own working folders (no lightning_logs etc.)
        assert list((tmp_path / f"node{node}").iterdir()) == []
