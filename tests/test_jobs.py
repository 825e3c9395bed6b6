"""Asynchronous jobs (runner/api/jobs.py, runner/jobs/background.py): submit returns at
once with the debit made, the job runs through submitit's local executor in a process of its
own, and the registry answers for it. Real sandbox, real registry (SQLite and PostgreSQL),
real MLflow store; the training is the tiny real fine-tune, or a stand-in trainer for the
cancel paths.
"""

from __future__ import annotations

import os
import signal
import time
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import AGENT, BASE_ID, DATASET_ID, SLEEPING_TRAINER, TINY, fake_code_repo

from runner import tools
from runner.api import cancel_job, job_log, job_status, submit_training
from runner.errors import Forbidden, InvalidInput
from runner.jobs import background
from runner.registry import catalog, db, ledger, recovery, schema

# two epochs: a running job has an epoch behind it to report
TRAINING = [o for o in TINY if not o.startswith("training.max_epochs=")] + [
    "training.max_epochs=2"]


def submit(**kw):
    args = dict(agent_id=AGENT, wall_time_cap_min=5, vram_cap_gb=1, overrides=TRAINING)
    args.update(kw)
    return submit_training(BASE_ID, DATASET_ID, **args)


def wait_for(job_id: str, states: tuple[str, ...], timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = job_status(job_id, AGENT)
        if status["status"] in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {status['status']}: "
                                 f"{job_log(job_id, AGENT, 40)['lines']}")
        time.sleep(0.5)


def mlflow_run(run_id: str):
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking

    uri = to_plain(compose_config())["tracking"]["tracking_uri"]
    return tracking.client(uri).get_run(run_id)


def no_job_processes(job_id: str, timeout: float = 30.0) -> bool:
    """No process left whose command line names the job's submitit folder."""
    marker = str(background.jobs_dir() / job_id).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and _cmdline_has(p, marker)]
        if not alive:
            return True
        time.sleep(0.5)
    return False


