"""Capacity: the operator's limits on jobs at once (conf/train.yaml `policy:`), per agent, per
host and on the sum of their memory caps per host (issue 24, hole 5: one agent with 0.26
credits ran 6 jails at once, 144 GiB of memory caps on a 24 GiB host).

A job counts from its debit to its settlement (its allocation reserved = queued, or
running). A request over a limit is refused as `capacity`, naming the limit, before any
debit; `ledger.reserve` checks the limits in the transaction that debits, so that concurrent
reservers cannot all slip under them (processes racing on SQLite and on PostgreSQL).
"""

from __future__ import annotations

import os
import time
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    SLEEPING_TRAINER,
    count_rows,
    fake_code_repo,
    operator_conf,
    race,
)

from runner.api import cancel_job, job_log, job_status, submit_training, train_model_version
from runner.errors import ForgeError
from runner.jobs import background
from runner.registry import db, ledger, recovery
from runner.registry.schema import resource_allocations


def submit(seed: int) -> dict:
    return submit_training(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                           vram_cap_gb=1, overrides=[f"training.seed={seed}"])


def live_jobs() -> set[str]:
    """Jobs of this test (its FORGE_HOME) whose submitit controller is alive now."""
    root = str(background.jobs_dir()) + "/"
    live = set()
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        live.update(a[len(root):].split("/")[0] for a in argv if a.startswith(root))
    return live


def wait_working(job_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while "working" not in "\n".join(job_log(job_id, AGENT)["lines"]):
        assert time.monotonic() < deadline, job_status(job_id, AGENT)
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.sandbox
def test_seven_submits_from_one_agent_run_at_most_the_limit(sqlite_registry, tmp_path,
                                                            monkeypatch):
    """The default limit is 2 jobs per agent: of 7 submits, 2 run, 5 are refused typed and
    debit nothing; a blocking call and a dry run say so too; a cancelled job frees its slot."""
    operator_conf(tmp_path, monkeypatch, "sandbox:\n  max_memory_gb: 1\n")  # memory is not it
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPING_TRAINER)))
    accepted, refused = [], []
    for seed in range(7):
        try:
            accepted.append(submit(seed))
        except ForgeError as exc:
            refused.append(exc)
    assert len(accepted) == 2 and len(refused) == 5, [e.to_dict() for e in refused]
    for exc in refused:
        assert exc.reason == "capacity" and exc.field == "policy.max_jobs_per_agent", exc
        assert exc.details["limit"] == 2 and "cancel" in exc.fix
    debited = sum(ledger.get_allocation(j["job_id"])["debited"] for j in accepted)
    assert debited > 0 and ledger.balance(AGENT) == Decimal(10) - debited
    assert count_rows(sqlite_registry)["resource_allocations"] == 2  # refused: no row

    for job in accepted:
        wait_working(job["job_id"])
    assert live_jobs() == {j["job_id"] for j in accepted}  # both run, at once, and no more

    rows = count_rows(sqlite_registry)
    with pytest.raises(ForgeError) as blocking:  # the blocking call: refused at once
        train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                            vram_cap_gb=1, overrides=["training.seed=7"])
    assert blocking.value.reason == "capacity", blocking.value
    dry = train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                              vram_cap_gb=1, overrides=["training.seed=7"], dry_run=True)
    assert dry["would_launch"] is False
    assert [r["field"] for r in dry["reasons"] if r["reason"] == "capacity"] == \
        ["policy.max_jobs_per_agent"]
    after = count_rows(sqlite_registry)
    assert after["resource_allocations"] == rows["resource_allocations"]
    assert ledger.balance(AGENT) == Decimal(10) - debited

    assert cancel_job(accepted[0]["job_id"], AGENT)["status"] == "cancelled"
    third = submit(8)  # the slot it held is free again
    assert third["existing"] is False
    wait_working(third["job_id"])
    deadline = time.monotonic() + 30  # the cancelled job's controller exits after settling
    while not live_jobs() <= {accepted[1]["job_id"], third["job_id"]}:
        assert time.monotonic() < deadline, live_jobs()
        time.sleep(0.3)
    for job in (accepted[1], third):
        assert cancel_job(job["job_id"], AGENT)["status"] == "cancelled"
    assert recovery.check() == []


@pytest.mark.slow
@pytest.mark.sandbox
def test_the_local_engine_runs_at_most_the_hosts_job_slots(sqlite_registry, tmp_path,
                                                           monkeypatch):
    """Another agent's submit waits for no slot it cannot have: with one job slot on this
    host, B is refused while A's job runs, and gets the slot once A's job is cancelled."""
    operator_conf(tmp_path, monkeypatch, "policy:\n  max_jobs_per_host: 1\n"
                                         "sandbox:\n  max_memory_gb: 1\n")
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPING_TRAINER)))
    ledger.grant("agent-b", "10")
    first = submit(0)
    wait_working(first["job_id"])
    args = {"agent_id": "agent-b", "wall_time_cap_min": 5, "vram_cap_gb": 1}
    with pytest.raises(ForgeError) as full:
        submit_training(BASE_ID, DATASET_ID, **args)
    assert (full.value.reason, full.value.field) == ("capacity", "policy.max_jobs_per_host")
    assert ledger.balance("agent-b") == Decimal(10)
    assert live_jobs() == {first["job_id"]}
    assert cancel_job(first["job_id"], AGENT)["status"] == "cancelled"
    second = submit_training(BASE_ID, DATASET_ID, **args)
    assert cancel_job(second["job_id"], "agent-b")["status"] == "cancelled"
    assert recovery.check() == []


