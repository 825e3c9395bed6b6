"""Override strings: Hydra's own parser reads them; what it or OmegaConf says is wrong with
one becomes `InvalidOverride` with the offending string, the problem and a fix.

Every string composed goes through `parse_overrides()` (on a compose-cache miss) and
forge-train's `_run_hydra`: Hydra's grammar, then group options, sweeps and interpolation
checked here. Who may give which key at all is runner/config/caller.py's to say, before this.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from runner.config.options import GROUPS, group_options, launcher_options
from runner.config.schema import expected_type
from runner.errors import InvalidOverride

QUOTING_FIX = ("quote a value holding '=', spaces or special characters: key='a=b' "
               "(on a shell: 'key=\"a=b\"'); see https://hydra.cc/docs/advanced/override_grammar/basic/")


@lru_cache(maxsize=1)
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@lru_cache(maxsize=1024)
def _parse_one(line: str):
    """Hydra's parser (ANTLR, ~1 ms a line) memoised: agents repeat the same overrides."""
    return _parser().parse_override(line)


def parse_overrides(overrides: list[str] | tuple[str, ...] | None, *,
                    allow_sweeps: bool = False) -> list:
    """Parse override strings with Hydra's parser; check group options and literal values.

    Returns Hydra `Override` objects. Raises InvalidOverride naming the offending string.
    Sweeps (`a=1,2`) are refused unless `allow_sweeps` (forge-train -m).
    """
    check_override_list(overrides)
    if not overrides:
        return []
    from hydra.errors import HydraException

    parsed = []
    for i, line in enumerate(overrides):
        try:
            override = _parse_one(line)
        except (HydraException, OmegaConfBaseException, ValueError, RecursionError) as exc:
            raise InvalidOverride(
                f"cannot parse override {line!r}: {_first_line(exc)}", override=line,
                field=f"overrides[{i}]", problem="syntax",
                fix=f"write key=value, +key=value (new key) or ~key (delete); {QUOTING_FIX}",
            ) from None
        _check_override(override, line, i, allow_sweeps)
        parsed.append(override)
    return parsed


def check_override_list(overrides: Any) -> None:
    """None, or a list of strings; anything else is InvalidOverride."""
    if overrides is None:
        return
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, (list, tuple)):
        raise InvalidOverride(
            f"overrides must be a list of strings, got {type(overrides).__name__}",
            field="overrides", problem="type",
            fix='pass a list, e.g. ["training.lr=1e-4", "training=pretrain_mgm"]')
    for i, line in enumerate(overrides):
        if not isinstance(line, str):
            raise InvalidOverride(f"overrides[{i}] is a {type(line).__name__}, not a string",
                                  field=f"overrides[{i}]", problem="type",
                                  fix="pass each override as a 'key=value' string")


def _check_override(override, line: str, index: int, allow_sweeps: bool = False) -> None:
    where = f"overrides[{index}]"
    key = override.key_or_group
    if not key:
        raise InvalidOverride(f"override {line!r} has no key", override=line, field=where,
                              problem="syntax", fix="write key=value")
    if override.is_sweep_override() and not allow_sweeps:
        raise InvalidOverride(
            f"override {line!r} is a sweep; one call trains one config", override=line,
            field=where, problem="sweep",
            fix="give a single value, or run a sweep with forge-train -m")
    if _has_interpolation(line):
        raise _interpolation_error(line, where)
    group = key.split("@", 1)[0]
    known = override.package is None and group in _known_groups() and not override.is_delete()
    options = _options(group) if known else []
    values = _values(override, options)
    if any(_has_interpolation(v) for v in values):
        raise _interpolation_error(line, where)
    if known:
        for value in values:
            if not isinstance(value, str) or value not in options:
                raise InvalidOverride(
                    f"{value!r} is not an option of config group {group!r}", override=line,
                    field=group, problem="unknown_option", options=options,
                    fix=(f"use one of {group}={', '.join(options)}" if options else
                         f"conf/{group}/ has no options; add conf/{group}/{value}.yaml"))


def _values(override, options: list[str]) -> list:
    """The value, or every value of a sweep (a glob() picks among `options`); [] when Hydra
    cannot enumerate them here (interval(): numbers, checked when composed)."""
    from hydra.core.override_parser.types import Glob

    try:
        value = override.value()
        if isinstance(value, Glob):
            return value.filter(options) if options else [value]
        if override.is_sweep_override():
            return list(override.sweep_iterator())
        return [value]
    except Exception:  # noqa: BLE001 - composition reports real problems
        return []


def _known_groups() -> tuple[str, ...]:
    return (*GROUPS, "local", "sweep", "hydra/launcher")


def _options(group: str) -> list[str]:
    return launcher_options() if group == "hydra/launcher" else group_options(group)


def _has_interpolation(value: Any) -> bool:
    """Could OmegaConf read an interpolation (`${...}`, resolvers such as oc.env) in `value`,
    or in any string inside it, in any spelling? `\\\\${` (an escaped backslash, then a live
    interpolation) and `$\\{` (Hydra unescapes `\\{`) are ones; `\\${` is not, but callers
    never need a literal `${`, so any `${` once backslashes are dropped, and any backslash
    next to a `$`, counts. Iterative: nesting depth is no limit here."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "${" in item.replace("\\", "") or "\\$" in item or "$\\" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _interpolation_error(line: str, where: str) -> InvalidOverride:
    return InvalidOverride(
        f"override {line!r} holds an interpolation (${{...}}) or an escaped one",
        override=line, field=where, problem="interpolation",
        fix="give a literal value, without '${' and without a backslash next to '$'")


def override_key(line: str) -> str:
    """'+training.lr=1' -> 'training.lr' (for naming the culprit in an error only)."""
    return line.split("=", 1)[0].lstrip("+~").strip()


# --- what went wrong, and the fix: shared by composition, merging and validation ------------------

def _problem(exc: BaseException) -> str:
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return "unknown_key"
    if isinstance(exc, ValidationError):
        return "type"
    return "value"


def _fix_for(problem: str, key: str, known: list[str]) -> str:
    if problem == "unknown_key":
        hint = f"valid keys here: {', '.join(known)}" if known else "check the spelling"
        return f"{hint}; to add a new key use +{key}=value"
    if problem == "type":
        expected = expected_type(key)
        what = f"a value of type {expected}" if expected else "a value of the declared type"
        return f"give {key or 'the value'} {what}"
    return QUOTING_FIX


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
