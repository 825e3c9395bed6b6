"""The compute ledger: grant credits, estimate a job, reserve (debit BEFORE launch), settle.

Money is Decimal end to end (the `Money` column type keeps it exact on both backends).
Every movement is one `token_ledger` row between two accounts and updates the agent's
`token_accounts` totals in the same transaction:

    grant     system:mint    -> agent            reason 'grant'
    reserve   agent          -> system:compute   reason 'compute_debit'   (the estimate)
    settle    system:compute -> agent            reason 'compute_refund'  (debit - actual)
    cancel    system:compute -> agent            reason 'compute_refund'  (the whole debit)

System accounts are only ever named in the ledger; agents have rows in `token_accounts`.
`reserve` checks the balance, debits and inserts the allocation in ONE transaction (the
account row is locked: SELECT ... FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite), and
the same request key reserves once. `settle` and `cancel` move money exactly once: the status
in the UPDATE's WHERE clause makes a second call a no-op.

No allocation stays open forever. Each carries `expires_at` (reserve time + wall-time cap,
whose last seconds are the sandbox's grace period, + a margin; the window restarts when the
job starts) and a heartbeat
(`heartbeat_at`, `host` = hostname:pid) that the host refreshes while it runs the job. `reap`
settles every open allocation past its expiry, or whose heartbeat is stale and whose host
process is gone from this machine, as `failed`: it charges the seconds the job is known to
have run (start to last heartbeat, capped at the debit, as `settle` does) and refunds the
rest, exactly once however many reapers race. It runs at the start of every `reserve`, from
`forge ledger reap`, and `check` reports what is overdue.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, ROUND_UP, Decimal, InvalidOperation
from typing import Any, Iterator

import sqlalchemy as sa

from runner.registry import db
from runner.errors import (
    BudgetExceeded,
    ForgeError,
    InvalidAmount,
    InvalidInput,
    LedgerError,
    NotFound,
    UnknownAgent,
)
from runner.registry.schema import MONEY_PLACES, resource_allocations, token_accounts, token_ledger

MINT = "system:mint"
COMPUTE = "system:compute"
GRANT, DEBIT, REFUND = "grant", "compute_debit", "compute_refund"
ALLOCATION = "resource_allocation"
OPEN_STATES = ("reserved", "running")
FINAL_STATES = ("settled", "failed", "cancelled")
MAX_AMOUNT = Decimal("100000000000000")  # NUMERIC(20, 6): 14 integer digits
EXPIRY_MARGIN_S = 600.0  # setup before the sandbox starts, and registration after it ends
HEARTBEAT_S = 30.0  # how often the host refreshes heartbeat_at (FORGE_HEARTBEAT_S overrides)
MISSED_BEATS = 3  # a heartbeat older than this many beats is stale
SETTLE_RETRY_S = 30.0  # how long settle_retrying() keeps trying while the database is away


def now() -> datetime:
    return datetime.now(timezone.utc)


# --- amounts ------------------------------------------------------------------------------------

def to_amount(value: Any, field: str = "amount", *, allow_zero: bool = False) -> Decimal:
    """A money amount from a Decimal, int or numeric string. Floats are refused (inexact)."""
    def bad(why: str) -> InvalidAmount:
        return InvalidAmount(f"{field} {value!r} {why}", field=field,
                             fix="pass a positive decimal string such as '10' or '2.50'")

    if isinstance(value, bool) or value is None:
        raise bad("is not a number")
    if isinstance(value, float):
        raise bad("is a float; money is exact")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise bad("is not a number") from None
    else:
        raise bad(f"is a {type(value).__name__}, not a number")
    if not amount.is_finite():
        raise bad("is not finite")
    if amount < 0 or (amount == 0 and not allow_zero):
        raise bad("must be greater than zero" if not allow_zero else "must not be negative")
    if amount >= MAX_AMOUNT:
        raise bad(f"is too large (limit {MAX_AMOUNT})")
    if amount != amount.quantize(MONEY_PLACES, rounding=ROUND_HALF_EVEN):
        raise bad("has more than 6 decimal places")
    return amount


def to_price(value: Any, field: str = "price_per_hour") -> Decimal:
    """A price from config: floats are read by their shortest repr (0.5 -> Decimal('0.5'))."""
    if isinstance(value, float):
        value = repr(value)
    return round_money(to_amount(value, field, allow_zero=True))


CENTS = Decimal("0.01")


def round_money(amount: Decimal, rounding=ROUND_HALF_EVEN) -> Decimal:
    """Money scale: at least 2 and at most 6 decimal places (1 -> 1.00, 1/60 -> 0.016667)."""
    exponent = amount.as_tuple().exponent
    if exponent < -6:  # type: ignore[operator]
        return amount.quantize(MONEY_PLACES, rounding=rounding)
    if exponent > -2:  # type: ignore[operator]
        return amount.quantize(CENTS)
    return amount


def fmt(amount: Decimal) -> str:
    """For people: 10.000000 -> '10.00', 0.058334 -> '0.058334'."""
    amount = amount.normalize()
    if amount.as_tuple().exponent > -2:  # type: ignore[operator]
        amount = amount.quantize(Decimal("0.01"))
    return f"{amount:f}"


def estimate(price_per_hour: Any, wall_time_cap_min: int, devices: int = 1) -> Decimal:
    """The debit for a job: price x cap hours x devices (rounded up to a millionth)."""
    price = to_price(price_per_hour)
    _check_count(wall_time_cap_min, "wall_time_cap_min")
    _check_count(devices, "devices")
    hours = Decimal(wall_time_cap_min) / Decimal(60)
    return round_money(price * hours * Decimal(devices), ROUND_UP)


def charge(price_per_hour: Any, actual_seconds: Any, devices: int = 1) -> Decimal:
    """What `actual_seconds` of wall time on `devices` devices costs."""
    price = to_price(price_per_hour)
    seconds = _seconds(actual_seconds)
    return round_money(price * seconds / Decimal(3600) * Decimal(devices))


def _check_count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{field} must be an integer >= 1, got {value!r}", field=field,
                           fix=f"pass {field} as a positive integer")
    return value


def _seconds(value: Any, field: str = "actual_seconds") -> Decimal:
    try:
        seconds = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        seconds = Decimal("NaN")
    if isinstance(value, bool) or not seconds.is_finite() or seconds < 0:
        raise InvalidInput(f"{field} must be a finite number >= 0, got {value!r}",
                           field=field, fix="pass the job's wall-clock seconds"
                           if field == "actual_seconds" else f"set {field} to seconds >= 0")
    return seconds


def check_agent_id(agent_id: Any) -> str:
    from runner.config.compose import AGENT_ID

    if not isinstance(agent_id, str) or not AGENT_ID.match(agent_id):
        raise InvalidInput(f"agent_id {agent_id!r} is not a valid agent id", field="agent_id",
                           fix=f"use an id matching {AGENT_ID.pattern} (no ':'; "
                               "system accounts cannot be granted to)")
    return agent_id


# --- transactions ------------------------------------------------------------------------------

@contextmanager
def _tx(conn: sa.Connection | None) -> Iterator[sa.Connection]:
    """Use the caller's transaction when given one, else open (and commit) our own."""
    if conn is not None:
        with nullcontext(conn) as c:
            yield c
        return
    with db.get_engine().begin() as c:
        yield c


