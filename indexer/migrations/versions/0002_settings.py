"""Settings shared by every writer of one database (e.g. the patient-key salt's fingerprint).

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("settings",
                    sa.Column("key", sa.String(length=64), nullable=False),
                    sa.Column("value", sa.Text(), nullable=False),
                    sa.PrimaryKeyConstraint("key"))


def downgrade() -> None:
    op.drop_table("settings")
