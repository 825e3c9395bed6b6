"""train_model_version(): the one call that turns "fine-tune X on Y" into a model version.

The caller's entry point and its skill. The steps live in runner/jobs/: `plan.prepare()`
validates, composes, reads the registry, prices and pins the code; a dry run stops there
and says whether the job would launch and why not, writing nothing but its tool-call audit
row. A real run continues in `launch.launch()`: reserve/debit -> inputs -> MLflow run ->
sandbox -> post-run hook -> settle.

Malformed input (a bad id, a non-integer or non-positive cap, an unknown override) raises a
typed error. Well-formed requests that cannot run (unknown agent, balance short of the
estimate, caps over policy, missing artifacts, a dirty tree) are `reasons` in a dry run and
the first of them is raised by a real run. This module never imports torch, lightning or
mlflow at import time; the dry run never imports them at all.
"""

from __future__ import annotations

from typing import Any

from runner.config.caller import caller_schema
from runner.config.schema import schema_keys
from runner.errors import InvalidInput, InvalidOverride
from runner.jobs.launch import launch
from runner.jobs.plan import MLFLOW_RUN_ID, TrainRequest, prepare
from runner.tools import Skill, log_tool_call

SKILL_NAME = "Train Model Version"


# --- the skill ------------------------------------------------------------------------------------

ID = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}
# The paying agent. Over MCP the caller's token (or the stdio server's --agent) decides it:
# left out, it is filled in; a different one is refused as `forbidden`.
AGENT_ID = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$",
            "description": "the agent that pays; over MCP, the caller's own (may be omitted)"}


def _caller_schema() -> dict:
    """What a caller may put in training_config and overrides, derived from runner.config.caller's
    tables (the ones train_model_version and forge-train enforce), never a copy."""
    return caller_schema()


_CALLER = _caller_schema()
TRAIN_SKILL = Skill(
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
            "parent_artifact_id": {**ID, "description": "model artifact to start from"},
            "dataset_artifact_id": {**ID, "description": "dataset artifact to train on"},
            "training_config": _CALLER["training_config"],
            "overrides": _CALLER["overrides"],
            "agent_id": AGENT_ID,
            "wall_time_cap_min": {"type": "integer", "minimum": 1, "default": 120},
            "vram_cap_gb": {"type": "integer", "minimum": 1, "default": 24},
            "devices": {"type": ["integer", "null"], "minimum": 1},
            "device": {"type": ["string", "null"], "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                       "description": "auto, cpu, h100, h200, ..."},
            "dry_run": {"type": "boolean", "default": False},
            "allow_dirty": {"type": "boolean", "default": False},
            "mlflow_parent_run_id": {"type": ["string", "null"],
                                     "pattern": f"^{MLFLOW_RUN_ID.pattern}$",
                                     "description": "a run of this agent (its sweep's) to "
                                                    "nest this job's MLflow run under"},
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


# --- the call -------------------------------------------------------------------------------------

@log_tool_call(TRAIN_SKILL)
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
    no_extra_arguments(kw)
    plan = prepare(TrainRequest(
        parent_artifact_id, dataset_artifact_id, agent_id,
        training_config=nest_training_config(training_config), overrides=overrides,
        wall_time_cap_min=wall_time_cap_min, vram_cap_gb=vram_cap_gb, dry_run=dry_run,
        allow_dirty=allow_dirty, devices=devices, device=device, config=config,
        code_commit=code_commit, mlflow_parent_run_id=mlflow_parent_run_id))
    if dry_run:
        return plan.dry_run_result()
    if plan.problems:
        raise plan.problems[0]
    return launch(plan)


def no_extra_arguments(kw: dict) -> None:
    """A call's **kw must be empty: an unknown argument is refused, never ignored."""
    if kw:
        raise InvalidInput(f"unknown arguments: {', '.join(sorted(kw))}",
                           field=min(kw), fix="see the skill's input_schema")


# --- the caller's dict ----------------------------------------------------------------------------

def nest_training_config(training_config: Any) -> Any:
    """A flat dict of training settings (`{"lr": 1e-4}`) -> `{"training": {"lr": 1e-4}}`.

    A dict whose keys are all config-root keys (`training`, `parent`, ...) is already nested;
    a mix of both is ambiguous and refused. Anything else is left for validation to refuse."""
    if not isinstance(training_config, dict) or not training_config:
        return training_config
    root = set(schema_keys(""))
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
