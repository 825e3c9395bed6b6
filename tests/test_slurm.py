"""Sweeps on a real SLURM cluster (deploy/slurm/up.sh: slurmctld + slurmd on this host),
submitted through submitit by `forge-train -m ... hydra/launcher=forge_slurm`.

Each sbatch task runs the host side of one job on the node: debit, the bubblewrap sandbox,
registration. What is checked: four candidates from one job array, each allocation naming
its SLURM job; the caps mapped onto sbatch's options; `scancel` of a running task settles its
allocation as cancelled (the seconds it ran charged, the rest refunded) and marks its MLflow
run KILLED; a node that dies mid-job leaves an allocation the reaper settles on SLURM's word.

The trainer is a stand-in (real sandbox, registry, MLflow and SLURM; a trainer that finishes
in a blink, or sleeps until it is stopped) so that what is measured is the orchestration.
Without a cluster these skip; under CI=true they fail (.ci/run starts the cluster).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import AGENT, BASE_ID, STAND_IN_TRAINER, assert_on_server, fake_code_repo

from runner.jobs import engine
from runner.jobs import recovery as job_recovery
from runner.registry import catalog, db, ledger, recovery, schema

REPO = Path(__file__).resolve().parents[1]
# make test runs the cluster tests in a session of their own beside the xdist workers (one
# node, 2 CPUs; the waits below are bounds for a loaded machine, not what a pass takes);
# under a plain `pytest -n N` they keep to one worker (xdist_group "slurm").
FORGE_TRAIN = [sys.executable, "-c", "from runner.train_app import main; main()"]
STAND_IN = STAND_IN_TRAINER.replace(
    "METRICS", '{"test_macro_f1": m["training"]["lr"] * 100, "test_accuracy": 0.5}')
# Trains until it is stopped: says so once it runs, then sleeps.
SLEEPER = """
    import sys, time
    print("sleeper started", flush=True)
    time.sleep(600)
    sys.exit(1)
"""
JOB_ID = re.compile(r"\d+_\d+")


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node cluster, started (or found up) by the script an operator runs."""
    if not shutil.which("sbatch") and os.environ.get("CI") != "true":
        pytest.skip("SLURM is not installed: bash deploy/slurm/up.sh installs and starts it")
    proc = subprocess.run(["bash", str(REPO / "deploy" / "slurm" / "up.sh")],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = f"deploy/slurm/up.sh failed: {proc.stderr[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return _node()


@pytest.fixture
def slurm_env(slurm_cluster, pg_registry, tmp_path, monkeypatch):
    """The operator's settings for tasks on this small node: one CPU and 1 GB each."""
    monkeypatch.setenv("FORGE_SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setenv("FORGE_SLURM_MEM_GB", "1")
    return pg_registry


def _node() -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def forge_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FORGE_TRAIN, *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=timeout)


def allocations(url: str) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(schema.resource_allocations)).mappings()]


def mlflow_client():
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking

    return tracking.client(to_plain(compose_config())["tracking"]["tracking_uri"])


def job_runs(client) -> list:
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.data.tags.get("forge.sweep") != "true"]


