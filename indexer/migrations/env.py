"""Alembic environment: runs on the connection `indexer.migrations.ensure_schema` hands it."""

from alembic import context

from indexer.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
