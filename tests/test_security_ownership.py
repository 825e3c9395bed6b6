"""One agent never decides, reads or nests under another agent's work (issue 24, holes 3 and
10a). Real registry, real MLflow store, real sandbox (a stand-in trainer, seconds).

- The gate: only the candidate's own agent (model_versions.trained_by) or the operator (the
  host's `forge gate`) may gate it or read its decision back; anyone else is `forbidden`,
  before any debit, with nothing written but the refused call's audit row.
- Submitted jobs: status, log and cancel of another agent's job are `forbidden`.
- `mlflow_parent_run_id`: 32 hex characters, naming a run of the same agent (its
  host-written `forge.agent_id` tag: a sweep's parent run or one of its own jobs' runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    STAND_IN_TRAINER,
    count_rows,
    fake_code_repo,
)

from runner import tools
from runner.api import cancel_job, evaluate_candidate, job_log, job_status, train_model_version
from runner.errors import Forbidden, InvalidInput
from runner.registry import db, ledger, promotion, schema

REPO = Path(__file__).resolve().parents[1]
OWNER = "agent-bob"  # trained the candidate
OTHER = AGENT  # funded, and would like to decide it


def _audit(url: str, agent: str) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(schema.tool_calls.select().where(
            schema.tool_calls.c.agent_id == agent)).mappings()]


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if after[k] != before[k]}


# --- the gate -----------------------------------------------------------------------------------

# What the gate reads to rebuild the candidate's test pass.
TRAINING = {"seed": 0, "split_seed": None, "val_fraction": 0.1, "test_fraction": 0.1,
            "max_seq_len": 33, "batch_size": 32, "precision": "32"}


def _candidate_of(agent: str, artifact_id: str) -> str:
    """A candidate registered the way a finished job of `agent` registers it (hook)."""
    from runner.jobs.hook import RunRecord, register_model_version

    ledger.grant(agent, "1")
    alloc = ledger.reserve(agent, "0.5", f"own-{artifact_id}", wall_time_cap_min=60,
                           vram_cap_gb=1, price_per_hour="0.5")
    now = datetime.now(UTC)
    meta = {"family": "scgpt", "framework": "scgpt", "task": "finetune_celltype",
            "split": {"seed": 0, "counts": {"test": 40}, "sha256": {"test": "a" * 64}}}
    register_model_version(BASE_ID, RunRecord(
        artifact_id=artifact_id, title="bob's candidate", metadata=meta,
        dataset_artifact_id=DATASET_ID, agent_id=agent, allocation_id=alloc["id"],
        actual_seconds=36.0, code_repo_url="file:///stand-in", code_commit_sha="0" * 40,
        code_entrypoint="trainers.entrypoint", training_started_at=now,
        training_completed_at=now, training_params={"training": TRAINING},
        eval_metrics={"test_macro_f1": 0.5}, primary_metric="test_macro_f1",
        content_hash="b" * 64, mlflow_run_id="0" * 32, mlflow_model_uri=None, changelog=None))
    return artifact_id


def _decide_as(agent: str, candidate: str) -> None:
    """The decision `agent`'s own gate would record (its settlement included)."""
    from runner.config.gate import load_gate

    rules = load_gate("default")
    alloc = ledger.reserve(agent, "0.01", f"gate-{candidate}", wall_time_cap_min=1,
                           vram_cap_gb=1, price_per_hour="0.5", purpose="evaluation")
    promotion.record_decision(
        candidate_id=candidate, champion_id=BASE_ID, decision="rejected",
        notes="rejected by gate: below the parent", gate_name="default",
        gate_config=rules.to_dict(), gate_sha256=rules.sha256(), agent_id=agent,
        allocation_id=alloc["id"], actual_seconds=1.0, magnitude=None, detection={},
        rows=[{"comparator_artifact_id": BASE_ID, "comparator_role": "parent",
               "metric": "test_macro_f1", "candidate_value": 0.5, "comparator_value": 0.6,
               "delta": -0.1, "ci_low": -0.2, "ci_high": -0.05, "confidence": 0.95,
               "n_resamples": 1000, "n_cells": 40, "seed": 0, "reasons": None}])


def _refused(call, *args, **kw) -> Forbidden:
    with pytest.raises(Forbidden) as refused:
        call(*args, **kw)
    return refused.value


