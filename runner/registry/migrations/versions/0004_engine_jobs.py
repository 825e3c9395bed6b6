"""The scheduler a job ran under: resource_allocations.engine and engine_job_id.

A job whose host process runs inside a SLURM job (a sweep through the forge_slurm launcher)
records `engine = 'slurm'` and the SLURM job id (`123` or, for an array task, `123_4`): the
reaper asks SLURM about it, and an operator can find the job behind an allocation.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('engine', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('engine_job_id', sa.Text(), nullable=True))
        batch_op.create_index('ix_resource_allocations_engine_job_id', ['engine_job_id'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.drop_index('ix_resource_allocations_engine_job_id')
        batch_op.drop_column('engine_job_id')
        batch_op.drop_column('engine')