def wait_for(what: str, predicate, timeout: float = 300.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def running_alloc(url: str, log_says: str) -> dict | None:
    """The one running allocation once its job's log shows `log_says`."""
    running = [a for a in allocations(url) if a["status"] == "running"]
    if len(running) != 1:
        return None
    log = Path(os.environ["FORGE_HOME"]) / "runs" / running[0]["id"] / "job.log"
    return running[0] if log.is_file() and log_says in log.read_text(errors="replace") else None


def sbatch_scripts() -> list[str]:
    home = Path(os.environ["FORGE_HOME"])
    return [p.read_text() for p in home.rglob("*_submission.sh")]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.sandbox
# On the MLflow server a cluster's nodes would share. The same array on the local store is
# test_forge_slurm_with_no_forge_slurm_variables_runs_the_tiny_sweep, which checks it alike
# (a twin here ran the same four tasks again: about 50 s of the SLURM tier).
@pytest.mark.parametrize("tracking_store", ["server"], indirect=True)
def test_a_sweep_through_sbatch_registers_one_candidate_per_task(slurm_env, tracking_store,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    proc = forge_train("-m", "sweep=tiny_grid", f"agent_id={AGENT}", "allow_dirty=true",
                       f"parent_artifact_id={BASE_ID}", "hydra/launcher=forge_slurm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_one_array_of_four_candidates(slurm_env, tracking_store)

    # The caps as sbatch options: --time is the cap (5 min, tiny_grid) + the registry's
    # expiry margin (10 min); a CPU job asks for no GPU; the operator's task size.
    (script,) = sbatch_scripts()
    assert "#SBATCH --time=15" in script and "gpus" not in script, script
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --mem=1GB" in script, script
    assert "#SBATCH --array=0-3" in script, script


def assert_one_array_of_four_candidates(url: str, tracking_store) -> None:
    """The tiny sweep ran as one SLURM array of four tasks, each a settled allocation with
    its candidate and its finished MLflow run (uploaded to the server, when it is one)."""
    made = [m for m in catalog.list_artifacts("model") if m["id"] != BASE_ID]
    assert len(made) == 4 and {m["parent_version_id"] for m in made} == {BASE_ID}
    allocs = allocations(url)
    assert len(allocs) == 4 and {a["status"] for a in allocs} == {"settled"}
    assert {a["engine"] for a in allocs} == {"slurm"}
    ids = [a["engine_job_id"] for a in allocs]
    assert all(JOB_ID.fullmatch(i) for i in ids) and len(set(ids)) == 4, ids
    assert len({i.split("_")[0] for i in ids}) == 1  # one job array, four tasks
    for job_id in ids:  # SLURM ran them, and says they completed (once each task's process
        # has exited: the sweep returns on the results they wrote just before)
        wait_for(f"SLURM to complete {job_id}",
                 lambda job_id=job_id: engine.slurm_state(job_id) == "COMPLETED", timeout=120)
    client = mlflow_client()
    by_alloc = {r.data.tags["forge.allocation_id"]: r for r in job_runs(client)
                if r.info.start_time >= tracking_store.since_ms}
    for alloc in allocs:
        tags = by_alloc[alloc["id"]].data.tags
        assert tags["forge.engine"] == "slurm"
        assert tags["forge.slurm_job_id"] == alloc["engine_job_id"]
        assert by_alloc[alloc["id"]].info.status == "FINISHED"
        if tracking_store.server is not None:  # tracked through the server, from the node
            assert_on_server(tracking_store, client, alloc["mlflow_run_id"],
                             files=("result.json", "job.log"))
    assert ledger.balance(AGENT) == Decimal(10) - sum(a["actual_cost"] for a in allocs)
    assert recovery.check() == []


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.sandbox
def test_scancel_settles_the_allocation_as_cancelled_and_kills_the_run(slurm_env, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPER)))
    sweep = subprocess.Popen(
        [*FORGE_TRAIN, "-m", f"agent_id={AGENT}", "allow_dirty=true", "wall_time_cap_min=10",
         "vram_cap_gb=1", f"parent_artifact_id={BASE_ID}", "training.lr=1e-3",
         "hydra/launcher=forge_slurm"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        alloc = wait_for("the job to start in the sandbox",
                         lambda: running_alloc(slurm_env, "sleeper started"))
        assert alloc["engine"] == "slurm" and alloc["engine_job_id"].isdigit()  # not an array
        time.sleep(2)  # some seconds run, to be charged
        subprocess.run(["scancel", alloc["engine_job_id"]], check=True)
        closed = wait_for("the allocation to settle", lambda: next(
            (a for a in allocations(slurm_env) if a["id"] == alloc["id"]
             and a["status"] != "running"), None), timeout=120)
        out, _ = sweep.communicate(timeout=300)
    finally:
        _stop(sweep)
    assert closed["status"] == "cancelled", closed
    assert "cancelled" in closed["failure_reason"] and alloc["engine_job_id"] in \
        closed["failure_reason"], closed["failure_reason"]
    assert Decimal(0) < closed["actual_cost"] < closed["debited"]  # seconds run, charged
    assert closed["refunded"] == closed["debited"] - closed["actual_cost"]
    assert 2 <= closed["actual_seconds"] < 60
    assert ledger.balance(AGENT) == Decimal(10) - closed["actual_cost"]
    (run,) = [r for r in job_runs(mlflow_client())
              if r.data.tags["forge.allocation_id"] == alloc["id"]]
    assert run.info.status == "KILLED" and run.data.tags["forge.outcome"] == "cancelled"
    assert [m["id"] for m in catalog.list_artifacts("model")] == [BASE_ID]
    assert recovery.check() == []
    assert engine.slurm_state(alloc["engine_job_id"]) in ("CANCELLED", "COMPLETING"), out[-2000:]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.sandbox
def test_a_node_failure_mid_job_is_reaped_on_slurms_word(slurm_env, slurm_cluster, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPER)))
    monkeypatch.setenv("FORGE_HEARTBEAT_S", "1")  # stale after 3 s, not 90
    sweep = subprocess.Popen(
        [*FORGE_TRAIN, "-m", f"agent_id={AGENT}", "allow_dirty=true", "wall_time_cap_min=10",
         "vram_cap_gb=1", f"parent_artifact_id={BASE_ID}", "training.lr=1e-3",
         "hydra/launcher=forge_slurm"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = slurm_cluster
    try:
        alloc = wait_for("the job to start in the sandbox",
                         lambda: running_alloc(slurm_env, "sleeper started"))
        # The node dies: its slurmd, the job's step daemons and every process they ran.
        subprocess.run(["pkill", "-KILL", "-x", "slurmd"], check=False)
        subprocess.run(["pkill", "-KILL", "-x", "slurmstepd"], check=False)
        host_pid = int(alloc["host"].rpartition(":")[2])
        os.kill(host_pid, signal.SIGKILL)  # bwrap dies with its parent, the jail with bwrap
        # What slurmctld concludes once the node stops answering (SlurmdTimeout), now.
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN",
                        "Reason=forge-test-node-failure"], check=True)
        wait_for("SLURM to fail the job", lambda: engine.slurm_state(alloc["engine_job_id"])
                 not in engine.SLURM_LIVE, timeout=120)
        time.sleep(3.5)  # three missed heartbeats

        # The reaper settles it, here or in the sweep's own watch of its array (whichever
        # comes first: exactly once either way).
        reaped = job_recovery.reap()
        # The sweep sees its task gone with no result and returns, the task `lost`.
        out, _ = sweep.communicate(timeout=300)
    finally:
        _stop(sweep)
        _revive(node)
    assert sweep.returncode == 1, out[-3000:]  # a task lost: the sweep did not succeed
    (lost,) = sweep_summary()
    assert lost["status"] == "lost" and "NODE_FAIL" in lost["error"], lost
    assert [a["id"] for a in reaped] in ([alloc["id"]], [])
    closed = ledger.get_allocation(alloc["id"])
    assert closed["status"] == "failed"
    assert f"SLURM job {alloc['engine_job_id']} is NODE_FAIL" in closed["failure_reason"]
    assert closed["refunded"] == closed["debited"] - closed["actual_cost"]
    assert recovery.check() == []
    (run,) = [r for r in job_runs(mlflow_client())
              if r.data.tags["forge.allocation_id"] == alloc["id"]]
    assert run.info.status == "FAILED"


def _stop(sweep: subprocess.Popen) -> None:
    """The submitting process and whatever it left queued: nothing outlives a test."""
    if sweep.poll() is None:
        sweep.kill()
    sweep.communicate(timeout=120)
    subprocess.run(["scancel", f"--user={os.getuid()}"], check=False)


def _revive(node: str) -> None:
    """The node back in service for the tests after this one."""
    subprocess.run(["/usr/sbin/slurmd"], check=False)
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
    wait_for("the node to come back", lambda: subprocess.run(
        ["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip() in ("idle", "mixed"), timeout=120)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.sandbox
def test_submit_training_runs_on_slurm_and_cancel_job_scancels_it(slurm_env, tmp_path,
                                                                  monkeypatch):
    """The asynchronous jobs of runner.api on the cluster (FORGE_JOBS_EXECUTOR=slurm): a
    job is an sbatch job recorded on its allocation; one runs to its candidate, another is
    cancelled while it runs, charged what it ran and refunded the rest."""
    from runner.api import cancel_job, job_log, job_status, submit_training

    monkeypatch.setenv("FORGE_JOBS_EXECUTOR", "slurm")
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path / "ok", STAND_IN)))
    args = dict(agent_id=AGENT, wall_time_cap_min=5, vram_cap_gb=1)
    job = submit_training(BASE_ID, "dataset-geo-GSE100866", **args)
    assert job["engine"] == "slurm" and job["engine_job_id"].isdigit()
    done = wait_for("the job to finish", lambda: (s := job_status(job["job_id"], AGENT))
                    ["status"] in ("succeeded", "failed", "cancelled") and s)
    assert done["status"] == "succeeded", done
    assert catalog.get_model_version(done["result"]["artifact_id"])["parent_version_id"] \
        == BASE_ID

    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path / "slow", SLEEPER)))
    slow = submit_training(BASE_ID, "dataset-geo-GSE100866", **args)
    wait_for("the sleeper to start", lambda: "sleeper started" in
             "\n".join(job_log(slow["job_id"], AGENT)["lines"]))
    out = cancel_job(slow["job_id"], AGENT)
    assert out["status"] == "cancelled", out
    alloc = ledger.get_allocation(slow["job_id"])
    assert Decimal(0) < alloc["actual_cost"] < alloc["debited"]
    assert alloc["refunded"] == alloc["debited"] - alloc["actual_cost"]
    wait_for("SLURM to end the job", lambda: engine.slurm_state(alloc["engine_job_id"])
             not in engine.SLURM_LIVE)
    assert recovery.check() == []


