"""Allocation expiry and heartbeat: resource_allocations.expires_at, heartbeat_at, host.

Open allocations that predate this revision get an expiry of created_at + their wall-time
cap + 10 s of sandbox grace + 10 min, so the reaper can settle them too.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""
from datetime import UTC, timedelta

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

LEGACY_GRACE_S = 10 + 600  # before 0002 the 10 s grace ran after the cap; + the margin


def upgrade() -> None:
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('host', sa.Text(), nullable=True))
        batch_op.create_index('ix_resource_allocations_status_expires_at',
                              ['status', 'expires_at'], unique=False)

    allocations = sa.table('resource_allocations', sa.column('id', sa.Text()),
                           sa.column('status', sa.Text()),
                           sa.column('wall_time_cap_min', sa.Integer()),
                           sa.column('created_at', sa.DateTime(timezone=True)),
                           sa.column('expires_at', sa.DateTime(timezone=True)))
    conn = op.get_bind()
    open_rows = conn.execute(sa.select(allocations.c.id, allocations.c.wall_time_cap_min,
                                       allocations.c.created_at)
                             .where(allocations.c.status.in_(('reserved', 'running')))).all()
    for alloc_id, cap_min, created_at in open_rows:
        if created_at.tzinfo is None:  # SQLite keeps UTC without an offset
            created_at = created_at.replace(tzinfo=UTC)
        expires = created_at + timedelta(seconds=cap_min * 60 + LEGACY_GRACE_S)
        conn.execute(allocations.update().where(allocations.c.id == alloc_id)
                     .values(expires_at=expires))


def downgrade() -> None:
    with op.batch_alter_table('resource_allocations', schema=None) as batch_op:
        batch_op.drop_index('ix_resource_allocations_status_expires_at')
        batch_op.drop_column('host')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('expires_at')
