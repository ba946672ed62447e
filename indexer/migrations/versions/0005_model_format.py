"""Generations record the checkpoint format their model was loaded from (transformers CLIP, a dual
encoder, open_clip converted on load, ...): NULL for generations made before.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("model_format", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch_op:
        batch_op.drop_column("model_format")
