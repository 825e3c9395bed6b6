"""train_model_version() end to end: real sandbox, real MLflow store, real registry.

One real fine-tune (tiny scGPT base, real CBMC cells, a few batches) checks the whole chain,
on SQLite and PostgreSQL, tracked into the local store and into an MLflow tracking server.
The failure paths use stand-in trainers committed to a scratch git repository (the code pin
points at it through FORGE_CODE_REPO), so each runs in the real sandbox in about a second:
a crash, a missing or malformed result.json, NaN metrics, a timeout, and a database error at
registration. Each must leave the books balanced, the MLflow run FAILED and no candidate.
"""

from __future__ import annotations

import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    STAND_IN_TRAINER,
    TINY,
    assert_on_server,
    count_rows,
    fake_code_repo,
)

from runner.api import train_model_version
from runner.errors import ForgeError, RegistrationFailed, TrainingFailed
from runner.jobs import weights
from runner.jobs.job import run_dir
from runner.registry import catalog, db, ledger, recovery, schema

REPO = Path(__file__).resolve().parents[1]


def _train(**kw):
    args = dict(agent_id=AGENT, wall_time_cap_min=5, vram_cap_gb=1, overrides=TINY,
                allow_dirty=True)
    args.update(kw)
    return train_model_version(BASE_ID, DATASET_ID, **args)


def _rows(url: str, table: sa.Table) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


def _tracking_uri() -> str:
    """Where the operator's config tracks runs (the local store or the server)."""
    from runner.config.compose import compose_config, to_plain

    return to_plain(compose_config())["tracking"]["tracking_uri"]


