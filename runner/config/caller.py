"""What a caller may set: the allowlist tables, the caps, and the checks every front door runs
before anything is composed or debited (README: What a caller may set). Also the override
lines the host itself writes for a call's arguments and artifact ids, and `caller_schema()`,
the same allowlist as JSON Schema for the skill's input_schema.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any

from runner.config.options import group_options, option_for_artifact
from runner.config.overrides import (
    _fix_for,
    _has_interpolation,
    _interpolation_error,
    check_override_list,
    override_key,
    parse_overrides,
)
from runner.config.schema import TrainingConf, schema_keys, training_keys
from runner.errors import InvalidArtifactId, InvalidOverride
from runner.registry.ids import ARTIFACT_ID
from trainers import family as families
from trainers import manifest as contract

# --- who may set what -----------------------------------------------------------------------------
# Callers (agents, override strings, training_config, skill requests) are untrusted; the
# operator (conf/, conf/local/, the environment) is not. These tables are everything a caller
# may set. train_model_version (api._compose), forge-train (train_app.run, with -m) and the
# skill's input_schema (caller_schema) all read them; anything else is `operator_only`.

# The call's own arguments: plain keys on forge-train; train_model_version takes them as
# arguments, and refuses them in overrides or training_config (problem "argument").
ARGUMENT_KEYS = ("agent_id", "wall_time_cap_min", "vram_cap_gb", "devices", "device",
                 "dry_run", "allow_dirty")
# forge-train's own: the artifacts (when no conf/ option names them) and -m's budget mode.
CLI_KEYS = ("parent_artifact_id", "dataset_artifact_id", "fit_budget")
# Groups whose conf/ option a caller may choose. In train_model_version the artifact ids
# choose parent and dataset; forge-train's parent_artifact_id/dataset_artifact_id must agree.
CHOICE_GROUPS = ("parent", "dataset", "training")
SWEEP_GROUPS = ("sweep",)  # forge-train -m only
HYDRA_GROUPS = ("hydra/launcher",)  # forge-train only: launcher_options()
# The subtree a caller sets key by key: training.<a field of TrainingConf>.
CALLER_SUBTREE = "training"
# Operator-only, named in errors and in the README: everything else, that is the
# sandbox, tracking, registry, pricing and policy settings, parent.* and dataset.* (the
# registry artifact describes them), hydra.*, the local group, '+' additions and '~' deletions.
OPERATOR_GROUPS = ("pricing", "policy", "sandbox", "registry", "tracking", "parent",
                   "dataset", "hydra", "local", "code")

MAX_OVERRIDES = 256
MAX_OVERRIDE_CHARS = 4096
MAX_NESTING = 8  # brackets in an override value; dict/list levels in training_config
MAX_KEYS = 1000  # keys and list items in training_config
MAX_STRING = 4096

# key=value with a plain key: what Hydra reads as (prefix, key, @package, value).
_CALLER_LINE = re.compile(
    r"(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z0-9_$][A-Za-z0-9_$./-]*)(?P<package>@[^=]*)?"
    r"(?:=(?P<value>.*))?", re.DOTALL)
CALLER_FIX = ("a caller may set training.<key>, the call's arguments and a choice among the "
              "conf/ options of parent, dataset and training (README: What a caller may set)")


@dataclass(frozen=True)
class CallerLine:
    line: str
    key: str
    value: str


def check_caller_overrides(overrides: Any, *, cli: bool = False, multirun: bool = False,
                           family_keys: bool = False) -> list[CallerLine]:
    """Refuse, before anything is composed, an override string a caller may not give.

    Plain string checks (no Hydra: a dry run served from the compose cache never imports
    it): the caps, interpolation in any spelling, and the key against the tables above.
    Values (types, options, sweeps, glob()) are Hydra's parser's and the schema's to check;
    parse_overrides() does it for every string composed. `cli`: forge-train, where the
    call's arguments are plain keys; `multirun`: forge-train -m; `family_keys`: a training
    key no built-in family has may be named (train_model_version: the parent's card may
    declare it; split_family_keys() holds it aside and the plan checks it by that card).
    """
    check_override_list(overrides)
    lines = list(overrides or ())
    if len(lines) > MAX_OVERRIDES:
        raise InvalidOverride(f"{len(lines)} overrides; at most {MAX_OVERRIDES}",
                              field="overrides", problem="too_many",
                              fix=f"give at most {MAX_OVERRIDES} overrides")
    out = []
    for i, line in enumerate(lines):
        where = f"overrides[{i}]"
        if len(line) > MAX_OVERRIDE_CHARS:
            raise InvalidOverride(f"{where} is {len(line)} characters; at most "
                                  f"{MAX_OVERRIDE_CHARS}", field=where, problem="too_long",
                                  override=line[:80] + "...",
                                  fix=f"keep each override under {MAX_OVERRIDE_CHARS} characters")
        if _has_interpolation(line):
            raise _interpolation_error(line, where)
        if _nesting(line) > MAX_NESTING:
            raise InvalidOverride(f"{where} nests brackets deeper than {MAX_NESTING}",
                                  override=line, field=where, problem="too_deep",
                                  fix="give a plain value")
        match = _CALLER_LINE.fullmatch(line)
        if match is None:
            parse_overrides([line], allow_sweeps=multirun)  # Hydra's own syntax error
            raise InvalidOverride(f"override {line!r} is not key=value", override=line,
                                  field=where, problem="syntax", fix="write key=value")
        key, value = match["key"], match["value"]
        what = ("deletes a key" if match["prefix"] == "~" else "adds a key" if match["prefix"]
                else "moves a config group (@package)" if match["package"] is not None
                else None)
        refused = None if family_keys and _family_key(key) else _caller_key_error(
            key, line, cli=cli, multirun=multirun)
        if what:
            raise InvalidOverride(
                f"{line!r} {what}: only the operator changes the config's shape",
                override=line, field=key, problem="operator_only",
                fix=CALLER_FIX if refused else f"write {key}=value")
        if value is None:
            raise InvalidOverride(f"override {line!r} has no value", override=line,
                                  field=where, problem="syntax", fix=f"write {key}=value")
        if refused:
            raise refused
        out.append(CallerLine(line, key, value))
    return out


def _caller_key_error(key: str, line: str, *, cli: bool,
                      multirun: bool) -> InvalidOverride | None:
    """None when a caller may set `key` through this front door; else the error to raise."""
    def refuse(problem: str, message: str, fix: str) -> InvalidOverride:
        return InvalidOverride(message, override=line, field=key, problem=problem, fix=fix)

    if key in CHOICE_GROUPS:
        if not cli and key in ("parent", "dataset"):
            return refuse("argument", f"{key} is chosen by the {key}_artifact_id argument",
                          f"pass {key}_artifact_id=... to train_model_version instead")
        return None
    if key in SWEEP_GROUPS:
        return None if multirun else refuse(
            "sweep", f"{key}=... chooses a sweep; one call trains one config",
            "run sweeps with forge-train -m sweep=<option>")
    if key in HYDRA_GROUPS:
        return None if cli else refuse(
            "operator_only", f"{key} is forge-train's; train_model_version runs one job",
            CALLER_FIX)
    if key.startswith(CALLER_SUBTREE + "."):
        name = key[len(CALLER_SUBTREE) + 1:]
        return None if name in training_keys() else refuse(
            "unknown_key", f"{key}: no such training setting",
            did_you_mean(name, training_keys(), prefix=f"{CALLER_SUBTREE}.")
            + f"valid keys here: {', '.join(sorted(training_keys()))}")
    if key in ARGUMENT_KEYS or key in CLI_KEYS:
        if cli:
            return None
        if key == "fit_budget":
            return refuse("sweep", "fit_budget applies to a sweep (forge-train -m)",
                          "drop it: train_model_version runs one job")
        return refuse("argument", f"{key} is set by the {key} argument",
                      f"pass {key}=... to train_model_version instead")
    if key in ("parent.artifact_id", "dataset.artifact_id"):
        arg = key.replace(".", "_")
        return refuse("argument", f"{key} is set by {arg}",
                      f"give {arg}=ID" if cli else f"pass {arg}=... to train_model_version")
    root = re.split(r"[./]", key, maxsplit=1)[0]
    if root in OPERATOR_GROUPS or root in schema_keys(""):
        return refuse("operator_only", f"{key} is an operator setting; callers cannot set it",
                      f"drop it (the operator sets it in conf/ or conf/local/); {CALLER_FIX}")
    return refuse("unknown_key", f"{key}: no such key",
                  did_you_mean(key, _caller_words(cli)) + f"check the spelling; {CALLER_FIX}")


def _family_key(key: str) -> str | None:
    """K of `training.K` when K is no config key but could be a card's training key."""
    name = key.removeprefix(CALLER_SUBTREE + ".")
    if name == key or name in training_keys() or not families.CARD_KEY.match(name):
        return None
    return name


