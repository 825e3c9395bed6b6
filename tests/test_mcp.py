"""`forge mcp` driven by the official MCP client, over stdio and over streamable HTTP: the
real server process (`python -m runner.cli mcp`), the real registry, sandbox and MLflow store.

- both transports: list the tools; a dry run; submit a tiny real training, poll it to
  success and read the candidate's lineage; submit and cancel, the refund in the ledger;
- identity: over HTTP a missing, wrong or revoked token is refused (401) before any tool
  runs; on either transport an agent_id that is not the caller's is refused as `forbidden`,
  moves no credits and is audited under the caller's name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    SLEEPING_TRAINER,
    TINY,
    fake_code_repo,
    http_status,
)

from runner.registry import agents, catalog, db, ledger, recovery, schema

REPO = Path(__file__).resolve().parents[1]
TOOLS = {"train_model_version", "submit_training", "job_status", "job_log", "cancel_job",
         "evaluate_candidate", "describe_options", "lineage", "model_show"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpServer:
    """`forge mcp --http PORT` as a subprocess of the test."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        # Its output goes to a file, never to a pipe nobody reads while it runs: a server whose
        # log outgrew the pipe's buffer would block in its next write, calls and all.
        self.log = tempfile.NamedTemporaryFile(prefix="forge-mcp-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "mcp", "--http", str(self.port)],
            cwd=REPO, env=dict(os.environ), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"forge mcp --http did not start: "
                                       f"{self.output()}") from None
                time.sleep(0.2)

    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Transport:
    """How a test reaches the server: 'stdio' (a server bound to AGENT per session), or
    'http' (one server, started at first use so that it sees the test's environment, and
    AGENT's token)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.server: HttpServer | None = None
        self.token: str | None = None

    def http(self) -> tuple[HttpServer, str]:
        if self.server is None:
            self.token = agents.issue(AGENT)["token"]
            self.server = HttpServer()
        return self.server, self.token

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(params=["stdio", "http"])
def transport(request, sqlite_registry):
    made = Transport(request.param)
    yield made
    made.close()


@asynccontextmanager
async def session(transport: Transport, token: str | None = None):
    from mcp import Client

    if transport.kind == "stdio":
        from mcp.client.stdio import StdioServerParameters

        params = StdioServerParameters(
            command=sys.executable, args=["-m", "runner.cli", "mcp", "--agent", AGENT],
            env=dict(os.environ), cwd=str(REPO))
        async with Client(params, read_timeout_seconds=120) as client:
            yield client
        return
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    server, own = transport.http()
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token or own}"},
                                  timeout=120) as http:
        async with Client(streamable_http_client(server.url, http_client=http),
                          read_timeout_seconds=120) as client:
            yield client


async def call(client, name: str, arguments: dict) -> tuple[bool, dict]:
    result = await client.call_tool(name, arguments)
    return result.is_error, result.structured_content


async def poll(client, job_id: str, states: tuple[str, ...], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        failed, status = await call(client, "job_status", {"job_id": job_id})
        assert not failed, status
        if status["status"] in states:
            return status
        assert time.monotonic() < deadline, status
        await anyio.sleep(0.5)


def audit_rows(url: str, agent: str) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(schema.tool_calls.select().where(
            schema.tool_calls.c.agent_id == agent)).mappings()]


# --- both transports ------------------------------------------------------------------------------

def test_tools_are_listed_with_the_skills_schemas_and_a_dry_run_estimates(transport,
                                                                          committed_code,
                                                                          monkeypatch):
    from runner.api import TRAIN_SKILL

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))

    async def go():
        async with session(transport) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            assert set(listed) == TOOLS
            schema_ = listed["train_model_version"].input_schema
            assert schema_["properties"] == json.loads(json.dumps(
                TRAIN_SKILL.input_schema["properties"]))  # the skill's own definitions
            assert "agent_id" not in schema_["required"]  # the connection supplies it
            failed, dry = await call(client, "train_model_version", {
                "parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
                "overrides": TINY, "wall_time_cap_min": 5, "vram_cap_gb": 1,
                "dry_run": True})
            assert not failed, dry
            assert dry["would_launch"] is True and dry["reasons"] == []
            assert dry["agent_id"] == AGENT and Decimal(dry["estimate"]["amount"]) > 0
            failed, bad = await call(client, "train_model_version", {
                "parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
                "overrides": ["pricing.price_per_hour=0"], "dry_run": True})
            assert failed and bad["reason"] in ("schema_violation", "invalid_override")
            failed, options = await call(client, "describe_options", {})
            assert not failed and "finetune_celltype" in options["groups"]["training"]
            assert options["training_keys"]["lr"]["type"] == "number"
            assert options["training_keys"]["lr"]["exclusiveMinimum"] == 0  # the trainer's rule
            failed, bad = await call(client, "submit_training", {
                "parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
                "training_config": {"lr": -1}})
            assert failed and bad["reason"] == "schema_violation", bad
    anyio.run(go)
    assert ledger.balance(AGENT) == Decimal("10")  # a dry run debits nothing


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_submit_poll_to_success_and_read_the_lineage(transport, committed_code, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))

    async def go():
        async with session(transport) as client:
            failed, job = await call(client, "submit_training", {
                "parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
                "overrides": TINY, "wall_time_cap_min": 5, "vram_cap_gb": 1})
            assert not failed, job
            assert job["status"] in ("queued", "running")
            done = await poll(client, job["job_id"], ("succeeded", "failed", "cancelled"))
            assert done["status"] == "succeeded", done
            new_id = done["result"]["artifact_id"]
            failed, tree = await call(client, "lineage", {"artifact_id": new_id})
            assert not failed
            assert [a["id"] for a in tree["ancestors"]] == [BASE_ID, new_id]
            failed, model = await call(client, "model_show", {"artifact_id": new_id})
            assert not failed and model["lifecycle_state"] == "candidate"
            failed, logs = await call(client, "job_log", {"job_id": job["job_id"], "tail": 5})
            assert not failed and 0 < len(logs["lines"]) <= 5
            return job["job_id"], new_id
    job_id, new_id = anyio.run(go)
    assert catalog.get_model_version(new_id)["version"]["gpu_allocation_id"] == job_id
    assert recovery.check() == []


@pytest.mark.slow
@pytest.mark.sandbox
def test_submit_and_cancel_refunds_in_the_ledger(transport, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLEEPING_TRAINER)))

    async def go():
        async with session(transport) as client:
            failed, job = await call(client, "submit_training", {
                "parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
                "wall_time_cap_min": 5, "vram_cap_gb": 1})
            assert not failed, job
            deadline = time.monotonic() + 120
            while True:  # running, and the stand-in trainer is at work
                failed, logs = await call(client, "job_log", {"job_id": job["job_id"]})
                if "working" in "\n".join(logs["lines"]):
                    break
                assert time.monotonic() < deadline, logs
                await anyio.sleep(0.3)
            failed, out = await call(client, "cancel_job", {"job_id": job["job_id"]})
            assert not failed and out["status"] == "cancelled", out
            return job["job_id"]
    job_id = anyio.run(go)
    alloc = ledger.get_allocation(job_id)
    assert alloc["status"] == "cancelled"
    assert Decimal(0) < alloc["actual_cost"] < alloc["debited"]
    assert alloc["refunded"] == alloc["debited"] - alloc["actual_cost"]
    assert ledger.balance(AGENT) == Decimal("10") - alloc["actual_cost"]
    assert recovery.check() == []


def test_another_agent_id_is_forbidden_and_moves_no_credits(transport, sqlite_registry,
                                                            committed_code, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    ledger.grant("victim", "10")

    async def go():
        async with session(transport) as client:
            for name, args in (
                    ("submit_training", {"parent_artifact_id": BASE_ID,
                                         "dataset_artifact_id": DATASET_ID,
                                         "wall_time_cap_min": 5, "vram_cap_gb": 1}),
                    ("train_model_version", {"parent_artifact_id": BASE_ID,
                                             "dataset_artifact_id": DATASET_ID,
                                             "wall_time_cap_min": 5, "vram_cap_gb": 1})):
                failed, out = await call(client, name, {**args, "agent_id": "victim"})
                assert failed and out["reason"] == "forbidden" and out["field"] == "agent_id"
    anyio.run(go)
    assert ledger.balance("victim") == Decimal("10") and ledger.balance(AGENT) == Decimal("10")
    assert ledger.list_allocations() == []
    rows = audit_rows(sqlite_registry, AGENT)  # the caller's name, not the victim's
    assert len(rows) == 2 and {r["error_code"] for r in rows} == {"forbidden"}
    assert audit_rows(sqlite_registry, "victim") == []


# --- HTTP: the token decides --------------------------------------------------------------------

def _post(url: str, token: str | None) -> int:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "submit_training", "arguments": {
                           "parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID}}})
    headers = {"Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http_status(urllib.request.Request(url, data=body.encode(), headers=headers,
                                              method="POST"))


def test_http_refuses_a_missing_wrong_or_revoked_token(sqlite_registry):
    transport = Transport("http")
    try:
        server, token = transport.http()
        token_id = agents.list_tokens()[0]["token_id"]

        async def list_with(token: str) -> int:
            async with session(transport, token) as client:
                return len((await client.list_tools()).tools)

        assert anyio.run(list_with, token) == len(TOOLS)  # the token works
        for bad in (None, "", "forge_" + "x" * 43, token + "x", "Basic abc"):
            assert _post(server.url, bad) == 401, bad
        assert agents.revoke(token_id=token_id) == 1
        assert _post(server.url, token) == 401  # revoked
        with pytest.raises(Exception):  # noqa: B017 - whatever the SDK's client raises on a 401
            anyio.run(list_with, token)
    finally:
        transport.close()
    assert ledger.balance(AGENT) == Decimal("10")
    assert ledger.list_allocations() == [] and audit_rows(sqlite_registry, AGENT) == []


def test_stdio_needs_an_agent_and_http_a_loopback_address():
    out = subprocess.run([sys.executable, "-m", "runner.cli", "mcp"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--agent" in out.stderr
    out = subprocess.run([sys.executable, "-m", "runner.cli", "mcp", "--http", "1",
                          "--host", "0.0.0.0"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "loopback" in out.stderr
