"""Per-agent bearer tokens: `agent_tokens`.

A token names the agent its caller is (the MCP server's identity). Only the token's sha256
is stored: a copy of the registry is no key to any agent.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'agent_tokens',
        sa.Column('id', sa.Text(), nullable=False),
        sa.Column('agent_id', sa.Text(), nullable=False),
        sa.Column('token_hash', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_agent_tokens')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_agent_tokens_token_hash')),
    )
    op.create_index(op.f('ix_agent_tokens_agent_id'), 'agent_tokens', ['agent_id'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_agent_tokens_agent_id'), table_name='agent_tokens')
    op.drop_table('agent_tokens')
