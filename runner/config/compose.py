"""Compose the training config. One path for `forge-train` and `train_model_version()`.

Both entry points load `conf/train.yaml` from the same directory, on top of the same typed
schema (`TrainConfig`, registered in Hydra's ConfigStore as `forge_train_schema`), and check
the result with the same `validate_config()`. The Python API and plain `forge-train` dry runs
compose through Hydra's Compose API (`compose_config()`); other `forge-train` runs through
`@hydra.main`. Hydra's own override parser checks override strings; struct mode and the
schema's types check keys and values; `validate_config()` checks the host's own ranges and
runs the trainer's manifest parser on the manifest the host would send. The training and
architecture schema is derived from trainers/manifest.py, the trainer's one declaration.

What a caller (an agent, an override string, a training_config) may set at all is one
table here ("who may set what"), checked before anything is composed by both entry points
and published in the skill's input_schema; everything else is the operator's.

Anything the caller got wrong becomes `InvalidOverride` with the offending string or field,
the problem, and a fix an agent can apply.

Composed configs are memoised per (config files, override strings): in memory, and on disk
under FORGE_CACHE_DIR/compose so that a new process need not import Hydra at all.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import threading
import typing
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.errors import InvalidOverride
from trainers import manifest as contract  # the trainer's settings, declared once

CONFIG_NAME = "train"
SCHEMA_NAME = "forge_train_schema"
GROUPS = ("parent", "dataset", "training", "sandbox", "tracking", "registry", "pricing")
TASKS = contract.TASKS
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
INT_MAX = 2**31 - 1  # caps live in INTEGER columns

QUOTING_FIX = ("quote a value holding '=', spaces or special characters: key='a=b' "
               "(on a shell: 'key=\"a=b\"'); see https://hydra.cc/docs/advanced/override_grammar/basic/")


# --- the typed schema: one dataclass per config group ------------------------------------------

def _from_contract(name: str, spec: type, names: tuple[str, ...], *, head=(),
                   defaults: dict | None = None, required: bool = False) -> type:
    """A config dataclass whose fields are `names` of the trainer's dataclass `spec`, with
    its types and defaults (`defaults` overrides them; `required`: the field has a value
    whatever its type says). Derived, so the config and the manifest cannot drift apart."""
    hints = typing.get_type_hints(spec)
    out = list(head)
    for key in names:
        tp, args = hints[key], typing.get_args(hints[key])
        if type(None) in args:  # `int | None` -> Optional[int]: what OmegaConf reads
            inner = next(a for a in args if a is not type(None))
            tp = inner if required else Optional[inner]
        f = spec.__dataclass_fields__[key]
        default = (defaults or {}).get(key, f.default)
        out.append((key, tp, field(default=MISSING if default is dataclasses.MISSING
                                   else default)))
    cls = dataclasses.make_dataclass(name, out)
    cls.__module__ = __name__  # pickled with composed configs (the disk cache)
    return cls


# parent: the registry artifact's id and family, then the architecture the trainer rebuilds
# (trainers/manifest.py ModelSpec, its defaults MODEL_DEFAULTS).
ParentConf = _from_contract(
    "ParentConf", contract.ModelSpec, tuple(contract.MODEL_DEFAULTS),
    head=[("artifact_id", str, field(default=MISSING)), ("family", str, field(default="scgpt"))],
    defaults=contract.MODEL_DEFAULTS, required=True)


@dataclass
class DatasetConf:
    artifact_id: str = MISSING
    source: Optional[str] = None
    format: str = MISSING
    label_key: Optional[str] = None


# training: the trainer's settings (trainers/manifest.py TrainingSpec) and the manifest's
# task, seed and num_threads. Their rules are the trainer's too: validate_config() checks the
# manifest the host would send.
_TrainingHead = _from_contract("_TrainingHead", contract.Manifest,
                               contract.CONFIG_TRAINING_FIELDS)
TrainingConf = _from_contract(
    "TrainingConf", contract.TrainingSpec,
    tuple(f.name for f in dataclasses.fields(contract.TrainingSpec)),
    head=[(f.name, typing.get_type_hints(_TrainingHead)[f.name], field(default=f.default))
          for f in dataclasses.fields(_TrainingHead)])


@dataclass
class SandboxConf:
    backend: str = "bwrap"
    grace_s: float = 10.0
    max_processes: int = 512
    tmp_size_gb: float = 4.0
    max_memory_gb: Optional[float] = 16.0  # cgroup v2 memory.max, else RLIMIT_AS (sandbox.py)
    max_output_gb: float = 20.0  # /job/out quota; over it the job is killed (output_quota)
    env_allowlist: List[str] = field(default_factory=list)


@dataclass
class TrackingConf:
    backend: str = "mlflow"
    tracking_uri: str = MISSING
    artifact_root: str = MISSING
    experiment_name: str = MISSING
    ui_url: str = "http://127.0.0.1:5000"
    detail_url: str = MISSING


@dataclass
class RegistryConf:
    db_url: Optional[str] = None
    blob_threshold_mb: float = 50.0
    min_free_gb: float = 2.0  # free space FORGE_HOME needs before a debit (runner/jobs/launch.py)
    expiry_margin_min: float = 10.0  # allocation expiry = cap + sandbox grace + this


@dataclass
class PricingConf:
    currency: str = "credits"
    price_per_hour: float = 0.5
    per_device: Dict[str, float] = field(default_factory=dict)


@dataclass
class PolicyConf:
    max_wall_time_cap_min: int = 1440
    max_vram_gb: int = 141
    max_devices: int = 8


@dataclass
class TrainConfig:
    parent: ParentConf = field(default_factory=ParentConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    training: TrainingConf = field(default_factory=TrainingConf)
    sandbox: SandboxConf = field(default_factory=SandboxConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    registry: RegistryConf = field(default_factory=RegistryConf)
    pricing: PricingConf = field(default_factory=PricingConf)
    policy: PolicyConf = field(default_factory=PolicyConf)
    agent_id: Optional[str] = None
    dry_run: bool = False
    wall_time_cap_min: int = 120
    vram_cap_gb: int = 24
    devices: int = 1
    device: str = "auto"
    allow_dirty: bool = False
    fit_budget: bool = False  # forge-train -m: run the jobs that fit the balance


def register_schema() -> None:
    """Put `TrainConfig` into Hydra's ConfigStore (train.yaml's first default). Idempotent;
    called before any composition, so importing this module does not import Hydra."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if f"{SCHEMA_NAME}.yaml" not in store.repo:
        store.store(name=SCHEMA_NAME, node=TrainConfig)


