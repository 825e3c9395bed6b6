"""The post-run hook: a finished MLflow run becomes a registered candidate version.

`register_model_version()` writes, in ONE transaction: the `artifacts` and `model_versions`
rows and links (through the catalog), the `world_model_improvements` row, the `events` row,
and the allocation's settlement. Either all of it lands or none of it does.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from runner import catalog, db, ledger
from runner.errors import TrainingFailed
from runner.schema import events, world_model_improvements

EVENT_TYPE = "model_version_trained"


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
    extra: dict = field(default_factory=dict)


def check_metrics(metrics: dict, primary: str) -> None:
    """Metrics must be present, numeric and finite; the primary one must be among them."""
    if not metrics:
        raise TrainingFailed("the trainer reported no metrics", reason="empty_metrics",
                             fix="check the job log: evaluation did not run")
    bad = {k: v for k, v in metrics.items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)}
    if bad:
        raise TrainingFailed(f"non-finite or non-numeric metrics: {bad}", reason="nan_metrics",
                             fix="lower the learning rate or check the data for NaNs")
    if primary not in metrics:
        raise TrainingFailed(f"primary metric {primary!r} is missing from {sorted(metrics)}",
                             reason="missing_metric", fix="the trainer must report it")


def register_model_version(parent_artifact_id: str, run: RunRecord) -> dict:
    """Map a finished run onto the registry; returns the new artifact with its version row."""
    check_metrics(run.eval_metrics, run.primary_metric)
    with db.get_engine().begin() as conn:
        parent = catalog.get_model_version(parent_artifact_id, conn=conn)
        model = catalog.register_model(
            artifact_id=run.artifact_id, title=run.title, metadata=run.metadata,
            created_by=run.agent_id, parent_artifact_id=parent_artifact_id,
            training_dataset_artifact_id=run.dataset_artifact_id,
            eval_dataset_artifact_id=run.dataset_artifact_id,
            origin_type="internal", content_hash=run.content_hash, changelog=run.changelog,
            version=dict(
                code_repo_url=run.code_repo_url, code_commit_sha=run.code_commit_sha,
                code_entrypoint=run.code_entrypoint,
                training_started_at=run.training_started_at,
                training_completed_at=run.training_completed_at,
                gpu_allocation_id=run.allocation_id,
                training_params_json=run.training_params, eval_metrics_json=run.eval_metrics,
                mlflow_run_id=run.mlflow_run_id, mlflow_model_uri=run.mlflow_model_uri),
            conn=conn)
        parent_metrics = (parent.get("version") or {}).get("eval_metrics_json") or {}
        baseline = parent_metrics.get(run.primary_metric)
        value = run.eval_metrics[run.primary_metric]
        magnitude = value - baseline if isinstance(baseline, (int, float)) else value
        stamp = catalog.now()
        detection = {"primary_metric": run.primary_metric, "value": value,
                     "parent_value": baseline, "parent_artifact_id": parent_artifact_id,
                     "dataset_artifact_id": run.dataset_artifact_id,
                     "mlflow_run_id": run.mlflow_run_id, "allocation_id": run.allocation_id}
        conn.execute(world_model_improvements.insert().values(
            id=f"wmi-{uuid.uuid4().hex}", event_type=EVENT_TYPE,
            target_artifact_id=model["id"], target_artifact_type="model",
            magnitude=magnitude, payout_status="pending", detection_metadata=detection,
            detected_at=stamp))
        conn.execute(events.insert().values(
            id=f"evt-{uuid.uuid4().hex}", type=EVENT_TYPE, source="forge-runner",
            created_at=stamp,
            payload={"artifact_id": model["id"], "version_number": model["version_number"],
                     "parent_artifact_id": parent_artifact_id,
                     "eval_metrics": run.eval_metrics, **detection}))
        ledger.settle(run.allocation_id, run.actual_seconds, status="settled",
                      artifact_id=model["id"], conn=conn)
    return model
