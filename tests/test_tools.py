"""Skills registration and the tool-call audit trail."""

from __future__ import annotations

import dataclasses
from datetime import UTC
from decimal import Decimal

import jsonschema
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from runner import tools
from runner.api import GATE_SKILL, SKILLS, TRAIN_SKILL
from runner.cli import main as forge
from runner.errors import BudgetExceeded
from runner.registry import db
from runner.registry.schema import skills, tool_calls

SKILL = "Train Model Version"


def rows(url, table) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


@tools.log_tool_call(TRAIN_SKILL)
def toy(x, *, agent_id=None, fail=None, **extra):
    if fail is not None:
        raise fail
    return {"value": Decimal(x) * 2, "config": {"big": "omitted"}, "extra": extra}


def test_register_tools_is_idempotent_and_describes_the_call(db_url):
    first = tools.register_tools(SKILLS)
    tools.register_tools(SKILLS)
    by_id = {r["id"]: r for r in rows(db_url, skills)}
    assert sorted(by_id) == sorted(s.id for s in SKILLS)
    assert {"skill-train-model-version", "skill-evaluate-candidate", "skill-submit-training",
            "skill-job-status", "skill-job-log", "skill-cancel-job", "skill-describe-options",
            "skill-lineage", "skill-model-show"} == set(by_id)
    for skill in by_id.values():  # every skill's example is valid against its own schema
        jsonschema.Draft202012Validator.check_schema(skill["input_schema"])
        jsonschema.validate(skill["example_input"], skill["input_schema"])
    row = by_id["skill-train-model-version"]
    assert row["id"] == first[0]["id"]
    assert row["name"] == SKILL and row["skill_type"] == "model_training"
    assert row["code_path"] == "runner.api:train_model_version" and row["times_used"] == 0
    schema = row["input_schema"]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(row["example_input"], schema)
    assert set(schema["required"]) == {"parent_artifact_id", "dataset_artifact_id", "agent_id"}
    import inspect

    from runner.api import train_model_version
    params = set(inspect.signature(train_model_version).parameters) - {"kw", "config"}
    assert params == set(schema["properties"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**row["example_input"], "wall_time_cap_min": 0}, schema)

    gate = by_id["skill-evaluate-candidate"]  # the eval gate's skill, its schema the call's
    assert gate["code_path"] == "runner.api:evaluate_candidate"
    assert gate["skill_type"] == "model_evaluation"
    jsonschema.validate(gate["example_input"], gate["input_schema"])
    from runner.api import evaluate_candidate
    params = set(inspect.signature(evaluate_candidate).parameters) - {"kw"}
    assert params == set(gate["input_schema"]["properties"])


def test_cli_register(db_url):
    result = CliRunner().invoke(forge, ["tools", "register"])
    assert result.exit_code == 0 and "skill-train-model-version" in result.output
    assert "skill-evaluate-candidate" in result.output
    assert len(rows(db_url, skills)) == len(SKILLS) == 9


def test_skills_are_values_and_forge_db_upgrade_writes_them(db_url):
    assert TRAIN_SKILL.id == tools.skill_id(TRAIN_SKILL.name) == "skill-train-model-version"
    assert TRAIN_SKILL.code_path == "runner.api:train_model_version"
    assert SKILLS[0] == TRAIN_SKILL and GATE_SKILL in SKILLS
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRAIN_SKILL.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes a Skill"):
        tools.log_tool_call(SKILL)
    from runner.api import train_model_version
    assert train_model_version.skill is TRAIN_SKILL

    # db.upgrade() in Python and `forge db upgrade` write the same rows
    for upgrade in (lambda: db.upgrade(db_url),
                    lambda: CliRunner().invoke(forge, ["db", "upgrade", "--url", db_url])):
        with db.get_engine(db_url).begin() as conn:
            conn.execute(sa.delete(skills))
        upgrade()
        written = {r["id"]: r["input_schema"] for r in rows(db_url, skills)}
        assert written == {s.id: s.input_schema for s in SKILLS}


def test_success_row(db_url):
    tools.register_tools(SKILLS)
    assert toy("1.5", agent_id="a1", note="n")["value"] == Decimal("3.0")
    (call,) = rows(db_url, tool_calls)
    assert call["skill_id"] == "skill-train-model-version" and call["agent_id"] == "a1"
    assert call["success"] is True and call["error_code"] is None
    assert call["input_params"] == {"x": "1.5", "agent_id": "a1", "note": "n"}
    assert call["output_summary"] == {"value": "3.0", "extra": {"note": "n"}}
    assert isinstance(call["duration_ms"], int)
    used = {r["id"]: r["times_used"] for r in rows(db_url, skills)}
    assert used == {s.id: int(s.id == "skill-train-model-version") for s in SKILLS}


def test_failure_rows_never_mask_the_exception(db_url):
    tools.register_tools(SKILLS)
    error = BudgetExceeded("agent 'a1' has 0.40 credits, estimate 1.00", field="agent_id",
                           fix="grant more")
    with pytest.raises(BudgetExceeded) as info:
        toy("1", agent_id="a1", fail=error)
    assert info.value is error
    with pytest.raises(ZeroDivisionError):
        toy("1", fail=ZeroDivisionError("boom"))
    with pytest.raises(TypeError):
        toy()  # a call that does not even bind is still audited
    calls = sorted(rows(db_url, tool_calls), key=lambda c: c["created_at"])
    assert [c["success"] for c in calls] == [False, False, False]
    assert calls[0]["error_code"] == "insufficient_balance"
    assert "0.40 credits" in calls[0]["error_message"]
    assert calls[0]["output_summary"]["field"] == "agent_id"
    assert calls[1]["error_code"] == "ZeroDivisionError" and calls[1]["agent_id"] is None
    assert calls[2]["error_code"] == "TypeError"


def test_unregistered_skill_still_audits(db_url):
    with db.get_engine(db_url).begin() as conn:  # the fixture registered it: undo that
        conn.execute(sa.delete(skills))
    toy("2")
    (call,) = rows(db_url, tool_calls)
    assert call["skill_id"] is None and call["success"] is True


def test_a_broken_audit_store_does_not_change_the_outcome(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FORGE_DB_URL", f"sqlite:///{tmp_path / 'unmigrated.db'}")
    assert toy("2")["value"] == Decimal("4")
    with pytest.raises(ValueError, match="original"):
        toy("2", fail=ValueError("original"))
    assert "could not write the tool_calls row" in caplog.text
    db._engine.cache_clear()


def test_jsonable():
    from datetime import datetime
    from pathlib import Path

    from omegaconf import OmegaConf

    value = {"d": Decimal("1.50"), "t": datetime(2026, 1, 1, tzinfo=UTC),
             "p": Path("/x"), "c": OmegaConf.create({"a": 1}), "s": {1}, "f": float("nan"),
             "o": object()}
    out = tools.jsonable(value)
    assert out["d"] == "1.50" and out["t"].startswith("2026-01-01") and out["p"] == "/x"
    assert out["c"] == {"a": 1} and out["s"] == [1] and out["f"] == "nan"
    assert out["o"].startswith("<object")
