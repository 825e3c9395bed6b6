"""Each call's arguments, declared once: a pydantic model per call (names, types, bounds,
descriptions; the operator's defaults read from conf/train.yaml), and what is derived from it:

- `input_schema(model)`: the skill's JSON Schema (skills table, MCP), no extra keys allowed;
- `signature(model)` and `parse(model, args, kwargs)`: the Python call's signature, and its
  arguments checked by the model into typed errors ("agent_id is required", an unknown
  argument with "did you mean");
- `click_params(model)`: the options of `forge train` and `forge jobs submit`;
- `form_fields(model)`: the fields of forge serve's /tools form.

A field added to a model is in all of them. `less(model, *names)` is the same call less some
arguments (submit_training is train_model_version less the dry run's and the sweep's).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo

from runner import settings
from runner.config.schema import TrainConfig
from runner.errors import ForgeError, InvalidInput

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class Arguments(BaseModel):
    """A call's arguments. Strict: no coercion ("120" is not 120), no unknown argument."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              arbitrary_types_allowed=True)
    # The leading arguments the Python call also takes by position, in order.
    positional: ClassVar[tuple[str, ...]] = ()
    # Python-only arguments (a composed config): in no schema, option or form.
    python_only: ClassVar[frozenset[str]] = frozenset()
    # The typed error a malformed value of a field raises (default InvalidInput).
    errors: ClassVar[dict[str, type[ForgeError]]] = {}
    # Extra command-line spellings of a field (`--agent` for agent_id).
    flags: ClassVar[dict[str, tuple[str, ...]]] = {}


# --- the operator's defaults ------------------------------------------------------------------

@lru_cache(maxsize=8)
def _conf_defaults(conf: str, _stamp: tuple) -> dict:
    """The root's plain values: the config schema's, then conf/train.yaml's, then the
    machine's conf/local/default.yaml (`# @package _global_`), as composition merges them."""
    out = {f.name: f.default for f in dataclasses.fields(TrainConfig)
           if f.default is not dataclasses.MISSING}
    root = Path(conf)
    for path in (root / "train.yaml", root / "local" / "default.yaml"):
        if path.is_file():
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            out.update({k: v for k, v in data.items() if not isinstance(v, (dict, list))})
    return out


def conf_default(name: str) -> Any:
    """The operator's default for the root key `name` (conf/train.yaml, then conf/local/)."""
    conf = settings.config_dir()
    stamp = tuple(p.stat().st_mtime_ns if p.is_file() else None
                  for p in (conf / "train.yaml", conf / "local" / "default.yaml"))
    return _conf_defaults(str(conf), stamp)[name]


def from_conf(name: str) -> Callable[[], Any]:
    """A field's default_factory: the operator's value in conf/, read when the call is made."""
    factory = functools.partial(conf_default, name)
    factory.conf_key = name  # type: ignore[attr-defined]
    return factory


def default_of(field: FieldInfo) -> Any:
    """A field's default now (a conf/ default is read), or `inspect.Parameter.empty`."""
    if field.default_factory is not None:
        return field.default_factory()
    return inspect.Parameter.empty if field.is_required() else field.default


def public_fields(model: type[Arguments]) -> dict[str, FieldInfo]:
    return {n: f for n, f in model.model_fields.items() if n not in model.python_only}


# --- derived: the JSON Schema -----------------------------------------------------------------

def input_schema(model: type[Arguments]) -> dict:
    """The call's JSON Schema (2020-12): one property per public field, additionalProperties
    false; `X | None` as a type list, defaults as the operator's conf/ has them now."""
    raw = model.model_json_schema()["properties"]
    properties = {}
    for name, field in public_fields(model).items():
        spec = _plain(raw[name])
        default = default_of(field)
        if default is not inspect.Parameter.empty:
            spec["default"] = default
        properties[name] = spec
    required = [n for n, f in public_fields(model).items() if f.is_required()]
    return {"$schema": SCHEMA_DIALECT, "type": "object", "required": required,
            "additionalProperties": False, "properties": properties}


def _plain(spec: dict) -> dict:
    """pydantic's field schema without titles; anyOf [X, null] as X with type [X, "null"]."""
    spec = {k: v for k, v in spec.items() if k != "title"}
    options = spec.get("anyOf")
    if options and len(options) == 2 and {"type": "null"} in options:
        other = next(o for o in options if o != {"type": "null"})
        if isinstance(other.get("type"), str) and "anyOf" not in other:
            spec.pop("anyOf")
            spec = {**other, **spec, "type": [other["type"], "null"]}
    return spec


# --- derived: the Python call -----------------------------------------------------------------

def signature(model: type[Arguments]) -> inspect.Signature:
    """`positional` first (a required one after an optional one defaults to None: the model
    then says it is required), the rest keyword-only."""
    params, optional_seen = [], False
    for name, field in model.model_fields.items():
        default = default_of(field)
        if name in model.positional:
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            if default is inspect.Parameter.empty and optional_seen:
                default = None
            optional_seen = optional_seen or default is not inspect.Parameter.empty
        else:
            kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(name, kind, default=default,
                                        annotation=field.annotation))
    return inspect.Signature(params)


