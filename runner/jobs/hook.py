"""The post-run hook: a finished MLflow run becomes a registered candidate version.

`register_model_version()` checks the metrics and computes the improvement over the parent,
then writes, in ONE transaction: the `artifacts` and `model_versions` rows and links, the
`world_model_improvements` row and the `events` row (`catalog.register_trained_version`),
and the allocation's settlement (`ledger.settle`). Either all of it lands or none of it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from runner.errors import TrainingFailed
from runner.registry import catalog, db, ledger


@dataclass
class RunRecord:
    """Everything the hook needs to know about a finished job (the host's run manifest)."""

    artifact_id: str
    title: str
    metadata: dict
    dataset_artifact_id: str
    agent_id: str
    allocation_id: str
    actual_seconds: float
    code_repo_url: str
    code_commit_sha: str
    code_entrypoint: str
    training_started_at: datetime
    training_completed_at: datetime
    training_params: dict
    eval_metrics: dict
    primary_metric: str
    content_hash: str
    mlflow_run_id: str
    mlflow_model_uri: str | None = None
    changelog: str | None = None


# Bounded metrics by name: fractions live in [0, 1]; losses and errors are >= 0.
_FRACTION = ("accuracy", "f1", "precision", "recall", "auroc")
_NON_NEGATIVE = ("loss", "mse", "mae", "rmse")
# Metrics where lower is better (the rest: higher is better).
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse")
# SciDEX's improvement buckets, by the absolute delta of the primary metric.
BUCKETS = ((0.01, "low"), (0.03, "medium"), (0.10, "high"), (math.inf, "very_high"))


def bucket(delta: float) -> str:
    """SciDEX's bucket of an improvement, by its absolute size."""
    return next(name for limit, name in BUCKETS if abs(delta) < limit)


def check_metrics(metrics: dict, primary: str) -> None:
    """Metrics must be present, numeric, finite and in range; the primary one among them."""
    if not metrics:
        raise TrainingFailed("the trainer reported no metrics", reason="empty_metrics",
                             fix="check the job log: evaluation did not run")
    bad = {k: v for k, v in metrics.items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)}
    if bad:
        raise TrainingFailed(f"non-finite or non-numeric metrics: {_shown(bad)}",
                             reason="nan_metrics",
                             fix="lower the learning rate or check the data for NaNs")
    out = {k: v for k, v in metrics.items() if not _in_range(k.lower(), v)}
    if out:
        raise TrainingFailed(f"metrics out of range: {_shown(out)}", reason="metric_out_of_range",
                             fix="accuracy and F1 lie in [0, 1], losses are >= 0: the trainer "
                                 "reported impossible values")
    if primary not in metrics:
        raise TrainingFailed(
            f"primary metric {primary!r} is missing from {_shown(sorted(metrics))}",
            reason="missing_metric", fix="the trainer must report it")


def _in_range(name: str, value: float) -> bool:
    if any(word in name for word in _FRACTION):
        return 0.0 <= value <= 1.0
    if any(word in name for word in _NON_NEGATIVE):
        return value >= 0.0
    return True


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."


def split_metrics(metrics: dict) -> dict:
    """The version's own evaluation at the top; the baseline's and the training curve's
    numbers under their own keys, so nobody mistakes them for the candidate's."""
    own: dict = {}
    baseline: dict = {}
    training: dict = {}
    for key, value in sorted(metrics.items()):
        if key.startswith("baseline_"):
            baseline[key.removeprefix("baseline_")] = value
        elif key.startswith(("train_", "val_", "best_")) or key == "epochs_trained":
            training[key] = value
        else:
            own[key] = value
    if baseline:
        own["baseline"] = baseline
    if training:
        own["training"] = training
    return own


def improvement(primary: str, value: float, parent: dict | None, split: dict | None,
                dataset_id: str, task: str | None = None) -> dict:
    """The magnitude of a new version: its primary metric minus its parent's, on the same
    metric, task, dataset and held-out cells (signed so that > 0 is better), with SciDEX's
    bucket; or None with the reason the two are not comparable. A metric name recurs across
    tasks (test_loss: masked MSE, or cross-entropy), so another task's value never compares."""
    version = (parent or {}).get("version") or {}
    theirs = (version.get("eval_metrics_json") or {}).get(primary)
    their_meta = (parent or {}).get("metadata") or {}
    their_split = their_meta.get("split") or {}
    why = None
    if parent is None:
        why = "a version trained from scratch has no parent"
    elif not isinstance(theirs, (int, float)) or isinstance(theirs, bool):
        why = f"the parent has no {primary}"
    elif task and their_meta.get("task") not in (None, task):
        why = f"the parent was trained for another task ({their_meta['task']})"
    elif version.get("eval_dataset_artifact_id") != dataset_id:
        why = "the parent was evaluated on another dataset"
    elif not split or (their_split.get("sha256") or {}).get("test") != \
            (split.get("sha256") or {}).get("test"):
        why = "the parent was evaluated on other held-out cells"
    if why:
        return {"magnitude": None, "magnitude_reason": why, "bucket": None,
                "parent_value": theirs if isinstance(theirs, (int, float)) else None}
    delta = value - theirs
    if any(word in primary for word in LOWER_IS_BETTER):
        delta = -delta
    return {"magnitude": delta, "magnitude_reason": None, "bucket": bucket(delta),
            "parent_value": theirs}


def register_model_version(parent_artifact_id: str | None, run: RunRecord) -> dict:
    """Map a finished run onto the registry; returns the new artifact with its version row."""
    check_metrics(run.eval_metrics, run.primary_metric)
    with db.transaction() as conn:
        parent = (catalog.get_model_version(parent_artifact_id, conn=conn)
                  if parent_artifact_id else None)  # None: a root version, from scratch
        value = run.eval_metrics[run.primary_metric]
        gain = improvement(run.primary_metric, value, parent, run.metadata.get("split"),
                           run.dataset_artifact_id, run.metadata.get("task"))
        detection = {"primary_metric": run.primary_metric, "value": value, **gain,
                     "parent_artifact_id": parent_artifact_id,
                     "dataset_artifact_id": run.dataset_artifact_id,
                     "mlflow_run_id": run.mlflow_run_id, "allocation_id": run.allocation_id}
        model = catalog.register_trained_version(
            parent_artifact_id=parent_artifact_id, dataset_artifact_id=run.dataset_artifact_id,
            artifact_id=run.artifact_id, title=run.title, metadata=run.metadata,
            created_by=run.agent_id, content_hash=run.content_hash, changelog=run.changelog,
            version=dict(
                code_repo_url=run.code_repo_url, code_commit_sha=run.code_commit_sha,
                code_entrypoint=run.code_entrypoint,
                training_started_at=run.training_started_at,
                training_completed_at=run.training_completed_at,
                gpu_allocation_id=run.allocation_id,
                training_params_json=run.training_params,
                eval_metrics_json=split_metrics(run.eval_metrics),
                mlflow_run_id=run.mlflow_run_id, mlflow_model_uri=run.mlflow_model_uri),
            magnitude=gain["magnitude"], detection=detection, conn=conn)
        ledger.settle(run.allocation_id, run.actual_seconds, status="settled",
                      artifact_id=model["id"], conn=conn)
    return model
