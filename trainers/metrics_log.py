"""The job's metrics stream: one JSON line per point, appended to one file in the output dir.

    {"key": "val_loss", "value": 0.41, "step": 120, "ts": 1700000000000}

The host relays new lines into its own MLflow run while the job runs (runner/jobs/tracking.py
MetricRelay). A plain append-only file is the whole channel: the host opens it without
following links and without blocking, and never points an MLflow client at a tree the job
wrote. `JsonLinesLogger` is the Lightning logger that writes it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only


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


class JsonLinesLogger(Logger):
    """Lightning logger that appends every metric point to `path`. Each call opens, appends
    and closes, so the lines are on disk for the host at once, and Lightning's finalize()
    after fit() does not end the stream that test() still writes to."""

    def __init__(self, path: str | Path, name: str = "forge", version: str = "0"):
        super().__init__()
        self.path = Path(path)
        self._name, self._version = name, version
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """The host records the resolved config as the run's params; nothing to stream."""

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if metrics:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(metric_lines(metrics, step))
