"""The eval gate: `evaluations`, `artifact_lifecycle_history`, resource_allocations.purpose.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purpose', sa.Text(), nullable=False,
                                      server_default='training'))
    op.create_table(
        'evaluations',
        sa.Column('id', sa.Text(), nullable=False),
        sa.Column('candidate_artifact_id', sa.Text(), nullable=False),
        sa.Column('comparator_artifact_id', sa.Text(), nullable=True),
        sa.Column('comparator_role', sa.Text(), nullable=False),
        sa.Column('gate_name', sa.Text(), nullable=False),
        sa.Column('gate_config', sa.JSON(), nullable=False),
        sa.Column('gate_config_sha256', sa.Text(), nullable=False),
        sa.Column('metric', sa.Text(), nullable=False),
        sa.Column('candidate_value', sa.Float(), nullable=False),
        sa.Column('comparator_value', sa.Float(), nullable=False),
        sa.Column('delta', sa.Float(), nullable=False),
        sa.Column('ci_low', sa.Float(), nullable=False),
        sa.Column('ci_high', sa.Float(), nullable=False),
        sa.Column('confidence', sa.Float(), nullable=False),
        sa.Column('n_resamples', sa.Integer(), nullable=False),
        sa.Column('n_cells', sa.Integer(), nullable=False),
        sa.Column('seed', sa.BigInteger(), nullable=False),
        sa.Column('decision', sa.Text(), nullable=False),
        sa.Column('reasons', sa.JSON(), nullable=True),
        sa.Column('allocation_id', sa.Text(), nullable=True),
        sa.Column('agent_id', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("decision IN ('promoted', 'rejected')",
                           name=op.f('ck_evaluations_decision')),
        sa.CheckConstraint("comparator_role IN ('parent', 'champion', 'baseline')",
                           name=op.f('ck_evaluations_comparator_role')),
        sa.ForeignKeyConstraint(['allocation_id'], ['resource_allocations.id'],
                                name=op.f('fk_evaluations_allocation_id_resource_allocations')),
        sa.ForeignKeyConstraint(['candidate_artifact_id'], ['artifacts.id'],
                                name=op.f('fk_evaluations_candidate_artifact_id_artifacts')),
        sa.ForeignKeyConstraint(['comparator_artifact_id'], ['artifacts.id'],
                                name=op.f('fk_evaluations_comparator_artifact_id_artifacts')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations')),
    )
    op.create_index(op.f('ix_evaluations_candidate_artifact_id'), 'evaluations',
                    ['candidate_artifact_id'], unique=False)
    op.create_table(
        'artifact_lifecycle_history',
        sa.Column('id', sa.Text(), nullable=False),
        sa.Column('artifact_id', sa.Text(), nullable=False),
        sa.Column('old_state', sa.Text(), nullable=True),
        sa.Column('new_state', sa.Text(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('actor_id', sa.Text(), nullable=True),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'],
                                name=op.f('fk_artifact_lifecycle_history_artifact_id_artifacts')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_artifact_lifecycle_history')),
    )
    op.create_index(op.f('ix_artifact_lifecycle_history_artifact_id'),
                    'artifact_lifecycle_history', ['artifact_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_artifact_lifecycle_history_artifact_id'),
                  table_name='artifact_lifecycle_history')
    op.drop_table('artifact_lifecycle_history')
    op.drop_index(op.f('ix_evaluations_candidate_artifact_id'), table_name='evaluations')
    op.drop_table('evaluations')
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.drop_column('purpose')
