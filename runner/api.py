"""train_model_version(): the one call that turns "fine-tune X on Y" into a model version.

Steps: validate -> compose -> pin code -> estimate. A dry run stops there and says whether
the job would launch and why not, writing nothing but its tool-call audit row. A real run
continues in `_launch()`: reserve/debit -> parent weights -> MLflow run -> sandbox -> post-run
hook -> settle.

Malformed input (a bad id, a non-integer or non-positive cap, an unknown override) raises a
typed error. Well-formed requests that cannot run (unknown agent, balance short of the
estimate, caps over policy, missing artifacts, a dirty tree) are `reasons` in a dry run and
the first of them is raised by a real run. This module never imports torch, lightning or
mlflow at import time; the dry run never imports them at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runner.errors import (
    CapOutOfPolicy,
    ForgeError,
    InvalidInput,
    InvalidOverride,
    NotFound,
    WrongArtifactType,
)
from runner.tools import define_skill, log_tool_call

SKILL_NAME = "Train Model Version"
# Keys of the resolved config that do not change what gets trained: left out of the
# request key, so a retry from another machine or as a dry run maps to the same allocation.
VOLATILE_KEYS = ("agent_id", "dry_run", "allow_dirty", "fit_budget", "tracking", "registry",
                 "policy", "pricing", "sandbox")
# What a caller may set, and which config keys the arguments set: runner.config.compose's tables
# (ARGUMENT_KEYS, CHOICE_GROUPS, ...), shared with forge-train and the skill's input_schema.


# --- the request key ------------------------------------------------------------------------------

def request_key(agent_id: str, parent_artifact_id: str, dataset_artifact_id: str,
                config: dict, code_sha: str, diff_sha256: str | None = None) -> str:
    """sha256 over who asks, what from, on what, how (the resolved config minus volatile
    keys) and which code: the same request reserves and registers once."""
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    payload = json.dumps(
        {"agent": agent_id, "parent": parent_artifact_id, "dataset": dataset_artifact_id,
         "config": stable, "code": code_sha, "diff": diff_sha256},
        sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def nest_training_config(training_config: Any) -> Any:
    """A flat dict of training settings (`{"lr": 1e-4}`) -> `{"training": {"lr": 1e-4}}`.

    A dict whose keys are all config-root keys (`training`, `parent`, ...) is already nested;
    a mix of both is ambiguous and refused. Anything else is left for validation to refuse."""
    from runner.config.compose import _schema_keys

    if not isinstance(training_config, dict) or not training_config:
        return training_config
    root = set(_schema_keys(""))
    at_root = [k for k in training_config if k in root]
    if len(at_root) == len(training_config):
        return training_config
    if at_root:
        raise InvalidOverride(
            f"training_config mixes config-root keys ({', '.join(map(str, at_root))}) with "
            "training settings", field="training_config", problem="type",
            fix='pass training settings flat ({"lr": 1e-4}) or nested under "training" '
                '({"training": {"lr": 1e-4}}), not both')
    return {"training": training_config}


# --- the plan: everything validate -> compose -> pin -> estimate found out ------------------------

@dataclass
class Plan:
    agent_id: str
    parent_artifact_id: str
    dataset_artifact_id: str
    config: Any  # the composed DictConfig
    resolved: dict  # the same, resolved to plain data
    db_url: str | None
    currency: str
    price_per_hour: Decimal
    hours: Decimal
    devices: int
    estimate: Decimal
    device: Any = None  # runner.jobs.devices.Device: what the job runs on and is billed as
    balance: Decimal | None = None
    code: Any = None  # CodePin, or None when pinning failed
    request_key: str | None = None
    sandbox: dict | None = None
    problems: list[ForgeError] = field(default_factory=list)

    @property
    def would_launch(self) -> bool:
        return not self.problems

    def dry_run_result(self) -> dict:
        code = self.code
        return {
            "would_launch": self.would_launch,
            "reasons": [p.to_dict() for p in self.problems],
            "estimate": {"amount": self.estimate, "currency": self.currency,
                         "price_per_hour": self.price_per_hour, "hours": self.hours,
                         "devices": self.devices,
                         "device": None if self.device is None else self.device.price_key},
            "config": self.resolved,
            "code": None if code is None else {
                "sha": code.sha, "dirty": code.dirty, "repo_url": code.repo_url,
                "branch": code.branch, "diff_sha256": code.diff_sha256},
            "sandbox": self.sandbox,
            "balance": self.balance,
            "agent_id": self.agent_id,
            "parent_artifact_id": self.parent_artifact_id,
            "dataset_artifact_id": self.dataset_artifact_id,
            "request_key": self.request_key,
        }


# --- the call -------------------------------------------------------------------------------------

@log_tool_call(SKILL_NAME)
def train_model_version(parent_artifact_id: str, dataset_artifact_id: str,
                        training_config: dict | None = None, agent_id: str | None = None,
                        wall_time_cap_min: int = 120, vram_cap_gb: int = 24,
                        dry_run: bool = False, *, overrides: list[str] | None = None,
                        allow_dirty: bool = False, devices: int | None = None,
                        device: str | None = None, config=None,
                        mlflow_parent_run_id: str | None = None,
                        code_commit: str | None = None, **kw) -> dict:
    """Fine-tune `parent_artifact_id` on `dataset_artifact_id` as a new candidate version.

    `training_config` is a dict of training settings (`{"lr": 1e-4}` means `training.lr`), or
    a nested dict merged at the config root (`{"training": {"lr": 1e-4}}`); `overrides` are Hydra
    override strings (`training.lr=1e-4`, `training=pretrain_mgm`). Caps, devices, the agent
    and the flags come from the arguments. `config` is an already composed config (what
    forge-train passes); it replaces the composition and must agree with the arguments.
    `code_commit` runs that commit of the code repository instead of HEAD (a sweep pins
    once and passes it to every job).

    With `dry_run=True`, returns {would_launch, reasons, estimate, config, code, sandbox,
    balance, request_key, ...} and launches nothing.
    """
    if kw:
        raise InvalidInput(f"unknown arguments: {', '.join(sorted(kw))}",
                           field=min(kw), fix="see the skill's input_schema")
    plan = prepare(parent_artifact_id, dataset_artifact_id, nest_training_config(training_config),
                   agent_id=agent_id, wall_time_cap_min=wall_time_cap_min,
                   vram_cap_gb=vram_cap_gb, dry_run=dry_run, overrides=overrides,
                   allow_dirty=allow_dirty, devices=devices, device=device, config=config,
                   code_commit=code_commit)
    if dry_run:
        return plan.dry_run_result()
    if plan.problems:
        raise plan.problems[0]
    return _launch(plan, mlflow_parent_run_id)


def prepare(parent_artifact_id, dataset_artifact_id, training_config=None, *, agent_id=None,
            wall_time_cap_min=120, vram_cap_gb=24, dry_run=False, overrides=None,
            allow_dirty=False, devices=None, device=None, config=None,
            code_commit=None) -> Plan:
    """validate -> compose -> pin code -> estimate; reads the registry, writes nothing."""
    from runner.jobs import codepin
    from runner.registry import ledger
    from runner.errors import CodePinError
    from runner.tools import audit_to

    _validate_arguments(parent_artifact_id, dataset_artifact_id, agent_id, wall_time_cap_min,
                        vram_cap_gb, devices, device, dry_run, allow_dirty)
    if config is not None:
        cfg, resolved = _from_config(config, parent_artifact_id, dataset_artifact_id, agent_id,
                                     wall_time_cap_min, vram_cap_gb, dry_run, allow_dirty,
                                     devices, device, overrides, training_config)
    else:
        cfg, resolved = _compose(parent_artifact_id, dataset_artifact_id, agent_id,
                                 wall_time_cap_min, vram_cap_gb, dry_run, allow_dirty, devices,
                                 device, overrides, training_config)
    db_url = resolved["registry"]["db_url"]
    audit_to(db_url)
    problems: list[ForgeError] = []
    parent, dataset, account = _read_registry(db_url, parent_artifact_id, dataset_artifact_id,
                                              agent_id, problems)
    derived = {group: values for group, values in _registry_values(parent, dataset).items()
               if any(resolved[group].get(k) != v for k, v in values.items())}
    if derived:  # the registry disagrees with conf/: it wins (a merge costs a validation)
        from runner.config import compose

        cfg, resolved = compose.merge_config(cfg, derived, "registry")
    _check_dataset_content(resolved, dataset, problems)

    device = _resolve_device(resolved, problems)
    price = price_per_hour(resolved, device)
    plan = Plan(agent_id=agent_id, parent_artifact_id=parent_artifact_id,
                dataset_artifact_id=dataset_artifact_id, config=cfg, resolved=resolved,
                db_url=db_url, currency=resolved["pricing"]["currency"], price_per_hour=price,
                hours=ledger.round_money(Decimal(resolved["wall_time_cap_min"]) / 60),
                devices=resolved["devices"],
                estimate=ledger.estimate(price, resolved["wall_time_cap_min"],
                                         resolved["devices"]),
                device=device, problems=problems)
    _check_policy(resolved, problems)
    from runner.jobs.launch import disk_problem  # FORGE_HOME below registry.min_free_gb

    if (disk := disk_problem(resolved)) is not None:
        problems.append(disk)
    if account is None:
        problems.append(ledger.unknown_agent(agent_id))
    else:
        plan.balance = account["balance"]
        if plan.balance < plan.estimate:
            problems.append(ledger.insufficient(agent_id, plan.balance, plan.estimate,
                                                plan.currency))
    try:
        plan.code = (codepin.pin_code() if code_commit is None
                     else codepin.pin_commit(code_commit))
    except CodePinError as exc:
        problems.append(exc)
        return plan
    if plan.code.dirty and not resolved["allow_dirty"]:
        problems.append(codepin.dirty_error(plan.code))
    plan.request_key = request_key(agent_id, parent_artifact_id, dataset_artifact_id,
                                   resolved, plan.code.sha, plan.code.diff_sha256)
    plan.sandbox = _sandbox_plan(plan, problems)
    return plan


def _launch(plan: Plan, mlflow_parent_run_id: str | None = None) -> dict:
    """reserve/debit -> parent weights -> MLflow run -> sandbox -> post-run hook -> settle."""
    from runner.jobs import launch

    return launch.launch(plan, parent_run_id=mlflow_parent_run_id)


# --- steps ----------------------------------------------------------------------------------------

def _validate_arguments(parent_artifact_id, dataset_artifact_id, agent_id, wall_time_cap_min,
                        vram_cap_gb, devices, device, dry_run, allow_dirty) -> None:
    """Malformed input raises: ids, the agent, caps, flags."""
    from runner.registry import catalog, ledger

    catalog.validate_artifact_id(parent_artifact_id, "parent_artifact_id")
    catalog.validate_artifact_id(dataset_artifact_id, "dataset_artifact_id")
    ledger.check_agent_id(agent_id)
    _check_cap(wall_time_cap_min, "wall_time_cap_min")
    _check_cap(vram_cap_gb, "vram_cap_gb")
    if devices is not None:
        _check_cap(devices, "devices")
    for name, flag in (("dry_run", dry_run), ("allow_dirty", allow_dirty)):
        if not isinstance(flag, bool):
            raise InvalidInput(f"{name} must be true or false, got {flag!r}", field=name,
                               fix=f"pass {name}=True or {name}=False")
    if device is not None and not isinstance(device, str):
        raise InvalidInput(f"device must be a string, got {device!r}", field="device",
                           fix="pass device='auto' or a key of pricing.per_device")


def _compose(parent_artifact_id, dataset_artifact_id, agent_id, wall_time_cap_min,
             vram_cap_gb, dry_run, allow_dirty, devices, device, overrides, training_config):
    """The config for this call: the caller's overrides and dict, once checked against what
    a caller may set, then the lines the host writes for the arguments (the parent/dataset
    options whose artifact ids match, the ids, caps and flags), as override strings so the
    composed config is memoised per distinct call."""
    from runner.config import compose

    _check_not_arguments(overrides, training_config)
    lines = list(overrides or []) + compose.call_lines(
        parent_artifact_id, dataset_artifact_id, agent_id=agent_id,
        wall_time_cap_min=wall_time_cap_min, vram_cap_gb=vram_cap_gb, dry_run=dry_run,
        allow_dirty=allow_dirty, devices=devices, device=device)
    return compose.compose_resolved(lines, training_config, writable=False)


def _from_config(config, parent_artifact_id, dataset_artifact_id, agent_id, wall_time_cap_min,
                 vram_cap_gb, dry_run, allow_dirty, devices, device, overrides,
                 training_config):
    """A config forge-train already composed: validate it and check it matches the call."""
    from runner.config import compose

    if overrides or training_config:
        raise InvalidInput("pass either config or overrides/training_config, not both",
                           field="config", fix="drop config to compose from overrides")
    if not compose.is_config(config):
        raise InvalidInput(f"config must be a composed DictConfig, got {type(config).__name__}",
                           field="config", fix="drop config to compose from overrides")
    baseline = compose.compose_config(
        compose.artifact_lines("parent", parent_artifact_id)
        + compose.artifact_lines("dataset", dataset_artifact_id))
    compose.check_operator_settings(config, baseline)
    resolved = compose.validate_config(config)
    _check_agrees(resolved, parent_artifact_id, dataset_artifact_id, agent_id,
                  wall_time_cap_min, vram_cap_gb, dry_run, allow_dirty, devices, device)
    return config, resolved


def _read_registry(db_url, parent_artifact_id, dataset_artifact_id, agent_id,
                   problems: list[ForgeError]):
    """Parent, dataset and the agent's account, in one short read."""
    from runner.registry import catalog, db, ledger

    with db.get_engine(db_url).connect() as conn:
        try:
            parent = _artifact(catalog, parent_artifact_id, "model", "parent_artifact_id",
                               conn, problems)
            dataset = _artifact(catalog, dataset_artifact_id, "dataset", "dataset_artifact_id",
                                conn, problems)
            account = ledger.account(agent_id, conn=conn)
        except Exception as exc:  # noqa: BLE001 - re-raised, typed where we can
            _raise_db_error(exc)
    return parent, dataset, account


