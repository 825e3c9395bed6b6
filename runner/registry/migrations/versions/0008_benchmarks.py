"""Benchmarks: model_versions.benchmark_id indexed (the leaderboard's lookup), the gate's
`benchmark_best` comparator role, and evaluations.baseline_value (what every gate measures of
the logistic-regression baseline on the same cells, whether or not the rule compared to it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

ROLES = "comparator_role IN ('parent', 'champion', 'baseline', 'benchmark_best')"
OLD_ROLES = "comparator_role IN ('parent', 'champion', 'baseline')"


def upgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_versions_benchmark_id'), ['benchmark_id'],
                              unique=False)
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('baseline_value', sa.Float(), nullable=True))
        batch_op.drop_constraint(op.f('ck_evaluations_comparator_role'), type_='check')
        batch_op.create_check_constraint(op.f('ck_evaluations_comparator_role'), ROLES)


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_evaluations_comparator_role'), type_='check')
        batch_op.create_check_constraint(op.f('ck_evaluations_comparator_role'), OLD_ROLES)
        batch_op.drop_column('baseline_value')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_versions_benchmark_id'))
