"""Connection lifetime options of the gRPC server: keepalive and maximum connection age.

gRPC clients hold one HTTP/2 connection per backend for as long as it lives, so without a maximum
age a client keeps calling the replica it first connected to, even after replicas are added behind
a load balancer. With ``grpc_max_connection_age_ms`` the server sends GOAWAY after that long
(gRPC adds +-10% jitter, so the clients of one replica do not all reconnect together); RPCs in
flight get ``grpc_max_connection_age_grace_ms`` to finish, and the client's next call opens a new
connection, which the balancer may send elsewhere. Keepalive pings find dead peers (a vanished
client, a middlebox that dropped the connection silently) so their resources are released.
"""

from __future__ import annotations

from core.settings import Settings

# Clients may ping an idle connection this often without being told to go away ("too_many_pings").
# gRPC's default is 5 minutes, which punishes the common client keepalive of 10 to 60 seconds.
CLIENT_PING_MIN_INTERVAL_MS = 10_000


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments for ``grpc.aio.server(options=...)``."""
    options = [
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.grpc_keepalive_permit_without_calls)),
    ]
    if settings.grpc_keepalive_permit_without_calls:
        options.append(
            ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_MIN_INTERVAL_MS)
        )
    if settings.grpc_max_connection_age_ms:
        options += [
            ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_ms),
        ]
    return options
