"""Watching a sweep's SLURM array to its end, with or without accounting.

submitit (under hydra-submitit-launcher) waits for each task's result file and asks `sacct`
every so often whether the task is over. A cluster without an accounting daemon (the one
deploy/slurm/up.sh starts) has no `sacct`: every poll logs "Bypassing sacct error", the
task's state stays UNKNOWN, and a task that ended without a result (cancelled while pending,
lost with its node) is waited on forever.

`ArrayWatcher` is submitit's own extension point for that question (`SlurmJob.watcher`, an
`InfoWatcher` every job of the process shares). The sweep installs it for its array:

- it asks `squeue` (all states, one line per array task), and `sacct` for a task squeue has
  forgotten (past slurm.conf's MinJobAge) when accounting exists;
- a task pending longer than FORGE_SLURM_PENDING_LIMIT_S (600) for a reason that cannot clear
  (PENDING_FOREVER: the partition's limits, a node that does not exist, ...) is scancelled;
- a task SLURM says is over with no result file (cancelled, failed, lost with its node,
  forgotten) is closed by the watcher: an open allocation it held is settled by the reaper
  (runner.jobs.recovery.reap, once its heartbeat is stale), `on_gone` records it for the
  sweep summary (`cancelled` or `lost`), and the watcher writes the task's result in its
  place: a Hydra JobReturn whose metric is NaN. The launcher then collects it like any other
  and the sweep returns.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from submitit.core import core, utils
from submitit.slurm import slurm

from runner.config import launchers
from runner.jobs import engine
from runner.jobs import recovery as job_recovery
from runner.registry import ledger
from runner.registry import recovery as registry_recovery

# squeue reasons a pending task never leaves by itself (an operator has to change the
# cluster or the request): after FORGE_SLURM_PENDING_LIMIT_S such a task is cancelled.
PENDING_FOREVER = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit",
                             "BadConstraints", "InvalidAccount", "InvalidQOS",
                             "ReqNodeNotAvail"})
RESULT_GRACE_S = 15.0  # a task that ran may write its result a little after SLURM ends it
# (task id, status "cancelled" | "lost", why) -> the sweep's record of the task
OnGone = Callable[[int | None, list[str], str, str], None]


def pending_limit_s() -> float:
    """FORGE_SLURM_PENDING_LIMIT_S (operator environment), else 600 s."""
    try:
        return max(0.0, float(os.environ.get("FORGE_SLURM_PENDING_LIMIT_S", "600")))
    except ValueError:
        return 600.0


class ArrayWatcher(slurm.SlurmInfoWatcher):
    """submitit's watcher of SLURM jobs, answering from squeue, and closing the tasks that
    will never write a result. `folder`: the launcher's submitit_folder (with %j)."""

    def __init__(self, folder: str | Path, on_gone: OnGone, *, delay_s: int = 10,
                 limit_s: float | None = None) -> None:
        super().__init__(delay_s=delay_s)
        self.folder = folder
        self.on_gone = on_gone
        self.limit_s = pending_limit_s() if limit_s is None else limit_s
        self._stuck_since: dict[str, float] = {}  # task -> first seen pending forever
        self._cancelled: dict[str, str] = {}  # task -> why the watcher cancelled it
        self._ended_at: dict[str, float] = {}  # task -> when SLURM first said it is over
        self._closed: set[str] = set()  # tasks whose result the watcher wrote
        self._said: set[str] = set()  # warnings given once

    # --- submitit's InfoWatcher interface ------------------------------------------------

    def _make_command(self) -> list[str] | None:
        arrays = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not arrays:
            return None
        return [shutil.which("squeue") or "squeue", "-h", "-t", "all", "-r",
                "-o", "%i|%T|%r", "-j", ",".join(arrays)]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        info = {}
        for line in text.splitlines():
            shown, _, rest = line.strip().partition("|")
            state, _, reason = rest.partition("|")
            for job_id in _task_ids(shown) if state else []:
                info[job_id] = {"JobID": job_id, "State": state, "Reason": reason}
        return info

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        """Over for the launcher: SLURM says it ended and its result is there (its own, or
        the one the watcher wrote for it)."""
        state = self.get_state(job_id, mode=mode)
        return state not in engine.SLURM_LIVE and state != "UNKNOWN" and (
            job_id in self._closed or self._paths(job_id).result_pickle.exists())

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        # submitit registers an array's own id too (its first job): only its tasks are waited on
        self._finished |= {j for j in self._registered if "_" not in j
                           and any(t.startswith(f"{j}_") for t in self._registered)}
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            self._warn_once("squeue", f"squeue failed ({exc}); the array's state is unknown")
            proc = None
        if proc is not None and (proc.returncode == 0 or "Invalid job id" in proc.stderr):
            info = self.read_info(proc.stdout)
            for job_id in self._registered - self._finished - info.keys():
                info[job_id] = {"JobID": job_id, "State": self._forgotten_state(job_id),
                                "Reason": "squeue no longer knows it"}
            self._info_dict.update(info)
            self._cancel_stuck()
            self._close_ended()
        elif proc is not None:
            self._warn_once("squeue", f"squeue failed: {proc.stderr.strip()[:300]}")
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    # --- the forge part ------------------------------------------------------------------

    def _paths(self, job_id: str) -> utils.JobPaths:
        return utils.JobPaths(self.folder, job_id=job_id, task_id=0)

    def _forgotten_state(self, job_id: str) -> str:
        """A task squeue no longer lists: sacct's word where accounting exists, else GONE."""
        if "sacct" not in self._said and shutil.which("sacct"):
            proc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id],
                                  capture_output=True, text=True, timeout=60, check=False)
            for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
                task, _, state = line.partition("|")
                if task == job_id and state:
                    return state.split()[0]
            if proc.returncode != 0:
                self._warn_once("sacct", "no SLURM accounting (sacct: "
                                f"{proc.stderr.strip()[:120]}): watching with squeue only")
        return "GONE"

    def _cancel_stuck(self) -> None:
        """scancel the tasks pending, longer than the limit, for a reason that cannot clear."""
        now = time.time()
        for job_id in self._registered - self._finished:
            info = self._info_dict.get(job_id, {})
            reason = info.get("Reason", "")
            if info.get("State") != "PENDING" or not _pending_forever(reason):
                self._stuck_since.pop(job_id, None)
                continue
            since = self._stuck_since.setdefault(job_id, now)
            if now - since >= self.limit_s and job_id not in self._cancelled:
                subprocess.run(["scancel", job_id], capture_output=True, timeout=60, check=False)
                self._cancelled[job_id] = (f"pending {now - since:.0f} s for {reason}, which "
                                           "cannot clear: cancelled")
                info["State"] = "CANCELLED"

    def _close_ended(self) -> None:
        """Close each task SLURM says is over without a result: settle what it held, record
        it, write its result in its place."""
        now = time.time()
        for job_id in sorted(self._registered - self._finished - self._closed):
            state = self._info_dict.get(job_id, {}).get("State", "UNKNOWN")
            paths = self._paths(job_id)
            if state in engine.SLURM_LIVE or state == "UNKNOWN" or paths.result_pickle.exists():
                continue
            ended = self._ended_at.setdefault(job_id, now)
            ran = paths.stdout.exists()  # SLURM opens the task's log when it starts it
            if ran and now - ended < RESULT_GRACE_S:
                continue
            held = _open_allocations(job_id) if ran else []
            if held:
                job_recovery.reap()  # settles them once their heartbeat is stale
                held = _open_allocations(job_id)
                stale_after = registry_recovery.MISSED_BEATS * \
                    registry_recovery.heartbeat_interval() + 30
                if held and now - ended < stale_after:
                    continue
            why = self._cancelled.get(job_id) or (
                f"SLURM task {job_id} is {state}"
                f"{', never started' if not ran else ', with no result'}")
            if held:
                why += f"; allocation {held[0]['id']} left open for the reaper"
            self._close(job_id, paths, "cancelled" if state == "CANCELLED" else "lost", why)

    def _close(self, job_id: str, paths: utils.JobPaths, status: str, why: str) -> None:
        from hydra.core.utils import JobReturn, JobStatus  # the launcher's result type

        num, overrides = _job_place(paths)
        self.on_gone(num, overrides, status, why)
        result = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        result.return_value = math.nan  # no metric: what an optimising sweeper skips
        paths.folder.mkdir(parents=True, exist_ok=True)
        utils.cloudpickle_dump(("success", result), paths.result_pickle)
        self._closed.add(job_id)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logging.getLogger(__name__).warning(message)


