"""Schema migrations (Alembic), configured in code: no ``alembic.ini`` is read at run time.

Invariants: the schema is only ever changed by revisions in ``versions/``, applied with
:func:`upgrade` (``catalog migrate``), never by ``create_all``. Upgrades are idempotent and safe to
run from several processes at once: ``env.py`` holds a PostgreSQL advisory lock for the whole run.
URLs are the application's SQLAlchemy ``postgresql+psycopg://`` URLs (psycopg 3, sync).

New revision: ``command.revision(alembic_config(url), message="...")`` from ``alembic``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

_HERE = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic config for this package's scripts against ``url``."""
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    # Passed as an attribute, not a main option: ini interpolation would mangle '%' in passwords.
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``; a no-op when it is already there."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: drop everything)."""
    command.downgrade(alembic_config(url), revision)


def head() -> str:
    """The newest revision this code knows."""
    script = ScriptDirectory.from_config(alembic_config(""))
    revision = script.get_current_head()
    assert revision is not None, "no migration revisions found"
    return revision


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at; None when it was never migrated."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
