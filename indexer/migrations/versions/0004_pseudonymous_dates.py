"""Patient keys as keyed HMACs and study dates as per-patient shifted days (indexer.pseudonyms).

The raw patient keys and dates are not in the database, so they cannot be converted here: this
step forgets the old salted hashes and exact dates at once, and marks the rows that had them
(`size_bytes = -1`) so that the next `radlens index` over the same sources re-reads their headers
and manifest rows (no re-embedding) and writes the new forms. Until then prior studies are not linked.

Revision ID: 0004
Revises: 0003
"""
import sqlite3

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("study_day", sa.Integer(), nullable=True))
    op.execute("UPDATE images SET size_bytes = -1, patient_hash = NULL "
               "WHERE patient_hash IS NOT NULL OR study_date IS NOT NULL")
    # a plain DROP COLUMN (SQLite >= 3.35, PostgreSQL): Alembic's batch mode would copy the table, and
    # dropping the old `images` cascades to every vector and score on a connection with foreign keys on
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        op.execute("UPDATE images SET study_date = NULL")  # no DROP COLUMN there: left empty, unmapped
    else:
        op.execute("ALTER TABLE images DROP COLUMN study_date")
    op.execute("DELETE FROM settings WHERE key = 'patient_salt_fingerprint'")


def downgrade() -> None:
    with op.batch_alter_table("images") as batch_op:
        batch_op.add_column(sa.Column("study_date", sa.String(length=10), nullable=True))
        batch_op.drop_column("study_day")
