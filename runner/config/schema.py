"""The typed schema of conf/: one dataclass per config group, `TrainConfig` at the root.

Registered in Hydra's ConfigStore as `forge_train_schema` (conf/train.yaml's first default),
so struct mode and these types check every key and value composed. The families' settings
and architectures are not declared here: `TrainingConf` and `ParentConf` are derived from
each family's declaration (trainers/family.py), so the config and the manifest cannot drift
apart. Also here: what the schema declares at a path (its keys, its field types), for
error messages and the caller's allowlist.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from runner import settings
from trainers import family as families  # each family's settings, declared once
from trainers import manifest as contract  # the manifest's own fields

SCHEMA_NAME = "forge_train_schema"


# --- the typed schema: one dataclass per config group ---------------------------------------------

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


def _family_default(key: str, *, _root_) -> Any:
    """`${forge_family:KEY}`: the training key's default for the parent's family and the task
    (trainers/<family>/settings.py), None for a key the family lacks. An interpolation, so a
    registry record that names another family (runner/jobs/plan.py merges it) changes every
    default that nothing else set."""
    try:
        fam = families.get(_root_.parent.family or "scgpt")
    except families.UnknownFamily:
        return None  # plan.py refuses the family itself, naming it
    return fam.defaults(_root_.training.task).get(key)


OmegaConf.register_new_resolver("forge_family", _family_default, replace=True)
# `${forge_home:}`: the home runner.settings finds (FORGE_HOME, else the nearest forge.toml), so
# the runs, the MLflow store and the registry land in the same home from any working directory.
OmegaConf.register_new_resolver("forge_home", lambda: str(settings.forge_home()), replace=True)


def _union(name: str, part: str, head: list) -> type:
    """A config dataclass holding `head`, then every family's `part` ("architecture" or
    "training") fields, each Optional. A training key defaults to its family's default
    (`${forge_family:KEY}`); an architecture key to None (the parent option, the registry or
    the checkpoint decides). A key two families share must have one type."""
    out, seen = list(head), {h[0]: h[1] for h in head}
    for fam in families.all_families():
        spec = getattr(fam, part)
        hints = typing.get_type_hints(spec)
        for f in dataclasses.fields(spec):
            if f.name in seen:
                continue
            tp, args = hints[f.name], typing.get_args(hints[f.name])
            inner = next(a for a in args if a is not type(None)) if args else tp
            seen[f.name] = inner
            default = f"${{forge_family:{f.name}}}" if part == "training" else None
            out.append((f.name, Optional[inner], field(default=default)))
    cls = dataclasses.make_dataclass(name, out)
    cls.__module__ = __name__  # pickled with composed configs (the disk cache)
    return cls


# parent: the registry artifact's id and family, then every family's architecture keys
# (None: the parent's checkpoint or the family's default decides).
ParentConf = _union("ParentConf", "architecture",
                    [("artifact_id", str, field(default=MISSING)),
                     ("family", Optional[str], field(default=None))])


@dataclass
class DatasetConf:
    artifact_id: str = MISSING
    source: str | None = None
    format: str = MISSING
    label_key: str | None = None


# training: the manifest's task, seed and num_threads, then every family's training keys. Their
# rules are the families' own: validate_config() (runner/config/validate.py) checks the
# manifest the host would send with the trainer's parser once the family is known.
_TrainingHead = _from_contract("_TrainingHead", contract.Manifest,
                               contract.CONFIG_TRAINING_FIELDS)
TrainingConf = _union(
    "TrainingConf", "training",
    [(f.name, typing.get_type_hints(_TrainingHead)[f.name], field(default=f.default))
     for f in dataclasses.fields(_TrainingHead)])


@dataclass
class SandboxConf:
    backend: str = "bwrap"
    grace_s: float = 10.0
    max_processes: int = 512
    tmp_size_gb: float = 4.0
    max_memory_gb: float | None = 16.0  # cgroup v2 memory.max, else RLIMIT_AS (sandbox.py)
    max_output_gb: float = 20.0  # /job/out quota; over it the job is killed (output_quota)
    env_allowlist: list[str] = field(default_factory=list)


@dataclass
class TrackingConf:
    backend: str = "mlflow"
    tracking_uri: str = MISSING
    artifact_root: str = MISSING
    experiment_name: str = MISSING
    ui_url: str = "http://127.0.0.1:5000"
    mlflow_url: str = MISSING  # the run's page, returned as mlflow_url
    # forge serve's base URL (FORGE_SITE_URL): detail_url is the new version's page there
    site_url: str = "http://127.0.0.1:8765"


@dataclass
class RegistryConf:
    db_url: str | None = None
    blob_threshold_mb: float = 50.0
    min_free_gb: float = 2.0  # free space FORGE_HOME needs before a debit (runner/jobs/launch.py)
    # a dry run hashes a parent's weights up to this size (else names and sizes only); a real
    # call always hashes them before the debit (runner/jobs/weights.py check)
    dry_run_hash_mb: float = 64.0
    expiry_margin_min: float = 10.0  # allocation expiry = cap + sandbox grace + this
    # how long the host retries a finished job's registration while the registry is away
    # (runner/jobs/intents.py); after that the reaper completes it
    registration_retry_s: float = 60.0
    # caps on an archive registered from outside (runner/jobs/archive.py): unpacked size,
    # members, and unpacked bytes per archive byte (a zip bomb is far above)
    max_archive_gb: float = 20.0
    max_archive_files: int = 100_000
    max_archive_ratio: float = 200.0


@dataclass
class PricingConf:
    currency: str = "credits"
    price_per_hour: float = 0.5
    per_device: dict[str, float] = field(default_factory=dict)


@dataclass
class PolicyConf:
    max_wall_time_cap_min: int = 1440
    max_vram_gb: int = 141
    max_devices: int = 8
    # the fraction of the dataset's genes a parent's vocabulary must have (runner/jobs/parents.py)
    min_gene_overlap: float = 0.5
    # jobs queued or running at once (runner/registry/capacity.py): per agent, per host, and
    # the sum of their memory caps per host (None: this host's physical memory)
    max_jobs_per_agent: int = 2
    max_jobs_per_host: int = 4
    max_host_memory_gb: float | None = None
    # the lifecycle states a parent may be fine-tuned from (runner/jobs/parents.py)
    parent_states: list[str] = field(default_factory=lambda: ["active", "candidate"])


@dataclass
class CodeConf:
    # origins a parent's own training code may come from (runner/jobs/external_code.py): path
    # or URL prefixes or fnmatch globs; empty: no external code
    allowed_origins: list[str] = field(default_factory=list)


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
    code: CodeConf = field(default_factory=CodeConf)
    agent_id: str | None = None
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


# --- what the schema declares ---------------------------------------------------------------------

def training_keys() -> tuple[str, ...]:
    """The training settings a caller may set, as TrainingConf declares them."""
    return tuple(f.name for f in dataclasses.fields(TrainingConf))


def _schema_node(path: str) -> Any:
    """The dataclass (or type) the schema declares at `path` ("" is TrainConfig)."""
    node: Any = TrainConfig
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


@lru_cache(maxsize=64)
def schema_keys(path: str) -> list[str]:
    node = _schema_node(path)
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) \
        else []


def expected_type(path: str) -> str | None:
    """'float', 'int', 'Optional[str]', ... for a schema field; None when not declared."""
    node = _schema_node(path) if path else None
    if node is None or dataclasses.is_dataclass(node):
        return None
    return node.__name__ if isinstance(node, type) else str(node).replace("typing.", "")


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
