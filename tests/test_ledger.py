"""The compute ledger on SQLite and PostgreSQL: exact money, debit before launch, settle once."""

from __future__ import annotations

import json
import os
from decimal import Decimal

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import count_rows, race

from runner.cli import main as forge
from runner.errors import BudgetExceeded, InvalidAmount, InvalidInput, LedgerError, UnknownAgent
from runner.registry import db, ledger, money, recovery
from runner.registry.schema import resource_allocations, token_accounts, token_ledger

CAPS = dict(wall_time_cap_min=120, vram_cap_gb=24, price_per_hour=Decimal("0.50"))


def reserve(agent="a1", amount="1.00", key="k1", **kw):
    return ledger.reserve(agent, Decimal(amount), key, **{**CAPS, **kw})


def ledger_rows(url) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(token_ledger).order_by(token_ledger.c.ts)).mappings()]


# --- pure arithmetic ------------------------------------------------------------------------------

def test_120_minutes_at_half_a_credit_per_gpu_hour_is_exactly_one():
    amount = money.estimate(Decimal("0.50"), 120, 1)
    assert amount == Decimal("1.00") and str(amount) == "1.00"
    assert money.estimate(0.5, 120, 1) == Decimal("1.00")  # a config float, read exactly
    assert money.estimate("3.00", 60, 8) == Decimal("24.00")
    assert money.estimate("0.50", 7, 1) == Decimal("0.058334")  # rounded up, 6 places


def test_charge_is_price_times_hours_times_devices():
    assert money.charge("0.50", 1800, 1) == Decimal("0.25")
    assert money.charge("2.50", 3600, 2) == Decimal("5.00")
    assert money.charge("0.50", 0, 1) == Decimal("0.00")


@pytest.mark.parametrize("value", [-1, 0, "0", "-0.5", "NaN", "sNaN", "inf", "-Infinity", "abc",
                                   "", None, True, 1.5, [1], "1e20", "0.0000001"])
def test_bad_amounts_are_typed_errors_naming_the_field(value):
    with pytest.raises(InvalidAmount) as info:
        money.to_amount(value, "amount")
    assert info.value.field == "amount"


@pytest.mark.parametrize("caps", [dict(wall_time_cap_min=0), dict(wall_time_cap_min=1.5),
                                  dict(devices=True), dict(devices=-1)])
def test_estimate_rejects_bad_counts(caps):
    with pytest.raises(InvalidInput):
        money.estimate("0.5", caps.get("wall_time_cap_min", 60), caps.get("devices", 1))


# --- accounts -------------------------------------------------------------------------------------

def test_grant_and_balance(db_url):
    assert ledger.grant("a1", "10") == Decimal("10")
    assert ledger.grant("a1", Decimal("2.50"), memo="top-up") == Decimal("12.50")
    assert ledger.balance("a1") == Decimal("12.50")
    rows = ledger_rows(db_url)
    assert [(r["from_account"], r["to_account"], r["amount"], r["reason"]) for r in rows] == [
        ("system:mint", "a1", Decimal("10"), "grant"),
        ("system:mint", "a1", Decimal("2.5"), "grant")]
    assert rows[-1]["balance_after_to"] == Decimal("12.50") and rows[-1]["memo"] == "top-up"
    assert recovery.check() == []


@pytest.mark.parametrize("amount", ["-5", "0", "NaN", "ten", 1.25])
def test_bad_grants_move_nothing(db_url, amount):
    before = count_rows(db_url)
    with pytest.raises(InvalidAmount) as info:
        ledger.grant("a1", amount)
    assert info.value.field == "amount"
    assert count_rows(db_url) == before


@pytest.mark.parametrize("agent", ["", "system:mint", "a b", None, "../x"])
def test_bad_agent_ids(db_url, agent):
    with pytest.raises(InvalidInput) as info:
        ledger.grant(agent, "1")
    assert info.value.field == "agent_id"


def test_unknown_agent(db_url):
    with pytest.raises(UnknownAgent) as info:
        ledger.balance("nobody")
    assert "forge ledger grant nobody" in info.value.fix


# --- reserve --------------------------------------------------------------------------------------

def test_reserve_debits_before_launch_in_one_transaction(db_url):
    ledger.grant("a1", "10")
    alloc = reserve(device="h200", devices=1)
    assert alloc["existing"] is False and alloc["status"] == "reserved"
    assert alloc["debited"] == Decimal("1.00") == alloc["estimated_cost"]
    assert alloc["debited_at"] is not None and alloc["device"] == "h200"
    assert alloc["wall_time_cap_min"] == 120 and alloc["vram_cap_gb"] == 24
    assert ledger.balance("a1") == Decimal("9.00")
    debit = ledger_rows(db_url)[-1]
    assert (debit["from_account"], debit["to_account"], debit["reason"]) == \
        ("a1", "system:compute", "compute_debit")
    assert debit["reference_type"] == "resource_allocation"
    assert debit["reference_id"] == alloc["id"] and debit["balance_after_from"] == Decimal("9")
    assert recovery.check() == []


