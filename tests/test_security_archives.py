"""Registering a checkpoint archive someone else made (`forge models register`,
parents.register_parent -> weights.fetch_external): it may be a bomb, a FIFO, links, or
simply more than the disk holds. Each is refused with a typed reason, and the cache keeps
nothing of it.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from helpers import operator_conf

from runner.errors import ForgeError
from runner.jobs import parents
from runner.registry import catalog

MIB = 1024**2
ARGS = {"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2}
VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, "CD3E": 3, "CD4": 4}


@pytest.fixture
def cache(sqlite_url, tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FORGE_CACHE_DIR", str(path))
    return path


def leftovers(cache: Path) -> list[str]:
    """Whatever registration left in the weights cache (a .partial folder, unpacked files)."""
    weights = cache / "weights"
    return sorted(str(p.relative_to(weights)) for p in weights.rglob("*"))


def checkpoint_zip(path: Path, weights: bytes, *, level: int = zipfile.ZIP_DEFLATED) -> Path:
    """A checkpoint archive with a valid args.json and vocab.json, and `weights` as its
    best_model.pt."""
    with zipfile.ZipFile(path, "w", compression=level) as zf:
        zf.writestr("ckpt/args.json", json.dumps(ARGS))
        zf.writestr("ckpt/vocab.json", json.dumps(VOCAB))
        zf.writestr("ckpt/best_model.pt", weights)
    return path


def register(archive: Path, artifact_id: str = "model-ext") -> dict:
    return parents.register_parent(artifact_id, archive.as_uri())


def refused(archive: Path, reason: str, artifact_id: str = "model-ext") -> ForgeError:
    with pytest.raises(ForgeError) as info:
        register(archive, artifact_id)
    assert info.value.reason == reason, info.value.to_dict()
    return info.value


def test_a_small_archive_still_registers(cache, tmp_path):
    row = register(checkpoint_zip(tmp_path / "ok.zip", os.urandom(4096)))
    assert catalog.get_artifact(row["id"])["origin_type"] == "external"
    tree = row["content_hash"]
    assert leftovers(cache) == [tree, *(f"{tree}/{n}" for n in
                                        ("args.json", "best_model.pt", "vocab.json"))]


def test_a_zip_bomb_is_refused_from_its_headers_and_leaves_nothing(cache, tmp_path):
    # 64 MiB of zeros deflates to ~64 KiB: a ratio of ~1000, over the default cap of 200
    bomb = checkpoint_zip(tmp_path / "bomb.zip", bytes(64 * MIB))
    assert bomb.stat().st_size < MIB
    err = refused(bomb, "archive_too_large")
    assert err.field == "origin_url" and "registry.max_archive_ratio" in err.fix
    assert leftovers(cache) == []


def test_a_tar_gz_bomb_is_refused_too(cache, tmp_path):
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for name, data in (("args.json", json.dumps(ARGS).encode()),
                           ("vocab.json", json.dumps(VOCAB).encode()),
                           ("best_model.pt", bytes(64 * MIB))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    refused(bomb, "archive_too_large")
    assert leftovers(cache) == []


@pytest.mark.parametrize("setting,archive_bytes", [
    ("max_archive_gb: 0.001", 2 * MIB),  # ~1 MiB cap, 2 MiB of incompressible weights
    ("max_archive_files: 2", 4096),  # three files
])
def test_the_operator_sets_the_caps_in_conf(cache, tmp_path, monkeypatch, setting,
                                            archive_bytes):
    archive = checkpoint_zip(tmp_path / "a.zip", os.urandom(archive_bytes),
                             level=zipfile.ZIP_STORED)
    operator_conf(tmp_path, monkeypatch, f"registry:\n  {setting}\n")
    err = refused(archive, "archive_too_large")
    assert f"registry.{setting.split(':')[0]}" in err.fix
    assert leftovers(cache) == []


def test_a_fifo_as_the_archive_is_refused_without_hanging(cache, tmp_path):
    fifo = tmp_path / "ckpt.zip"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def run():
        try:
            register(fifo)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # release the reader blocked on the FIFO, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("registering a FIFO as the archive hung")
    [err] = outcome
    assert isinstance(err, ForgeError) and err.reason == "unsafe_archive", err
    assert leftovers(cache) == []


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                  tarfile.FIFOTYPE])
def test_links_and_devices_in_an_archive_are_refused(cache, tmp_path, kind):
    archive = tmp_path / "ckpt.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (("args.json", json.dumps(ARGS).encode()),
                           ("vocab.json", json.dumps(VOCAB).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("best_model.pt")
        link.type, link.linkname = kind, "args.json"
        tar.addfile(link)
    refused(archive, "unsafe_archive")
    assert leftovers(cache) == []


def test_a_symlink_member_of_a_zip_is_refused(cache, tmp_path):
    archive = checkpoint_zip(tmp_path / "ckpt.zip", b"w")
    with zipfile.ZipFile(archive, "a") as zf:
        link = zipfile.ZipInfo("ckpt/extra.pt")
        link.external_attr = (0o120777 << 16)  # S_IFLNK: the data is the link's target
        zf.writestr(link, "/etc/passwd")
    refused(archive, "unsafe_archive")
    assert leftovers(cache) == []


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 4 MiB tmpfs as the cache: a real ENOSPC when an archive unpacks past it."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    monkeypatch.setenv("FORGE_CACHE_DIR", str(mount))
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_typed_and_leaves_nothing(sqlite_url, small_disk, tmp_path):
    archive = checkpoint_zip(tmp_path / "big.zip", os.urandom(8 * MIB), level=zipfile.ZIP_STORED)
    err = refused(archive, "disk_full")
    assert err.field == "origin_url"
    assert leftovers(small_disk) == []


def test_a_dataset_download_that_fills_the_disk_is_typed_and_leaves_nothing(sqlite_url,
                                                                           small_disk,
                                                                           tmp_path):
    """datasets.register_file over http: ENOSPC mid-download is disk_full, and the half
    file is gone (a later fetch would otherwise find the disk still full)."""
    from runner.jobs import datasets

    served = tmp_path / "served"
    served.mkdir()
    (served / "big.h5ad").write_bytes(os.urandom(8 * MIB))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/big.h5ad"
        try:
            with pytest.raises(ForgeError) as info:
                datasets.register_file("dataset-big", url, title="big", license="CC0")
        finally:
            server.shutdown()
    assert info.value.reason == "disk_full", info.value.to_dict()
    assert info.value.field == "url"
    assert [p.name for p in (small_disk / "files").rglob("*") if p.is_file()] == []
