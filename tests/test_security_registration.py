"""Registration outages (issue 24, hole 8): a finished job whose registration meets a locked
registry is kept as a settle-and-register intent; the host retries it while it lives, and the
reaper completes it once the registry answers: the version is registered, the seconds the job
ran are charged, and a retry of the same request returns that version (never `conflict`).

Real locks on the real registry: SQLite, an exclusive transaction from another connection;
PostgreSQL, the `artifacts` table locked from another session. FORGE_DB_LOCK_TIMEOUT_S (the
operator's) is short here, so a lock held for seconds is an outage.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    STAND_IN_TRAINER,
    fake_code_repo,
    forget_engine,
    operator_conf,
)

from runner.cli import main as forge
from runner.errors import RegistrationFailed
from runner.jobs import hook
from runner.registry import catalog, ledger, recovery

# Pretraining: its metric (masked MSE) is the job's own, so a stand-in trainer stays a blink.
TINY = ["training=pretrain_mgm", "training.max_epochs=1", "training.batch_size=32",
        "training.max_seq_len=33",
        "training.limit_train_batches=4", "training.limit_eval_batches=2"]
TRAINER = STAND_IN_TRAINER.replace("METRICS", '{"test_mse": 0.5, "test_loss": 0.5}')
LOCK_TIMEOUT_S = 2


def train():
    from runner.api import train_model_version

    return train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                               vram_cap_gb=1, overrides=TINY)


class RegistryLock:
    """Another session's lock on the registry, taken (by a thread of its own) when the first
    registration starts, and released `hold_s` later."""

    def __init__(self, url: str, hold_s: float):
        self.url, self.hold_s = url, hold_s
        self.released_at: float | None = None
        self.taken = False
        self.done = threading.Event()

    def take(self) -> None:
        self.taken = True
        held = threading.Event()
        threading.Thread(target=self._hold, args=(held,), daemon=True).start()
        assert held.wait(30), "could not lock the registry"

    def _hold(self, held: threading.Event) -> None:
        if self.url.startswith("sqlite"):
            conn = sqlite3.connect(sa.engine.make_url(self.url).database, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            held.set()
            time.sleep(self.hold_s)
            conn.execute("ROLLBACK")
            conn.close()
        else:
            engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                conn.exec_driver_sql("LOCK TABLE artifacts IN ACCESS EXCLUSIVE MODE")
                held.set()
                time.sleep(self.hold_s)
                conn.rollback()
        self.released_at = time.monotonic()
        self.done.set()

    def at_registration(self, monkeypatch) -> None:
        real = hook.register_model_version

        def locked_first(*a, **kw):
            if not self.taken:
                self.take()
            return real(*a, **kw)

        monkeypatch.setattr(hook, "register_model_version", locked_first)


@pytest.fixture
def locked_registry(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, TRAINER)))
    monkeypatch.setenv("FORGE_DB_LOCK_TIMEOUT_S", str(LOCK_TIMEOUT_S))
    forget_engine(registry)  # its engine was made with the default timeout
    return registry


def _intent(allocation_id: str) -> Path:
    from runner.jobs import intents  # (new with this fix: the old code fails before it)

    return intents.path_for(allocation_id)


def _charged(alloc: dict) -> None:
    assert alloc["actual_seconds"] > 0 and alloc["actual_cost"] > 0
    assert alloc["actual_cost"] + alloc["refunded"] == alloc["debited"]


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_a_registry_locked_at_registration_registers_once_the_lock_goes(locked_registry,
                                                                       monkeypatch):
    """Locked for longer than a statement waits: the host keeps the job and retries, and the
    call returns the version within a minute of the lock's release."""
    lock = RegistryLock(locked_registry, hold_s=3 * LOCK_TIMEOUT_S)
    lock.at_registration(monkeypatch)
    result = train()
    assert lock.released_at is not None and time.monotonic() - lock.released_at < 60
    alloc = ledger.get_allocation(result["gpu_allocation_id"])
    assert alloc["status"] == "settled" and alloc["artifact_id"] == result["artifact_id"]
    _charged(alloc)
    assert catalog.get_model_version(result["artifact_id"])["lifecycle_state"] == "candidate"
    assert not _intent(alloc["id"]).exists()

    again = train()  # the same request: its version, no second debit
    assert again["artifact_id"] == result["artifact_id"]
    assert again["gpu_allocation_id"] == alloc["id"]
    assert len(ledger.list_allocations(agent_id=AGENT)) == 1
    assert recovery.check() == []


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_a_registration_pending_past_the_hosts_retries_is_completed_by_the_reaper(
        locked_registry, tmp_path, monkeypatch):
    """Locked past the host's retry budget: the caller gets registration_pending (typed, with
    its fix), a retry meanwhile gets the same (never conflict), and `forge ledger reap` after
    the release registers the version and charges the seconds; a retry returns it."""
    operator_conf(tmp_path, monkeypatch, "registry:\n  registration_retry_s: 1\n")
    lock = RegistryLock(locked_registry, hold_s=4 * LOCK_TIMEOUT_S)
    lock.at_registration(monkeypatch)
    with pytest.raises(RegistrationFailed) as err:
        train()
    assert err.value.reason == "registration_pending", err.value.to_dict()
    assert "same request" in err.value.fix
    assert lock.done.wait(60)

    [alloc] = ledger.list_allocations(agent_id=AGENT)
    assert alloc["status"] == "running" and _intent(alloc["id"]).is_file()
    done = CliRunner().invoke(forge, ["ledger", "reap"])
    assert done.exit_code == 0, done.output
    assert time.monotonic() - lock.released_at < 60
    alloc = ledger.get_allocation(alloc["id"])
    assert alloc["status"] == "settled" and alloc["artifact_id"], alloc
    _charged(alloc)
    assert not _intent(alloc["id"]).exists()

    again = train()
    assert again["artifact_id"] == alloc["artifact_id"]
    assert again["gpu_allocation_id"] == alloc["id"]
    assert len(ledger.list_allocations(agent_id=AGENT)) == 1
    assert recovery.check() == []


@pytest.mark.sandbox
@pytest.mark.train
def test_an_intent_whose_weights_changed_settles_failed_charging_what_ran(locked_registry,
                                                                          tmp_path, monkeypatch):
    """The outputs are re-validated before the late registration: weights that no longer hash
    to what the host measured are not registered; the allocation settles failed, charged."""
    operator_conf(tmp_path, monkeypatch, "registry:\n  registration_retry_s: 1\n")
    lock = RegistryLock(locked_registry, hold_s=4 * LOCK_TIMEOUT_S)
    lock.at_registration(monkeypatch)
    with pytest.raises(RegistrationFailed):
        train()
    assert lock.done.wait(60)
    [alloc] = ledger.list_allocations(agent_id=AGENT)
    from runner.jobs import weights

    [artifact] = [p.name for p in (weights.weights_dir("x").parent.parent).iterdir()
                  if p.name != BASE_ID]
    stored = weights.weights_dir(artifact) / "best_model.pt"
    Path(stored).write_bytes(b"tampered")
    from runner.jobs import intents

    [outcome] = intents.complete_pending()
    assert outcome["status"] == "failed" and outcome["error"].reason == "weights_integrity"
    alloc = ledger.get_allocation(alloc["id"])
    assert alloc["status"] == "failed" and "weights_integrity" in alloc["failure_reason"]
    _charged(alloc)
    assert [m["id"] for m in catalog.list_artifacts("model")] == [BASE_ID]
    assert not weights.weights_dir(artifact).exists()
    assert recovery.check() == []
