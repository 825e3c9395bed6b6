"""The gate's truth is the host's: an eval job that forges the held-out labels (or the
baseline, or the cells) cannot promote a candidate.

The forging job is the real eval code (a copy of this repository's trainers/) whose last step
rewrites predictions.json: the candidate predicts one class for every cell, and the job claims
that those are the true labels and that the baseline gets every cell wrong. On the old code the
host bootstrapped against the job's `true` and promoted a candidate with 8 bytes of weights.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import AGENT, BASE_ID, DATASET_ID, TINY, cbmc_split, stand_in_candidate

from runner.api import evaluate_candidate, train_model_version
from runner.errors import EvaluationFailed, GateRefused, TrainingFailed
from runner.registry import catalog, ledger

REPO = Path(__file__).resolve().parents[1]

# Runs the real evaluation, then forges its predictions.json.
FORGER = """
    import json, pathlib, sys
    from trainers import gate_eval_real
    code = gate_eval_real.main()
    m = json.load(open(sys.argv[1]))
    path = pathlib.Path(m["output_dir"]) / "predictions.json"
    doc = json.load(open(path))
    n = len(doc["cells"])
    MODE
    json.dump(doc, open(path, "w"))
    sys.exit(code)
"""

FORGERIES = {
    # the candidate's own (constant) predictions claimed as the truth; the baseline all wrong
    "forged_truth": """
    doc["true"] = [0] * n
    doc["pred"] = {"candidate": [0] * n, "baseline": [1] * n}
    """,
    # the cells and the truth of a split of its own choosing
    "forged_cells": """
    doc["cells"] = list(range(n))
    doc["true"] = [0] * n
    doc["pred"] = {"candidate": [0] * n, "baseline": [1] * n}
    """,
    # the label names shuffled, so that codes would mean other classes
    "forged_names": """
    doc["label_names"] = list(reversed(doc["label_names"]))
    """,
}


def forging_repo(tmp_path: Path, mode: str) -> Path:
    """This checkout's trainers/, committed, whose eval job runs the real one and then forges
    its predictions.json (FORGERIES[mode]); tests/test_family_scvi_jobs.py uses it too."""
    repo = tmp_path / "forging-code"
    shutil.copytree(REPO / "trainers", repo / "trainers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "trainers" / "gate_eval.py").rename(repo / "trainers" / "gate_eval_real.py")
    body = textwrap.dedent(FORGER).replace("MODE", textwrap.dedent(FORGERIES[mode]).strip())
    (repo / "trainers" / "gate_eval.py").write_text(body)
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "forger"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


@pytest.mark.sandbox
def test_a_job_that_forges_the_truth_cannot_promote(sqlite_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(forging_repo(tmp_path, "forged_truth")))
    cand = stand_in_candidate(BASE_ID, "model-forged-truth")
    result = evaluate_candidate(cand, AGENT, allow_dirty=True)
    assert result["decision"] == "rejected", result
    (vs_baseline,) = result["comparisons"]
    assert vs_baseline["comparator_role"] == "baseline"
    # the host's truth: one class for every cell is far below the baseline's 0.9
    assert vs_baseline["candidate_value"] < 0.2 and vs_baseline["comparator_value"] > 0.8
    assert vs_baseline["n_cells"] == cbmc_split()["counts"]["test"]
    fresh = catalog.get_model_version(cand)
    assert fresh["version"]["promotion_state"] == "rejected" and not fresh["is_latest"]
    assert catalog.get_artifact(BASE_ID)["lifecycle_state"] != "superseded"


@pytest.mark.parametrize("mode", ["forged_cells", "forged_names"])
@pytest.mark.sandbox
def test_a_job_that_forges_the_cells_or_labels_is_refused(sqlite_registry, tmp_path,
                                                         monkeypatch, mode):
    monkeypatch.setenv("FORGE_CODE_REPO", str(forging_repo(tmp_path, mode)))
    cand = stand_in_candidate(BASE_ID, f"model-{mode.replace('_', '-')}")
    with pytest.raises(EvaluationFailed) as failed:
        evaluate_candidate(cand, AGENT, allow_dirty=True)
    assert failed.value.field == "predictions.json", failed.value
    assert catalog.get_model_version(cand)["version"]["promotion_state"] == "candidate"


def test_a_split_that_does_not_rebuild_is_refused_before_any_debit(sqlite_registry, monkeypatch):
    """The host rebuilds the held-out cells itself: a recorded digest it cannot rebuild is
    refused before the debit, without launching anything."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(REPO))
    split = cbmc_split()
    split["sha256"]["test"] = "a" * 64  # the record of another split
    cand = stand_in_candidate(BASE_ID, "model-forged-split", split)
    before = ledger.balance(AGENT)
    with pytest.raises(GateRefused) as refused:
        evaluate_candidate(cand, AGENT, allow_dirty=True)
    assert refused.value.reason == "split_mismatch", refused.value
    assert ledger.balance(AGENT) == before
    assert not [a for a in ledger.list_allocations(agent_id=AGENT)
                if a.get("purpose") == "evaluation"]


