"""What `forge mcp` tells an agent about its tools, driven by the official MCP client against
the real server process (`python -m runner.cli mcp`), registry, sandbox and MLflow store:

- tools/list: each tool's annotations (read-only lookups; the credit-spending calls marked in
  their title, description and hints) and output schema; the client validates every result
  against it, so each call below checks its schema too;
- a schema error names the key and the rule ("training_config.lrr: unknown key (did you mean
  lr?)"), not jsonschema's "not valid under any of the given schemas";
- over HTTP, the 401 advertises no OAuth metadata that answers 404;
- a synchronous train_model_version with a progressToken gets notifications/progress while
  its (tiny, real) job runs, and the job's log has no Lightning `srun` hint on a host with
  SLURM's commands on PATH.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request

import anyio
import jsonschema
import pytest
from helpers import AGENT, BASE_ID, DATASET_ID, TINY, http_status, stand_in_candidate
from test_gate import PERFECT_CANDIDATE, _stand_in_repo
from test_mcp import Transport, call, session

from runner import mcp_server, tools
from runner.api import evaluate_candidate
from runner.registry import ledger

READ_ONLY = {"describe_options", "lineage", "model_show", "job_status", "job_log"}
SPENDS = {"train_model_version", "submit_training", "evaluate_candidate"}
TRAIN = {"parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
         "wall_time_cap_min": 5, "vram_cap_gb": 1}
SRUN_HINT = "The `srun` command is available on your system but is not used"


@pytest.fixture
def stdio(sqlite_registry, committed_code, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    return Transport("stdio")


@pytest.fixture(params=["stdio", "http"])
def either(request, sqlite_registry, committed_code, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    made = Transport(request.param)
    yield made
    made.close()


def test_tools_carry_annotations_and_output_schemas(stdio):
    async def go():
        async with session(stdio) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            failed, options = await call(client, "describe_options", {})  # validated by the client
            assert not failed
            failed, dry = await call(client, "train_model_version", {**TRAIN, "overrides": TINY,
                                                                     "dry_run": True})
            assert not failed and dry["would_launch"] is True, dry
            return tools, options, dry
    tools, options, dry = anyio.run(go)
    assert set(tools) == READ_ONLY | SPENDS | {"cancel_job"}
    for name, tool in tools.items():
        hints = tool.annotations
        assert hints is not None and hints.open_world_hint is False, name
        assert hints.read_only_hint is (name in READ_ONLY), name
        if name not in READ_ONLY:
            assert hints.destructive_hint is True and hints.idempotent_hint is True, name
        spends = "spends credits" in tool.title.lower()
        assert spends is (name in SPENDS), name
        assert spends is ("spends credits" in tool.description.lower()), name
        schema = tool.output_schema
        assert schema is not None and schema["type"] == "object", name
        jsonschema.Draft202012Validator.check_schema(schema)
    # the schemas say something: a result missing its keys does not pass
    for name, result in (("describe_options", options), ("train_model_version", dry)):
        validator = jsonschema.Draft202012Validator(tools[name].output_schema)
        assert validator.is_valid(result), name
        assert not validator.is_valid({"unrelated": 1}), name


@pytest.mark.sandbox
def test_the_gates_results_match_its_output_schema(sqlite_registry, tmp_path, monkeypatch):
    """evaluate_candidate's dry run and decision (a stand-in eval job in the real jail) fit
    the schema tools/list gives (the MCP tests above check the other tools' results)."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(_stand_in_repo(tmp_path, PERFECT_CANDIDATE)))
    validator = jsonschema.Draft202012Validator(mcp_server.OUTPUT_SCHEMAS["evaluate_candidate"])
    cand = stand_in_candidate(BASE_ID, "model-standin-schema")
    for dry_run in (True, False):
        result = tools.jsonable(evaluate_candidate(cand, AGENT, dry_run=dry_run,
                                                   allow_dirty=True))
        errors = [e.message for e in validator.iter_errors(result)]
        assert errors == [], (dry_run, errors)
    assert result["decision"] == "promoted"


@pytest.mark.parametrize("arguments, message, field", [
    ({"training_config": {"lrr": 1e-4}},
     "training_config.lrr: unknown key (did you mean lr?)", "training_config.lrr"),
    ({"training_config": {"training": {"max_epoch": 2}}},
     "training_config.training.max_epoch: unknown key (did you mean max_epochs?)",
     "training_config.training.max_epoch"),
    ({"wall_time_cap_min": 0}, "wall_time_cap_min: 0 is less than the minimum of 1",
     "wall_time_cap_min"),
    ({"dry_runn": True}, "dry_runn: unknown key (did you mean dry_run?)", "dry_runn"),
    ({"training_config": {"lr": "fast"}}, "training_config.lr: 'fast' is not of type number",
     "training_config.lr"),
])
def test_a_schema_error_names_the_key_and_the_rule(stdio, arguments, message, field):
    async def go():
        async with session(stdio) as client:
            return await call(client, "train_model_version", {**TRAIN, "dry_run": True,
                                                              **arguments})
    failed, error = anyio.run(go)
    assert failed and error["reason"] == "schema_violation", error
    assert error["message"] == message and error["field"] == field
    assert "any of the given schemas" not in json.dumps(error)
    assert ledger.balance(AGENT) == 10


def test_the_401_advertises_no_oauth_metadata_that_is_not_there(sqlite_registry):
    transport = Transport("http")
    try:
        server, _token = transport.http()
        request = urllib.request.Request(
            server.url, data=b"{}", method="POST",
            headers={"Content-Type": "application/json",
                     "Accept": "application/json, text/event-stream"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
        challenge = refused.value.headers.get("WWW-Authenticate", "")
        assert challenge.startswith("Bearer")
        # whatever it advertises answers, and so does each authorization server it names
        for url in re.findall(r'resource_metadata="([^"]+)"', challenge):
            assert http_status(url) == 200, url
            with urllib.request.urlopen(url, timeout=30) as response:
                metadata = json.load(response)
            for issuer in metadata.get("authorization_servers", []):
                well_known = issuer.rstrip("/") + "/.well-known/oauth-authorization-server"
                assert http_status(well_known) == 200, well_known
    finally:
        transport.close()


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_a_synchronous_train_reports_progress_and_its_job_log_is_quiet(either):
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def go():
        async with session(either) as client:
            result = await client.call_tool("train_model_version",
                                            {**TRAIN, "overrides": TINY},
                                            progress_callback=on_progress)
            assert not result.is_error, result.structured_content
            trained = result.structured_content  # validated against the output schema
            failed, log = await call(client, "job_log", {"job_id": trained["gpu_allocation_id"],
                                                         "tail": 10_000})
            assert not failed
            return trained, log["lines"]
    trained, lines = anyio.run(go)
    assert trained["lifecycle_state"] == "candidate"
    assert len(progress) >= 2, progress  # at the start, and while the job ran
    values = [value for value, _total, _message in progress]
    assert values == sorted(values) and values[-1] > 0
    assert all(total == 5 * 60 for _value, total, _message in progress)
    assert "running for" in progress[-1][2]
    assert lines, "the job wrote no log"
    if shutil.which("srun") is None:
        pytest.skip("no `srun` on PATH here: Lightning would not print its hint anyway")
    assert not [line for line in lines if SRUN_HINT in line]


@pytest.mark.parametrize("arguments, message", [
    ({"training_config": {"training": {"lr": 1e-4}, "lr": 1e-4}},
     "training_config matches none of its allowed forms: training_config.lr: not allowed in "
     "this form; training_config.training: not allowed in this form"),
    ({"training_config": 5}, "training_config: 5 is not of type null or object"),
    ({"overrides": ["pricing.price_per_hour=0"]},
     "overrides[0]: 'pricing.price_per_hour=0' is not of the allowed form"),
    ({"parent_artifact_id": None}, "parent_artifact_id: None is not of type string"),
])
def test_each_schema_rule_is_said_plainly(arguments, message):
    """The forms a value may take (training_config: null, nested or flat) and long patterns
    (overrides) still come back as the key and what is wrong with it."""
    schema = mcp_server.TOOLS["train_model_version"][2]
    problem = mcp_server._schema_problem(schema, {"parent_artifact_id": BASE_ID,
                                                  "dataset_artifact_id": DATASET_ID,
                                                  **arguments})
    assert problem.reason == "schema_violation" and problem.message == message
    missing = mcp_server._schema_problem(schema, {"dataset_artifact_id": DATASET_ID})
    assert (missing.field, missing.message) == (
        "parent_artifact_id", "parent_artifact_id: missing, and it is required")
    assert mcp_server._schema_problem(schema, {"parent_artifact_id": BASE_ID,
                                               "dataset_artifact_id": DATASET_ID}) is None


def test_progress_keeps_growing_past_the_cap(monkeypatch):
    """Each notification's progress is larger than the last, also once the call outlives
    its cap (the job's stop and settlement), where the total is dropped."""
    sent: list[tuple[float, float | None, str]] = []

    class Session:  # what the SDK's request context offers the server: report_progress
        async def report_progress(self, progress, total=None, message=None):
            sent.append((progress, total, message))

    class Context:
        session = Session()

    async def work():
        await anyio.sleep(1.1)
        return "done"

    monkeypatch.setattr(mcp_server, "PROGRESS_EVERY_S", 0.2)
    assert anyio.run(mcp_server._reporting_progress, Context(), 0.5, work) == "done"
    values = [progress for progress, _total, _message in sent]
    assert len(sent) >= 4 and values == sorted(set(values))
    assert sent[0][1] == 0.5 and sent[-1][1] is None and "past its cap" in sent[-1][2]
