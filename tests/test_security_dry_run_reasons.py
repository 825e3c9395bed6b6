"""The dry run knows what the host can know (issue 25, part 4).

Each case first shows the request would launch, then breaks one thing on the host and checks
that the dry run says `would_launch: false` with a typed reason (code, field, message, fix),
and that the real calls (train_model_version and submit_training) refuse with the same reason
before any debit: the balance unchanged, no allocation, only the audit row written. On the old
code each of these dry runs said `would_launch: true` and the real call debited, failed and
refunded (the disk case excepted: it was reported already, and is kept here as a guard).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import (
    AGENT,
    ARCH,
    DATASET_ID,
    count_rows,
    operator_conf,
    register_by_hand,
    scratch_code_repo,
)

from runner import api, sandbox
from runner.errors import ForgeError
from runner.jobs import devices, weights
from runner.registry import catalog, ledger

INTERNAL = "model-test-internal"  # a parent whose weights live in FORGE_HOME (a trained one)
EXTERNAL = "model-test-outside"  # a parent registered from a file:// folder
CAPS = {"wall_time_cap_min": 5, "vram_cap_gb": 1}


@pytest.fixture
def host(registry, base_checkpoint, tmp_path, monkeypatch):
    """The seeded registry, a clean code repository, and two parents of our own: the session's
    base checkpoint is shared, so the tests break copies of it, never it."""
    scratch_code_repo(tmp_path, monkeypatch)
    stored = weights.store(INTERNAL, base_checkpoint)
    catalog.register_model(
        artifact_id=INTERNAL, title="internal parent", created_by="test",
        content_hash=stored["sha256"],
        metadata={"family": "scgpt", "framework": "scgpt", "task": "finetune_celltype",
                  "architecture": ARCH,
                  "weights": {k: stored[k] for k in ("sha256", "files", "size_bytes")}})
    outside = tmp_path / "outside-checkpoint"
    shutil.copytree(base_checkpoint, outside)
    register_by_hand(EXTERNAL, outside, family="scgpt", architecture=ARCH)
    return {"url": registry, "outside": outside}


def dry(parent: str = INTERNAL, dataset: str = DATASET_ID, **kw) -> dict:
    return api.train_model_version(parent, dataset, agent_id=AGENT, dry_run=True, **CAPS, **kw)


def only_reason(result: dict) -> dict:
    """The one reason a dry run gives, checked for the reasons' shape."""
    assert result["would_launch"] is False
    assert len(result["reasons"]) == 1, result["reasons"]
    (reason,) = result["reasons"]
    assert {"reason", "message", "field", "fix"} <= set(reason), reason
    return reason


def refused_before_any_debit(url: str, reason: str, parent: str = INTERNAL,
                             dataset: str = DATASET_ID, **kw) -> list[ForgeError]:
    """Both real entry points refuse with `reason`; nothing but their audit rows is written."""
    errors = []
    for call in (api.train_model_version, api.submit_training):
        before, balance = count_rows(url), ledger.balance(AGENT)
        with pytest.raises(ForgeError) as info:
            call(parent, dataset, agent_id=AGENT, **CAPS, **kw)
        assert info.value.reason == reason, info.value.to_dict()
        after = count_rows(url)
        assert ledger.balance(AGENT) == balance
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == \
            {"tool_calls": 1}  # no allocation, no ledger entry
        errors.append(info.value)
    return errors


# --- the sandbox ---------------------------------------------------------------------------------

def test_no_bubblewrap_is_a_reason_before_any_debit(host, tmp_path, monkeypatch):
    assert dry()["would_launch"] is True
    monkeypatch.setenv("FORGE_BWRAP", str(tmp_path / "no-bwrap"))
    reason = only_reason(dry())
    assert reason["reason"] == "sandbox_unavailable" and reason["field"] == "FORGE_BWRAP"
    assert "bubblewrap" in reason["message"] and "apt-get install" in reason["fix"]
    refused_before_any_debit(host["url"], "sandbox_unavailable")