def split_family_keys(checked: list[CallerLine], training_config: Any
                      ) -> tuple[list[str], Any, dict[str, tuple[Any, str | None]]]:
    """(override lines, training_config, family keys): the training keys no built-in family
    has (an external family's card's own, e.g. `training.hidden=64`) taken out of what is
    composed, as {key: (value, the override line or None)}. The lines were checked with
    `family_keys=True`, the dict with check_caller_dict(..., family_keys=True); a value is
    read with Hydra's override parser, and must be a single value. The plan checks each key
    by the parent's family (plan.py `_family_defaults`), before any debit."""
    lines, own = [], {}
    for c in checked:
        if (name := _family_key(c.key)) is None:
            lines.append(c.line)
            continue
        value = parse_overrides([c.line])[0].value()
        if isinstance(value, (dict, list, tuple)):
            raise InvalidOverride(f"{c.key} must be a single value", override=c.line,
                                  field=c.key, problem="type",
                                  fix=f"give {c.key} one number, string or boolean")
        own[name] = (value, c.line)
    training = (training_config or {}).get(CALLER_SUBTREE)
    if isinstance(training, dict) and any(k not in training_keys() for k in training):
        own.update({k: (v, None) for k, v in training.items() if k not in training_keys()})
        rest = {k: v for k, v in training.items() if k in training_keys()}
        training_config = {**training_config, CALLER_SUBTREE: rest}
    return lines, training_config, own