def test_a_foreign_candidate_is_forbidden_and_its_owner_gets_its_own_decision(sqlite_registry,
                                                                              tmp_path):
    cand = _candidate_of(OWNER, "model-bob-candidate")
    balance = ledger.balance(OTHER)
    before = count_rows(sqlite_registry)

    for kw in ({"dry_run": True}, {}):  # not even an estimate of another agent's gate
        error = _refused(evaluate_candidate, cand, OTHER, allow_dirty=True, **kw)
        assert error.field == "candidate_artifact_id" and OWNER not in str(error)
    with tools.acting_as(OTHER):  # over MCP, the token names the agent
        _refused(evaluate_candidate, cand, allow_dirty=True)
        _refused(evaluate_candidate, cand, OWNER, allow_dirty=True)  # naming the owner fails
    assert _changed(before, count_rows(sqlite_registry)) == {"tool_calls"}
    assert ledger.balance(OTHER) == balance
    assert {r["error_code"] for r in _audit(sqlite_registry, OTHER)} == {"forbidden"}
    assert promotion.recorded(cand) == []

    # The owner's decision is the owner's: read back by the owner and the operator only.
    _decide_as(OWNER, cand)
    _refused(evaluate_candidate, cand, OTHER, allow_dirty=True)
    with tools.acting_as(OTHER):
        _refused(evaluate_candidate, cand, allow_dirty=True)
    with tools.acting_as(OWNER):
        mine = evaluate_candidate(cand, allow_dirty=True)
    assert mine["recorded"] and mine["decision"] == "rejected"
    with tools.as_operator():  # the host's CLI: any candidate
        assert evaluate_candidate(cand, OTHER, allow_dirty=True)["decision"] == "rejected"
        with tools.acting_as(OTHER):  # an agent's call inside it is the agent's again
            _refused(evaluate_candidate, cand, allow_dirty=True)
    assert ledger.balance(OTHER) == balance

    shown = subprocess.run([sys.executable, "-m", "runner.cli", "gate", cand, "--agent", OTHER,
                            "--allow-dirty"], check=False, capture_output=True, text=True,
                           timeout=300,
                           env=dict(os.environ))
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"{cand}: REJECTED by gate 'default' (recorded earlier)" in shown.stdout


# --- submitted jobs -------------------------------------------------------------------------------

def test_another_agents_job_status_log_and_cancel_are_forbidden(sqlite_registry):
    ledger.grant(OWNER, "1")
    job = ledger.reserve(OWNER, "0.1", "bob-job", wall_time_cap_min=1, vram_cap_gb=1,
                         price_per_hour="0.5")
    for call in (job_status, job_log, cancel_job):
        _refused(call, job["id"], OTHER)
        with tools.acting_as(OTHER):
            _refused(call, job["id"])
            _refused(call, job["id"], OWNER)
    assert ledger.get_allocation(job["id"])["status"] == "reserved"
    assert len(_audit(sqlite_registry, OTHER)) == 9
    ledger.settle(job["id"], 0)


# --- mlflow_parent_run_id ---------------------------------------------------------------------

def _store():
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking

    track = to_plain(compose_config())["tracking"]
    client = tracking.client(track["tracking_uri"])
    return client, tracking.experiment_id(client, track["experiment_name"],
                                          Path(track["artifact_root"]))


def _sweep_run_of(agent: str) -> str:
    """A parent run as a sweep of `agent` opens it (runner/sweep.py)."""
    client, exp_id = _store()
    return client.create_run(exp_id, run_name=f"sweep-of-{agent}", tags={
        "forge.sweep": "true", "forge.agent_id": agent, "forge.sweep.jobs": "1"}).info.run_id


def _train(**kw) -> dict:
    return train_model_version(BASE_ID, DATASET_ID, agent_id=OTHER, wall_time_cap_min=5,
                               vram_cap_gb=1, allow_dirty=False, **kw)


@pytest.mark.parametrize("run_id", ["../../etc", "a" * 33, "A" * 32, "0" * 31, 7, ""])
def test_a_malformed_parent_run_id_is_refused_even_in_a_dry_run(sqlite_registry, run_id):
    with pytest.raises(InvalidInput) as bad:
        _train(mlflow_parent_run_id=run_id, dry_run=True, overrides=["training.max_epochs=1"])
    assert bad.value.field == "mlflow_parent_run_id"


