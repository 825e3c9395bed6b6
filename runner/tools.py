"""Skills and their audit trail.

A `Skill` declares a callable an agent can use (name, type, JSON Schema of its input, an
example); the module that defines the callable holds its Skill as a value (runner.api's
`TRAIN_SKILL`, listed in `SKILLS`). `register_tools(skills)` writes the given skills to the
`skills` table, idempotently. `@log_tool_call(skill)` writes one `tool_calls` row per call,
success, failure and dry run alike, in its own transaction, and never masks what the call
raised. The rows themselves are written by runner.registry.audit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from runner.errors import Forbidden
from runner.registry import audit

log = logging.getLogger(__name__)

_audit_url: ContextVar[str | None] = ContextVar("forge_audit_url", default=None)
_acting: ContextVar[str | None] = ContextVar("forge_acting_agent", default=None)
_operator: ContextVar[bool] = ContextVar("forge_operator", default=False)
_audited_as: ContextVar[str | None] = ContextVar("forge_audited_as", default=None)
_SUMMARY_OMIT = ("config", "sandbox")  # large; the call's input already pins them
_MAX_TEXT = 4000


def skill_id(name: str) -> str:
    """A stable id from the skill's name: 'Train Model Version' -> 'skill-train-model-version'."""
    return "skill-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclasses.dataclass(frozen=True)
class Skill:
    """A callable an agent can use, as the `skills` table describes it; `id` follows the name."""

    id: str = dataclasses.field(init=False)
    name: str
    description: str
    skill_type: str
    code_path: str  # "module:function"
    input_schema: dict  # JSON Schema (2020-12) of the call's keyword arguments
    example_input: dict

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", skill_id(self.name))


def register_tools(skills: Iterable[Skill], *, conn=None) -> list[dict]:
    """Write `skills` to the `skills` table; re-running updates them and keeps times_used.
    Returns them as rows (dicts), with the id each has in the table."""
    return audit.register_skills([dataclasses.asdict(s) for s in skills], conn=conn)


def audit_to(url: str | None) -> None:
    """Called inside a logged call: write its audit row to this database, not the default."""
    _audit_url.set(url)


