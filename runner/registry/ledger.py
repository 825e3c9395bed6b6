"""The compute ledger: grant credits, estimate a job, reserve (debit BEFORE launch), settle.

Money is Decimal end to end (the `Money` column type keeps it exact on both backends).
Every movement is one `token_ledger` row between two accounts and updates the agent's
`token_accounts` totals in the same transaction:

    grant     system:mint    -> agent            reason 'grant'
    reserve   agent          -> system:compute   reason 'compute_debit'   (the estimate)
    settle    system:compute -> agent            reason 'compute_refund'  (debit - actual)
    cancel    system:compute -> agent            reason 'compute_refund'  (the whole debit)

System accounts are only ever named in the ledger; agents have rows in `token_accounts`.
`reserve` checks the operator's capacity limits (capacity.py) and the balance, debits and
inserts the allocation in ONE transaction (the account row is locked: SELECT ... FOR UPDATE
on PostgreSQL, BEGIN IMMEDIATE on SQLite), and the same request key reserves once. `settle`
and `cancel` move money exactly once: the status in the UPDATE's WHERE clause makes a second
call a no-op.

Every allocation expires and is kept alive by its host's heartbeat; recovery.py closes the
ones whose host is gone (`reap`, which every launch runs before it reserves) and checks the
books (`check`).
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import nullcontext
from datetime import timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from runner.errors import (
    BudgetExceeded,
    InvalidInput,
    LedgerError,
    NotFound,
    UnknownAgent,
)
from runner.registry import capacity
from runner.registry.db import now, rows_where_in, transaction
from runner.registry.db import row as _row
from runner.registry.ids import AGENT_ID
from runner.registry.money import _check_count, _seconds, charge, to_amount, to_price
from runner.registry.schema import resource_allocations, token_accounts, token_ledger

MINT = "system:mint"
COMPUTE = "system:compute"
GRANT, DEBIT, REFUND = "grant", "compute_debit", "compute_refund"
ALLOCATION = "resource_allocation"
OPEN_STATES = ("reserved", "running")
FINAL_STATES = ("settled", "failed", "cancelled")
EXPIRY_MARGIN_S = 600.0  # setup before the sandbox starts, and registration after it ends


def check_agent_id(agent_id: Any) -> str:
    if not isinstance(agent_id, str) or not AGENT_ID.match(agent_id):
        raise InvalidInput(f"agent_id {agent_id!r} is not a valid agent id", field="agent_id",
                           fix=f"use an id matching {AGENT_ID.pattern} (no ':'; "
                               "system accounts cannot be granted to)")
    return agent_id


# --- account rows -------------------------------------------------------------------------------

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
    with transaction(conn) as c:
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
    # lazy: only the backend in use is loaded (postgresql's dialect is ~25 ms)
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def account(agent_id: str, *, conn=None) -> dict | None:
    """The agent's token_accounts row, or None."""
    with transaction(conn) as c:
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

