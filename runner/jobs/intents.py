"""Settle-and-register intents: a finished job whose registration met a registry outage.

When the registry is away, or locked past FORGE_DB_LOCK_TIMEOUT_S, as a finished job
registers, the job is not thrown away. Its weights are already in the weights store, and
what the registration needs (the hook's RunRecord, the MLflow names) is written to
FORGE_HOME/intents/<allocation id>.json, atomically. The host retries with backoff for
`registry.registration_retry_s`; after that, or once the host is gone, the reaper
(runner.jobs.recovery.reap: every launch and submit, and `forge ledger reap`) completes it as
soon as the registry answers. Completing re-validates the outputs with the checks of the first
attempt (the stored weights against their hash, the metrics, the metadata schema), then
registers the version and settles the allocation in one transaction
(hook.register_model_version), or settles it `failed`, charging the seconds the job ran
(and undoes the weights and MLflow entries, as a failed launch does). Then the intent is gone,
and a retry of the same request gets that outcome. One process completes an intent at a
time (a lock on its file).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from runner import settings
from runner.errors import ForgeError, RegistrationFailed
from runner.jobs import hook, tracking, weights
from runner.registry import db, ledger

PENDING_FIX = ("nothing more is debited: the job's outputs are kept, and the host (or `forge "
               "ledger reap`, which every launch runs first) registers the version as soon as "
               "the registry answers; call again with the same request to get it")


def intents_dir() -> Path:
    return settings.forge_home() / "intents"


def path_for(allocation_id: str) -> Path:
    return intents_dir() / f"{allocation_id}.json"


def write(record: hook.RunRecord, parent_artifact_id: str | None, mlflow: dict) -> Path:
    """Keep what registering `record` later needs; a reader sees all of it or nothing.
    `mlflow`: tracking_uri, registered_model, version, model_id (what to finish or undo)."""
    path = path_for(record.allocation_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"parent_artifact_id": parent_artifact_id, "mlflow": mlflow,
            "record": dataclasses.asdict(record)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, default=lambda v: v.isoformat())  # datetimes: the only others
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def pending_error(allocation_id: str, why: str) -> RegistrationFailed:
    return RegistrationFailed(f"allocation {allocation_id} finished training; its registration "
                              f"waits for the registry ({why})", reason="registration_pending",
                              fix=PENDING_FIX)


# --- completing -----------------------------------------------------------------------------------

def complete(path: Path) -> dict | None:
    """Complete one intent now: `{"allocation_id", "status": "registered", "artifact_id"}` or
    `{"allocation_id", "status": "failed", "error": ForgeError}`; None when another process is
    completing it, or has. Raises the registry's error while it is away (the intent stays)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if not path.exists():  # the process that held the lock completed it
            return None
        intent = json.loads(fh.read())
        outcome = _complete(intent)
        path.unlink(missing_ok=True)
        return outcome


def complete_retrying(path: Path, budget_s: float) -> dict | None:
    """`complete`, retried with backoff while the registry is away, for `budget_s`; the
    outcome (also when another process completed it meanwhile), or None if still pending."""
    allocation_id = path.stem
    deadline = time.monotonic() + budget_s
    delay = 1.0
    while True:
        try:
            outcome = complete(path)
            if outcome is None and not path.exists():
                outcome = outcome_of(ledger.get_allocation(allocation_id))
            if outcome is not None:
                return outcome
        except Exception as exc:
            if not db.outage(exc):
                raise
        if time.monotonic() + delay > deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


