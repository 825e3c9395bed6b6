"""Compose the training config. One path for `forge-train` and `train_model_version()`.

Both entry points load `conf/train.yaml` from the same directory, on top of the same typed
schema (`TrainConfig`, registered in Hydra's ConfigStore as `forge_train_schema`), and check
the result with the same `validate_config()`. The Python API and plain `forge-train` dry runs
compose through Hydra's Compose API (`compose_config()`); other `forge-train` runs through
`@hydra.main`. Hydra's own override parser checks override strings; struct mode and the
schema's types check keys and values; `validate_config()` checks ranges and choices.

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

CONFIG_NAME = "train"
SCHEMA_NAME = "forge_train_schema"
GROUPS = ("parent", "dataset", "training", "sandbox", "tracking", "registry", "pricing")
TASKS = ("finetune_celltype", "pretrain_mgm")
PRECISIONS = ("32", "bf16-mixed", "16-mixed", "auto")  # trainers/manifest.py
EMB_STYLES = ("continuous", "category")
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
INT_MAX = 2**31 - 1  # caps live in INTEGER columns

QUOTING_FIX = ("quote a value holding '=', spaces or special characters: key='a=b' "
               "(on a shell: 'key=\"a=b\"'); see https://hydra.cc/docs/advanced/override_grammar/basic/")


# --- the typed schema: one dataclass per config group ------------------------------------------

@dataclass
class ParentConf:
    artifact_id: str = MISSING
    family: str = "scgpt"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_hid: int = 256
    dropout: float = 0.1
    n_bins: int = 51
    input_emb_style: str = "continuous"


@dataclass
class DatasetConf:
    artifact_id: str = MISSING
    source: Optional[str] = None
    format: str = MISSING
    label_key: Optional[str] = None


@dataclass
class TrainingConf:
    task: str = MISSING
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    split_seed: Optional[int] = None
    precision: str = "32"
    max_seq_len: int = 257
    mask_ratio: float = 0.0
    early_stopping_patience: int = 3
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    eval_batch_size: Optional[int] = None
    warmup_steps: int = 0
    grad_clip: Optional[float] = 1.0
    class_weighting: str = "none"
    log_every_n_steps: int = 20
    include_zero_gene: bool = False
    num_threads: Optional[int] = None


@dataclass
class SandboxConf:
    backend: str = "bwrap"
    grace_s: float = 10.0
    max_processes: int = 512
    tmp_size_gb: float = 4.0
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


def register_schema() -> None:
    """Put `TrainConfig` into Hydra's ConfigStore (train.yaml's first default). Idempotent;
    called before any composition, so importing this module does not import Hydra."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if f"{SCHEMA_NAME}.yaml" not in store.repo:
        store.store(name=SCHEMA_NAME, node=TrainConfig)


# --- where the configs live ----------------------------------------------------------------------

