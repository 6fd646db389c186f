"""Opaque, tamper-evident page tokens (AIP-158).

A token carries the id the next page starts after, signed with HMAC-SHA256 over that id *and*
the request's filters. A modified token, or one replayed with other filters, fails the check, so
a client can neither forge a position nor carry a cursor across filters. The filters are part of
the MAC but not of the token, which keeps tokens short. A signed position is still validated as
an id (a holder of the key can sign anything), and a token longer than any we issue is refused
before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from core import validation
from core.errors import InvalidArgument

_MAC_BYTES = 16
_VERSION = b"\x01"
#: The longest token we issue: version, MAC and the longest id, unpadded base64.
MAX_TOKEN_LENGTH = -(-(1 + _MAC_BYTES + validation.MAX_ID_LENGTH) * 4 // 3)
_INVALID = "page_token is invalid: it was modified, or issued for other filters"


class PageTokens:
    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(secret.encode()).digest()

    def _mac(self, after_id: bytes, category_id: str, brand_id: str) -> bytes:
        msg = b"\x00".join((_VERSION, category_id.encode(), brand_id.encode(), after_id))
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, after_id: str, category_id: str, brand_id: str) -> str:
        """The token for the page after ``after_id``; "" when there is no next page."""
        if not after_id:
            return ""
        raw = after_id.encode()
        body = _VERSION + self._mac(raw, category_id, brand_id) + raw
        return base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    def decode(self, token: str, category_id: str, brand_id: str) -> str:
        """The ``after_id`` inside a token; "" for the first page. InvalidArgument if forged."""
        if not token:
            return ""
        if len(token) > MAX_TOKEN_LENGTH:  # before any decoding: no work for a huge token
            raise InvalidArgument(_INVALID)
        try:
            # Tokens are issued unpadded; padding or any other variant is not ours.
            body = (
                b"" if "=" in token else base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            )
        except (binascii.Error, ValueError):
            body = b""
        raw = body[1 + _MAC_BYTES :]
        if (
            len(body) <= 1 + _MAC_BYTES
            # Decoders ignore the unused low bits of the last character: only the one encoding
            # we issue is accepted, so no other string passes for a token.
            or base64.urlsafe_b64encode(body).rstrip(b"=") != token.encode()
            or body[:1] != _VERSION
            or not hmac.compare_digest(
                body[1 : 1 + _MAC_BYTES], self._mac(raw, category_id, brand_id)
            )
        ):
            raise InvalidArgument(_INVALID)
        # A valid MAC says who signed the token, not that its contents are sane: whoever holds
        # the key (a leaked or default one) can sign anything, so the position is an id like any
        # other before it reaches a cache key, a page entry or SQL.
        try:
            return validation.check_id(raw.decode(), "page_token position")
        except (UnicodeDecodeError, InvalidArgument):
            raise InvalidArgument(_INVALID) from None
