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
- Calls run in worker threads: a blocking train_model_version holds its own thread, not
  the server.
"""

from __future__ import annotations

import functools
import json
import logging

import anyio
import jsonschema
import mcp_types as types
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel import Server

from runner import tools
from runner.api import CALLS
from runner.errors import ForgeError, InternalError, SchemaViolation
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


def build_server(bound_agent: str | None = None) -> Server:
    """The MCP server. `bound_agent`: the stdio server's agent; None over HTTP, where each
    request's bearer token names it."""

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
        run = functools.partial(_run, name, dict(arguments), agent)
        return await anyio.to_thread.run_sync(run)

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
        except Exception as exc:  # noqa: BLE001 - a tool error, never a traceback to the caller
            log.exception("tool %s failed", name)
            return _error(InternalError(f"{type(exc).__name__}: {str(exc)[:500]}",
                                        fix="report this with the server's log"))
    data = tools.jsonable(result)
    return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(data))],
                                structured_content=data if isinstance(data, dict) else
                                {"result": data})


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

    def __init__(self, db_url: str | None = None):
        self.db_url = db_url

    async def verify_token(self, token: str) -> AccessToken | None:
        agent = await anyio.to_thread.run_sync(
            functools.partial(agents.verify, token, url=self.db_url))
        if agent is None:
            return None
        return AccessToken(token="<redacted>", client_id=agent, scopes=[])


# --- transports ---------------------------------------------------------------------------------

def run_stdio(agent: str) -> None:
    """Serve one client over stdin/stdout, as `agent`."""
    from mcp.server.stdio import stdio_server

    server = build_server(bound_agent=agent)

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)


def http_app(host: str, port: int, db_url: str | None = None):
    """The streamable-HTTP ASGI app at /mcp: bearer tokens required, DNS-rebinding
    protection on (loopback Host and Origin only)."""
    from mcp.server.auth.settings import AuthSettings

    base = f"http://{host}:{port}"
    return build_server().streamable_http_app(
        host=host, token_verifier=AgentTokens(db_url),
        auth=AuthSettings(issuer_url=base, resource_server_url=f"{base}/mcp",
                          validate_token_resource=False,  # forge's own tokens: verify() decides
                          required_scopes=[]))


def run_http(host: str, port: int) -> None:
    import uvicorn

    if host not in LOOPBACK:
        raise SchemaViolation(f"--host {host!r} is not a loopback address", field="host",
                              fix="serve on 127.0.0.1 (put a TLS proxy in front to reach it "
                                  "from elsewhere)")
    uvicorn.run(http_app(host, port), host=host, port=port, log_level="warning")
