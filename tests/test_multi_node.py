"""Several nodes sharing folders: data downloads and run folders (simulated on one machine)."""

from __future__ import annotations

import tarfile
import threading
import time
from pathlib import Path

import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets.utils import extract_archive

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