def _task_ids(shown: str) -> list[str]:
    """squeue's %i as task ids: `12`, `12_3`, and a range it did not expand, `12_[0-3,5]`."""
    try:
        parts = slurm.read_job_id(shown)
    except ValueError:
        return []
    ids = []
    for main, *index in parts:
        if len(index) == 2:
            ids += [f"{main}_{i}" for i in range(int(index[0]), int(index[1]) + 1)]
        else:
            ids.append("_".join([main, *index]))
    return [i for i in ids if engine.valid_job_id(i)]


def _pending_forever(reason: str) -> bool:
    """A reason in PENDING_FOREVER; ReqNodeNotAvail only for nodes SLURM does not have."""
    name, _, detail = reason.partition(",")
    if name.strip() not in PENDING_FOREVER:
        return False
    if name.strip() != "ReqNodeNotAvail":
        return True
    wanted = {n for n in detail.partition("UnavailableNodes:")[2].split(",") if n.strip()}
    known = {n.name for n in launchers.nodes() or []}
    return bool(known) and not (wanted & known)


def _open_allocations(job_id: str) -> list[dict]:
    """Open allocations whose host ran in this SLURM task."""
    return [a for status in ("reserved", "running")
            for a in ledger.list_allocations(status=status, limit=1000)
            if a.get("engine_job_id") == job_id]


def _job_place(paths: utils.JobPaths) -> tuple[int | None, list[str]]:
    """The task's job number and overrides, from the submission the launcher pickled
    (BaseSubmititLauncher.__call__'s arguments: overrides, dir key, job number, ...)."""
    try:
        args = utils.DelayedSubmission.load(paths.submitted_pickle).args
        return (args[2] if isinstance(args[2], int) else None), [str(a) for a in args[0]]
    except Exception:  # noqa: BLE001 - the record still says the task is gone
        return None, []


class _SayOnce(logging.Filter):
    """Lets one record whose message starts with `text` through, then drops the rest."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.said = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        said, self.said = self.said, True
        return not said


def quiet_sacct() -> None:
    """submitit's own watcher (other SLURM jobs of this process) says "Bypassing sacct error"
    once, not at every poll. Idempotent."""
    log = logging.getLogger("submitit")
    if not any(isinstance(f, _SayOnce) for f in log.filters):
        log.addFilter(_SayOnce("Bypassing sacct error"))


def install(folder: str | Path, on_gone: OnGone) -> core.InfoWatcher:
    """Watch this process's SLURM jobs with an ArrayWatcher; returns the watcher it replaced
    (for `restore`)."""
    previous = slurm.SlurmJob.watcher
    slurm.SlurmJob.watcher = ArrayWatcher(folder, on_gone)
    quiet_sacct()
    return previous


def restore(previous: core.InfoWatcher) -> None:
    slurm.SlurmJob.watcher = previous
