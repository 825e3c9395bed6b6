"""Recovery (issue 12): no allocation stays open after its host dies, the database goes away
at registration, or the disk fills up.

Every allocation carries an expiry and a heartbeat; `recovery.reap` (also `forge ledger reap`,
and the start of every reserve) settles the dead ones as failed, exactly once, and `forge
ledger check` fails while one is overdue; the host's side (runner.jobs.recovery) then marks
the reaped MLflow runs FAILED and cleans their run folders. The end-to-end cases run the real
sandbox with stand-in trainers (see test_end_to_end.py), a real host process killed with
SIGKILL, a real PostgreSQL outage and a real, small tmpfs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    PG_URL,
    STAND_IN_TRAINER,
    count_rows,
    fake_code_repo,
    operator_conf,
)

from runner.cli import main as forge
from runner.errors import ForgeError, LedgerError, RegistrationFailed
from runner.jobs import recovery as host_recovery
from runner.registry import catalog, db, ledger, money, recovery, schema

REPO = Path(__file__).resolve().parents[1]
CAPS = dict(wall_time_cap_min=120, vram_cap_gb=24, price_per_hour=Decimal("0.50"))
# Pretraining: its metric (masked MSE) is the job's own, so the stand-in trainers below need
# no per-cell predictions (a fine-tune's test metrics are measured on the host: truth.py).
TINY = ["training=pretrain_mgm", "training.max_epochs=1", "training.batch_size=32",
        "training.max_seq_len=33",
        "training.limit_train_batches=4", "training.limit_eval_batches=2"]
TOMORROW = timedelta(days=1)
OK_METRICS = '{"test_mse": 0.5, "test_loss": 0.5}'
# A stand-in trainer that hangs when the host passes NCCL_DEBUG=forge-test-hang (a variable
# the sandbox lets through), and otherwise trains in a blink: the same code, so the same
# request key, for the attempt that dies and for its retry.
HANGING_TRAINER = """
    import os, time
    if os.environ.get("NCCL_DEBUG") == "forge-test-hang":
        print("hanging", flush=True)
        time.sleep(600)