@contextmanager
def _bound(var, value):
    """`var` is `value` inside the block, whatever it was outside."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def acting_as(agent_id: str):
    """Calls in this block are made by `agent_id` (authenticated by the caller's transport)."""
    if not isinstance(agent_id, str) or not agent_id:
        raise TypeError(f"acting_as takes an agent id, got {agent_id!r}")
    return _bound(_acting, agent_id)


def as_operator():
    """Calls in this block are the operator's: the host's own command line (`forge gate`),
    which may act on any agent's work. Never entered for a remote caller; an `acting_as`
    block inside it is that agent's again."""
    return _bound(_operator, True)


def is_operator() -> bool:
    """Whether the current call is the operator's (as_operator, and no agent acting)."""
    return _operator.get() and _acting.get() is None


def audited_as(caller: str):
    """Calls in this block are audited under `caller`, whatever agent they name: a front end
    that speaks for no agent (forge serve's page, `web`) never writes a row in an agent's name."""
    if not isinstance(caller, str) or not caller:
        raise TypeError(f"audited_as takes a caller name, got {caller!r}")
    return _bound(_audited_as, caller)


def log_tool_call(skill: Skill) -> Callable:
    """Decorator: one `tool_calls` row per call of the wrapped function, naming `skill`."""
    if not isinstance(skill, Skill):
        raise TypeError(f"log_tool_call takes a Skill, got {skill!r}")

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        takes_agent = "agent_id" in signature.parameters

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            token = _audit_url.set(None)
            started = time.perf_counter()
            try:
                acting = _acting.get()
                if acting is not None and takes_agent:
                    kwargs = _as_caller(signature, args, kwargs, acting)
                result = fn(*args, **kwargs)
            except BaseException as exc:
                _record(skill, signature, args, kwargs, started, error=exc)
                raise
            else:
                _record(skill, signature, args, kwargs, started, result=result)
                return result
            finally:
                _audit_url.reset(token)

        wrapper.skill = skill  # type: ignore[attr-defined]
        return wrapper
    return decorate


def record_refusal(skill: Skill, arguments: dict, error: BaseException) -> None:
    """The audit row of a call refused before it ran (its arguments broke the skill's schema,
    or the MCP server was busy for its agent)."""
    _record(skill, inspect.Signature(), (), dict(arguments), time.perf_counter(), error=error)


def _as_caller(signature: inspect.Signature, args: tuple, kwargs: dict, acting: str) -> dict:
    """The call's kwargs with `agent_id` the acting agent's; Forbidden when it names another."""
    try:
        named = signature.bind_partial(*args, **kwargs).arguments.get("agent_id")
    except TypeError:
        named = kwargs.get("agent_id")
    if named is not None and named != acting:
        raise Forbidden(f"this caller is agent {acting!r}, not {str(named)[:128]!r}",
                        field="agent_id",
                        fix="leave agent_id out (the token decides the agent) or pass your own")
    if named is None:
        kwargs = {**kwargs, "agent_id": acting}
    return kwargs


def _record(skill: Skill, signature: inspect.Signature, args: tuple, kwargs: dict,
            started: float, result: Any = None, error: BaseException | None = None) -> None:
    """Write the audit row; a failure here is logged, never raised over the call's outcome."""
    duration_ms = int((time.perf_counter() - started) * 1000)
    try:
        params = _params(signature, args, kwargs)
        caller = _audited_as.get() or _acting.get() or _agent(params)
        row = dict(id=f"call-{uuid.uuid4().hex}", agent_id=caller,
                   input_params=jsonable(params), success=error is None,
                   duration_ms=duration_ms, created_at=datetime.now(UTC))
        if error is None:
            row["output_summary"] = summarize(result)
        else:
            row["error_code"] = getattr(error, "reason", None) or type(error).__name__
            row["error_message"] = f"{type(error).__name__}: {error}"[:_MAX_TEXT]
            to_dict = getattr(error, "to_dict", None)
            if callable(to_dict):
                row["output_summary"] = jsonable(to_dict())
        audit.record_call(skill.name, row, url=_audit_url.get())
    except Exception as exc:  # noqa: BLE001 - auditing must not change the call's outcome
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("could not write the tool_calls row for %s: %s", skill.name, first_line)


def _params(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {"args": list(args), "kwargs": kwargs}
    params = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in params:
            params.update(params.pop(name))
    return params


def _agent(params: dict) -> str | None:
    agent = params.get("agent_id")
    if agent is None and params.get("config") is not None:
        try:
            agent = params["config"].get("agent_id")
        except Exception:  # noqa: BLE001 - no agent is better than no audit row
            agent = None
    return agent if isinstance(agent, str) else None


def summarize(result: Any) -> Any:
    """What the call returned, minus the bulky parts (the resolved config, the sandbox plan)."""
    if isinstance(result, dict):
        return jsonable({k: v for k, v in result.items() if k not in _SUMMARY_OMIT})
    return jsonable(result)


def jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON data: Decimal -> str, configs -> containers, dates -> ISO strings."""
    if depth > 20:
        return repr(value)[:_MAX_TEXT]
    if value is None or isinstance(value, (bool, int, str)):
        return value[:_MAX_TEXT] if isinstance(value, str) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), depth + 1)
    module = type(value).__module__ or ""
    if module.startswith("omegaconf"):
        try:
            return jsonable(OmegaConf.to_container(value, resolve=True), depth + 1)
        except Exception:  # noqa: BLE001 - an unresolvable config is recorded as written
            return jsonable(OmegaConf.to_container(value, resolve=False), depth + 1)
    return repr(value)[:_MAX_TEXT]