# --- where the configs live ----------------------------------------------------------------------

def config_dir() -> Path:
    from runner import settings

    return settings.config_dir()


@lru_cache(maxsize=32)
def _group_options(conf: str, group: str, _stamp: tuple) -> tuple[str, ...]:
    folder = Path(conf) / group
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.stem for p in folder.glob("*.yaml")))


def group_options(group: str) -> list[str]:
    """The options of a config group: the .yaml files in conf/<group>/."""
    conf = config_dir()
    return list(_group_options(str(conf), group, _stamp(conf)))


@lru_cache(maxsize=32)
def _artifact_options(conf: str, group: str, stamp: tuple) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _group_options(conf, group, stamp):
        node = OmegaConf.load(Path(conf) / group / f"{name}.yaml")
        artifact_id = node.get("artifact_id") if isinstance(node, DictConfig) else None
        if isinstance(artifact_id, str):
            out.setdefault(artifact_id, name)
    return out


def option_for_artifact(group: str, artifact_id: str) -> str | None:
    """The option of `group` (parent, dataset) whose artifact_id is `artifact_id`, if any."""
    conf = config_dir()
    return _artifact_options(str(conf), group, _stamp(conf)).get(artifact_id)


def _stamp(conf: Path) -> tuple:
    """Names, sizes and mtimes of every config file: an edit invalidates what we cached."""
    out = []
    for root, _dirs, files in os.walk(conf):
        for name in files:
            if name.endswith(".yaml"):
                st = os.stat(os.path.join(root, name))
                out.append((root, name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


# --- overrides ------------------------------------------------------------------------------------

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


@lru_cache(maxsize=1)
def _installed_launchers() -> tuple[str, ...]:
    """Launchers Hydra and its installed plugins register (basic, submitit_local, ...)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports hydra_plugins.*, which register their configs
    return tuple(name.removesuffix(".yaml")
                 for name in ConfigStore.instance().list("hydra/launcher"))


def launcher_options() -> list[str]:
    """conf/hydra/launcher/ and the launchers installed plugins provide."""
    return sorted({*group_options("hydra/launcher"), *_installed_launchers()})


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
                   "dataset", "hydra", "local")

MAX_OVERRIDES = 256
MAX_OVERRIDE_CHARS = 4096
MAX_NESTING = 8  # brackets in an override value; dict/list levels in training_config
MAX_KEYS = 1000  # keys and list items in training_config
MAX_STRING = 4096
ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # runner/registry/catalog.py

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


def training_keys() -> tuple[str, ...]:
    """The training settings a caller may set, as TrainingConf declares them."""
    return tuple(f.name for f in dataclasses.fields(TrainingConf))


def check_caller_overrides(overrides: Any, *, cli: bool = False,
                           multirun: bool = False) -> list[CallerLine]:
    """Refuse, before anything is composed, an override string a caller may not give.

    Plain string checks (no Hydra: a dry run served from the compose cache never imports
    it): the caps, interpolation in any spelling, and the key against the tables above.
    Values (types, options, sweeps, glob()) are Hydra's parser's and the schema's to check;
    parse_overrides() does it for every string composed. `cli`: forge-train, where the
    call's arguments are plain keys; `multirun`: forge-train -m.
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
        refused = _caller_key_error(key, line, cli=cli, multirun=multirun)
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
            f"valid keys here: {', '.join(sorted(training_keys()))}")
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
    if root in OPERATOR_GROUPS or root in _schema_keys(""):
        return refuse("operator_only", f"{key} is an operator setting; callers cannot set it",
                      f"drop it (the operator sets it in conf/ or conf/local/); {CALLER_FIX}")
    return refuse("unknown_key", f"{key}: no such key", f"check the spelling; {CALLER_FIX}")


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
    from runner.errors import InvalidArtifactId

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


def check_operator_settings(cfg: DictConfig, baseline: DictConfig) -> None:
    """Refuse a composed config (forge-train's, passed as `config=`) whose operator settings
    differ from `baseline`, what conf/ composes for the same artifacts: whoever composed it
    may only have changed what a caller may set."""
    ours = OmegaConf.to_container(baseline, resolve=False)
    theirs = OmegaConf.to_container(cfg, resolve=False) if is_config(cfg) else cfg
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


def check_caller_dict(data: Any, source: str = "training_config") -> None:
    """Refuse a training_config a caller may not give: over the caps, a key outside
    training.<setting> (the call's arguments are arguments), a value that is not a plain
    scalar, or an interpolation anywhere in a key or a value."""
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
                if name not in training_keys():
                    raise InvalidOverride(
                        f"{path}.{name}: no such training setting", field=f"{path}.{name}",
                        problem="unknown_key",
                        fix=f"valid keys here: {', '.join(sorted(training_keys()))}")
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
        if key in OPERATOR_GROUPS or key in _schema_keys(""):
            raise InvalidOverride(f"{path} is an operator setting; callers cannot set it",
                                  field=path, problem="operator_only", fix=CALLER_FIX)
        raise InvalidOverride(f"{path}: no such key", field=path, problem="unknown_key",
                              fix=f"check the spelling; {CALLER_FIX}")


def caller_schema() -> dict:
    """JSON Schema fragments for the skill's input_schema, derived from the tables above:
    `training_config` (training settings, nested or flat) and `overrides`."""
    hints = typing.get_type_hints(TrainingConf)
    settings = {name: _json_type(hints[name], name) for name in training_keys()}
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


def _json_type(tp: Any, name: str) -> dict:
    """A TrainingConf field's type as JSON Schema."""
    out: dict[str, Any] = {}
    args = typing.get_args(tp)
    nullable = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[base]
    out["type"] = [kind, "null"] if nullable else kind
    choices = {"task": contract.TASKS, "precision": contract.PRECISIONS,
               "class_weighting": contract.CLASS_WEIGHTINGS}.get(name)
    if choices:
        out["enum"] = list(choices)
    elif base is str:
        out["maxLength"] = MAX_STRING
    return out


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
    from runner.errors import InvalidConfig

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
            parsed = parse_overrides(overrides)
            cached = _compose_uncached(conf, [o.input_line for o in parsed], parsed)
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
    import hashlib
    import json

    from runner import settings

    digest = hashlib.sha256(json.dumps([*key, _code_stamp()]).encode()).hexdigest()
    return settings.cache_dir() / "compose" / f"{digest}.pkl"


@lru_cache(maxsize=1)
def _code_stamp() -> list:
    """Versions of what composes: this module and the trainer's contract (the schema),
    Hydra and OmegaConf."""
    from importlib.util import find_spec

    out = []
    for origin in (__file__, contract.__file__, find_spec("hydra").origin,
                   find_spec("omegaconf").origin):
        st = os.stat(origin)
        out.append([origin, st.st_size, st.st_mtime_ns])
    return out


def _load_composed(key: tuple) -> DictConfig | None:
    """The composed config for this key from the disk cache, on the typed schema."""
    import pickle

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
    import pickle
    import tempfile

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


def _compose_uncached(conf: Path, lines: list[str], parsed: list) -> DictConfig:
    from hydra import compose, initialize_config_dir

    register_schema()
    if not (conf / f"{CONFIG_NAME}.yaml").is_file():
        from runner.errors import InvalidConfig

        raise InvalidConfig(f"no {CONFIG_NAME}.yaml in the config directory {conf}",
                            field="FORGE_CONFIG_DIR", reason="config_dir_missing",
                            fix="unset FORGE_CONFIG_DIR or point it at forge-runner's conf/")
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().hydra  # inside forge-train's app (a sweep's job)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), job_name="forge_train",
                                   version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=lines)
    except Exception as exc:  # every composition failure is the caller's to fix
        raise explain(exc, parsed) from exc
    finally:
        GlobalHydra.instance().hydra = running


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


