"""`forge mcp`: the calls of runner.api as an MCP server (the official SDK's low-level
`Server`), over stdio or streamable HTTP on a loopback address.

- Tools are the skills: each tool's input schema is its skill's (the `skills` rows), less
  `agent_id` among the required keys, since the connection decides the agent.
- Identity. Over HTTP every request carries `Authorization: Bearer <token>`; the SDK's
  bearer middleware asks `AgentTokens` (runner.registry.agents: hashes only, revocable) and
  refuses a missing, unknown or revoked token with 401 before any tool runs. Over stdio the
  server is bound at start to one agent (`forge mcp --agent NAME`). Each call then runs as
  that agent (runner.tools.acting_as): an `agent_id` left out is filled in, a different one
  is refused as `forbidden`, and the audit row names the caller.
- Every call is audited in `tool_calls`, a call refused by its schema too. A ForgeError comes
  back as a tool error (isError) whose structured content carries its reason, field and fix;
  any other exception as reason `internal_error`, never a traceback.
- Fair service (`Lanes`). A blocking call (train_model_version, evaluate_candidate, not as
  a dry run, and cancel_job, which waits for the settlement) holds a worker thread for as
  long as its job runs. Each agent may have `blocking_per_agent` of them running at once;
  one more is refused at once as `busy`. Short calls and the bearer-token checks run on
  thread limiters of their own, so that no agent's trainings can make another agent wait.
  (anyio's default pool of 40 threads, shared by all of them before, let 40 trainings of
  one agent hold every other agent's token check.)
- Sessions over HTTP: at most `sessions_per_agent` open per agent (one more answers 503),
  and a session with no request in flight for `session_idle_s` is closed by the SDK.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math

import anyio
import jsonschema
import mcp_types as types
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel import Server

from runner import tools
from runner.api import CALLS
from runner.errors import Busy, ForgeError, InternalError, SchemaViolation
from runner.registry import agents

log = logging.getLogger(__name__)
SERVER_NAME = "forge-runner"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def tool_schema(skill: tools.Skill) -> dict:
    """The skill's input schema as the MCP tool's: the connection supplies agent_id."""
    schema = dict(skill.input_schema)
    schema["required"] = [k for k in schema.get("required", []) if k != "agent_id"]
    return schema


TOOLS = {call.__name__: (call, call.skill, tool_schema(call.skill)) for call in CALLS}


# --- fair service -------------------------------------------------------------------------------

# Calls that hold their thread while a job runs (or, for cancel_job, until it is settled).
BLOCKING = frozenset({"train_model_version", "evaluate_candidate", "cancel_job"})


def blocks(name: str, arguments: dict) -> bool:
    """Whether this call can run long: a blocking tool, unless it is a dry run."""
    return name in BLOCKING and arguments.get("dry_run") is not True


class Lanes:
    """Where tool calls and token checks run. A blocking call runs on one of its agent's
    `blocking_per_agent` slots or is refused as `busy`; short calls and token checks have
    thread limiters of their own, never the blocking calls' (nor anyio's default pool)."""

    def __init__(self, blocking_per_agent: int = 2, short_threads: int = 16,
                 token_threads: int = 8):
        if blocking_per_agent < 1:
            raise ValueError("blocking_per_agent must be at least 1")
        self.blocking_per_agent = blocking_per_agent
        self.short = anyio.CapacityLimiter(short_threads)
        self.tokens = anyio.CapacityLimiter(token_threads)
        # The agents' slots bound the blocking threads; this limiter only keeps them off
        # the default pool.
        self._blocking_threads = anyio.CapacityLimiter(math.inf)
        self._slots: dict[str, anyio.CapacityLimiter] = {}

    async def run(self, agent: str, name: str, arguments: dict, call):
        """`call()` in a worker thread of the lane the call belongs to; Busy when it blocks
        and the agent's slots are all taken."""
        if not blocks(name, arguments):
            return await anyio.to_thread.run_sync(call, limiter=self.short)
        slots = self._slots.setdefault(agent, anyio.CapacityLimiter(self.blocking_per_agent))
        borrower = object()  # one slot per call, even if two calls share a task
        try:
            slots.acquire_on_behalf_of_nowait(borrower)
        except anyio.WouldBlock:
            raise Busy(f"agent {agent!r} already runs {self.blocking_per_agent} blocking "
                       f"calls, the most this server runs at once for one agent",
                       field="name", running=self.blocking_per_agent,
                       fix="wait for one to return, or use submit_training (returns at once) "
                           "and poll job_status") from None
        try:
            return await anyio.to_thread.run_sync(call, limiter=self._blocking_threads)
        finally:
            slots.release_on_behalf_of(borrower)