""" + STAND_IN_TRAINER.replace("METRICS", OK_METRICS)


def later(delta: timedelta = TOMORROW) -> datetime:
    return datetime.now(UTC) + delta


def reserve(key="k1", agent="a1", amount="1.00", **kw):
    return ledger.reserve(agent, Decimal(amount), key, **{**CAPS, **kw})


def alloc_rows(url) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(schema.resource_allocations)
            .order_by(schema.resource_allocations.c.created_at)).mappings()]


def refund_rows(url, alloc_id) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(schema.token_ledger).where(
                schema.token_ledger.c.reference_id == alloc_id,
                schema.token_ledger.c.reason == "compute_refund")).mappings()]


def cli(*args):
    return CliRunner().invoke(forge, list(args))


def train(**kw):
    from runner.api import train_model_version

    args = dict(agent_id=AGENT, wall_time_cap_min=5, vram_cap_gb=1, overrides=TINY)
    return train_model_version(BASE_ID, DATASET_ID, **{**args, **kw})


def mlflow_run(run_id: str):
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking

    uri = to_plain(compose_config())["tracking"]["tracking_uri"]
    return tracking.client(uri).get_run(run_id)


# --- expiry, reap, check: the ledger --------------------------------------------------------------

def test_an_allocation_expires_after_cap_and_margin(db_url):
    ledger.grant("a1", "10")
    alloc = reserve(margin_s=600)  # the sandbox's grace period lies inside the cap
    expires = db.as_utc(alloc["expires_at"]) - db.as_utc(alloc["created_at"])
    assert expires == timedelta(minutes=120, seconds=600)
    assert alloc["host"] == f"{socket.gethostname()}:{os.getpid()}"
    assert alloc["heartbeat_at"] is not None
    running = ledger.mark_running(alloc["id"], None)  # the window restarts with the job
    assert db.as_utc(running["expires_at"]) - db.as_utc(running["started_at"]) == expires
    assert recovery.heartbeat(alloc["id"]) is True
    assert recovery.check() == [] and recovery.reap() == []


def test_reap_settles_an_expired_allocation_as_failed_once(db_url):
    ledger.grant("a1", "10")
    idle = reserve(key="never-started")
    busy = reserve(key="started")
    ledger.mark_running(busy["id"], None)
    with db.get_engine(db_url).begin() as conn:  # it beat for 30 min after it started
        started = ledger.get_allocation(busy["id"], conn=conn)["started_at"]
        conn.execute(schema.resource_allocations.update()
                     .where(schema.resource_allocations.c.id == busy["id"])
                     .values(heartbeat_at=started + timedelta(minutes=30)))
    assert recovery.check() == []
    problems = recovery.check(now=later())
    assert len(problems) == 2 and all("overdue" in p for p in problems)

    reaped = {a["id"]: a for a in recovery.reap(now=later())}
    assert set(reaped) == {idle["id"], busy["id"]}
    for alloc in reaped.values():
        assert alloc["status"] == "failed" and alloc["failure_reason"].startswith("reaped: ")
        assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    # Never started: nothing charged. Started: the time it is known to have run.
    assert reaped[idle["id"]]["actual_cost"] == Decimal("0")
    assert reaped[busy["id"]]["actual_cost"] == Decimal("0.25")  # 30 min at 0.50/h
    assert ledger.balance("a1") == Decimal("9.75")
    assert recovery.reap(now=later()) == []  # exactly once
    assert len(refund_rows(db_url, busy["id"])) == 1
    assert recovery.check(now=later()) == []


def test_a_retry_after_a_reaped_allocation_launches_anew(db_url):
    ledger.grant("a1", "10")
    first = reserve(key="same")
    ledger.mark_running(first["id"], None)
    assert reserve(key="same")["existing"] is True  # alive: the retry waits for it
    recovery.reap(now=later())
    again = reserve(key="same")
    assert again["existing"] is False and again["id"] != first["id"]
    assert ledger.get_allocation(first["id"])["status"] == "failed"
    assert ledger.balance("a1") == Decimal("9.00") and recovery.check() == []


def test_a_registration_after_the_reaper_closed_the_allocation_rolls_back(db_url):
    ledger.grant("a1", "10")
    alloc = reserve()
    recovery.reap(now=later())
    with pytest.raises(LedgerError) as err, db.get_engine(db_url).begin() as conn:
        ledger.settle(alloc["id"], 60, artifact_id="model-trained-for-free", conn=conn)
    assert err.value.reason == "allocation_closed"
    assert ledger.get_allocation(alloc["id"])["artifact_id"] is None
    assert recovery.check() == []


def test_cli_check_fails_while_an_allocation_is_overdue_and_reap_clears_it(db_url):
    ledger.grant("a1", "10")
    alloc = reserve()
    assert cli("ledger", "check").exit_code == 0
    with db.get_engine(db_url).begin() as conn:
        conn.execute(schema.resource_allocations.update()
                     .values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    result = cli("ledger", "check")
    assert result.exit_code == 1 and alloc["id"] in result.output and "overdue" in result.output
    result = cli("ledger", "reap")
    assert result.exit_code == 0 and "reaped 1 allocation" in result.output
    assert alloc["id"] in result.output
    assert cli("ledger", "check").exit_code == 0
    assert ledger.balance("a1") == Decimal("10.00")
    assert cli("ledger", "reap").output.splitlines()[0] == "reaped 0 allocations"


def test_the_host_fails_a_reaped_mlflow_run_and_cleans_its_run_folder(sqlite_url):
    """The registry's reaper only settles the books; runner.jobs.recovery.reap (what `forge
    ledger reap` and every launch run) then fails the job's MLflow run and empties its run
    folder, keeping job.log and manifest.json."""
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import job, tracking

    client = tracking.client(to_plain(compose_config())["tracking"]["tracking_uri"])
    run_id = client.create_run(client.create_experiment("reaped")).info.run_id
    ledger.grant("a1", "10")
    alloc = ledger.mark_running(reserve()["id"], run_id)
    folder = job.run_dir(alloc["id"])
    (folder / "out").mkdir(parents=True)
    for name in ("out/model.ckpt", "job.log", "manifest.json"):
        (folder / name).write_text(name)
    [reaped] = host_recovery.reap(now=later())
    assert reaped["id"] == alloc["id"] and reaped["status"] == "failed"
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["forge.outcome"] == "reaped"
    assert run.data.tags["forge.error"] == reaped["failure_reason"]
    assert sorted(p.name for p in folder.iterdir()) == ["job.log", "manifest.json"]
    assert host_recovery.reap(now=later()) == []  # nothing left: the run stays as it is


REAPER = """
import sys, time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from runner.registry import recovery
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
print(len(recovery.reap(now=datetime.now(timezone.utc) + timedelta(days=1))))
"""


def test_reapers_racing_settle_each_allocation_exactly_once(db_url, tmp_path):
    ledger.grant("a1", "10")
    allocs = [reserve(key=f"k{i}") for i in range(6)]
    for alloc in allocs[::2]:
        ledger.mark_running(alloc["id"], None)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", REAPER, str(go)],
                              env={**os.environ, "FORGE_DB_URL": db_url},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(1.0)
    go.touch()  # release them together
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        counts.append(int(out.strip().splitlines()[-1]))
    assert sum(counts) == len(allocs), counts
    for alloc in allocs:
        assert ledger.get_allocation(alloc["id"])["status"] == "failed"
        assert len(refund_rows(db_url, alloc["id"])) == 1
    assert ledger.balance("a1") == Decimal("10.00")
    assert recovery.check(now=later()) == []


def test_a_settlement_is_retried_while_the_database_is_away(db_url, monkeypatch):
    ledger.grant("a1", "10")
    alloc = reserve()
    real, calls = ledger._close, []

    def away_twice(*a, **kw):
        calls.append(1)
        if len(calls) <= 2:
            raise sa.exc.OperationalError("UPDATE resource_allocations", {},
                                          Exception("server closed the connection"))
        return real(*a, **kw)

    monkeypatch.setattr(ledger, "_close", away_twice)
    done = recovery.settle_retrying(alloc["id"], 0, reason="x", budget_s=10)
    assert done["status"] == "failed" and len(calls) == 3
    assert recovery.check() == []


@pytest.mark.sandbox
def test_a_launch_reaps_an_allocation_whose_host_process_died(registry, tmp_path,
                                                             monkeypatch):
    """A host that reserved and died: after 3 missed beats, the next launch settles it first
    (nobody has to run the reaper), then runs with its own debit."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(
        tmp_path, STAND_IN_TRAINER.replace("METRICS", OK_METRICS))))
    monkeypatch.setenv("FORGE_HEARTBEAT_S", "0.5")
    script = ("from decimal import Decimal; from runner.registry import ledger; "
              f"print(ledger.reserve({AGENT!r}, Decimal('1.00'), 'dead', wall_time_cap_min=120, "
              "vram_cap_gb=24, price_per_hour=Decimal('0.50'))['id'])")
    host = subprocess.run([sys.executable, "-c", script],
                          env={**os.environ, "FORGE_DB_URL": registry},
                          capture_output=True, text=True, check=True)
    dead_id = host.stdout.strip().splitlines()[-1]
    time.sleep(2.0)  # > 3 beats of 0.5 s
    result = train()
    dead = ledger.get_allocation(dead_id)
    assert dead["status"] == "failed" and "host process" in dead["failure_reason"]
    assert dead["refunded"] == dead["debited"]  # it never ran
    assert ledger.get_allocation(result["gpu_allocation_id"])["status"] == "settled"
    assert ledger.balance(AGENT) == Decimal("10") - money.to_amount(result["cost"]["actual"])
    assert recovery.check() == []


def test_migration_0002_gives_open_allocations_an_expiry(db_url):
    from alembic import command

    cfg = db.alembic_config(db_url)
    with db.get_engine(db_url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    with db.get_engine(db_url).begin() as conn:
        for key, status in (("open", "running"), ("closed", "settled")):
            conn.execute(sa.text(
                "INSERT INTO resource_allocations (id, agent_id, resource_type, devices, status,"
                " wall_time_cap_min, vram_cap_gb, price_per_hour, currency, estimated_cost,"
                " debited, request_key, created_at) VALUES (:id, 'a1', 'gpu', 1, :status, 60,"
                " 24, 0, 'credits', 0, 0, :id, :at)"), dict(id=key, status=status, at=stamp))
    assert db.upgrade(db_url) == "0009"
    rows = {a["id"]: a for a in alloc_rows(db_url)}
    assert {a["purpose"] for a in rows.values()} == {"training"}  # 0003's default
    assert db.as_utc(rows["open"]["expires_at"]) == stamp + timedelta(minutes=60, seconds=610)
    assert rows["closed"]["expires_at"] is None
    assert [a["id"] for a in recovery.overdue()] == ["open"]


# --- the host killed mid-run ---------------------------------------------------------------------

HOST = """
import json, sys
from runner.api import train_model_version
kw = json.loads(sys.argv[1])
train_model_version(kw.pop("parent"), kw.pop("dataset"), **kw)
"""


def _jail_processes(marker: str) -> list[int]:
    """Processes whose command line names `marker` (the test's own folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


HANGING_CALL = dict(parent=BASE_ID, dataset=DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                    vram_cap_gb=1, overrides=TINY)


def _hanging_host() -> subprocess.Popen:
    """A host process training HANGING_CALL with a trainer that hangs."""
    return subprocess.Popen([sys.executable, "-c", HOST, json.dumps(HANGING_CALL)], cwd=REPO,
                            env={**os.environ, "NCCL_DEBUG": "forge-test-hang"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _running(host: subprocess.Popen, url: str) -> tuple[dict, Path]:
    """The host's running allocation and its job log, once the trainer says it hangs."""
    alloc = _wait_for(lambda: next((a for a in alloc_rows(url) if a["status"] == "running"),
                                   None), 180, "the allocation to run")
    log = Path(os.environ["FORGE_HOME"]) / "runs" / alloc["id"] / "job.log"
    _wait_for(lambda: log.is_file() and "hanging" in log.read_text(), 120,
              "the trainer to start")
    return alloc, log


@pytest.mark.sandbox
def test_host_killed_mid_run_is_reaped_and_the_retry_launches_anew(registry, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, HANGING_TRAINER)))
    monkeypatch.setenv("FORGE_HEARTBEAT_S", "0.5")
    host = _hanging_host()
    try:
        alloc, log = _running(host, registry)
        beats = [ledger.get_allocation(alloc["id"])]  # the host beats while the job runs
        time.sleep(1.5)
        beats.append(ledger.get_allocation(alloc["id"]))
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    # bwrap --die-with-parent takes the jail down with its host.
    _wait_for(lambda: not _jail_processes(str(tmp_path)), 30, "the jail to die")
    assert ledger.get_allocation(alloc["id"])["status"] == "running"  # nobody settled it

    time.sleep(2.0)  # > 3 missed beats of 0.5 s
    result = cli("ledger", "check")
    assert result.exit_code == 1 and alloc["id"] in result.output, result.output
    assert beats[1].get("heartbeat_at") > beats[0].get("heartbeat_at")
    assert beats[1]["host"] == f"{socket.gethostname()}:{host.pid}"
    result = cli("ledger", "reap")
    assert result.exit_code == 0 and "reaped 1 allocation" in result.output, result.output

    reaped = ledger.get_allocation(alloc["id"])
    assert reaped["status"] == "failed" and "host process" in reaped["failure_reason"]
    assert reaped["debited"] == reaped["actual_cost"] + reaped["refunded"]
    assert Decimal(0) <= reaped["actual_cost"] < reaped["debited"]  # seconds, not the cap
    assert ledger.balance(AGENT) == Decimal("10") - reaped["actual_cost"]
    assert recovery.check() == [] and cli("ledger", "check").exit_code == 0
    run = mlflow_run(reaped["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["forge.outcome"] == "reaped"
    run_dir = log.parent
    assert sorted(p.name for p in run_dir.iterdir()) == ["job.log", "manifest.json"]

    result = train(**{k: v for k, v in HANGING_CALL.items() if k not in ("parent", "dataset")})
    assert result["gpu_allocation_id"] != alloc["id"]
    assert ledger.get_allocation(result["gpu_allocation_id"])["status"] == "settled"
    assert [a["status"] for a in alloc_rows(registry)] == ["failed", "settled"]
    assert recovery.check() == []


@pytest.mark.sandbox
def test_sigterm_to_the_host_cancels_the_job_settles_and_kills_the_run(sqlite_registry,
                                                                     tmp_path, monkeypatch):
    """What scancel does to a SLURM task (tests/test_slurm.py), without a scheduler: the
    host stops the sandbox, settles the allocation as cancelled (the seconds run charged,
    the rest refunded), marks the run KILLED and reports a typed error. Before, the host
    died with the signal and the credits waited for the reaper."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, HANGING_TRAINER)))
    host = _hanging_host()
    try:
        alloc, _log = _running(host, sqlite_registry)
        time.sleep(1.0)
        host.send_signal(signal.SIGTERM)
        out, _ = host.communicate(timeout=60)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    assert host.returncode == 1 and "JobCancelled" in out, out[-3000:]
    assert not _jail_processes(str(tmp_path))
    closed = ledger.get_allocation(alloc["id"])
    assert closed["status"] == "cancelled" and "SIGTERM" in closed["failure_reason"]
    assert Decimal(0) < closed["actual_cost"] < closed["debited"]
    assert closed["refunded"] == closed["debited"] - closed["actual_cost"]
    assert ledger.balance(AGENT) == Decimal("10") - closed["actual_cost"]
    run = mlflow_run(closed["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["forge.outcome"] == "cancelled"
    assert [m["id"] for m in catalog.list_artifacts("model")] == [BASE_ID]
    assert recovery.check() == []


# --- the database away at registration ----------------------------------------------------------

def _database_outage(url: str):
    """Cut every session of the test database and refuse new ones; returns `restore`."""
    name = sa.engine.make_url(url).database
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")

    def cut():
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")

    def restore():
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    return cut, restore


@pytest.mark.postgres
@pytest.mark.parametrize("outage_s", [3.0, None])
@pytest.mark.sandbox
def test_database_away_at_registration_keeps_the_job_and_registers_it_once_back(
        pg_registry, tmp_path, monkeypatch, outage_s):
    """The database goes away inside the registration transaction: none of it lands, and the
    finished job is kept as a settle-and-register intent (runner/jobs/intents.py). Back within
    the host's retry budget: the call returns the version, its seconds charged. Away for
    longer: the caller gets RegistrationFailed (registration_pending), the allocation stays
    open with its intent, and the reaper registers the version once the database is back."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(
        tmp_path, STAND_IN_TRAINER.replace("METRICS", OK_METRICS))))
    operator_conf(tmp_path, monkeypatch,
                  f"registry:\n  registration_retry_s: {15 if outage_s else 2}\n")
    cut, restore = _database_outage(pg_registry)
    real_links = catalog._write_links
    cuts = []

    def links_during_an_outage(*a, **kw):
        if not cuts:  # the first registration only: the retries find the database back
            cuts.append(cut())
            if outage_s:
                threading.Timer(outage_s, restore).start()
        return real_links(*a, **kw)  # on a connection the server just closed

    monkeypatch.setattr(catalog, "_write_links", links_during_an_outage)
    before = count_rows(pg_registry)
    try:
        if outage_s:
            result = train()
        else:
            with pytest.raises(RegistrationFailed) as err:
                train()
    finally:
        restore()
    [alloc] = alloc_rows(pg_registry)
    if outage_s:
        assert alloc["status"] == "settled" and alloc["artifact_id"] == result["artifact_id"]
    else:
        assert err.value.reason == "registration_pending"
        after = count_rows(pg_registry)
        changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        assert not any(changed.get(t) for t in ("artifacts", "model_versions", "artifact_links",
                                                 "world_model_improvements", "events"))
        assert alloc["status"] == "running"  # its intent settles it, never a whole refund
        assert recovery.check() == []  # not overdue yet: its host (this process) is alive
        assert host_recovery.reap(now=later()) == []  # the intent came first: registered
        alloc = ledger.get_allocation(alloc["id"])
        assert alloc["status"] == "settled" and alloc["artifact_id"]
    assert alloc["actual_cost"] > 0
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert recovery.check(now=later()) == []
    assert mlflow_run(alloc["mlflow_run_id"]).info.status == "FINISHED"


# --- a full disk ----------------------------------------------------------------------------------

@pytest.fixture
def small_home(tmp_path, monkeypatch):
    """FORGE_HOME on a real 64 MiB tmpfs (needs the right to mount; skipped without it)."""
    home = Path(os.environ["FORGE_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(home)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))  # the dataset stays off it
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_a_full_disk_is_refused_before_any_debit(registry, small_home, tmp_path, monkeypatch):
    """64 MiB free, below the default registry.min_free_gb (2 GiB): nothing is debited."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(
        tmp_path, STAND_IN_TRAINER.replace("METRICS", OK_METRICS))))
    dry = train(dry_run=True)
    assert dry["would_launch"] is False
    assert [r["reason"] for r in dry["reasons"]] == ["disk_full"]
    before = count_rows(registry)
    with pytest.raises(ForgeError) as err:
        train()
    assert err.value.reason == "disk_full" and err.value.field == "registry.min_free_gb"
    after = count_rows(registry)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"tool_calls": 1}
    assert ledger.balance(AGENT) == Decimal("10")


def test_a_min_free_space_above_what_is_free_is_refused(registry, tmp_path, monkeypatch):
    """The same rule on any disk: the operator (conf/registry, or FORGE_MIN_FREE_GB in the
    environment) asks for more free space than there is."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(
        tmp_path, STAND_IN_TRAINER.replace("METRICS", OK_METRICS))))
    monkeypatch.setenv("FORGE_MIN_FREE_GB", str(10**9))
    assert [r["reason"] for r in train(dry_run=True)["reasons"]] == ["disk_full"]
    before = count_rows(registry)
    with pytest.raises(ForgeError) as err:
        train()
    assert err.value.reason == "disk_full"
    after = count_rows(registry)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"tool_calls": 1}


FILL_THE_DISK = """
    import json, sys
    out = json.load(open(sys.argv[1]))["output_dir"]
    print("filling the disk", flush=True)
    with open(out + "/ballast", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
"""


@pytest.mark.sandbox
def test_a_disk_that_fills_mid_run_fails_typed_settles_and_frees_the_space(
        registry, small_home, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, FILL_THE_DISK)))
    monkeypatch.setenv("FORGE_MIN_FREE_GB", "0.02")
    with pytest.raises(ForgeError) as err:
        train()
    # The jail's write fails first; then the host's own write (the job log into the run's
    # artifacts) hits ENOSPC and becomes the typed error.
    assert err.value.reason == "disk_full", err.value.to_dict()
    [alloc] = alloc_rows(registry)
    assert alloc["status"] == "failed"
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert recovery.check() == []
    run_dir = small_home / "runs" / alloc["id"]
    assert not (run_dir / "out").exists() and (run_dir / "job.log").is_file()
    assert os.statvfs(small_home).f_bavail * os.statvfs(small_home).f_frsize > 32 * 1024**2
    assert mlflow_run(alloc["mlflow_run_id"]).info.status == "FAILED"  # space back first


# --- run folders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer", ["ok", "crash"])
@pytest.mark.sandbox
def test_run_folders_keep_only_the_log_and_manifest(sqlite_registry, tmp_path, monkeypatch,
                                                    trainer):
    body = (STAND_IN_TRAINER.replace("METRICS", OK_METRICS) if trainer == "ok"
            else "raise SystemExit('trainer blew up')")
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    if trainer == "ok":
        train()
    else:
        with pytest.raises(ForgeError):
            train()
    [alloc] = alloc_rows(sqlite_registry)
    run_dir = Path(os.environ["FORGE_HOME"]) / "runs" / alloc["id"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["job.log", "manifest.json"]
    assert recovery.check() == []
