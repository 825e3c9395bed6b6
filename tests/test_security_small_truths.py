"""Small truths (issue 25, part 5): records that agree with what happened.

- `db.upgrade()` in Python writes the skills rows, as `forge db upgrade` does, so the audit
  rows of a Python-only setup link to their skill.
- A parent in a lifecycle state the operator's `policy.parent_states` leaves out (by default
  `rejected`, `superseded`, ...) is refused as `parent_state`, in the dry run and before any
  debit in the real call.
- The allow_dirty patch is an artifact of the version (`code.diff` in its folder) and of its
  MLflow run (`code/code.diff`), and the version's metadata names it without a host path.
- `detail_url` is the `forge serve` page of the new version (tracking.site_url, default
  http://127.0.0.1:8765); the MLflow run page comes beside it as `mlflow_url`.

Real SQLite registry, real bwrap, real MLflow store; a stand-in trainer where the trainer is
not what is under test.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    STAND_IN_TRAINER,
    fake_code_repo,
    forget_engine,
    operator_conf,
)

from runner.api import SKILLS, describe_options, train_model_version
from runner.errors import ForgeError
from runner.jobs import tracking, weights
from runner.registry import catalog, db, ledger, schema

TINY = dict(agent_id=AGENT, wall_time_cap_min=5, vram_cap_gb=1)
# masked gene modelling: the job's own numbers are recorded (a fine-tune's are the host's,
# measured from predictions this stand-in does not make)
METRICS = '{"test_mse": 0.5, "test_loss": 0.5}'


def rows(url: str, table: sa.Table) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


def _tracking() -> dict:
    from runner.config.compose import compose_config, to_plain

    return to_plain(compose_config())["tracking"]


# --- db.upgrade() registers the skills ------------------------------------------------------------

def test_db_upgrade_in_python_writes_the_skills_and_audit_rows_link_to_them(tmp_path,
                                                                           monkeypatch):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("FORGE_DB_URL", url)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    try:
        assert db.upgrade() == db.current_revision()
        assert {r["id"] for r in rows(url, schema.skills)} == {s.id for s in SKILLS}
        assert db.upgrade() == db.current_revision()  # idempotent: no second set of rows
        assert len(rows(url, schema.skills)) == len(SKILLS)
        describe_options()
        [call] = rows(url, schema.tool_calls)
        assert call["skill_id"] == "skill-describe-options" and call["success"] is True
    finally:
        forget_engine(url)


# --- the parent's lifecycle state -----------------------------------------------------------------

def _set_state(artifact_id: str, state: str) -> None:
    with db.transaction() as conn:
        conn.execute(schema.artifacts.update().where(schema.artifacts.c.id == artifact_id)
                     .values(lifecycle_state=state))


@pytest.mark.parametrize("state", ["rejected", "superseded"])
def test_a_parent_in_a_state_the_operator_leaves_out_is_refused_before_any_debit(
        sqlite_registry, committed_code, tmp_path, monkeypatch, state):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    _set_state(BASE_ID, state)

    dry = train_model_version(BASE_ID, DATASET_ID, None, AGENT, dry_run=True)
    assert dry["would_launch"] is False
    [reason] = [r for r in dry["reasons"] if r["reason"] == "parent_state"]
    assert reason["field"] == "parent_artifact_id" and reason["state"] == state
    assert f"'{state}'" in reason["message"] and "policy.parent_states" in reason["fix"]

    with pytest.raises(ForgeError) as err:
        train_model_version(BASE_ID, DATASET_ID, **TINY)
    assert err.value.reason == "parent_state" and err.value.field == "parent_artifact_id"
    assert rows(sqlite_registry, schema.resource_allocations) == []  # nothing debited
    assert ledger.balance(AGENT) == Decimal("10")

    # The operator's rule decides: a state it lists may be trained from.
    operator_conf(tmp_path, monkeypatch,
                  f"policy:\n  parent_states: [active, candidate, {state}]\n")
    dry = train_model_version(BASE_ID, DATASET_ID, None, AGENT, dry_run=True)
    assert dry["would_launch"], dry["reasons"]


def test_the_default_rule_trains_from_active_and_candidate_parents(sqlite_registry,
                                                                   committed_code, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    for state in ("active", "candidate"):
        _set_state(BASE_ID, state)
        dry = train_model_version(BASE_ID, DATASET_ID, None, AGENT, dry_run=True)
        assert dry["would_launch"], (state, dry["reasons"])


# --- the dirty patch, and the result's links ------------------------------------------------------

def _dirty_training(tmp_path: Path, monkeypatch) -> dict:
    repo = fake_code_repo(tmp_path, STAND_IN_TRAINER.replace("METRICS", METRICS))
    monkeypatch.setenv("FORGE_CODE_REPO", str(repo))
    (repo / "trainers" / "entrypoint.py").write_text(textwrap.dedent(
        STAND_IN_TRAINER.replace("METRICS", METRICS)) + "# an uncommitted change\n")
    return train_model_version(BASE_ID, DATASET_ID, **TINY, allow_dirty=True,
                               overrides=["training=pretrain_mgm"])


@pytest.mark.sandbox
@pytest.mark.train
def test_the_dirty_patch_is_an_artifact_without_host_paths(sqlite_registry, tmp_path,
                                                          monkeypatch):
    result = _dirty_training(tmp_path, monkeypatch)
    model = catalog.get_model_version(result["artifact_id"])
    diff = model["metadata"]["code_diff"]
    home = str(Path(tmp_path / "home").resolve())
    assert home not in json.dumps(diff) and str(tmp_path) not in json.dumps(diff)
    assert diff["artifact"] == "code.diff" and diff["mlflow_artifact"] == "code/code.diff"

    # Beside the weights, in the version's folder, named relative to it.
    kept = weights.version_dir(result["artifact_id"]) / diff["artifact"]
    patch = kept.read_bytes()
    assert hashlib.sha256(patch).hexdigest() == diff["sha256"] and len(patch) == \
        diff["size_bytes"]
    assert b"an uncommitted change" in patch

    # On the MLflow run, under the same name.
    client = tracking.client(_tracking()["tracking_uri"])
    local = client.download_artifacts(result["mlflow"]["run_id"], diff["mlflow_artifact"],
                                      str(tmp_path / "dl"))
    assert Path(local).read_bytes() == patch


@pytest.mark.sandbox
@pytest.mark.train
def test_detail_url_is_the_forge_serve_page_and_mlflow_url_the_run(sqlite_registry, tmp_path,
                                                                   monkeypatch):
    monkeypatch.delenv("FORGE_SITE_URL", raising=False)
    assert _tracking()["site_url"] == "http://127.0.0.1:8765"  # forge serve's default port
    result = _dirty_training(tmp_path, monkeypatch)
    artifact_id, run_id = result["artifact_id"], result["mlflow"]["run_id"]
    assert result["detail_url"] == f"http://127.0.0.1:8765/artifacts/{artifact_id}"
    experiment = tracking.client(_tracking()["tracking_uri"]).get_run(run_id).info.experiment_id
    assert result["mlflow_url"] == \
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"

    # FORGE_SITE_URL over the default, and the operator's conf/local over both.
    monkeypatch.setenv("FORGE_SITE_URL", "https://other.example.org")
    assert _tracking()["site_url"] == "https://other.example.org"
    operator_conf(tmp_path, monkeypatch, "tracking:\n  site_url: https://forge.example.org/\n")
    assert _tracking()["site_url"] == "https://forge.example.org/"