def build_server(bound_agent: str | None = None, lanes: Lanes | None = None) -> Server:
    """The MCP server. `bound_agent`: the stdio server's agent; None over HTTP, where each
    request's bearer token names it. `lanes`: where its calls run (Lanes() by default)."""
    lanes = lanes or Lanes()

    async def list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[
            types.Tool(name=name, title=skill.name, description=skill.description,
                       input_schema=schema)
            for name, (_call, skill, schema) in TOOLS.items()])

    async def call_tool(ctx, params) -> types.CallToolResult:
        agent = bound_agent or _token_agent(ctx)
        if agent is None:  # the bearer middleware lets no such request through
            return _error(InternalError("no authenticated agent for this request"))
        name, arguments = params.name, params.arguments or {}
        if name not in TOOLS:
            return _error(SchemaViolation(f"no tool {name[:100]!r}", field="name",
                                          fix=f"one of {', '.join(TOOLS)}"))
        arguments = dict(arguments)
        try:
            return await lanes.run(agent, name, arguments,
                                   functools.partial(_run, name, arguments, agent))
        except Busy as exc:  # audited like a call its schema refuses
            return await anyio.to_thread.run_sync(
                functools.partial(_refuse, name, arguments, agent, exc), limiter=lanes.short)

    return Server(SERVER_NAME, version=_version(),
                  instructions=("forge-runner: fine-tune a registered parent model on a "
                                "registered dataset into a linked candidate version. Start "
                                "with describe_options; train_model_version(dry_run=true) "
                                "estimates; submit_training + job_status run asynchronously."),
                  on_list_tools=list_tools, on_call_tool=call_tool)


def _run(name: str, arguments: dict, agent: str) -> types.CallToolResult:
    call, skill, schema = TOOLS[name]
    with tools.acting_as(agent):
        problem = _schema_problem(schema, arguments)
        if problem is not None:
            tools.record_refusal(skill, arguments, problem)
            return _error(problem)
        try:
            result = call(**arguments)
        except ForgeError as exc:
            return _error(exc)
        except Exception as exc:  # a tool error, never a traceback to the caller
            log.exception("tool %s failed", name)
            return _error(InternalError(f"{type(exc).__name__}: {str(exc)[:500]}",
                                        fix="report this with the server's log"))
    data = tools.jsonable(result)
    return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(data))],
                                structured_content=data if isinstance(data, dict) else
                                {"result": data})


def _refuse(name: str, arguments: dict, agent: str, problem: ForgeError) -> types.CallToolResult:
    with tools.acting_as(agent):
        tools.record_refusal(TOOLS[name][1], arguments, problem)
    return _error(problem)


def _schema_problem(schema: dict, arguments: dict) -> ForgeError | None:
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(arguments),
                    key=lambda e: list(e.path))
    if not errors:
        return None
    first = errors[0]
    where = ".".join(str(p) for p in first.path)
    if first.validator == "additionalProperties" and isinstance(first.instance, dict):
        known = first.schema.get("properties", {})
        where = ".".join(filter(None, [where, min(k for k in first.instance if k not in known)]))
    return SchemaViolation(f"arguments do not match the tool's input schema: "
                           f"{first.message[:300]}", field=where or None,
                           fix="see the tool's inputSchema (tools/list)")


def _error(exc: ForgeError) -> types.CallToolResult:
    data = tools.jsonable(exc.to_dict())
    return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(data))],
                                structured_content=data, is_error=True)


