"""Generations record their number format and a hub model's revision; case-insensitive filter indexes.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FILTER_COLUMNS = ("modality", "body_part", "view", "source", "format")


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch_op:
        batch_op.add_column(sa.Column("numerics", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("model_revision", sa.String(length=64), nullable=True))
    for column in FILTER_COLUMNS:
        op.create_index(f"ix_images_lower_{column}", "images", [sa.text(f"lower({column})")], unique=False)


def downgrade() -> None:
    for column in FILTER_COLUMNS:
        op.drop_index(f"ix_images_lower_{column}", table_name="images")
    with op.batch_alter_table("generations") as batch_op:
        batch_op.drop_column("model_revision")
        batch_op.drop_column("numerics")
