"""The calls agents and researchers make, each declared once as a pydantic model of its
arguments (declare.py derives the skill's input schema, the Python signature and its checks,
forge's click options and the /tools form from it), and audited in `tool_calls`:

- `train_model_version` (train.py): fine-tune a parent on a dataset, blocking, or a dry run.
- `submit_training`, `job_status`, `job_log`, `cancel_job` (jobs.py): the same, asynchronous.
- `evaluate_candidate` (gate.py): the eval gate.
- `describe_options`, `lineage`, `model_show` (lookups.py): read-only discovery.

`SKILLS` is what `register_skills` writes: `db.upgrade()` (and so `forge db upgrade`) calls it
through the package's `forge_runner.skills` entry point, `forge tools register` directly.
`TOOLS` maps each skill's tool name (its id without `skill-`, in snake case) to its call, for
the MCP server.
"""

from runner.api.gate import GATE_SKILL, evaluate_candidate
from runner.api.jobs import (
    CANCEL_SKILL,
    LOG_SKILL,
    STATUS_SKILL,
    SUBMIT_SKILL,
    cancel_job,
    job_log,
    job_status,
    submit_training,
)
from runner.api.lookups import (
    LINEAGE_SKILL,
    MODEL_SKILL,
    OPTIONS_SKILL,
    describe_options,
    lineage,
    model_show,
)
from runner.api.train import TRAIN_SKILL, nest_training_config, train_model_version
from runner.tools import register_tools

CALLS = (train_model_version, submit_training, job_status, job_log, cancel_job,
         evaluate_candidate, describe_options, lineage, model_show)
SKILLS = tuple(call.skill for call in CALLS)
TOOLS = {call.__name__: call for call in CALLS}


def register_skills(*, conn=None) -> list[dict]:
    """Write SKILLS to the skills table (idempotent), in the caller's transaction `conn`."""
    return register_tools(SKILLS, conn=conn)


__all__ = ["CALLS", "SKILLS", "TOOLS", "TRAIN_SKILL", "GATE_SKILL", "SUBMIT_SKILL",
           "STATUS_SKILL", "LOG_SKILL", "CANCEL_SKILL", "OPTIONS_SKILL", "LINEAGE_SKILL",
           "MODEL_SKILL", "train_model_version", "submit_training", "job_status", "job_log",
           "cancel_job", "evaluate_candidate", "describe_options", "lineage", "model_show",
           "nest_training_config", "register_skills"]
