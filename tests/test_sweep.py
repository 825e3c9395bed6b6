"""Sweeps through `forge-train -m`: dry run, budget gate, candidates, nested MLflow runs,
partial failure and re-runs, the submitit_local launcher, and 8 concurrent jobs on PostgreSQL.

The 4-job grid trains for real; the launcher and concurrency tests use a stand-in trainer
(real sandbox, real registry and MLflow, a trainer that finishes in a blink) so that what they
measure is the orchestration under parallel load, within the CI budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    AGENT,
    BASE_ID,
    STAND_IN_TRAINER,
    assert_on_server,
    count_rows,
    fake_code_repo,
    operator_conf,
)

from runner.registry import catalog, db, ledger, recovery, schema

FORGE_TRAIN = [sys.executable, "-c", "from runner.train_app import main; main()"]
# The tiny base has no conf/parent option: forge-train names it by id, and the registry says
# what its family and architecture are.
PARENT_ARGS = [f"parent_artifact_id={BASE_ID}"]
# The operator lets a parallel sweep's jobs run at once (runner/registry/capacity.py): more
# jobs per agent and per host than the defaults, and memory caps that all fit this host.
PARALLEL = ("policy:\n  max_jobs_per_agent: 8\n  max_jobs_per_host: 8\n"
            "sandbox:\n  max_memory_gb: 1\n")
STAND_IN = STAND_IN_TRAINER.replace(
    "METRICS", '{"test_macro_f1": m["training"]["lr"] * 100, "test_accuracy": 0.5}')


def forge_train(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*FORGE_TRAIN, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def sweep(*extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return forge_train("-m", "sweep=tiny_grid", f"agent_id={AGENT}", "allow_dirty=true",
                       *PARENT_ARGS, *extra, timeout=timeout)


def allocations(url: str) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(schema.resource_allocations)).mappings()]


def candidates() -> list[dict]:
    return [m for m in catalog.list_artifacts("model") if m["id"] != BASE_ID]


def mlflow_client():
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking

    return tracking.client(to_plain(compose_config())["tracking"]["tracking_uri"])


def mlflow_runs(since_ms: int = 0) -> list:
    """Every run in the operator's tracking store started since `since_ms` (a tracking server
    is shared by the session's tests: `tracking_store.since_ms` keeps a test to its own)."""
    client = mlflow_client()
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.start_time >= {since_ms}")


