"""TLS and mutual TLS for the gRPC ports: the service's and the invalidator's health port.

Configured by three paths in :class:`Settings`: ``tls_cert_file`` and ``tls_key_file`` (PEM,
the certificate may carry its chain) turn TLS on; ``tls_client_ca_file`` additionally makes
client certificates signed by that CA *required* (mTLS). Files are read and checked once, at
start-up, so a wrong path, a key that does not match its certificate or a CA file that is not
PEM stops the process with a message naming the variable, instead of failing every handshake.
An encrypted private key is such an error too: nothing here may ever prompt for a pass-phrase.
Nothing here logs file contents.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
from grpc import aio

from core.settings import PREFIX, Settings, SettingsError

_ENCRYPTED = (
    f"{PREFIX}TLS_KEY_FILE: the private key is encrypted (protected by a pass-phrase), which is "
    "not supported: give an unencrypted key readable by the service user only, e.g. "
    "`openssl pkey -in encrypted.key -out server.key`"
)


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{PREFIX}{setting}: cannot read {path}: {exc.strerror}") from None


class _Encrypted(Exception):
    """The private key asked for a pass-phrase."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal (and block start-up there).
    raise _Encrypted


def _check(settings: Settings, key: bytes) -> None:
    """Let OpenSSL parse the files now: a mismatched or malformed file fails here, named."""
    if b"ENCRYPTED" in key:  # PKCS#8 "ENCRYPTED PRIVATE KEY" or a legacy "Proc-Type: 4,ENCRYPTED"
        raise SettingsError(_ENCRYPTED)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(
            settings.tls_cert_file, settings.tls_key_file, password=_no_passphrase
        )
    except _Encrypted:
        raise SettingsError(_ENCRYPTED) from None
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
    _check(settings, key)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_port(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on ``address`` with TLS when ``credentials`` is set, else in plaintext."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)