def host_id() -> str:
    """Who runs a job: hostname:pid of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def get_allocation(allocation_id: str, *, conn=None) -> dict:
    with transaction(conn) as c:
        row = _row(c.execute(sa.select(resource_allocations)
                             .where(resource_allocations.c.id == allocation_id)))
    if row is None:
        raise NotFound(f"allocation {allocation_id!r} does not exist", field="allocation_id")
    return row


def allocations_by_id(allocation_ids, *, conn=None) -> dict[str, dict]:
    """id -> allocation row, for those of `allocation_ids` that exist, in one read."""
    with transaction(conn) as c:
        return {r["id"]: r for r in rows_where_in(c, sa.select(resource_allocations),
                                                  resource_allocations.c.id, allocation_ids)}


def list_allocations(*, agent_id: str | None = None, status: str | None = None,
                     limit: int = 50, conn=None) -> list[dict]:
    """The newest allocations first, of one agent and/or in one status."""
    query = sa.select(resource_allocations)
    if agent_id is not None:
        query = query.where(resource_allocations.c.agent_id == check_agent_id(agent_id))
    if status is not None:
        query = query.where(resource_allocations.c.status == status)
    query = query.order_by(resource_allocations.c.created_at.desc()).limit(max(1, int(limit)))
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(query).mappings()]


def _by_key(conn, request_key: str) -> dict | None:
    return _row(conn.execute(sa.select(resource_allocations)
                             .where(resource_allocations.c.request_key == request_key)))


RETRYABLE = ("failed", "cancelled")  # a request whose last attempt ended so may run again


def reserve(agent_id: str, amount: Any, request_key: str, *, wall_time_cap_min: int,
            vram_cap_gb: int, price_per_hour: Any, devices: int = 1, device: str | None = None,
            resource_type: str = "gpu", currency: str = "credits",
            margin_s: float = EXPIRY_MARGIN_S, purpose: str = "training",
            engine: str | None = None, engine_job_id: str | None = None,
            limits: capacity.Limits | None = None, conn=None) -> dict:
    """Check the capacity `limits` and the balance, debit `amount` and insert the `reserved`
    allocation, atomically.
    `purpose` says what the compute pays for: a training job or an eval-gate job; `engine`
    and `engine_job_id` name the scheduler job the host process runs in ("slurm", "123_4").

    The same `request_key` reserves once: a repeat (or a concurrent twin that lost the race on
    the unique key) returns the existing allocation with `existing=True` and debits nothing.
    Only a request whose earlier attempt failed or was cancelled reserves (and debits) again.
    Raises UnknownAgent, CapacityExceeded or BudgetExceeded, leaving no trace.

    The allocation expires `wall_time_cap_min` (the sandbox's grace period lies inside it)
    + `margin_s` from now, and this
    process is its host (it must heartbeat; see `recovery.Heartbeat`). Reap dead allocations
    first (`runner.jobs.launch` does, before every reserve), so that a request whose earlier
    attempt died with its host can run again and its credits count.
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
    try:
        with transaction(conn) as c, (c.begin_nested() if conn is not None else nullcontext()):
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
            if limits is not None:  # under the account's lock: one agent's reservers queue
                capacity.check(c, agent_id, limits)
            if account["balance"] < amount:
                raise insufficient(agent_id, account["balance"], amount, currency)
            stamp = now()
            row = dict(id=f"alloc-{uuid.uuid4().hex}", agent_id=agent_id,
                       resource_type=resource_type, device=device, devices=devices,
                       status="reserved", wall_time_cap_min=wall_time_cap_min,
                       vram_cap_gb=vram_cap_gb, price_per_hour=price, currency=currency,
                       estimated_cost=amount, debited=amount, request_key=request_key,
                       created_at=stamp, debited_at=stamp, expires_at=stamp + window,
                       heartbeat_at=stamp, host=host_id(), purpose=purpose, engine=engine,
                       engine_job_id=engine_job_id,
                       memory_cap_gb=limits.memory_gb if limits is not None else None)
            c.execute(resource_allocations.insert().values(**row))
            if amount > 0:
                new_balance = account["balance"] - amount
                _update_account(c, account, balance=new_balance,
                                total_debited=account["total_debited"] + amount)
                _move(c, from_account=agent_id, to_account=COMPUTE, amount=amount,
                      reason=DEBIT, reference_id=row["id"], balance_after_from=new_balance,
                      memo=f"reserve {wall_time_cap_min} min x {devices} {device or resource_type}"
                           + ("" if purpose == "training" else f" ({purpose})"))
            created = _by_key(c, request_key)
    except sa.exc.IntegrityError:
        # Two processes inserted the same request key; the unique constraint let one win.
        with transaction(conn) as c:
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
    with transaction(conn) as c:
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
    `status` is "settled", "failed", or "cancelled" (a job stopped by its scheduler or a
    SIGTERM: the seconds it ran are charged like any others).
    A second call (or one on a cancelled allocation) is a no-op that returns the row with
    `already_settled=True`. Pass `conn` to settle inside the caller's transaction.
    """
    if status not in FINAL_STATES:
        raise InvalidInput(f"status must be one of {', '.join(FINAL_STATES)}, got {status!r}",
                           field="status", fix="use status='failed' for a failed run")
    seconds = _seconds(actual_seconds)
    return _close(allocation_id, status=status, seconds=seconds, reason=reason,
                  artifact_id=artifact_id, conn=conn)


def cancel(allocation_id: str, reason: str | None = None, *, queued_only: bool = False,
           conn=None) -> dict:
    """Refund the whole debit of a job that never ran (reserved or running -> cancelled).
    `queued_only`: only while still reserved; a job that started meanwhile is left open
    (`already_settled` is False and the status says `running`) for its host to settle."""
    return _close(allocation_id, status="cancelled", seconds=None, reason=reason,
                  artifact_id=None, conn=conn,
                  states=("reserved",) if queued_only else OPEN_STATES)


def assign_engine(allocation_id: str, engine: str, engine_job_id: str, host: str, *,
                  conn=None) -> bool:
    """A queued (reserved) allocation now waits in a scheduler job: record it, and make that
    job its host, so the reaper asks after the job rather than the process that submitted it
    (a CLI call that has already exited). False when the allocation is no longer reserved."""
    with transaction(conn) as c:
        result = c.execute(
            resource_allocations.update()
            .where(resource_allocations.c.id == allocation_id,
                   resource_allocations.c.status == "reserved")
            .values(engine=engine, engine_job_id=engine_job_id, host=host, heartbeat_at=now()))
    return result.rowcount == 1


def _close(allocation_id: str, *, status: str, seconds: Decimal | None, reason: str | None,
           artifact_id: str | None, conn, states: tuple[str, ...] = OPEN_STATES) -> dict:
    with transaction(conn) as c:
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
        if alloc["status"] not in states:
            return {**alloc, "already_settled": False}
        debited = alloc["debited"]
        if seconds is None:
            cost = Decimal(0)
        else:
            cost = min(charge(alloc["price_per_hour"], seconds, alloc["devices"]), debited)
        refund = debited - cost
        result = c.execute(
            resource_allocations.update()
            .where(resource_allocations.c.id == allocation_id,
                   resource_allocations.c.status.in_(states))
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