def _row(result) -> dict | None:
    row = result.mappings().first()
    return dict(row) if row else None


def _locked_account(conn, agent_id: str) -> dict | None:
    return _row(conn.execute(sa.select(token_accounts)
                             .where(token_accounts.c.account_id == agent_id)
                             .with_for_update()))


def _move(conn, *, from_account: str, to_account: str, amount: Decimal, reason: str,
          reference_id: str | None = None, memo: str | None = None,
          balance_after_from: Decimal | None = None,
          balance_after_to: Decimal | None = None) -> str:
    txn_id = f"txn-{uuid.uuid4().hex}"
    conn.execute(token_ledger.insert().values(
        id=txn_id, ts=now(), from_account=from_account, to_account=to_account, amount=amount,
        reason=reason, reference_type=ALLOCATION if reference_id else None,
        reference_id=reference_id, memo=memo, balance_after_from=balance_after_from,
        balance_after_to=balance_after_to))
    return txn_id


def _update_account(conn, account: dict, **changes: Decimal) -> None:
    """Write new balance/totals, guarded by the balance we read under the lock."""
    result = conn.execute(
        token_accounts.update()
        .where(token_accounts.c.account_id == account["account_id"],
               token_accounts.c.balance == account["balance"])
        .values(updated_at=now(), **changes))
    if result.rowcount != 1:
        raise LedgerError(f"account {account['account_id']!r} changed under its lock",
                          reason="concurrent_update", fix="retry")


