"""A request, planned: validate -> compose -> read the registry -> price -> pin code -> the
sandbox job. Reads the registry, writes nothing.

`TrainRequest` is what was asked (frozen: the arguments of one call). `prepare()` turns it
into a `Plan`: the composed config, the parent and dataset rows, the device and its price,
the estimate, the pinned code, the request key and the sandbox job it would run, plus every
reason it cannot launch. A dry run returns `Plan.dry_run_result()`; a real run hands the plan
to `runner.jobs.launch.launch()`, which reads none of this again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from omegaconf import DictConfig

from runner import sandbox
from runner.config import caller, compose, validate
from runner.config.options import group_options, option_for_artifact
from runner.config.schema import ParentConf
from runner.config.validate import INT_MAX
from runner.errors import (
    CapOutOfPolicy,
    CodePinError,
    Conflict,
    DatasetUnavailable,
    Forbidden,
    ForgeError,
    InvalidConfig,
    InvalidInput,
    InvalidOverride,
    NotFound,
    WrongArtifactType,
)
from runner.jobs import codepin, devices, engine, external_code, parents, tracking, weights
from runner.jobs.datasets import builtin_holds, known_fetch_failure
from runner.jobs.job import disk_problem, run_dir, sandbox_job
from runner.registry import capacity, catalog, db, ledger, money
from runner.tools import audit_to, jsonable
from trainers import family as families

MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow names a run: a uuid4's hex

# Keys of the resolved config that do not change what gets trained: left out of the
# request key, so a retry from another machine or as a dry run maps to the same allocation.
VOLATILE_KEYS = ("agent_id", "dry_run", "allow_dirty", "fit_budget", "tracking", "registry",
                 "policy", "pricing", "sandbox", "code")


@dataclass(frozen=True)
class TrainRequest:
    """One call's arguments. `training_config` is already nested at the config root.

    `from_scratch` is the operator's (the demo's bases), never a caller's: train the parent
    option's architecture (`parent_option`, else the one whose artifact_id matches, else
    conf/'s default) from random weights and register the result as `parent_artifact_id`,
    a root version. Every other request fine-tunes the registered parent.
    """
    parent_artifact_id: str
    dataset_artifact_id: str
    agent_id: str | None
    training_config: Any = None
    overrides: Any = None
    wall_time_cap_min: int = 120
    vram_cap_gb: int = 24
    dry_run: bool = False
    allow_dirty: bool = False
    devices: int | None = None
    device: str | None = None
    config: Any = None  # a DictConfig forge-train composed; replaces the composition
    code_commit: str | None = None  # run this commit instead of HEAD (a sweep pins once)
    mlflow_parent_run_id: str | None = None  # nest the MLflow run (a sweep's)
    from_scratch: bool = False
    parent_option: str | None = None  # from scratch: the conf/parent option to build


@dataclass
class Plan:
    request: TrainRequest
    config: Any  # the composed DictConfig
    resolved: dict  # the same, resolved to plain data
    db_url: str | None
    currency: str
    price_per_hour: Decimal
    hours: Decimal
    devices: int
    estimate: Decimal
    parent: dict | None = None  # the parent's artifact row (None: from scratch, or missing)
    dataset: dict | None = None  # the dataset's artifact row
    device: Any = None  # runner.jobs.devices.Device: what the job runs on and is billed as
    balance: Decimal | None = None
    code: Any = None  # runner.jobs.codepin.CodePin, or None when pinning failed
    request_key: str | None = None
    sandbox: dict | None = None
    problems: list[ForgeError] = field(default_factory=list)
    checkpoint: dict | None = None  # what the parent's args.json and vocab.json say
    external: Any = None  # runner.jobs.external_code.ExternalCode: the parent's own code

    @property
    def agent_id(self) -> str:
        return self.request.agent_id

    @property
    def would_launch(self) -> bool:
        return not self.problems

    def dry_run_result(self, verbose: bool = False) -> dict:
        """What a dry run says, as plain JSON data (money: decimal strings beside their
        currency). Without `verbose`, a few hundred bytes of the sandbox plan (its caps and
        inputs, not its argv, binds and environment) and of the config (what the caller
        chose and the registry decided: parent, dataset, training, the caps)."""
        code, currency = self.code, self.currency
        return {
            "would_launch": self.would_launch,
            "reasons": [jsonable(p.to_dict()) for p in self.problems],
            "estimate": {"amount": str(self.estimate), "currency": currency,
                         "price_per_hour": str(self.price_per_hour), "hours": str(self.hours),
                         "devices": self.devices,
                         "device": None if self.device is None else self.device.price_key},
            "config": jsonable(self.resolved if verbose else {
                k: v for k, v in self.resolved.items() if k not in OPERATOR_PARTS}),
            "code": None if code is None else {
                "sha": code.sha, "dirty": code.dirty, "repo_url": code.repo_url,
                "branch": code.branch, "diff_sha256": code.diff_sha256},
            "sandbox": jsonable(self.sandbox if verbose or self.sandbox is None else {
                k: v for k, v in self.sandbox.items() if k in SANDBOX_SUMMARY}),
            "checkpoint": jsonable(self.checkpoint if verbose else _brief(self.checkpoint)),
            "balance": None if self.balance is None else {"amount": str(self.balance),
                                                          "currency": currency},
            "agent_id": self.agent_id,
            "parent_artifact_id": self.request.parent_artifact_id,
            "dataset_artifact_id": self.request.dataset_artifact_id,
            "request_key": self.request_key,
        }


# A dry run's reply without `verbose`: the operator's config groups (the same for every call)
# and the sandbox's argv, binds and environment (kilobytes of bwrap flags) are left out.
OPERATOR_PARTS = ("sandbox", "tracking", "registry", "pricing", "policy", "code")
SANDBOX_SUMMARY = ("backend", "caps", "inputs_planned", "error")


def _brief(checkpoint: dict | None) -> dict | None:
    """The parent's checkpoint facts without the per-file listing of its weights."""
    if checkpoint is None:
        return None
    out = dict(checkpoint)
    weights = out.get("weights")
    if isinstance(weights, dict):
        out["weights"] = {k: v for k, v in weights.items() if not isinstance(v, (list, dict))}
    return out


