"""The scvi family through the real job path: plan -> debit -> jail -> register -> gate.

1-2. An SCVI base trained from scratch (as the demo trains it), a scANVI candidate fine-tuned
     from it with train_model_version() and gated; the candidate's stored weights read back by
     scvi-tools itself and its registered MLflow model served. On SQLite: what lands in the
     registry is the family seam's, the same for every family, and the seam's tests run it
     on PostgreSQL too (tests/test_family_seam.py, tests/test_end_to_end.py).
3.   An SCVI base (trained once in-process, registered from its folder) mapped onto a dataset
     with other genes (scArches): the dry run's overlap, recorded with the version.
4.   The jail of a scvi job is an scGPT job's; a scANVI job that boasts a perfect score, or
     whose eval forges the held-out cells, is judged on the host's truth.

Every run is 2 epochs of 4 batches: the file takes 3-4 minutes on 2 shared cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import AGENT, BASE_ID, DATASET_ID

from runner.api import evaluate_candidate, train_model_version
from runner.errors import EvaluationFailed
from runner.jobs import weights
from runner.jobs.launch import launch
from runner.jobs.plan import TrainRequest, prepare
from runner.registry import catalog

SCVI_BASE = "model-scvi-cbmc-base"  # conf/parent/scvi_cbmc_base.yaml's artifact id
SHORT = ["training.max_epochs=2", "training.limit_train_batches=4"]
OTHER_DATASET = "dataset-cbmc-other-genes"


def _train_base() -> dict:
    """The SCVI base, from scratch on the same path as every job (runner/demo.py's)."""
    plan = prepare(TrainRequest(SCVI_BASE, DATASET_ID, AGENT,
                                overrides=("training=pretrain_scvi", *SHORT),
                                wall_time_cap_min=5, vram_cap_gb=1, from_scratch=True,
                                parent_option="scvi_cbmc_base"))
    assert not plan.problems, plan.problems
    launch(plan)
    return catalog.get_artifact(SCVI_BASE)


# One worker runs this module under `make test` (--dist loadgroup), so the SCVI parent below
# is trained once, not once per test that uses it (module fixtures are torn down whenever a
# worker moves on to another module's test).
pytestmark = pytest.mark.xdist_group("family_scvi_jobs")


@pytest.fixture(scope="module")
def scvi_checkpoint(tmp_path_factory) -> Path:
    """An SCVI checkpoint trained once for the tests below by the recipe in-process (the same
    2 short epochs), which each registers as an external base from its folder
    (register_parent: a scvi-tools folder with forge.json, as an operator brings one)."""
    from runner.jobs.datasets import fetch
    from trainers.manifest import parse_manifest
    from trainers.scvi import recipe

    out = tmp_path_factory.mktemp("scvi-base")
    recipe.train(parse_manifest({
        "family": "scvi", "task": "pretrain_scvi", "seed": 0, "device": "cpu",
        "output_dir": str(out), "parent": None, "model": {},
        "dataset": {"path": str(fetch("cbmc")), "format": "cbmc_mat", "name": "cbmc"},
        "training": {"max_epochs": 2, "limit_train_batches": 4, "split_seed": 0}}), {})
    return out / "checkpoint"


def _register_base(folder: Path) -> None:
    from runner.jobs.parents import register_parent

    register_parent(SCVI_BASE, folder.as_uri(), family="scvi")


def _finetune(parent: str, dataset: str = DATASET_ID, **kw) -> dict:
    return train_model_version(parent, dataset, agent_id=AGENT, wall_time_cap_min=5,
                               vram_cap_gb=1, overrides=SHORT, **kw)


def _tracking_uri() -> str:
    from runner.config.compose import compose_config, to_plain

    return to_plain(compose_config())["tracking"]["tracking_uri"]


def _cbmc():
    from runner.jobs import datasets
    from trainers.data.load import load

    return load(datasets.loader_input("cbmc", datasets.fetch("cbmc")), "cbmc_mat")


# --- 1 and 2: SCVI base -> scANVI candidate -> gate, and the candidate read back -------------

@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_scanvi_candidate_end_to_end(sqlite_registry, committed_code, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    base = _train_base()
    assert base["metadata"]["family"] == "scvi" and base["parent_version_id"] is None
    result = _finetune(SCVI_BASE)

    cand = catalog.get_model_version(result["artifact_id"])
    assert cand["parent_version_id"] == SCVI_BASE and cand["lifecycle_state"] == "candidate"
    assert (SCVI_BASE, "derives_from") in {
        (link["target_id"], link["link_type"]) for link in catalog.links(cand["id"])}
    meta = cand["metadata"]
    assert (meta["family"], meta["framework"], meta["task"]) == \
        ("scvi", "scvi-tools", "finetune_celltype")
    assert cand["version"]["promotion_state"] == "candidate"
    recorded = cand["version"]["eval_metrics_json"]
    assert 0.0 < recorded["test_accuracy"] <= 1.0

    decision = evaluate_candidate(cand["id"], AGENT)
    assert decision["decision"] in ("promoted", "rejected")
    (vs,) = decision["comparisons"]
    assert vs["comparator_role"] == "baseline"  # an SCVI parent cannot classify
    assert vs["n_cells"] == meta["split"]["counts"]["test"]
    assert catalog.get_model_version(cand["id"])["version"]["promotion_state"] == \
        decision["decision"]

    _read_back(cand, recorded["test_accuracy"])


def _read_back(cand: dict, recorded_accuracy: float) -> None:
    """scvi-tools loads the stored weights and predicts the recorded split's test cells with
    the host's accuracy; the registered MLflow model gives the same labels."""
    import mlflow
    import pandas as pd

    data, test, names = _scanvi_predicts(cand)
    truth = np.asarray(data.label_names)[data.labels[test]]
    assert (names == truth).mean() == pytest.approx(recorded_accuracy, abs=1e-6)

    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(_tracking_uri()):  # for this load only: later tests set their own
        served = mlflow.pyfunc.load_model(cand["version"]["mlflow_model_uri"]).predict(
            pd.DataFrame(data.X[test], columns=data.genes))
    assert served["cell_type"].tolist() == names.tolist()


def _scanvi_predicts(cand: dict):
    """(CBMC, the recorded split's test cells, the labels SCANVI.load(stored weights)
    predicts for them), the split rebuilt from the recorded seed and fractions."""
    import scvi

    from trainers.data.load import split_cells
    from trainers.scvi.recipe import counts_anndata

    data = _cbmc()
    meta, params = cand["metadata"], cand["version"]["training_params_json"]["training"]
    seed = params["seed"] if params["split_seed"] is None else params["split_seed"]
    split = split_cells(data.n_cells, data.labels, params["val_fraction"],
                        params["test_fraction"], seed)
    assert split.summary() == meta["split"]

    folder = weights.weights_dir(cand["id"])
    sidecar = json.loads((folder / "forge.json").read_text())
    adata = counts_anndata(data.X[split.test], data.genes)
    adata.obs[sidecar["labels_key"]] = sidecar["unlabeled_category"]
    model = scvi.model.SCANVI.load(str(folder), adata=adata, accelerator="cpu")
    return data, split.test, np.asarray(model.predict(adata)).astype(str)


# --- 3: the SCVI base mapped onto a dataset with other genes (scArches) ----------------------

def _other_genes_dataset(folder: Path) -> tuple[str, list[str]]:
    """CBMC with 400 of its 500 genes plus 50 under names the base never saw, as an h5ad of
    counts with a label column, registered with its citation (read by the trainer's loader)."""
    import anndata
    import pandas as pd

    from runner.jobs.datasets import register_file

    data = _cbmc()
    renamed = [f"RENAMED_{i}" for i in range(50)]
    adata = anndata.AnnData(X=np.asarray(data.X[:, :450], dtype=np.float32),
                            var=pd.DataFrame(index=data.genes[:400] + renamed))
    adata.obs["cell_type"] = np.asarray(data.label_names)[data.labels]
    path = folder / "cbmc_other_genes.h5ad"
    adata.write_h5ad(path)
    register_file(OTHER_DATASET, path.as_uri(), title="CBMC, 400 genes + 50 renamed",
                  license="CC BY 4.0", label_key="cell_type")
    return OTHER_DATASET, renamed


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_reference_mapping_onto_other_genes(sqlite_registry, scvi_checkpoint, committed_code,
                                            tmp_path, monkeypatch):
    from runner.jobs.job import run_dir

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    _register_base(scvi_checkpoint)
    dataset, renamed = _other_genes_dataset(tmp_path)

    dry = _finetune(SCVI_BASE, dataset, dry_run=True)
    assert dry["would_launch"], dry["reasons"]
    overlap = dry["checkpoint"]["genes"]
    assert (overlap["matched"], overlap["dataset_genes"], overlap["fraction"]) == \
        (400, 450, round(400 / 450, 4))
    assert overlap["unmatched_examples"] == renamed[:10]

    result = _finetune(SCVI_BASE, dataset)
    cand = catalog.get_model_version(result["artifact_id"])
    assert cand["parent_version_id"] == SCVI_BASE and cand["lifecycle_state"] == "candidate"
    assert cand["version"]["training_dataset_artifact_id"] == dataset
    assert cand["metadata"]["genes"] == overlap  # the host's reading, recorded
    log = (run_dir(cand["version"]["gpu_allocation_id"]) / "job.log").read_text()
    assert "400 genes (50 dropped)" in log and "parent scvi_query_mapped" in log
    # the candidate reads the base's 500 genes (scArches keeps the reference's)
    sidecar = json.loads((weights.weights_dir(cand["id"]) / "forge.json").read_text())
    assert sidecar["genes"] == _cbmc().genes and sidecar["model_class"] == "SCANVI"


# --- 4: the jail is the same for every family; a scANVI job is judged on the host's truth ----

def _scvi_parent_files(folder: Path) -> Path:
    """An SCVI checkpoint folder as the recipe writes it: forge.json over CBMC's genes, and a
    stand-in model.pt (a dry run never opens it)."""
    from trainers.scvi.settings import MODEL_DEFAULTS

    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"stand-in")
    (folder / "forge.json").write_text(json.dumps({
        "model_class": "SCVI", "scvi_version": "1.4.2", "task": "pretrain_scvi",
        "architecture": MODEL_DEFAULTS, "genes": _cbmc().genes, "label_names": None,
        "labels_key": None, "unlabeled_category": None}))
    return folder


def test_a_scvi_job_gets_the_jail_of_an_scgpt_job(sqlite_registry, committed_code, tmp_path,
                                                  monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    _register_base(_scvi_parent_files(tmp_path / "scvi"))
    plans = {}
    for family, parent in (("scvi", SCVI_BASE), ("scgpt", BASE_ID)):
        dry = _finetune(parent, dry_run=True, verbose=True)
        assert dry["would_launch"], dry["reasons"]
        assert dry["config"]["parent"]["family"] == family
        plans[family] = dry["sandbox"]
    # the same code pin and caps: the same bwrap argv (binds, namespaces, limits, env), word
    # for word; the family is only the manifest's business
    assert plans["scvi"] == plans["scgpt"]
    assert "--unshare-net" in plans["scvi"]["argv"]
    assert plans["scvi"]["network"].startswith("loopback only")
    assert plans["scvi"]["inputs_planned"] == ["manifest.json", "dataset", "parent"]


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_a_scanvi_job_is_judged_on_the_hosts_truth(sqlite_registry, scvi_checkpoint, tmp_path,
                                                  monkeypatch):
    """tests/test_security_gate_truth.py's attacks on a scANVI job: the real recipe claims a
    perfect test score (BOAST) and gets the host's measurement recorded; the real eval job
    swaps in held-out cells and a truth of its own (forged_cells) and is refused."""
    from test_security_gate_truth import BOAST, forging_repo, wrapped_trainer

    _register_base(scvi_checkpoint)
    monkeypatch.setenv("FORGE_CODE_REPO", str(wrapped_trainer(tmp_path, BOAST)))
    result = _finetune(SCVI_BASE)
    metrics = result["eval_metrics"]
    assert metrics["test_accuracy"] < 1.0 and metrics["test_macro_f1"] < 1.0, metrics
    assert metrics["baseline"]["test_macro_f1"] > 0.8, metrics  # not the claimed 0.0
    cand = catalog.get_model_version(result["artifact_id"])
    data, test, names = _scanvi_predicts(cand)  # the host's number is the model's
    truth = np.asarray(data.label_names)[data.labels[test]]
    assert cand["version"]["eval_metrics_json"]["test_accuracy"] == \
        pytest.approx((names == truth).mean(), abs=1e-6)

    monkeypatch.setenv("FORGE_CODE_REPO", str(forging_repo(tmp_path, "forged_cells")))
    with pytest.raises(EvaluationFailed) as failed:
        evaluate_candidate(cand["id"], AGENT)
    assert failed.value.field == "predictions.json", failed.value
    assert catalog.get_model_version(cand["id"])["version"]["promotion_state"] == "candidate"