# --- accounts -----------------------------------------------------------------------------------

def grant(agent_id: str, amount: Any, *, memo: str | None = None, conn=None) -> Decimal:
    """Credit `amount` to the agent (opening the account if needed); returns the new balance."""
    check_agent_id(agent_id)
    amount = to_amount(amount, "amount")
    with _tx(conn) as c:
        stamp = now()
        insert = _dialect_insert(c)(token_accounts).values(
            account_id=agent_id, balance=Decimal(0), total_granted=Decimal(0),
            total_debited=Decimal(0), total_refunded=Decimal(0), created_at=stamp,
            updated_at=stamp).on_conflict_do_nothing(index_elements=["account_id"])
        c.execute(insert)
        account = _locked_account(c, agent_id)
        assert account is not None
        new_balance = account["balance"] + amount
        _update_account(c, account, balance=new_balance,
                        total_granted=account["total_granted"] + amount)
        _move(c, from_account=MINT, to_account=agent_id, amount=amount, reason=GRANT,
              memo=memo, balance_after_to=new_balance)
    return new_balance


def _dialect_insert(conn):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def account(agent_id: str, *, conn=None) -> dict | None:
    """The agent's token_accounts row, or None."""
    with _tx(conn) as c:
        return _row(c.execute(sa.select(token_accounts)
                              .where(token_accounts.c.account_id == agent_id)))


def balance(agent_id: str, *, conn=None) -> Decimal:
    """The agent's balance; UnknownAgent when it has no account."""
    check_agent_id(agent_id)
    row = account(agent_id, conn=conn)
    if row is None:
        raise unknown_agent(agent_id)
    return row["balance"]


def unknown_agent(agent_id: str) -> UnknownAgent:
    return UnknownAgent(f"agent {agent_id!r} has no account", field="agent_id",
                        fix=f"grant it credits first: forge ledger grant {agent_id} AMOUNT")


def insufficient(agent_id: str, have: Decimal, need: Decimal, currency: str) -> BudgetExceeded:
    return BudgetExceeded(
        f"agent {agent_id!r} has {have} {currency}, the estimate is {need}", field="agent_id",
        fix="lower wall_time_cap_min or devices, or grant more credits",
        balance=str(have), estimate=str(need), currency=currency)


# --- allocations ---------------------------------------------------------------------------------

def get_allocation(allocation_id: str, *, conn=None) -> dict:
    with _tx(conn) as c:
        row = _row(c.execute(sa.select(resource_allocations)
                             .where(resource_allocations.c.id == allocation_id)))
    if row is None:
        raise NotFound(f"allocation {allocation_id!r} does not exist", field="allocation_id")
    return row


def _by_key(conn, request_key: str) -> dict | None:
    return _row(conn.execute(sa.select(resource_allocations)
                             .where(resource_allocations.c.request_key == request_key)))


RETRYABLE = ("failed", "cancelled")  # a request whose last attempt ended so may run again


