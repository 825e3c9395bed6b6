"""Asynchronous training jobs: a planned request is debited at once and handed to an engine
through submitit (its local executor on one machine, SLURM on a cluster), and the caller
gets the job id (the allocation id) back without waiting for the training.

The registry is the source of truth: the allocation's status is the job's state
(reserved = queued, running, settled = succeeded, failed, cancelled), its `engine` and
`engine_job_id` name the engine's job, and a finished job's result is rebuilt from the
registered version. The engine only runs `launch()` with the allocation the submission made.

- `submit(plan)`: reserve (debit) now, then submit `run_submitted(plan, allocation_id)`.
- `state(alloc)`: the job's state, progress (epoch, step, eta, the latest metrics, read from
  the host's MLflow run) and, when done, its result or error.
- `log_tail(alloc, n)`: the last lines of the job's log (the host writes it).
- `cancel(alloc)`: a queued job is refunded whole and never starts; a running one gets
  SIGTERM through its engine, so the launch stops the sandbox, charges the seconds it ran,
  refunds the rest and marks the MLflow run KILLED.

The local executor's controller runs in a session of its own, with none of the submitter's
stdio: a job outlives the process that submitted it (a CLI call, or an MCP server whose
client stops its process group) and never writes into an MCP server's protocol stream.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from datetime import UTC, datetime
from pathlib import Path

from runner import settings
from runner.config.launchers import slurm_gpus, slurm_time_min
from runner.errors import ForgeError, InvalidConfig, InvalidInput
from runner.jobs import engine, launch, recovery, tracking
from runner.jobs.job import disk_problem, run_dir
from runner.jobs.plan import Plan
from runner.registry import ledger
from runner.registry.db import as_utc

EXECUTOR_ENV = "FORGE_JOBS_EXECUTOR"  # the operator's: local (default) or slurm
EXECUTORS = ("local", "slurm")
STATES = {"reserved": "queued", "running": "running", "settled": "succeeded",
          "failed": "failed", "cancelled": "cancelled"}
MAX_TAIL = 10_000
_TAIL_BYTES = 1 << 20  # a log tail reads at most the file's last MiB
_RECORD = "job.json"  # what the submission knows that the registry does not keep


class EngineUnavailable(ForgeError):
    reason = "engine_unavailable"


def jobs_dir() -> Path:
    """FORGE_HOME/jobs/<allocation id>: submitit's folder for the job (pickles, engine logs)."""
    return settings.forge_home() / "jobs"


def executor_name() -> str:
    name = os.environ.get(EXECUTOR_ENV) or "local"
    if name not in EXECUTORS:
        raise InvalidConfig(f"{EXECUTOR_ENV}={name!r} is not an engine",
                            field=EXECUTOR_ENV, fix=f"set it to one of {', '.join(EXECUTORS)}")
    return name


# --- submit ---------------------------------------------------------------------------------------

def submit(plan: Plan) -> dict:
    """Debit the plan's estimate and queue its launch; returns the job at once. The same
    request again returns the job it already made (one debit, one version)."""
    problem = disk_problem(plan.resolved)
    if problem is not None:
        raise problem
    name = executor_name()
    tracking.prepare_store(plan.resolved["tracking"]["tracking_uri"])  # a broken one: no debit
    recovery.reap()  # dead jobs first: their credits count, their retries may run
    alloc = launch.reserve(plan, on_this_host=name == "local")  # SLURM places its own
    if alloc.get("existing"):
        return {**state(alloc), "existing": True}
    folder = jobs_dir() / alloc["id"]
    try:
        job = _executor(name, folder, plan.resolved).submit(run_submitted, plan, alloc["id"])
    except Exception as exc:  # nothing was queued: give the credits back
        ledger.cancel(alloc["id"], reason=f"engine_unavailable: {exc}"[:500])
        raise EngineUnavailable(f"the {name} engine refused the job: {type(exc).__name__}: "
                                f"{exc}", field=EXECUTOR_ENV,
                                fix="the debit was refunded; check the engine (sinfo for "
                                    "SLURM), then submit again") from exc
    job_id = str(job.job_id)
    _keep(job)
    # The engine's job is now the allocation's host: the reaper asks after it, not after
    # the process that submitted it.
    host = f"{socket.gethostname()}:{job_id}" if name == "local" else f"slurm:{job_id}"
    ledger.assign_engine(alloc["id"], name, job_id, host)
    track = plan.resolved["tracking"]
    (folder / _RECORD).write_text(json.dumps({
        "tracking_uri": track["tracking_uri"], "links": launch.links(track),
        "max_epochs": plan.resolved["training"]["max_epochs"],
        "grace_s": plan.resolved["sandbox"]["grace_s"]}))
    return {**state(ledger.get_allocation(alloc["id"])), "existing": False}


