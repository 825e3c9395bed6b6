"""Stores under concurrency (issue 24, hole 6): on a fresh FORGE_HOME, the first jobs create
the registry and the MLflow tracking store at the same time. Each store is created and
migrated once, under a lock, before a job uses it; a store left half-migrated is reported
as what it is (`store_half_migrated`, with its fix), never as the registry being away.

Real processes, a real SQLite registry and a real MLflow SQLite store; no mocks.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    STAND_IN_TRAINER,
    drop_pg_database,
    fake_code_repo,
    make_pg_database,
)

from runner.errors import ForgeError
from runner.registry import ledger

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 8

# The first use a submit makes of each store: the registry migrated (as `forge db upgrade` and
# the demo do), the MLflow store opened through the host's client, an experiment and a run.
# Every process waits for the same go-file, so their first uses collide.
FIRST_USE = """
import json, os, sys, time
from pathlib import Path
from runner.config.compose import compose_config, to_plain
from runner.jobs import tracking
from runner.registry import db

go = Path(sys.argv[1])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
db.upgrade()
track = to_plain(compose_config())["tracking"]
client = tracking.client(track["tracking_uri"])
exp_id, run_id = tracking.open_run(
    client, experiment=track["experiment_name"], artifact_root=Path(track["artifact_root"]),
    run_name=f"first-use-{os.getpid()}", tags={"forge.test": "stores"}, params={"a": "1"},
    config_yaml="a: 1\\n")
tracking.finish(client, run_id, ok=True, reason="ok")
print(json.dumps({"run_id": run_id}))
"""


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORGE_DB_URL", "FORGE_CONFIG_DIR")}  # the embedded defaults
    env.update(FORGE_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    return env


@pytest.mark.slow
def test_eight_first_uses_at_once_on_a_fresh_home_all_succeed(tmp_path):
    home = tmp_path / "home"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(go)], cwd=REPO,
                              env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(PROCESSES)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready-*"))) < PROCESSES and time.monotonic() < deadline:
        time.sleep(0.1)  # every process has imported what it needs and waits for the go-file
    go.touch()
    outcomes = [p.communicate(timeout=300) for p in procs]
    failed = [(p.returncode, err.strip().splitlines()[-4:])  # the error, not only its link
              for p, (_, err) in zip(procs, outcomes) if p.returncode != 0]
    assert not failed, f"{len(failed)} of {PROCESSES} first uses failed: {failed}"
    run_ids = {json.loads(out.strip().splitlines()[-1])["run_id"] for out, _ in outcomes}
    assert len(run_ids) == PROCESSES

    from runner.jobs import tracking

    # The store is whole: at MLflow's head revision, and it holds every run.
    client = tracking.client(f"sqlite:///{home / 'mlflow.db'}")
    found = {r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert run_ids <= found
    from runner.registry import db

    assert db.current_revision(f"sqlite:///{home / 'forge.db'}") is not None


UPGRADE = """
import sys, time
from pathlib import Path
from runner.registry import db

go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
print(db.upgrade(sys.argv[1]))
"""


@pytest.mark.postgres
def test_eight_registry_upgrades_at_once_on_a_fresh_postgresql_database_all_succeed(
        registry_template, tmp_path):
    registry_template("postgresql")  # skips without PostgreSQL
    url = make_pg_database(prefix="forge_fresh")
    go = tmp_path / "go"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", UPGRADE, url, str(go)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(PROCESSES)]
        time.sleep(4)
        go.touch()
        outcomes = [p.communicate(timeout=300) for p in procs]
    finally:
        drop_pg_database(url)
    failed = [err.strip().splitlines()[-3:] for p, (_, err) in zip(procs, outcomes)
              if p.returncode != 0]
    assert not failed, f"{len(failed)} of {PROCESSES} upgrades failed: {failed}"
    assert len({out.strip() for out, _ in outcomes}) == 1


def test_a_first_connection_waits_for_a_writer_instead_of_failing_at_once(tmp_path):
    """The registry switches a SQLite file to WAL on its first connection. While another
    process holds the file's write lock, SQLite refuses that switch at once with "database is
    locked", without waiting out its busy timeout: two processes switching a new file at the
    same instant meet this, and one of eight first uses failed so in CI. The switch waits for
    the writer instead, as every other statement does (failed on the old code at once)."""
    import threading

    from runner.registry import db

    path = tmp_path / "forge.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x INTEGER)")  # a file still in rollback-journal mode
    writer.execute("BEGIN IMMEDIATE")  # the write lock, held by another writer for 0.5 s
    writer.execute("INSERT INTO t VALUES (1)")
    done = threading.Timer(0.5, writer.execute, ("COMMIT",))
    done.start()
    try:
        with db.get_engine(f"sqlite:///{path}").connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("SELECT x FROM t").scalars().all() == [1]
    finally:
        done.join()
        writer.close()


def test_a_registry_without_its_migration_record_is_reported_typed(sqlite_url):
    from runner.registry import db

    with db.get_engine(sqlite_url).begin() as conn:
        conn.exec_driver_sql("DELETE FROM alembic_version")
    with pytest.raises(ForgeError) as err:
        db.upgrade(sqlite_url)
    assert err.value.reason == "store_half_migrated", err.value.to_dict()
    assert "forge db upgrade" in err.value.fix


def _half_migrated_store(home: Path) -> Path:
    """A real MLflow store (made by another process) whose migration record is gone: the
    tables are there, the alembic_version row is not, as when a migration was interrupted."""
    home.mkdir(parents=True, exist_ok=True)
    store = home / "mlflow.db"
    opens = "import sys; from runner.jobs import tracking; tracking.client(sys.argv[1])"
    subprocess.run([sys.executable, "-c", opens, f"sqlite:///{store}"],
                   cwd=REPO, env=_env(home), check=True, capture_output=True)
    with sqlite3.connect(store) as conn:
        conn.execute("DELETE FROM alembic_version")
    return store


PREPARES = """
import json, sys
from runner.jobs import tracking
tracking.prepare_store(sys.argv[1])
print(json.dumps("mlflow" in sys.modules))
"""


def test_a_store_opened_whole_once_is_ready_without_importing_mlflow(tmp_path):
    """A submit checks the MLflow store before its debit. Once a process of this host has
    opened the store whole, later ones find it ready without importing mlflow (~1.5 s), as
    long as the MLflow installed and the store's migration record are those of that open."""
    home = tmp_path / "home"
    store = home / "mlflow.db"

    def prepare() -> bool:  # whether the process imported mlflow
        done = subprocess.run([sys.executable, "-c", PREPARES, f"sqlite:///{store}"], cwd=REPO,
                              env=_env(home), check=True, capture_output=True, text=True)
        return json.loads(done.stdout.splitlines()[-1])

    assert prepare() is True  # a new store: created and migrated by MLflow, under the lock
    assert prepare() is False  # opened whole before: ready as it is
    (note,) = (home / "locks").glob("mlflow-*.opened")
    seen = json.loads(note.read_text())
    note.write_text(json.dumps({**seen, "mlflow": "0.0.1"}))  # opened by another MLflow
    assert prepare() is True and json.loads(note.read_text()) == seen
    with sqlite3.connect(store) as conn:  # a migration record the open did not see
        conn.execute("UPDATE alembic_version SET version_num = 'elsewhere'")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        prepare()
    assert "store_half_migrated" in failed.value.stderr or "StoreHalfMigrated" in \
        failed.value.stderr, failed.value.stderr[-2000:]