def test_slurm_job_ids_are_read_only_from_slurms_own_variables():
    assert engine.current({}) is None
    assert engine.current({"SLURM_JOB_ID": "42"}) == engine.EngineJob("slurm", "42")
    assert engine.current({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "42",
                           "SLURM_ARRAY_TASK_ID": "3"}).job_id == "42_3"
    assert engine.current({"SLURM_JOB_ID": "42; rm -rf /"}) is None
    assert engine.slurm_state("42 -o %all") is None  # never handed to squeue


def test_caps_map_onto_slurm_resources():
    from runner.config import launchers

    assert launchers.slurm_time_min(120, 10) == 130
    assert launchers.slurm_gpus("cpu", 4) is None
    assert launchers.slurm_gpus("h200", 2) == 2


def test_a_sweep_whose_caps_outlive_the_arrays_time_is_refused_before_any_job(sqlite_registry):
    from helpers import count_rows

    before = count_rows(sqlite_registry)
    # tiny_grid's cap of 5 min gives the array --time=15; a job swept to 30 min would be cut.
    proc = forge_train("-m", "sweep=tiny_grid", f"agent_id={AGENT}", "allow_dirty=true",
                       f"parent_artifact_id={BASE_ID}", "wall_time_cap_min=5,30",
                       "hydra/launcher=forge_slurm")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "InvalidOverride" in proc.stderr and "--time) of 15 min" in proc.stderr, proc.stderr
    assert count_rows(sqlite_registry) == before
    assert not sbatch_scripts()  # nothing was submitted