def run_submitted(plan: Plan, allocation_id: str):
    """What the engine runs: the launch of the allocation the submission debited. Its
    outcome lives in the registry; this returns it for the engine's own records."""
    alloc = ledger.get_allocation(allocation_id)
    if alloc["status"] != "reserved":  # cancelled (or reaped) while it waited
        print(f"allocation {allocation_id} is {alloc['status']}: nothing to run", flush=True)
        return None
    try:
        return launch.launch(plan, allocation=alloc,
                             on_line=lambda line: print(line, flush=True))
    except ForgeError as exc:  # settled by the launch; the engine needs no traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return exc.to_dict()


def _executor(name: str, folder: Path, resolved: dict):
    import submitit  # lazy: only a submission needs it

    minutes = slurm_time_min(resolved["wall_time_cap_min"],
                             resolved["registry"]["expiry_margin_min"])
    if name == "local":
        executor = _detached_local_executor()(folder=folder)
        executor.update_parameters(timeout_min=minutes)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"timeout_min": minutes, "tasks_per_node": 1, "nodes": 1,
              "cpus_per_task": int(os.environ.get("FORGE_SLURM_CPUS_PER_TASK") or 8),
              "mem_gb": float(os.environ.get("FORGE_SLURM_MEM_GB") or 64),
              "name": "forge-job"}
    if os.environ.get("FORGE_SLURM_PARTITION"):
        params["slurm_partition"] = os.environ["FORGE_SLURM_PARTITION"]
    gpus = slurm_gpus(resolved["device"], resolved["devices"])
    if gpus:
        params["gpus_per_node"] = gpus
    executor.update_parameters(**params)
    return executor


_SPAWN_LOCK = threading.Lock()
_LIVE: list = []  # local jobs this process started: polled so that none stays a zombie


@functools.cache
def _detached_local_executor():
    from submitit.local import local

    class DetachedLocalExecutor(local.LocalExecutor):
        """submitit's local executor whose controller starts a session of its own."""

        def _submit_command(self, command):
            # Its own session, and none of our stdio: an MCP server's stdout is its protocol
            # stream, which a job must neither write to nor hold open.
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            with open(Path(self.folder) / "controller.log", "ab") as log:
                detached = types.SimpleNamespace(Popen=functools.partial(
                    subprocess.Popen, start_new_session=True, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT))
                with _SPAWN_LOCK:  # the module's `subprocess`, swapped for this one call
                    original, local.subprocess = local.subprocess, detached
                    try:
                        return super()._submit_command(command)
                    finally:
                        local.subprocess = original

    return DetachedLocalExecutor


def _keep(job) -> None:
    process = getattr(job, "_process", None)
    if process is not None:
        _LIVE.append(process)
    _LIVE[:] = [p for p in _LIVE if p.poll() is None]


# --- look ---------------------------------------------------------------------------------------

def state(alloc: dict) -> dict:
    """The job as a caller sees it: state, engine, cost; progress while it runs; the result
    (the registered version) or the error once it ended."""
    status = STATES.get(alloc["status"], alloc["status"])
    record = _record(alloc["id"])
    out = {"job_id": alloc["id"], "status": status, "agent_id": alloc["agent_id"],
           "engine": alloc.get("engine"), "engine_job_id": alloc.get("engine_job_id"),
           "submitted_at": _iso(alloc["created_at"]), "started_at": _iso(alloc["started_at"]),
           "ended_at": _iso(alloc["settled_at"]), "mlflow_run_id": alloc["mlflow_run_id"],
           "cost": {"estimated": str(alloc["estimated_cost"]), "debited": str(alloc["debited"]),
                    "actual": _str(alloc["actual_cost"]), "refunded": _str(alloc["refunded"]),
                    "currency": alloc["currency"]}}
    if status == "running":
        out["progress"] = _progress(alloc, record)
    elif status == "succeeded" and alloc.get("artifact_id"):
        out["result"] = launch.result_for(alloc["artifact_id"], links=record.get("links"))
    elif status in ("failed", "cancelled"):
        reason, _, message = (alloc["failure_reason"] or "").partition(": ")
        out["error"] = {"reason": reason or status, "message": message or None}
    return out


