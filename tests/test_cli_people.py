"""`forge` for people (issue 27): tables for models, datasets and the audit trail; every
command ends with a "next:" line and gives machines the dict with --json; unknown ids get
"did you mean"; tables and ids are never wrapped in a pipe. Real registry (SQLite and
PostgreSQL), real tool calls for the audit rows, click's runner and a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main as forge
from runner.errors import NotFound
from runner.registry import catalog, db

SHA = "a" * 64
CITATION = {"source": "GEO", "external_id": "GSE100866", "license": "public domain",
            "format": "mat", "row_count": 8617, "schema_summary": "8617 cells x 500 genes",
            "sha256": SHA, "url": "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE100866",
            "title": "CBMC", "doi": "10.1038/nmeth.4380"}
META = {"family": "scgpt", "framework": "scgpt", "task": "finetune_celltype",
        "architecture": {"n_layers": 2, "d_model": 32}}
OUTSIDE = {"origin_type": "external", "origin_url": "file:///weights/x"}
DATASET = "dataset-geo-GSE100866"


def _versions() -> tuple[str, str]:
    """A base, a candidate and a rejected fine-tune of it, on the CBMC dataset."""
    catalog.register_dataset(DATASET, "CBMC CITE-seq", CITATION)
    catalog.register_model(artifact_id="model-cbmc-base", title="base", metadata=META,
                           created_by="t", content_hash=SHA, **OUTSIDE)
    ids = []
    for f1 in (0.81, 0.42):
        row = catalog.register_model(
            title="ft", metadata=META, created_by="t", parent_artifact_id="model-cbmc-base",
            training_dataset_artifact_id=DATASET, **OUTSIDE,
            version={"eval_metrics_json": {"test_macro_f1": f1, "test_accuracy": 0.9}})
        ids.append(row["id"])
    with db.transaction() as conn:
        art = catalog.get_artifact(ids[1], conn=conn)
        catalog.set_lifecycle(conn, art, "rejected", db.now(), "gate", "worse",
                              promotion_state="rejected")
    return ids[0], ids[1]


def run(*args: str):
    result = CliRunner().invoke(forge, list(args))
    return result


def test_models_list_is_a_table_with_rejected_versions_and_a_next_line(db_url):
    candidate, rejected = _versions()
    out = run("models", "list")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["id", "family", "v", "state", "dataset", "primary", "metric",
                                "created", "(UTC)"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {"model-cbmc-base", candidate, rejected}
    assert rows[rejected].split()[1:5] == ["scgpt", "2", "rejected", DATASET]
    assert "test_macro_f1 0.4200" in rows[rejected]
    assert rows[candidate].split()[3] == "candidate" and "test_macro_f1 0.8100" in \
        rows[candidate]
    assert lines[-1].startswith("next: forge models show ")

    listed = json.loads(run("models", "list", "--json").output)
    assert {r["id"]: r["promotion_state"] for r in listed}[rejected] == "rejected"


def test_models_show_for_people_and_json_for_machines(db_url):
    candidate, _ = _versions()
    out = run("models", "show", candidate)
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"{candidate}: ft\n")
    assert "state:          candidate" in out.output
    assert "parent:         model-cbmc-base" in out.output
    last = out.output.splitlines()[-1]  # a candidate: gate it (as the agent that trained it)
    assert last.startswith(f"next: forge gate {candidate} --agent ")
    assert last.endswith(f"   or   forge lineage {candidate}")
    shown = json.loads(run("models", "show", candidate, "--json").output)
    assert shown["version"]["promotion_state"] == "candidate"
    assert {link["link_type"] for link in shown["links"]} == {"derives_from", "trained_on"}

    chain = run("lineage", candidate)
    assert chain.exit_code == 0
    assert chain.output.splitlines()[:2] == ["model-cbmc-base v1  active external",
                                             f"  └─ {candidate} v2  candidate external"]
    assert [r["id"] for r in json.loads(run("lineage", candidate, "--json").output)] == [
        "model-cbmc-base", candidate]


def test_unknown_ids_get_did_you_mean(db_url):
    _versions()
    out = run("models", "show", "model-cbmc-bsae")
    assert out.exit_code == 2
    assert out.output.startswith("error: NotFound: model 'model-cbmc-bsae' does not exist")
    assert "did you mean 'model-cbmc-base'?" in out.output and "forge models list" in out.output
    with pytest.raises(NotFound) as err:  # a dataset's id is no suggestion for a model
        catalog.get_artifact("dataset-geo-GSE10086", kind="model")
    assert "did you mean" not in err.value.fix
    with pytest.raises(NotFound) as err:
        catalog.get_artifact("dataset-geo-GSE10086", kind="dataset")
    assert err.value.details["did_you_mean"] == [DATASET]
    assert "forge datasets list" in err.value.fix
    with pytest.raises(NotFound) as err:  # the API's callers get the same hint
        catalog.register_model(title="x", metadata=META, created_by="t", **OUTSIDE,
                               parent_artifact_id="model-cbmc-bas")
    assert err.value.field == "parent_artifact_id" and "'model-cbmc-base'" in err.value.fix


def test_datasets_list_and_the_empty_tables(db_url):
    empty = run("models", "list")
    assert empty.exit_code == 0 and empty.output.startswith("no models registered yet\n")
    assert run("datasets", "list").output.startswith("no datasets registered yet\n")
    _versions()
    out = run("datasets", "list")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[1].split()[:1] == [DATASET]
    assert "GEO" in out.output and out.output.splitlines()[-1].startswith("next: ")
    assert json.loads(run("datasets", "list", "--json").output)[0]["id"] == DATASET


def test_tools_calls_is_the_audit_trail(db_url):
    from runner.api import describe_options, job_status

    describe_options()
    with pytest.raises(Exception):  # noqa: B017 - any refusal: its audit row is the point
        job_status("job-nope", "agent-a")
    out = run("tools", "calls")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["when", "(UTC)", "agent", "tool", "status", "duration"]
    assert len(lines) == 4  # header, two calls (newest first), next
    assert "agent-a" in lines[1] and "error" in lines[1] and "ms" in lines[1]
    assert "ok" in lines[2]
    assert lines[-1] == "next: forge jobs list --agent agent-a"
    mine = json.loads(run("tools", "calls", "--agent", "agent-a", "--json").output)
    assert len(mine) == 1 and mine[0]["success"] is False and mine[0]["tool"]
    assert len(json.loads(run("tools", "calls", "--limit", "1", "--json").output)) == 1
    assert run("tools", "calls", "--limit", "0").exit_code == 2  # click's range check


def test_every_command_ends_with_a_next_line(db_url):
    _versions()
    for args in (["db", "upgrade"], ["ledger", "grant", "a1", "2"], ["ledger", "balance", "a1"],
                 ["ledger", "check"], ["ledger", "reap"], ["jobs", "list"],
                 ["agents", "list"], ["benchmarks", "list"], ["tools", "register"]):
        out = run(*args)
        assert out.exit_code == 0, (args, out.output)
        assert out.output.splitlines()[-1].startswith("next: forge "), (args, out.output)
    assert json.loads(run("ledger", "grant", "a1", "1", "--json").output)["balance"] == "3.00"
    assert json.loads(run("ledger", "check", "--json").output) == {"ok": True, "problems": []}


def test_tables_are_never_wrapped_in_a_pipe(sqlite_url):
    """A real `forge models list | cat` in a narrow terminal: every row is one line."""
    long_id = "model-" + "x" * 100
    catalog.register_model(artifact_id=long_id, title="t", metadata=META, created_by="t",
                           content_hash=SHA, **OUTSIDE)
    env = {**os.environ, "COLUMNS": "40"}
    out = subprocess.run([str(Path(sys.executable).with_name("forge")), "models", "list"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert long_id in out.stdout.splitlines()[1]  # whole, on its row


def test_the_demos_messages_never_wrap_a_command(monkeypatch):
    """The demo's console (stderr, piped in CI and by `... | cat`) keeps a long command and
    an error's fix on one line each, whatever the terminal's width."""
    from runner import demo

    monkeypatch.setattr(demo.console, "width", 40)
    command = "  .venv/bin/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db " \
              "--workers 1 --port 5000   # then open http://127.0.0.1:5000/#/experiments/1"
    with demo.console.capture() as captured:
        demo.console.print(f"done. Browse runs:\n{command}")
        demo.console.print("[red]error[/]: NoForgeHome: " + "x" * 80)
    assert captured.get().splitlines() == ["done. Browse runs:", command,
                                           "error: NoForgeHome: " + "x" * 80]
