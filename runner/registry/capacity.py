"""How many jobs may be open at once: the operator's limits (conf/train.yaml `policy:`).

A job counts from its debit to its settlement: its allocation is `reserved` (queued) or
`running`. Three limits, each refused as `CapacityExceeded` (reason `capacity`, the limit as
its field) before any debit:

- jobs per agent (`policy.max_jobs_per_agent`), on every host: one agent cannot fill the
  machines, however few credits each job costs;
- jobs per host (`policy.max_jobs_per_host`), of every agent. A job's host is the machine
  whose sandbox runs it (an allocation's `host` is `hostname:pid`, or `hostname:job` for the
  local engine); a job queued on SLURM runs elsewhere (its host is `slurm:job` until a node
  starts it) and counts only for its agent;
- the sum of the memory caps of a host's jobs (`policy.max_host_memory_gb`, by default this
  host's physical memory). A job's cap counts up to that limit (an uncapped job counts as
  all of it), so one job always fits; an allocation without a recorded cap counts none.

`check` runs inside `ledger.reserve`'s transaction, after the agent's account row is locked
(which serialises one agent's reservers). The host's limits take a host-wide lock as well,
after the account's (the same order in every reserve): a transaction-scoped advisory lock on
PostgreSQL; on SQLite every write transaction begins IMMEDIATE and is serialised already.
`problem` is the same reading without the lock, for the dry run.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field

import sqlalchemy as sa

from runner.errors import CapacityExceeded
from runner.registry.schema import resource_allocations

OPEN_STATES = ("reserved", "running")
GIB = 1024**3


@dataclass(frozen=True)
class Limits:
    """What one reservation is checked against; `jobs_per_host` None: the job does not run
    on this host (a SLURM queue), so only the agent's limit applies."""

    jobs_per_agent: int
    jobs_per_host: int | None = None
    host_memory_gb: float | None = None
    memory_gb: float | None = None  # the job's memory cap, as it counts on its host
    host: str = field(default_factory=socket.gethostname)


def physical_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def limits(resolved: dict, *, on_this_host: bool = True) -> Limits:
    """The limits of a composed config: `policy` and the job's `sandbox.max_memory_gb`."""
    policy = resolved["policy"]
    host_memory = float(policy.get("max_host_memory_gb") or physical_memory_gb())
    cap = resolved["sandbox"].get("max_memory_gb")
    return Limits(jobs_per_agent=policy["max_jobs_per_agent"],
                  jobs_per_host=policy["max_jobs_per_host"] if on_this_host else None,
                  host_memory_gb=host_memory,
                  memory_gb=host_memory if cap is None else min(float(cap), host_memory))


def check(conn, agent_id: str, limits: Limits) -> None:
    """Raise CapacityExceeded if one more job of `agent_id` would be over a limit. Inside the
    reserving transaction, with the agent's account row already locked."""
    over = _over(conn, agent_id, limits, lock=True)
    if over is not None:
        raise over


def problem(conn, agent_id: str, limits: Limits) -> CapacityExceeded | None:
    """The dry run's reading of the same limits (no lock: the real reserve decides)."""
    return _over(conn, agent_id, limits, lock=False)


def _over(conn, agent_id: str, limits: Limits, *, lock: bool) -> CapacityExceeded | None:
    table = resource_allocations
    is_open = table.c.status.in_(OPEN_STATES)
    jobs = conn.execute(sa.select(sa.func.count()).select_from(table)
                        .where(is_open, table.c.agent_id == agent_id)).scalar_one()
    if jobs >= limits.jobs_per_agent:
        return _refuse("max_jobs_per_agent", limits.jobs_per_agent, jobs,
                       f"agent {agent_id!r} already has {jobs} jobs queued or running",
                       "wait for one of its jobs to finish (job_status) or cancel one "
                       "(cancel_job), then submit again")
    if limits.jobs_per_host is None:
        return None
    if lock and conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(limits.host))))
    caps = conn.execute(sa.select(table.c.memory_cap_gb).where(
        is_open, table.c.host.startswith(f"{limits.host}:", autoescape=True))).scalars().all()
    if len(caps) >= limits.jobs_per_host:
        return _refuse("max_jobs_per_host", limits.jobs_per_host, len(caps),
                       f"host {limits.host!r} already has {len(caps)} jobs queued or running",
                       "wait for jobs on this host to finish, then submit again")
    held = sum(min(cap or 0.0, limits.host_memory_gb) for cap in caps)
    if held + limits.memory_gb > limits.host_memory_gb + 1e-9:
        return _refuse("max_host_memory_gb", limits.host_memory_gb, round(held, 3),
                       f"the jobs on host {limits.host!r} hold {held:g} GiB of memory caps; "
                       f"this one's {limits.memory_gb:g} GiB would pass "
                       f"{limits.host_memory_gb:g} GiB", "wait for jobs on this host to "
                       "finish, then submit again")
    return None


def _lock_key(host: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory lock of this host's capacity."""
    digest = hashlib.sha256(f"forge-capacity:{host}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _refuse(limit: str, value, held, message: str, fix: str) -> CapacityExceeded:
    return CapacityExceeded(f"{message}: the limit is {value} (policy.{limit})",
                            field=f"policy.{limit}", limit=value, held=held,
                            fix=f"{fix}; the limit is the operator's")