def _mlflow_run(run_id: str):
    from runner.jobs import tracking

    client = tracking.client(_tracking_uri())
    return client.get_run(run_id), client


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_real_finetune_registers_a_linked_candidate(registry, tracking_store, committed_code,
                                                    monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    result = _train(allow_dirty=False)

    art = catalog.get_model_version(result["artifact_id"])
    assert art["artifact_type"] == "model" and art["parent_version_id"] == BASE_ID
    assert art["version_number"] == 2 and result["version_number"] == 2
    assert art["lifecycle_state"] == "candidate" and art["is_latest"] is False
    version = art["version"]
    assert version["code_commit_sha"] == head == result["code_commit_sha"]
    assert version["code_entrypoint"] == "trainers.entrypoint"
    assert version["promotion_state"] == "candidate"
    assert version["training_dataset_artifact_id"] == DATASET_ID

    alloc = ledger.get_allocation(version["gpu_allocation_id"])
    assert alloc["status"] == "settled" and alloc["artifact_id"] == result["artifact_id"]
    # Debited before the sandbox started (all three stamps come from the same database).
    assert alloc["debited_at"] <= alloc["started_at"] <= version["training_started_at"]
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert Decimal(result["cost"]["estimated"]) == Decimal("0.041667")  # 5 min at 0.50/h

    metrics = result["eval_metrics"]
    own = {k: v for k, v in metrics.items() if k not in ("baseline", "training")}
    assert own and all(isinstance(v, float) for v in own.values())
    assert "test_macro_f1" in metrics["baseline"] and "epochs_trained" in metrics["training"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test_macro_f1" in metrics

    wmi = _rows(registry, schema.world_model_improvements)
    assert [(w["event_type"], w["target_artifact_id"]) for w in wmi] == \
        [("model_version_trained", result["artifact_id"])]
    assert [e["type"] for e in _rows(registry, schema.events)] == ["model_version_trained"]
    calls = [c for c in _rows(registry, schema.tool_calls) if c["success"]]
    assert calls[-1]["agent_id"] == AGENT
    assert calls[-1]["output_summary"]["artifact_id"] == result["artifact_id"]

    run, client = _mlflow_run(result["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["forge.parent_artifact_id"] == BASE_ID
    assert run.data.tags["mlflow.source.git.commit"] == head
    history = client.get_metric_history(run.info.run_id, "train_loss_epoch") or \
        client.get_metric_history(run.info.run_id, "val_loss")
    assert history, sorted(run.data.metrics)
    mv = client.get_model_version(result["mlflow"]["registered_model"],
                                  result["mlflow"]["version"])
    assert mv.tags["forge.artifact_id"] == result["artifact_id"]
    assert mv.tags["forge.lifecycle_state"] == "candidate"
    assert run.data.params["training.max_epochs"] == "1"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [DATASET_ID]
    [output] = run.outputs.model_outputs
    assert mv.source == f"models:/{output.model_id}"
    if tracking_store.server:
        _tracked_on_the_server(tracking_store, client, run, result, version["gpu_allocation_id"])
    assert (weights.weights_dir(result["artifact_id"]) / "best_model.pt").is_file()
    assert recovery.check() == []

    # The same request again: the earlier result, no second debit, no second version.
    before = count_rows(registry)
    assert _train(allow_dirty=False)["artifact_id"] == result["artifact_id"]
    after = count_rows(registry)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"tool_calls": 1}


def _tracked_on_the_server(store, client, run, result: dict, allocation_id: str) -> None:
    """Everything the host tracked is on the server: the run page the caller is pointed at,
    the run's files and the logged model uploaded through the server into its artifact
    destination; and the job was never told where the server is."""
    server = store.server
    assert result["mlflow_url"] == (f"{server.url}/#/experiments/{run.info.experiment_id}"
                                    f"/runs/{run.info.run_id}")
    assert_on_server(store, client, run.info.run_id, files=("config/resolved.yaml", "job.log"))
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert model.artifact_location.startswith("mlflow-artifacts:/"), model.artifact_location
    model_dir = server.artifacts / model.artifact_location.removeprefix("mlflow-artifacts:/")
    assert (model_dir / "MLmodel").is_file()
    assert (model_dir / "artifacts" / "checkpoint" / "best_model.pt").is_file()
    manifest = (run_dir(allocation_id) / "manifest.json").read_text()
    for leak in (server.url, f"127.0.0.1:{server.port}", "tracking_uri", "mlflow-artifacts",
                 "postgresql"):
        assert leak not in manifest, leak


# The job checks itself, inside the jail: no MLflow or database setting in its environment
# (the host's has some), nothing of the tracking store in its manifest. Then it logs a metric
# point to its stream, which only the host's relay can carry to the run.
NO_TRACKING_CHECK = """
    import json, os, sys
    text = open(sys.argv[1]).read()
    leaks = sorted(k for k, v in os.environ.items() if any(w in v for w in WORDS) or k.startswith(
        ("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "FORGE_DB", "FORGE_MLFLOW", "PG")))
    leaks += [w for w in WORDS + ["tracking_uri", "mlflow-artifacts"] if w in text]
    if leaks:
        raise SystemExit(f"the job sees tracking settings: {leaks}")
    print(f"no tracking settings: {len(os.environ)} env keys, manifest of {len(text)} bytes")
    with open(json.loads(text)["metrics_path"], "a") as f:
        f.write(json.dumps({"key": "train_loss", "value": 0.75, "step": 1}) + "\\n")
"""


@pytest.mark.sandbox
def test_the_job_gets_no_tracking_uri_and_its_metrics_are_relayed(sqlite_registry, tracking_store,
                                                                   tmp_path, monkeypatch):
    uri = _tracking_uri()
    words = [uri, "postgresql", "secret-token"]
    if tracking_store.server:
        words += [f"127.0.0.1:{tracking_store.server.port}"]
    trainer = NO_TRACKING_CHECK.replace("WORDS", repr(words)) + STAND_IN_TRAINER.replace(
        "METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.6}')
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, trainer)))
    # What a host's shell may hold: never the job's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret-token")
    result = _train(allow_dirty=False)

    alloc = ledger.get_allocation(catalog.get_model_version(result["artifact_id"])["version"]
                                  ["gpu_allocation_id"])
    assert "no tracking settings" in (run_dir(alloc["id"]) / "job.log").read_text()
    manifest = (run_dir(alloc["id"]) / "manifest.json").read_text()
    assert not [w for w in words + ["tracking_uri"] if w in manifest]
    run, client = _mlflow_run(result["mlflow"]["run_id"])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] \
        == [(1, 0.75)]  # relayed by the host
    if tracking_store.server:
        assert uri == tracking_store.server.url
        folder = assert_on_server(tracking_store, client, run.info.run_id, files=("job.log",))
        assert "no tracking settings" in (folder / "job.log").read_text()
    else:
        assert uri.startswith("sqlite:///")


