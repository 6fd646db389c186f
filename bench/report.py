"""Result rows, their medians over runs, and the three outputs: a table on stdout,
``docs/benchmarks.md`` and ``bench/results.json`` (keys: scenario, figure, value, unit, baseline,
ratio)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path


@dataclass(frozen=True)
class Row:
    scenario: str
    figure: str
    value: float
    unit: str
    baseline: float | None = None  # the floor or baseline ``value`` is compared with, same run
    ratio: float | None = None  # value / baseline
    target: str = ""  # e.g. ">= 0.9": what the ratio (or value, without a baseline) must meet

    @classmethod
    def vs(cls, scenario: str, figure: str, value: float, unit: str, baseline: float,
           target: str = "") -> Row:  # fmt: skip
        ratio = value / baseline if baseline else math.nan
        return cls(scenario, figure, value, unit, baseline, ratio, target)

    @property
    def met(self) -> str:
        if not self.target:
            return ""
        op, _, bound = self.target.partition(" ")
        subject = self.ratio if self.ratio is not None else self.value
        ok = {
            ">=": subject >= float(bound),
            "<=": subject <= float(bound),
            "==": subject == float(bound),
        }[op]
        return "met" if ok else "MISSED"


def medians(runs: list[list[Row]]) -> list[Row]:
    """Per (scenario, figure): the median value, baseline and ratio (each ratio from one run)."""
    order: dict[tuple[str, str], list[Row]] = {}
    for rows in runs:
        for row in rows:
            order.setdefault((row.scenario, row.figure), []).append(row)
    out = []
    for rows in order.values():
        first = rows[0]
        base = [r.baseline for r in rows if r.baseline is not None]
        ratio = [r.ratio for r in rows if r.ratio is not None]
        out.append(
            Row(
                first.scenario,
                first.figure,
                statistics.median(r.value for r in rows),
                first.unit,
                statistics.median(base) if base else None,
                statistics.median(ratio) if ratio else None,
                first.target,
            )
        )
    return out


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if math.isnan(x):
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(rows: list[Row]) -> str:
    head = (
        "| scenario | figure | value | floor/baseline | ratio | target |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        target = f"{r.target} ({r.met})" if r.target else ""
        lines.append(
            f"| {r.scenario} | {r.figure} | {_num(r.value)} {r.unit} | {_num(r.baseline)} | "
            f"{_num(r.ratio)} | {target} |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    packages = ("grpcio", "protobuf", "redis", "hiredis", "SQLAlchemy", "psycopg")
    versions = ", ".join(f"{p} {version(p)}" for p in packages)
    return (
        f"{os.cpu_count()} cores, {model}; Linux {platform.release()}; "
        f"Python {platform.python_version()}; {versions}"
    )


def write(rows: list[Row], runs: int, notes: str, md_path: Path, json_path: Path) -> None:
    json_path.write_text(
        json.dumps([{k: v for k, v in asdict(r).items() if k != "target"} for r in rows], indent=1)
        + "\n"
    )
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    md_path.write_text(
        f"# Benchmarks\n\n{notes}\n\n## Latest results\n\n"
        f"Date: {date}. Machine: {machine()}. Medians of {runs} run(s).\n\n{table(rows)}\n"
    )
