"""The registry on SQLite and PostgreSQL: migrations, catalog semantics, bad input."""

from __future__ import annotations

from decimal import Decimal

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import count_rows

from runner.cli import main as forge
from runner.errors import (
    ForgeError,
    InvalidArtifactId,
    NotFound,
    SchemaViolation,
    WrongArtifactType,
)
from runner.registry import catalog, db, improvements, schema

SHA = "a" * 64
CITATION = {
    "source": "GEO", "external_id": "GSE100866",
    "url": "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE100866",
    "license": "public domain", "format": "mat", "row_count": 8617,
    "schema_summary": "cells x 500 genes, UMI counts, 13 labels", "sha256": SHA,
    "doi": "10.1038/nmeth.4380",
}
# A version whose weights came from outside (no training record of ours to require).
OUTSIDE = {"origin_type": "external", "origin_url": "file:///weights/x"}
META = {"family": "scgpt", "framework": "scgpt", "task": "external",
        "architecture": {"n_layers": 2, "d_model": 32}}


def _base(**kw):
    args = dict(artifact_id="model-base", title="base", metadata=META, created_by="test",
                origin_type="external", origin_url="file:///weights/base", content_hash=SHA)
    args.update(kw)
    return catalog.register_model(**args)


def _dataset():
    return catalog.register_dataset("dataset-geo-GSE100866", "CBMC CITE-seq", CITATION)


def test_upgrade_creates_every_table_and_is_idempotent(db_url):
    engine = db.get_engine(db_url)
    names = set(sa.inspect(engine).get_table_names())
    assert {t.name for t in schema.ALL_TABLES} <= names
    before = {t: sa.inspect(engine).get_columns(t) for t in sorted(names)}
    assert db.upgrade(db_url) == "0009"  # 0009: the registry-scale indices
    after = {t: sa.inspect(db.get_engine(db_url)).get_columns(t) for t in sorted(names)}
    assert [c["name"] for t in before for c in before[t]] == \
        [c["name"] for t in after for c in after[t]]


