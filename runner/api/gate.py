"""evaluate_candidate(): the eval gate as a call, and its skill (runner/jobs/gate.py runs it)."""

from __future__ import annotations

from pydantic import Field

from runner.api import declare
from runner.api.train import AGENT_HELP
from runner.errors import InvalidArtifactId
from runner.registry.ids import AGENT_ID, ARTIFACT_ID
from runner.tools import Skill, log_tool_call


class GateArgs(declare.Arguments):
    """evaluate_candidate's arguments."""

    positional = ("candidate_artifact_id", "agent_id", "gate", "dry_run")
    errors = {"candidate_artifact_id": InvalidArtifactId}
    flags = {"agent_id": ("--agent",)}

    candidate_artifact_id: str = Field(pattern=ARTIFACT_ID.pattern,
                                       description="the candidate version to gate")
    agent_id: str = Field(pattern=AGENT_ID.pattern, description=AGENT_HELP)
    gate: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                      description="a gate of conf/gate/")
    dry_run: bool = Field(False, description="estimate and check; launch nothing")
    justification: str | None = Field(
        None, max_length=4000,
        description="why a tradeoff should be promoted (only gates with allow_tradeoff "
                    "accept one)")
    allow_dirty: bool = Field(False, description="run the working tree's uncommitted code")


GATE_SKILL = Skill(
    "Evaluate Candidate",
    description=("Decide a candidate model version on evidence: evaluate it and its parent and "
                 "champion in the sandbox on its own held-out cells, bootstrap the metric delta "
                 "(paired, 95% CI) and promote it (latest, active, MLflow alias champion) or "
                 "reject it, as the operator's gate (conf/gate/) says. Debits the evaluation "
                 "like training; dry_run=true estimates without launching. Gating a decided "
                 "version again returns the recorded decision. Only the agent that trained the "
                 "candidate gates it or reads its decision (another agent: forbidden)."),
    skill_type="model_evaluation",
    code_path="runner.api:evaluate_candidate",
    input_schema=declare.input_schema(GateArgs),
    example_input={"candidate_artifact_id": "scgpt-0123456789ab", "agent_id": "a1",
                   "gate": "default", "dry_run": True},
)


@log_tool_call(GATE_SKILL)
@declare.declared(GateArgs)
def evaluate_candidate(args: GateArgs) -> dict:
    """Promote or reject a candidate version by the operator's gate `gate` (conf/gate/).

    Returns {decision, notes, comparisons: [{comparator_role, delta, ci_low, ci_high, ...}],
    lifecycle_state, promotion_state, is_latest, cost, ...}; with dry_run=True, returns
    {would_launch, reasons, estimate, comparators, rules, ...} and launches nothing.
    Another agent's candidate is Forbidden (its owner, or the operator's `forge gate`, only)."""
    # lazy: the gate's modules (and numpy) stay off training's dry run (~80 ms cold)
    from runner.jobs import gate as gate_job

    return gate_job.evaluate(args.candidate_artifact_id, args.agent_id, args.gate,
                             dry_run=args.dry_run, justification=args.justification,
                             allow_dirty=args.allow_dirty)
