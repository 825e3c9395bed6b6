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
- What tools/list says besides the schemas: annotations (read-only lookups; the calls that
  spend credits say so in their title, description and hints), and each tool's output
  schema (its result's top-level keys and types; the result is its structured content).
- A schema error names the key and the rule ("training_config.lrr: unknown key (did you
  mean lr?)"), not jsonschema's "not valid under any of the given schemas".
- A blocking call whose request carries a progressToken gets notifications/progress every
  few seconds while it runs: the seconds the host has seen it run, out of its cap.
- Over HTTP, a 401 advertises no OAuth metadata: forge's tokens come from `forge agents
  issue`, and there is no authorization server to discover.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import time

import anyio
import jsonschema
import mcp_types as types
from jsonschema.exceptions import best_match
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


# --- what each tool does and returns (tools/list) ---------------------------------------------

# Tools that debit the calling agent's credits before they run (not as a dry run). Spending
# cannot be undone by the caller, so they are marked destructive: a client asks before it
# calls one. A retry of the same request returns the first one's job or result (its
# request key), so they are idempotent.
SPENDS_CREDITS = frozenset({"train_model_version", "submit_training", "evaluate_candidate"})
READ_ONLY = frozenset({"describe_options", "lineage", "model_show", "job_status", "job_log"})
IDEMPOTENT = SPENDS_CREDITS | {"cancel_job"}  # cancelling a settled job returns its state


def tool_annotations(name: str, skill: tools.Skill) -> types.ToolAnnotations:
    """The MCP hints: read-only lookups; the rest (credit-spending calls, cancel_job, which
    stops a job) destructive, idempotent where a retry changes nothing more. Every tool
    acts on this server's registry alone (openWorldHint false)."""
    if name in READ_ONLY:
        return types.ToolAnnotations(title=skill.name, read_only_hint=True,
                                     open_world_hint=False)
    return types.ToolAnnotations(title=tool_title(name, skill), read_only_hint=False,
                                 destructive_hint=True, idempotent_hint=name in IDEMPOTENT,
                                 open_world_hint=False)


def tool_title(name: str, skill: tools.Skill) -> str:
    return f"{skill.name} (spends credits)" if name in SPENDS_CREDITS else skill.name


def tool_description(name: str, skill: tools.Skill) -> str:
    if name not in SPENDS_CREDITS:
        return skill.description
    free = ("dry_run=true spends nothing" if "dry_run" in TOOLS[name][2].get("properties", {})
            else "train_model_version(dry_run=true) estimates without spending")
    return (f"SPENDS CREDITS: debits the agent's balance by the estimate before the job runs "
            f"(the unused time is refunded); {free}. {skill.description}")


def _t(*names: str) -> dict:
    return {"type": list(names) if len(names) > 1 else names[0]}


# Money: an amount with its currency (its exact shape is runner.api's).
_COST = {"type": "object", "description": "what the job costs, each amount with its currency"}
_MONEY = _t("object", "string", "number", "null")


def _object(required: list[str], description: str = "", **properties) -> dict:
    """A result's schema: its top-level keys and their types; more keys may follow."""
    out = {"type": "object", "required": required, "properties": properties}
    if description:
        out["description"] = description
    return out


_JOB = _object(
    ["job_id", "status", "agent_id", "cost"],
    "a job as its caller sees it: progress while it runs, the result or error once it ended",
    job_id=_t("string"), status=_t("string"), agent_id=_t("string"),
    engine=_t("string", "null"), engine_job_id=_t("string", "null"),
    submitted_at=_t("string", "null"), started_at=_t("string", "null"),
    ended_at=_t("string", "null"), mlflow_run_id=_t("string", "null"), cost=_COST,
    progress=_t("object"), result=_t("object"), error=_t("object"), existing=_t("boolean"))
_DRY_RUN = dict(would_launch=_t("boolean"), reasons=_t("array"), estimate=_t("object"),
                balance=_MONEY, code=_t("object", "null"),
                agent_id=_t("string", "null"))
OUTPUT_SCHEMAS = {
    "train_model_version": {"type": "object", "anyOf": [
        _object(["would_launch", "reasons"], "dry_run=true: whether it would launch, and why not",
                **_DRY_RUN, config=_t("object", "null"), request_key=_t("string", "null"),
                parent_artifact_id=_t("string"), dataset_artifact_id=_t("string")),
        _object(["artifact_id", "lifecycle_state", "cost"], "the registered candidate version",
                artifact_id=_t("string"), version_number=_t("integer"),
                parent_artifact_id=_t("string", "null"), lifecycle_state=_t("string"),
                cost=_COST, gpu_allocation_id=_t("string"),
                eval_metrics=_t("object", "null"), mlflow=_t("object"),
                code_commit_sha=_t("string", "null"), detail_url=_t("string", "null"),
                mlflow_url=_t("string", "null"))]},
    "submit_training": _JOB,
    "job_status": _JOB,
    "cancel_job": _JOB,
    "job_log": _object(["job_id", "lines"], "the last lines of the job's log",
                       job_id=_t("string"), status=_t("string", "null"),
                       lines={"type": "array", "items": _t("string")}),
    "evaluate_candidate": {"type": "object", "anyOf": [
        _object(["would_launch", "reasons"], "dry_run=true: whether it would launch, and why not",
                **_DRY_RUN, candidate_artifact_id=_t("string"), gate=_t("string"),
                rules=_t("object"), comparators=_t("object")),
        _object(["candidate_artifact_id", "gate", "decision", "comparisons"],
                "the gate's decision, recorded on the candidate",
                candidate_artifact_id=_t("string"), gate=_t("string"), decision=_t("string"),
                notes=_t("string", "null"), recorded=_t("boolean"),
                lifecycle_state=_t("string"), promotion_state=_t("string", "null"),
                is_latest=_t("boolean"), comparisons=_t("array"),
                allocation_id=_t("string", "null"), cost=_t("object", "null"),
                mlflow=_t("object"), warnings=_t("array"))]},
    "describe_options": _object(
        ["artifacts", "groups", "training_keys", "arguments"],
        "what a caller may choose: registered artifacts, training options and keys, limits",
        artifacts=_t("object"), groups=_t("object"), training_keys=_t("object"),
        families=_t("object"), training_defaults=_t("object"), arguments=_t("object"),
        pricing=_t("object"), operator_only=_t("array")),
    "lineage": _object(["artifact_id", "ancestors", "children"],
                       "the version's ancestors (root first, itself last) and children",
                       artifact_id=_t("string"), ancestors=_t("array"), children=_t("array")),
    "model_show": _object(["id", "version"], "the model version, its links and evaluations",
                          id=_t("string"), title=_t("string", "null"),
                          version_number=_t("integer"), lifecycle_state=_t("string"),
                          version=_t("object"), links=_t("array", "object"),
                          evaluations=_t("array")),
}


def mcp_tool(name: str) -> types.Tool:
    """The tool as tools/list shows it: the skill's input schema, what it returns, its hints."""
    _call, skill, schema = TOOLS[name]
    return types.Tool(name=name, title=tool_title(name, skill),
                      description=tool_description(name, skill), input_schema=schema,
                      output_schema=OUTPUT_SCHEMAS.get(name),
                      annotations=tool_annotations(name, skill))


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
        return types.ListToolsResult(tools=[mcp_tool(name) for name in TOOLS])

    async def call_tool(ctx, params) -> types.CallToolResult:
        agent = bound_agent or _token_agent(ctx)
        if agent is None:  # the bearer middleware lets no such request through
            return _error(InternalError("no authenticated agent for this request"))
        name, arguments = params.name, params.arguments or {}
        if name not in TOOLS:
            return _error(SchemaViolation(f"no tool {name[:100]!r}", field="name",
                                          fix=f"one of {', '.join(TOOLS)}"))
        arguments = dict(arguments)

        async def work() -> types.CallToolResult:
            try:
                return await lanes.run(agent, name, arguments,
                                       functools.partial(_run, name, arguments, agent))
            except Busy as exc:  # audited like a call its schema refuses
                return await anyio.to_thread.run_sync(
                    functools.partial(_refuse, name, arguments, agent, exc),
                    limiter=lanes.short)

        if not blocks(name, arguments):
            return await work()
        return await _reporting_progress(ctx, _cap_s(arguments), work)

    return Server(SERVER_NAME, version=_version(),
                  instructions=("forge-runner: fine-tune a registered parent model on a "
                                "registered dataset into a linked candidate version. Start "
                                "with describe_options; train_model_version(dry_run=true) "
                                "estimates; submit_training + job_status run asynchronously."),
                  on_list_tools=list_tools, on_call_tool=call_tool)


# How often a blocking call tells a client that asked (a progressToken) that it still runs.
PROGRESS_EVERY_S = 5.0


async def _reporting_progress(ctx, cap_s: float | None, work):
    """`await work()`, sending notifications/progress while it runs when the request carries
    a progressToken (the SDK sends nothing otherwise): the seconds since the call began,
    out of the wall-time cap, measured here on the host, never read from the job."""
    async with anyio.create_task_group() as group:
        async def beat() -> None:
            start = time.monotonic()
            while True:  # progress must grow: past the cap it goes on, with no total
                elapsed = round(time.monotonic() - start, 1)
                if cap_s is None:
                    total, note = None, ""
                elif elapsed <= cap_s:
                    total, note = cap_s, f" of at most {cap_s:.0f} s (wall_time_cap_min)"
                else:
                    total, note = None, f", past its cap of {cap_s:.0f} s: stopping, settling"
                try:
                    await ctx.session.report_progress(elapsed, total,
                                                      f"running for {elapsed:.0f} s{note}")
                except Exception:  # noqa: BLE001 - a courtesy: never the call's failure
                    log.warning("progress notification failed; sending no more", exc_info=True)
                    return
                await anyio.sleep(PROGRESS_EVERY_S)

        group.start_soon(beat)
        try:
            return await work()
        finally:
            group.cancel_scope.cancel()


def _cap_s(arguments: dict) -> float | None:
    """The call's wall-time cap in seconds, when the caller gave one (the operator's
    default applies otherwise, unknown here)."""
    cap = arguments.get("wall_time_cap_min")
    ok = isinstance(cap, int) and not isinstance(cap, bool) and cap > 0
    return float(cap * 60) if ok else None


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
    """The arguments' first schema error, saying which key and which rule:
    "training_config.lrr: unknown key (did you mean lr?)", "wall_time_cap_min: 0 is less than
    the minimum of 1" (jsonschema's own "not valid under any of the given schemas" says
    neither)."""
    top = best_match(jsonschema.Draft202012Validator(schema).iter_errors(arguments))
    if top is None:
        return None
    leaves = _leaves(top)
    deepest = max(len(e.absolute_path) for e in leaves)
    leaves = [e for e in leaves if len(e.absolute_path) == deepest]
    said = {}  # (where, what) -> None: each distinct finding once, in order
    for error in leaves:
        said.setdefault(_finding(error, leaves), None)
    if len(said) == 1:
        (where, what), = said
        message = f"{where or 'arguments'}: {what}"
    else:  # the value fits none of the forms its key allows: say how each is missed
        where = _path(top.absolute_path)
        message = (f"{where or 'arguments'} matches none of its allowed forms: "
                   + "; ".join(f"{w}: {what}" for w, what in said))
        where = where or min(w for w, _ in said)
    return SchemaViolation(message[:600], field=where or None, fix=_fix(schema, top))


def _leaves(error) -> list:
    """The errors under an anyOf/oneOf that say what is wrong: each allowed form's, less
    the forms of another type than the value (a dict is not faulted for not being null)."""
    if error.validator not in ("anyOf", "oneOf") or not error.context:
        return [error]
    same_type = [e for e in error.context
                 if not (e.validator == "type" and e.absolute_path == error.absolute_path)]
    return [leaf for e in same_type or error.context for leaf in _leaves(e)]


def _finding(error, leaves: list) -> tuple[str, str]:
    """(where, what) for one error: an unknown key with the nearest known ones, a missing
    required key, a pattern refused (without the pattern's text), else jsonschema's words."""
    where = _path(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = {k for e in leaves if e.validator == "additionalProperties"
                 and e.absolute_path == error.absolute_path
                 for k in (e.schema.get("properties") or {})}
        unknown = sorted(k for k in error.instance if k not in (error.schema.get("properties")
                                                                or {}))
        key = str(unknown[0]) if unknown else "?"
        if key in known:  # a key of another of the value's allowed forms
            return _join(where, key), "not allowed in this form"
        near = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        return _join(where, key), f"unknown key{hint}"
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance]
        if missing:
            return _join(where, missing[0]), "missing, and it is required"
    if error.validator == "type" and all(e.validator == "type" for e in leaves):
        wanted = sorted({t for e in leaves for t in _types(e.validator_value)})
        return where, f"{_short(error.instance)} is not of type {' or '.join(wanted)}"
    if error.validator == "pattern":
        return where, f"{_short(error.instance)} is not of the allowed form"
    return where, error.message[:300]


def _fix(schema: dict, error) -> str:
    """Where to read the rule: the top-level argument's description when it has one."""
    key = next(iter(error.absolute_path), None)
    if error.validator in ("additionalProperties", "required") and not error.absolute_path:
        return "see the tool's inputSchema (tools/list) for its arguments"
    spec = (schema.get("properties") or {}).get(key) or {}
    if spec.get("description"):
        return f"{key}: {spec['description']}"[:500]
    return "see the tool's inputSchema (tools/list)"


def _path(path) -> str:
    out = ""
    for part in path:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _types(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        # forge's tokens come from `forge agents issue`, not from an OAuth server: with no
        # resource_server_url the 401 advertises no OAuth metadata (it named an authorization
        # server whose metadata answered 404) and no metadata route is served.
        auth=AuthSettings(issuer_url=base, resource_server_url=None, required_scopes=[]))
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
