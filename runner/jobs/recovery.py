"""The host's half of recovery: after the registry's reaper has settled the dead allocations
(runner.registry.recovery.reap), their MLflow runs are marked FAILED and their run folders
cleaned. The registry knows nothing of MLflow or of FORGE_HOME; this module does.
"""

from __future__ import annotations

import sys
from datetime import datetime

from runner.config.compose import compose_config, to_plain
from runner.jobs import engine, intents, tracking
from runner.jobs.job import clean_run_dir, run_dir
from runner.registry import recovery


def reap(now: datetime | None = None) -> list[dict]:
    """Complete the settle-and-register intents of finished jobs whose registration met a
    registry outage (intents.py: registered, or failed charging what ran), then settle every
    dead open allocation as failed, exactly once, and clean up after the ones this call
    closed; returns those. The clean-up cannot fail the reap: the books are settled first."""
    intents.complete_pending()  # first: a finished job is registered, not refunded whole
    reaped = recovery.reap(now, job_gone=engine.job_gone)  # SLURM knows hosts on other nodes
    clean_up(reaped)
    return reaped


def clean_up(reaped: list[dict]) -> None:
    """Mark the reaped allocations' MLflow runs FAILED (those still running) and clean their
    run folders (job.log and manifest.json kept); a failure is a warning."""
    _fail_runs([a for a in reaped if a["mlflow_run_id"]])
    _clean_run_dirs(reaped)


def _fail_runs(reaped: list[dict]) -> None:
    """Mark the reaped allocations' MLflow runs FAILED, in the operator's tracking store."""
    if not reaped:
        return
    try:
        client = tracking.client(to_plain(compose_config())["tracking"]["tracking_uri"])
    except Exception as exc:  # noqa: BLE001 - the books are already settled
        _warn(f"could not reach MLflow to mark {len(reaped)} reaped run(s) FAILED: {exc}")
        return
    for alloc in reaped:
        run_id = alloc["mlflow_run_id"]
        try:
            if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
                client.set_tag(run_id, "forge.error", alloc["failure_reason"][:5000])
                tracking.finish(client, run_id, ok=False, reason="reaped")
        except Exception as exc:  # noqa: BLE001
            _warn(f"could not mark MLflow run {run_id} FAILED: {exc}")


def _clean_run_dirs(reaped: list[dict]) -> None:
    if not reaped:
        return
    for alloc in reaped:
        clean_run_dir(run_dir(alloc["id"]))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
