"""The SciDEX-compatible registry schema as SQLAlchemy Core tables.

Alembic revisions under runner/registry/migrations create these;
`tests/test_registry.py::test_migrations_match_the_metadata` checks that the migrations and
this metadata never drift apart.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

MONEY_PLACES = Decimal("0.000001")


class Money(TypeDecorator):
    """Exact money: NUMERIC(20, 6) on PostgreSQL, integer micro-units on SQLite.

    SQLite has no exact decimal type (NUMERIC affinity turns 0.1 into a float), so there the
    value is stored as an integer count of millionths; Python always sees a Decimal.
    """

    impl = sa.Numeric(20, 6)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.Numeric(20, 6, asdecimal=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = Decimal(value).quantize(MONEY_PLACES, rounding=ROUND_HALF_EVEN)
        if dialect.name == "sqlite":
            return int(value * 1_000_000)
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if dialect.name == "sqlite":
            return (Decimal(int(value)) / 1_000_000).quantize(MONEY_PLACES)
        return Decimal(value).quantize(MONEY_PLACES)


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

ARTIFACT_TYPES = ("model", "dataset", "benchmark", "notebook", "figure", "other")
LIFECYCLE_STATES = ("draft", "candidate", "active", "superseded", "deprecated", "rejected")
PROMOTION_STATES = ("candidate", "promoted", "rejected", "superseded")
ALLOCATION_STATES = ("reserved", "running", "settled", "failed", "cancelled")
ALLOCATION_PURPOSES = ("training", "evaluation")
GATE_DECISIONS = ("promoted", "rejected")
COMPARATOR_ROLES = ("parent", "champion", "baseline", "benchmark_best")

artifacts = sa.Table(
    "artifacts", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("artifact_type", sa.Text, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("version_number", sa.Integer, nullable=False, server_default="1"),
    sa.Column("parent_version_id", sa.Text, sa.ForeignKey("artifacts.id"), index=True),
    sa.Column("version_tag", sa.Text),
    sa.Column("changelog", sa.Text),
    sa.Column("is_latest", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("lifecycle_state", sa.Text, nullable=False, server_default="active"),
    _ts("lifecycle_changed_at"),
    sa.Column("superseded_by", sa.Text),
    sa.Column("origin_type", sa.Text, nullable=False, server_default="internal"),
    sa.Column("origin_url", sa.Text),
    sa.Column("content_hash", sa.Text),
    sa.Column("metadata", sa.JSON),
    sa.Column("created_by", sa.Text),
    _ts("created_at", nullable=False),
    sa.CheckConstraint(f"artifact_type IN {ARTIFACT_TYPES}", name="artifact_type"),
    sa.CheckConstraint(f"lifecycle_state IN {LIFECYCLE_STATES}", name="lifecycle_state"),
    sa.CheckConstraint("origin_type IN ('internal', 'external')", name="origin_type"),
    sa.CheckConstraint("version_number >= 1", name="version_number"),
    # migration 0009: a page of the newest versions, and every lineage's champion, by index
    sa.Index("ix_artifacts_type_created_at", "artifact_type", "created_at"),
    sa.Index("ix_artifacts_type_is_latest", "artifact_type", "is_latest"),
    sa.Index("ix_artifacts_type_lifecycle_state", "artifact_type", "lifecycle_state"),
)

artifact_links = sa.Table(
    "artifact_links", metadata,
    sa.Column("source_id", sa.Text, sa.ForeignKey("artifacts.id"), primary_key=True),
    sa.Column("target_id", sa.Text, sa.ForeignKey("artifacts.id"), primary_key=True, index=True),
    sa.Column("link_type", sa.Text, primary_key=True),
    _ts("created_at", nullable=False),
)

resource_allocations = sa.Table(
    "resource_allocations", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("agent_id", sa.Text, nullable=False, index=True),
    sa.Column("resource_type", sa.Text, nullable=False, server_default="gpu"),
    sa.Column("device", sa.Text),
    sa.Column("devices", sa.Integer, nullable=False, server_default="1"),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("wall_time_cap_min", sa.Integer, nullable=False),
    sa.Column("vram_cap_gb", sa.Integer, nullable=False),
    sa.Column("price_per_hour", Money, nullable=False),
    sa.Column("currency", sa.Text, nullable=False, server_default="credits"),
    sa.Column("estimated_cost", Money, nullable=False),
    sa.Column("debited", Money, nullable=False),
    sa.Column("actual_seconds", sa.Float),
    sa.Column("actual_cost", Money),
    sa.Column("refunded", Money),
    sa.Column("request_key", sa.Text, nullable=False, unique=True),
    sa.Column("mlflow_run_id", sa.Text),
    sa.Column("artifact_id", sa.Text),
    sa.Column("failure_reason", sa.Text),
    _ts("created_at", nullable=False),
    _ts("debited_at"),
    _ts("started_at"),
    _ts("settled_at"),
    # Recovery (migration 0002): past `expires_at` an open allocation is reaped; the host
    # running it (`host` = hostname:pid) refreshes `heartbeat_at` while it lives.
    _ts("expires_at"),
    _ts("heartbeat_at"),
    sa.Column("host", sa.Text),
    # What the compute paid for (migration 0003): a training job or an eval-gate job.
    sa.Column("purpose", sa.Text, nullable=False, server_default="training"),
    # The scheduler the host process ran under (migration 0004): "slurm" and its job id
    # ("123", or "123_4" for an array task); NULL for a job run directly on this host.
    sa.Column("engine", sa.Text),
    sa.Column("engine_job_id", sa.Text, index=True),
    # The memory cap its sandbox runs under (migration 0006): the capacity limits sum them
    # per host (runner/registry/capacity.py). NULL: reserved without capacity limits.
    sa.Column("memory_cap_gb", sa.Float),
    sa.CheckConstraint("resource_type IN ('gpu', 'cpu')", name="resource_type"),
    sa.CheckConstraint(f"status IN {ALLOCATION_STATES}", name="status"),
    sa.CheckConstraint("debited >= 0", name="debited"),
    sa.Index("ix_resource_allocations_status_expires_at", "status", "expires_at"),
)

model_versions = sa.Table(
    "model_versions", metadata,
    sa.Column("artifact_id", sa.Text, sa.ForeignKey("artifacts.id"), primary_key=True),
    sa.Column("is_external", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("external_source_url", sa.Text),
    sa.Column("external_source_version", sa.Text),
    # the lineage's root; indexed (0009): the gate's champion lookup reads its members
    sa.Column("base_model_id", sa.Text, sa.ForeignKey("artifacts.id"), index=True),
    sa.Column("code_repo_url", sa.Text),
    sa.Column("code_commit_sha", sa.Text),
    sa.Column("code_entrypoint", sa.Text),
    _ts("training_started_at"),
    _ts("training_completed_at"),
    sa.Column("trained_by", sa.Text),
    sa.Column("gpu_allocation_id", sa.Text, sa.ForeignKey("resource_allocations.id")),
    sa.Column("training_params_json", sa.JSON),
    sa.Column("eval_metrics_json", sa.JSON),
    sa.Column("eval_dataset_artifact_id", sa.Text, sa.ForeignKey("artifacts.id")),
    # the benchmark its gate measured it on (runner/registry/benchmarks.py; indexed: 0008)
    sa.Column("benchmark_id", sa.Text, index=True),
    sa.Column("promotion_state", sa.Text, nullable=False, server_default="candidate"),
    sa.Column("promotion_notes", sa.Text),
    _ts("created_at", nullable=False),
    sa.Column("training_dataset_artifact_id", sa.Text, sa.ForeignKey("artifacts.id")),
    sa.Column("mlflow_run_id", sa.Text),
    sa.Column("mlflow_model_uri", sa.Text),
    sa.CheckConstraint(f"promotion_state IN {PROMOTION_STATES}", name="promotion_state"),
)

token_accounts = sa.Table(
    "token_accounts", metadata,
    sa.Column("account_id", sa.Text, primary_key=True),
    sa.Column("balance", Money, nullable=False, server_default="0"),
    sa.Column("total_granted", Money, nullable=False, server_default="0"),
    sa.Column("total_debited", Money, nullable=False, server_default="0"),
    sa.Column("total_refunded", Money, nullable=False, server_default="0"),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
    sa.CheckConstraint("balance >= 0", name="balance_nonnegative"),
)

token_ledger = sa.Table(
    "token_ledger", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    _ts("ts", nullable=False),
    sa.Column("from_account", sa.Text, nullable=False, index=True),
    sa.Column("to_account", sa.Text, nullable=False, index=True),
    sa.Column("amount", Money, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("reference_type", sa.Text),
    sa.Column("reference_id", sa.Text, index=True),
    sa.Column("memo", sa.Text),
    sa.Column("balance_after_from", Money),
    sa.Column("balance_after_to", Money),
    sa.CheckConstraint("amount > 0", name="amount_positive"),
)

world_model_improvements = sa.Table(
    "world_model_improvements", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("target_artifact_id", sa.Text, sa.ForeignKey("artifacts.id"), index=True),
    sa.Column("target_artifact_type", sa.Text),
    sa.Column("magnitude", sa.Float),
    # what nobody decided is never paid (runner/registry/improvements.py: the payout rule)
    sa.Column("payout_status", sa.Text, nullable=False, server_default="ineligible"),
    sa.Column("detection_metadata", sa.JSON),
    _ts("detected_at", nullable=False),
    # migration 0007: who is credited, the allocation the work ran under, what it settled at
    sa.Column("agent_id", sa.Text, index=True),
    sa.Column("allocation_id", sa.Text, sa.ForeignKey("resource_allocations.id")),
    sa.Column("cost", Money),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("type", sa.Text, nullable=False, index=True),
    sa.Column("payload", sa.JSON),
    sa.Column("source", sa.Text),
    _ts("created_at", nullable=False),
)

# The eval gate (migration 0003): one row per comparison of a gated candidate; every row of
# one gate run carries the run's decision.
evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("candidate_artifact_id", sa.Text, sa.ForeignKey("artifacts.id"), nullable=False,
              index=True),
    sa.Column("comparator_artifact_id", sa.Text, sa.ForeignKey("artifacts.id")),  # baseline: null
    sa.Column("comparator_role", sa.Text, nullable=False),
    sa.Column("gate_name", sa.Text, nullable=False),
    sa.Column("gate_config", sa.JSON, nullable=False),
    sa.Column("gate_config_sha256", sa.Text, nullable=False),
    sa.Column("metric", sa.Text, nullable=False),
    sa.Column("candidate_value", sa.Float, nullable=False),
    sa.Column("comparator_value", sa.Float, nullable=False),
    sa.Column("delta", sa.Float, nullable=False),
    sa.Column("ci_low", sa.Float, nullable=False),
    sa.Column("ci_high", sa.Float, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("n_resamples", sa.Integer, nullable=False),
    sa.Column("n_cells", sa.Integer, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    # the baseline's value of `metric` on the same cells (migration 0008): every gate
    # measures it, whether or not its rule compares against it (the leaderboard shows it)
    sa.Column("baseline_value", sa.Float),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("reasons", sa.JSON),
    sa.Column("allocation_id", sa.Text, sa.ForeignKey("resource_allocations.id")),
    sa.Column("agent_id", sa.Text, nullable=False),
    _ts("created_at", nullable=False),
    sa.CheckConstraint(f"decision IN {GATE_DECISIONS}", name="decision"),
    sa.CheckConstraint(f"comparator_role IN {COMPARATOR_ROLES}", name="comparator_role"),
)

# SciDEX's lifecycle audit trail: every change of an artifact's lifecycle_state.
artifact_lifecycle_history = sa.Table(
    "artifact_lifecycle_history", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("artifact_id", sa.Text, sa.ForeignKey("artifacts.id"), nullable=False, index=True),
    sa.Column("old_state", sa.Text),
    sa.Column("new_state", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("actor_id", sa.Text),
    sa.Column("metadata", sa.JSON),
    _ts("created_at", nullable=False),
)

skills = sa.Table(
    "skills", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("description", sa.Text),
    sa.Column("skill_type", sa.Text),
    sa.Column("code_path", sa.Text),
    sa.Column("input_schema", sa.JSON),
    sa.Column("example_input", sa.JSON),
    sa.Column("times_used", sa.Integer, nullable=False, server_default="0"),
    _ts("created_at", nullable=False),
)

tool_calls = sa.Table(
    "tool_calls", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("skill_id", sa.Text, sa.ForeignKey("skills.id"), index=True),
    sa.Column("agent_id", sa.Text, index=True),
    sa.Column("input_params", sa.JSON),
    sa.Column("output_summary", sa.JSON),
    sa.Column("success", sa.Boolean, nullable=False),
    sa.Column("duration_ms", sa.Integer),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    _ts("created_at", nullable=False),
)

# Per-agent bearer tokens (migration 0005): a token names the agent its caller is; only its
# sha256 is stored. Revoking keeps the row (revoked_at) so that the audit trail stays whole.
agent_tokens = sa.Table(
    "agent_tokens", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("agent_id", sa.Text, nullable=False, index=True),
    sa.Column("token_hash", sa.Text, nullable=False, unique=True),
    _ts("created_at", nullable=False),
    _ts("revoked_at"),
    _ts("last_used_at"),
)

ALL_TABLES = tuple(metadata.sorted_tables)
