"""Who may call the write methods: bearer tokens and mTLS client identities.

Reads are open to every caller that passes transport security. A write method (``UpdateProduct``;
``RecordProductViews`` unless ``record_views_open``) runs only for a caller that presents one of
``write_tokens`` as ``authorization: Bearer <token>`` metadata, or, under mTLS, a client
certificate with a URI or DNS SAN listed in ``write_clients``. With neither configured the
service is read-only: every write is refused.

Invariants:

* The check wraps the write handlers once, when they are registered: a read handler is not
  wrapped at all, so a read pays nothing, not even a method-name lookup or a metadata scan.
* Tokens are compared in constant time: the presented token's SHA-256 digest is compared with
  the digest of every configured token (all of them, whatever matches), so neither the timing
  nor the number of comparisons says how much of a guess was right or which token matched.
* No token, digest or metadata value is ever logged or put into a status message.
* Missing credentials are ``UNAUTHENTICATED``; credentials that are present but not accepted
  are ``PERMISSION_DENIED``. Each refusal counts in ``catalog_auth_refused{method,reason}``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from core.metrics import AUTH_REFUSED
from core.settings import Settings

log = logging.getLogger(__name__)

UPDATE_PRODUCT = "UpdateProduct"
RECORD_PRODUCT_VIEWS = "RecordProductViews"
WRITE_METHODS = (UPDATE_PRODUCT, RECORD_PRODUCT_VIEWS)
MAX_TOKEN_LENGTH = 1024
_BEARER = "bearer "
# The auth-context properties gRPC fills from a verified client certificate's SANs.
_IDENTITY_PROPERTIES = ("peer_uri", "peer_dns")


@dataclass(frozen=True, slots=True)
class Refusal:
    code: grpc.StatusCode
    reason: str  # the metric label: missing, malformed, bad_token, identity, read_only
    message: str


# One call's authorization: None when it may go on, else why it is refused.
Check = Callable[[aio.ServicerContext[Any, bytes]], "Refusal | None"]


MISSING = Refusal(
    grpc.StatusCode.UNAUTHENTICATED,
    "missing",
    "this method needs credentials: 'authorization: Bearer <token>' metadata"
    " or an authorized client certificate",
)
MALFORMED = Refusal(
    grpc.StatusCode.PERMISSION_DENIED,
    "malformed",
    "the authorization metadata is not a single 'Bearer <token>'",
)
BAD_TOKEN = Refusal(
    grpc.StatusCode.PERMISSION_DENIED, "bad_token", "the bearer token is not allowed to write"
)
IDENTITY = Refusal(
    grpc.StatusCode.PERMISSION_DENIED,
    "identity",
    "the client certificate's identity is not allowed to write",
)
READ_ONLY = Refusal(
    grpc.StatusCode.PERMISSION_DENIED,
    "read_only",
    "this catalog is read-only: no writer is configured",
)
REASONS = (MISSING, MALFORMED, BAD_TOKEN, IDENTITY, READ_ONLY)


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class WritePolicy:
    """The configured writers, and the wrapper that enforces them on the write methods."""

    __slots__ = ("_clients", "_digests", "guarded")

    def __init__(
        self,
        tokens: Sequence[str],
        clients: Sequence[str],
        guarded: Sequence[str] = WRITE_METHODS,
    ) -> None:
        self._digests = tuple(_digest(token) for token in tokens)
        self._clients = frozenset(client.encode() for client in clients)
        self.guarded = frozenset(guarded)

    @classmethod
    def from_settings(cls, settings: Settings) -> WritePolicy:
        guarded = (UPDATE_PRODUCT,) if settings.record_views_open else WRITE_METHODS
        return cls(settings.write_token_list, settings.write_client_list, guarded)

    @property
    def read_only(self) -> bool:
        return not self._digests and not self._clients

    def describe(self) -> str:
        """For the start-up log: how many writers, never which tokens."""
        if self.read_only:
            return "read-only: no CATALOG_WRITE_TOKENS or CATALOG_WRITE_CLIENTS, writes refused"
        return (
            f"writes ({', '.join(sorted(self.guarded))}) need one of {len(self._digests)} "
            f"token(s) or {len(self._clients)} client identity(ies)"
        )

    def check(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Refusal | None:
        """None when the caller may write; else why not."""
        presented: list[str | bytes] = [v for k, v in metadata or () if k == "authorization"]
        identities = [name for prop in _IDENTITY_PROPERTIES for name in auth_context.get(prop, ())]
        if presented:
            token = _bearer(presented)
            if token is None:
                return MALFORMED
            if self._token_allowed(token):
                return None
        if any(identity in self._clients for identity in identities):
            return None
        if not presented and not identities:
            return MISSING
        if self.read_only:
            return READ_ONLY
        return BAD_TOKEN if presented else IDENTITY

    def _token_allowed(self, token: str | bytes) -> bool:
        presented = _digest(token)
        allowed = False
        for digest in self._digests:  # every one, always: constant work whatever matches
            allowed |= hmac.compare_digest(presented, digest)
        return allowed

    def checker(self, method: str) -> Check | None:
        """None when ``method`` is not guarded (reads: no check at all, not even a lookup);
        else the check of one call's credentials, counting each refusal by reason."""
        if method not in self.guarded:
            return None
        refused = {r.reason: AUTH_REFUSED.labels(method, r.reason) for r in REASONS}

        def check(context: aio.ServicerContext[Any, bytes]) -> Refusal | None:
            refusal = self.check(context.invocation_metadata(), context.auth_context())
            if refusal is not None:
                refused[refusal.reason].inc()
            return refusal

        return check


def _bearer(values: list[str | bytes]) -> str | bytes | None:
    """The token of exactly one well-formed ``Bearer <token>`` value; None otherwise."""
    if len(values) != 1:
        return None
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(text) > len(_BEARER) + MAX_TOKEN_LENGTH or text[: len(_BEARER)].lower() != _BEARER:
        return None
    token = text[len(_BEARER) :].strip()
    return token or None


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that presents ``token`` (for clients and the project's tools)."""
    return (("authorization", f"Bearer {token}"),)


class BearerToken(aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """A client-side interceptor adding ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        metadata = aio.Metadata(*(client_call_details.metadata or ()), *self._metadata)
        return await continuation(client_call_details._replace(metadata=metadata), request)


def insecure_writer_channel(target: str, token: str) -> aio.Channel:
    """A plaintext channel whose every call presents ``token``."""
    interceptor: Any = BearerToken(token)  # the stubs' interceptor list type is too narrow
    return aio.insecure_channel(target, interceptors=[interceptor])


__all__ = [
    "WRITE_METHODS",
    "BearerToken",
    "Check",
    "Refusal",
    "WritePolicy",
    "bearer_metadata",
    "insecure_writer_channel",
]
