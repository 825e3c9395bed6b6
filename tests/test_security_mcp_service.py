"""`forge mcp --http` serves every agent fairly: the real server process, the official MCP
client, real jails.

- One agent's flood of blocking calls (40 train_model_version on a trainer that sleeps)
  cannot slow another agent down: B's initialize + describe_options answers in under 1 s,
  while A runs at most its `blocking_per_agent` trainings and the rest are refused at once
  as `busy`, typed and audited. (Before, every call and every token check shared anyio's
  40 threads: B waited 49 s.)
- Sessions: one agent's tokens hold at most `sessions_per_agent` open sessions, another
  agent still opens one, and a session idle past `session_idle_s` is gone.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import anyio
import pytest
from helpers import BASE_ID, DATASET_ID, fake_code_repo, operator_conf
from test_mcp import HttpServer, Transport, audit_rows, session

from runner.registry import agents, ledger

FLOOD = 40
PER_AGENT = 2  # the default of --blocking-per-agent
# A stand-in trainer that sleeps (no CPU), then exits without a result: the call fails
# (TrainingFailed), and only how long it blocks matters here.
SLOW_TRAINER = """
    import time
    print("working", flush=True)
    time.sleep(25)
"""
# The operator's capacity admits the whole flood (a big host): the server's own limit on
# one agent's blocking calls is what must hold.
ROOMY_HOST = ("policy:\n  max_jobs_per_agent: 40\n  max_jobs_per_host: 40\n"
              "  max_host_memory_gb: 1000\n")
TRAIN = {"parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
         "wall_time_cap_min": 5, "vram_cap_gb": 1}


def running(agent: str) -> int:
    return sum(a["status"] == "running" for a in ledger.list_allocations(agent_id=agent))


@pytest.mark.slow
@pytest.mark.sandbox
def test_one_agents_flood_of_blocking_calls_does_not_slow_another_agent(sqlite_registry,
                                                                         tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, SLOW_TRAINER)))
    operator_conf(tmp_path, monkeypatch, ROOMY_HOST)
    ledger.grant("agent-a", "1000")  # enough for every call of the flood
    token_a, token_b = agents.issue("agent-a")["token"], agents.issue("agent-b")["token"]
    transport = Transport("http")  # one server; A's token, and B's where named
    transport.server, transport.token = HttpServer(), token_a
    results: list = []

    async def train(client, seed: int) -> None:  # distinct requests: none is a retry of another
        try:
            result = await client.call_tool("train_model_version",
                                            {**TRAIN, "training_config": {"seed": seed}})
        except Exception as exc:  # noqa: BLE001 - recorded, asserted on below
            results.append((True, {"reason": "client", "message": repr(exc)}))
        else:
            results.append((result.is_error, result.structured_content))

    async def b_answers() -> float:
        started = time.monotonic()
        with anyio.move_on_after(30):  # the old code made B wait 49 s: do not wait it out
            async with session(transport, token_b) as client:
                options = await client.call_tool("describe_options", {})
            assert not options.is_error, options.structured_content
        return time.monotonic() - started

    async def go():
        await b_answers()  # warm: the server's first describe_options imports its modules
        async with session(transport) as a, anyio.create_task_group() as flood:
            for seed in range(FLOOD):
                flood.start_soon(train, a, seed)
            await anyio.sleep(5)  # the refusals are back; the admitted calls are being prepared
            b_took = [await b_answers()]
            deadline = time.monotonic() + 120
            while running("agent-a") == 0:  # A's trainings are in their jails
                assert time.monotonic() < deadline, (
                    [r for r in results if r[1].get("reason") != "busy"],
                    [(x["status"], x.get("notes")) for x in ledger.list_allocations()])
                await anyio.sleep(0.3)
            b_took.append(await b_answers())  # while they run
            still_running = running("agent-a")
            if max(b_took) >= 1.0:  # failed: no need to wait for the flood's end
                flood.cancel_scope.cancel()
        return b_took, still_running

    try:
        b_took, still_running = anyio.run(go)
        server_log = transport.server.output()
    finally:
        transport.close()
    print("B's initialize + describe_options during A's flood: "
          f"{b_took[0]:.2f} s while A's calls were prepared, {b_took[1]:.2f} s while they ran")
    assert max(b_took) < 1.0, f"B waited {max(b_took):.1f} s behind A's flood"
    assert still_running >= 1  # B was measured while A's trainings ran
    busy = [out for failed, out in results if failed and out["reason"] == "busy"]
    assert len(results) == FLOOD and len(busy) == FLOOD - PER_AGENT, results
    assert busy[0]["field"] == "name" and busy[0]["running"] == PER_AGENT
    assert "submit_training" in busy[0]["fix"] and "job_status" in busy[0]["fix"]
    admitted = [out for failed, out in results if out.get("reason") != "busy"]
    assert [out.get("error") for out in admitted] == ["TrainingFailed"] * PER_AGENT, (
        admitted, [(x["status"], x.get("notes")) for x in ledger.list_allocations()],
        server_log[-3000:])
    assert len(ledger.list_allocations(agent_id="agent-a")) == PER_AGENT
    refusals = [r for r in audit_rows(sqlite_registry, "agent-a") if r["error_code"] == "busy"]
    assert len(refusals) == FLOOD - PER_AGENT


# --- sessions ---------------------------------------------------------------------------------

def _initialize(url: str, token: str) -> tuple[int, str | None]:
    """Open a session as a client does (POST initialize, no session id): the HTTP status and
    the session id the server gave; then go idle (no GET stream, no further request)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "idle", "version": "0"}}}
    status, headers = _post(url, token, body)
    return status, headers.get("mcp-session-id")


def _ping(url: str, token: str, session_id: str) -> int:
    body = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    return _post(url, token, body, {"mcp-session-id": session_id,
                                    "mcp-protocol-version": "2025-06-18"})[0]


def _post(url: str, token: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {token}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def test_sessions_are_capped_per_agent_and_expire_when_idle(sqlite_registry, monkeypatch):
    idle_s = 4
    monkeypatch.setenv("FORGE_MCP_SESSIONS_PER_AGENT", "3")
    monkeypatch.setenv("FORGE_MCP_SESSION_IDLE_S", str(idle_s))
    token_a, token_b = agents.issue("agent-a")["token"], agents.issue("agent-b")["token"]
    other_a = agents.issue("agent-a")["token"]  # the same agent's second token shares its cap
    server = HttpServer()
    try:
        opened = [_initialize(server.url, token_a) for _ in range(3)]
        assert [status for status, _ in opened] == [200, 200, 200]
        assert all(session for _, session in opened)
        assert _ping(server.url, token_a, opened[0][1]) == 200  # a session of A's, alive
        assert _initialize(server.url, token_a)[0] == 503  # past the cap
        assert _initialize(server.url, other_a)[0] == 503
        status, session_b = _initialize(server.url, token_b)  # another agent still opens one
        assert status == 200 and session_b
        time.sleep(idle_s + 3)  # every session idle past the expiry
        assert _ping(server.url, token_a, opened[0][1]) == 404
        assert _ping(server.url, token_b, session_b) == 404
        assert _initialize(server.url, token_a)[0] == 200  # the expired ones freed A's cap
    finally:
        server.stop()