def reserve(agent_id: str, amount: Any, request_key: str, *, wall_time_cap_min: int,
            vram_cap_gb: int, price_per_hour: Any, devices: int = 1, device: str | None = None,
            resource_type: str = "gpu", currency: str = "credits",
            margin_s: float = EXPIRY_MARGIN_S, conn=None) -> dict:
    """Check the balance, debit `amount` and insert the `reserved` allocation, atomically.

    The same `request_key` reserves once: a repeat (or a concurrent twin that lost the race on
    the unique key) returns the existing allocation with `existing=True` and debits nothing.
    Only a request whose earlier attempt failed or was cancelled reserves (and debits) again.
    Raises UnknownAgent or BudgetExceeded, leaving no trace.

    The allocation expires `wall_time_cap_min` (the sandbox's grace period lies inside it)
    + `margin_s` from now, and this
    process is its host (it must heartbeat; see `Heartbeat`). Dead allocations are reaped
    first, in their own transactions (not when joining the caller's transaction `conn`), so a
    request whose earlier attempt died with its host can run again.
    """
    check_agent_id(agent_id)
    amount = to_amount(amount, "amount", allow_zero=True)
    price = to_price(price_per_hour)
    _check_count(wall_time_cap_min, "wall_time_cap_min")
    _check_count(vram_cap_gb, "vram_cap_gb")
    _check_count(devices, "devices")
    if not isinstance(request_key, str) or not request_key:
        raise InvalidInput("request_key must be a non-empty string", field="request_key")
    window = timedelta(seconds=wall_time_cap_min * 60 + float(_seconds(margin_s, "margin_s")))
    if conn is None:
        reap()
    try:
        with _tx(conn) as c, (c.begin_nested() if conn is not None else nullcontext()):
            existing = _by_key(c, request_key)
            if existing is not None and existing["status"] not in RETRYABLE:
                return {**existing, "existing": True}
            account = _locked_account(c, agent_id)
            if account is None:
                raise unknown_agent(agent_id)
            existing = _by_key(c, request_key)  # a twin may have committed while we waited
            if existing is not None and existing["status"] not in RETRYABLE:
                return {**existing, "existing": True}
            if existing is not None:
                # A failed or cancelled attempt keeps its row and its books, but gives up the
                # key so that the same request can run again, with a debit of its own.
                c.execute(resource_allocations.update()
                          .where(resource_allocations.c.id == existing["id"])
                          .values(request_key=f"{request_key}:{existing['id']}"))
            if account["balance"] < amount:
                raise insufficient(agent_id, account["balance"], amount, currency)
            stamp = now()
            row = dict(id=f"alloc-{uuid.uuid4().hex}", agent_id=agent_id,
                       resource_type=resource_type, device=device, devices=devices,
                       status="reserved", wall_time_cap_min=wall_time_cap_min,
                       vram_cap_gb=vram_cap_gb, price_per_hour=price, currency=currency,
                       estimated_cost=amount, debited=amount, request_key=request_key,
                       created_at=stamp, debited_at=stamp, expires_at=stamp + window,
                       heartbeat_at=stamp, host=host_id())
            c.execute(resource_allocations.insert().values(**row))
            if amount > 0:
                new_balance = account["balance"] - amount
                _update_account(c, account, balance=new_balance,
                                total_debited=account["total_debited"] + amount)
                _move(c, from_account=agent_id, to_account=COMPUTE, amount=amount,
                      reason=DEBIT, reference_id=row["id"], balance_after_from=new_balance,
                      memo=f"reserve {wall_time_cap_min} min x {devices} {device or resource_type}")
            created = _by_key(c, request_key)
    except sa.exc.IntegrityError:
        # Two processes inserted the same request key; the unique constraint let one win.
        with _tx(conn) as c:
            existing = _by_key(c, request_key)
        if existing is None:
            raise
        return {**existing, "existing": True}
    return {**created, "existing": False}


def mark_running(allocation_id: str, mlflow_run_id: str | None, *, conn=None) -> dict:
    """reserved -> running, with the MLflow run it reports to.

    The expiry window restarts here (the cap runs from the start of the job, not from the
    reservation), and this process becomes the host whose heartbeat keeps it alive.
    """
    with _tx(conn) as c:
        alloc = get_allocation(allocation_id, conn=c)
        stamp = now()
        window = (alloc["expires_at"] - alloc["created_at"]
                  if alloc["expires_at"] is not None else None)
        result = c.execute(
            resource_allocations.update()
            .where(resource_allocations.c.id == allocation_id,
                   resource_allocations.c.status == "reserved")
            .values(status="running", started_at=stamp, mlflow_run_id=mlflow_run_id,
                    heartbeat_at=stamp, host=host_id(),
                    expires_at=stamp + window if window is not None else None))
        row = get_allocation(allocation_id, conn=c)
        if result.rowcount != 1 and not (row["status"] == "running"
                                         and row["mlflow_run_id"] == mlflow_run_id):
            raise LedgerError(f"allocation {allocation_id!r} is {row['status']}, not reserved",
                              reason="allocation_state", field="allocation_id",
                              fix="only a reserved allocation can start")
    return row


