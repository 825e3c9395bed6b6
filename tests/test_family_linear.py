"""The linear family (trainers/linear) on real CBMC, in-process: a from-scratch version is the
host's baseline (same predictions on the same split), its model.json gives the same labels
through predict() and through MLflow, inspect() reads it without executing anything, a parent
warm-starts the fit, and nothing in the family loads torch or Lightning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainers import scoring
from trainers.data.load import baseline_features, load, split_cells
from trainers.family import CheckpointError
from trainers.linear import checkpoint, recipe
from trainers.linear.family import FAMILY
from trainers.manifest import ManifestError, parse_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def cbmc_path() -> str:
    from runner.jobs import datasets

    return str(datasets.loader_input("cbmc", datasets.fetch("cbmc")))


def manifest(out: Path, parent: Path | None = None, **over) -> dict:
    return {"family": "linear", "task": "finetune_celltype", "seed": 0, "output_dir": str(out),
            "dataset": {"name": "cbmc", "path": cbmc_path(), "format": "cbmc_mat"},
            "parent": None if parent is None else {"checkpoint_dir": str(parent)}, **over}


# One worker runs this module under `make test` (--dist loadgroup), so the model below is
# fitted once, not once per test that uses it (module fixtures are torn down whenever a
# worker moves on to another module's test).
pytestmark = pytest.mark.xdist_group("family_linear")


@pytest.fixture(scope="module")
def cbmc():
    data = load(cbmc_path(), "cbmc_mat")
    return data, split_cells(data.n_cells, data.labels, 0.1, 0.1, 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear")
    state: dict = {}
    result = recipe.train(parse_manifest(manifest(out)), state)
    return out, result, state


def test_from_scratch_is_the_baseline(trained, cbmc):
    out, result, state = trained
    data, split = cbmc
    written = json.loads((out / "predictions.json").read_text())
    assert written["cells"] == split.test.tolist()
    baseline = scoring.logistic_regression_predict(baseline_features(data), data.labels,
                                                   split.train, split.test, seed=0)
    assert written["pred"]["candidate"] == baseline.tolist()
    m = result["metrics"]
    assert round(m["test_macro_f1"], 3) == 0.909 and m["converged"] == 1.0  # the baseline's
    assert state["split"] == split.summary() and state["device"] == "cpu"
    assert result["test_cells"] == len(split.test) == 862
    assert result["checkpoint"]["files"] == {
        "model.json": sha256_file(out / "checkpoint" / "model.json")}
    streamed = {json.loads(line)["key"] for line in (out / "metrics.jsonl").open()}
    assert {"val_macro_f1", "test_macro_f1", "test_f1/CD8 T"} <= streamed
    assert not [k for k in streamed if k.startswith("baseline_")]  # the host's to measure


def test_reload_predicts_the_same_labels(trained, cbmc):
    out, _, _ = trained
    data, split = cbmc
    candidate = json.loads((out / "predictions.json").read_text())["pred"]["candidate"]
    head, names = recipe.predict(out / "checkpoint", data, split.test, {})
    assert [names[i] for i in head] == [data.label_names[c] for c in candidate]

    # columns in another order, one gene gone: the model reorders, a missing gene counts 0
    order = np.random.default_rng(0).permutation(len(data.genes))[1:]
    shuffled = type(data)(data.X[:, order], [data.genes[i] for i in order], data.labels,
                          data.label_names, data.value_kind)
    cp10k = baseline_features(shuffled)[split.test]  # scaled per cell without the lost gene
    expected = np.zeros((len(split.test), len(data.genes)), dtype=np.float32)
    expected[:, order] = cp10k
    model = checkpoint.load(out / "checkpoint")
    head2, _ = recipe.predict(out / "checkpoint", shuffled, split.test, {})
    assert head2.tolist() == model.decide(expected).tolist()


def test_mlflow_pyfunc_gives_the_same_labels(trained, cbmc, tmp_path):
    import mlflow
    import pandas as pd

    out, _, _ = trained
    data, split = cbmc
    candidate = json.loads((out / "predictions.json").read_text())["pred"]["candidate"]
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=str(ROOT / FAMILY.mlflow_model),
                             artifacts={"checkpoint": str(out / "checkpoint")},
                             code_paths=[str(ROOT / "trainers")])
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    counts = pd.DataFrame(data.X[split.test], columns=data.genes)
    predicted = model.predict(counts)
    assert predicted["cell_type"].tolist() == [data.label_names[c] for c in candidate]


def test_inspect_reads_model_json_and_refuses_the_rest(trained, tmp_path):
    out, _, _ = trained
    seen = FAMILY.inspect(out / "checkpoint")
    assert not seen.problems
    assert seen.architecture == {"features": "log1p_cp10k", "standardize": True}
    assert len(seen.genes) == 500 and len(seen.label_names) == 13
    assert seen.metadata["model_json_sha256"] == sha256_file(out / "checkpoint" / "model.json")

    doc = json.loads((out / "checkpoint" / "model.json").read_text())
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({**doc, "coef": doc["coef"][:-1]}))
    assert [p.field for p in FAMILY.inspect(folder).problems] == ["model.json.coef"]
    (folder / "model.json").write_text(json.dumps({**doc, "format_version": 2}))
    assert [p.reason for p in FAMILY.inspect(folder).problems] == ["unsupported_checkpoint"]
    (folder / "model.json").write_bytes(b"\x80\x04K\x01.")  # a pickle, not JSON
    with pytest.raises(CheckpointError, match="not valid JSON"):
        FAMILY.inspect(folder)
    (folder / "model.json").unlink()
    (folder / "model.json").symlink_to(out / "checkpoint" / "model.json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        FAMILY.inspect(folder)


def test_parent_warm_starts_the_fit(trained, tmp_path):
    out, result, _ = trained
    child: dict = {}
    again = recipe.train(parse_manifest(manifest(tmp_path, out / "checkpoint")), child)
    warm = again["parent"]["warm_start"]
    assert warm["warm_started"] and warm["genes"]["matched"] == 500
    assert warm["classes_matched"] == 13
    # the same convex problem from its own optimum: lbfgs stops at once, same labels
    assert again["metrics"]["n_iter"] < result["metrics"]["n_iter"]
    assert again["metrics"]["test_macro_f1"] == pytest.approx(result["metrics"]["test_macro_f1"],
                                                              abs=0.005)

    with pytest.raises(ManifestError, match="model.standardize"):
        recipe.train(parse_manifest(manifest(tmp_path / "x", out / "checkpoint",
                                             model={"standardize": False})), {})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        recipe.train(parse_manifest(manifest(tmp_path / "y", tmp_path / "broken")), {})
    assert e.value.field == "parent.model.json.format"


def test_no_torch_or_lightning(tmp_path):
    """A fresh interpreter trains, predicts and inspects with the family: neither torch nor
    Lightning is ever imported."""
    code = """
import json, sys
from trainers.linear import checkpoint, recipe
from trainers.linear.family import FAMILY
from trainers.manifest import parse_manifest
m = parse_manifest(json.loads(sys.argv[1]))
recipe.train(m, {})
FAMILY.inspect(m.output_dir + "/checkpoint")
heavy = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "pytorch_lightning",
                                                             "lightning"))
print(json.dumps(heavy))
"""
    raw = json.dumps(manifest(tmp_path))
    done = subprocess.run([sys.executable, "-c", code, raw], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_baseline_is_the_same_whatever_the_hosts_blas_threads(cbmc):
    """The host's truth and the jail's claim fit the same baseline, on any number of cores: the
    fit runs on one BLAS thread whatever the caller's pool (lbfgs's path follows BLAS's
    reductions: two threads gave macro-F1 0.9110 instead of 0.9095 on an AMD EPYC)."""
    from threadpoolctl import threadpool_limits

    data, split = cbmc
    fits = []
    for threads in (1, 2, 4):
        with threadpool_limits(threads):
            fits.append(scoring.logistic_regression_predict(
                baseline_features(data), data.labels, split.train, split.test, seed=0))
    assert all(np.array_equal(fits[0], fit) for fit in fits[1:])
