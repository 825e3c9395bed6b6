"""Typed errors. Every failure an agent can hit carries a machine-readable `reason`,
the offending `field` where there is one, and a `fix` a person or an agent can apply."""

from __future__ import annotations


class ForgeError(Exception):
    """Base class of every error forge-runner raises on purpose."""

    reason = "error"

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None,
                 reason: str | None = None, **details):
        super().__init__(message)
        self.message = message
        self.field = field
        self.fix = fix
        if reason:
            self.reason = reason
        self.details = details

    def __str__(self) -> str:
        text = self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return text

    def to_dict(self) -> dict:
        out = {"error": type(self).__name__, "reason": self.reason, "message": self.message}
        if self.field:
            out["field"] = self.field
        if self.fix:
            out["fix"] = self.fix
        out.update({k: v for k, v in self.details.items() if v is not None})
        return out


class InvalidInput(ForgeError):
    reason = "invalid_input"


class InvalidArtifactId(InvalidInput):
    reason = "invalid_artifact_id"


class NotFound(ForgeError):
    reason = "not_found"


class WrongArtifactType(InvalidInput):
    reason = "wrong_artifact_type"


class SchemaViolation(InvalidInput):
    reason = "schema_violation"


class Conflict(ForgeError):
    reason = "conflict"


class InvalidOverride(InvalidInput):
    reason = "invalid_override"


class BudgetExceeded(ForgeError):
    reason = "insufficient_balance"


class UnknownAgent(NotFound):
    reason = "unknown_agent"


class CapOutOfPolicy(InvalidInput):
    reason = "cap_out_of_policy"


class LedgerError(ForgeError):
    reason = "ledger_error"


class SandboxUnavailable(ForgeError):
    reason = "sandbox_unavailable"


class CodePinError(ForgeError):
    reason = "code_pin"


class WeightsIntegrityError(ForgeError):
    reason = "weights_integrity"


class TrainingFailed(ForgeError):
    reason = "training_failed"


class JobCancelled(ForgeError):
    """The job was stopped before it finished: its scheduler cancelled it (scancel, a time
    limit, preemption) or the host process got SIGTERM. Settled as cancelled: the seconds it
    ran are charged, the rest refunded."""

    reason = "cancelled"


class RegistrationFailed(ForgeError):
    reason = "registration_failed"


class InvalidAmount(InvalidInput):
    reason = "invalid_amount"


class InvalidConfig(InvalidInput):
    reason = "invalid_config"


class DatasetUnavailable(ForgeError):
    reason = "dataset_unavailable"


class DiskFull(ForgeError):
    """The host's disk has no room: FORGE_HOME below registry.min_free_gb before a debit, or
    ENOSPC while writing (an archive unpacking, a download)."""

    reason = "disk_full"


class InternalError(ForgeError):
    """Something on the host side failed that has no better type (a bug, a broken library):
    the allocation is settled and the cause is chained."""

    reason = "internal_error"


class GateRefused(ForgeError):
    """The eval gate will not decide this candidate: it is not a candidate, was already gated
    under other rules, its held-out cells cannot be rebuilt, or the champion moved."""

    reason = "gate_refused"


class EvaluationFailed(ForgeError):
    """The eval gate's sandbox job failed (timeout, oom, a crash, unusable predictions)."""

    reason = "evaluation_failed"


class Forbidden(ForgeError):
    """The caller is not the agent it names: an `agent_id` that disagrees with the caller's
    token (or the stdio server's --agent), or a job of another agent. Nothing is written but
    the call's audit row, which names the caller."""

    reason = "forbidden"


class Busy(ForgeError):
    """The caller already has as many blocking calls running as the server allows one agent
    (`forge mcp --blocking-per-agent`): refused at once, nothing written but the audit row."""

    reason = "busy"


class NoForgeHome(ForgeError):
    """No FORGE_HOME and no forge.toml here or above (runner/settings.py): nothing is guessed."""
    reason = "no_forge_home"


class StoreHalfMigrated(ForgeError):
    """A store (the MLflow tracking store, or the registry) has tables but its migration
    record is missing or behind: a migration was interrupted. Nothing runs on it until the
    operator repairs it as the fix says; it is never reported as the registry being away."""

    reason = "store_half_migrated"


class CapacityExceeded(ForgeError):
    """A job over the operator's limits on jobs at once (conf `policy:`: per agent, per host,
    the sum of memory caps per host): refused before any debit; `field` names the limit."""

    reason = "capacity"


class ParentStateRefused(ForgeError):
    """A parent in a lifecycle state the operator's `policy.parent_states` leaves out (by
    default a rejected, superseded, deprecated or draft version): refused before any debit;
    `state` names it."""

    reason = "parent_state"


class Unschedulable(ForgeError):
    """A SLURM array asks for what no node of its partition has (CPUs, memory, GPUs, nodes,
    time) or names a partition that does not exist: it would pend forever. Refused before any
    job is submitted or debited (runner/config/launchers.py)."""

    reason = "unschedulable"