def settle(allocation_id: str, actual_seconds: Any, status: str = "settled",
           reason: str | None = None, artifact_id: str | None = None, *, conn=None) -> dict:
    """Charge the seconds used (capped at the debit) and refund the rest, exactly once.

    `actual_seconds` is wall-clock seconds; the charge is price x seconds/3600 x devices.
    A second call (or one on a cancelled allocation) is a no-op that returns the row with
    `already_settled=True`. Pass `conn` to settle inside the caller's transaction.
    """
    if status not in ("settled", "failed"):
        raise InvalidInput(f"status must be 'settled' or 'failed', got {status!r}",
                           field="status", fix="use status='failed' for a failed run")
    seconds = _seconds(actual_seconds)
    return _close(allocation_id, status=status, seconds=seconds, reason=reason,
                  artifact_id=artifact_id, conn=conn)


def cancel(allocation_id: str, reason: str | None = None, *, conn=None) -> dict:
    """Refund the whole debit of a job that never ran (reserved or running -> cancelled)."""
    return _close(allocation_id, status="cancelled", seconds=None, reason=reason,
                  artifact_id=None, conn=conn)


def _close(allocation_id: str, *, status: str, seconds: Decimal | None, reason: str | None,
           artifact_id: str | None, conn) -> dict:
    with _tx(conn) as c:
        alloc = _row(c.execute(sa.select(resource_allocations)
                               .where(resource_allocations.c.id == allocation_id)
                               .with_for_update()))
        if alloc is None:
            raise NotFound(f"allocation {allocation_id!r} does not exist", field="allocation_id")
        if alloc["status"] in FINAL_STATES:
            if status == "settled" and artifact_id is not None \
                    and alloc["artifact_id"] != artifact_id:
                # The reaper (or a cancel) closed it and refunded the credits: a version
                # registered now would have been trained for free. Roll the caller back.
                raise LedgerError(
                    f"allocation {allocation_id!r} is already {alloc['status']} "
                    f"({alloc['failure_reason'] or 'no reason'})", reason="allocation_closed",
                    field="allocation_id", fix="retry the request: it launches anew")
            return {**alloc, "already_settled": True}
        debited = alloc["debited"]
        if seconds is None:
            cost = Decimal(0)
        else:
            cost = min(charge(alloc["price_per_hour"], seconds, alloc["devices"]), debited)
        refund = debited - cost
        result = c.execute(
            resource_allocations.update()
            .where(resource_allocations.c.id == allocation_id,
                   resource_allocations.c.status.in_(OPEN_STATES))
            .values(status=status, actual_seconds=float(seconds or 0), actual_cost=cost,
                    refunded=refund, settled_at=now(), failure_reason=reason,
                    artifact_id=artifact_id if artifact_id is not None
                    else alloc["artifact_id"]))
        if result.rowcount != 1:  # someone closed it between our read and our write
            return {**get_allocation(allocation_id, conn=c), "already_settled": True}
        if refund > 0:
            account = _locked_account(c, alloc["agent_id"])
            if account is None:
                raise unknown_agent(alloc["agent_id"])
            new_balance = account["balance"] + refund
            _update_account(c, account, balance=new_balance,
                            total_refunded=account["total_refunded"] + refund)
            _move(c, from_account=COMPUTE, to_account=alloc["agent_id"], amount=refund,
                  reason=REFUND, reference_id=allocation_id, balance_after_to=new_balance,
                  memo=f"{status}: used {cost} of {debited}")
        return {**get_allocation(allocation_id, conn=c), "already_settled": False}


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
            return settle(allocation_id, actual_seconds, status=status, reason=reason)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError):
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


# --- recovery: heartbeat, expiry, reap ------------------------------------------------------------

