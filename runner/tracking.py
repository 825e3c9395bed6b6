"""The host's MLflow side of a job: the host owns the run; the sandbox's metrics are relayed in.

The trainer logs to its own file store inside `/job/out/mlruns` (it can reach nothing else).
`MetricRelay` copies new metric points from that store into the host run every couple of
seconds while the job runs, and completely once it ends. mlflow is imported here only, and
only when a real launch needs it: the dry run never loads it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

MAX_PARAM_VALUE = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat `a.b.c` params, values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_VALUE]
    return out


def experiment_id(mlflow_client, name: str, artifact_root: Path) -> str:
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=(artifact_root / name).as_uri())
    except Exception:  # created concurrently by another job
        existing = mlflow_client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def open_run(mlflow_client, *, experiment: str, artifact_root: Path, run_name: str,
             tags: dict[str, str], params: dict[str, str], config_yaml: str,
             parent_run_id: str | None = None) -> tuple[str, str]:
    """Create the host run with tags, flattened params and the resolved config artifact."""
    from mlflow.entities import Param

    exp_id = experiment_id(mlflow_client, experiment, artifact_root)
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])
    mlflow_client.log_text(run_id, config_yaml, "config/resolved.yaml")
    mlflow_client.set_tag(run_id, "forge.config", "config/resolved.yaml")
    return exp_id, run_id


class MetricRelay:
    """Copies metric points from the sandbox-local file store into the host run."""

    def __init__(self, host_client, host_run_id: str, local_store: Path, interval_s: float = 2.0):
        self.host = host_client
        self.run_id = host_run_id
        self.local_store = local_store
        self.interval_s = interval_s
        self.seen: set[tuple[str, int, int, float]] = set()
        self.relayed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metric-relay", daemon=True)

    def __enter__(self) -> "MetricRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()  # everything, once the job has ended

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception:  # the store can be mid-write; the next pass catches up
                pass

    def sync(self) -> int:
        """Relay every metric point not relayed yet; returns how many were sent."""
        from mlflow.entities import Metric

        if not self.local_store.is_dir():
            return 0
        local = client(self.local_store.as_uri())
        fresh = []
        for exp in local.search_experiments():
            for run in local.search_runs([exp.experiment_id]):
                for key in run.data.metrics:
                    for m in local.get_metric_history(run.info.run_id, key):
                        ident = (m.key, m.step, m.timestamp, m.value)
                        if ident not in self.seen:
                            self.seen.add(ident)
                            fresh.append(Metric(m.key, m.value, m.timestamp, m.step))
        for i in range(0, len(fresh), METRICS_PER_BATCH):
            self.host.log_batch(self.run_id, metrics=fresh[i:i + METRICS_PER_BATCH])
        self.relayed += len(fresh)
        return len(fresh)


def log_outputs(mlflow_client, run_id: str, files: list[Path], checkpoint: Path | None) -> str | None:
    """Upload plots, the job log and the checkpoint; returns the checkpoint's artifact URI."""
    for path in files:
        if path.is_file():
            mlflow_client.log_artifact(run_id, str(path))
    if checkpoint is None or not checkpoint.is_dir():
        return None
    mlflow_client.log_artifacts(run_id, str(checkpoint), "checkpoint")
    return f"runs:/{run_id}/checkpoint"


def register_candidate(mlflow_client, *, name: str, run_id: str, source: str,
                       artifact_id: str) -> dict[str, Any]:
    """Register the checkpoint under the family name and point alias `candidate` at it."""
    try:
        mlflow_client.create_registered_model(name)
    except Exception as exc:  # already exists
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) and \
                "already exists" not in str(exc):
            raise
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id,
                                                 tags={"forge.artifact_id": artifact_id})
    mlflow_client.set_registered_model_alias(name, "candidate", version.version)
    return {"registered_model": name, "version": str(version.version),
            "model_uri": f"models:/{name}/{version.version}"}


def unregister(mlflow_client, name: str, version: str) -> None:
    try:
        mlflow_client.delete_model_version(name, version)
    except Exception:
        pass


def finish(mlflow_client, run_id: str, ok: bool, reason: str | None = None) -> None:
    if reason:
        mlflow_client.set_tag(run_id, "forge.outcome", reason)
    mlflow_client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