def _cmdline_has(proc: Path, marker: bytes) -> bool:
    try:
        return marker in (proc / "cmdline").read_bytes() and b"<defunct>" not in \
            (proc / "cmdline").read_bytes() and (proc / "stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_submit_returns_at_once_and_the_job_registers_a_candidate(registry, committed_code,
                                                                  monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    monkeypatch.setenv("FORGE_SITE_URL", "http://127.0.0.1:8765/")  # forge serve's base URL
    started = time.monotonic()
    job = submit()
    took = time.monotonic() - started
    assert job["status"] in ("queued", "running") and job["existing"] is False
    assert job["engine"] == "local" and job["engine_job_id"].isdigit()
    assert took < 15, f"submit took {took:.1f}s"  # the training itself takes far longer
    alloc = ledger.get_allocation(job["job_id"])
    assert alloc["debited"] == alloc["estimated_cost"] > 0  # debited before it runs
    assert ledger.balance(AGENT) == Decimal("10") - alloc["debited"]
    again = submit()  # the same request: the same job, no second debit
    assert again["job_id"] == job["job_id"] and again["existing"] is True
    assert ledger.balance(AGENT) == Decimal("10") - alloc["debited"]

    seen_running = wait_for(job["job_id"], ("running", "succeeded", "failed"))
    done = wait_for(job["job_id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done
    result = done["result"]
    version = catalog.get_model_version(result["artifact_id"])
    assert version["parent_version_id"] == BASE_ID
    assert version["lifecycle_state"] == "candidate"
    assert version["version"]["gpu_allocation_id"] == job["job_id"]
    assert result["detail_url"] == f"http://127.0.0.1:8765/artifacts/{result['artifact_id']}"
    assert result["mlflow_url"].endswith(f"/runs/{result['mlflow']['run_id']}")
    assert [row["id"] for row in catalog.lineage(result["artifact_id"])] == \
        [BASE_ID, result["artifact_id"]]
    settled = ledger.get_allocation(job["job_id"])
    assert Decimal(done["cost"]["refunded"]) == settled["refunded"] > 0
    assert any("epoch" in line.lower() or "step" in line.lower()
               for line in job_log(job["job_id"], AGENT, 200)["lines"])
    if seen_running["status"] == "running":
        assert "elapsed_s" in seen_running["progress"]
    assert recovery.check() == []
    assert no_job_processes(job["job_id"])


def test_progress_is_read_from_the_hosts_mlflow_run(sqlite_registry, tmp_path):
    """While a job runs, job_status reports the epoch, step, eta and latest metrics that the
    host's relay wrote into its MLflow run."""
    from runner.jobs import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = client.create_experiment("p", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    for step, epoch in ((10, 0), (20, 1)):
        client.log_metric(run.info.run_id, "epoch", epoch, step=step)
        client.log_metric(run.info.run_id, "val_loss", 1.0 / (step + 1), step=step)
    alloc = {"id": "alloc-" + "1" * 32, "mlflow_run_id": run.info.run_id,
             "started_at": ledger.now()}
    record = {"tracking_uri": uri, "max_epochs": 4}
    time.sleep(0.2)
    progress = background._progress(alloc, record)
    assert progress["epoch"] == 1 and progress["step"] == 20 and progress["max_epochs"] == 4
    assert progress["metrics"] == {"val_loss": pytest.approx(1 / 21)}
    assert progress["eta_s"] is not None and progress["eta_s"] >= 0
    broken = background._progress(alloc, {"tracking_uri": f"sqlite:///{tmp_path}/nope/x.db"})
    assert broken["epoch"] is None and "unavailable" in broken  # said, never raised


def _running_slow_job(tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPING_TRAINER)))
    job = submit(overrides=[], allow_dirty=False)
    deadline = time.monotonic() + 120
    while "working" not in "\n".join(job_log(job["job_id"], AGENT)["lines"]):
        assert time.monotonic() < deadline, job_status(job["job_id"], AGENT)
        time.sleep(0.3)
    return job


@pytest.mark.slow
@pytest.mark.sandbox
def test_cancel_a_running_job_charges_what_ran_and_kills_the_run(registry, tmp_path,
                                                                 monkeypatch):
    job = _running_slow_job(tmp_path, monkeypatch)
    time.sleep(1.0)
    out = cancel_job(job["job_id"], AGENT)
    assert out["status"] == "cancelled", out
    alloc = ledger.get_allocation(job["job_id"])
    assert alloc["status"] == "cancelled"
    assert Decimal(0) < alloc["actual_cost"] < alloc["debited"]
    assert alloc["refunded"] == alloc["debited"] - alloc["actual_cost"]
    assert ledger.balance(AGENT) == Decimal("10") - alloc["actual_cost"]
    run = mlflow_run(alloc["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["forge.outcome"] == "cancelled"
    assert [m["id"] for m in catalog.list_artifacts("model")] == [BASE_ID]
    assert cancel_job(job["job_id"], AGENT)["status"] == "cancelled"  # again: a no-op
    assert recovery.check() == []
    assert no_job_processes(job["job_id"])


def test_cancel_a_queued_job_refunds_it_whole(sqlite_registry, tmp_path, monkeypatch):
    """Cancelled before it starts, a job is refunded whole and never runs; if it won the race
    and started, it is stopped and charged what it ran. Either way the books balance."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPING_TRAINER)))
    job = submit(overrides=[], allow_dirty=False)
    out = cancel_job(job["job_id"], AGENT)
    assert out["status"] == "cancelled", out
    alloc = ledger.get_allocation(job["job_id"])
    assert alloc["refunded"] + alloc["actual_cost"] == alloc["debited"]
    if alloc["started_at"] is None:
        assert alloc["actual_cost"] == 0 and ledger.balance(AGENT) == Decimal("10")
    assert no_job_processes(job["job_id"])
    assert recovery.check() == []


@pytest.mark.sandbox
def test_a_killed_engine_job_is_reaped(sqlite_registry, tmp_path, monkeypatch):
    """The engine's process dies (SIGKILL, a reboot): the reaper finds its host gone and
    settles the allocation; nothing stays open."""
    monkeypatch.setenv("FORGE_HEARTBEAT_S", "0.5")
    job = _running_slow_job(tmp_path, monkeypatch)
    alloc = ledger.get_allocation(job["job_id"])
    host_pid = int(alloc["host"].rpartition(":")[2])
    os.kill(int(alloc["engine_job_id"]), signal.SIGKILL)  # the controller
    os.kill(host_pid, signal.SIGKILL)  # the job's host process
    deadline = time.monotonic() + 60
    while ledger.get_allocation(job["job_id"])["status"] == "running":
        assert time.monotonic() < deadline
        recovery.reap()
        time.sleep(0.5)
    closed = ledger.get_allocation(job["job_id"])
    assert closed["status"] == "failed" and "reaped" in closed["failure_reason"]
    assert job_status(job["job_id"], AGENT)["status"] == "failed"
    assert recovery.check() == []


def test_another_agents_job_is_forbidden_and_audited_as_the_caller(sqlite_registry,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPING_TRAINER)))
    ledger.grant("mallory", "10")
    job = submit(overrides=[], allow_dirty=False)
    try:
        controller = int(job["engine_job_id"])  # detached: its own session, none of our stdio
        assert os.getsid(controller) == controller != os.getsid(0)
        assert os.readlink(f"/proc/{controller}/fd/1").endswith("controller.log")
        assert os.readlink(f"/proc/{controller}/fd/0") == "/dev/null"
        with pytest.raises(Forbidden):
            job_status(job["job_id"], "mallory")
        with tools.acting_as("mallory"):
            with pytest.raises(Forbidden):  # naming the victim does not help
                cancel_job(job["job_id"], AGENT)
            with pytest.raises(Forbidden):  # nor leaving the agent to the token
                cancel_job(job["job_id"])
            with pytest.raises(Forbidden):  # nor spending the victim's credits
                submit(overrides=[], allow_dirty=False)
        assert ledger.get_allocation(job["job_id"])["status"] in ("reserved", "running")
        assert ledger.balance("mallory") == Decimal("10")
        with db.get_engine(sqlite_registry).connect() as conn:
            rows = [dict(r) for r in conn.execute(schema.tool_calls.select().where(
                schema.tool_calls.c.agent_id == "mallory")).mappings()]
        assert len(rows) == 4 and all(r["error_code"] == "forbidden" for r in rows)
        with pytest.raises(InvalidInput):
            job_status("../../etc/passwd", AGENT)
    finally:
        cancel_job(job["job_id"], AGENT)
    assert recovery.check() == []


@pytest.mark.sandbox
def test_forge_jobs_cli_submits_lists_follows_and_cancels(sqlite_registry, tmp_path,
                                                           monkeypatch):
    import json as json_

    from click.testing import CliRunner

    from runner.cli import main

    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPING_TRAINER)))
    cli = CliRunner()
    out = cli.invoke(main, ["jobs", "submit", BASE_ID, DATASET_ID, "training.lr=0.001",
                            "--agent", AGENT, "--cap", "5", "--json"])
    assert out.exit_code == 0, out.output
    job = json_.loads(out.stdout)
    assert job["status"] in ("queued", "running") and job["engine"] == "local"
    again = cli.invoke(main, ["jobs", "submit", BASE_ID, DATASET_ID, "training.lr=0.001",
                              "--agent", AGENT, "--cap", "5"])  # for people; the same job
    assert again.exit_code == 0 and again.output.startswith(f"job {job['job_id']}: ")
    assert f"next: forge jobs status {job['job_id']}" in again.output
    listed = cli.invoke(main, ["jobs", "list", "--json"])
    assert [row["id"] for row in json_.loads(listed.stdout)] == [job["job_id"]]
    deadline = time.monotonic() + 120
    while "working" not in cli.invoke(main, ["jobs", "log", job["job_id"]]).output:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    status = json_.loads(cli.invoke(main, ["jobs", "status", job["job_id"], "--json"]).output)
    assert status["status"] == "running" and "progress" in status
    human = cli.invoke(main, ["jobs", "status", job["job_id"]]).output.splitlines()
    assert human[0].startswith(f"{job['job_id']} ({AGENT}): running; debited ")
    assert human[-1] == f"next: forge jobs log {job['job_id']}   or   " \
                        f"forge jobs status {job['job_id']}"
    cancelled = json_.loads(cli.invoke(main, ["jobs", "cancel", job["job_id"], "--json"]).output)
    assert cancelled["status"] == "cancelled"
    assert "cancelled" in cli.invoke(main, ["jobs", "list"]).output
    bad = cli.invoke(main, ["jobs", "submit", BASE_ID, DATASET_ID, "pricing.price_per_hour=0",
                            "--agent", AGENT])
    assert bad.exit_code == 2 and "operator" in bad.output  # a typed error, one line
    assert recovery.check() == []
