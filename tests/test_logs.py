"""Logs: CATALOG_LOG_FORMAT=json gives one JSON object per line with the request's method, peer,
status, duration and trace id; the access log is DEBUG; INTERNAL errors name method and peer."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core import tracing
from core.logs import JsonFormatter, TextFormatter
from core.settings import Settings, SettingsError
from devtools.localservers import free_port
from service.app import start
from tests.processes import settings_env
from tests.test_grpc_api import Exploding


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("catalog.test", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_request_fields_trace_ids_and_the_traceback() -> None:
    provider = TracerProvider()
    tracing.use(provider)
    try:
        with provider.get_tracer("t").start_as_current_span("call") as span:
            try:
                raise ValueError("boom")
            except ValueError:
                record = _record(method="/a.B/C", peer="ipv4:127.0.0.1:1", status="OK")
                record.exc_info = sys.exc_info()
                line = json.loads(JsonFormatter().format(record))
            ids = span.get_span_context()
    finally:
        tracing.use(None)
    assert line["message"] == "hello x" and line["level"] == "INFO"
    assert line["logger"] == "catalog.test" and line["time"].endswith("Z")
    assert (line["method"], line["peer"], line["status"]) == ("/a.B/C", "ipv4:127.0.0.1:1", "OK")
    assert line["trace_id"] == f"{ids.trace_id:032x}" and line["span_id"] == f"{ids.span_id:016x}"
    assert "ValueError: boom" in line["exception"]
    assert "duration_ms" not in line, "absent fields are left out"


def test_text_lines_append_the_request_fields() -> None:
    text = TextFormatter().format(_record(method="/a.B/C", duration_ms=1.5))
    assert text.endswith("hello x [method=/a.B/C duration_ms=1.5]")
    assert TextFormatter().format(_record()).endswith("hello x")


def test_log_format_is_validated() -> None:
    assert Settings.from_env({"CATALOG_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="CATALOG_LOG_FORMAT"):
        Settings.from_env({"CATALOG_LOG_FORMAT": "xml"})


async def test_access_log_at_debug_names_method_peer_status_and_duration(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="catalog.access")  # before the handlers are built
    svc = await start(settings.replace(grpc_address="127.0.0.1:0"))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            await stub.GetProduct(pb.GetProductRequest(id="p0000001"))
    finally:
        await svc.stop(grace=0)
    (record,) = [r for r in caplog.records if r.name == "catalog.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["method"] == "/catalog.v1.CatalogService/GetProduct"
    assert line["status"] == "OK" and line["peer"].startswith("ipv")
    assert line["duration_ms"] >= 0 and line["level"] == "DEBUG"


async def test_no_access_log_at_info(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    svc = await start(settings.replace(grpc_address="127.0.0.1:0"))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            await catalog_pb2_grpc.CatalogServiceStub(channel).GetProduct(
                pb.GetProductRequest(id="p0000001")
            )
    finally:
        await svc.stop(grace=0)
    assert not [r for r in caplog.records if r.name == "catalog.access"]


async def test_internal_error_log_names_method_and_peer(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await start(settings.replace(grpc_address="127.0.0.1:0"), repository=Exploding)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            with pytest.raises(aio.AioRpcError):
                await catalog_pb2_grpc.CatalogServiceStub(channel).GetProduct(
                    pb.GetProductRequest(id="p0000001")
                )
    finally:
        await svc.stop(grace=0)
    (record,) = [r for r in caplog.records if r.getMessage().startswith("internal error")]
    line = json.loads(JsonFormatter().format(record))
    assert line["method"] == "/catalog.v1.CatalogService/GetProduct"
    assert line["peer"].startswith("ipv") and "RuntimeError" in line["exception"]


def test_a_server_process_logs_json_lines(settings: Settings) -> None:
    port = free_port()
    env = settings_env(
        settings.replace(grpc_address=f"127.0.0.1:{port}", log_format="json", metrics_port=0)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], env=env, stderr=subprocess.PIPE, text=True
    )
    lines = []
    try:
        assert proc.stderr is not None
        for text in proc.stderr:  # until the server says it serves (or exits)
            lines.append(json.loads(text))
            if lines[-1]["message"].startswith("serving catalog.v1"):
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert lines and lines[-1]["message"].startswith("serving catalog.v1")
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
