"""Each call declared once (runner/api/declare.py): a field added to a call's model is in its
JSON Schema, its Python signature and argument check, its click options and its web form;
the operator's defaults come from conf/; the replies are JSON-safe and small. Real registry
(SQLite), real code repository, real forge serve (uvicorn) for the form."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Optional

import jsonschema
import pytest
from helpers import BASE_ID, serving
from pydantic import Field, create_model
from test_dry_run import DATASET, PARENT, code_repo, dry, registry  # noqa: F401 (fixtures)
from test_web import fetch

from runner import api
from runner.api import declare
from runner.api.train import TrainArgs
from runner.errors import CapOutOfPolicy, InvalidArtifactId, InvalidInput, InvalidOverride
from runner.web import pages

REQUIRED = {"parent_artifact_id": PARENT, "dataset_artifact_id": DATASET, "agent_id": "a1"}


# --- one place: a new field is everywhere -----------------------------------------------------

def test_a_field_added_in_one_place_is_everywhere():
    Extended = create_model(  # noqa: N806 - a class
        "Extended", __base__=TrainArgs,
        seed_note=(Optional[str], Field(None, max_length=40, description="a note to keep")))

    schema = declare.input_schema(Extended)
    assert schema["properties"]["seed_note"] == {
        "type": ["string", "null"], "maxLength": 40, "default": None,
        "description": "a note to keep"}
    assert schema["additionalProperties"] is False
    jsonschema.validate({**REQUIRED, "seed_note": "x"}, schema)
    assert "seed_note" not in api.TRAIN_SKILL.input_schema["properties"]  # the real one: not

    options = {opt for p in declare.click_params(Extended) for opt in p.opts}
    assert "--seed-note" in options and "--seed-note" not in {
        opt for p in declare.click_params(TrainArgs) for opt in p.opts}

    fields = {f["name"]: f for f in declare.form_fields(Extended)}
    assert fields["seed_note"]["kind"] == "str" and fields["seed_note"]["help"] == \
        "a note to keep"

    assert "seed_note" in inspect.signature(declare.declared(Extended)(lambda a: a)).parameters
    assert declare.parse(Extended, (), {**REQUIRED, "seed_note": "x"}).seed_note == "x"
    with pytest.raises(InvalidInput) as info:  # not declared on the call itself: refused
        declare.parse(TrainArgs, (), {**REQUIRED, "seed_note": "x"})
    assert info.value.field == "seed_note"
    with pytest.raises(InvalidInput, match="string should have at most 40 characters"):
        declare.parse(Extended, (), {**REQUIRED, "seed_note": "x" * 41})


def test_the_calls_schema_signature_and_skill_are_the_declarations():
    schema = api.TRAIN_SKILL.input_schema
    params = inspect.signature(api.train_model_version).parameters
    assert set(params) - {"config"} == set(schema["properties"])  # config: Python only
    assert list(params)[:7] == list(TrainArgs.positional)
    assert schema["required"] == ["parent_artifact_id", "dataset_artifact_id", "agent_id"]
    submit = api.SUBMIT_SKILL.input_schema["properties"]
    assert set(schema["properties"]) - set(submit) == {
        "dry_run", "verbose", "mlflow_parent_run_id", "code_commit"}
    assert all(submit[k] == schema["properties"][k] for k in submit)  # the same definitions
    for skill in api.SKILLS:
        jsonschema.Draft202012Validator.check_schema(skill.input_schema)
        jsonschema.validate(skill.example_input, skill.input_schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(
        {**REQUIRED, "wall_time_cap": 60}))
    assert errors and "wall_time_cap" in errors[0].message


@pytest.mark.usefixtures("registry")
def test_the_operators_defaults_come_from_conf(tmp_path, monkeypatch):
    assert api.TRAIN_SKILL.input_schema["properties"]["wall_time_cap_min"]["default"] == \
        declare.conf_default("wall_time_cap_min") == 120
    assert inspect.signature(api.train_model_version).parameters["vram_cap_gb"].default == 24
    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", conf)
    text = (conf / "train.yaml").read_text()
    (conf / "train.yaml").write_text(text.replace("wall_time_cap_min: 120",
                                                  "wall_time_cap_min: 30"))
    monkeypatch.setenv("FORGE_CONFIG_DIR", str(conf))
    result = dry()  # no cap given: the operator's
    assert result["config"]["wall_time_cap_min"] == 30 and result["estimate"]["hours"] == "0.50"
    (conf / "train.yaml").write_text(text.replace("wall_time_cap_min: 120", ""))
    assert declare.conf_default("wall_time_cap_min") == 120  # not in conf/: the schema's


# --- errors at the edges --------------------------------------------------------------------------

@pytest.mark.usefixtures("registry")
def test_a_missing_argument_says_it_is_required():
    with pytest.raises(InvalidInput) as info:
        api.train_model_version(PARENT, DATASET, dry_run=True)
    assert str(info.value).startswith("agent_id is required") and info.value.field == \
        "agent_id"
    with pytest.raises(InvalidArtifactId, match="dataset_artifact_id is required"):
        api.train_model_version(PARENT, None, None, "a1", dry_run=True)
    with pytest.raises(InvalidInput, match="job_id is required"):
        api.job_status(None, "a1")


@pytest.mark.usefixtures("registry")
def test_unknown_arguments_and_keys_get_did_you_mean():
    with pytest.raises(InvalidInput) as info:
        api.train_model_version(PARENT, DATASET, agent_id="a1", dry_run=True,
                                wall_time_cap=60)
    assert info.value.field == "wall_time_cap" and "did you mean wall_time_cap_min?" in \
        info.value.fix
    with pytest.raises(InvalidInput, match="unknown argument 'dry_run'"):
        api.submit_training(PARENT, DATASET, agent_id="a1", dry_run=True)  # submit has none
    with pytest.raises(InvalidOverride) as info:
        dry(overrides=["training.lrr=1e-4"])
    assert info.value.fix.startswith("did you mean training.lr?")
    with pytest.raises(InvalidOverride) as info:
        dry(training_config={"lrr": 1e-4, "max_epochs": 2})
    assert info.value.fix.startswith("did you mean training.lr?")  # checked by the family
    with pytest.raises(CapOutOfPolicy) as info:
        dry(wall_time_cap_min="60")  # strict: no coercion, a typed error naming the field
    assert info.value.field == "wall_time_cap_min"


# --- money and size -------------------------------------------------------------------------------

@pytest.mark.usefixtures("registry")
def test_a_dry_run_is_json_safe_and_small():
    result = api.train_model_version(PARENT, DATASET, agent_id="a1", dry_run=True)
    text = json.dumps(result)  # no Decimal anywhere
    assert len(text.encode()) < 3 * 1024, len(text)
    assert result["estimate"]["amount"] == "1.00" and result["estimate"]["currency"] == \
        "credits"
    assert result["balance"]["currency"] == "credits"
    assert "argv" not in result["sandbox"] and "pricing" not in result["config"]
    full = api.train_model_version(PARENT, DATASET, agent_id="a1", dry_run=True, verbose=True)
    assert len(json.dumps(full)) > len(text) and full["sandbox"]["argv"]
    assert full["config"]["pricing"]["currency"] == "credits"
    assert {k: full[k] for k in ("estimate", "request_key", "would_launch")} == \
        {k: result[k] for k in ("estimate", "request_key", "would_launch")}


# --- the web form -------------------------------------------------------------------------------

@pytest.mark.usefixtures("registry")
def test_the_tools_form_is_the_declaration_and_offers_the_registered_ids():
    from runner.web.app import create_app

    names = [f["name"] for f in pages.form_fields()]
    assert names[:5] == ["parent_artifact_id", "dataset_artifact_id", "agent_id",
                         "wall_time_cap_min", "vram_cap_gb"]
    assert "dry_run" not in names and "training_config" not in names
    with serving(create_app()) as web:
        page = fetch(f"{web}/tools").text
        for name in names:
            assert f'name="{name}"' in page, name
        assert 'list="parent_artifact_id-choices"' in page
        assert f'<option value="{PARENT}">' in page and f'<option value="{DATASET}">' in page
        assert 'name="wall_time_cap_min" value="120"' in page  # conf/'s default
        reply = fetch(f"{web}/tools/dry-run", {**REQUIRED, "overrides": "training.lr=1e-4",
                                               "devices": "1", "allow_dirty": "on"})
        assert reply.status == 200 and "would_launch" in reply.text
        assert f'<option value="{PARENT}">' in reply.text  # the form again, with the ids
        bad = fetch(f"{web}/tools/dry-run", {**REQUIRED, "verbose": "on"})
        assert bad.status == 400 and "unknown fields: verbose" in bad.text
    assert BASE_ID  # the shared helpers' ids stay importable for the browser tests
