"""Results: merge into ``bench/results/latest.json`` and print the Markdown table."""

from __future__ import annotations

import fcntl
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.envinfo import environment
from bench.runner import ScenarioResult

__all__ = ["REFERENCES", "RESULTS_PATH", "load", "markdown_table", "merge_and_write", "ratios"]

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "latest.json"
SCHEMA = 1
# Multiplication sign and en dash, spelt as escapes so linters see no look-alike characters.
TIMES, DASH = "\u00d7", "\u2013"

REFERENCES: tuple[tuple[str, str], ...] = (
    ("limit", "of limit"),
    ("peer-celery", f"{TIMES} peer-celery"),
)
"""Scenarios every rate is compared against, and the table column for each."""


def load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"schema": SCHEMA, "scenarios": {}}
    data.setdefault("scenarios", {})
    return data


def merge_and_write(path: Path, results: Sequence[ScenarioResult]) -> dict[str, Any]:
    """Replace the entries of the scenarios run now, keep the others; write atomically.

    Several harnesses may finish at once on a shared machine: the read-merge-write
    holds an exclusive lock on ``<path>.lock`` so no one's entries are lost.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        data["schema"] = SCHEMA
        data["environment"] = environment()
        for r in results:
            data["scenarios"][r.name] = r.to_json()
        for name, entry in data["scenarios"].items():
            entry["ratios"] = ratios(name, data["scenarios"])
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return data


def _primary_median(entry: Mapping[str, Any] | None) -> float | None:
    if not entry or entry.get("status") != "ok":
        return None
    metric = entry.get("metrics", {}).get(entry.get("primary", ""))
    return None if metric is None else float(metric["median"])


def ratios(name: str, scenarios: Mapping[str, Any]) -> dict[str, float]:
    """Primary rate of ``name`` divided by each reference's primary rate (same results file)."""
    entry = scenarios.get(name)
    value = _primary_median(entry)
    if value is None or not str(entry.get("primary", "")).endswith("_per_s"):  # type: ignore[union-attr]
        return {}
    out: dict[str, float] = {}
    for ref, _ in REFERENCES:
        if ref == name:
            break  # a reference is compared only with the references before it
        base = _primary_median(scenarios.get(ref))
        if base:
            out[ref] = value / base
    return out


def _fmt(metric: str, value: float) -> str:
    if metric.endswith("_per_s"):
        return f"{value:,.0f}/s" if value >= 100 else f"{value:,.1f}/s"
    if metric.endswith("_ms_per_msg"):
        return f"{value:,.2f} ms"
    if metric.endswith("_ms"):
        return f"{value:,.2f} ms"
    if metric.endswith("_s"):
        return f"{value:,.2f} s"
    if metric.endswith("_mb"):
        return f"{value:,.1f} MB"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.3g}"


def _label(metric: str) -> str:
    for suffix in ("_ms_per_msg", "_per_s", "_ms", "_s", "_mb"):
        if metric.endswith(suffix):
            unit = {"_per_s": " /s", "_ms_per_msg": " per msg"}.get(suffix, "")
            return metric[: -len(suffix)].replace("_", " ") + unit
    return metric.replace("_", " ")


def _fmt_ratio(ref: str, r: float) -> str:
    return f"{r:.1%}" if ref == "limit" else f"{r:.2f}{TIMES}"


def markdown_table(
    scenarios: Mapping[str, Any],
    names: Sequence[str],
    *,
    now: Sequence[str] = (),
    pending: Sequence[str] = (),
) -> str:
    """One row per metric of each scenario in ``names`` (primary first), ratios on rate rows.

    ``now`` are the scenarios run in this invocation: a ratio whose reference
    was not re-run with them is marked † (taken from an earlier run). Names in
    ``pending`` that have no results get a "pending" row.
    """
    head = ["scenario", "metric", "median", f"min {DASH} max", f"runs {TIMES} msgs"]
    head += [label for _, label in REFERENCES]
    head.append("others' CPU")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stale = False
    for name in names:
        entry = scenarios.get(name)
        if entry is None:
            if name in pending:
                rows.append(f"| {name} | pending | | | |" + " |" * (len(REFERENCES) + 1))
            continue
        if entry.get("status") != "ok":
            error = " ".join(str(entry.get("error", "")).split()).replace("|", "/")[:160]
            rows.append(f"| {name} | **failed**: {error} | | | |" + " |" * (len(REFERENCES) + 1))
            continue
        primary = entry["primary"]
        metrics = entry["metrics"]
        order = [primary, *(m for m in metrics if m != primary)]
        for k, metric in enumerate(order):
            m = metrics[metric]
            cells = [
                name if k == 0 else "",
                ("**" + _label(metric) + "**") if k == 0 else _label(metric),
                _fmt(metric, m["median"]),
                f"{_fmt(metric, m['min'])} {DASH} {_fmt(metric, m['max'])}",
                f"{entry.get('runs_completed', entry['runs'])} {TIMES} {entry['messages']:,}"
                if k == 0
                else "",
            ]
            for ref, _ in REFERENCES:
                r = ratios(name, scenarios).get(ref) if k == 0 else None
                if r is None:
                    cells.append("")
                    continue
                mark = ""
                if now and name in now and ref not in now:
                    mark, stale = "†", True
                cells.append(_fmt_ratio(ref, r) + mark)
            others = (
                entry.get("environment", {}).get("cpu_used_by_others_during_each_run_pct") or []
            )
            cells.append(f"{statistics.median(others):.0f}%" if k == 0 and others else "")
            rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    table += (
        "\n\nothers' CPU: median share of the machine's CPUs used during the runs by processes"
        " the harness did not start (other workloads), not counting RabbitMQ and PostgreSQL."
    )
    if stale:
        table += "\n\n† reference scenario not re-run in this invocation: its figure is from an earlier run in the same results file."
    return table
