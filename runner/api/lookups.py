"""Read-only calls for agents: what may be asked (`describe_options`), and what the registry
holds (`lineage`, `model_show`). Each is a skill, audited like the others; none debits or
writes anything but its audit row.
"""

from __future__ import annotations

import dataclasses

from pydantic import Field

from runner.api import declare
from runner.api.train import TrainArgs
from runner.config import caller, compose
from runner.config.options import group_options, option_for_artifact
from runner.config.schema import TrainingConf
from runner.errors import InvalidArtifactId
from runner.registry import catalog, promotion
from runner.registry.ids import ARTIFACT_ID
from runner.tools import Skill, jsonable, log_tool_call
from trainers import family as families


class NoArgs(declare.Arguments):
    """describe_options takes nothing."""


class ArtifactArgs(declare.Arguments):
    """lineage's and model_show's argument: a model artifact."""

    positional = ("artifact_id",)
    errors = {"artifact_id": InvalidArtifactId}
    artifact_id: str = Field(pattern=ARTIFACT_ID.pattern, description="a model artifact id")


OPTIONS_SKILL = Skill(
    "Describe Options",
    description=("What a caller may choose and set: the registered parent models and "
                 "datasets (a model's family decides its training keys), the conf/ options of "
                 "parent, dataset and training, every training key with its type and allowed "
                 "values, each family's keys and defaults per task, and the "
                 "caps with the operator's limits and prices."),
    skill_type="discovery", code_path="runner.api:describe_options",
    input_schema=declare.input_schema(NoArgs), example_input={})
LINEAGE_SKILL = Skill(
    "Lineage",
    description="A model version's ancestors (root first) and its children.",
    skill_type="discovery", code_path="runner.api:lineage",
    input_schema=declare.input_schema(ArtifactArgs),
    example_input={"artifact_id": "model-scgpt-cbmc-base"})
MODEL_SKILL = Skill(
    "Model Show",
    description=("A model version: its artifact and model_versions rows (metrics, code "
                 "commit, training params, MLflow ids), its links and its gate evaluations."),
    skill_type="discovery", code_path="runner.api:model_show",
    input_schema=declare.input_schema(ArtifactArgs),
    example_input={"artifact_id": "model-scgpt-cbmc-base"})


@log_tool_call(OPTIONS_SKILL)
@declare.declared(NoArgs)
def describe_options(args: NoArgs) -> dict:
    """{artifacts, groups, training_keys, training_defaults, arguments, devices}."""
    base = compose.compose_resolved([], None, writable=False)[1]  # the operator's defaults
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingConf)}
    keys = {}
    for name, spec in caller.training_key_schemas().items():
        value = defaults[name]  # a family's key defaults per family ("${forge_family:...}")
        if value not in (dataclasses.MISSING, "???", None) and not str(value).startswith("${"):
            spec["default"] = value
        keys[name] = spec
    # Each family's own keys and defaults: a parent's registry record names its family, and a
    # key of another family is refused (the artifacts below say which family each model is).
    by_family = {fam.name: {"summary": fam.summary, "tasks": dict(fam.tasks),
                            "training_keys": list(fam.training_keys()),
                            "defaults": {task: fam.defaults(task) for task in fam.tasks}}
                 for fam in families.all_families()}
    per_option = {}
    for option in group_options("training"):
        resolved = compose.compose_resolved([f"training={option}"], None, writable=False)[1]
        per_option[option] = resolved["training"]
    pricing = base["pricing"]
    return jsonable({
        "artifacts": {
            "models": [_artifact_summary(a, "parent") for a in catalog.list_artifacts("model")],
            "datasets": [_artifact_summary(a, "dataset")
                         for a in catalog.list_artifacts("dataset")]},
        "groups": {group: group_options(group) for group in caller.CHOICE_GROUPS},
        "training_keys": keys,
        "families": by_family,
        "training_defaults": per_option,
        "arguments": _arguments(base),
        "pricing": {"currency": pricing["currency"], "price_per_hour": pricing["price_per_hour"],
                    "per_device": pricing["per_device"],
                    "estimate": "price_per_hour x wall_time_cap_min / 60 x devices, debited "
                                "before launch; the seconds not used are refunded"},
        "operator_only": list(caller.OPERATOR_GROUPS),
    })


def _arguments(base: dict) -> dict:
    """The caps and the device as train_model_version declares them (TrainArgs), with what
    the operator's conf/ adds: the policy's limits, the devices priced, the defaults."""
    declared = declare.input_schema(TrainArgs)["properties"]
    policy, per_device = base["policy"], base["pricing"]["per_device"]
    limits = {"wall_time_cap_min": policy["max_wall_time_cap_min"],
              "vram_cap_gb": policy["max_vram_gb"], "devices": policy["max_devices"]}
    out = {}
    for name in ("wall_time_cap_min", "vram_cap_gb", "devices", "device"):
        spec = {**declared[name], "default": base[name]}
        spec["type"] = "string" if name == "device" else "integer"  # conf/ fills a None
        spec.pop("pattern", None)
        if name in limits:
            spec["maximum"] = limits[name]
        else:
            spec["enum"] = ["auto", *sorted(per_device)]
        out[name] = spec
    return out


def _artifact_summary(row: dict, group: str) -> dict:
    family = (row.get("metadata") or {}).get("family") if group == "parent" else None
    return {"id": row["id"], "title": row["title"], "version_number": row["version_number"],
            **({"family": family} if family else {}),
            "lifecycle_state": row["lifecycle_state"], "is_latest": row["is_latest"],
            "conf_option": option_for_artifact(group, row["id"])}


@log_tool_call(LINEAGE_SKILL)
@declare.declared(ArtifactArgs)
def lineage(args: ArtifactArgs) -> dict:
    """{artifact_id, ancestors: [root, ..., itself], children: [...]}."""
    artifact_id = args.artifact_id
    chain = catalog.lineage(artifact_id)
    children = [_artifact_summary(a, "parent") for a in catalog.list_artifacts("model")
                if a["parent_version_id"] == artifact_id]
    return jsonable({"artifact_id": artifact_id, "ancestors": chain, "children": children})


@log_tool_call(MODEL_SKILL)
@declare.declared(ArtifactArgs)
def model_show(args: ArtifactArgs) -> dict:
    """The model version with its links and gate evaluations (what `forge models show` prints)."""
    artifact_id = args.artifact_id
    model = catalog.get_model_version(artifact_id)
    model["links"] = catalog.links(artifact_id)
    model["evaluations"] = promotion.recorded(artifact_id)
    return jsonable(model)
