"""The stubs-only distribution (api/pyproject.toml, ``catalog-api``): it builds from the repository
and, installed alone in a clean virtualenv, calls the service without the service's dependencies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.app import Service

ROOT = Path(__file__).resolve().parent.parent

CALLER = """
import importlib.util, sys
import grpc
from catalog.v1 import catalog_pb2, catalog_pb2_grpc
absent = [m for m in ("sqlalchemy", "psycopg", "alembic", "redis", "core", "service")
          if importlib.util.find_spec(m) is not None]
assert not absent, absent
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)
    product = stub.GetProduct(catalog_pb2.GetProductRequest(id="p0000001"), timeout=30)
print(product.id, catalog_pb2.PriceRule.Kind.Name(catalog_pb2.PriceRule.KIND_PERCENT_OFF))
"""


def _run(*cmd: str | Path, cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding only the catalog-api wheel built from api/ and its dependencies."""
    work = tmp_path_factory.mktemp("api")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist",
         ROOT / "api", cwd=work)  # fmt: skip
    (wheel,) = (work / "dist").glob("catalog_api-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith("-info")}
    assert packages == {"catalog"}
    assert {
        "catalog/v1/catalog_pb2.py",
        "catalog/v1/catalog_pb2_grpc.pyi",
        "catalog/py.typed",
    } <= names
    _run(sys.executable, "-m", "venv", work / "venv", cwd=work)
    _run(work / "venv/bin/python", "-m", "pip", "install", "-q", wheel, cwd=work)
    return work / "venv"


@pytest.mark.slow
async def test_the_stubs_alone_call_the_service(clean_venv: Path, service: Service) -> None:
    # -I: neither the working directory nor PYTHON* variables can bring the repository's code in.
    proc = await asyncio.create_subprocess_exec(
        clean_venv / "bin/python", "-I", "-c", CALLER, f"127.0.0.1:{service.port}",
        cwd=clean_venv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().split() == ["p0000001", "KIND_PERCENT_OFF"]
