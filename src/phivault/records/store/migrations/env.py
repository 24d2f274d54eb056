"""Alembic environment for the records tables: runs on the connection it is handed.

Why no alembic.ini and no URL here: :func:`phivault.records.store.schema.upgrade` passes the
store's own connection (inside its transaction, with PostgreSQL's ``search_path`` already set),
so migrations run exactly where the store will read and write, with no second configuration.
"""

from __future__ import annotations

from alembic import context

from phivault.errors import ConfigurationError
from phivault.records.store.schema import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise ConfigurationError(
        "records migrations run through phivault.records.store.schema.upgrade(connection)"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