def test_a_bubblewrap_that_cannot_make_a_namespace_is_a_reason_probed_once(
        host, tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    fake = tmp_path / "bwrap"
    fake.write_text(f"#!/bin/sh\necho probe >> {calls}\n"
                    "echo 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FORGE_BWRAP", str(fake))
    reason = only_reason(dry())
    assert reason["reason"] == "sandbox_unavailable" and reason["field"] == "FORGE_BWRAP"
    assert "cannot create the sandbox" in reason["message"]
    assert "user.max_user_namespaces" in reason["fix"]
    only_reason(dry())
    assert calls.read_text().count("probe") == 1  # the probe's answer is kept per bwrap path
    refused_before_any_debit(host["url"], "sandbox_unavailable")


# --- the parent's weights ------------------------------------------------------------------------

def weight_file(artifact_id: str = INTERNAL) -> Path:
    return weights.stored_file(artifact_id, "best_model.pt")


def test_missing_parent_weights_are_a_reason(host):
    assert dry()["would_launch"] is True
    weight_file().unlink()
    reason = only_reason(dry())
    assert reason["reason"] == "weights_missing" and reason["field"] == "parent_artifact_id"
    assert "best_model.pt" in reason["message"] and str(weights.weights_dir(INTERNAL)) \
        not in reason["message"]  # names, never the host's paths
    refused_before_any_debit(host["url"], "weights_missing")

    shutil.rmtree(weights.weights_dir(INTERNAL))  # the whole folder gone
    assert only_reason(dry())["reason"] == "weights_missing"


def test_missing_external_parent_folder_is_a_reason(host):
    assert dry(EXTERNAL)["would_launch"] is True
    shutil.rmtree(host["outside"])
    reason = only_reason(dry(EXTERNAL))
    assert reason["reason"] == "weights_missing" and reason["field"] == "parent_artifact_id"
    refused_before_any_debit(host["url"], "weights_missing", parent=EXTERNAL)


def test_unreadable_parent_weights_are_a_reason(host):
    assert dry()["would_launch"] is True
    path = weight_file()
    path.unlink()
    os.mkfifo(path)  # not a regular file: the host never opens it blocking
    reason = only_reason(dry())
    assert reason["reason"] == "weights_unreadable" and "best_model.pt" in reason["message"]
    refused_before_any_debit(host["url"], "weights_unreadable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_parent_weights_without_read_permission_are_a_reason(host):
    weight_file().chmod(0)
    assert only_reason(dry())["reason"] == "weights_unreadable"


def test_wrong_size_parent_weights_are_a_reason_even_where_the_dry_run_does_not_hash(
        host, tmp_path, monkeypatch):
    """The registry records the weights' size: a changed size is caught without hashing, so
    also when the operator's registry.dry_run_hash_mb leaves the dry run no hashing."""
    operator_conf(tmp_path, monkeypatch, "registry:\n  dry_run_hash_mb: 0\n")
    assert dry()["would_launch"] is True
    with open(weight_file(), "ab") as f:
        f.write(b"\0" * 7)
    reason = only_reason(dry())
    assert reason["reason"] == "weights_size" and reason["field"] == "parent_artifact_id"
    assert reason["recorded_bytes"] + 7 == reason["size_bytes"]
    refused_before_any_debit(host["url"], "weights_size")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("parent", [INTERNAL, EXTERNAL])
def test_weights_whose_hash_differs_from_the_registry_are_a_reason(host, parent):
    """Same size, one byte changed: sha256 of the files (never unpickled) against the
    registry's content_hash; the dry run hashes weights this small."""
    assert dry(parent)["would_launch"] is True
    path = weight_file(parent) if parent == INTERNAL else host["outside"] / "best_model.pt"
    flip_a_byte(path)
    reason = only_reason(dry(parent))
    assert reason["reason"] == "weights_integrity" and reason["field"] == "parent_artifact_id"
    assert "sha256" in reason["message"]
    refused_before_any_debit(host["url"], "weights_integrity", parent=parent)


def test_big_weights_are_hashed_by_the_real_call_before_the_debit(host, tmp_path, monkeypatch):
    """Over registry.dry_run_hash_mb the dry run checks names and sizes only (hashing a
    large checkpoint on every dry run is too slow); the real call hashes them all before
    the debit, so a changed byte still costs nothing."""
    operator_conf(tmp_path, monkeypatch, "registry:\n  dry_run_hash_mb: 0\n")
    flip_a_byte(weight_file())
    result = dry()
    assert result["would_launch"] is True
    assert result["checkpoint"]["weights"]["hashed"] is False
    refused_before_any_debit(host["url"], "weights_integrity")


# --- the disk, the GPU, the dataset --------------------------------------------------------------

def test_not_enough_disk_is_a_reason(host, monkeypatch):
    assert dry()["would_launch"] is True
    monkeypatch.setenv("FORGE_MIN_FREE_GB", str(10**9))
    reason = only_reason(dry())
    assert reason["reason"] == "disk_full" and reason["field"] == "registry.min_free_gb"
    refused_before_any_debit(host["url"], "disk_full")


def test_a_gpu_requested_but_not_visible_is_a_reason(host, monkeypatch):
    """nvidia-smi lists one more GPU than this host has device nodes for (none here; on a GPU
    host, the GPU past its last /dev/nvidiaN). The sandbox binds only nodes that exist, so
    the old plan billed GPU hours for a job that ran on the CPU."""
    nodes = [n for n in glob.glob("/dev/nvidia*") if n.removeprefix("/dev/nvidia").isdigit()]
    count = len(nodes) + 1
    monkeypatch.setattr(devices, "gpu_names", lambda: ("NVIDIA H100 80GB HBM3",) * count)
    reason = only_reason(dry(device="h100", devices=count))
    assert reason["reason"] == "gpu_not_visible" and reason["field"] == "device"
    assert f"/dev/nvidia{count - 1}" in reason["message"]
    refused_before_any_debit(host["url"], "gpu_not_visible", device="h100", devices=count)


def test_a_dataset_file_that_cannot_be_fetched_is_a_reason(host, tmp_path):
    data = tmp_path / "mine.h5ad"
    data.write_bytes(b"not really h5ad, but a file")
    catalog.register_dataset("dataset-mine", "mine", {
        "source": "user", "external_id": "mine", "url": data.as_uri(), "license": "CC0",
        "format": "h5ad", "row_count": 1, "schema_summary": "test",
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest()},
        metadata={"load_options": {"label_key": "cell_type"}})
    assert dry(dataset="dataset-mine")["would_launch"] is True
    data.unlink()
    reason = only_reason(dry(dataset="dataset-mine"))
    assert reason["reason"] == "dataset_unavailable" and reason["field"] == "dataset_artifact_id"
    assert str(tmp_path) not in reason["message"]
    refused_before_any_debit(host["url"], "dataset_unavailable", dataset="dataset-mine")


def test_a_builtin_not_in_the_cache_is_not_a_reason(host):
    """A built-in dataset not fetched yet needs the network: the dry run never downloads,
    and cannot know that the fetch fails, so it says nothing."""
    assert sandbox.unavailable() is None
    result = dry()
    assert result["would_launch"] is True and result["reasons"] == []


def test_weights_in_the_blob_store_are_checked_too(host, base_checkpoint):
    """Files over registry.blob_threshold_mb live in the content-addressed blob store, named
    by the weights folder's blobs.json: a blob gone is the parent's weights gone."""
    stored = weights.store("model-test-blobs", base_checkpoint, blob_threshold_mb=0)
    catalog.register_model(
        artifact_id="model-test-blobs", title="blobs", created_by="test",
        content_hash=stored["sha256"],
        metadata={"family": "scgpt", "framework": "scgpt", "architecture": ARCH,
                  "weights": {k: stored[k] for k in ("sha256", "files", "size_bytes")}})
    result = dry("model-test-blobs")
    assert result["would_launch"] is True and result["checkpoint"]["weights"]["hashed"] is True
    weight_file("model-test-blobs").unlink()  # the blob itself
    reason = only_reason(dry("model-test-blobs"))
    assert reason["reason"] == "weights_missing" and "best_model.pt" in reason["message"]
