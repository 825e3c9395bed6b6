"""The scvi-tools family on real CBMC, in-process, a few epochs each: SCVI pretraining, scANVI
fine-tuned from it, the checkpoint read back by scvi-tools itself, by the family's predict and
by its MLflow model, and a parent mapped onto a dataset with other genes (scArches). inspect()
reads forge.json only."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runner.jobs.datasets import fetch
from trainers.family import CheckpointError, NonFiniteLoss, get
from trainers.manifest import ManifestError, parse_manifest

ROOT = Path(__file__).parents[1]
FAST = {"max_epochs": 4, "batch_size": 128}


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _manifest(out, task, parent=None, dataset=None, training=None, model=None):
    dataset = dataset or {"path": str(fetch("cbmc")), "format": "cbmc_mat", "name": "cbmc"}
    return parse_manifest({
        "family": "scvi", "task": task, "seed": 0, "device": "cpu", "output_dir": str(out),
        "dataset": dataset, "parent": {"checkpoint_dir": str(parent)} if parent else None,
        "model": model or {}, "training": {**FAST, **(training or {})}})


def _train(m):
    from trainers.scvi import recipe

    state = {}
    result = recipe.train(m, state)
    return result, state


# One worker runs this module under `make test` (--dist loadgroup), so the models below are
# trained once: spread over the workers, between other modules' tests, each test that used
# them trained them again (SCVI four times and scANVI twice in one run: 60 s of setup).
pytestmark = pytest.mark.xdist_group("family_scvi")


@pytest.fixture(scope="module")
def cbmc():
    from trainers.data.load import load

    return load(fetch("cbmc"), "cbmc_mat", name="cbmc")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    result, state = _train(_manifest(out, "pretrain_scvi"))
    return out, result, state


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp("finetune")
    result, state = _train(_manifest(out, "finetune_celltype", pretrained[0] / "checkpoint"))
    return out, result, state


# --- plain data: settings and inspect, no training ---------------------------------------------

def test_settings_are_checked(tmp_path):
    m = _manifest(tmp_path, "pretrain_scvi")
    assert (m.model, m.training.max_epochs, m.training.lr) == ({}, 4, 1e-3)
    assert get("scvi").defaults("pretrain_scvi")["max_epochs"] == 60
    with pytest.raises(ManifestError) as e:
        _manifest(tmp_path, "pretrain_scvi", parent=tmp_path)
    assert e.value.field == "parent"
    with pytest.raises(ManifestError) as e:
        _manifest(tmp_path, "finetune_celltype", model={"gene_likelihood": "gaussian"})
    assert e.value.field == "model.gene_likelihood"
    with pytest.raises(ManifestError) as e:
        _manifest(tmp_path, "finetune_celltype", training={"batch_size": 1})
    assert e.value.field == "training.batch_size"


def test_inspect_reads_forge_json_only(tmp_path):
    inspect = get("scvi").inspect
    doc = {"model_class": "SCANVI", "scvi_version": "1.4.2", "task": "finetune_celltype",
           "architecture": {"n_latent": 30, "n_hidden": 128, "n_layers": 1,
                            "dropout_rate": 0.1, "gene_likelihood": "nb"},
           "genes": ["A", "B", "C"], "label_names": ["T", "B cell"], "labels_key": "forge_label",
           "unlabeled_category": "forge:unlabeled"}
    (tmp_path / "forge.json").write_text(json.dumps(doc))
    (tmp_path / "model.pt").write_bytes(b"\x80\x04 not a pickle at all")
    found = inspect(tmp_path)
    assert (found.genes, found.label_names, found.problems) == (["A", "B", "C"],
                                                                 ["T", "B cell"], [])
    assert found.architecture["n_latent"] == 30 and found.metadata["model_class"] == "SCANVI"

    (tmp_path / "forge.json").write_text(json.dumps({**doc, "model_class": "TOTALVI"}))
    assert [p.field for p in inspect(tmp_path).problems] == ["forge.json.model_class"]
    (tmp_path / "forge.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        inspect(tmp_path)
    assert e.value.field == "forge.json"
    (tmp_path / "forge.json").unlink()  # saved by scvi-tools elsewhere: the job reads model.pt
    found = inspect(tmp_path)
    assert found.genes is None and not found.problems and "model.pt" in found.metadata["note"]


def test_the_host_side_imports_nothing_heavy(tmp_path):
    """The dry run loads the family and inspects a checkpoint: no numpy, torch or scvi."""
    (tmp_path / "forge.json").write_text(json.dumps({"model_class": "SCVI", "genes": ["A"],
                                                      "architecture": {"n_latent": 5}}))
    code = ("import sys; from trainers.family import get; f = get('scvi'); "
            f"f.inspect({str(tmp_path)!r}); "
            "print(sorted({k.split('.')[0] for k in sys.modules} & "
            "{'numpy', 'torch', 'scvi', 'anndata', 'lightning', 'mlflow'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- real training ---------------------------------------------------------------------------

@pytest.mark.slow
def test_pretrain_scvi(pretrained, cbmc):
    out, result, state = pretrained
    metrics = result["metrics"]
    assert math.isfinite(metrics["test_elbo"]) and metrics["test_reconstruction_loss"] > 0
    assert result["test_cells"] == state["split"]["counts"]["test"] == 862
    assert set(result["checkpoint"]["files"]) == {"model.pt", "forge.json"}
    assert len(result["history"]) == metrics["epochs_trained"] == 4
    found = get("scvi").inspect(out / "checkpoint")
    assert found.genes == cbmc.genes and found.label_names is None and not found.problems
    assert found.metadata["model_class"] == "SCVI"
    stream = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {p["step"] for p in stream if p["key"] == "val_loss"} == {1, 2, 3, 4}
    assert any(p["key"] == "test_elbo" for p in stream)


@pytest.mark.slow
def test_finetune_from_scvi_and_read_back(finetuned, cbmc, tmp_path):
    import anndata
    import mlflow
    import pandas as pd
    import scvi

    from trainers.scoring import PREDICTIONS
    from trainers.scvi import recipe

    out, result, state = finetuned
    assert result["parent"] == {"model_class": "SCVI", "mapping": "from_scvi_model"}
    assert state["genes"] == {"in_vocab": 500, "dropped": 0, "vocab_size": 500,
                              "missing_zero": 0}
    pred = json.loads((out / PREDICTIONS).read_text())
    cells, codes = np.array(pred["cells"]), np.array(pred["pred"]["candidate"])
    truth = cbmc.labels[cells]
    assert len(cells) == result["test_cells"] == 862
    assert result["metrics"]["test_accuracy"] == pytest.approx((codes == truth).mean(), abs=0)
    assert result["metrics"]["test_accuracy"] > 0.8

    # scvi-tools' own loader predicts the same labels
    folder = out / "checkpoint"
    found = get("scvi").inspect(folder)
    assert found.label_names == cbmc.label_names and found.metadata["model_class"] == "SCANVI"
    adata = anndata.AnnData(X=cbmc.X[cells], var=pd.DataFrame(index=cbmc.genes))
    adata.obs[found.metadata["labels_key"]] = found.metadata["unlabeled_category"]
    model = scvi.model.SCANVI.load(str(folder), adata=adata, accelerator="cpu")
    names = np.asarray(model.predict(adata))
    assert [cbmc.label_names[c] for c in codes] == names.tolist()

    # the family's predict (the gate's) and the MLflow model
    head, head_names = recipe.predict(folder, cbmc, cells, {"seed": 0})
    assert [head_names[i] for i in head] == names.tolist()
    saved = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(saved), python_model="trainers/scvi/mlflow_model.py",
                             artifacts={"checkpoint": str(folder)})
    frame = pd.DataFrame(cbmc.X[cells[:200]], columns=cbmc.genes)
    served = mlflow.pyfunc.load_model(str(saved)).predict(frame)
    assert served["cell_type"].tolist() == names[:200].tolist()


@pytest.mark.slow
def test_a_diverging_run_is_a_non_finite_loss(tmp_path):
    with pytest.raises(NonFiniteLoss) as e:
        _train(_manifest(tmp_path, "pretrain_scvi",
                         training={"lr": 1e6, "max_epochs": 2, "limit_train_batches": 5}))
    assert e.value.stage == "train" and 0 < e.value.step <= 10


@pytest.mark.slow
def test_an_scvi_checkpoint_is_not_a_classifier(pretrained, cbmc, tmp_path):
    from trainers.scvi import recipe

    with pytest.raises(ManifestError) as e:  # the parent's forge.json decides the network
        _train(_manifest(tmp_path, "finetune_celltype", pretrained[0] / "checkpoint",
                         model={"n_latent": 12}))
    assert e.value.field == "model.n_latent" and "forge.json has 30" in str(e.value)

    with pytest.raises(CheckpointError, match="not a classifier") as e:
        recipe.predict(pretrained[0] / "checkpoint", cbmc, np.arange(10), {})
    assert e.value.field == "forge.json"


@pytest.mark.slow
def test_parent_mapped_onto_other_genes(pretrained, finetuned, cbmc, tmp_path):
    """A CBMC copy keeping 400 of the parent's 500 genes, plus 50 genes it never saw: the SCVI
    parent (and the scANVI one) are mapped onto it with scArches and fine-tuned."""
    import anndata
    import pandas as pd

    from trainers.scvi import recipe

    genes = cbmc.genes[:400] + [f"OTHER_{i}" for i in range(50)]
    X = np.concatenate([cbmc.X[:, :400], cbmc.X[:, 400:450]], axis=1)
    adata = anndata.AnnData(X=X, var=pd.DataFrame(index=genes))
    adata.obs["cell_type"] = np.array(cbmc.label_names)[cbmc.labels]
    path = tmp_path / "other_genes.h5ad"
    adata.write_h5ad(path)
    dataset = {"path": str(path), "format": "h5ad", "label_key": "cell_type", "name": "other"}
    want = {"in_vocab": 400, "dropped": 50, "vocab_size": 500, "missing_zero": 100}

    out = tmp_path / "from_scvi"
    result, state = _train(_manifest(out, "finetune_celltype", pretrained[0] / "checkpoint",
                                     dataset))
    assert result["parent"]["mapping"] == "scvi_query_mapped" and state["genes"] == want
    assert result["metrics"]["test_accuracy"] > 0.7
    assert get("scvi").inspect(out / "checkpoint").genes == cbmc.genes  # the parent's genes

    out = tmp_path / "from_scanvi"
    result, state = _train(_manifest(out, "finetune_celltype", finetuned[0] / "checkpoint",
                                     dataset, training={"max_epochs": 2}))
    assert result["parent"]["mapping"] == "scanvi_query_mapped" and state["genes"] == want
    pred = json.loads((out / "predictions.json").read_text())
    other = recipe.predict(out / "checkpoint", recipe_data(path), np.array(pred["cells"]), {})
    assert [n for n in np.array(other[1])[other[0]]] == \
        [pred["label_names"][c] for c in pred["pred"]["candidate"]]


def recipe_data(path):
    from trainers.data.load import load

    return load(path, "h5ad", "cell_type")
