"""Result rows, their medians over runs, and the three outputs: a table on stdout,
``docs/benchmarks.md`` and ``bench/results.json`` (keys: group, scenario, figure, value, unit,
baseline, ratio, target, and the group's run: date, runs, machine).

Both files keep every scenario group's latest figures: a run of some groups (``--only``) replaces
those groups' rows and leaves the others' as their own runs wrote them, with their dates."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, fields
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


_RUN = ("date", "runs", "machine")


def write(
    groups: dict[str, list[Row]],
    runs: int,
    notes: str,
    md_path: Path,
    json_path: Path,
    order: list[str],
) -> None:
    """Replace the rows of ``groups`` (name -> medians of this run) in ``json_path``, keep the
    other groups' rows, and write ``md_path`` from the result: ``notes``, then each group's
    table with its own date, machine and number of runs, in ``order`` (the suite's)."""
    run = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "runs": runs,
           "machine": machine()}  # fmt: skip
    kept = json.loads(json_path.read_text()) if json_path.exists() else []
    rows = [r for r in kept if r["group"] not in groups] + [
        {"group": group, **asdict(row), **run} for group, new in groups.items() for row in new
    ]
    rank = {name: n for n, name in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r["group"], len(rank)))  # stable: rows keep their order
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    names = [f.name for f in fields(Row)]
    sections = []
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group]
        first = mine[0]
        sections.append(
            f"### `{group}`\n\nDate: {first['date']}. Machine: {first['machine']}. "
            f"Medians of {first['runs']} run(s).\n\n"
            + table([Row(**{k: r[k] for k in names}) for r in mine])
        )
    md_path.write_text(
        f"# Benchmarks\n\n{notes}\n\n## Latest results\n\n"
        "Each group's figures are from the latest run that included it "
        "(`python -m bench --only GROUP` rewrites only the figures of the groups it ran).\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