# --- failure paths, with stand-in trainers --------------------------------------------------

FAKES = {
    "crash": "raise SystemExit('trainer blew up')",
    "missing_result": "print('no result written')",
    "malformed_result": "import json, sys; open(json.load(open(sys.argv[1]))['output_dir'] + "
                        "'/result.json', 'w').write('{not json')",
    "nan_metrics": STAND_IN_TRAINER.replace("METRICS", '{"test_macro_f1": float("nan")}'),
    "empty_metrics": STAND_IN_TRAINER.replace("METRICS", "{}"),
    "timeout": "import time; time.sleep(600)",
    "db_error": STAND_IN_TRAINER.replace("METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.6}'),
}


@pytest.mark.parametrize("case", sorted(FAKES))
@pytest.mark.sandbox
def test_failures_settle_once_and_register_nothing(registry, tmp_path, monkeypatch, case):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, FAKES[case])))
    if case == "timeout":
        from runner import sandbox

        real = sandbox.gpu_launch

        def short_cap(job, **kw):
            job.wall_time_cap_s, job.grace_s = 2.0, 1.0  # the real cap logic, shorter
            return real(job, **kw)

        monkeypatch.setattr(sandbox, "gpu_launch", short_cap)
    if case == "db_error":
        def broken(*_a, **_k):  # a registration the registry refuses; one it cannot answer is
        # kept as an intent (tests/test_security_registration.py)
            raise sa.exc.IntegrityError("INSERT INTO artifact_links", {}, Exception("refused"))

        monkeypatch.setattr(catalog, "_write_links", broken)
    balance = ledger.balance(AGENT)

    with pytest.raises(ForgeError) as err:
        _train(allow_dirty=False)
    assert isinstance(err.value, RegistrationFailed if case == "db_error" else TrainingFailed)
    expected = {"crash": "error", "timeout": "timeout", "nan_metrics": "nan_metrics",
                "empty_metrics": "empty_metrics", "missing_result": "missing_result",
                "malformed_result": "malformed_result", "db_error": "registration_failed"}
    assert err.value.reason == expected[case]

    allocs = _rows(registry, schema.resource_allocations)
    assert len(allocs) == 1 and allocs[0]["status"] == "failed"
    alloc = allocs[0]
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert ledger.balance(AGENT) == balance - alloc["actual_cost"]
    assert recovery.check() == []
    assert [a["id"] for a in catalog.list_artifacts("model")] == [BASE_ID]
    assert not _rows(registry, schema.world_model_improvements)
    run, _ = _mlflow_run(alloc["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["forge.outcome"] == expected[case]
    assert not list((weights.weights_dir("x").parent.parent).glob("scgpt-*"))
    failed_call = _rows(registry, schema.tool_calls)[-1]
    assert failed_call["success"] is False and failed_call["error_code"] == expected[case]


@pytest.mark.sandbox
def test_a_failed_request_can_be_retried_with_its_own_debit(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, FAKES["crash"])))
    for _ in range(2):
        with pytest.raises(TrainingFailed):
            _train(allow_dirty=False)
    allocs = _rows(registry, schema.resource_allocations)
    assert [a["status"] for a in allocs] == ["failed", "failed"]
    assert len({a["request_key"] for a in allocs}) == 2  # the first gave its key up
    assert recovery.check() == []