def declared(model: type[Arguments]):
    """Decorator: `fn(args: model)` becomes a call with `model`'s signature whose arguments
    are checked by `parse` before `fn` runs."""
    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(parse(model, args, kwargs))

        call.__signature__ = signature(model)  # type: ignore[attr-defined]
        call.arguments = model  # type: ignore[attr-defined]
        return call
    return decorate


def parse(model: type[Arguments], args: tuple = (), kwargs: dict | None = None) -> Arguments:
    """The call's arguments as `model`, or the typed error of the first thing wrong."""
    kwargs = dict(kwargs or {})
    if len(args) > len(model.positional):
        raise InvalidInput(f"at most {len(model.positional)} positional arguments, got "
                           f"{len(args)}", field=None,
                           fix=f"pass the rest by name ({', '.join(model.model_fields)})")
    given = dict(zip(model.positional, args))
    for name in kwargs:
        if name in given:
            raise InvalidInput(f"{name} is given twice", field=name,
                               fix=f"pass {name} once")
    given.update(kwargs)
    for name in given:
        if name not in model.model_fields:
            raise unknown_argument(name, list(public_fields(model)))
    for name, field in model.model_fields.items():
        if field.is_required() and given.get(name) is None:  # None: the signature's default
            raise model.errors.get(name, InvalidInput)(
                f"{name} is required", field=name, fix=f"pass {name}=...")
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        raise _typed(model, exc.errors()[0]) from None


def unknown_argument(name: str, known: list[str]) -> InvalidInput:
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return InvalidInput(f"unknown argument {str(name)[:80]!r}", field=str(name)[:80],
                        fix=f"{hint}the arguments are {', '.join(known)}")


def _typed(model: type[Arguments], error: dict) -> ForgeError:
    name = str(error["loc"][0]) if error["loc"] else None
    rule = error["msg"][0].lower() + error["msg"][1:]
    given = repr(error.get("input"))[:80]
    return model.errors.get(name, InvalidInput)(
        f"{name}: {rule}, got {given}", field=name,
        fix=f"pass {name} as the call's input_schema says")


# --- derived: command-line options and form fields --------------------------------------------

def kind_of(spec: dict) -> str:
    """'bool', 'int', 'str', 'list' or 'object': what a property of input_schema holds."""
    types = spec.get("type")
    types = [types] if isinstance(types, str) else [t for t in (types or []) if t != "null"]
    return {"boolean": "bool", "integer": "int", "string": "str", "array": "list"}.get(
        types[0] if len(types) == 1 else "", "object")


def click_params(model: type[Arguments], skip: tuple[str, ...] = (),
                 require: bool = True) -> list:
    """One click option per scalar property of the call's input_schema not in `skip`:
    `--name-with-dashes` (and the model's extra flags), typed and bounded as declared, its
    description as help; a required argument is a required option unless not `require`."""
    import click  # lazy: the API never needs click

    out = []
    for name, spec in input_schema(model)["properties"].items():
        kind = kind_of(spec)
        if name in skip or kind in ("list", "object"):
            continue
        names = [f"--{name.replace('_', '-')}", *model.flags.get(name, ()), name]
        default, help_text = spec.get("default"), spec.get("description", "")
        if kind == "bool":
            out.append(click.Option(names, is_flag=True, default=bool(default),
                                    help=help_text))
            continue
        ptype = (click.IntRange(spec.get("minimum"), spec.get("maximum")) if kind == "int"
                 else click.STRING)
        out.append(click.Option(names, type=ptype, default=default,
                                show_default=default is not None,
                                required=require and model.model_fields[name].is_required(),
                                help=help_text))
    return out


def form_fields(model: type[Arguments], skip: tuple[str, ...] = ()) -> list[dict]:
    """The fields of a form for the call, one per property of its input_schema not in
    `skip`: name, kind (bool: a checkbox, int: a number, str: text, list: one item a line),
    required, default, bounds, description. An object (a nested dict) has no field."""
    out = []
    for name, spec in input_schema(model)["properties"].items():
        kind = kind_of(spec)
        if name in skip or kind == "object":
            continue
        out.append({"name": name, "kind": kind,
                    "required": model.model_fields[name].is_required(),
                    "default": spec.get("default"), "min": spec.get("minimum"),
                    "max": spec.get("maximum"), "pattern": spec.get("pattern"),
                    "help": spec.get("description", "")})
    return out


def less(model: type[Arguments], *names: str, name: str, doc: str) -> type[Arguments]:
    """`model` without the fields `names`: the same declarations, never a copy."""
    kept = {n: (f.annotation, f) for n, f in model.model_fields.items() if n not in names}
    out = create_model(name, __base__=Arguments, __doc__=doc, **kept)
    out.positional = tuple(n for n in model.positional if n not in names)
    out.python_only = frozenset(model.python_only - set(names))
    out.errors = {k: v for k, v in model.errors.items() if k not in names}
    out.flags = {k: v for k, v in model.flags.items() if k not in names}
    return out
