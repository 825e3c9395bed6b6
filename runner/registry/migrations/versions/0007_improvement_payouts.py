"""Improvements that are safe to pay out: world_model_improvements.agent_id, allocation_id, cost;
payout_status defaults to 'ineligible'.

Rows written before this revision get the agent, allocation and cost they lacked (the
allocation their detection metadata names; the agent credited is the version's trainer), and
a row left 'pending' that the payout rule does not pay (anything but a promotion with a
magnitude > 0) becomes 'ineligible' with its payout_reason. A bucket recorded for a magnitude
at or below zero (it was the absolute delta's) is removed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

import runner.registry.schema

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

FK = 'fk_world_model_improvements_allocation_id_resource_allocations'


def upgrade() -> None:
    with op.batch_alter_table('world_model_improvements', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agent_id', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('allocation_id', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column(
            'cost', runner.registry.schema.Money(precision=20, scale=6), nullable=True))
        batch_op.create_index(batch_op.f('ix_world_model_improvements_agent_id'), ['agent_id'],
                              unique=False)
        batch_op.create_foreign_key(batch_op.f(FK), 'resource_allocations', ['allocation_id'],
                                    ['id'])
        batch_op.alter_column('payout_status', existing_type=sa.Text(),
                              server_default='ineligible', existing_nullable=False)
    _backfill(op.get_bind())


def _backfill(conn) -> None:
    """The rows of a registry that predates this revision (small: one per version and gate)."""
    wmi = sa.table('world_model_improvements', sa.column('id', sa.Text()),
                   sa.column('event_type', sa.Text()),
                   sa.column('target_artifact_id', sa.Text()),
                   sa.column('magnitude', sa.Float()), sa.column('payout_status', sa.Text()),
                   sa.column('detection_metadata', sa.JSON()),
                   sa.column('agent_id', sa.Text()), sa.column('allocation_id', sa.Text()),
                   sa.column('cost', runner.registry.schema.Money(precision=20, scale=6)))
    allocs = sa.table('resource_allocations', sa.column('id', sa.Text()),
                      sa.column('agent_id', sa.Text()),
                      sa.column('actual_cost', runner.registry.schema.Money(precision=20,
                                                                            scale=6)))
    versions = sa.table('model_versions', sa.column('artifact_id', sa.Text()),
                        sa.column('trained_by', sa.Text()))
    for row in conn.execute(sa.select(wmi)).mappings().all():
        meta = dict(row['detection_metadata'] or {})
        alloc = conn.execute(sa.select(allocs).where(
            allocs.c.id == meta.get('allocation_id'))).mappings().first()
        trainer = conn.execute(sa.select(versions.c.trained_by).where(
            versions.c.artifact_id == row['target_artifact_id'])).scalar()
        magnitude = row['magnitude']
        gained = magnitude is not None and magnitude > 0
        status = row['payout_status']
        if status == 'pending' and not (row['event_type'] == 'model_version_promoted'
                                        and gained):
            status = 'ineligible'
            meta['payout_reason'] = ('recorded before revision 0007: only a promotion with a '
                                     'magnitude > 0 is payable')
        if not gained and meta.get('bucket') is not None:
            meta['bucket'] = None
        conn.execute(wmi.update().where(wmi.c.id == row['id']).values(
            payout_status=status, detection_metadata=meta,
            agent_id=trainer or (alloc['agent_id'] if alloc else None),
            allocation_id=alloc['id'] if alloc else None,
            cost=alloc['actual_cost'] if alloc else None))


def downgrade() -> None:
    with op.batch_alter_table('world_model_improvements', schema=None) as batch_op:
        batch_op.alter_column('payout_status', existing_type=sa.Text(),
                              server_default='pending', existing_nullable=False)
        batch_op.drop_constraint(batch_op.f(FK), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_world_model_improvements_agent_id'))
        batch_op.drop_column('cost')
        batch_op.drop_column('allocation_id')
        batch_op.drop_column('agent_id')
