"""The job's metrics stream: one JSON line per point, appended to one file in the output dir.

    {"key": "val_loss", "value": 0.41, "step": 120, "ts": 1700000000000}

The host relays new lines into its own MLflow run while the job runs (runner/jobs/tracking.py
MetricRelay). A plain append-only file is the whole channel: the host opens it without
following links and without blocking, and never points an MLflow client at a tree the job
wrote. Plain Python, so that a family without Lightning (trainers/linear) writes the same
lines as trainers/metrics_log.py's Lightning logger.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def metric_lines(metrics: dict, step: int | None, ts_ms: int | None = None) -> str:
    """The JSON lines for one call to log_metrics (non-finite values are written as they are:
    the host skips them with a warning, and the trainer's own checks fail the run)."""
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    lines = []
    for key, value in metrics.items():
        value = float(value)
        point = {"key": str(key), "value": value if math.isfinite(value) else str(value),
                 "step": int(step or 0), "ts": ts}
        lines.append(json.dumps(point) + "\n")
    return "".join(lines)


def append_metrics(path: str | Path, metrics: dict, step: int | None = None) -> None:
    """Append one call's points to the stream: open, append, close, so the lines are on disk
    for the host at once."""
    if metrics:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(metric_lines(metrics, step))