def _resolve_device(resolved: dict, problems: list[ForgeError]):
    """The device this host gives the job (runner.jobs.devices); a problem when it can't."""
    from runner.jobs import devices

    try:
        return devices.resolve(resolved["device"], resolved["pricing"]["per_device"])
    except ForgeError as exc:
        problems.append(exc)
        return None


def price_per_hour(resolved: dict, device=None) -> Decimal:
    """Price per device-hour of the device the job gets: its row of pricing.per_device, else
    the default price. Without a resolved device (it is unavailable), the requested one."""
    from runner.registry import ledger

    pricing = resolved["pricing"]
    key = device.price_key if device is not None else resolved["device"]
    if key in pricing["per_device"]:
        return ledger.to_price(pricing["per_device"][key], f"pricing.per_device.{key}")
    return ledger.to_price(pricing["price_per_hour"], "pricing.price_per_hour")


def _check_cap(value: Any, name: str) -> None:
    from runner.config.compose import INT_MAX

    if isinstance(value, bool) or not isinstance(value, int):
        raise CapOutOfPolicy(f"{name} must be an integer, got {value!r}", field=name,
                             fix=f"pass {name} as a positive whole number", value=repr(value))
    if value < 1:
        raise CapOutOfPolicy(f"{name} must be at least 1, got {value}", field=name,
                             fix=f"pass a positive {name}", value=value)
    if value > INT_MAX:
        raise CapOutOfPolicy(f"{name} {value} is not a sane cap", field=name,
                             fix=f"pass a {name} within the policy limits", value=value)