def did_you_mean(word: Any, choices, prefix: str = "") -> str:
    """'did you mean <closest>? ' when one of `choices` is close to `word` (difflib), else ''."""
    close = difflib.get_close_matches(str(word)[:200], list(choices), n=1)
    return f"did you mean {prefix}{close[0]}? " if close else ""


def _caller_words(cli: bool) -> list[str]:
    """The plain keys a caller may write, for 'did you mean'."""
    words = [*CHOICE_GROUPS, *(f"{CALLER_SUBTREE}.{k}" for k in training_keys())]
    return words + ([*ARGUMENT_KEYS, *CLI_KEYS] if cli else [])


def _nesting(text: str) -> int:
    """Deepest bracket nesting in `text` (quotes ignored: an upper bound is enough)."""
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def artifact_lines(group: str, artifact_id: str) -> list[str]:
    """The override lines the host writes for an artifact id (validated here, so it is safe
    inside quotes): the conf/ option describing it, when one does, and the id itself."""
    field_name = f"{group}_artifact_id"
    if not isinstance(artifact_id, str) or not ARTIFACT_ID.match(artifact_id):
        raise InvalidArtifactId(f"{field_name} {artifact_id!r} is not a valid artifact id",
                                field=field_name,
                                fix=f"use an id matching {ARTIFACT_ID.pattern}")
    option = option_for_artifact(group, artifact_id)
    return ([f"{group}={option}"] if option else []) + [f"{group}.artifact_id='{artifact_id}'"]


def call_lines(parent_artifact_id: str, dataset_artifact_id: str, *, agent_id: str | None,
               wall_time_cap_min: int, vram_cap_gb: int, dry_run: bool, allow_dirty: bool,
               devices: int | None = None, device: str | None = None) -> list[str]:
    """The override lines the host writes for a call's arguments (already validated by
    train_model_version; the device is checked here, since it is quoted into a line)."""
    if device is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", device):
        raise InvalidOverride(f"device {device!r} is not a device name", field="device",
                              problem="value", fix="pass device='auto' or a key of "
                                                   "pricing.per_device (cpu, h100, ...)")
    lines = [*artifact_lines("parent", parent_artifact_id),
             *artifact_lines("dataset", dataset_artifact_id),
             f"agent_id='{agent_id}'",
             f"wall_time_cap_min={wall_time_cap_min}", f"vram_cap_gb={vram_cap_gb}",
             f"dry_run={str(dry_run).lower()}", f"allow_dirty={str(allow_dirty).lower()}"]
    if devices is not None:
        lines.append(f"devices={devices}")
    if device is not None:
        lines.append(f"device='{device}'")
    return lines


