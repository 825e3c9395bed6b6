"""The registry at scale: the indices its pages and checks read through.

- artifacts (artifact_type, created_at): `forge models list` and the `forge serve` index
  read one page of the newest model versions, not the whole table.
- artifacts (artifact_type, is_latest): the champions of every lineage (the index's
  families) without a scan.
- artifacts (artifact_type, lifecycle_state): the candidates the index lists.
- model_versions.base_model_id: a lineage's members, which the gate's champion lookup reads.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index('ix_artifacts_type_created_at', ['artifact_type', 'created_at'],
                              unique=False)
        batch_op.create_index('ix_artifacts_type_is_latest', ['artifact_type', 'is_latest'],
                              unique=False)
        batch_op.create_index('ix_artifacts_type_lifecycle_state',
                              ['artifact_type', 'lifecycle_state'], unique=False)
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_versions_base_model_id'), ['base_model_id'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_versions_base_model_id'))
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index('ix_artifacts_type_lifecycle_state')
        batch_op.drop_index('ix_artifacts_type_is_latest')
        batch_op.drop_index('ix_artifacts_type_created_at')
