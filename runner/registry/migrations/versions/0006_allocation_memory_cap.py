"""The memory cap of a job: resource_allocations.memory_cap_gb.

The operator's capacity limits (conf `policy:`) bound the sum of the memory caps of the jobs
open on one host; each allocation records the cap its sandbox runs under (NULL: recorded
before this revision, or reserved without capacity limits).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('memory_cap_gb', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.drop_column('memory_cap_gb')
