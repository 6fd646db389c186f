"""The PostgreSQL engine and the classification of its failures.

Invariants:

- One :class:`~sqlalchemy.ext.asyncio.AsyncEngine` per process, built here from :class:`Settings`
  and passed down; nothing else calls ``create_async_engine``.
- Every connection carries a server-side ``statement_timeout``, so a stuck query frees its
  connection even if the client has gone away.
- :func:`is_connection_error` is the single place that decides "PostgreSQL is unreachable or
  overloaded, retry later" (gRPC UNAVAILABLE) versus "our bug" (INTERNAL).
"""

from __future__ import annotations

import math

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.settings import Settings

# SQLSTATE prefixes of server errors that say "not now" rather than "wrong query": class 08
# (connection exception), 53 (insufficient resources, e.g. too many connections), 57P (admin or
# crash shutdown, cannot connect now) and 57014 (query_canceled: our statement_timeout fired).
_TRANSIENT_SQLSTATES = ("08", "53", "57P", "57014")


def create_engine(settings: Settings) -> AsyncEngine:
    """An async engine (psycopg 3) with the pool sizes and timeouts of ``settings``.

    libpq counts ``connect_timeout`` in whole seconds (and psycopg enforces at least 2), so the
    setting is rounded up.
    """
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_pre_ping=True,
        # Statement parameters are request data: never in an exception message or a log line.
        hide_parameters=True,
        connect_args={
            "connect_timeout": max(1, math.ceil(settings.db_connect_timeout_s)),
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
        },
    )


def libpq_url(url: str) -> str:
    """The libpq form (``postgresql://...``) of a SQLAlchemy ``postgresql+psycopg://`` URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means PostgreSQL is unreachable, lost the connection, is shutting down,
    is out of connections, timed the statement out, or the pool had no free connection in time.

    Works on SQLAlchemy-wrapped and raw psycopg exceptions. Anything else (SQL errors, constraint
    violations, programming errors) is a bug or a bad request and returns False.
    """
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        return is_connection_error(exc.orig) if exc.orig is not None else False
    if isinstance(exc, psycopg.OperationalError):
        # Client-side failures (refused, reset, "connection is closed") carry no SQLSTATE.
        return exc.sqlstate is None or exc.sqlstate.startswith(_TRANSIENT_SQLSTATES)
    return isinstance(exc, ConnectionError)