# A training job: the real trainer, then `TAIL` on its outputs.
WRAPPED_TRAINER = """
import json, pathlib, sys
from trainers import entrypoint_real
code = entrypoint_real.main()
m = json.load(open(sys.argv[1]))
out = pathlib.Path(m["output_dir"])
TAIL
sys.exit(code)
"""

BOAST = """
doc = json.load(open(out / "result.json"))
for k in ("test_accuracy", "test_macro_f1"):
    doc["metrics"][k] = 1.0
doc["metrics"]["baseline_test_macro_f1"] = 0.0
json.dump(doc, open(out / "result.json", "w"))
"""

# a test pass over half the held-out cells, as limit_eval_batches made one
HALF_TEST = """
doc = json.load(open(out / "predictions.json"))
half = len(doc["cells"]) // 2
doc["cells"] = doc["cells"][:half]
doc["pred"] = {k: v[:half] for k, v in doc["pred"].items()}
json.dump(doc, open(out / "predictions.json", "w"))
"""


def wrapped_trainer(tmp_path: Path, tail: str) -> Path:
    """This checkout's trainers/, committed, whose training job runs the real trainer and then
    `tail` on its outputs; tests/test_family_scvi_jobs.py uses it too."""
    repo = tmp_path / "wrapped-code"
    shutil.copytree(REPO / "trainers", repo / "trainers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "trainers" / "entrypoint.py").rename(repo / "trainers" / "entrypoint_real.py")
    (repo / "trainers" / "entrypoint.py").write_text(WRAPPED_TRAINER.replace("TAIL", tail))
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "wrapped"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


def _train() -> dict:
    return train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                               vram_cap_gb=1, overrides=TINY, allow_dirty=True)


@pytest.mark.sandbox
@pytest.mark.train
def test_training_metrics_are_the_hosts(sqlite_registry, tmp_path, monkeypatch):
    """A training job that claims a perfect test score gets the host's measurement of its
    per-cell predictions recorded, not its claim."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(wrapped_trainer(tmp_path, BOAST)))
    out = _train()
    metrics = out["eval_metrics"]
    assert metrics["test_macro_f1"] < 0.9 and metrics["test_accuracy"] < 1.0, metrics
    assert metrics["baseline"]["test_macro_f1"] > 0.8, metrics
    meta = catalog.get_artifact(out["artifact_id"])["metadata"]
    assert meta["split"] == cbmc_split() and meta["test_cells"] == meta["split"]["counts"]["test"]
    assert np.isclose(meta["baseline"]["metrics"]["baseline_test_macro_f1"],
                      metrics["baseline"]["test_macro_f1"])


@pytest.mark.sandbox
@pytest.mark.train
def test_a_partial_test_pass_is_refused(sqlite_registry, tmp_path, monkeypatch):
    """Test metrics cover every held-out cell or are not recorded: `partial_test`, settled."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(wrapped_trainer(tmp_path, HALF_TEST)))
    with pytest.raises(TrainingFailed) as failed:
        _train()
    assert failed.value.reason == "partial_test" and failed.value.field == "predictions.json"
    (alloc,) = ledger.list_allocations(agent_id=AGENT, status="failed")
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
