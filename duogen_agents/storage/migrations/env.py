"""Alembic environment: runs on the connection that ``Database`` passes in ``config.attributes``."""

from __future__ import annotations

from alembic import context

from duogen_agents.storage.records import Base

VERSION_TABLE = "duogen_schema_version"

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
