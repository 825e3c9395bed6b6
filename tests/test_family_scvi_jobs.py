"""The scvi family through the real job path: plan -> debit -> jail -> register -> gate.

An SCVI base trained from scratch (as the demo trains it), a scANVI candidate fine-tuned from
it with train_model_version() and gated, on SQLite and PostgreSQL; the candidate's stored
weights read back by scvi-tools itself and its MLflow model served; the candidate mapped onto
a dataset with other genes (scArches); the jail the same as scGPT's; and a scANVI job that
boasts a perfect score, or forges the held-out cells, is judged on the host's truth.
Every run is a couple of epochs of a few batches: the file takes a few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
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

REPO = Path(__file__).resolve().parents[1]
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
def test_scanvi_candidate_end_to_end(registry, committed_code, monkeypatch):
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
    import scvi

    from trainers.data.load import split_cells
    from trainers.scvi.recipe import counts_anndata

    data = _cbmc()
    meta, params = cand["metadata"], cand["version"]["training_params_json"]["training"]
    seed = params["seed"] if params["split_seed"] is None else params["split_seed"]
    split = split_cells(data.n_cells, data.labels, params["val_fraction"],
                        params["test_fraction"], seed)
    assert split.summary() == meta["split"]
    test = split.test

    folder = weights.weights_dir(cand["id"])
    sidecar = json.loads((folder / "forge.json").read_text())
    adata = counts_anndata(data.X[test], data.genes)
    adata.obs[sidecar["labels_key"]] = sidecar["unlabeled_category"]
    model = scvi.model.SCANVI.load(str(folder), adata=adata, accelerator="cpu")
    names = np.asarray(model.predict(adata)).astype(str)
    truth = np.asarray(data.label_names)[data.labels[test]]
    assert (names == truth).mean() == pytest.approx(recorded_accuracy, abs=1e-6)

    mlflow.set_tracking_uri(_tracking_uri())
    served = mlflow.pyfunc.load_model(cand["version"]["mlflow_model_uri"]).predict(
        pd.DataFrame(data.X[test], columns=data.genes))
    assert served["cell_type"].tolist() == names.tolist()
