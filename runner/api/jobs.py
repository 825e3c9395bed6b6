"""Asynchronous training as calls: `submit_training` debits and queues a job and returns its
id at once; `job_status`, `job_log` and `cancel_job` look after it (runner/jobs/background.py
runs it through submitit). Each is a skill, audited like train_model_version, and a job is
its own agent's: another agent's job id is refused as `forbidden`.
"""

from __future__ import annotations

import re

from runner.api.train import AGENT_ID, TRAIN_SKILL, nest_training_config, no_extra_arguments
from runner.errors import Forbidden, InvalidInput
from runner.jobs import background
from runner.jobs.plan import TrainRequest, prepare
from runner.registry import ledger
from runner.tools import Skill, log_tool_call

JOB_ID = {"type": "string", "pattern": r"^alloc-[0-9a-f]{32}$",
          "description": "the job id submit_training returned (its allocation id)"}
_JOB_ID = re.compile(JOB_ID["pattern"])
# A submission takes what a real train_model_version call takes, less what only a dry run
# or a sweep sets: the same definitions, never a copy.
_NOT_SUBMITTED = ("dry_run", "mlflow_parent_run_id", "code_commit")


def _schema(properties: dict, required: list[str]) -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": required, "additionalProperties": False, "properties": properties}


_TRAIN = TRAIN_SKILL.input_schema
SUBMIT_SKILL = Skill(
    "Submit Training",
    description=("Like Train Model Version, but returns at once: checks the request as a dry "
                 "run does, debits the estimate and queues the job on the operator's engine "
                 "(submitit: local, or SLURM). Returns the job id; follow it with Job Status, "
                 "Job Log and Cancel Job. The same request again returns the same job."),
    skill_type="model_training",
    code_path="runner.api:submit_training",
    input_schema=_schema({k: v for k, v in _TRAIN["properties"].items()
                          if k not in _NOT_SUBMITTED}, list(_TRAIN["required"])),
    example_input={k: v for k, v in TRAIN_SKILL.example_input.items() if k != "dry_run"},
)
STATUS_SKILL = Skill(
    "Job Status",
    description=("A submitted job's state (queued, running, succeeded, failed, cancelled), "
                 "its cost, its progress while it runs (epoch, step, eta, the latest "
                 "metrics) and, once done, the registered version or the error."),
    skill_type="job_control", code_path="runner.api:job_status",
    input_schema=_schema({"job_id": JOB_ID, "agent_id": AGENT_ID}, ["job_id", "agent_id"]),
    example_input={"job_id": "alloc-" + "0" * 32, "agent_id": "a1"},
)
LOG_SKILL = Skill(
    "Job Log",
    description="The last lines of a submitted job's log.",
    skill_type="job_control", code_path="runner.api:job_log",
    input_schema=_schema({"job_id": JOB_ID, "agent_id": AGENT_ID,
                          "tail": {"type": "integer", "minimum": 1,
                                   "maximum": background.MAX_TAIL, "default": 50}},
                         ["job_id", "agent_id"]),
    example_input={"job_id": "alloc-" + "0" * 32, "agent_id": "a1", "tail": 50},
)
CANCEL_SKILL = Skill(
    "Cancel Job",
    description=("Cancel a submitted job: a queued one is refunded whole; a running one is "
                 "stopped in its sandbox, charged the seconds it ran and refunded the rest; "
                 "its MLflow run ends KILLED. Returns its state once settled."),
    skill_type="job_control", code_path="runner.api:cancel_job",
    input_schema=_schema({"job_id": JOB_ID, "agent_id": AGENT_ID}, ["job_id", "agent_id"]),
    example_input={"job_id": "alloc-" + "0" * 32, "agent_id": "a1"},
)


@log_tool_call(SUBMIT_SKILL)
def submit_training(parent_artifact_id: str, dataset_artifact_id: str,
                    training_config: dict | None = None, agent_id: str | None = None,
                    wall_time_cap_min: int = 120, vram_cap_gb: int = 24, *,
                    overrides: list[str] | None = None, allow_dirty: bool = False,
                    devices: int | None = None, device: str | None = None, **kw) -> dict:
    """Queue a fine-tune of `parent_artifact_id` on `dataset_artifact_id` (the arguments of
    train_model_version) and return {job_id, status: queued, engine, cost, ...} at once."""
    no_extra_arguments(kw)
    plan = prepare(TrainRequest(
        parent_artifact_id, dataset_artifact_id, agent_id,
        training_config=nest_training_config(training_config), overrides=overrides,
        wall_time_cap_min=wall_time_cap_min, vram_cap_gb=vram_cap_gb, allow_dirty=allow_dirty,
        devices=devices, device=device))
    if plan.problems:
        raise plan.problems[0]
    return background.submit(plan)


@log_tool_call(STATUS_SKILL)
def job_status(job_id: str, agent_id: str | None = None, **kw) -> dict:
    """{job_id, status, cost, progress (running), result (succeeded), error (failed, cancelled)}."""
    no_extra_arguments(kw)
    return background.state(own_job(job_id, agent_id))


@log_tool_call(LOG_SKILL)
def job_log(job_id: str, agent_id: str | None = None, tail: int = 50, **kw) -> dict:
    """{job_id, status, lines}: the last `tail` lines of the job's log."""
    no_extra_arguments(kw)
    return background.log_tail(own_job(job_id, agent_id), tail)


@log_tool_call(CANCEL_SKILL)
def cancel_job(job_id: str, agent_id: str | None = None, **kw) -> dict:
    """Stop and settle the job; returns its state (cancelled, or how it ended first)."""
    no_extra_arguments(kw)
    alloc = own_job(job_id, agent_id)
    return background.cancel(alloc, reason=f"by agent {alloc['agent_id']}")


def own_job(job_id, agent_id) -> dict:
    """The job's allocation, if `agent_id` owns it; Forbidden for another agent's job."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidInput(f"job_id must look like alloc-<32 hex>, got {str(job_id)[:80]!r}",
                           field="job_id", fix="pass the job_id submit_training returned")
    ledger.check_agent_id(agent_id)
    alloc = ledger.get_allocation(job_id)
    if alloc["agent_id"] != agent_id:
        raise Forbidden(f"job {job_id} is not agent {agent_id!r}'s", field="job_id",
                        fix="pass a job id this agent submitted")
    return alloc
