"""Results tables: task x {single-task, merged, normalised} per init and method (text and Markdown)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from osrm_lora.evaluate import mean


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def results_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per (init, method), one column per task + averages.

    Each task cell reads ``merged / single (normalised%)`` on the TEST split; lambda chosen on validation.
    """
    tasks = list(results["tasks"])
    header = ["init", "method", "lambda"] + tasks + ["avg merged", "avg single", "normalised %"]
    rows: list[list[str]] = []
    for rec in results.get("merged", []):
        init = rec["init"]
        single = results["single_task"][init]
        cells = []
        for t in tasks:
            cells.append(f"{_fmt(rec['test'][t])} / {_fmt(single[t]['test'])} ({_fmt(rec['normalised_test'][t])}%)")
        avg_single = mean(single[t]["test"] for t in tasks)
        lam = rec.get("lambda")
        rows.append([init, rec["method"], "-" if lam is None else f"{lam:g}", *cells, _fmt(rec["avg_test"]),
                     _fmt(avg_single), _fmt(rec["avg_normalised_test"])])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_results(results: Mapping[str, Any]) -> None:
    """Print the results table to the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    header, rows = results_rows(results)
    table = Table(title=f"{results.get('name', 'run')}: test scores, merged / single-task (normalised %), lambda chosen on validation")
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console().print(table)
