"""TLS and mutual TLS for the gRPC ports: the service's and the invalidator's health port.

Configured by three paths in :class:`Settings`: ``tls_cert_file`` and ``tls_key_file`` (PEM,
the certificate may carry its chain) turn TLS on; ``tls_client_ca_file`` additionally makes
client certificates signed by that CA *required* (mTLS). Files are read and checked once, at
start-up, so a wrong path, a key that does not match its certificate or a CA file that is not
PEM stops the process with a message naming the variable, instead of failing every handshake.
Nothing here logs file contents.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
from grpc import aio

from core.settings import PREFIX, Settings, SettingsError


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{PREFIX}{setting}: cannot read {path}: {exc.strerror}") from None


def _check(settings: Settings) -> None:
    """Let OpenSSL parse the files now: a mismatched or malformed file fails here, named."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (ssl.SSLError, ValueError) as exc:
        raise SettingsError(
            f"{PREFIX}TLS_CERT_FILE / {PREFIX}TLS_KEY_FILE: not a PEM certificate and its "
            f"matching private key ({exc.__class__.__name__})"
        ) from None
    if settings.tls_client_ca_file:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise SettingsError(
                f"{PREFIX}TLS_CLIENT_CA_FILE: not a PEM CA certificate ({exc.__class__.__name__})"
            ) from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``; None when TLS is not configured (plaintext)."""
    if not settings.tls_cert_file:
        return None
    cert = _read(settings.tls_cert_file, "TLS_CERT_FILE")
    key = _read(settings.tls_key_file, "TLS_KEY_FILE")
    client_ca = (
        _read(settings.tls_client_ca_file, "TLS_CLIENT_CA_FILE")
        if settings.tls_client_ca_file
        else None
    )
    _check(settings)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_port(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on ``address`` with TLS when ``credentials`` is set, else in plaintext."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