def _merge(cfg: DictConfig, data: dict, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        problem = _problem(exc)
        known = _schema_keys(key.rsplit(".", 1)[0] if "." in key else "")
        raise InvalidOverride(
            f"{source}: {key or '(root)'}: {_first_line(exc)}",
            field=f"{source}.{key}" if key else source, problem=problem,
            fix=_fix_for(problem, key, known)) from None
    except (TypeError, ValueError) as exc:
        raise InvalidOverride(f"{source}: {_first_line(exc)}", field=source, problem="type",
                              fix="use plain strings, numbers, booleans, lists and dicts") from None
    assert isinstance(merged, DictConfig)
    return merged


def _problem(exc: BaseException) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

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
        known = _schema_keys(parent)
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


def _schema_node(path: str) -> Any:
    """The dataclass (or type) the schema declares at `path` ("" is TrainConfig)."""
    node: Any = TrainConfig
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


@lru_cache(maxsize=64)
def _schema_keys(path: str) -> list[str]:
    node = _schema_node(path)
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) \
        else []


def expected_type(path: str) -> str | None:
    """'float', 'int', 'Optional[str]', ... for a schema field; None when not declared."""
    node = _schema_node(path) if path else None
    if node is None or dataclasses.is_dataclass(node):
        return None
    return node.__name__ if isinstance(node, type) else str(node).replace("typing.", "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- validation -----------------------------------------------------------------------------------

def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= INT_MAX


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (field, check, what it must be): the host's own settings. The trainer's (training.*, the
# architecture parent.*, the dataset's format) are the trainer's rules: _check_manifest().
_RULES: list[tuple[str, Any, str]] = [
    ("parent.artifact_id", lambda v: isinstance(v, str) and v != "", "a registry artifact id"),
    ("dataset.artifact_id", lambda v: isinstance(v, str) and v != "", "a registry artifact id"),
    ("sandbox.grace_s", lambda v: _finite(v) and 0 <= v <= 3600, "seconds in [0, 3600]"),
    ("sandbox.max_processes", _positive_int, "an integer >= 1"),
    ("sandbox.tmp_size_gb", lambda v: _finite(v) and v > 0, "a number > 0"),
    ("pricing.price_per_hour", lambda v: _finite(v) and v >= 0, "a number >= 0"),
    ("registry.blob_threshold_mb", lambda v: _finite(v) and v >= 0, "a number >= 0 (MB)"),
    ("agent_id", lambda v: v is None or (isinstance(v, str) and bool(AGENT_ID.match(v))),
     f"null or an id matching {AGENT_ID.pattern}"),
    ("wall_time_cap_min", _positive_int, "an integer >= 1 (minutes)"),
    ("vram_cap_gb", _positive_int, "an integer >= 1 (GiB)"),
    ("devices", _positive_int, "an integer >= 1"),
    ("policy.max_wall_time_cap_min", _positive_int, "an integer >= 1"),
    ("policy.max_vram_gb", _positive_int, "an integer >= 1"),
    ("policy.max_devices", _positive_int, "an integer >= 1"),
]


def validate_config(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Check resolved values against the rules above; return the resolved plain dict.

    Raises InvalidOverride with `field` (and the override string that set it, when there is
    one among `overrides`).
    """
    by_key = {override_key(line): line for line in overrides or []}
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise InvalidOverride(
            f"{key or 'config'}: {_first_line(exc)}", field=key or None,
            override=by_key.get(key), problem="type" if _problem(exc) == "type" else "unresolved",
            fix=f"give {key or 'every key'} a literal value"
                + (" (it is required)" if "Missing mandatory" in str(exc) else "")) from None
    assert isinstance(plain, dict)
    for path in _schema_paths():
        if _get(plain, path, _ABSENT) is _ABSENT:
            raise InvalidOverride(f"{path} is missing from the config", field=path,
                                  override=_deleting(overrides, path), problem="missing",
                                  fix=f"keep {path}: set it to a value instead of deleting it")
    for path, check, must_be in _RULES:
        value = _get(plain, path)
        if not check(value):
            raise InvalidOverride(f"{path} must be {must_be}, got {value!r}", field=path,
                                  override=by_key.get(path), problem="value",
                                  fix=f"set {path} to {must_be}")
    _check_manifest(plain, by_key)
    for name, price in (plain["pricing"].get("per_device") or {}).items():
        if not _finite(price) or price < 0:
            raise InvalidOverride(f"pricing.per_device.{name} must be a number >= 0",
                                  field=f"pricing.per_device.{name}", problem="value",
                                  fix="give a price per device-hour")
    devices = sorted(plain["pricing"].get("per_device") or {})
    if plain["device"] != "auto" and plain["device"] not in devices:
        raise InvalidOverride(
            f"device {plain['device']!r} has no price", field="device",
            override=by_key.get("device"), problem="unknown_option", options=["auto", *devices],
            fix=f"use device=auto or one of {', '.join(devices)}")
    return plain


# Manifest fields (trainers/manifest.py) and the config keys they come from, where the
# names differ (runner/jobs/launch.py build_manifest); model.* is parent.*, the rest keep theirs.
_MANIFEST_SOURCES = {"task": "training.task", "seed": "training.seed",
                     "num_threads": "training.num_threads", "dataset.name": "dataset.source",
                     "experiment_name": "tracking.experiment_name"}


def _check_manifest(plain: dict, by_key: dict[str, str]) -> None:
    """Build the manifest the host would send for `plain` and check it with the trainer's
    own parser: what the trainer would refuse after the debit is refused here, naming the
    config key that set it."""
    from runner.jobs.launch import build_manifest

    try:
        contract.parse_manifest(build_manifest(plain, "dry-run", "cpu", from_parent=True))
    except contract.ManifestError as exc:
        where = exc.field
        path = _MANIFEST_SOURCES.get(where) or (
            f"parent.{where[len('model.'):]}" if where.startswith("model.") else where)
        message = str(exc).split(f"{where}: ", 1)[-1]
        rule = message.split(", got ", 1)[0]
        raise InvalidOverride(f"{path} {rule}, got {_get(plain, path)!r}", field=path,
                              override=by_key.get(path), problem="value",
                              fix=(f"set {path} to {rule.removeprefix('must be ')}"
                                   if rule.startswith("must be ")
                                   else f"change {path} ({rule})")) from None


_ABSENT = object()


def _get(plain: dict, path: str, default: Any = None) -> Any:
    node: Any = plain
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


@lru_cache(maxsize=1)
def _schema_paths() -> tuple[str, ...]:
    """Every field the schema declares, dotted ('parent', 'parent.n_layers', ...)."""
    out: list[str] = []

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            out.append(path)
            if dataclasses.is_dataclass(f.default_factory):  # a group: field(default_factory=X)
                walk(f.default_factory, f"{path}.")

    walk(TrainConfig, "")
    return tuple(out)


def override_key(line: str) -> str:
    """'+training.lr=1' -> 'training.lr' (for naming the culprit in an error only)."""
    return line.split("=", 1)[0].lstrip("+~").strip()


def _deleting(overrides: list[str] | None, path: str) -> str | None:
    for line in overrides or []:
        key = override_key(line)
        if line.startswith("~") and (path == key or path.startswith(key + ".")):
            return line
    return None


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python data (what the dry run returns)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


def is_config(value: Any) -> bool:
    return isinstance(value, (DictConfig, ListConfig))