def test_sweep_dry_run_lists_every_job_and_the_total(sqlite_registry):
    before = count_rows(sqlite_registry)
    proc = sweep("dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("would launch") == 4, proc.stdout
    assert "total estimate: 0.166668" in proc.stdout  # 4 x 5 min at 0.50/h
    for lr, seed in [("0.001", "0"), ("0.001", "1"), ("0.0003", "0"), ("0.0003", "1")]:
        assert f"training.lr={lr} training.seed={seed}" in proc.stdout
    after = count_rows(sqlite_registry)
    assert {k for k in after if after[k] != before[k]} == {"tool_calls"}  # audit rows only


def test_budget_gate_refuses_a_sweep_that_does_not_fit(sqlite_registry):
    ledger.grant("poor-agent", "0.1")
    before = count_rows(sqlite_registry)
    proc = forge_train("-m", "sweep=tiny_grid", "agent_id=poor-agent", "allow_dirty=true",
                       *PARENT_ARGS)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "BudgetExceeded" in proc.stderr and "fit_budget=true" in proc.stderr
    assert count_rows(sqlite_registry) == before
    assert ledger.balance("poor-agent") == Decimal("0.1")


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_grid_sweep_registers_four_linked_candidates(sqlite_registry, committed_code,
                                                     monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    proc = sweep()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    made = candidates()
    assert len(made) == 4 and {m["parent_version_id"] for m in made} == {BASE_ID}
    assert {m["lifecycle_state"] for m in made} == {"candidate"}
    assert proc.stdout.count(" ok ") >= 4 and "sweep summary" in proc.stdout
    runs = mlflow_runs()
    parents = [r for r in runs if r.data.tags.get("forge.sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(nested) == 4 and {r.info.status for r in nested} == {"FINISHED"}
    assert recovery.check() == []

    # The same sweep again: every job returns its earlier result; nothing is debited.
    again = sweep()
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(candidates()) == 4 and len(allocations(sqlite_registry)) == 4
    assert recovery.check() == []


@pytest.mark.slow
@pytest.mark.sandbox
def test_fit_budget_runs_what_fits_and_records_the_rest(sqlite_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    ledger.grant("half-agent", "0.2")  # a 5-minute job (0.041667) fits, a 60-minute one (0.50) not
    # tiny_grid's two learning rates, one seed (the command line's value replaces the sweep's):
    # four jobs, of which the two 5-minute ones fit
    args = ["-m", "sweep=tiny_grid", "agent_id=half-agent", "wall_time_cap_min=5,60",
            "training.seed=0", *PARENT_ARGS]
    refused = forge_train(*args)
    assert refused.returncode == 2 and "BudgetExceeded" in refused.stderr
    proc = forge_train(*args, "fit_budget=true")
    assert proc.returncode == 2  # some jobs failed, and the exit code says so
    assert proc.stdout.count(" ok ") == 2 and proc.stdout.count("failed") == 2, proc.stdout
    assert "BudgetExceeded" in proc.stdout  # the failed jobs' reason, in the summary
    assert len(candidates()) == 2 and len(allocations(sqlite_registry)) == 2
    assert recovery.check() == []

    # Re-run with more credits: the two done are skipped, the two that failed run now.
    ledger.grant("half-agent", "3")
    again = forge_train(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(candidates()) == 4 and len(allocations(sqlite_registry)) == 4
    assert recovery.check() == []


# A Hydra callback that commits to the code repository after every job, as a colleague
# pushing mid-sweep would: later jobs must still run the commit pinned at the start. Callbacks
# are the operator's: it goes in conf/local/ of a copy of conf/ (FORGE_CONFIG_DIR).
COMMIT_EACH_JOB = """
import git
from hydra.experimental.callback import Callback

class CommitEachJob(Callback):
    def on_job_end(self, config, job_return, **kwargs):
        repo = git.Repo(REPO)
        path = f"{repo.working_tree_dir}/later.txt"
        with open(path, "a") as f:
            f.write("x")
        repo.index.add(["later.txt"])
        who = git.Actor("t", "t@t")
        repo.index.commit("a commit made while the sweep runs", author=who, committer=who)
"""


@pytest.mark.slow
@pytest.mark.sandbox
def test_a_sweep_runs_the_commit_pinned_at_its_start(sqlite_registry, tmp_path, monkeypatch):
    import git

    code = fake_code_repo(tmp_path, STAND_IN)
    pinned = git.Repo(code).head.commit.hexsha
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "commit_each_job.py").write_text(
        COMMIT_EACH_JOB.replace("REPO", repr(str(code))))
    monkeypatch.setenv("FORGE_CODE_REPO", str(code))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "cb"), *sys.path]))
    operator_conf(tmp_path, monkeypatch, "hydra:\n  callbacks:\n    commit_each_job:\n"
                  "      _target_: commit_each_job.CommitEachJob\n")
    proc = forge_train("-m", "sweep=tiny_grid", f"agent_id={AGENT}", *PARENT_ARGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(git.Repo(code).iter_commits())) == 5  # HEAD moved after every job
    with db.get_engine(sqlite_registry).connect() as conn:
        shas = conn.execute(sa.select(schema.model_versions.c.code_commit_sha).where(
            schema.model_versions.c.artifact_id != BASE_ID)).scalars().all()
    assert shas == [pinned] * 4


def test_a_dirty_tree_refuses_the_sweep_before_any_job(sqlite_registry, tmp_path, monkeypatch):
    code = fake_code_repo(tmp_path, STAND_IN)
    with (code / "trainers" / "entrypoint.py").open("a") as f:  # a tracked file changed
        f.write("# uncommitted\n")
    monkeypatch.setenv("FORGE_CODE_REPO", str(code))
    before = count_rows(sqlite_registry)
    proc = forge_train("-m", "sweep=tiny_grid", f"agent_id={AGENT}", *PARENT_ARGS)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CodePinError" in proc.stderr and "allow_dirty" in proc.stderr
    assert "sweep summary" not in proc.stdout  # no job ran
    assert count_rows(sqlite_registry) == before


def test_a_cap_past_submitit_locals_timeout_is_refused_before_any_job(sqlite_registry):
    """submitit_local kills a job at its timeout_min (60): the default cap of 120 min would
    be cut short, silently, before this refusal."""
    before = count_rows(sqlite_registry)
    proc = forge_train("-m", f"agent_id={AGENT}", "allow_dirty=true", *PARENT_ARGS,
                       "training.lr=1e-3,3e-4", "hydra/launcher=submitit_local")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "InvalidOverride" in proc.stderr and "of 60 min" in proc.stderr, proc.stderr
    assert count_rows(sqlite_registry) == before


@pytest.mark.slow
@pytest.mark.sandbox
def test_submitit_local_runs_jobs_in_parallel(sqlite_registry, tracking_store, tmp_path,
                                              monkeypatch):
    operator_conf(tmp_path, monkeypatch, tracking_store.operator_yaml + PARALLEL)
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    proc = sweep("hydra/launcher=submitit_local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    made = candidates()
    assert len(made) == 4 and {m["parent_version_id"] for m in made} == {BASE_ID}
    runs = mlflow_runs(tracking_store.since_ms)
    [parent] = [r for r in runs if r.data.tags.get("forge.sweep") == "true"]
    assert parent.info.status == "FINISHED" and parent.data.tags["forge.sweep.ok"] == "4"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == 4 and {r.info.status for r in nested} == {"FINISHED"}
    assert {r.data.params["training.lr"] for r in nested} == {"0.001", "0.0003"}
    home = Path(os.environ["FORGE_HOME"])  # one run folder per allocation: no collisions
    for alloc in allocations(sqlite_registry):  # cleaned after registration: the log stays
        assert (home / "runs" / alloc["id"] / "job.log").is_file()
    assert recovery.check() == []
    if tracking_store.server:  # every process of the sweep tracked into the server
        client = mlflow_client()
        assert_on_server(tracking_store, client, parent.info.run_id,
                         files=("sweep_jobs.json", "sweep_summary.json"))
        for run in nested:
            assert_on_server(tracking_store, client, run.info.run_id,
                             files=("config/resolved.yaml", "job.log"))
            assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["dataset-geo-GSE100866"]
            assert [m.value for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
        versions = client.search_model_versions("name='scgpt'")
        assert {a["artifact_id"] for a in allocations(sqlite_registry)} <= \
            {v.tags.get("forge.artifact_id") for v in versions}


@pytest.mark.postgres
@pytest.mark.slow
# The local store only: eight processes tracking into the server at once is what
# test_submitit_local_runs_jobs_in_parallel[server] proves with four (every run, upload and
# model version checked there); a twin of this one added 59 CPU-s and checked less.
@pytest.mark.parametrize("tracking_store", ["local"], indirect=True)
@pytest.mark.sandbox
def test_eight_concurrent_jobs_on_postgresql(pg_registry, tracking_store, tmp_path, monkeypatch):
    operator_conf(tmp_path, monkeypatch, tracking_store.operator_yaml + PARALLEL)
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    proc = forge_train("-m", f"agent_id={AGENT}", *PARENT_ARGS, "wall_time_cap_min=5",
                       "vram_cap_gb=1", "training.lr=1e-3,2e-3,3e-3,4e-3",
                       "training.seed=0,1", "hydra/launcher=submitit_local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    made = candidates()
    assert len(made) == 8 and len({m["id"] for m in made}) == 8, proc.stdout[-4000:]
    allocs = allocations(pg_registry)
    assert len(allocs) == 8 and {a["status"] for a in allocs} == {"settled"}
    assert sorted(a["artifact_id"] for a in allocs) == sorted(m["id"] for m in made)
    assert ledger.balance(AGENT) == Decimal(10) - sum(a["actual_cost"] for a in allocs)
    assert recovery.check() == []
    with db.get_engine(pg_registry).connect() as conn:
        events = conn.execute(sa.select(sa.func.count()).select_from(schema.events)).scalar_one()
    assert events == 8
    runs = [r for r in mlflow_runs(tracking_store.since_ms)
            if r.data.tags.get("forge.agent_id") == AGENT
            and r.data.tags.get("forge.sweep") != "true"]
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.info.run_id for r in runs) == sorted(a["mlflow_run_id"] for a in allocs)