def _progress(alloc: dict, record: dict) -> dict:
    """Epoch, step, eta and the latest metrics, from the host's MLflow run (the relay's
    copy of the job's metrics). A tracking store that cannot answer is said, never raised."""
    uri, run_id = record.get("tracking_uri"), alloc.get("mlflow_run_id")
    started = as_utc(alloc["started_at"])
    elapsed = (datetime.now(UTC) - started).total_seconds() if started else 0.0
    out = {"elapsed_s": round(elapsed, 1), "epoch": None, "step": None, "eta_s": None,
           "metrics": {}}
    if not uri or not run_id:
        return out
    try:
        client = tracking.client(uri)
        metrics = client.get_run(run_id).data.metrics
        history = client.get_metric_history(run_id, "epoch") if "epoch" in metrics else []
    except Exception as exc:  # noqa: BLE001 - progress is a courtesy; the state stands
        out["unavailable"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return out
    out["metrics"] = {k: v for k, v in sorted(metrics.items())
                      if isinstance(v, float) and math.isfinite(v) and k != "epoch"}
    if history:
        last = max(history, key=lambda m: m.step)
        out["epoch"], out["step"] = int(last.value), int(last.step)
        max_epochs = record.get("max_epochs")
        done = (out["epoch"] + 1) / max_epochs if max_epochs else None
        if done and 0 < done <= 1:  # early stopping may end it sooner: an upper bound
            out["eta_s"] = round(elapsed * (1 - done) / done, 1)
        out["max_epochs"] = max_epochs
    return out


def log_tail(alloc: dict, tail: int = 50) -> dict:
    """The last `tail` lines of the job's log (FORGE_HOME/runs/<job id>/job.log, written by
    the host's supervisor, every line made printable); empty before the sandbox starts."""
    if isinstance(tail, bool) or not isinstance(tail, int) or not 1 <= tail <= MAX_TAIL:
        raise InvalidInput(f"tail must be an integer from 1 to {MAX_TAIL}, got {tail!r}",
                           field="tail", fix="pass e.g. tail=50")
    path = run_dir(alloc["id"]) / "job.log"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {"job_id": alloc["id"], "status": STATES.get(alloc["status"]), "lines": []}
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - _TAIL_BYTES))
        text = f.read(_TAIL_BYTES).decode("utf-8", "replace")
    lines = text.splitlines()[-tail:]
    return {"job_id": alloc["id"], "status": STATES.get(alloc["status"]), "lines": lines}


# --- cancel ---------------------------------------------------------------------------------------

def cancel(alloc: dict, reason: str, *, wait_s: float | None = None) -> dict:
    """Stop the job and settle it: a queued job is refunded whole and never starts; a running
    one is stopped through its engine (SIGTERM, the sandbox's grace, SIGKILL), charged the
    seconds it ran and refunded the rest. Returns its state once settled, or after `wait_s`
    (the settlement then follows from the job, or from the reaper if it is gone)."""
    if alloc["status"] in ledger.FINAL_STATES:
        return state(alloc)
    if alloc["status"] == "reserved":
        closed = ledger.cancel(alloc["id"], reason=f"cancelled: {reason}", queued_only=True)
        if closed["status"] == "cancelled":
            _signal(closed, signal.SIGTERM)  # it would find itself cancelled; stop it sooner
            return state(closed)
        alloc = closed  # it started meanwhile: stop it like any running job
    record = _record(alloc["id"])
    if not _signal(alloc, signal.SIGTERM):
        recovery.reap()  # its process is gone: the reaper settles what it ran
    wait_s = float(record.get("grace_s", 10)) + 60 if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        now = ledger.get_allocation(alloc["id"])
        if now["status"] in ledger.FINAL_STATES:
            return state(now)
        time.sleep(0.5)
    return state(ledger.get_allocation(alloc["id"]))


def _signal(alloc: dict, signum: int) -> bool:
    """Send `signum` to the allocation's engine job; False when it is not there."""
    job_id = alloc.get("engine_job_id")
    if not job_id or not engine.valid_job_id(job_id):
        return False
    if alloc.get("engine") == "slurm":
        scancel = shutil.which("scancel")
        if scancel is None:
            return False
        # SLURM sends SIGTERM to every process of the job (SIGKILL after KillWait)
        done = subprocess.run([scancel, job_id], capture_output=True, text=True, timeout=30,
                              check=False)
        return done.returncode == 0
    if alloc.get("engine") != "local" or not _is_controller(int(job_id), alloc["id"]):
        return False
    try:
        os.kill(int(job_id), signum)  # the controller forwards it to the job's process
    except ProcessLookupError:
        return False
    return True


def _is_controller(pid: int, allocation_id: str) -> bool:
    """Is `pid` still submitit's controller of this job (and not a process that reused the
    pid)? Its command line names the job's folder."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    folder = str(jobs_dir() / allocation_id).encode()
    return b"submitit.local._local" in argv and folder in argv


# --- helpers --------------------------------------------------------------------------------------

def _record(allocation_id: str) -> dict:
    try:
        return json.loads((jobs_dir() / allocation_id / _RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _iso(stamp) -> str | None:
    stamp = as_utc(stamp)
    return stamp.isoformat() if stamp is not None else None


def _str(value) -> str | None:
    return None if value is None else str(value)
