"""Compose the training config. One path for `forge-train` and `train_model_version()`.

Both entry points load `conf/train.yaml` from the same directory (runner/config/options.py),
on top of the same typed schema (`TrainConfig` in runner/config/schema.py, registered in
Hydra's ConfigStore as `forge_train_schema`), and check the result with the same
`validate_config()` (runner/config/validate.py). The Python API and plain `forge-train` dry
runs compose through Hydra's Compose API (`compose_config()`); other `forge-train` runs
through `@hydra.main`. Hydra's own override parser checks override strings
(runner/config/overrides.py); struct mode and the schema's types check keys and values;
`validate_config()` checks the host's own ranges and runs the trainer's manifest parser on
the manifest the host would send.

What a caller may set at all is runner/config/caller.py's allowlist, checked by both entry
points before anything is composed; a config composed elsewhere (forge-train's, passed as
`config=`) may differ from conf/ only there (`check_operator_settings()`).

Anything the caller got wrong becomes `InvalidOverride` with the offending string or field,
the problem, and a fix an agent can apply (`explain()` for what Hydra and OmegaConf raise).

Composed configs are memoised per (config files, override strings): in memory, and on disk
under FORGE_CACHE_DIR/compose so that a new process need not import Hydra at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import tempfile
import threading
from collections import OrderedDict
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner import settings
from runner.config.caller import _caller_path, _check_training_config
from runner.config.options import _stamp, config_dir, config_groups
from runner.config.overrides import (
    QUOTING_FIX,
    _first_line,
    _fix_for,
    _problem,
    check_override_list,
    parse_overrides,
)
from runner.config.schema import register_schema, schema_keys
from runner.config.validate import _ABSENT, _get, validate_config
from runner.errors import InvalidConfig, InvalidOverride
from trainers import manifest as contract  # the schema's source: part of the cache key

CONFIG_NAME = "train"


# --- composition ----------------------------------------------------------------------------------

_lock = threading.RLock()


def compose_config(overrides: list[str] | None = None,
                   training_config: dict | None = None) -> DictConfig:
    """Compose conf/train.yaml with override strings, then merge `training_config` (a nested
    dict, keys at the config root) on top. Struct mode: unknown keys are errors.

    Returns the validated DictConfig (interpolations unresolved, as Hydra leaves them).
    """
    return compose_resolved(overrides, training_config)[0]


def compose_resolved(overrides: list[str] | None = None, training_config: dict | None = None,
                     *, writable: bool = True) -> tuple[DictConfig, dict]:
    """compose_config() and the config resolved to plain data, validated once.

    `writable=False` may return the cached, read-only config itself (no copy): for callers
    that only read it, such as train_model_version().
    """
    if training_config is not None:
        _check_training_config(training_config)
    cfg = _composed(overrides, writable)
    if training_config:
        cfg = _merge(cfg, training_config, "training_config")
    return cfg, validate_config(cfg, overrides=list(overrides or []))


def merge_config(cfg: DictConfig, data: dict, source: str) -> tuple[DictConfig, dict]:
    """Merge `data` (from `source`, named in errors) into a composed config; validate. A value
    of `data` that fails validation is the source's to fix (InvalidConfig), not the caller's."""
    merged = _merge(cfg, data, source)
    try:
        return merged, validate_config(merged)
    except InvalidOverride as exc:
        value = _get(data, exc.field or "", _ABSENT)
        if value is _ABSENT:
            raise
        raise InvalidConfig(f"the {source} gives {exc.field}={value!r}: {exc.message}",
                            field=exc.field, reason=f"invalid_{source}_value",
                            fix=f"correct the {source}'s record ({exc.fix})") from None


_cache: OrderedDict[tuple, DictConfig] = OrderedDict()
_CACHE_SIZE = 32
_DISK_CACHE_FILES = 512


def _composed(overrides: Any, writable: bool = True) -> DictConfig:
    """Hydra's Compose API, memoised in memory and on disk: the same config files and
    override strings compose the same config (interpolations such as ${oc.env:...} stay
    unresolved in what is kept). Only a miss parses the overrides and runs Hydra."""
    check_override_list(overrides)
    conf = config_dir()
    key = (str(conf), _stamp(conf), tuple(overrides or ()))
    with _lock:
        cached = _cache.get(key)
        if cached is None:
            cached = _load_composed(key)
        if cached is None:
            cached = _compose_parsed(conf, parse_overrides(overrides),
                                     config_groups(str(conf), key[1]))
            _store_composed(key, cached)
        OmegaConf.set_readonly(cached, True)  # shared: nobody may change the cached copy
        _cache[key] = cached
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    if not writable:
        return cached
    own = copy.deepcopy(cached)
    OmegaConf.set_readonly(own, None)
    return own


# A process's first composition costs more than the rest of a dry run (importing Hydra and
# composing ~0.3 s here), so composed configs are also kept on disk, keyed by the config
# files, the override strings and the code that composes. They are pickled DictConfigs (exact:
# types, flags, keys added with '+'), read only when owned by us and writable by no one else.

def _disk_cache_path(key: tuple) -> Path:
    digest = hashlib.sha256(json.dumps([*key, _code_stamp()]).encode()).hexdigest()
    return settings.cache_dir() / "compose" / f"{digest}.pkl"


@lru_cache(maxsize=1)
def _code_stamp() -> list:
    """Versions of what composes: the modules of this package (the schema, the options, the
    override checks, this one), the trainer's contract (the schema's source), Hydra and
    OmegaConf."""
    package = sorted(str(p) for p in Path(__file__).parent.glob("*.py"))
    out = []
    for origin in (*package, contract.__file__, find_spec("hydra").origin,
                   find_spec("omegaconf").origin):
        st = os.stat(origin)
        out.append([origin, st.st_size, st.st_mtime_ns])
    return out


def _load_composed(key: tuple) -> DictConfig | None:
    """The composed config for this key from the disk cache, on the typed schema."""
    path = _disk_cache_path(key)
    try:
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        cfg = pickle.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 - missing, stale or corrupt: compose it again
        return None
    return cfg if isinstance(cfg, DictConfig) else None


def _store_composed(key: tuple, cfg: DictConfig) -> None:
    """Write the composed config atomically; best effort (a cache never fails a call)."""
    try:
        path = _disk_cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pkl")
        with os.fdopen(fd, "wb") as out:
            out.write(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
        entries = sorted(path.parent.glob("*.pkl"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[:-_DISK_CACHE_FILES] if len(entries) > _DISK_CACHE_FILES else []:
            old.unlink(missing_ok=True)
    except (OSError, pickle.PicklingError):
        pass


def _compose_parsed(conf: Path, parsed: list, groups: frozenset[str]) -> DictConfig:
    """What Hydra composes for `parsed`, composing config files only for a new choice of them.

    Hydra builds the defaults list from the overrides that name config groups (`groups`),
    composes those files, then applies the other overrides, the values, to the result
    (`ConfigLoaderImpl._apply_overrides_to_config`). Here the files' composition is kept like
    any other (`_composed` of the group overrides alone) and the values are applied, by that
    same Hydra function, to a copy: calls that differ only in values (a sweep's jobs, an
    agent's probes) compose the files once (a call 15 ms instead of 98 ms, measured).
    A choice of files that fails goes the whole way through Hydra, so that its error is the
    one Hydra's whole composition gives."""
    values, choices = [], []
    for override in parsed:
        (values if _is_value_override(override, groups) else choices).append(override)
    if not values:
        return _compose_uncached(conf, choices)
    try:
        cfg = _composed([o.input_line for o in choices])
    except InvalidOverride:
        cfg = None
    if cfg is None:  # a choice Hydra refuses: its whole composition says how, outside the
        # except block, so that this refusal is not in the chain explain() reads of that one
        return _compose_uncached(conf, parsed)
    # Hydra's own step, private API: hydra-core is pinned (pyproject.toml), and the test of
    # this path compares it with the whole composition
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    try:
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    except Exception as exc:  # what Hydra's composition raises here, explained alike
        raise explain(exc, parsed) from exc
    return cfg


def _is_value_override(override, groups: frozenset[str]) -> bool:
    """Does Hydra apply this override to the composed config (not to the defaults list)? Its
    rule: a key that is no config group, or a dict value. hydra.* and packages (@) always go
    the whole way."""
    key = override.key_or_group
    return ("@" not in key and key != "hydra" and not key.startswith(("hydra.", "hydra/"))
            and (key not in groups or isinstance(override.value(), dict)))


def _compose_uncached(conf: Path, parsed: list) -> DictConfig:
    """Hydra's whole composition of conf/ with the parsed overrides (its Compose API)."""
    from hydra import compose, initialize_config_dir

    register_schema()
    if not (conf / f"{CONFIG_NAME}.yaml").is_file():
        raise InvalidConfig(f"no {CONFIG_NAME}.yaml in the config directory {conf}",
                            field="FORGE_CONFIG_DIR", reason="config_dir_missing",
                            fix="unset FORGE_CONFIG_DIR or point it at forge-runner's conf/")
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().hydra  # inside forge-train's app (a sweep's job)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), job_name="forge_train",
                                   version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=[o.input_line for o in parsed])
    except Exception as exc:  # every composition failure is the caller's to fix
        raise explain(exc, parsed) from exc
    finally:
        GlobalHydra.instance().hydra = running