def test_same_request_key_reserves_once(db_url):
    ledger.grant("a1", "10")
    first = reserve(key="same")
    again = reserve(key="same")
    assert again["existing"] is True and again["id"] == first["id"]
    assert ledger.balance("a1") == Decimal("9.00")
    assert count_rows(db_url)["resource_allocations"] == 1
    assert recovery.check() == []


def test_insufficient_balance_leaves_no_trace(db_url):
    ledger.grant("a1", "0.40")
    before = count_rows(db_url)
    with pytest.raises(BudgetExceeded) as info:
        reserve()
    assert "0.40" in str(info.value) and "1.00" in str(info.value)
    assert count_rows(db_url) == before and ledger.balance("a1") == Decimal("0.40")


def test_unknown_agent_cannot_reserve(db_url):
    with pytest.raises(UnknownAgent):
        reserve(agent="ghost")
    assert count_rows(db_url)["resource_allocations"] == 0


@pytest.mark.parametrize("kw", [dict(amount="-1"), dict(amount="NaN"), dict(key=""),
                                dict(wall_time_cap_min=0), dict(vram_cap_gb=-3),
                                dict(devices=1.5), dict(price_per_hour="-0.5")])
def test_malformed_reservations_move_nothing(db_url, kw):
    ledger.grant("a1", "10")
    before = count_rows(db_url)
    caps = {**CAPS, **{k: v for k, v in kw.items() if k not in ("amount", "key")}}
    with pytest.raises(InvalidInput):
        ledger.reserve("a1", Decimal(kw.get("amount", "1.00")), kw.get("key", "k1"), **caps)
    assert count_rows(db_url) == before


# --- settle / cancel ------------------------------------------------------------------------------

def test_settle_charges_actual_use_and_refunds_the_rest_once(db_url):
    ledger.grant("a1", "10")
    alloc = reserve()
    running = ledger.mark_running(alloc["id"], "run-1")
    assert running["status"] == "running" and running["mlflow_run_id"] == "run-1"
    done = ledger.settle(alloc["id"], 1800, artifact_id="model-v2")
    assert done["already_settled"] is False and done["status"] == "settled"
    assert done["actual_cost"] == Decimal("0.25") and done["refunded"] == Decimal("0.75")
    assert done["artifact_id"] == "model-v2" and done["settled_at"] is not None
    assert ledger.balance("a1") == Decimal("9.75")
    again = ledger.settle(alloc["id"], 60)
    assert again["already_settled"] is True and again["actual_cost"] == Decimal("0.25")
    assert ledger.cancel(alloc["id"])["already_settled"] is True
    assert ledger.balance("a1") == Decimal("9.75")
    refunds = [r for r in ledger_rows(db_url) if r["reason"] == "compute_refund"]
    assert len(refunds) == 1 and refunds[0]["amount"] == Decimal("0.75")
    assert recovery.check() == []


def test_settle_is_capped_at_the_debit_and_failed_runs_pay_for_their_time(db_url):
    ledger.grant("a1", "10")
    over = reserve(key="over")
    assert ledger.settle(over["id"], 99999)["actual_cost"] == Decimal("1.00")
    failed = ledger.settle(reserve(key="failed")["id"], 360, status="failed", reason="oom")
    assert failed["status"] == "failed" and failed["failure_reason"] == "oom"
    assert failed["actual_cost"] == Decimal("0.05") and failed["refunded"] == Decimal("0.95")
    assert ledger.balance("a1") == Decimal("8.95")
    assert recovery.check() == []


@pytest.mark.parametrize("seconds,status", [(-1, "settled"), (float("nan"), "settled"),
                                            ("abc", "settled"), (10, "done")])
def test_bad_settlements_move_nothing(db_url, seconds, status):
    ledger.grant("a1", "10")
    alloc = reserve()
    before = count_rows(db_url)
    with pytest.raises(InvalidInput):
        ledger.settle(alloc["id"], seconds, status=status)
    assert count_rows(db_url) == before
    assert ledger.get_allocation(alloc["id"])["status"] == "reserved"


def test_cancel_refunds_everything(db_url):
    ledger.grant("a1", "10")
    alloc = reserve()
    cancelled = ledger.cancel(alloc["id"], reason="launch failed")
    assert cancelled["status"] == "cancelled" and cancelled["refunded"] == Decimal("1.00")
    assert ledger.balance("a1") == Decimal("10.00")
    assert ledger.settle(alloc["id"], 10)["already_settled"] is True
    assert ledger.balance("a1") == Decimal("10.00")
    assert recovery.check() == []