def test_the_host_limits_come_from_conf(sqlite_registry, tmp_path, monkeypatch):
    """Jobs per host and the sum of memory caps per host hold across agents; the dry run
    names the limit. (Reserved rows stand in for running jobs: the limits count both.)"""
    from runner.registry import capacity

    operator_conf(tmp_path, monkeypatch, "policy:\n  max_jobs_per_host: 3\n"
                                         "  max_host_memory_gb: 10\nsandbox:\n"
                                         "  max_memory_gb: 4\n")
    limits = capacity.limits({"policy": {"max_jobs_per_agent": 2, "max_jobs_per_host": 3,
                                         "max_host_memory_gb": 10},
                              "sandbox": {"max_memory_gb": 4}})
    for agent in ("b1", "b2", "b3", "b4"):
        ledger.grant(agent, "10")
    for agent in ("b1", "b2"):
        ledger.reserve(agent, Decimal("0.1"), f"{agent}-k", wall_time_cap_min=5,
                       vram_cap_gb=1, price_per_hour="1", limits=limits)
    with pytest.raises(ForgeError) as memory:  # 3 jobs, but 3 x 4 GiB > 10 GiB
        ledger.reserve("b3", Decimal(0), "b3-k", wall_time_cap_min=5, vram_cap_gb=1,
                       price_per_hour="1", limits=limits)
    assert (memory.value.reason, memory.value.field) == ("capacity",
                                                         "policy.max_host_memory_gb")
    dry = train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                              vram_cap_gb=1, dry_run=True)
    assert [r["field"] for r in dry["reasons"] if r["reason"] == "capacity"] == \
        ["policy.max_host_memory_gb"]
    small = capacity.limits({"policy": {"max_jobs_per_agent": 2, "max_jobs_per_host": 3,
                                        "max_host_memory_gb": 10},
                             "sandbox": {"max_memory_gb": 1}})
    ledger.reserve("b3", Decimal(0), "b3-k", wall_time_cap_min=5, vram_cap_gb=1,
                   price_per_hour="1", limits=small)  # 4 + 4 + 1 <= 10
    with pytest.raises(ForgeError) as host:
        ledger.reserve("b4", Decimal(0), "b4-k", wall_time_cap_min=5, vram_cap_gb=1,
                       price_per_hour="1", limits=small)
    assert (host.value.reason, host.value.field) == ("capacity", "policy.max_jobs_per_host")
    queued = capacity.limits({"policy": {"max_jobs_per_agent": 2, "max_jobs_per_host": 3,
                                         "max_host_memory_gb": 10},
                              "sandbox": {"max_memory_gb": 1}}, on_this_host=False)
    # a SLURM job runs elsewhere: only the agent's limit holds
    assert ledger.reserve("b4", Decimal(0), "b4-k", wall_time_cap_min=5, vram_cap_gb=1,
                          price_per_hour="1", limits=queued)["existing"] is False


# --- concurrency: processes, not threads ----------------------------------------------------------

WORKER = """
import sys, time
from decimal import Decimal
from pathlib import Path
from runner.errors import ForgeError
from runner.registry import capacity, ledger
agent, key, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
limits = capacity.Limits(jobs_per_agent=2, jobs_per_host=3, host_memory_gb=100.0,
                         memory_gb=1.0)
while not go.exists():
    time.sleep(0.01)
try:
    ledger.reserve(agent, Decimal("1.00"), key, wall_time_cap_min=5, vram_cap_gb=1,
                   price_per_hour=Decimal("0.50"), limits=limits)
    print("reserved")
except ForgeError as exc:
    print(exc.reason, exc.field)
"""


def _race(db_url, tmp_path, agents: list[str]) -> list[str]:
    return race(WORKER, [[agent, f"key-{i}"] for i, agent in enumerate(agents)],
                {**os.environ, "FORGE_DB_URL": db_url}, tmp_path / "go")


def _open(db_url) -> list[dict]:
    with db.get_engine(db_url).connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(resource_allocations).where(resource_allocations.c.status == "reserved"))
            .mappings()]


def test_concurrent_reservers_of_one_agent_stay_within_its_limit(db_url, tmp_path):
    ledger.grant("a1", "10.00")
    outs = _race(db_url, tmp_path, ["a1"] * 10)
    assert outs.count("reserved") == 2, outs
    assert outs.count("capacity policy.max_jobs_per_agent") == 8, outs
    assert len(_open(db_url)) == 2
    assert ledger.balance("a1") == Decimal("8.00")  # the refused debited nothing
    assert recovery.check() == []


def test_concurrent_reservers_of_many_agents_stay_within_the_host_limit(db_url, tmp_path):
    agents = [f"h{i}" for i in range(8)]
    for agent in agents:
        ledger.grant(agent, "1.00")
    outs = _race(db_url, tmp_path, agents)
    assert outs.count("reserved") == 3, outs
    assert outs.count("capacity policy.max_jobs_per_host") == 5, outs
    assert len(_open(db_url)) == 3
    assert sum(ledger.balance(a) for a in agents) == Decimal("5.00")
    assert recovery.check() == []