def complete_pending() -> list[dict]:
    """The reaper's pass: complete every intent whose registry answers; the rest stay for the
    next pass. Never raises."""
    done = []
    for path in sorted(intents_dir().glob("alloc-*.json")):
        try:
            outcome = complete(path)
        except Exception as exc:  # noqa: BLE001 - still away: the next reap tries again
            _warn(f"intent {path.name} stays pending: {type(exc).__name__}: "
                  f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
            continue
        if outcome is not None:
            done.append(outcome)
    return done


def outcome_of(alloc: dict) -> dict | None:
    """What a closed allocation's intent came to; None while it is open."""
    if alloc["status"] not in ledger.FINAL_STATES:
        return None
    if alloc["status"] == "settled" and alloc["artifact_id"]:
        return {"allocation_id": alloc["id"], "status": "registered",
                "artifact_id": alloc["artifact_id"]}
    return {"allocation_id": alloc["id"], "status": "failed", "error": RegistrationFailed(
        f"allocation {alloc['id']} is {alloc['status']}: {alloc['failure_reason']}",
        fix="the seconds the job ran are charged, the rest refunded; submit it again")}


def _complete(intent: dict) -> dict:
    fields = {f.name for f in dataclasses.fields(hook.RunRecord)}
    raw = {k: v for k, v in intent["record"].items() if k in fields}
    for key in ("training_started_at", "training_completed_at"):
        raw[key] = datetime.fromisoformat(raw[key])
    record = hook.RunRecord(**raw)
    mlflow = intent["mlflow"]
    alloc = ledger.get_allocation(record.allocation_id)  # raises while the registry is away
    if alloc["status"] in ledger.FINAL_STATES:
        if alloc["status"] == "settled" and alloc["artifact_id"] == record.artifact_id:
            _finish_run(mlflow, record)  # the registration committed as the connection broke
            return outcome_of(alloc)  # type: ignore[return-value]
        _undo(mlflow, record, f"allocation {alloc['status']} before registration")
        return outcome_of(alloc)  # type: ignore[return-value]
    try:
        _revalidate(record)
        hook.register_model_version(intent["parent_artifact_id"], record)
    except ForgeError as exc:  # the outputs are not intact, or the registry refuses them
        ledger.settle(record.allocation_id, record.actual_seconds, status="failed",
                      reason=f"{exc.reason}: {exc}"[:500])
        _undo(mlflow, record, str(exc))
        error = exc if isinstance(exc, RegistrationFailed) else RegistrationFailed(
            f"the kept outputs of allocation {record.allocation_id} were not registered: "
            f"{exc.message}", reason=exc.reason, field=exc.field, fix=exc.fix)
        return {"allocation_id": record.allocation_id, "status": "failed", "error": error}
    _finish_run(mlflow, record)
    return {"allocation_id": record.allocation_id, "status": "registered",
            "artifact_id": record.artifact_id}


def _revalidate(record: hook.RunRecord) -> None:
    """The kept weights still hash to what the host measured when the job ended: checked by
    materializing them as a parent is (hard links on the same disk). The metrics and the
    metadata are checked again by the registration itself."""
    home = settings.forge_home()
    with tempfile.TemporaryDirectory(dir=home, prefix=".recheck-") as tmp:
        weights.materialize({"id": record.artifact_id, "origin_type": "internal",
                             "content_hash": record.content_hash}, Path(tmp) / "weights")


def _finish_run(mlflow: dict, record: hook.RunRecord) -> None:
    def finish(client) -> None:
        client.set_tag(record.mlflow_run_id, "forge.artifact_id", record.artifact_id)
        tracking.finish(client, record.mlflow_run_id, ok=True, reason="ok")

    _on_mlflow(mlflow, "could not mark the run FINISHED", finish)


def _undo(mlflow: dict, record: hook.RunRecord, why: str) -> None:
    """The version is not registered: undo what the launch made for it, as a failed launch
    does (weights, the MLflow candidate and logged model), and mark the run FAILED."""
    def undo(client) -> None:
        if mlflow.get("registered_model") and mlflow.get("version"):
            tracking.unregister(client, mlflow["registered_model"], mlflow["version"])
        if mlflow.get("model_id"):
            tracking.delete_model(client, mlflow["model_id"])
        client.set_tag(record.mlflow_run_id, "forge.error", why[:5000])
        tracking.finish(client, record.mlflow_run_id, ok=False, reason="registration_failed")

    weights.remove(record.artifact_id)
    _on_mlflow(mlflow, "could not undo the MLflow entries", undo)


def _on_mlflow(mlflow: dict, what: str, step) -> None:
    try:
        step(tracking.client(mlflow["tracking_uri"]))
    except Exception as exc:  # noqa: BLE001 - the books are settled; MLflow is the view
        _warn(f"{what} of {mlflow.get('run_id')}: {type(exc).__name__}: {exc}"[:500])


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
