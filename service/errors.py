"""Domain errors. Only the gRPC layer (``service.grpc_api``) maps them to status codes."""

from __future__ import annotations


class CatalogError(Exception):
    """Base of every error the service reports to callers on purpose."""


class InvalidArgument(CatalogError):
    """A request field is malformed; raised before any I/O."""


class NotFound(CatalogError):
    """No product has the requested id."""


class Unavailable(CatalogError):
    """PostgreSQL (the source of truth) cannot be reached; retrying later may succeed."""