def config_dir() -> Path:
    """conf/ at the repository root, or FORGE_CONFIG_DIR."""
    env = os.environ.get("FORGE_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    return path.resolve()


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
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
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
    values = _values(override)
    if any(_has_interpolation(v) for v in values):
        raise InvalidOverride(
            f"override {line!r} holds an interpolation (${{...}})", override=line, field=where,
            problem="interpolation",
            fix="give a literal value; escape a literal dollar-brace as \\${...}")
    group = key.split("@", 1)[0]
    if override.package is None and group in _known_groups() and not override.is_delete():
        options = group_options(group)
        for value in values:
            if not isinstance(value, str) or value not in options:
                raise InvalidOverride(
                    f"{value!r} is not an option of config group {group!r}", override=line,
                    field=group, problem="unknown_option", options=options,
                    fix=(f"use one of {group}={', '.join(options)}" if options else
                         f"conf/{group}/ has no options; add conf/{group}/{value}.yaml"))


def _values(override) -> list:
    """The value, or every value of a sweep; [] when Hydra cannot enumerate them here."""
    try:
        if override.is_sweep_override():
            return list(override.sweep_iterator())
        return [override.value()]
    except Exception:  # noqa: BLE001 - e.g. glob(); composition reports real problems
        return []


def _known_groups() -> tuple[str, ...]:
    return (*GROUPS, "local")


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value.replace("\\${", "")
    if isinstance(value, dict):
        return any(_has_interpolation(k) or _has_interpolation(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    return False


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
    """Merge `data` (from `source`, named in errors) into a composed config; validate."""
    merged = _merge(cfg, data, source)
    return merged, validate_config(merged)


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
    """Versions of what composes: this module (the schema), Hydra and OmegaConf."""
    from importlib.util import find_spec

    out = []
    for origin in (__file__, find_spec("hydra").origin, find_spec("omegaconf").origin):
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
    try:
        with initialize_config_dir(config_dir=str(conf), job_name="forge_train",
                                   version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=lines)
    except Exception as exc:  # every composition failure is the caller's to fix
        raise explain(exc, parsed) from exc


def _check_training_config(data: Any, path: str = "training_config") -> None:
    if not isinstance(data, dict):
        raise InvalidOverride(f"{path} must be a mapping, got {type(data).__name__}",
                              field=path, problem="type",
                              fix='pass a nested dict such as {"training": {"lr": 1e-4}}')
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise InvalidOverride(f"{path} has a non-string key {key!r}", field=path,
                                  problem="type", fix="use string keys")
        if isinstance(value, dict):
            _check_training_config(value, f"{path}.{key}")
        elif _has_interpolation(value):
            raise InvalidOverride(f"{path}.{key} holds an interpolation (${{...}})",
                                  field=f"{path}.{key}", problem="interpolation",
                                  fix="give a literal value")


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


# (field, check, what it must be)
_RULES: list[tuple[str, Any, str]] = [
    ("parent.artifact_id", lambda v: isinstance(v, str) and v != "", "a registry artifact id"),
    ("parent.n_layers", _positive_int, "an integer >= 1"),
    ("parent.d_model", _positive_int, "an integer >= 1"),
    ("parent.n_heads", _positive_int, "an integer >= 1"),
    ("parent.d_hid", _positive_int, "an integer >= 1"),
    ("parent.n_bins", lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    ("parent.dropout", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("parent.input_emb_style", lambda v: v in EMB_STYLES, f"one of {', '.join(EMB_STYLES)}"),
    ("dataset.artifact_id", lambda v: isinstance(v, str) and v != "", "a registry artifact id"),
    ("training.task", lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
    ("training.lr", lambda v: _finite(v) and 0 < v < 10, "a number in (0, 10)"),
    ("training.weight_decay", lambda v: _finite(v) and v >= 0, "a number >= 0"),
    ("training.max_epochs", _positive_int, "an integer >= 1"),
    ("training.batch_size", _positive_int, "an integer >= 1"),
    ("training.seed", lambda v: isinstance(v, int) and 0 <= v <= 2**32 - 1,
     "an integer in [0, 2**32)"),
    ("training.split_seed", lambda v: v is None or (isinstance(v, int) and 0 <= v <= 2**32 - 1),
     "null (the run's seed) or an integer in [0, 2**32)"),
    ("training.precision", lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ("training.max_seq_len", lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    ("training.mask_ratio", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("training.early_stopping_patience", lambda v: isinstance(v, int) and 0 <= v <= INT_MAX,
     "an integer >= 0"),
    ("training.val_fraction", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("training.test_fraction", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("training.limit_train_batches", lambda v: v is None or _positive_int(v),
     "null (all) or an integer >= 1"),
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
    training = plain["training"]
    if training["val_fraction"] + training["test_fraction"] >= 1:
        raise InvalidOverride("training.val_fraction + training.test_fraction must be < 1",
                              field="training.val_fraction", problem="value",
                              fix="leave some data for training")
    parent = plain["parent"]
    if parent["d_model"] % parent["n_heads"]:
        raise InvalidOverride(
            f"parent.d_model ({parent['d_model']}) must be divisible by parent.n_heads "
            f"({parent['n_heads']})", field="parent.n_heads", problem="value",
            override=by_key.get("parent.n_heads"), fix="pick n_heads dividing d_model")
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
