"""The scheduler a job's host process runs under (SLURM, reached through submitit), and what
the host does when that scheduler stops the job.

A sweep through the `forge_slurm` launcher runs the host side of each job (debit, sandbox,
registration) inside a SLURM job on a compute node. Then:

- the allocation records the SLURM job (`engine`, `engine_job_id`), and the MLflow run
  carries it as tags (`forge.engine`, `forge.slurm_job_id`);
- `scancel`, a time limit or a preemption sends SIGTERM to every process of the SLURM job:
  `stop_on_sigterm` turns it into a stop of the sandbox (SIGTERM, grace, SIGKILL), and the
  launch settles the allocation as cancelled, the seconds run charged and the rest refunded,
  its MLflow run KILLED, well inside SLURM's KillWait;
- a node that dies leaves an allocation whose heartbeat goes stale on a host the reaper
  cannot see: `job_gone` asks SLURM (`squeue`) whether the job is over.

Outside a scheduler a SIGTERM to the host process (`kill`, a service manager stopping it)
takes the same way out.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

_JOB_ID = re.compile(r"\d{1,20}(_\d{1,10})?")
# SLURM states in which the job's processes may still run (squeue %T, long names).
SLURM_LIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                        "RESIZING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING",
                        "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
UNKNOWN_JOB = "UNKNOWN_JOB"  # squeue no longer knows it (past slurm.conf's MinJobAge)


@dataclass(frozen=True)
class EngineJob:
    engine: str  # "slurm"
    job_id: str  # "123", or "123_4" for task 4 of array job 123

    def tags(self) -> dict[str, str]:
        return {"forge.engine": self.engine, f"forge.{self.engine}_job_id": self.job_id}


def valid_job_id(job_id) -> bool:
    """A scheduler job id as SLURM (`123`, `123_4`) or a local pid (`4567`) writes it."""
    return isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) is not None


def current(environ: Mapping[str, str] = os.environ) -> EngineJob | None:
    """The SLURM job this process runs in, from the variables slurmd sets; None outside one.
    An array task is named as scancel and squeue name it: `<array job>_<task>`."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID")
    if job_id and _JOB_ID.fullmatch(job_id):
        return EngineJob("slurm", job_id)
    return None


def slurm_state(job_id: str, *, squeue: str | None = None) -> str | None:
    """SLURM's state of the job (RUNNING, CANCELLED, NODE_FAIL, ...), UNKNOWN_JOB once SLURM
    has forgotten it, or None when SLURM cannot be asked (no squeue, no controller)."""
    squeue = squeue or shutil.which("squeue")
    if not squeue or not _JOB_ID.fullmatch(job_id):
        return None
    try:
        proc = subprocess.run([squeue, "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return UNKNOWN_JOB if "Invalid job id" in proc.stderr else None
    states = proc.stdout.split()
    return states[0] if states else UNKNOWN_JOB


def job_gone(alloc: Mapping) -> str | None:
    """For the reaper: why the allocation's scheduler job is over, or None while it may still
    run (or SLURM cannot say: the expiry still bounds the allocation)."""
    if alloc.get("engine") != "slurm" or not alloc.get("engine_job_id"):
        return None
    state = slurm_state(alloc["engine_job_id"])
    if state is None or state in SLURM_LIVE:
        return None
    return f"its SLURM job {alloc['engine_job_id']} is {state}"


@contextmanager
def stop_on_sigterm(stop: threading.Event, on_line: Callable[[str], None] | None = None):
    """While the block runs, SIGTERM sets `stop` (the sandbox then stops the job) instead of
    ending the process, so that the launch settles what ran. Only the main thread can take a
    signal: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if not stop.is_set():
            line = "SIGTERM: stopping the job (cancelled by its scheduler or an operator)"
            (on_line or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