def test_a_half_migrated_tracking_store_is_reported_typed_with_its_fix(tmp_path):
    from runner.jobs import tracking

    store = _half_migrated_store(tmp_path / "home")
    with pytest.raises(ForgeError) as err:
        tracking.client(f"sqlite:///{store}")
    assert err.value.reason == "store_half_migrated", err.value.to_dict()
    assert str(store) in err.value.message
    assert "mlflow db upgrade" in err.value.fix and "move" in err.value.fix


def test_a_half_migrated_store_fails_the_call_typed_before_any_debit(sqlite_registry, tmp_path,
                                                                       monkeypatch):
    """A training on a half-migrated MLflow store is refused as what it is, before the debit:
    not `registry_unavailable`, and the agent keeps its credits."""
    from runner.api import train_model_version

    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN_TRAINER.replace(
        "METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.6}'))))
    _half_migrated_store(Path(os.environ["FORGE_HOME"]))
    with pytest.raises(ForgeError) as err:
        train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                            vram_cap_gb=1, overrides=["training.max_epochs=1"])
    assert err.value.reason == "store_half_migrated", err.value.to_dict()
    assert ledger.balance(AGENT) == Decimal(10)
    assert ledger.list_allocations(agent_id=AGENT) == []


# Eight agents submit a real job each at once, on a registry whose MLflow store does not exist
# yet: the store is made once, under the lock, and every job runs to its candidate.
SUBMIT = """
import json, sys, time
from pathlib import Path
from runner.api import submit_training

agent, go = sys.argv[1], Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
job = submit_training("%s", "%s", {"seed": 0}, agent, wall_time_cap_min=5, vram_cap_gb=1)
print(json.dumps({"job_id": job["job_id"]}))
""" % (BASE_ID, DATASET_ID)  # noqa: UP031 - the braces in it are Python's


@pytest.mark.slow
@pytest.mark.sandbox
def test_eight_concurrent_submits_on_a_fresh_home_all_succeed(sqlite_registry, tmp_path,
                                                              monkeypatch):
    from helpers import operator_conf, race

    from runner.api import job_status

    home = Path(os.environ["FORGE_HOME"])
    (home / "mlflow.db").unlink()  # the session's seeded store (conftest): the submits make it
    conf = operator_conf(tmp_path, monkeypatch, "policy:\n  max_jobs_per_host: 8\n"
                         "sandbox:\n  max_memory_gb: 1\n")
    code = fake_code_repo(tmp_path, STAND_IN_TRAINER.replace(
        "METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.5}'))
    agents = [f"agent-{i}" for i in range(PROCESSES)]
    for agent in agents:
        ledger.grant(agent, "1")
    env = {**os.environ, "FORGE_CODE_REPO": str(code), "FORGE_CONFIG_DIR": str(conf)}
    outs = race(SUBMIT, [[agent] for agent in agents], env, tmp_path / "go")
    jobs = {agent: json.loads(out.splitlines()[-1])["job_id"] for agent, out in zip(agents, outs)}
    deadline = time.monotonic() + 600
    states = {}
    while time.monotonic() < deadline:
        states = {a: job_status(j, a)["status"] for a, j in jobs.items()}
        if all(s in ("succeeded", "failed", "cancelled") for s in states.values()):
            break
        time.sleep(2)
    failed = {a: job_status(j, a).get("error") for a, j in jobs.items()
              if states.get(a) != "succeeded"}
    assert not failed, failed
    assert ledger.balance(agents[0]) < Decimal("1")  # each paid for its own job
