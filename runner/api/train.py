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

from typing import Annotated, Any

from pydantic import Field, WithJsonSchema

from runner.api import declare
from runner.config.caller import caller_schema
from runner.config.schema import schema_keys
from runner.config.validate import INT_MAX
from runner.errors import CapOutOfPolicy, InvalidArtifactId, InvalidOverride
from runner.jobs.launch import launch
from runner.jobs.plan import MLFLOW_RUN_ID, TrainRequest, prepare
from runner.registry.ids import AGENT_ID as AGENT_PATTERN
from runner.registry.ids import ARTIFACT_ID
from runner.tools import Skill, log_tool_call

SKILL_NAME = "Train Model Version"


# --- the arguments, declared once -----------------------------------------------------------------

# The paying agent. Over MCP the caller's token (or the stdio server's --agent) decides it:
# left out, it is filled in; a different one is refused as `forbidden`.
AGENT_HELP = "the agent that pays; over MCP, the caller's own (may be omitted)"
Count = Annotated[int, Field(ge=1, le=INT_MAX)]
# What a caller may put in training_config and overrides: runner.config.caller's tables (the
# ones train_model_version and forge-train enforce) as JSON Schema, never a copy. Checked by
# caller.py itself, with its reason-coded errors, so any value passes the model.
_CALLER = caller_schema()


class TrainArgs(declare.Arguments):
    """train_model_version's arguments (submit_training's, less the dry run's and sweep's)."""

    positional = ("parent_artifact_id", "dataset_artifact_id", "training_config", "agent_id",
                  "wall_time_cap_min", "vram_cap_gb", "dry_run")
    python_only = frozenset({"config"})
    errors = {"parent_artifact_id": InvalidArtifactId, "dataset_artifact_id": InvalidArtifactId,
              "wall_time_cap_min": CapOutOfPolicy, "vram_cap_gb": CapOutOfPolicy,
              "devices": CapOutOfPolicy}
    flags = {"agent_id": ("--agent",), "parent_artifact_id": ("--parent",),
             "dataset_artifact_id": ("--dataset",), "wall_time_cap_min": ("--cap",)}

    parent_artifact_id: str = Field(pattern=ARTIFACT_ID.pattern,
                                    description="model artifact to start from")
    dataset_artifact_id: str = Field(pattern=ARTIFACT_ID.pattern,
                                     description="dataset artifact to train on")
    training_config: Annotated[Any, WithJsonSchema(_CALLER["training_config"])] = None
    agent_id: str = Field(pattern=AGENT_PATTERN.pattern, description=AGENT_HELP)
    wall_time_cap_min: Count = Field(
        default_factory=declare.from_conf("wall_time_cap_min"),
        description="minutes before the sandbox is killed; the estimate is priced on it")
    vram_cap_gb: Count = Field(default_factory=declare.from_conf("vram_cap_gb"),
                               description="GPU memory the job may use, in GB")
    dry_run: bool = Field(False, description="validate, compose, pin the code and estimate; "
                                             "launch nothing")
    overrides: Annotated[Any, WithJsonSchema(_CALLER["overrides"])] = None
    allow_dirty: bool = Field(False, description="run the working tree's uncommitted code")
    devices: Count | None = Field(None, description="how many devices (default: conf/'s)")
    device: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                  description="auto, cpu, h100, h200, ...")
    mlflow_parent_run_id: str | None = Field(
        None, pattern=f"^{MLFLOW_RUN_ID.pattern}$",
        description="a run of this agent (its sweep's) to nest this job's MLflow run under")
    code_commit: str | None = Field(
        None, pattern="^[0-9a-f]{7,40}$",
        description="run this commit of the code instead of HEAD (sweeps pin once for all "
                    "their jobs)")
    verbose: bool = Field(False, description="a dry run's reply in full: the sandbox's argv, "
                                             "binds and environment, the whole config")
    config: Any = None  # a DictConfig forge-train composed; replaces the composition


TRAIN_SKILL = Skill(
    SKILL_NAME,
    description=("Fine-tune a registered parent model on a registered dataset inside the "
                 "sandbox; debits the estimate before launch and registers the result as a "
                 "candidate model version. dry_run=true validates, composes the config, pins "
                 "the code and estimates the cost without launching."),
    skill_type="model_training",
    code_path="runner.api:train_model_version",
    input_schema=declare.input_schema(TrainArgs),
    example_input={
        "parent_artifact_id": "model-scgpt-cbmc-base",
        "dataset_artifact_id": "dataset-geo-GSE100866",
        "agent_id": "a1",
        "overrides": ["training=finetune_celltype", "training.lr=1e-4"],
        "wall_time_cap_min": declare.conf_default("wall_time_cap_min"),
        "vram_cap_gb": declare.conf_default("vram_cap_gb"),
        "dry_run": True,
    },
)


# --- the call -------------------------------------------------------------------------------------

@log_tool_call(TRAIN_SKILL)
@declare.declared(TrainArgs)
def train_model_version(args: TrainArgs) -> dict:
    """Fine-tune `parent_artifact_id` on `dataset_artifact_id` as a new candidate version.

    `training_config` is a dict of training settings (`{"lr": 1e-4}` means `training.lr`), or
    a nested dict merged at the config root (`{"training": {"lr": 1e-4}}`); `overrides` are Hydra
    override strings (`training.lr=1e-4`, `training=pretrain_mgm`). Caps, devices, the agent
    and the flags come from the arguments (TrainArgs declares them; the caps default to
    conf/train.yaml's). `config` is an already composed config (what forge-train passes); it
    replaces the composition and must agree with the arguments. `code_commit` runs that commit
    of the code repository instead of HEAD (a sweep pins once and passes it to every job).

    With `dry_run=True`, returns {would_launch, reasons, estimate, config, code, sandbox,
    balance, request_key, ...} (the sandbox's argv and binds with `verbose=True`) and
    launches nothing. Money is a decimal string beside its currency.
    """
    plan = prepare(request(args, dry_run=args.dry_run, config=args.config,
                           code_commit=args.code_commit,
                           mlflow_parent_run_id=args.mlflow_parent_run_id))
    if args.dry_run:
        return plan.dry_run_result(verbose=args.verbose)
    if plan.problems:
        raise plan.problems[0]
    return launch(plan)


def request(args: declare.Arguments, **extra) -> TrainRequest:
    """The TrainRequest of a train or submit call's arguments."""
    return TrainRequest(
        args.parent_artifact_id, args.dataset_artifact_id, args.agent_id,
        training_config=nest_training_config(args.training_config), overrides=args.overrides,
        wall_time_cap_min=args.wall_time_cap_min, vram_cap_gb=args.vram_cap_gb,
        allow_dirty=args.allow_dirty, devices=args.devices, device=args.device, **extra)


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
