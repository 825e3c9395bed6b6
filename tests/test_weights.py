"""The weights store: plain folders, the content-addressed blob store above a size threshold,
external weights by file:// URL, and hash verification before any job sees them."""

from __future__ import annotations

import tarfile

import pytest

from runner.errors import WeightsIntegrityError
from runner.jobs import weights


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "args.json").write_text('{"embsize": 8}')
    (folder / "vocab.json").write_text('{"<pad>": 0}')
    (folder / "best_model.pt").write_bytes(b"\x00" * 4096)
    return folder


def test_small_files_stay_in_the_weights_folder(checkpoint, tmp_path):
    stored = weights.store("model-a", checkpoint, blob_threshold_mb=1)
    assert "blob" not in stored and (weights.weights_dir("model-a") / "best_model.pt").is_file()
    artifact = {"id": "model-a", "origin_type": "internal", "content_hash": stored["sha256"]}
    out = weights.materialize(artifact, tmp_path / "job-parent")
    assert weights.file_hashes(out) == weights.file_hashes(checkpoint)


def test_large_files_go_to_the_blob_store_by_content(checkpoint, tmp_path):
    stored = weights.store("model-b", checkpoint, blob_threshold_mb=0.001)  # ~1 KB
    sha = stored["files"]["best_model.pt"]
    assert stored["blob"] == "sha256" and weights.blob_path(sha).is_file()
    assert not (weights.weights_dir("model-b") / "best_model.pt").exists()
    assert (weights.weights_dir("model-b") / weights.BLOB_INDEX).is_file()
    artifact = {"id": "model-b", "origin_type": "internal", "content_hash": stored["sha256"]}
    out = weights.materialize(artifact, tmp_path / "job-parent")
    assert weights.file_hashes(out) == weights.file_hashes(checkpoint)


def test_tampered_weights_are_refused(checkpoint, tmp_path):
    stored = weights.store("model-c", checkpoint)
    (weights.weights_dir("model-c") / "best_model.pt").write_bytes(b"evil")
    artifact = {"id": "model-c", "origin_type": "internal", "content_hash": stored["sha256"]}
    with pytest.raises(WeightsIntegrityError) as err:
        weights.materialize(artifact, tmp_path / "job-parent")
    assert err.value.field == "content_hash"


@pytest.mark.parametrize("packed", [False, True])
def test_external_weights_by_file_url_are_verified(checkpoint, tmp_path, packed):
    url = checkpoint.as_uri()
    if packed:
        archive = tmp_path / "ckpt.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(checkpoint, arcname="checkpoint")
        url = archive.as_uri()
    good = weights.tree_hash(weights.file_hashes(checkpoint))
    artifact = {"id": "model-ext", "origin_type": "external", "origin_url": url,
                "content_hash": good}
    out = weights.materialize(artifact, tmp_path / "job-parent")
    assert weights.tree_hash(weights.file_hashes(out)) == good
    with pytest.raises(WeightsIntegrityError):
        weights.materialize({**artifact, "content_hash": "0" * 64}, tmp_path / "other")