def _check_policy(resolved: dict, problems: list[ForgeError]) -> None:
    policy = resolved["policy"]
    for name, limit_key in (("wall_time_cap_min", "max_wall_time_cap_min"),
                            ("vram_cap_gb", "max_vram_gb"), ("devices", "max_devices")):
        value, limit = resolved[name], policy[limit_key]
        if value > limit:
            problems.append(CapOutOfPolicy(
                f"{name} {value} is over the policy limit {limit}", field=name, value=value,
                limit=limit, fix=f"ask for {name} <= {limit}"))


def _check_not_arguments(overrides, training_config) -> None:
    """Refuse what a caller may not set (runner.config.compose's tables): the arguments (problem
    "argument"), operator settings ("operator_only"), interpolation, over-long input."""
    from runner.config import compose

    compose.check_caller_overrides(overrides)
    compose.check_caller_dict(training_config)


def _check_agrees(resolved: dict, parent_id, dataset_id, agent_id, wall, vram, dry_run,
                  allow_dirty, devices, device) -> None:
    pairs = {"parent.artifact_id": (resolved["parent"]["artifact_id"], parent_id),
             "dataset.artifact_id": (resolved["dataset"]["artifact_id"], dataset_id),
             "agent_id": (resolved["agent_id"], agent_id),
             "wall_time_cap_min": (resolved["wall_time_cap_min"], wall),
             "vram_cap_gb": (resolved["vram_cap_gb"], vram),
             "dry_run": (resolved["dry_run"], dry_run),
             "allow_dirty": (resolved["allow_dirty"], allow_dirty)}
    if devices is not None:
        pairs["devices"] = (resolved["devices"], devices)
    if device is not None:
        pairs["device"] = (resolved["device"], device)
    for key, (in_config, given) in pairs.items():
        if in_config != given:
            raise InvalidInput(f"config has {key}={in_config!r} but the argument is {given!r}",
                               field=key, fix="pass the same value, or drop config")


