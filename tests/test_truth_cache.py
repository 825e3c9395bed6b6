"""The host's held-out truth keeps its logistic-regression baseline in the cache: one fit per
(dataset content, reading, split, seed, fitting code), shared by a sweep's jobs and the gate;
a cached file that does not read back as the held-out cells' codes is refitted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from runner.jobs import truth

DATASET = {"format": "h5ad", "label_key": "cell_type", "gene_key": None, "use_raw": False,
           "source": "tiny"}
SPLIT = {"split_seed": None, "val_fraction": 0.1, "test_fraction": 0.25}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A 3-type h5ad of 120 cells, and a cache of the test's own."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(0)
    labels = np.repeat(["B", "NK", "T"], 40)
    counts = rng.poisson(2.0, (120, 30)).astype(np.float32)
    for i, name in enumerate(("B", "NK", "T")):
        counts[labels == name, 5 * i:5 * i + 5] += rng.poisson(6.0, (40, 5))
    adata = anndata.AnnData(X=counts, obs=pd.DataFrame({"cell_type": labels},
                                                       index=[f"c{i}" for i in range(120)]),
                            var=pd.DataFrame(index=[f"g{j}" for j in range(30)]))
    path = tmp_path / "tiny.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))
    return path


def rebuild(path, seed=0, content_hash="a" * 64):
    return truth.rebuild(path, DATASET, seed=seed, content_hash=content_hash, **SPLIT)


def kept(tmp_path) -> list:
    folder = tmp_path / "cache" / truth.BASELINE_CACHE
    return sorted(folder.glob("*.npy")) if folder.is_dir() else []


def no_fit(*args, **kwargs):
    raise AssertionError("the baseline was fitted again")


def test_the_second_rebuild_reads_the_fit_the_first_kept(tiny, tmp_path, monkeypatch):
    first = rebuild(tiny)
    assert len(kept(tmp_path)) == 1 and len(first.baseline) == len(first.cells) == 30
    monkeypatch.setattr("trainers.scoring.logistic_regression_predict", no_fit)
    again = rebuild(tiny)
    assert np.array_equal(again.baseline, first.baseline) and again.split == first.split


def test_another_seed_or_dataset_is_fitted_anew(tiny, tmp_path):
    rebuild(tiny)
    rebuild(tiny, seed=1)
    rebuild(tiny, content_hash="b" * 64)
    assert len(kept(tmp_path)) == 3


def test_without_the_datasets_hash_nothing_is_kept(tiny, tmp_path):
    rebuild(tiny, content_hash=None)
    assert kept(tmp_path) == []


@pytest.mark.parametrize("damage", ["empty", "garbage", "short", "out_of_range", "floats",
                                    "pickle"])
def test_a_damaged_cache_file_is_refitted(tiny, tmp_path, damage):
    fresh = rebuild(tiny).baseline
    (path,) = kept(tmp_path)
    if damage in ("empty", "garbage"):
        path.write_bytes(b"" if damage == "empty" else b"not numpy")
    else:
        value = {"short": fresh[:-1], "out_of_range": fresh + 3,
                 "floats": fresh.astype(float), "pickle": np.array([{"x": 1}], dtype=object)}
        with open(path, "wb") as f:
            np.save(f, value[damage], allow_pickle=True)
    assert np.array_equal(rebuild(tiny).baseline, fresh)
    assert np.array_equal(np.load(path, allow_pickle=False), fresh)  # and kept right again


def test_a_host_process_that_finds_the_fit_imports_no_sklearn(tiny, tmp_path):
    """What the cache saves each job's host process: scikit-learn's import (about 2 s) and
    the fit."""
    rebuild(tiny)
    code = ("import json, sys\n"
            "from pathlib import Path\n"
            "from runner.jobs import truth\n"
            f"h = truth.rebuild(Path({str(tiny)!r}), {DATASET!r}, seed=0, "
            f"content_hash={'a' * 64!r}, **{SPLIT!r})\n"
            "print(json.dumps([h.baseline.tolist(), "
            "sorted(m for m in sys.modules if m.startswith('sklearn'))]))\n")
    env = {**os.environ, "FORGE_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True)
    codes, imported = json.loads(done.stdout.splitlines()[-1])
    assert imported == [] and codes == rebuild(tiny).baseline.tolist()


CONCURRENT = """
import json, os, sys, time
from pathlib import Path
import trainers.scoring
from runner.jobs import truth

fit = trainers.scoring.logistic_regression_predict
def counted(*args, **kwargs):
    with open(sys.argv[2], "a") as f:
        f.write("fit\\n")
    time.sleep(0.5)  # a fit long enough for the others to miss the cache beside it
    return fit(*args, **kwargs)
trainers.scoring.logistic_regression_predict = counted
go = Path(sys.argv[3])
Path(f"{go}.ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
h = truth.rebuild(Path(sys.argv[1]), %r, seed=0, content_hash="a" * 64, **%r)
print(json.dumps(h.baseline.tolist()))
""" % (DATASET, SPLIT)  # noqa: UP031 - the braces in it are Python's


def test_concurrent_jobs_on_one_split_fit_the_baseline_once(tiny, tmp_path):
    """A parallel sweep's jobs end together on an empty cache: one fits, the others wait for
    its fit and read it (each would fit the same model otherwise)."""
    fits, go = tmp_path / "fits.log", tmp_path / "go"
    env = {**os.environ, "FORGE_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tiny), str(fits), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready.*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)  # every interpreter up and waiting at the go-file
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    codes = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(codes) == 1
    assert fits.read_text().count("fit") == 1
