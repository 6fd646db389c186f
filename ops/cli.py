"""The ``catalog`` command line (``python -m ops``): one subcommand per operational task.

Invariants: :class:`Settings` is built once from the environment and passed to the subcommand, with
the exit-status contract of :mod:`core.entrypoint` (2: configuration error, 1: PostgreSQL
unreachable). A subcommand is a ``(name, help, add_arguments, handler)`` entry of
:data:`COMMANDS`, or is added by :func:`ops.stream_commands.register`; its handler gets the
settings and the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core import entrypoint
from core.settings import Settings

Handler = Callable[[Settings, argparse.Namespace], int]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    handler: Handler
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from core.migrations import current, upgrade

    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # start-up chatter
    upgrade(settings.database_url)
    print(f"database at revision {current(settings.database_url)}")
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from service.workers import add_arguments

    add_arguments(parser)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.workers import serve

    return serve(settings, args.workers)


def _invalidator(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from invalidator.settings import InvalidatorSettings
    from invalidator.worker import run

    return asyncio.run(run(settings, InvalidatorSettings.from_env()))


def _warm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top", type=entrypoint.positive_int, default=1000, help="most viewed products"
    )
    parser.add_argument(
        "--categories", type=int, default=20, help="first pages of the busiest categories"
    )
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="products per second at most (0: unlimited)"
    )


def _warm(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from ops.warm import warm_cache

    warmed = asyncio.run(warm_cache(settings, args.top, args.categories, args.rate))
    source = "view counts" if warmed.from_stats else "no view counts yet: first products by id"
    print(
        f"warmed {warmed.products} products and {warmed.pages} category pages "
        f"in {warmed.seconds:.1f} s ({source})"
    )
    return 0


def _healthcheck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", help="host:port to ask (default: CATALOG_GRPC_ADDRESS, 0.0.0.0 as loopback)"
    )


def _healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when grpc.health.v1 answers SERVING: for container health checks and operators."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ops.call import local_target

    target = args.target or local_target(settings.grpc_address)
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _call_arguments(parser: argparse.ArgumentParser) -> None:
    from ops.call import add_arguments

    add_arguments(parser)


def _call(settings: Settings, args: argparse.Namespace) -> int:
    from ops.call import run

    return run(settings.grpc_address, args)


def _seed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--products", type=entrypoint.positive_int, default=10_000, help="how many")
    parser.add_argument("--seed", type=int, default=42, help="random seed (same seed, same data)")
    parser.add_argument("--reset", action="store_true", help="delete the current catalog first")


def _seed(settings: Settings, args: argparse.Namespace) -> int:
    from ops.seed import seed_catalog

    started = time.perf_counter()
    written = seed_catalog(settings.database_url, args.products, args.seed, args.reset)
    if written == 0:
        print("catalog already has products; nothing seeded (use --reset to replace them)")
    else:
        print(f"seeded {written} products in {time.perf_counter() - started:.1f} s")
    return 0


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 1 when any cached entry is stale (docs/operations.md), 0 when none is, 2 when the
    check itself failed: an entry it could not check, or a server it could not reach."""
    import asyncio

    from redis.exceptions import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from core.db import create_engine
    from core.keys import Keys
    from core.redisclient import connect
    from ops.verify import render, verify

    async def go() -> int:
        redis = connect(settings, socket_timeout=10, connect_timeout=5)
        engine = create_engine(settings)
        try:
            report = await verify(redis, engine, Keys(settings.key_namespace))
        finally:
            await redis.aclose()
            await engine.dispose()
        print(render(report, settings.key_namespace))
        return 2 if report.errors else 1 if report.stale else 0

    try:
        return asyncio.run(go())
    except (RedisError, OSError, SQLAlchemyError) as exc:
        # 1 means "stale entries": a check that could not run is an error (2), not a verdict.
        detail = getattr(exc, "orig", None) or exc
        print(f"catalog verify: could not check: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 2


COMMANDS: tuple[Command, ...] = (
    Command("serve", "run the gRPC service until SIGTERM/SIGINT", _serve, _serve_arguments),
    Command(
        "invalidator", "consume cache-invalidation events (and relay the outbox)", _invalidator
    ),
    Command("warm", "load popular products into the cache", _warm, _warm_arguments),
    Command(
        "healthcheck", "exit 0 if a server reports SERVING", _healthcheck, _healthcheck_arguments
    ),
    Command(
        "call",
        "call one method with a JSON request (server reflection); no method: list them",
        _call,
        _call_arguments,
    ),
    Command("migrate", "apply database migrations up to the newest revision", _migrate),
    Command("seed", "load deterministic demo data", _seed, _seed_arguments),
    Command(
        "verify",
        "compare every cached entry with PostgreSQL; exit 1 if any is stale, 2 on errors",
        _verify,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    return entrypoint.run(f"catalog {args.command}", lambda settings: handler(settings, args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catalog",
        description="Product catalog service. Configured by CATALOG_* environment variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.handler)
    from ops.stream_commands import register

    register(commands)
    return parser