def _artifact(catalog, artifact_id: str, kind: str, field: str, conn,
              problems: list[ForgeError]) -> dict | None:
    try:
        row = catalog.get_artifact(artifact_id, conn=conn)
    except NotFound as exc:
        exc.field = field
        problems.append(exc)
        return None
    if row["artifact_type"] != kind:
        problems.append(WrongArtifactType(
            f"{field} {artifact_id!r} is a {row['artifact_type']}, not a {kind}", field=field,
            fix=f"pass the id of a {kind} artifact"))
        return None
    return row


def _registry_values(parent: dict | None, dataset: dict | None) -> dict:
    """What the registry says the artifacts are: the parent's family and architecture, the
    dataset's source, format and label key. These are facts about the artifacts, so they win
    over conf/ and are never the caller's to set. An artifact the registry says nothing about
    keeps its conf/ option's values (operator-written); a dataset with no conf/ option is
    fetched from its origin URL in its citation's format."""
    from runner.config.compose import ParentConf, option_for_artifact

    out: dict[str, dict] = {}
    if parent is not None:
        meta = parent.get("metadata") or {}
        arch = {k: v for k, v in (meta.get("architecture") or {}).items()
                if k in ParentConf.__dataclass_fields__ and k not in ("artifact_id", "family")}
        if meta.get("family"):
            arch["family"] = meta["family"]
        out["parent"] = arch
    if dataset is not None:
        meta = dataset.get("metadata") or {}
        loader = dict(meta.get("loader") or {})
        if not loader and option_for_artifact("dataset", dataset["id"]) is None:
            cite = meta.get("citation") or {}
            loader = {"source": dataset.get("origin_url"), "format": cite.get("format"),
                      "label_key": (meta.get("load_options") or {}).get("label_key")}
        out["dataset"] = {k: v for k, v in loader.items()
                          if k in ("source", "format", "label_key")
                          and (v is not None or k == "label_key")}
    return {g: v for g, v in out.items() if v}


