"""Tinker training runs and their saved weights

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tinker_runs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('project', sa.String(length=256), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('base_model', sa.Text(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('train_attn', sa.Boolean(), nullable=False),
    sa.Column('train_mlp', sa.Boolean(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.Integer(), nullable=False),
    sa.Column('last_request_at', sa.Integer(), nullable=False),
    sa.Column('closed_at', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('tinker_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tinker_runs_project'), ['project'], unique=False)

    op.create_table('tinker_checkpoints',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['tinker_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'kind', 'name')
    )


def downgrade() -> None:
    op.drop_table('tinker_checkpoints')
    with op.batch_alter_table('tinker_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tinker_runs_project'))

    op.drop_table('tinker_runs')