def host_id() -> str:
    """Who runs a job: hostname:pid of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def heartbeat_interval() -> float:
    """Seconds between heartbeats: FORGE_HEARTBEAT_S (operator environment), else 30."""
    try:
        value = float(os.environ.get("FORGE_HEARTBEAT_S") or HEARTBEAT_S)
    except ValueError:
        value = HEARTBEAT_S
    return value if value > 0 else HEARTBEAT_S


def heartbeat(allocation_id: str, *, conn=None) -> bool:
    """Say this process still runs the allocation; False once it is closed."""
    with _tx(conn) as c:
        result = c.execute(resource_allocations.update()
                           .where(resource_allocations.c.id == allocation_id,
                                  resource_allocations.c.status.in_(OPEN_STATES))
                           .values(heartbeat_at=now(), host=host_id()))
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

    def __enter__(self) -> "Heartbeat":
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


def _utc(stamp: datetime | None) -> datetime | None:
    """SQLite hands back UTC timestamps without their offset; PostgreSQL with it."""
    if stamp is not None and stamp.tzinfo is None:
        return stamp.replace(tzinfo=timezone.utc)
    return stamp


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


def overdue(now: datetime | None = None, *, conn=None) -> list[dict]:
    """Open allocations that nobody will settle: past their expiry, or with a stale heartbeat
    from a host process gone from this machine. Each has `overdue` saying which; `reap`
    settles exactly these, and `check` reports them."""
    at = now or datetime.now(timezone.utc)
    with _tx(conn) as c:
        rows = _open_due(c, at)
    return [{**a, "overdue": why} for a in rows if (why := _dead_because(a, at))]


def _dead_because(alloc: dict, at: datetime) -> str | None:
    expires, beat = _utc(alloc["expires_at"]), _utc(alloc["heartbeat_at"])
    if expires is not None and expires < at:
        return f"{alloc['status']} past its expiry {expires:%Y-%m-%d %H:%M:%S} UTC"
    stale = at - timedelta(seconds=MISSED_BEATS * heartbeat_interval())
    if beat is not None and beat < stale and _host_gone(alloc["host"]):
        return (f"its host process {alloc['host']} is gone "
                f"(last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC)")
    return None


def _ran_seconds(alloc: dict) -> float:
    """What the job is known to have run: its start to its last heartbeat (0 if never started)."""
    started, beat = _utc(alloc["started_at"]), _utc(alloc["heartbeat_at"])
    if alloc["status"] != "running" or started is None or beat is None:
        return 0.0
    return max(0.0, (beat - started).total_seconds())


def reap(now: datetime | None = None) -> list[dict]:
    """Settle every dead open allocation as failed, exactly once; returns those this call
    closed.

    Dead means past `expires_at`, or a heartbeat older than MISSED_BEATS beats from a host
    process that is gone from this machine (a host elsewhere is left to its expiry). The
    charge is the seconds between the job's start and its last heartbeat, capped at the
    debit; the rest is refunded. Their MLflow runs are marked FAILED and their run folders
    cleaned (job.log and manifest.json kept); neither step can fail the reap.
    """
    reaped = []
    for alloc in overdue(now):
        try:
            closed = _close(alloc["id"], status="failed",
                            seconds=Decimal(repr(_ran_seconds(alloc))),
                            reason=f"reaped: {alloc['overdue']}", artifact_id=None, conn=None)
        except ForgeError as exc:  # e.g. the agent's account is gone: the others still go
            _warn(f"could not reap {alloc['id']}: {exc}")
            continue
        if not closed["already_settled"]:  # another reaper (or the host) got there first
            reaped.append(closed)
    _fail_runs([a for a in reaped if a["mlflow_run_id"]])
    _clean_run_dirs(reaped)
    return reaped


def _fail_runs(reaped: list[dict]) -> None:
    """Mark the reaped allocations' MLflow runs FAILED, in the operator's tracking store."""
    if not reaped:
        return
    try:
        from runner.jobs import tracking
        from runner.config.compose import compose_config, to_plain

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
    from runner import settings
    from runner.jobs.launch import clean_run_dir

    for alloc in reaped:
        clean_run_dir(settings.forge_home() / "runs" / alloc["id"])


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
    with _tx(conn) as c:
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

        per_alloc: dict[tuple[str, str], tuple[Decimal, int]] = {}
        for ref, reason, total, n in c.execute(
                sa.select(token_ledger.c.reference_id, token_ledger.c.reason,
                          sa.func.sum(token_ledger.c.amount), sa.func.count())
                .where(token_ledger.c.reference_type == ALLOCATION)
                .group_by(token_ledger.c.reference_id, token_ledger.c.reason)):
            per_alloc[(ref, reason)] = (total, n)
        allocs = {r["id"]: dict(r) for r in c.execute(sa.select(resource_allocations)).mappings()}
        dead = overdue(now, conn=c)
    for ref, _reason in per_alloc:
        if ref not in allocs:
            problems.append(f"ledger rows reference unknown allocation {ref}")
    for alloc_id, a in allocs.items():
        debit, n_debits = per_alloc.get((alloc_id, DEBIT), (zero, 0))
        refund, n_refunds = per_alloc.get((alloc_id, REFUND), (zero, 0))
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