def _token_agent(ctx) -> str | None:
    """The agent the request's bearer token names (set by the SDK's auth middleware)."""
    request = getattr(ctx, "request", None)
    user = request.scope.get("user") if request is not None else None
    token = getattr(user, "access_token", None)
    return getattr(token, "client_id", None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("forge-runner")
    except PackageNotFoundError:
        return "0"


# --- identity over HTTP ---------------------------------------------------------------------------

class AgentTokens:
    """The SDK's TokenVerifier over the registry's agent tokens: the token's agent, or None."""

    def __init__(self, db_url: str | None = None, *, limiter: anyio.CapacityLimiter):
        self.db_url = db_url
        self.limiter = limiter  # Lanes.tokens: never behind the agents' calls

    async def verify_token(self, token: str) -> AccessToken | None:
        agent = await anyio.to_thread.run_sync(
            functools.partial(agents.verify, token, url=self.db_url), limiter=self.limiter)
        if agent is None:
            return None
        return AccessToken(token="<redacted>", client_id=agent, scopes=[])


# --- transports ---------------------------------------------------------------------------------

def run_stdio(agent: str, lanes: Lanes | None = None) -> None:
    """Serve one client over stdin/stdout, as `agent`."""
    from mcp.server.stdio import stdio_server

    server = build_server(bound_agent=agent, lanes=lanes)

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    """The operator's bounds on HTTP sessions (`forge mcp --sessions-per-agent,
    --session-idle-s`): a token can hold no more than `per_agent` of them open (its agent's
    tokens together), and one with no request in flight for `idle_s` seconds is closed."""
    per_agent: int = 8
    idle_s: float = 15 * 60


def http_app(host: str, port: int, db_url: str | None = None, *, lanes: Lanes | None = None,
             sessions: SessionLimits = SessionLimits()):
    """The streamable-HTTP ASGI app at /mcp: bearer tokens required, DNS-rebinding
    protection on (loopback Host and Origin only), sessions bounded by `sessions`."""
    from mcp.server.auth.settings import AuthSettings

    lanes = lanes or Lanes()
    server = build_server(lanes=lanes)
    base = f"http://{host}:{port}"
    app = server.streamable_http_app(
        host=host, token_verifier=AgentTokens(db_url, limiter=lanes.tokens),
        session_idle_timeout=sessions.idle_s,
        auth=AuthSettings(issuer_url=base, resource_server_url=f"{base}/mcp",
                          validate_token_resource=False,  # forge's own tokens: verify() decides
                          required_scopes=[]))
    cap_sessions_per_agent(server.session_manager, sessions.per_agent)
    return app


def cap_sessions_per_agent(manager, per_agent: int) -> None:
    """Refuse a new session (503, as the SDK's own `max_sessions` does) to a caller whose
    agent holds `per_agent` open ones. The SDK admits each session in `_admit_session` with
    the caller's identity and keeps it in `_session_owners` until the session ends (client
    DELETE, idle timeout); its limit is for all callers together, so this wraps that one
    admission step to count the caller's own."""
    if not (hasattr(manager, "_admit_session") and hasattr(manager, "_session_owners")):
        # a newer SDK moved them: serve no sessions rather than unbounded ones
        raise RuntimeError("this mcp SDK has no StreamableHTTPSessionManager._admit_session "
                           "and _session_owners: the per-agent session cap cannot hold")
    admit = manager._admit_session

    def admit_within_cap(requestor):
        held = sum(owner == requestor for owner in manager._session_owners.values())
        if requestor is not None and held >= per_agent:
            log.warning("refusing a session to %s: it holds %d open", requestor["client_id"],
                        held)
            return None
        return admit(requestor)

    manager._admit_session = admit_within_cap


def run_http(host: str, port: int, *, lanes: Lanes | None = None,
             sessions: SessionLimits = SessionLimits()) -> None:
    import uvicorn

    if host not in LOOPBACK:
        raise SchemaViolation(f"--host {host!r} is not a loopback address", field="host",
                              fix="serve on 127.0.0.1 (put a TLS proxy in front to reach it "
                                  "from elsewhere)")
    uvicorn.run(http_app(host, port, lanes=lanes, sessions=sessions), host=host, port=port,
                log_level="warning")