# --- engines fail loudly (issue 31) -------------------------------------------------------------

def our_slurm_jobs() -> list[str]:
    """The SLURM jobs this test's sweeps submitted (submitit's folders under FORGE_HOME)."""
    home = Path(os.environ["FORGE_HOME"])
    return sorted({p.name.split("_")[0] for p in home.rglob(".submitit/*")
                   if p.is_dir() and (JOB_ID.fullmatch(p.name) or p.name.isdigit())})


def cancel_ours() -> None:
    """Only what this test submitted: another run may share the cluster."""
    for job_id in our_slurm_jobs():
        subprocess.run(["scancel", job_id], check=False)


def sweep_summary() -> list[dict]:
    import json

    (path,) = Path(os.environ["FORGE_HOME"]).rglob("summary.json")
    return json.loads(path.read_text())


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_a_sweep_asking_more_cpus_than_the_node_has_is_refused_before_any_debit(
        slurm_cluster, sqlite_registry, tmp_path, monkeypatch):
    """On the old code the array was submitted and stayed PENDING (PartitionConfig) while
    the sweep waited: the run below timed out."""
    from helpers import count_rows

    monkeypatch.setenv("FORGE_SLURM_CPUS_PER_TASK", "64")
    monkeypatch.setenv("FORGE_SLURM_MEM_GB", "1")
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    before = count_rows(sqlite_registry)
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    try:
        for dry in ("true", "false"):
            proc = forge_train("-m", "sweep=tiny_grid", f"agent_id={AGENT}", "allow_dirty=true",
                               f"parent_artifact_id={BASE_ID}", f"dry_run={dry}",
                               "hydra/launcher=forge_slurm", timeout=180)
            assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert "Unschedulable" in proc.stderr and "asks 64 CPUs" in proc.stderr, proc.stderr
            assert f"has {cpus} ({slurm_cluster}: {cpus} CPUs" in proc.stderr, proc.stderr
            assert f"fix: FORGE_SLURM_CPUS_PER_TASK={cpus}" in proc.stderr, proc.stderr
    finally:
        cancel_ours()
    assert count_rows(sqlite_registry) == before  # no debit, no audit of a job
    assert not sbatch_scripts() and not our_slurm_jobs()  # nothing was submitted


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_a_pending_array_cancelled_with_scancel_ends_the_sweep_within_a_minute(
        slurm_env, tmp_path, monkeypatch):
    """Without accounting, submitit waited for result files that tasks cancelled before they
    started never write: on the old code the sweep was still waiting a minute later."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    # The node is held (every CPU), so the sweep's array can only pend.
    blocker = subprocess.run(["sbatch", "--parsable", "-c", str(_cpus()), "--mem=100M",
                              "-o", "/dev/null", "--wrap", "sleep 300"],
                             capture_output=True, text=True, check=True).stdout.strip()
    sweep = subprocess.Popen(
        [*FORGE_TRAIN, "-m", "sweep=tiny_grid", f"agent_id={AGENT}", "allow_dirty=true",
         f"parent_artifact_id={BASE_ID}", "hydra/launcher=forge_slurm"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        (array,) = wait_for("the array to be submitted", our_slurm_jobs, timeout=240)
        states = wait_for("its tasks to pend", lambda: (s := _states(array)) and s, timeout=60)
        assert set(states.values()) == {"PENDING"}, states
        time.sleep(3)  # the sweep is waiting on them
        subprocess.run(["scancel", array], check=True)
        cancelled_at = time.monotonic()
        out, _ = sweep.communicate(timeout=60)
        took = time.monotonic() - cancelled_at
    finally:
        subprocess.run(["scancel", blocker], check=False)
        _stop_ours(sweep)
    assert sweep.returncode == 1, out[-3000:]  # tasks cancelled: the sweep did not succeed
    assert took < 60, took
    summary = sweep_summary()
    assert [o["status"] for o in summary] == ["cancelled"] * 4, summary
    assert [o["job"] for o in summary] == [0, 1, 2, 3]
    assert all("never started" in o["error"] and array in o["error"] for o in summary)
    assert "cancelled" in out and "sweep summary" in out, out[-3000:]
    assert out.count("Bypassing sacct error") <= 1, out[-3000:]
    assert not [a for a in allocations(slurm_env) if a["status"] in ("reserved", "running")]
    assert ledger.balance(AGENT) == Decimal(10)  # nothing ran, nothing charged
    assert recovery.check() == []


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.sandbox
@pytest.mark.parametrize("tracking_store", ["local"], indirect=True)
def test_forge_slurm_with_no_forge_slurm_variables_runs_the_tiny_sweep(
        slurm_cluster, pg_registry, tracking_store, tmp_path, monkeypatch):
    """deploy/slurm/up.sh writes its node's task size where the launcher reads it; on the old
    code the launcher asked 8 CPUs and 64 GB, and the array pended forever. The array, its
    candidates and runs on the local store are checked as on the server's (above)."""
    import yaml

    for name in [n for n in os.environ if n.startswith("FORGE_SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    try:
        proc = forge_train("-m", "sweep=tiny_grid", f"agent_id={AGENT}", "allow_dirty=true",
                           f"parent_artifact_id={BASE_ID}", "hydra/launcher=forge_slurm",
                           timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert [o["status"] for o in sweep_summary()] == ["ok"] * 4
        # Before any scancel: the tasks' processes may still be exiting when the sweep
        # returns, and a cancelled task would never read COMPLETED.
        assert_one_array_of_four_candidates(pg_registry, tracking_store)
    finally:
        cancel_ours()  # an array pending forever (the old code) leaves nothing behind
    from runner.config.launchers import TASK_FILE

    task = yaml.safe_load(TASK_FILE.read_text())
    (script,) = sbatch_scripts()
    assert f"#SBATCH --cpus-per-task={task['cpus_per_task']}" in script, script
    assert f"#SBATCH --mem={task['mem_gb']}GB" in script, script


def _pending_task(overrides, job_dir_key, job_num, job_id, singleton_state):
    """What the launcher submits, in shape: a task that never gets to run."""
    return job_num


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_a_task_pending_for_a_reason_that_cannot_clear_is_cancelled_and_reported(
        slurm_cluster, tmp_path):
    """PartitionConfig (more CPUs than any node has, past the sweep's own check) for longer
    than the operator's limit: cancelled, closed with a NaN result, recorded as cancelled."""
    import math

    import submitit

    from runner.jobs import slurm_watch

    folder = str(tmp_path / ".submitit" / "%j")
    gone = []
    watcher = slurm_watch.ArrayWatcher(folder, lambda *rec: gone.append(rec), delay_s=2,
                                       limit_s=3)
    previous = submitit.SlurmExecutor.job_class.watcher
    submitit.SlurmExecutor.job_class.watcher = watcher
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(timeout_min=5, cpus_per_task=_cpus() + 1, mem_gb=1)
        jobs = executor.map_array(_pending_task, [["a=1"], ["a=2"]], ["k", "k"], [0, 1],
                                  ["x", "y"], [{}, {}])
        started = time.monotonic()
        results = [job.results()[0] for job in jobs]
        took = time.monotonic() - started
    finally:
        submitit.SlurmExecutor.job_class.watcher = previous
        for job in locals().get("jobs", []):
            subprocess.run(["scancel", job.job_id], check=False)
    assert took < 60, took
    assert all(math.isnan(r.return_value) for r in results)
    assert sorted((g[:3] for g in gone), key=str) == [(0, ["a=1"], "cancelled"),
                                                      (1, ["a=2"], "cancelled")]
    assert all("PartitionConfig, which cannot clear" in g[3] for g in gone), gone
    # (a pending task cancelled on its own leaves the array's record: squeue may forget it)
    assert not {engine.slurm_state(job.job_id) for job in jobs} & engine.SLURM_LIVE


def test_an_array_is_checked_against_the_partitions_nodes():
    from runner.config.launchers import Node, Unschedulable, check_schedulable

    cluster = [Node("a", "cpu", True, 2, 22000, 0, None), Node("g", "gpu", False, 16, 256000,
                                                                 4, 60)]
    check_schedulable({"cpus_per_task": 2, "mem_gb": 20}, cluster)
    check_schedulable({"cpus_per_task": 8, "mem_gb": 64, "gpus_per_node": 4, "partition": "gpu",
                       "timeout_min": 60}, cluster)
    for launcher, field, fix in [
            ({"cpus_per_task": 8, "mem_gb": 64}, "cpus_per_task", "FORGE_SLURM_CPUS_PER_TASK=2"),
            ({"cpus_per_task": 1, "mem_gb": 64}, "mem_gb", "FORGE_SLURM_MEM_GB=21"),
            ({"gpus_per_node": 1}, "gpus_per_node", "device=cpu"),
            ({"partition": "big"}, "partition", "FORGE_SLURM_PARTITION=cpu"),
            ({"partition": "gpu", "timeout_min": 70}, "timeout_min", "fits 60"),
            ({"nodes": 2}, "nodes", "nodes: 1")]:
        with pytest.raises(Unschedulable) as refused:
            check_schedulable(launcher, cluster)
        assert refused.value.reason == "unschedulable"
        assert refused.value.field == f"hydra.launcher.{field}", refused.value
        assert fix in refused.value.fix, refused.value.fix


def test_bypassing_sacct_error_is_said_once():
    import logging

    from runner.jobs import slurm_watch

    slurm_watch.quiet_sacct()
    slurm_watch.quiet_sacct()
    log = logging.getLogger("submitit")
    said = []
    handler = logging.Handler()
    handler.emit = said.append
    log.addHandler(handler)
    try:
        for call in range(1, 5):
            log.warning(f"Call #{call} - Bypassing sacct error ..., status may be inaccurate.")
        log.warning("something else")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage()[:7] for r in said] == ["Call #1", "somethi"]


def _cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def _states(array: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-r", "-j", array, "-o", "%i %T"],
                         capture_output=True, text=True, check=False).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _stop_ours(sweep: subprocess.Popen) -> None:
    if sweep.poll() is None:
        sweep.kill()
    sweep.communicate(timeout=120)
    cancel_ours()