def _merge(cfg: DictConfig, data: dict, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        problem = _problem(exc)
        known = schema_keys(key.rsplit(".", 1)[0] if "." in key else "")
        raise InvalidOverride(
            f"{source}: {key or '(root)'}: {_first_line(exc)}",
            field=f"{source}.{key}" if key else source, problem=problem,
            fix=_fix_for(problem, key, known)) from None
    except (TypeError, ValueError) as exc:
        raise InvalidOverride(f"{source}: {_first_line(exc)}", field=source, problem="type",
                              fix="use plain strings, numbers, booleans, lists and dicts") from None
    assert isinstance(merged, DictConfig)
    return merged


def check_operator_settings(cfg: DictConfig, baseline: DictConfig) -> None:
    """Refuse a composed config (forge-train's, passed as `config=`) whose operator settings
    differ from `baseline`, what conf/ composes for the same artifacts: whoever composed it
    may only have changed what a caller may set."""
    ours = OmegaConf.to_container(baseline, resolve=False)
    theirs = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    stack: list[tuple[str, Any, Any]] = [("", ours, theirs)]
    while stack:
        prefix, a, b = stack.pop()
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                path = f"{prefix}{key}"
                if not _caller_path(path):
                    stack.append((f"{path}.", a.get(key, _ABSENT), b.get(key, _ABSENT)))
            continue
        if a != b or type(a) is not type(b):
            path = prefix.rstrip(".") or "config"
            raise InvalidOverride(
                f"config sets {path}, an operator setting, to {b!r} (conf/ has {a!r})"
                if b is not _ABSENT else f"config lacks {path}", field=path,
                problem="operator_only",
                fix="compose the config with forge-train, or pass overrides instead of config")


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python data (what the dry run returns)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


# --- error mapping (shared with forge-train) ------------------------------------------------------

def explain(exc: BaseException, parsed: list) -> InvalidOverride:
    """Turn a Hydra/OmegaConf composition error into InvalidOverride with a fix."""
    if isinstance(exc, InvalidOverride):
        return exc
    from hydra.errors import MissingConfigException

    chain = _chain(exc)
    text = "\n".join(str(e) for e in chain)
    culprit = _culprit(text, parsed)
    line = culprit.input_line if culprit is not None else None
    key = culprit.key_or_group if culprit is not None else None
    oc = next((e for e in chain if isinstance(e, OmegaConfBaseException)), None)
    missing = next((e for e in chain if isinstance(e, MissingConfigException)), None)
    if missing is not None:
        options = list(getattr(missing, "options", None) or [])
        group = key.split("@")[0] if key else None
        return InvalidOverride(
            _first_line(missing), override=line, field=group, problem="unknown_option",
            options=options or None,
            fix=(f"use one of {group}={', '.join(options)}" if options and group
                 else "check the group and option names (ls conf/)"))
    if "Could not append" in text:
        return InvalidOverride(
            f"{key}: already in the config; '+' only adds new keys", override=line, field=key,
            problem="key_exists", fix=f"drop the '+': {line[1:] if line else 'key=value'}")
    if "does not support deletion" in text or "Could not delete" in text:
        return InvalidOverride(
            f"{key}: cannot be deleted ({_first_line(oc or exc)})", override=line, field=key,
            problem="delete", fix=f"set {key} to a value instead of deleting it")
    problem = _problem(oc) if oc is not None else "composition"
    if problem == "unknown_key" or "Could not override" in text:
        parent = key.rsplit(".", 1)[0] if key and "." in key else ""
        known = schema_keys(parent)
        hint = f"valid keys here: {', '.join(known)}; " if known else ""
        return InvalidOverride(
            f"{key or 'override'}: no such key in the config", override=line, field=key,
            problem="unknown_key",
            fix=f"{hint}fix the spelling, or use +{line or 'key=value'} to add a new key")
    if problem == "type":
        return InvalidOverride(f"{key or 'override'}: {_first_line(oc)}", override=line,
                               field=key, problem="type", fix=_fix_for("type", key or "", []))
    return InvalidOverride(f"cannot compose the config: {_first_line(oc or chain[-1])}",
                           override=line, field=key, problem="composition",
                           fix=f"check the override; {QUOTING_FIX}")


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [exc], {id(exc)}
    while True:
        nxt = out[-1].__cause__ or out[-1].__context__
        if nxt is None or id(nxt) in seen:
            return out
        out.append(nxt)
        seen.add(id(nxt))


def _culprit(text: str, parsed: list):
    for o in parsed:
        if o.input_line and o.input_line in text:
            return o
    for o in parsed:
        if f"'{o.key_or_group}'" in text or f"'{o.key_or_group.split('.')[-1]}'" in text:
            return o
    return parsed[0] if len(parsed) == 1 else None
