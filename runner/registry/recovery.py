"""No allocation stays open forever: heartbeats, expiry, the reaper, and the books' check.

Each allocation carries `expires_at` (reserve time + wall-time cap, whose last seconds are
the sandbox's grace period, + a margin; the window restarts when the job starts) and a
heartbeat (`heartbeat_at`, `host` = hostname:pid) that the host refreshes while it runs the
job (`Heartbeat`). `reap` settles every open allocation past its expiry, or whose heartbeat
is stale and whose host process is gone from this machine, as `failed`: it charges the
seconds the job is known to have run (start to last heartbeat, capped at the debit, as
`settle` does) and refunds the rest, exactly once however many reapers race. It runs before
every launch's reserve and from `forge ledger reap` (both through runner.jobs.recovery, which
also fails the reaped MLflow runs and cleans their run folders); `check` reports what is
overdue along with any imbalance in the books. `settle_retrying` is the host's settlement
when the database may be briefly away.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from runner.errors import ForgeError
from runner.registry import ledger
from runner.registry.db import as_utc, now, transaction
from runner.registry.ledger import ALLOCATION, DEBIT, FINAL_STATES, GRANT, OPEN_STATES, REFUND
from runner.registry.schema import Money, resource_allocations, token_accounts, token_ledger

HEARTBEAT_S = 30.0  # how often the host refreshes heartbeat_at (FORGE_HEARTBEAT_S overrides)
MISSED_BEATS = 3  # a heartbeat older than this many beats is stale
SETTLE_RETRY_S = 30.0  # how long settle_retrying() keeps trying while the database is away


# --- heartbeat ------------------------------------------------------------------------------------

def heartbeat_interval() -> float:
    """Seconds between heartbeats: FORGE_HEARTBEAT_S (operator environment), else 30."""
    try:
        value = float(os.environ.get("FORGE_HEARTBEAT_S") or HEARTBEAT_S)
    except ValueError:
        value = HEARTBEAT_S
    return value if value > 0 else HEARTBEAT_S


def heartbeat(allocation_id: str, *, conn=None) -> bool:
    """Say this process still runs the allocation; False once it is closed."""
    with transaction(conn) as c:
        result = c.execute(resource_allocations.update()
                           .where(resource_allocations.c.id == allocation_id,
                                  resource_allocations.c.status.in_(OPEN_STATES))
                           .values(heartbeat_at=now(), host=ledger.host_id()))
    return result.rowcount == 1


class Heartbeat:
    """A daemon thread that refreshes the allocation's heartbeat while the job runs.

    `with Heartbeat(alloc_id): ...` stops it on every way out of the block. A failed beat
    (the database away) is a warning: the expiry still bounds the allocation.
    """

    def __init__(self, allocation_id: str, interval_s: float | None = None):
        self.allocation_id = allocation_id
        self.interval_s = interval_s or heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"heartbeat-{allocation_id}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                if not heartbeat(self.allocation_id):
                    return  # closed (settled, or reaped): nothing left to keep alive
                failing = False
            except Exception as exc:  # noqa: BLE001 - a beat must never kill the job
                if not failing:
                    _warn(f"heartbeat of {self.allocation_id} failed: {exc}")
                failing = True


# --- expiry and the reaper -------------------------------------------------------------------

def _host_gone(host: str | None) -> bool:
    """True only when `host` names a process of this machine that no longer exists."""
    name, _, pid = (host or "").rpartition(":")
    if name != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie has exited: it only waits for its parent to collect it
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _open_due(conn, at: datetime) -> list[dict]:
    """Open allocations past expiry or with a stale heartbeat (one query on the status index)."""
    stale = at - timedelta(seconds=MISSED_BEATS * heartbeat_interval())
    alloc = resource_allocations.c
    return [dict(r) for r in conn.execute(
        sa.select(resource_allocations)
        .where(alloc.status.in_(OPEN_STATES),
               sa.or_(alloc.expires_at < at, alloc.heartbeat_at < stale))
        .order_by(alloc.created_at)).mappings()]


# Asked about an allocation with a stale heartbeat whose scheduler job (engine, engine_job_id)
# is known: why that job is over ("SLURM job 12_3 is NODE_FAIL"), or None while it may live.
JobGone = Callable[[dict], "str | None"]


def overdue(now: datetime | None = None, *, conn=None,
            job_gone: JobGone | None = None) -> list[dict]:
    """Open allocations that nobody will settle: past their expiry, or with a stale heartbeat
    from a host process gone from this machine, or (given `job_gone`) whose scheduler job is
    over. Each has `overdue` saying which; `reap` settles exactly these, and `check` reports
    them."""
    at = now or datetime.now(UTC)
    with transaction(conn) as c:
        rows = _open_due(c, at)
    return [{**a, "overdue": why} for a in rows if (why := _dead_because(a, at, job_gone))]


def _dead_because(alloc: dict, at: datetime, job_gone: JobGone | None = None) -> str | None:
    expires, beat = as_utc(alloc["expires_at"]), as_utc(alloc["heartbeat_at"])
    if expires is not None and expires < at:
        return f"{alloc['status']} past its expiry {expires:%Y-%m-%d %H:%M:%S} UTC"
    stale = at - timedelta(seconds=MISSED_BEATS * heartbeat_interval())
    if beat is None or beat >= stale:
        return None
    last = f"last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC"
    # The scheduler knows about hosts on other machines, which _host_gone cannot see.
    if job_gone is not None and alloc.get("engine_job_id"):
        why = job_gone(alloc)
        if why:
            return f"{why} ({last})"
    if _host_gone(alloc["host"]):
        return f"its host process {alloc['host']} is gone ({last})"
    return None


def _ran_seconds(alloc: dict) -> float:
    """What the job is known to have run: its start to its last heartbeat (0 if never started)."""
    started, beat = as_utc(alloc["started_at"]), as_utc(alloc["heartbeat_at"])
    if alloc["status"] != "running" or started is None or beat is None:
        return 0.0
    return max(0.0, (beat - started).total_seconds())


def reap(now: datetime | None = None, *, job_gone: JobGone | None = None) -> list[dict]:
    """Settle every dead open allocation as failed, exactly once; returns those this call
    closed.

    Dead means past `expires_at`, or a heartbeat older than MISSED_BEATS beats from a host
    process that is gone from this machine or (`job_gone`) whose scheduler job is over (a
    host elsewhere, outside a scheduler, is left to its expiry). The
    charge is the seconds between the job's start and its last heartbeat, capped at the
    debit; the rest is refunded. Their MLflow runs and run folders are the host's: the caller
    cleans them up (runner.jobs.recovery.reap does both).
    """
    reaped = []
    for alloc in overdue(now, job_gone=job_gone):
        try:
            closed = ledger.settle(alloc["id"], _ran_seconds(alloc), status="failed",
                                   reason=f"reaped: {alloc['overdue']}")
        except ForgeError as exc:  # e.g. the agent's account is gone: the others still go
            _warn(f"could not reap {alloc['id']}: {exc}")
            continue
        if not closed["already_settled"]:  # another reaper (or the host) got there first
            reaped.append(closed)
    return reaped


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --- settling while the database is away ------------------------------------------------------

def settle_retrying(allocation_id: str, actual_seconds: Any, status: str = "failed",
                    reason: str | None = None, *, budget_s: float | None = None) -> dict:
    """`settle`, retried with backoff while the database is away (for `SETTLE_RETRY_S`).

    Only connection-level errors are retried; the last one is raised when the database never
    came back, and the allocation is then left open for `reap`.
    """
    deadline = time.monotonic() + (SETTLE_RETRY_S if budget_s is None else budget_s)
    delay = 0.5
    while True:
        try:
            return ledger.settle(allocation_id, actual_seconds, status=status, reason=reason)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError):
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


# --- the invariant ------------------------------------------------------------------------------

def check(conn=None, *, now: datetime | None = None) -> list[str]:
    """Problems with the books, or [] when they balance.

    Per account: granted - debited + refunded = balance, the totals agree with the ledger,
    and no balance is negative. Per allocation: one debit row of `debited`; once closed,
    debited = actual_cost + refunded and the refund rows sum to `refunded`; while open, it is
    not past its expiry (an overdue one holds credits nobody will settle: `forge ledger reap`).
    """
    problems: list[str] = []
    zero = Decimal(0)
    with transaction(conn) as c:
        sums: dict[tuple[str, str], Decimal] = {}
        for acct, reason, total in c.execute(
                sa.select(token_ledger.c.to_account, token_ledger.c.reason,
                          sa.func.sum(token_ledger.c.amount))
                .group_by(token_ledger.c.to_account, token_ledger.c.reason)):
            sums[("in", acct, reason)] = total  # type: ignore[index]
        for acct, reason, total in c.execute(
                sa.select(token_ledger.c.from_account, token_ledger.c.reason,
                          sa.func.sum(token_ledger.c.amount))
                .group_by(token_ledger.c.from_account, token_ledger.c.reason)):
            sums[("out", acct, reason)] = total  # type: ignore[index]
        bad_rows = c.execute(sa.select(sa.func.count()).select_from(token_ledger)
                             .where(token_ledger.c.amount <= 0)).scalar_one()
        if bad_rows:
            problems.append(f"{bad_rows} ledger rows have a non-positive amount")
        accounts = [dict(r) for r in c.execute(sa.select(token_accounts)).mappings()]
        known = {a["account_id"] for a in accounts}
        for a in accounts:
            acct = a["account_id"]
            granted = sums.get(("in", acct, GRANT), zero)
            debited = sums.get(("out", acct, DEBIT), zero)
            refunded = sums.get(("in", acct, REFUND), zero)
            if granted - debited + refunded != a["balance"]:
                problems.append(f"account {acct}: granted {granted} - debited {debited} + "
                                f"refunded {refunded} != balance {a['balance']}")
            for column, value in (("total_granted", granted), ("total_debited", debited),
                                  ("total_refunded", refunded)):
                if a[column] != value:
                    problems.append(f"account {acct}: {column} {a[column]} != ledger {value}")
            if a["balance"] < 0:
                problems.append(f"account {acct}: negative balance {a['balance']}")
        for direction, acct, _reason in sums:
            if not acct.startswith("system:") and acct not in known:
                problems.append(f"ledger names account {acct!r} ({direction}) with no row")

        # Per allocation, in the database: only the allocations that break a rule (and the
        # ledger references to none) come back, not every allocation and its ledger rows.
        suspects, unknown = _allocation_suspects(c)
        dead = overdue(now, conn=c)
    for ref in unknown:
        problems.append(f"ledger rows reference unknown allocation {ref}")
    for a in suspects:
        alloc_id = a["id"]
        debit, n_debits = a["debit_sum"] or zero, a["n_debits"] or 0
        refund, n_refunds = a["refund_sum"] or zero, a["n_refunds"] or 0
        if debit != a["debited"] or n_debits > 1:
            problems.append(f"allocation {alloc_id}: debited {a['debited']} but ledger has "
                            f"{n_debits} debit rows totalling {debit}")
        if a["status"] in FINAL_STATES:
            actual, refunded = a["actual_cost"], a["refunded"]
            if actual is None or refunded is None or actual + refunded != a["debited"]:
                problems.append(f"allocation {alloc_id}: debited {a['debited']} != actual "
                                f"{actual} + refunded {refunded}")
            if refund != (refunded or zero) or n_refunds > 1:
                problems.append(f"allocation {alloc_id}: refunded {refunded} but ledger has "
                                f"{n_refunds} refund rows totalling {refund}")
        elif n_refunds or a["actual_cost"] is not None:
            problems.append(f"allocation {alloc_id} is {a['status']} but already has a "
                            f"refund or an actual cost")
    for a in dead:
        problems.append(f"allocation {a['id']} is overdue, holding {a['debited']} "
                        f"{a['currency']} of {a['agent_id']}: {a['overdue']}; "
                        "run `forge ledger reap`")
    return problems


def _allocation_suspects(conn) -> tuple[list[dict], list[str]]:
    """The allocations whose ledger rows may not agree with them, each with its debit and
    refund sums and counts (`check` words the problems), and the allocation ids that ledger
    rows reference but no allocation has. One grouped pass over the ledger joined to the
    allocations: the rules of `check` as a WHERE clause, so the agreeing ones stay in the
    database."""
    led, alloc = token_ledger.c, resource_allocations.c

    def of(reason: str):
        amount = sa.case((led.reason == reason, led.amount))
        return (sa.type_coerce(sa.func.sum(amount), Money()),
                sa.func.count(sa.case((led.reason == reason, 1))))

    (debit_sum, n_debits), (refund_sum, n_refunds) = of(DEBIT), of(REFUND)
    per = (sa.select(led.reference_id.label("ref"), debit_sum.label("debit_sum"),
                     n_debits.label("n_debits"), refund_sum.label("refund_sum"),
                     n_refunds.label("n_refunds"))
           .where(led.reference_type == ALLOCATION).group_by(led.reference_id).subquery())
    debit = sa.func.coalesce(per.c.debit_sum, 0)
    refund = sa.func.coalesce(per.c.refund_sum, 0)
    final = alloc.status.in_(FINAL_STATES)
    broken = sa.or_(
        debit != alloc.debited, per.c.n_debits > 1,
        sa.and_(final, sa.or_(alloc.actual_cost.is_(None), alloc.refunded.is_(None),
                              alloc.actual_cost + alloc.refunded != alloc.debited,
                              refund != alloc.refunded, per.c.n_refunds > 1)),
        sa.and_(~final, sa.or_(per.c.n_refunds > 0, alloc.actual_cost.is_not(None))))
    suspects = [dict(r) for r in conn.execute(
        sa.select(resource_allocations, per.c.debit_sum, per.c.n_debits, per.c.refund_sum,
                  per.c.n_refunds)
        .select_from(resource_allocations.outerjoin(per, per.c.ref == alloc.id))
        .where(broken).order_by(alloc.created_at, alloc.id)).mappings()]
    unknown = list(conn.execute(
        sa.select(per.c.ref).where(~sa.exists().where(alloc.id == per.c.ref))
        .order_by(per.c.ref)).scalars())
    return suspects, unknown
