"""Registry baseline: every table of the SciDEX-compatible schema (DESIGN.md).

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

import runner.registry.schema

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('artifacts',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('artifact_type', sa.Text(), nullable=False),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('version_number', sa.Integer(), server_default='1', nullable=False),
    sa.Column('parent_version_id', sa.Text(), nullable=True),
    sa.Column('version_tag', sa.Text(), nullable=True),
    sa.Column('changelog', sa.Text(), nullable=True),
    sa.Column('is_latest', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('lifecycle_state', sa.Text(), server_default='active', nullable=False),
    sa.Column('lifecycle_changed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('superseded_by', sa.Text(), nullable=True),
    sa.Column('origin_type', sa.Text(), server_default='internal', nullable=False),
    sa.Column('origin_url', sa.Text(), nullable=True),
    sa.Column('content_hash', sa.Text(), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('created_by', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("artifact_type IN ('model', 'dataset', 'benchmark', 'notebook', 'figure', 'other')", name=op.f('ck_artifacts_artifact_type')),
    sa.CheckConstraint("lifecycle_state IN ('draft', 'candidate', 'active', 'superseded', 'deprecated', 'rejected')", name=op.f('ck_artifacts_lifecycle_state')),
    sa.CheckConstraint("origin_type IN ('internal', 'external')", name=op.f('ck_artifacts_origin_type')),
    sa.CheckConstraint('version_number >= 1', name=op.f('ck_artifacts_version_number')),
    sa.ForeignKeyConstraint(['parent_version_id'], ['artifacts.id'], name=op.f('fk_artifacts_parent_version_id_artifacts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts'))
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_parent_version_id'), ['parent_version_id'], unique=False)

    op.create_table('events',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('type', sa.Text(), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=True),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_type'), ['type'], unique=False)

    op.create_table('resource_allocations',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('agent_id', sa.Text(), nullable=False),
    sa.Column('resource_type', sa.Text(), server_default='gpu', nullable=False),
    sa.Column('device', sa.Text(), nullable=True),
    sa.Column('devices', sa.Integer(), server_default='1', nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('wall_time_cap_min', sa.Integer(), nullable=False),
    sa.Column('vram_cap_gb', sa.Integer(), nullable=False),
    sa.Column('price_per_hour', runner.registry.schema.Money(precision=20, scale=6), nullable=False),
    sa.Column('currency', sa.Text(), server_default='credits', nullable=False),
    sa.Column('estimated_cost', runner.registry.schema.Money(precision=20, scale=6), nullable=False),
    sa.Column('debited', runner.registry.schema.Money(precision=20, scale=6), nullable=False),
    sa.Column('actual_seconds', sa.Float(), nullable=True),
    sa.Column('actual_cost', runner.registry.schema.Money(precision=20, scale=6), nullable=True),
    sa.Column('refunded', runner.registry.schema.Money(precision=20, scale=6), nullable=True),
    sa.Column('request_key', sa.Text(), nullable=False),
    sa.Column('mlflow_run_id', sa.Text(), nullable=True),
    sa.Column('artifact_id', sa.Text(), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('debited_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('settled_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("resource_type IN ('gpu', 'cpu')", name=op.f('ck_resource_allocations_resource_type')),
    sa.CheckConstraint("status IN ('reserved', 'running', 'settled', 'failed', 'cancelled')", name=op.f('ck_resource_allocations_status')),
    sa.CheckConstraint('debited >= 0', name=op.f('ck_resource_allocations_debited')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_resource_allocations')),
    sa.UniqueConstraint('request_key', name=op.f('uq_resource_allocations_request_key'))
    )
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_resource_allocations_agent_id'), ['agent_id'], unique=False)

    op.create_table('skills',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('skill_type', sa.Text(), nullable=True),
    sa.Column('code_path', sa.Text(), nullable=True),
    sa.Column('input_schema', sa.JSON(), nullable=True),
    sa.Column('example_input', sa.JSON(), nullable=True),
    sa.Column('times_used', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_skills')),
    sa.UniqueConstraint('name', name=op.f('uq_skills_name'))
    )
    op.create_table('token_accounts',
    sa.Column('account_id', sa.Text(), nullable=False),
    sa.Column('balance', runner.registry.schema.Money(precision=20, scale=6), server_default='0', nullable=False),
    sa.Column('total_granted', runner.registry.schema.Money(precision=20, scale=6), server_default='0', nullable=False),
    sa.Column('total_debited', runner.registry.schema.Money(precision=20, scale=6), server_default='0', nullable=False),
    sa.Column('total_refunded', runner.registry.schema.Money(precision=20, scale=6), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('balance >= 0', name=op.f('ck_token_accounts_balance_nonnegative')),
    sa.PrimaryKeyConstraint('account_id', name=op.f('pk_token_accounts'))
    )
    op.create_table('token_ledger',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.Column('from_account', sa.Text(), nullable=False),
    sa.Column('to_account', sa.Text(), nullable=False),
    sa.Column('amount', runner.registry.schema.Money(precision=20, scale=6), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('reference_type', sa.Text(), nullable=True),
    sa.Column('reference_id', sa.Text(), nullable=True),
    sa.Column('memo', sa.Text(), nullable=True),
    sa.Column('balance_after_from', runner.registry.schema.Money(precision=20, scale=6), nullable=True),
    sa.Column('balance_after_to', runner.registry.schema.Money(precision=20, scale=6), nullable=True),
    sa.CheckConstraint('amount > 0', name=op.f('ck_token_ledger_amount_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_token_ledger'))
    )
    with op.batch_alter_table('token_ledger', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_token_ledger_from_account'), ['from_account'], unique=False)
        batch_op.create_index(batch_op.f('ix_token_ledger_reference_id'), ['reference_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_token_ledger_to_account'), ['to_account'], unique=False)

    op.create_table('artifact_links',
    sa.Column('source_id', sa.Text(), nullable=False),
    sa.Column('target_id', sa.Text(), nullable=False),
    sa.Column('link_type', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['artifacts.id'], name=op.f('fk_artifact_links_source_id_artifacts')),
    sa.ForeignKeyConstraint(['target_id'], ['artifacts.id'], name=op.f('fk_artifact_links_target_id_artifacts')),
    sa.PrimaryKeyConstraint('source_id', 'target_id', 'link_type', name=op.f('pk_artifact_links'))
    )
    with op.batch_alter_table('artifact_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifact_links_target_id'), ['target_id'], unique=False)

    op.create_table('model_versions',
    sa.Column('artifact_id', sa.Text(), nullable=False),
    sa.Column('is_external', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('external_source_url', sa.Text(), nullable=True),
    sa.Column('external_source_version', sa.Text(), nullable=True),
    sa.Column('base_model_id', sa.Text(), nullable=True),
    sa.Column('code_repo_url', sa.Text(), nullable=True),
    sa.Column('code_commit_sha', sa.Text(), nullable=True),
    sa.Column('code_entrypoint', sa.Text(), nullable=True),
    sa.Column('training_started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('training_completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('trained_by', sa.Text(), nullable=True),
    sa.Column('gpu_allocation_id', sa.Text(), nullable=True),
    sa.Column('training_params_json', sa.JSON(), nullable=True),
    sa.Column('eval_metrics_json', sa.JSON(), nullable=True),
    sa.Column('eval_dataset_artifact_id', sa.Text(), nullable=True),
    sa.Column('benchmark_id', sa.Text(), nullable=True),
    sa.Column('promotion_state', sa.Text(), server_default='candidate', nullable=False),
    sa.Column('promotion_notes', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('training_dataset_artifact_id', sa.Text(), nullable=True),
    sa.Column('mlflow_run_id', sa.Text(), nullable=True),
    sa.Column('mlflow_model_uri', sa.Text(), nullable=True),
    sa.CheckConstraint("promotion_state IN ('candidate', 'promoted', 'rejected', 'superseded')", name=op.f('ck_model_versions_promotion_state')),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_model_versions_artifact_id_artifacts')),
    sa.ForeignKeyConstraint(['base_model_id'], ['artifacts.id'], name=op.f('fk_model_versions_base_model_id_artifacts')),
    sa.ForeignKeyConstraint(['eval_dataset_artifact_id'], ['artifacts.id'], name=op.f('fk_model_versions_eval_dataset_artifact_id_artifacts')),
    sa.ForeignKeyConstraint(['gpu_allocation_id'], ['resource_allocations.id'], name=op.f('fk_model_versions_gpu_allocation_id_resource_allocations')),
    sa.ForeignKeyConstraint(['training_dataset_artifact_id'], ['artifacts.id'], name=op.f('fk_model_versions_training_dataset_artifact_id_artifacts')),
    sa.PrimaryKeyConstraint('artifact_id', name=op.f('pk_model_versions'))
    )
    op.create_table('tool_calls',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('skill_id', sa.Text(), nullable=True),
    sa.Column('agent_id', sa.Text(), nullable=True),
    sa.Column('input_params', sa.JSON(), nullable=True),
    sa.Column('output_summary', sa.JSON(), nullable=True),
    sa.Column('success', sa.Boolean(), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=True),
    sa.Column('error_code', sa.Text(), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['skill_id'], ['skills.id'], name=op.f('fk_tool_calls_skill_id_skills')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tool_calls'))
    )
    with op.batch_alter_table('tool_calls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tool_calls_agent_id'), ['agent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tool_calls_skill_id'), ['skill_id'], unique=False)

    op.create_table('world_model_improvements',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('event_type', sa.Text(), nullable=False),
    sa.Column('target_artifact_id', sa.Text(), nullable=True),
    sa.Column('target_artifact_type', sa.Text(), nullable=True),
    sa.Column('magnitude', sa.Float(), nullable=True),
    sa.Column('payout_status', sa.Text(), server_default='pending', nullable=False),
    sa.Column('detection_metadata', sa.JSON(), nullable=True),
    sa.Column('detected_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['target_artifact_id'], ['artifacts.id'], name=op.f('fk_world_model_improvements_target_artifact_id_artifacts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_world_model_improvements'))
    )
    with op.batch_alter_table('world_model_improvements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_world_model_improvements_target_artifact_id'), ['target_artifact_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('world_model_improvements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_world_model_improvements_target_artifact_id'))

    op.drop_table('world_model_improvements')
    with op.batch_alter_table('tool_calls', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tool_calls_skill_id'))
        batch_op.drop_index(batch_op.f('ix_tool_calls_agent_id'))

    op.drop_table('tool_calls')
    op.drop_table('model_versions')
    with op.batch_alter_table('artifact_links', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifact_links_target_id'))

    op.drop_table('artifact_links')
    with op.batch_alter_table('token_ledger', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_token_ledger_to_account'))
        batch_op.drop_index(batch_op.f('ix_token_ledger_reference_id'))
        batch_op.drop_index(batch_op.f('ix_token_ledger_from_account'))

    op.drop_table('token_ledger')
    op.drop_table('token_accounts')
    op.drop_table('skills')
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_resource_allocations_agent_id'))

    op.drop_table('resource_allocations')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_type'))

    op.drop_table('events')
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_parent_version_id'))

    op.drop_table('artifacts')