def request_key(req: TrainRequest, config: dict, code_sha: str,
                diff_sha256: str | None = None, external_sha: str | None = None) -> str:
    """sha256 over who asks, what from, on what, how (the resolved config minus volatile
    keys) and which code (ours, and the parent's own when it names one): the same request
    reserves and registers once."""
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    payload = {"agent": req.agent_id, "parent": req.parent_artifact_id,
               "dataset": req.dataset_artifact_id, "config": stable, "code": code_sha,
               "diff": diff_sha256}
    if external_sha is not None:
        payload["external_code"] = external_sha
    if req.from_scratch:
        payload["from_scratch"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def prepare(req: TrainRequest) -> Plan:
    """validate -> compose -> read the registry -> price -> pin code -> the sandbox job. The
    parent's own family (an external one) is known by name inside this call only: another
    call planned at the same time, whose parent's card has the same name, sees its own."""
    with families.external_scope():
        return _prepare(req)


def _prepare(req: TrainRequest) -> Plan:
    _validate_arguments(req)
    cfg, resolved, own = (*_from_config(req), {}) if req.config is not None else _compose(req)
    db_url = resolved["registry"]["db_url"]
    audit_to(db_url)
    if req.mlflow_parent_run_id is not None and not req.dry_run:
        _check_parent_run(resolved, req)
    problems: list[ForgeError] = []
    # Capacity: the dry run's reading (of a blocking call: this host places it, unless this
    # process runs in a SLURM job); a real request is checked by the reserve, under its
    # locks, after the reaper has closed the jobs of dead hosts.
    limits = (capacity.limits(resolved, on_this_host=engine.current() is None)
              if req.dry_run else None)
    parent, dataset, account = _read_registry(db_url, req, problems, limits)
    # The parent's own training code (an external family), pinned before anything asks for
    # its family: a refusal here leaves the family unknown, so the checks that need it wait.
    external, code_refused = None, False
    if parent is not None and (named := external_code.of_parent(parent)) is not None:
        try:
            external = external_code.pin(named.get("repo_url"), named.get("commit_sha"),
                                         named.get("entrypoint"),
                                         list(resolved["code"]["allowed_origins"]))
            families.bind_external(external.family)
        except ForgeError as exc:
            problems.append(exc)
            code_refused = True
    derived = {group: values for group, values in _registry_values(parent, dataset).items()
               if any(resolved[group].get(k) != v for k, v in values.items())}
    if derived:  # the registry disagrees with conf/: it wins (a merge costs a validation)
        cfg, resolved = compose.merge_config(cfg, derived, "registry")
    checkpoint = None
    if parent is not None and not code_refused:  # its own files decide its architecture
        if (refused := parents.state_problem(parent, resolved["policy"]["parent_states"])):
            problems.append(refused)
        checkpoint, arch, found = parents.check_parent(parent, resolved, dataset)
        problems.extend(found)
        given = {k: v for k, v in arch.items() if resolved["parent"].get(k) != v}
        if given:
            cfg, resolved = compose.merge_config(cfg, {"parent": given}, "checkpoint")
        # the weights the launch will copy, as the registry recorded them: a dry run hashes
        # small ones only; a real call hashes them all, still before the debit
        limit = (resolved["registry"]["dry_run_hash_mb"] * 1024**2 if req.dry_run
                 else float("inf"))
        checkpoint["weights"], found = weights.check(parent, hash_limit_bytes=limit)
        problems.extend(found)
    if not code_refused:
        cfg, resolved = _family_defaults(cfg, resolved, req, own)
        _check_dataset_content(resolved, dataset, problems)

    device, price, problem = devices.priced(resolved)
    if problem is not None:
        problems.append(problem)
    plan = Plan(request=req, config=cfg, resolved=resolved, db_url=db_url,
                currency=resolved["pricing"]["currency"], price_per_hour=price,
                hours=money.round_money(Decimal(resolved["wall_time_cap_min"]) / 60),
                devices=resolved["devices"],
                estimate=money.estimate(price, resolved["wall_time_cap_min"],
                                         resolved["devices"]),
                parent=parent, dataset=dataset, device=device, problems=problems,
                checkpoint=checkpoint, external=external)
    _check_policy(resolved, problems)
    if (disk := disk_problem(resolved)) is not None:  # FORGE_HOME below registry.min_free_gb
        problems.append(disk)
    if account is None:
        problems.append(ledger.unknown_agent(req.agent_id))
    else:
        plan.balance = account["balance"]
        if plan.balance < plan.estimate:
            problems.append(ledger.insufficient(req.agent_id, plan.balance, plan.estimate,
                                                plan.currency))
    try:
        plan.code = (codepin.pin_code() if req.code_commit is None
                     else codepin.pin_commit(req.code_commit))
    except CodePinError as exc:
        problems.append(exc)
        return plan
    if code_refused:
        return plan
    if plan.code.dirty and not resolved["allow_dirty"]:
        problems.append(codepin.dirty_error(plan.code))
    plan.request_key = request_key(req, resolved, plan.code.sha, plan.code.diff_sha256,
                                   None if external is None else external.sha)
    plan.sandbox = _sandbox_plan(plan, problems)
    return plan


# --- steps ----------------------------------------------------------------------------------------

def _validate_arguments(req: TrainRequest) -> None:
    """Malformed input raises: ids, the agent, caps, flags."""
    catalog.validate_artifact_id(req.parent_artifact_id, "parent_artifact_id")
    catalog.validate_artifact_id(req.dataset_artifact_id, "dataset_artifact_id")
    ledger.check_agent_id(req.agent_id)
    _check_cap(req.wall_time_cap_min, "wall_time_cap_min")
    _check_cap(req.vram_cap_gb, "vram_cap_gb")
    if req.devices is not None:
        _check_cap(req.devices, "devices")
    for name in ("dry_run", "allow_dirty"):
        flag = getattr(req, name)
        if not isinstance(flag, bool):
            raise InvalidInput(f"{name} must be true or false, got {flag!r}", field=name,
                               fix=f"pass {name}=True or {name}=False")
    run = req.mlflow_parent_run_id
    if run is not None and not (isinstance(run, str) and MLFLOW_RUN_ID.fullmatch(run)):
        raise InvalidInput(f"mlflow_parent_run_id must be an MLflow run id (32 lowercase hex "
                           f"characters), got {str(run)[:80]!r}", field="mlflow_parent_run_id",
                           fix="pass the run id of this agent's sweep, or none")
    if req.device is not None and not isinstance(req.device, str):
        raise InvalidInput(f"device must be a string, got {req.device!r}", field="device",
                           fix="pass device='auto' or a key of pricing.per_device")


def _family_defaults(cfg, resolved: dict, req: TrainRequest, own: dict | None = None):
    """The parent's family is known now (its registry record, else the conf/ option): its
    defaults fill what nothing set, so the record says what ran, the caller's keys that only
    its card declares (`own`, caller.split_family_keys) join the training settings, and the
    manifest is checked whole (a training key of another family is refused, naming it; a
    card's own key is typed and range-checked by the card)."""
    name = resolved["parent"]["family"] or "scgpt"
    try:
        fam = families.get(name)
    except families.UnknownFamily:
        raise InvalidConfig(f"parent {req.parent_artifact_id!r} is of family {name!r}, which "
                            f"this host does not have ({', '.join(families.FAMILIES)})",
                            field="parent.family", reason="unknown_family",
                            fix="register the parent with one of these families") from None
    if resolved["training"]["task"] not in fam.tasks:
        raise InvalidOverride(
            f"training.task {resolved['training']['task']!r} is not a task of family "
            f"{name} ({', '.join(fam.tasks)})", field="training.task", problem="family",
            fix=f"choose one of {', '.join(fam.tasks)}, or a parent of another family")
    fill = {"parent": {k: v for k, v in fam.arch_defaults.items()
                       if resolved["parent"].get(k) is None},
            # an external family's own keys are not config keys: the manifest's defaults
            "training": {k: v for k, v in fam.defaults(resolved["training"]["task"]).items()
                         if k in resolved["training"] and resolved["training"][k] is None
                         and v is not None}}
    if resolved["parent"]["family"] != name:
        fill["parent"]["family"] = name
    fill = {group: values for group, values in fill.items() if values}
    if fill:
        cfg, resolved = compose.merge_config(cfg, fill, "family")
    if own:  # not config keys: plain data beside the config, which the launch reads
        resolved = {**resolved, "training": {**resolved["training"],
                                             **_own_keys(fam, own)}}
    validate.check_family(resolved, list(req.overrides or []), from_parent=not req.from_scratch)
    return cfg, resolved


def _own_keys(fam: families.Family, own: dict) -> dict:
    """The caller's training keys that no config key names, if the parent's family (its
    card) declares each; InvalidOverride unknown_key naming the first that it does not."""
    known = fam.training_keys()
    for name, (_, line) in own.items():
        if name not in known:
            raise InvalidOverride(
                f"training.{name}: no such training setting of family {fam.name}",
                field=f"training.{name}", override=line, problem="unknown_key",
                fix=caller.did_you_mean(name, known, prefix="training.")
                + f"family {fam.name}'s keys: {', '.join(sorted(known))}")
    return {name: value for name, (value, _) in own.items()}


def _check_parent_run(resolved: dict, req: TrainRequest) -> None:
    """A job's run nests only under a run of its own agent: its sweep's parent run or one of
    its own jobs' runs. Read from MLflow, so a dry run (mlflow-free) checks the id's form only."""
    store = tracking.client(resolved["tracking"]["tracking_uri"])
    if tracking.run_agent(store, req.mlflow_parent_run_id) != req.agent_id:
        raise Forbidden(f"MLflow run {req.mlflow_parent_run_id} is not a run of agent "
                        f"{req.agent_id!r}", field="mlflow_parent_run_id",
                        fix="nest under a run this agent's sweep or jobs opened, or pass none")


def _compose(req: TrainRequest):
    """The config for this call: the caller's overrides and dict, once checked against what
    a caller may set, then the lines the host writes for the arguments (the parent/dataset
    options whose artifact ids match, the ids, caps and flags), as override strings so the
    composed config is memoised per distinct call."""
    checked = caller.check_caller_overrides(req.overrides, family_keys=True)  # the arguments,
    caller.check_caller_dict(req.training_config, family_keys=True)  # operator settings, ...
    # a training key no built-in family has: the parent's card may declare it (checked then)
    overrides, training_config, own = caller.split_family_keys(checked, req.training_config)
    chosen = []
    if req.parent_option is not None:
        if not req.from_scratch or req.parent_option not in group_options("parent"):
            raise InvalidInput(f"parent_option {req.parent_option!r} is not a conf/parent "
                               "option to train from scratch", field="parent_option",
                               fix=f"use one of {', '.join(group_options('parent'))}")
        chosen = [f"parent={req.parent_option}"]
    lines = chosen + overrides + caller.call_lines(
        req.parent_artifact_id, req.dataset_artifact_id, agent_id=req.agent_id,
        wall_time_cap_min=req.wall_time_cap_min, vram_cap_gb=req.vram_cap_gb,
        dry_run=req.dry_run, allow_dirty=req.allow_dirty, devices=req.devices,
        device=req.device)
    return (*compose.compose_resolved(lines, training_config, writable=False), own)


def _from_config(req: TrainRequest):
    """A config forge-train already composed: validate it and check it matches the call."""
    if req.overrides or req.training_config:
        raise InvalidInput("pass either config or overrides/training_config, not both",
                           field="config", fix="drop config to compose from overrides")
    if not isinstance(req.config, DictConfig):
        raise InvalidInput(
            f"config must be a composed DictConfig, got {type(req.config).__name__}",
            field="config", fix="drop config to compose from overrides")
    baseline = compose.compose_config(
        caller.artifact_lines("parent", req.parent_artifact_id)
        + caller.artifact_lines("dataset", req.dataset_artifact_id))
    compose.check_operator_settings(req.config, baseline)
    resolved = validate.validate_config(req.config)
    _check_agrees(resolved, req)
    return req.config, resolved


def _read_registry(db_url, req: TrainRequest, problems: list[ForgeError],
                   limits: capacity.Limits | None):
    """Parent, dataset and the agent's account, in one short read; and, given `limits`,
    whether one more job of the agent fits them."""
    with db.get_engine(db_url).connect() as conn:
        try:
            if req.from_scratch:
                parent = None
                _require_new(catalog, req.parent_artifact_id, conn, problems)
            else:
                parent = _artifact(catalog, req.parent_artifact_id, "model",
                                   "parent_artifact_id", conn, problems)
            dataset = _artifact(catalog, req.dataset_artifact_id, "dataset",
                                "dataset_artifact_id", conn, problems)
            account = ledger.account(req.agent_id, conn=conn)
            busy = capacity.problem(conn, req.agent_id, limits) if limits else None
        except Exception as exc:  # noqa: BLE001 - re-raised, typed where we can
            _raise_db_error(exc)
    if busy is not None:
        problems.append(busy)
    return parent, dataset, account


def _check_cap(value: Any, name: str) -> None:
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


def _check_agrees(resolved: dict, req: TrainRequest) -> None:
    pairs = {"parent.artifact_id": (resolved["parent"]["artifact_id"], req.parent_artifact_id),
             "dataset.artifact_id": (resolved["dataset"]["artifact_id"],
                                     req.dataset_artifact_id),
             "agent_id": (resolved["agent_id"], req.agent_id),
             "wall_time_cap_min": (resolved["wall_time_cap_min"], req.wall_time_cap_min),
             "vram_cap_gb": (resolved["vram_cap_gb"], req.vram_cap_gb),
             "dry_run": (resolved["dry_run"], req.dry_run),
             "allow_dirty": (resolved["allow_dirty"], req.allow_dirty)}
    if req.devices is not None:
        pairs["devices"] = (resolved["devices"], req.devices)
    if req.device is not None:
        pairs["device"] = (resolved["device"], req.device)
    for key, (in_config, given) in pairs.items():
        if in_config != given:
            raise InvalidInput(f"config has {key}={in_config!r} but the argument is {given!r}",
                               field=key, fix="pass the same value, or drop config")


def _artifact(catalog, artifact_id: str, kind: str, field: str, conn,
              problems: list[ForgeError]) -> dict | None:
    try:
        row = catalog.get_artifact(artifact_id, conn=conn, kind=kind, field=field)
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


def _require_new(catalog, artifact_id: str, conn, problems: list[ForgeError]) -> None:
    """From scratch: the id names the version to create, so it must be free."""
    try:
        catalog.get_artifact(artifact_id, conn=conn)
    except NotFound:
        return
    problems.append(Conflict(f"{artifact_id!r} is already registered", field="parent_artifact_id",
                             fix="train from scratch under a new id, or fine-tune this one"))


def _registry_values(parent: dict | None, dataset: dict | None) -> dict:
    """What the registry says the artifacts are: the parent's family and architecture, the
    dataset's source, format and label key. These are facts about the artifacts, so they win
    over conf/ and are never the caller's to set. An artifact the registry says nothing about
    keeps its conf/ option's values (operator-written); a dataset with no conf/ option is
    fetched from its origin URL in its citation's format."""
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
    if dataset is None:
        return
    source = resolved["dataset"]["source"]
    if (why := known_fetch_failure(source)) is not None:
        problems.append(DatasetUnavailable(
            f"dataset {dataset['id']!r} cannot be fetched: {why}", field="dataset_artifact_id",
            fix="the operator restores the file the dataset was registered from, or registers "
                "the data again; else pick another dataset"))
    expected = dataset.get("content_hash")
    if expected and not builtin_holds(source, expected):
        problems.append(DatasetUnavailable(
            f"dataset {dataset['id']!r} has sha256 {expected[:12]}..., which the built-in "
            f"source {source!r} does not hold", field="dataset_artifact_id",
            reason="dataset_mismatch",
            fix="register the data under its own artifact id, or pick the artifact whose "
                "content this source holds"))


def _raise_db_error(exc: Exception) -> None:
    if isinstance(exc, ForgeError):
        raise exc
    typed = db.unavailable(exc, "read the registry")
    if typed is not None:
        raise typed from exc
    raise exc


def _sandbox_plan(plan: Plan, problems: list[ForgeError]) -> dict:
    """What the sandbox would run, as plain data (runner.sandbox.sandbox_plan), built by the
    same job.sandbox_job() the real run uses. The job sees a snapshot of the pinned code,
    never the working tree (which may hold FORGE_HOME: the registry DB and the tracking
    store); its run dir is named after the allocation, which a dry run has not made."""
    job = sandbox_job(plan, output_dir=run_dir("<allocation-id>") / "out")
    # devices > 1 (policy.max_devices bounds it) is one job of that many processes on this
    # host, over loopback in the jail: CPU ranks share the CPUs; GPUs must all be here.
    if plan.device is not None and plan.device.resource_type == "gpu" \
            and plan.devices > (gpus := len(devices.gpu_names())):
        problems.append(devices.DeviceUnavailable(
            f"devices={plan.devices} GPUs asked for, but this host has {gpus}",
            field="devices", fix=f"ask for devices <= {gpus} (a job runs on one host)"))
    elif plan.device is not None and (hidden := devices.not_visible(plan.device, plan.devices)):
        problems.append(hidden)
    if (no_jail := sandbox.unavailable()) is not None:  # probed once per bwrap, cached
        problems.append(no_jail)
    try:
        out = sandbox.sandbox_plan(job)
    except ForgeError as exc:
        problems.append(exc)
        return {"error": exc.to_dict()}
    out["inputs_planned"] = ["manifest.json", "dataset"] + (
        [] if plan.request.from_scratch else ["parent"]) + (
        [] if plan.external is None else ["family"])
    return out