def _check_dataset_content(resolved: dict, dataset: dict | None,
                           problems: list[ForgeError]) -> None:
    """A built-in source must hold the very file the dataset artifact's sha256 names: the
    version then records the data it really trained on."""
    from runner.errors import DatasetUnavailable
    from runner.jobs.datasets import builtin_holds

    if dataset is None:
        return
    source = resolved["dataset"]["source"]
    expected = dataset.get("content_hash")
    if expected and not builtin_holds(source, expected):
        problems.append(DatasetUnavailable(
            f"dataset {dataset['id']!r} has sha256 {expected[:12]}..., which the built-in "
            f"source {source!r} does not hold", field="dataset_artifact_id",
            reason="dataset_mismatch",
            fix="register the data under its own artifact id, or pick the artifact whose "
                "content this source holds"))


def _raise_db_error(exc: Exception) -> None:
    import sqlalchemy as sa

    from runner.registry.db import DatabaseError

    if isinstance(exc, ForgeError):
        raise exc
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.ProgrammingError)):
        raise DatabaseError(f"cannot read the registry: {str(exc.orig).strip()}",
                            fix="create or migrate it: forge db upgrade") from exc
    raise exc


def _sandbox_plan(plan: Plan, problems: list[ForgeError]) -> dict:
    """What the sandbox would run, as plain data (runner.sandbox.sandbox_plan), built by the
    same launch.sandbox_job() the real run uses. The job sees a snapshot of the pinned code,
    never the working tree (which may hold FORGE_HOME: the registry DB and the tracking
    store); its run dir is named after the allocation, which a dry run has not made."""
    from runner.jobs import codepin
    from runner import sandbox, settings
    from runner.jobs.launch import sandbox_job

    job = sandbox_job(
        plan.resolved, code_dir=codepin.snapshot_path(plan.code, settings.cache_dir() / "code"),
        output_dir=settings.forge_home() / "runs" / "<allocation-id>" / "out",
        device=plan.device.sandbox if plan.device is not None else "cpu")
    if plan.devices > 1:
        problems.append(ForgeError(
            f"devices={plan.devices}: the sandbox gives a job one GPU at most", field="devices",
            reason="sandbox_unsupported", fix="ask for devices=1"))
    try:
        out = sandbox.sandbox_plan(job)
    except ForgeError as exc:
        problems.append(exc)
        return {"error": exc.to_dict()}
    out["inputs_planned"] = ["manifest.json", "parent", "dataset"]
    return out


