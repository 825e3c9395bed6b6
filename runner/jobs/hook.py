"""The post-run hook: a finished MLflow run becomes a registered candidate version.

`register_model_version()` checks the metrics and computes the improvement over the parent,
then writes, in ONE transaction: the allocation's settlement (`ledger.settle`), the
`artifacts` and `model_versions` rows and links, the `world_model_improvements` row (with the
agent, the allocation and its settled cost) and the `events` row
(`catalog.register_trained_version`). Either all of it lands or none of it does.

`improvement()` and `bucket()` are the one rule for how much better a version is: like with
like (same metric, task, dataset and held-out cells, every one of them scored) or nothing, and
signed by the metric's direction, so that only a gain > 0 has a SciDEX bucket.
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
# SciDEX's improvement buckets, by the size of a gain (> 0) of the primary metric.
BUCKETS = ((0.01, "low"), (0.03, "medium"), (0.10, "high"), (math.inf, "very_high"))


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def gain(metric: str, delta: float) -> float:
    """A difference of `metric` (new minus old) as a gain: > 0 is better, whatever the
    metric's direction (a loss that drops by 0.1 gains 0.1)."""
    return -delta if lower_is_better(metric) else delta


def bucket(magnitude: float | None) -> str | None:
    """SciDEX's bucket of an improvement, by the size of its gain; None for no improvement (a
    gain at or below zero, or none measured): a regression is never a large improvement."""
    if magnitude is None or not magnitude > 0:  # NaN too
        return None
    return next(name for limit, name in BUCKETS if magnitude < limit)


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


def improvement(metric: str, value: float, parent: dict | None, record: dict,
                dataset_id: str) -> dict:
    """The magnitude of a new version: its `metric` minus its parent's, signed so that > 0 is
    better (`gain`), with SciDEX's bucket; or None with the reason the two are not comparable.
    `record` is the new version's metadata (task, split, test_cells). Like with like: the same
    metric of the same task (test_loss is masked MSE after pretraining, cross-entropy after
    fine-tuning), the same dataset, the same held-out cells (the split's test digest, on both
    sides) and every one of them scored (test_cells equal to the split's test count)."""
    version = (parent or {}).get("version") or {}
    theirs = (version.get("eval_metrics_json") or {}).get(metric)
    why = _not_comparable(metric, theirs, parent, record, dataset_id)
    parent_value = theirs if _number(theirs) else None
    if why:
        return {"magnitude": None, "magnitude_reason": why, "bucket": None,
                "parent_value": parent_value}
    magnitude = gain(metric, value - theirs)
    return {"magnitude": magnitude, "magnitude_reason": None, "bucket": bucket(magnitude),
            "parent_value": parent_value}


def _not_comparable(metric: str, theirs, parent: dict | None, record: dict,
                    dataset_id: str) -> str | None:
    if parent is None:
        return "a version trained from scratch has no parent"
    if not _number(theirs):
        return f"the parent has no {metric}"
    their_record = parent.get("metadata") or {}
    if their_record.get("task") != record.get("task"):
        return f"the parent was trained for another task ({their_record.get('task')})"
    if (parent.get("version") or {}).get("eval_dataset_artifact_id") != dataset_id:
        return "the parent was evaluated on another dataset"
    mine = _test_digest(record)
    if mine is None:
        return "this version records no held-out cells (no split digest)"
    if _test_digest(their_record) != mine:
        return "the parent was evaluated on other held-out cells"
    for who, rec in (("this version", record), ("the parent", their_record)):
        cells = rec.get("test_cells")
        held_out = ((rec.get("split") or {}).get("counts") or {}).get("test")
        if not isinstance(cells, int) or cells != held_out:
            scored = "an unrecorded number" if cells is None else cells
            return f"{who}'s test metrics cover {scored} of its {held_out} held-out cells"
    return None


def _test_digest(record: dict) -> str | None:
    return ((record.get("split") or {}).get("sha256") or {}).get("test")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def register_model_version(parent_artifact_id: str | None, run: RunRecord) -> dict:
    """Map a finished run onto the registry; returns the new artifact with its version row."""
    check_metrics(run.eval_metrics, run.primary_metric)
    with db.transaction() as conn:
        parent = (catalog.get_model_version(parent_artifact_id, conn=conn)
                  if parent_artifact_id else None)  # None: a root version, from scratch
        value = run.eval_metrics[run.primary_metric]
        change = improvement(run.primary_metric, value, parent, run.metadata,
                             run.dataset_artifact_id)
        detection = {"primary_metric": run.primary_metric, "value": value, **change,
                     "parent_artifact_id": parent_artifact_id,
                     "dataset_artifact_id": run.dataset_artifact_id,
                     "mlflow_run_id": run.mlflow_run_id, "allocation_id": run.allocation_id}
        # settled first, so that the improvement row carries the cost the work settled at
        alloc = ledger.settle(run.allocation_id, run.actual_seconds, status="settled",
                              artifact_id=run.artifact_id, conn=conn)
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
            magnitude=change["magnitude"], detection=detection, cost=alloc["actual_cost"],
            conn=conn)
    return model