def test_settle_joins_the_callers_transaction(db_url):
    ledger.grant("a1", "10")
    alloc = reserve()
    engine = db.get_engine(db_url)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        ledger.settle(alloc["id"], 1800, conn=conn)
        raise RuntimeError("registration failed")  # rolls the settlement back with it
    assert ledger.get_allocation(alloc["id"])["status"] == "reserved"
    assert ledger.balance("a1") == Decimal("9.00")
    with engine.begin() as conn:
        ledger.settle(alloc["id"], 1800, conn=conn)
    assert ledger.balance("a1") == Decimal("9.75") and recovery.check() == []


def test_reserve_joins_the_callers_transaction(db_url):
    ledger.grant("a1", "10")
    engine = db.get_engine(db_url)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        assert reserve(conn=conn)["existing"] is False
        raise RuntimeError("launch setup failed")
    assert ledger.balance("a1") == Decimal("10") and count_rows(db_url)["resource_allocations"] == 0
    with engine.begin() as conn:
        first = reserve(conn=conn)
        assert reserve(conn=conn)["id"] == first["id"]
    assert ledger.balance("a1") == Decimal("9.00") and recovery.check() == []


def test_mark_running_twice_is_idempotent_but_not_after_settle(db_url):
    ledger.grant("a1", "10")
    alloc = reserve()
    ledger.mark_running(alloc["id"], "r1")
    assert ledger.mark_running(alloc["id"], "r1")["status"] == "running"
    ledger.settle(alloc["id"], 1)
    with pytest.raises(LedgerError):
        ledger.mark_running(alloc["id"], "r1")


# --- the invariant --------------------------------------------------------------------------------

def test_check_finds_tampering_and_the_cli_exits_non_zero(db_url):
    ledger.grant("a1", "10")
    alloc = reserve()
    ledger.settle(alloc["id"], 600)
    assert recovery.check() == []
    assert CliRunner().invoke(forge, ["ledger", "check"]).exit_code == 0
    with db.get_engine(db_url).begin() as conn:
        conn.execute(token_accounts.update().values(balance=Decimal("100")))
        conn.execute(resource_allocations.update().values(refunded=Decimal("0.5")))
    problems = recovery.check()
    assert any("a1" in p and "balance" in p for p in problems)
    assert any(alloc["id"] in p for p in problems)
    result = CliRunner().invoke(forge, ["ledger", "check"])
    assert result.exit_code == 1


def test_cli_grant_balance(db_url):
    runner = CliRunner()
    result = runner.invoke(forge, ["ledger", "grant", "a1", "2.5"])
    assert result.exit_code == 0 and "2.50" in result.output
    result = runner.invoke(forge, ["ledger", "balance", "a1"])
    assert result.exit_code == 0 and result.output.splitlines()[0] == "2.50"
    assert json.loads(runner.invoke(forge, ["ledger", "balance", "a1", "--json"]).output
                      )["balance"] == "2.500000"
    for bad in (["grant", "a1", "-5"], ["grant", "a1", "NaN"], ["grant", "a1", "x"],
                ["balance", "ghost"]):
        result = runner.invoke(forge, ["ledger", *bad])
        assert result.exit_code == 2 and result.output.startswith("error: "), bad
    assert ledger.balance("a1") == Decimal("2.50")


# --- concurrency: processes, not threads ----------------------------------------------------------

WORKER = """
import os, sys, time
from decimal import Decimal
from pathlib import Path
from runner.registry import ledger
from runner.errors import BudgetExceeded
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
try:
    alloc = ledger.reserve("a1", Decimal("1.00"), sys.argv[1], wall_time_cap_min=120,
                           vram_cap_gb=24, price_per_hour=Decimal("0.50"))
    print("existing" if alloc["existing"] else "reserved")
except BudgetExceeded:
    print("refused")
"""


def _race(db_url, tmp_path, keys: list[str]) -> list[str]:
    return race(WORKER, [[key] for key in keys], {**os.environ, "FORGE_DB_URL": db_url},
                tmp_path / "go")


def test_16_concurrent_reservations_against_a_balance_for_10(db_url, tmp_path):
    ledger.grant("a1", "10.00")
    outs = _race(db_url, tmp_path, [f"key-{i}" for i in range(16)])
    assert sorted(outs).count("reserved") == 10 and outs.count("refused") == 6
    assert ledger.balance("a1") == Decimal("0")
    with db.get_engine(db_url).connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(resource_allocations)
                         .where(resource_allocations.c.status == "reserved")).scalar_one()
    assert n == 10
    assert recovery.check() == []


def test_concurrent_retries_of_one_request_debit_once(db_url, tmp_path):
    ledger.grant("a1", "10.00")
    outs = _race(db_url, tmp_path, ["one-key"] * 8)
    assert outs.count("reserved") == 1 and outs.count("existing") == 7
    assert ledger.balance("a1") == Decimal("9.00")
    assert count_rows(db_url)["resource_allocations"] == 1
    assert recovery.check() == []