def _caller_path(path: str) -> bool:
    root = path.split(".", 1)[0]
    return root == CALLER_SUBTREE or root in ARGUMENT_KEYS or root in CLI_KEYS


def cli_overrides(overrides: list[str], *, multirun: bool = False) -> list[str]:
    """forge-train's override strings checked as a caller's, with parent_artifact_id= and
    dataset_artifact_id= turned into the lines the host writes for them (artifact_lines)."""
    checked = check_caller_overrides(overrides, cli=True, multirun=multirun)
    out = [c.line for c in checked if c.key not in ("parent_artifact_id", "dataset_artifact_id")]
    for group in ("parent", "dataset"):
        ids = [c for c in checked if c.key == f"{group}_artifact_id"]
        if not ids:
            continue
        given = ids[-1]
        lines = artifact_lines(group, given.value)
        for choice in (c for c in checked if c.key == group):
            if f"{group}={choice.value}" not in lines:
                raise InvalidOverride(
                    f"{group}={choice.value} does not describe {given.line}",
                    override=choice.line, field=group, problem="argument",
                    fix=f"give {group}=<option> or {group}_artifact_id=ID, not both")
        out = [line for line in out if override_key(line) != group] + lines
    return out


def check_caller_dict(data: Any, source: str = "training_config", *,
                      family_keys: bool = False) -> None:
    """Refuse a training_config a caller may not give: over the caps, a key outside
    training.<setting> (the call's arguments are arguments), a value that is not a plain
    scalar, or an interpolation anywhere in a key or a value. `family_keys`: as
    check_caller_overrides'."""
    if data is None:
        return
    _check_training_config(data, source)
    for key, value in data.items():
        path = f"{source}.{key}"
        if key == CALLER_SUBTREE:
            if not isinstance(value, dict):
                raise InvalidOverride(f"{path} must be a mapping of training settings",
                                      field=path, problem="type",
                                      fix='pass {"training": {"lr": 1e-4}}')
            for name, setting in value.items():
                if name in OPERATOR_GROUPS:  # {"hydra": ...} given flat lands here
                    raise InvalidOverride(
                        f"{source}.{name} is an operator setting; callers cannot set it",
                        field=f"{source}.{name}", problem="operator_only", fix=CALLER_FIX)
                if name not in training_keys() and not (  # a card's key holds one value
                        family_keys and _family_key(f"{CALLER_SUBTREE}.{name}")
                        and not isinstance(setting, (dict, list, tuple))):
                    raise InvalidOverride(
                        f"{path}.{name}: no such training setting", field=f"{path}.{name}",
                        problem="unknown_key",
                        fix=did_you_mean(name, training_keys())
                        + f"valid keys here: {', '.join(sorted(training_keys()))}")
                if isinstance(setting, (dict, list, tuple)):
                    raise InvalidOverride(f"{path}.{name} must be a single value",
                                          field=f"{path}.{name}", problem="type",
                                          fix=_fix_for("type", f"training.{name}", []))
            continue
        if key == "fit_budget":
            raise InvalidOverride("fit_budget applies to a sweep (forge-train -m)", field=path,
                                  problem="sweep", fix="drop it: train_model_version runs one job")
        if key in ARGUMENT_KEYS or key in CLI_KEYS or (
                key in ("parent", "dataset") and isinstance(value, dict)
                and set(value) == {"artifact_id"}):
            arg = key if key in ARGUMENT_KEYS or key in CLI_KEYS else f"{key}_artifact_id"
            raise InvalidOverride(f"{source} sets {key}, an argument", field=key,
                                  problem="argument", fix=f"pass it as the {arg} argument")
        if key in OPERATOR_GROUPS or key in schema_keys(""):
            raise InvalidOverride(f"{path} is an operator setting; callers cannot set it",
                                  field=path, problem="operator_only", fix=CALLER_FIX)
        raise InvalidOverride(f"{path}: no such key", field=path, problem="unknown_key",
                              fix=did_you_mean(key, (CALLER_SUBTREE, *training_keys()))
                              + f"check the spelling; {CALLER_FIX}")


