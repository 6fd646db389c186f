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


class CountersUnavailable(Unavailable):
    """Redis, which buffers view counts, failed or timed out; the views may not be counted."""


class Aborted(CatalogError):
    """A concurrent change won: the caller's expected version is no longer current."""


class ResourceExhausted(CatalogError):
    """A bounded resource is full (e.g. pending view counters); retrying later may succeed."""
