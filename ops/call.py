"""``catalog call``: one RPC from the shell, JSON in and out, described by server reflection.

The request's and response's types come from the server's reflection service, so any unary method
of any service the server reflects can be called without stubs or .proto files (grpcurl's job,
with what ``pip install`` brings). Exit status: 0 when the call succeeds; 1 when the server (or
the connection) answers with a non-OK status, whose name and message go to stderr; 2 for a usage
error found before the call (unknown method, request JSON that does not fit its type, an
unreadable certificate file, malformed metadata).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # the service's default CATALOG_MAX_MESSAGE_BYTES
# gRPC metadata keys: lower case letters, digits, '-', '_' and '.' (HTTP/2 header names).
_METADATA_KEY = re.compile(r"[0-9a-z_.-]{1,128}")
_MAX_METADATA_VALUE = 8192


class UsageError(Exception):
    """Something on the command line is wrong; nothing was sent."""


def local_target(address: str) -> str:
    """Where a local client reaches a server bound to ``address`` (wildcards mean loopback)."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "method",
        nargs="?",
        help="GetProduct, or in full catalog.v1.CatalogService/GetProduct; "
        "omitted: list every service and method",
    )
    parser.add_argument(
        "request",
        nargs="?",
        default="{}",
        help="the request as JSON (default {}); - reads it from stdin",
    )
    parser.add_argument(
        "--target", help="host:port (default: CATALOG_GRPC_ADDRESS, 0.0.0.0 as loopback)"
    )
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'KEY: VALUE'",
        help="request metadata, repeatable (e.g. -H 'authorization: Bearer TOKEN')",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="deadline in seconds (default 10)"
    )
    tls = parser.add_argument_group("TLS (plaintext unless one of these is given)")
    tls.add_argument("--tls", action="store_true", help="TLS, server checked against system CAs")
    tls.add_argument("--cacert", type=Path, help="PEM CA the server certificate must chain to")
    tls.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    tls.add_argument("--key", type=Path, help="PEM private key of --cert")
    tls.add_argument("--authority", help="the server name to verify instead of the target's host")


def run(default_address: str, args: argparse.Namespace) -> int:
    """The ``catalog call`` handler: the exit status described in the module docstring."""
    # The reflection client logs every file it loads at INFO.
    logging.getLogger("grpc_reflection").setLevel(logging.WARNING)
    target = args.target or local_target(default_address)
    try:
        options = _options(args)
        request_json = sys.stdin.read() if args.request == "-" else args.request
        with _channel(target, options) as channel:
            if args.method is None:
                print(_listing(_Reflection(channel)))
                return 0
            response = call(channel, args.method, request_json)
    except UsageError as exc:
        print(f"catalog call: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details() or ''}", file=sys.stderr)
        return 1
    print(response)
    return 0