def caller_schema() -> dict:
    """JSON Schema fragments for the skill's input_schema, derived from the tables above:
    `training_config` (training settings, nested or flat) and `overrides`."""
    settings = training_key_schemas()
    nested = {"type": "object", "additionalProperties": False,
              "properties": {CALLER_SUBTREE: {"type": "object", "additionalProperties": False,
                                              "properties": settings}}}
    flat = {"type": "object", "additionalProperties": False, "properties": settings}
    choices = group_options("training")
    options = "|".join(re.escape(o) for o in choices)
    keys = "|".join(re.escape(k) for k in training_keys())
    return {
        "training_config": {
            "anyOf": [{"type": "null"}, nested, flat],
            "description": ("training settings only, nested ({\"training\": {\"lr\": 0.0001}}) "
                            "or flat ({\"lr\": 0.0001}); everything else is the operator's"),
        },
        "overrides": {
            "type": ["array", "null"], "maxItems": MAX_OVERRIDES,
            "items": {"type": "string", "maxLength": MAX_OVERRIDE_CHARS,
                      "pattern": rf"^(training=({options})|training\.({keys})=.*)$",
                      "not": {"pattern": r"\$\\*\{|\\\$|\$\\"}},
            "description": (f"Hydra override strings: training=<{' | '.join(choices)}> or "
                            "training.<key>=<value> for a key of training_config. No "
                            "interpolation, no '+' or '~'; pricing, policy, sandbox, registry, "
                            "tracking, parent.*, dataset.* and hydra.* are operator-only"),
        },
    }


def training_key_schemas() -> dict[str, dict]:
    """Each training key a caller may set, as JSON Schema: type, allowed values, range."""
    hints = typing.get_type_hints(TrainingConf)
    for fam in reversed(families.all_families()):  # a family's own type: null only where it
        hints.update(typing.get_type_hints(fam.training))  # means something (scGPT's first)
    return {name: _json_type(hints[name], name) for name in training_keys()}


def _family_table(part: str) -> dict:
    """Every family's `ranges` or `choices` in one table (a key two families share is
    described by the first: the parser checks each family's own on the manifest)."""
    out: dict = {}
    for fam in families.all_families():
        for key, value in getattr(fam, part).items():
            out.setdefault(key, value)
    return out


def _json_type(tp: Any, name: str) -> dict:
    """A TrainingConf field's type as JSON Schema."""
    out: dict[str, Any] = {}
    args = typing.get_args(tp)
    nullable = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[base]
    out["type"] = [kind, "null"] if nullable else kind
    choices = {"task": contract.TASKS, **_family_table("choices")}.get(name)
    if choices:
        out["enum"] = list(choices)
    elif base is str:
        out["maxLength"] = MAX_STRING
    out.update(_family_table("ranges").get(name, {}))  # the family's own range
    return out


def _check_training_config(data: Any, path: str = "training_config") -> None:
    """A mapping of string keys to plain data, within the caps, with no interpolation in any
    key or string. Walks iteratively: a deep dict is refused, never a RecursionError."""
    if not isinstance(data, dict):
        raise InvalidOverride(f"{path} must be a mapping, got {type(data).__name__}",
                              field=path, problem="type",
                              fix='pass a nested dict such as {"training": {"lr": 1e-4}}')
    stack: list[tuple[str, Any, int]] = [(path, data, 1)]
    count = 0
    while stack:
        where, node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise InvalidOverride(f"{where} nests deeper than {MAX_NESTING} levels",
                                  field=where, problem="too_deep", fix="flatten the value")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            count += 1
            if count > MAX_KEYS:
                raise InvalidOverride(f"{path} has more than {MAX_KEYS} keys and items",
                                      field=path, problem="too_many",
                                      fix=f"give at most {MAX_KEYS}")
            if isinstance(node, dict) and (not isinstance(key, str) or not key):
                raise InvalidOverride(f"{where} has a non-string key {key!r}", field=where,
                                      problem="type", fix="use string keys")
            here = f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]"
            for text in (key, value):
                if isinstance(text, str) and len(text) > MAX_STRING:
                    raise InvalidOverride(f"{here}: a string over {MAX_STRING} characters",
                                          field=here, problem="too_long",
                                          fix=f"keep strings under {MAX_STRING} characters")
                if isinstance(text, str) and _has_interpolation(text):
                    raise InvalidOverride(
                        f"{here} holds an interpolation (${{...}}) or an escaped one",
                        field=here, problem="interpolation",
                        fix="give a literal value, without '${' and without a backslash "
                            "next to '$'")
            if isinstance(value, (dict, list, tuple)):
                stack.append((here, value, depth + 1))
