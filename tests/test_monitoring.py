"""The Prometheus alert rules and the Grafana dashboard in deploy/: valid, and naming only metrics
the processes export. ``promtool`` (Debian's prometheus package; CI installs it) checks the rules
and runs their unit tests; without it (a developer machine) that part is skipped, but not in CI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import invalidator.worker
import service.app

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "catalog.json"
METRIC = re.compile(r"\b(?:catalog|grpc_server)_[a-z_]+\b")
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


def exported() -> set[str]:
    """Every sample name the service and invalidator processes can export."""
    assert service.app and invalidator.worker  # imported for the metrics they register
    return {family.name + s for family in REGISTRY.collect() for s in SUFFIXES}


def test_alert_rules_name_only_exported_metrics() -> None:
    named = set(METRIC.findall(RULES.read_text()))
    assert {"grpc_server_handled_total", "catalog_invalidator_dead_letters"} <= named
    assert named <= exported(), named - exported()


def test_dashboard_is_grafana_json_naming_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    assert dashboard["templating"]["list"][0]["name"] == "datasource"
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    named = {name for e in exprs for name in METRIC.findall(e)}
    assert {"grpc_server_started_total", "catalog_event_loop_lag_seconds"} <= named
    assert named <= exported(), named - exported()


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    promtool = _promtool()
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