@pytest.mark.sandbox
def test_a_foreign_parent_run_is_forbidden_before_the_debit(sqlite_registry, tmp_path,
                                                            monkeypatch):
    trainer = STAND_IN_TRAINER.replace("METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.6}')
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, trainer)))
    ledger.grant(OWNER, "1")
    theirs, mine = _sweep_run_of(OWNER), _sweep_run_of(OTHER)
    balance = ledger.balance(OTHER)
    before = count_rows(sqlite_registry)
    for foreign in (theirs, "f" * 32):  # another agent's run; a run that does not exist
        error = _refused(_train, mlflow_parent_run_id=foreign)
        assert error.field == "mlflow_parent_run_id"
    assert _changed(before, count_rows(sqlite_registry)) == {"tool_calls"}
    assert ledger.balance(OTHER) == balance

    result = _train(mlflow_parent_run_id=mine)  # its own sweep's run: nested under it
    client, exp_id = _store()
    assert client.get_run(result["mlflow"]["run_id"]).data.tags["mlflow.parentRunId"] == mine
    nested = _train(mlflow_parent_run_id=result["mlflow"]["run_id"],  # one of its own runs
                    overrides=["training.lr=0.0002"])
    assert client.get_run(nested["mlflow"]["run_id"]).data.tags["mlflow.parentRunId"] == \
        result["mlflow"]["run_id"]
    assert client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{theirs}'") == []


def test_a_runs_agent_is_read_from_the_store(scratch_tracking_uri):
    """The owner of a run on both stores (local SQLite and the MLflow server): its
    `forge.agent_id` tag while it lives; none for a missing or deleted run."""
    from runner.jobs import tracking

    client = tracking.client(scratch_tracking_uri)
    name = f"ownership-{os.getpid()}-{time.time_ns()}"  # the server is shared by the session
    exp_id = client.create_experiment(name)
    tagged = client.create_run(exp_id, tags={"forge.agent_id": OWNER}).info.run_id
    untagged = client.create_run(exp_id).info.run_id
    deleted = client.create_run(exp_id, tags={"forge.agent_id": OWNER}).info.run_id
    client.delete_run(deleted)
    assert tracking.run_agent(client, tagged) == OWNER
    assert tracking.run_agent(client, untagged) is None
    assert tracking.run_agent(client, deleted) is None
    assert tracking.run_agent(client, "f" * 32) is None


# --- over MCP: the connection names the agent ---------------------------------------------------

def test_over_mcp_a_foreign_candidate_and_parent_run_are_forbidden(sqlite_registry):
    """The official client, `forge mcp --agent` (stdio) bound to the other agent."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    cand, theirs = _candidate_of(OWNER, "model-bob-mcp"), _sweep_run_of(OWNER)
    balance = ledger.balance(OTHER)
    before = count_rows(sqlite_registry)
    train = {"parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
             "wall_time_cap_min": 5, "vram_cap_gb": 1}

    async def go() -> list[dict]:
        params = StdioServerParameters(command=sys.executable,
                                       args=["-m", "runner.cli", "mcp", "--agent", OTHER],
                                       env=dict(os.environ), cwd=str(REPO))
        async with Client(params, read_timeout_seconds=120) as client:
            calls = [("evaluate_candidate", {"candidate_artifact_id": cand}),
                     ("evaluate_candidate", {"candidate_artifact_id": cand, "dry_run": True}),
                     ("train_model_version", {**train, "mlflow_parent_run_id": theirs}),
                     ("train_model_version", {**train, "mlflow_parent_run_id": "../" * 11})]
            out = []
            for name, arguments in calls:
                result = await client.call_tool(name, arguments)
                assert result.is_error, result.structured_content
                out.append(result.structured_content)
            return out

    gate, gate_dry, nested, malformed = anyio.run(go)
    assert gate["reason"] == gate_dry["reason"] == "forbidden"
    assert gate["field"] == "candidate_artifact_id"
    assert nested["reason"] == "forbidden" and nested["field"] == "mlflow_parent_run_id"
    assert malformed["reason"] == "schema_violation"
    assert malformed["field"] == "mlflow_parent_run_id"
    assert _changed(before, count_rows(sqlite_registry)) == {"tool_calls"}
    assert ledger.balance(OTHER) == balance and promotion.recorded(cand) == []
    assert [r["error_code"] for r in _audit(sqlite_registry, OTHER)] == [
        "forbidden", "forbidden", "forbidden", "schema_violation"]
