"""The job's metrics stream: one JSON line per point, appended to one file in the output dir.

    {"key": "val_loss", "value": 0.41, "step": 120, "ts": 1700000000000}

The host relays new lines into its own MLflow run while the job runs (runner/jobs/tracking.py
MetricRelay). A plain append-only file is the whole channel: the host opens it without
following links and without blocking, and never points an MLflow client at a tree the job
wrote. `JsonLinesLogger` is the Lightning logger that writes it; the lines themselves are
trainers/metrics_stream.py's, which families without Lightning use directly.
"""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from trainers.metrics_stream import append_metrics


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
        append_metrics(self.path, metrics, step)
