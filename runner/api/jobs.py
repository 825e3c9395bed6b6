"""Asynchronous training as calls: `submit_training` debits and queues a job and returns its
id at once; `job_status`, `job_log` and `cancel_job` look after it (runner/jobs/background.py
runs it through submitit). Each is a skill, audited like train_model_version, and a job is
its own agent's: another agent's job id is refused as `forbidden`.
"""

from __future__ import annotations

import re

from pydantic import Field

from runner.api import declare
from runner.api.train import AGENT_HELP, TRAIN_SKILL, TrainArgs, request
from runner.errors import Forbidden, InvalidInput
from runner.jobs import background
from runner.jobs.plan import prepare
from runner.registry import ledger
from runner.registry.ids import AGENT_ID as AGENT_PATTERN
from runner.tools import Skill, log_tool_call

JOB_PATTERN = r"^alloc-[0-9a-f]{32}$"
_JOB_ID = re.compile(JOB_PATTERN)

# A submission takes what a real train_model_version call takes, less what only a dry run
# or a sweep sets: the same declarations, never a copy.
SubmitArgs = declare.less(TrainArgs, "dry_run", "verbose", "mlflow_parent_run_id",
                          "code_commit", "config", name="SubmitArgs",
                          doc="submit_training's arguments: train_model_version's, less "
                              "the dry run's and the sweep's")


class JobArgs(declare.Arguments):
    """job_status's and cancel_job's arguments: the job and its agent."""

    positional = ("job_id", "agent_id")
    job_id: str = Field(pattern=JOB_PATTERN,
                        description="the job id submit_training returned (its allocation id)")
    agent_id: str = Field(pattern=AGENT_PATTERN.pattern, description=AGENT_HELP)


class LogArgs(JobArgs):
    """job_log's arguments: the job, its agent and how many lines."""

    positional = ("job_id", "agent_id", "tail")
    tail: int = Field(50, ge=1, le=background.MAX_TAIL, description="how many lines")


SUBMIT_SKILL = Skill(
    "Submit Training",
    description=("Like Train Model Version, but returns at once: checks the request as a dry "
                 "run does, debits the estimate and queues the job on the operator's engine "
                 "(submitit: local, or SLURM). Returns the job id; follow it with Job Status, "
                 "Job Log and Cancel Job. The same request again returns the same job."),
    skill_type="model_training",
    code_path="runner.api:submit_training",
    input_schema=declare.input_schema(SubmitArgs),
    example_input={k: v for k, v in TRAIN_SKILL.example_input.items() if k != "dry_run"},
)
STATUS_SKILL = Skill(
    "Job Status",
    description=("A submitted job's state (queued, running, succeeded, failed, cancelled), "
                 "its cost, its progress while it runs (epoch, step, eta, the latest "
                 "metrics) and, once done, the registered version or the error."),
    skill_type="job_control", code_path="runner.api:job_status",
    input_schema=declare.input_schema(JobArgs),
    example_input={"job_id": "alloc-" + "0" * 32, "agent_id": "a1"},
)
LOG_SKILL = Skill(
    "Job Log",
    description="The last lines of a submitted job's log.",
    skill_type="job_control", code_path="runner.api:job_log",
    input_schema=declare.input_schema(LogArgs),
    example_input={"job_id": "alloc-" + "0" * 32, "agent_id": "a1", "tail": 50},
)
CANCEL_SKILL = Skill(
    "Cancel Job",
    description=("Cancel a submitted job: a queued one is refunded whole; a running one is "
                 "stopped in its sandbox, charged the seconds it ran and refunded the rest; "
                 "its MLflow run ends KILLED. Returns its state once settled."),
    skill_type="job_control", code_path="runner.api:cancel_job",
    input_schema=declare.input_schema(JobArgs),
    example_input={"job_id": "alloc-" + "0" * 32, "agent_id": "a1"},
)


@log_tool_call(SUBMIT_SKILL)
@declare.declared(SubmitArgs)
def submit_training(args) -> dict:
    """Queue a fine-tune of `parent_artifact_id` on `dataset_artifact_id` (the arguments of
    train_model_version) and return {job_id, status: queued, engine, cost, ...} at once."""
    plan = prepare(request(args))
    if plan.problems:
        raise plan.problems[0]
    return background.submit(plan)


@log_tool_call(STATUS_SKILL)
@declare.declared(JobArgs)
def job_status(args: JobArgs) -> dict:
    """{job_id, status, cost, progress (running), result (succeeded), error (failed, cancelled)}."""
    return background.state(own_job(args.job_id, args.agent_id))


@log_tool_call(LOG_SKILL)
@declare.declared(LogArgs)
def job_log(args: LogArgs) -> dict:
    """{job_id, status, lines}: the last `tail` lines of the job's log."""
    return background.log_tail(own_job(args.job_id, args.agent_id), args.tail)


@log_tool_call(CANCEL_SKILL)
@declare.declared(JobArgs)
def cancel_job(args: JobArgs) -> dict:
    """Stop and settle the job; returns its state (cancelled, or how it ended first)."""
    alloc = own_job(args.job_id, args.agent_id)
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
