"""Alembic environment: runs revisions online against ``config.attributes["url"]``.

All revisions of one run share a transaction (PostgreSQL has transactional DDL), which also holds
an advisory lock, so concurrent ``catalog migrate`` runs queue up and the later ones find nothing
to do instead of racing on the version table.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

# Arbitrary constant shared by every migrating process ('catalog' in ASCII).
_MIGRATION_LOCK_KEY = 0x636174616C6F67


def run_migrations_online() -> None:
    engine = create_engine(context.config.attributes["url"], poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=None)
            with context.begin_transaction():
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations_online()