# --- the skill ------------------------------------------------------------------------------------

_ID = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}


def _caller_schema() -> dict:
    """What a caller may put in training_config and overrides, derived from runner.config.compose's
    tables (the ones train_model_version and forge-train enforce), never a copy."""
    from runner.config.compose import caller_schema

    return caller_schema()


_CALLER = _caller_schema()
define_skill(
    SKILL_NAME,
    description=("Fine-tune a registered parent model on a registered dataset inside the "
                 "sandbox; debits the estimate before launch and registers the result as a "
                 "candidate model version. dry_run=true validates, composes the config, pins "
                 "the code and estimates the cost without launching."),
    skill_type="model_training",
    code_path="runner.api:train_model_version",
    input_schema={
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["parent_artifact_id", "dataset_artifact_id", "agent_id"],
        "additionalProperties": False,
        "properties": {
            "parent_artifact_id": {**_ID, "description": "model artifact to start from"},
            "dataset_artifact_id": {**_ID, "description": "dataset artifact to train on"},
            "training_config": _CALLER["training_config"],
            "overrides": _CALLER["overrides"],
            "agent_id": {"type": "string",
                         "pattern": r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"},
            "wall_time_cap_min": {"type": "integer", "minimum": 1, "default": 120},
            "vram_cap_gb": {"type": "integer", "minimum": 1, "default": 24},
            "devices": {"type": ["integer", "null"], "minimum": 1},
            "device": {"type": ["string", "null"], "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                       "description": "auto, cpu, h100, h200, ..."},
            "dry_run": {"type": "boolean", "default": False},
            "allow_dirty": {"type": "boolean", "default": False},
            "mlflow_parent_run_id": {"type": ["string", "null"],
                                     "description": "MLflow run to nest this job's run under "
                                                    "(sweeps set it)"},
            "code_commit": {"type": ["string", "null"], "pattern": "^[0-9a-f]{7,40}$",
                            "description": "run this commit of the code instead of HEAD "
                                           "(sweeps pin once for all their jobs)"},
        },
    },
    example_input={
        "parent_artifact_id": "model-scgpt-cbmc-base",
        "dataset_artifact_id": "dataset-geo-GSE100866",
        "agent_id": "a1",
        "overrides": ["training=finetune_celltype", "training.lr=1e-4"],
        "wall_time_cap_min": 120,
        "vram_cap_gb": 24,
        "dry_run": True,
    },
)