def test_migrations_match_the_metadata(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []


def test_money_round_trips_exactly(db_url):
    amount = Decimal("0.000001") * 3 + Decimal("1234567.1")
    with db.get_engine(db_url).begin() as conn:
        conn.execute(schema.token_accounts.insert().values(
            account_id="a1", balance=amount, created_at=catalog.now(), updated_at=catalog.now()))
        got = conn.execute(sa.select(schema.token_accounts.c.balance)).scalar_one()
    assert got == amount and isinstance(got, Decimal)


def test_trained_version_semantics_and_lineage(db_url):
    _dataset()
    base = _base()
    assert (base["version_number"], base["lifecycle_state"], base["is_latest"]) == \
        (1, "active", True)
    child = catalog.register_model(
        title="ft", metadata={**META, "task": "finetune_celltype"}, created_by="agent-1",
        parent_artifact_id="model-base", training_dataset_artifact_id="dataset-geo-GSE100866",
        origin_type="external", origin_url="file:///weights/ft", content_hash="b" * 64,
        version={"code_commit_sha": "c" * 40, "eval_metrics_json": {"test_accuracy": 0.9}})
    got = catalog.get_model_version(child["id"])
    assert got["version_number"] == 2 and got["parent_version_id"] == "model-base"
    assert got["lifecycle_state"] == "candidate" and got["is_latest"] is False
    assert got["version"]["promotion_state"] == "candidate"
    assert got["version"]["eval_metrics_json"] == {"test_accuracy": 0.9}
    assert {(link["link_type"], link["target_id"]) for link in catalog.links(child["id"])} == {
        ("derives_from", "model-base"), ("trained_on", "dataset-geo-GSE100866")}
    grandchild = catalog.register_model(title="ft2", metadata=META, created_by="a",
                                        parent_artifact_id=child["id"], **OUTSIDE)
    assert [r["id"] for r in catalog.lineage(grandchild["id"])] == \
        ["model-base", child["id"], grandchild["id"]]
    assert grandchild["version_number"] == 3
    # base_model_id is the root of the lineage, not the immediate parent.
    assert catalog.get_model_version(grandchild["id"])["version"]["base_model_id"] == "model-base"


BAD_IDS = ["../x", "", "a" * 200, "it's", 'say"hi"', "a/b", "a\\b", "nul\x00byte", ".hidden",
           "-flag", "sp ace", 42]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_are_refused_before_any_write(db_url, bad):
    _base()
    before = count_rows(db_url)
    with pytest.raises(InvalidArtifactId) as err:
        catalog.register_model(title="x", metadata=META, created_by="t", artifact_id=bad)
    assert err.value.field == "artifact_id" and "A-Z" in err.value.fix
    with pytest.raises(InvalidArtifactId) as err:
        catalog.register_model(title="x", metadata=META, created_by="t", parent_artifact_id=bad)
    assert err.value.field == "parent_artifact_id"
    with pytest.raises(InvalidArtifactId):
        catalog.register_dataset(bad, "d", CITATION)
    with pytest.raises(InvalidArtifactId):
        catalog.lineage(bad)
    assert count_rows(db_url) == before


@pytest.mark.parametrize("case", ["unknown_parent", "parent_not_model", "dataset_not_dataset",
                                  "bad_metadata", "missing_family", "bad_hash", "no_origin",
                                  "untrained"])
def test_bad_registrations_write_nothing(db_url, case):
    _dataset()
    _base()
    before = count_rows(db_url)
    kw = dict(title="x", metadata=META, created_by="t", parent_artifact_id="model-base")
    expected = {"unknown_parent": (NotFound, "parent_artifact_id"),
                "parent_not_model": (WrongArtifactType, "parent_artifact_id"),
                "dataset_not_dataset": (WrongArtifactType, "training_dataset_artifact_id"),
                "bad_metadata": (SchemaViolation, "metadata.architecture.n_layers"),
                "missing_family": (SchemaViolation, "metadata.family"),
                "bad_hash": (SchemaViolation, "content_hash"),
                "no_origin": (SchemaViolation, "origin_url"),
                # trained here (internal, with a parent) but without code pin, allocation,
                # metrics or weights hash: the catalog refuses it
                "untrained": (SchemaViolation, "code_repo_url")}[case]
    if case == "unknown_parent":
        kw["parent_artifact_id"] = "model-nope"
    elif case == "parent_not_model":
        kw["parent_artifact_id"] = "dataset-geo-GSE100866"
    elif case == "dataset_not_dataset":
        kw["training_dataset_artifact_id"] = "model-base"
    elif case == "bad_metadata":
        kw["metadata"] = {**META, "architecture": {"n_layers": "four"}}
    elif case == "missing_family":
        kw["metadata"] = {"framework": "scgpt"}
    elif case == "bad_hash":
        kw["content_hash"] = "not-a-hash"
    elif case == "no_origin":
        kw.update(origin_type="external", parent_artifact_id=None)
    with pytest.raises(expected[0]) as err:
        catalog.register_model(**kw)
    assert err.value.field == expected[1] and err.value.fix
    assert isinstance(err.value, ForgeError)
    assert count_rows(db_url) == before


@pytest.mark.parametrize("missing", ["source", "license", "sha256", "row_count"])
def test_dataset_without_citation_fields_is_refused(db_url, missing):
    before = count_rows(db_url)
    citation = {k: v for k, v in CITATION.items() if k != missing}
    with pytest.raises(SchemaViolation) as err:
        catalog.register_dataset("dataset-x", "x", citation)
    assert err.value.field == f"citation.{missing}"
    assert count_rows(db_url) == before


def test_dataset_registration_is_idempotent(db_url):
    _dataset()
    before = count_rows(db_url)
    _dataset()
    assert count_rows(db_url) == before
    with pytest.raises(ForgeError):
        catalog.register_dataset("dataset-geo-GSE100866", "x", {**CITATION, "sha256": "b" * 64})


def test_failure_after_first_insert_leaves_no_row(db_url, monkeypatch):
    _dataset()
    _base()
    before = count_rows(db_url)

    def explode(*_a, **_k):
        raise RuntimeError("injected failure after the artifacts and model_versions inserts")

    monkeypatch.setattr(catalog, "_write_links", explode)
    with pytest.raises(RuntimeError, match="injected"):
        catalog.register_model(title="x", metadata=META, created_by="t",
                               parent_artifact_id="model-base",
                               training_dataset_artifact_id="dataset-geo-GSE100866", **OUTSIDE)
    assert count_rows(db_url) == before


def _trained(**kw):
    from runner.registry import ledger

    ledger.grant("agent-1", "10")
    alloc = ledger.reserve("agent-1", Decimal("1"), "k1", wall_time_cap_min=60, vram_cap_gb=1,
                           price_per_hour=Decimal("1"))
    metrics = {"test_accuracy": 0.9}
    args = dict(parent_artifact_id="model-base", dataset_artifact_id="dataset-geo-GSE100866",
                artifact_id="model-ft", title="ft", metadata=META, created_by="agent-1",
                content_hash="b" * 64, changelog="fine-tuned",
                version={"code_repo_url": "file:///code", "code_commit_sha": "c" * 40,
                         "gpu_allocation_id": alloc["id"], "eval_metrics_json": metrics},
                magnitude=0.05, detection={"primary_metric": "test_accuracy", "value": 0.9},
                cost=Decimal("0.25"))
    return catalog.register_trained_version(**{**args, **kw})


def test_a_trained_version_is_registered_and_published_in_one_transaction(db_url, monkeypatch):
    _dataset()
    _base()
    before = count_rows(db_url)
    real_insert = schema.events.insert

    def no_event():
        raise RuntimeError("injected failure at the events row, the last write")

    monkeypatch.setattr(schema.events, "insert", no_event)
    with pytest.raises(RuntimeError, match="injected"):
        _trained()
    grew = {k for k, v in count_rows(db_url).items() if v != before[k]}
    assert grew == {"token_accounts", "token_ledger", "resource_allocations"}  # _trained's
    monkeypatch.setattr(schema.events, "insert", real_insert)

    model = _trained(artifact_id="model-ft2")
    assert model["lifecycle_state"] == "candidate" and model["version_number"] == 2
    with db.get_engine(db_url).connect() as conn:
        [wmi] = conn.execute(sa.select(schema.world_model_improvements)).mappings().all()
        [event] = conn.execute(sa.select(schema.events)).mappings().all()
    assert wmi["target_artifact_id"] == "model-ft2" and wmi["magnitude"] == pytest.approx(0.05)
    assert wmi["event_type"] == event["type"] == "model_version_trained"
    assert wmi["detection_metadata"] == {"primary_metric": "test_accuracy", "value": 0.9,
                                         "payout_reason": improvements.payout(
                                             wmi["event_type"], 0.05)[1]}
    # training is logged as work: the agent, the allocation, its cost; paid only on promotion
    assert wmi["payout_status"] == "ineligible" and wmi["agent_id"] == "agent-1"
    assert wmi["allocation_id"] == model["version"]["gpu_allocation_id"]
    assert wmi["cost"] == Decimal("0.25")
    assert event["payload"] == {"artifact_id": "model-ft2", "version_number": 2,
                                "parent_artifact_id": "model-base",
                                "eval_metrics": {"test_accuracy": 0.9},
                                "primary_metric": "test_accuracy", "value": 0.9}
    assert {link["link_type"] for link in catalog.links("model-ft2")} == {"derives_from",
                                                                           "trained_on"}


def test_an_unreadable_registry_is_a_typed_error(tmp_path):
    (tmp_path / "never-migrated.db").touch()  # there, but never migrated
    url = f"sqlite:///{tmp_path / 'never-migrated.db'}"
    try:
        with pytest.raises(sa.exc.OperationalError) as err:
            catalog.list_artifacts("model", conn=db.get_engine(url).connect())
    finally:
        db._engine.cache_clear()
    typed = db.unavailable(err.value)
    assert isinstance(typed, db.DatabaseError) and typed.reason == "database_error"
    assert "cannot read the registry: no such table: artifacts" in str(typed)
    assert db.unavailable(ValueError("not a driver error")) is None


def test_only_the_registry_talks_sql_and_it_imports_nothing_above_it():
    """runner/registry/ is the bottom layer: SQLAlchemy, Alembic and the drivers stay inside
    it, and it imports no runner module but its own, runner.errors and runner.settings."""
    import ast
    from pathlib import Path

    import runner

    root = Path(runner.__file__).parent
    sql = ("sqlalchemy", "alembic", "psycopg", "sqlite3")
    below = ("runner.registry", "runner.errors", "runner.settings")
    problems = []
    for path in sorted(root.rglob("*.py")):
        inside = path.is_relative_to(root / "registry")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if not inside and name.split(".")[0] in sql:
                    problems.append(f"{path.relative_to(root)} imports {name}")
                if inside and name.startswith("runner.") and not name.startswith(below):
                    problems.append(f"{path.relative_to(root)} imports {name}")
    assert problems == []


def test_cli(db_url):
    _dataset()
    _base()
    child = catalog.register_model(title="ft", metadata=META, created_by="t",
                                   parent_artifact_id="model-base", **OUTSIDE)
    runner = CliRunner()
    result = runner.invoke(forge, ["db", "upgrade"])
    assert result.exit_code == 0 and "0009" in result.output
    result = runner.invoke(forge, ["models", "show", child["id"], "--json"])
    assert result.exit_code == 0 and '"version_number": 2' in result.output
    result = runner.invoke(forge, ["lineage", child["id"]])
    assert result.exit_code == 0
    assert result.output.index("model-base") < result.output.index(child["id"])
    result = runner.invoke(forge, ["datasets", "list"])
    assert result.exit_code == 0 and "GEO" in result.output
    result = runner.invoke(forge, ["datasets", "list", "--json"])
    assert result.exit_code == 0 and '"id": "dataset-geo-GSE100866"' in result.output
    result = runner.invoke(forge, ["models", "show", "../etc"])
    assert result.exit_code == 2 and "InvalidArtifactId" in result.output
