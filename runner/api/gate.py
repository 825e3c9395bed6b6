"""evaluate_candidate(): the eval gate as a call, and its skill (runner/jobs/gate.py runs it)."""

from __future__ import annotations

from runner.api.train import AGENT_ID, ID, no_extra_arguments
from runner.errors import InvalidInput
from runner.tools import Skill, log_tool_call

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
    input_schema={
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["candidate_artifact_id", "agent_id"],
        "additionalProperties": False,
        "properties": {
            "candidate_artifact_id": {**ID, "description": "the candidate version to gate"},
            "agent_id": AGENT_ID,
            "gate": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                     "default": "default", "description": "a gate of conf/gate/"},
            "dry_run": {"type": "boolean", "default": False},
            "justification": {"type": ["string", "null"], "maxLength": 4000,
                              "description": "why a tradeoff should be promoted (only gates "
                                             "with allow_tradeoff accept one)"},
            "allow_dirty": {"type": "boolean", "default": False},
        },
    },
    example_input={"candidate_artifact_id": "scgpt-0123456789ab", "agent_id": "a1",
                   "gate": "default", "dry_run": True},
)

@log_tool_call(GATE_SKILL)
def evaluate_candidate(candidate_artifact_id: str, agent_id: str | None = None,
                       gate: str = "default", dry_run: bool = False, *,
                       justification: str | None = None, allow_dirty: bool = False,
                       **kw) -> dict:
    """Promote or reject a candidate version by the operator's gate `gate` (conf/gate/).

    Returns {decision, notes, comparisons: [{comparator_role, delta, ci_low, ci_high, ...}],
    lifecycle_state, promotion_state, is_latest, cost, ...}; with dry_run=True, returns
    {would_launch, reasons, estimate, comparators, rules, ...} and launches nothing.
    Another agent's candidate is Forbidden (its owner, or the operator's `forge gate`, only)."""
    no_extra_arguments(kw)
    for name, flag in (("dry_run", dry_run), ("allow_dirty", allow_dirty)):
        if not isinstance(flag, bool):
            raise InvalidInput(f"{name} must be true or false, got {flag!r}", field=name,
                               fix=f"pass {name}=True or {name}=False")
    # lazy: the gate's modules (and numpy) stay off training's dry run (~80 ms cold)
    from runner.jobs import gate as gate_job

    return gate_job.evaluate(candidate_artifact_id, agent_id, gate, dry_run=dry_run,
                             justification=justification, allow_dirty=allow_dirty)