def call(channel: grpc.Channel, method: str, request_json: str) -> str:
    """Call ``method`` with the JSON request; the response as JSON (grpc.RpcError on failure)."""
    if len(request_json.encode()) > MAX_REQUEST_BYTES:
        raise UsageError(f"the request is over {MAX_REQUEST_BYTES} bytes")
    reflection = _Reflection(channel)
    found = reflection.method(method)
    if found.client_streaming or found.server_streaming:
        raise UsageError(f"{found.full_name} streams; only unary methods can be called")
    request_class = message_factory.GetMessageClass(found.input_type)
    response_class = message_factory.GetMessageClass(found.output_type)
    try:
        request = json_format.Parse(request_json, request_class(), descriptor_pool=reflection.pool)
    except json_format.ParseError as exc:
        why = " ".join(str(exc).split())  # one line
        raise UsageError(f"the request is not a {found.input_type.full_name}: {why}") from None
    stub = channel.unary_unary(
        f"/{found.containing_service.full_name}/{found.name}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    response: Message = stub(request)
    return json_format.MessageToJson(response, descriptor_pool=reflection.pool, indent=2)


class _Reflection:
    """Descriptors of what the server behind ``channel`` reflects, fetched on demand."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self) -> list[ServiceDescriptor]:
        names = sorted(set(self.database.get_services()) - set(REFLECTION_SERVICES))
        return [self.pool.FindServiceByName(name) for name in names]

    def method(self, name: str) -> MethodDescriptor:
        """``Service/Method`` or ``Service.Method`` in full, or a method name only one has."""
        service, sep, method = name.replace("/", ".").rpartition(".")
        if sep:
            try:
                found: MethodDescriptor = self.pool.FindServiceByName(service).methods_by_name[
                    method
                ]
                return found
            except KeyError:
                raise UsageError(f"the server has no method {service}/{method}") from None
        matches = [s.methods_by_name[name] for s in self.services() if name in s.methods_by_name]
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(f"{m.containing_service.full_name}/{m.name}" for m in matches)
            raise UsageError(f"{name} is ambiguous: {names}")
        raise UsageError(f"the server has no method {name} (run 'catalog call' to list them)")


def _listing(reflection: _Reflection) -> str:
    lines = []
    for service in reflection.services():
        lines.append(service.full_name)
        for m in service.methods:
            lines.append(
                f"  {m.name}({m.input_type.full_name}) returns ({m.output_type.full_name})"
            )
    return "\n".join(lines)


@dataclass(frozen=True)
class _Options:
    metadata: tuple[tuple[str, str], ...]
    credentials: grpc.ChannelCredentials | None
    authority: str | None
    deadline: float  # time.monotonic() by which everything, reflection included, is done


def _options(args: argparse.Namespace) -> _Options:
    metadata = tuple(_header(text) for text in args.header)
    credentials = None
    if args.tls or args.cacert or args.cert or args.key:
        if bool(args.cert) != bool(args.key):
            raise UsageError("--cert and --key go together")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(args.cacert, "--cacert"),
            private_key=_read(args.key, "--key"),
            certificate_chain=_read(args.cert, "--cert"),
        )
    elif args.authority:
        raise UsageError("--authority needs TLS (--tls or --cacert)")
    return _Options(metadata, credentials, args.authority, time.monotonic() + args.timeout)


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition(":")
    key, value = key.strip().lower(), value.strip()
    if not sep or not _METADATA_KEY.fullmatch(key) or key.startswith("grpc-"):
        raise UsageError(
            f"-H wants 'key: value' with a key of [0-9a-z_.-] not starting grpc-, got {text!r}"
        )
    if len(value) > _MAX_METADATA_VALUE or not value.isprintable() or not value.isascii():
        raise UsageError(f"-H {key}: the value must be printable ASCII, at most 8 KiB")
    return key, value


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{option}: cannot read {path}: {exc.strerror}") from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be in (0, 3600], got {text}")
    return value


def _channel(target: str, options: _Options) -> grpc.Channel:
    channel_options = (
        [("grpc.ssl_target_name_override", options.authority)] if options.authority else []
    )
    if options.credentials is None:
        channel = grpc.insecure_channel(target, options=channel_options)
    else:
        channel = grpc.secure_channel(target, options.credentials, options=channel_options)
    return grpc.intercept_channel(channel, _EveryCall(options))


if TYPE_CHECKING:  # generic only in the type stubs
    _Unary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _Stream = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    _Unary, _Stream = grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor


class _EveryCall(_Unary, _Stream):
    """Adds the metadata and what is left of the deadline to every call, reflection's too."""

    def __init__(self, options: _Options) -> None:
        self.options = options

    def _details(self, details: Any) -> Any:
        remaining = max(0.001, self.options.deadline - time.monotonic())
        return _CallDetails(
            details.method,
            remaining,
            (*(details.metadata or ()), *self.options.metadata),
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


__all__ = ["add_arguments", "call", "local_target", "run"]
