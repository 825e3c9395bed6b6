"""The host's MLflow side of a job: the host owns the run; the sandbox's metrics are relayed in.

The trainer appends metric points as JSON lines to one file, `/job/out/metrics.jsonl`
(trainers/metrics_log.py). `MetricRelay` reads what is new in that file every couple of
seconds while the job runs, and once more when it ends, and logs it to the host run. The
file is the job's: it is opened without following links or blocking, read within caps, and
checked point by point; no MLflow client ever reads a tree the job wrote. mlflow is imported
here only, and only when a real launch needs it: the dry run never loads it.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runner.jobs.handback import NotPlainFile, read_job_file
from runner.sandbox import printable  # stdlib only: no torch, no mlflow

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
        # FORGE_HOME defaults to ./outputs: a relative root is the cwd's, as for the registry
        location = (Path(artifact_root).resolve() / name).as_uri()
        return mlflow_client.create_experiment(name, artifact_location=location)
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


# MLflow's rule for metric names (mlflow.utils.validation), in ASCII: letters, digits,
# _ - . space : / ; at most 250 characters; no path that normalises to another name.
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_\-. :/]{1,250}$")


def valid_metric_name(name) -> bool:
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        return False
    norm = posixpath.normpath(name)
    return norm == name and norm != "." and not norm.startswith(("..", "/"))


class MetricRelay:
    """Relays the job's metrics stream (JSON lines `{"key", "value", "step", "ts"}`) into
    the host run, incrementally from the last offset.

    The file is untrusted: it is opened O_RDONLY|O_NOFOLLOW|O_NONBLOCK and must be a regular
    file by fstat (a link, FIFO or device is ignored with a warning, so the relay neither
    follows nor blocks); at most `max_bytes` are read and `max_points` relayed; a point with
    an invalid name, a non-finite or non-numeric value, or a malformed line is skipped with a
    warning. Warnings go to `warn` (default: stderr), the first `MAX_WARNINGS` one by one."""

    MAX_WARNINGS = 20
    MAX_LINE = 64 * 1024

    def __init__(self, host_client, host_run_id: str, metrics_path: Path, interval_s: float = 2.0,
                 *, max_bytes: int = 64 * 1024**2, max_points: int = 200_000, warn=None):
        self.host = host_client
        self.run_id = host_run_id
        self.path = Path(metrics_path)
        self.interval_s = interval_s
        self.max_bytes, self.max_points = max_bytes, max_points
        self.warn_line = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.offset = 0  # bytes of the file consumed so far
        self.pending = b""  # a last line without its newline yet
        self._relayed = 0
        self.skipped = 0
        self.warnings = 0
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metric-relay", daemon=True)

    def __enter__(self) -> "MetricRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.sync(final=True)  # everything, once the job has ended
        except Exception as exc:  # noqa: BLE001 -- eval metrics come from result.json
            self._warn(f"last relay pass failed: {type(exc).__name__}: {exc}"[:300])
        if self.skipped:
            self._warn(f"{self.skipped} metric point(s) skipped in total", once="total")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 -- the host store may be busy: next pass
                self._warn(f"relay pass failed: {type(exc).__name__}: {exc}"[:300], once="pass")

    def _warn(self, message: str, once: str | None = None) -> None:
        if once is not None:
            if once in self._warned:
                return
            self._warned.add(once)
        self.warnings += 1
        if self.warnings <= self.MAX_WARNINGS:
            self.warn_line(f"[metrics] {printable(message)}")
        elif self.warnings == self.MAX_WARNINGS + 1:
            self.warn_line("[metrics] more warnings suppressed")

    def _read_new(self) -> bytes:
        """New bytes of the stream, within the byte cap; b"" if there is nothing safe to read."""
        budget = max(0, self.max_bytes - self.offset)
        try:
            data, size = read_job_file(self.path, offset=self.offset, limit=budget)
        except FileNotFoundError:
            return b""
        except NotPlainFile as exc:
            self._warn(f"{self.path.name} {exc}; only a regular file is relayed, never a link "
                       "or a FIFO", once="open")
            return b""
        self.offset += len(data)
        if size > self.offset and self.offset >= self.max_bytes:
            self._warn(f"{self.path.name} is over {self.max_bytes} bytes: the rest is not "
                       "relayed", once="bytes")
        return data

    def _points(self, data: bytes, final: bool) -> list:
        from mlflow.entities import Metric

        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        if final and self.pending:
            lines.append(self.pending)
            self.pending = b""
        if len(self.pending) > self.MAX_LINE:  # a line that never ends: drop it
            self.pending = b""
            lines.append(b"")
            self._warn(f"a line over {self.MAX_LINE} bytes skipped", once="line")
        points = []
        for raw in lines:
            point = self._parse(raw)
            if point is None:
                self.skipped += 1
                continue
            if self._relayed + len(points) >= self.max_points:
                self._warn(f"over {self.max_points} metric points: the rest is not relayed",
                           once="points")
                break
            points.append(Metric(*point))
        return points

    def _parse(self, raw: bytes) -> tuple[str, float, int, int] | None:
        """(key, value, timestamp ms, step) of one line, or None (with a warning)."""
        if not raw.strip() or len(raw) > self.MAX_LINE:
            if raw.strip():
                self._warn(f"a line over {self.MAX_LINE} bytes skipped", once="line")
            return None
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            self._warn("a line that is not JSON skipped", once="json")
            return None
        if not isinstance(obj, dict):
            self._warn("a line that is not a JSON object skipped", once="json")
            return None
        key, value = obj.get("key"), obj.get("value")
        step, ts = obj.get("step", 0), obj.get("ts")
        if not valid_metric_name(key):
            self._warn(f"metric {str(key)[:80]!r} skipped: names may only hold letters, digits "
                       "and _ - . space : / (at most 250)", once=f"name:{str(key)[:80]}")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            self._warn(f"metric {key!r}: a value that is not a finite number skipped",
                       once=f"value:{key}")
            return None
        if ts is None:
            ts = int(time.time() * 1000)
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63
               for v in (step, ts)):
            self._warn(f"metric {key!r}: a step or ts that is not a non-negative integer "
                       "skipped", once=f"step:{key}")
            return None
        return key, float(value), ts, step

    def sync(self, final: bool = False) -> int:
        """Relay every new point; returns how many were sent."""
        with self._lock:
            if self._relayed >= self.max_points:
                return 0
            fresh = self._points(self._read_new(), final)
            for i in range(0, len(fresh), METRICS_PER_BATCH):
                self.host.log_batch(self.run_id, metrics=fresh[i:i + METRICS_PER_BATCH])
                self._relayed += len(fresh[i:i + METRICS_PER_BATCH])
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
                       artifact_id: str, lifecycle_state: str = "candidate") -> dict[str, Any]:
    """Register the checkpoint as a new version of the family's registered model (a root
    version trained from scratch is `active`, as in the registry).

    A candidate is a state, not a pointer: many candidates of one family coexist, each tagged
    `forge.lifecycle_state=candidate` (find them with search_model_versions). Aliases name one
    version each (the eval gate's `champion`), so registering a candidate moves none of them,
    and parallel jobs never race on one."""
    try:
        mlflow_client.create_registered_model(name)
    except Exception as exc:  # already exists, or created concurrently by another job
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) and \
                "already exists" not in str(exc) and "UNIQUE constraint" not in str(exc):
            raise
    version = mlflow_client.create_model_version(
        name, source=source, run_id=run_id,
        tags={"forge.artifact_id": artifact_id, "forge.lifecycle_state": lifecycle_state})
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
