"""Results tables as text: the main results rows, Markdown tables and the terminal (rich) view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from osrm_lora.report.tables import (
    SELECTION_RULE,
    Table,
    fmt,
    fmt_lambda,
    init_label,
    init_names,
    lambda_edge,
    lambda_note,
    mean,
    merged_records,
    seed_note,
    single_avg,
    verdict_lines,
)

EDGE_MARK = "*"
EDGE_FOOTNOTE = f"{EDGE_MARK} λ at the edge of its grid: the best may lie outside; extend merge.lambdas"


def results_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per (init, method), one column per task + averages.

    Each task cell reads ``merged / single (normalised%)`` on the TEST split; lambda chosen on validation.
    """
    tasks = list(results["tasks"])
    header = ["init", "method", "lambda"] + tasks + ["avg merged", "avg single", "normalised %"]
    rows: list[list[str]] = []
    for rec in merged_records(results):
        init = rec["init"]
        single = results["single_task"][init]
        norm = rec.get("normalised_test") or {}
        cells = [f"{fmt(rec.get('test', {}).get(t))} / {fmt(single.get(t, {}).get('test'))} ({fmt(norm.get(t))}%)"
                 for t in tasks]
        note = lambda_note(rec)
        lam = fmt_lambda(rec.get("lambda")) + (f" ({note})" if note else "")
        rows.append([init, rec["method"], lam, *cells, fmt(rec.get("avg_test")),
                     fmt(single_avg(results, init)), fmt(rec.get("avg_normalised_test"))])
    return header, rows


def _md_cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def table_markdown(table: Table) -> str:
    """A :class:`Table` as Markdown: title, caption, then the table with best cells in bold."""
    header = list(table.header)
    if table.groups:
        labels = [lab for lab, span in table.groups for _ in range(span)]
        header = [f"{g} {h}".strip() if g else h for g, h in zip(labels, header)]
    rows = []
    for row in table.rows:
        out = []
        for c in row:
            t = c.text + (f" ({c.note})" if c.note else "")
            out.append(f"**{t}**" if c.best else t)
        rows.append(out)
    return f"### {table.title}\n\n{table.caption}\n\n{markdown_table(header, rows)}\n"


def _score_pct(score: Any, pct: Any) -> str:
    return f"{fmt(score)} {fmt(pct, '.0f')}%"


def _column_width(cells: Sequence[str]) -> int:
    """Width of a terminal column: its longest line plus rich's padding (one space each side) and the
    column separator."""
    return max(len(line) for c in cells for line in c.split("\n")) + 3


def terminal_tables(results: Mapping[str, Any], width: int | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per init: (title, header, rows) with tasks as rows and methods as columns; a method cell reads
    ``merged test  normalised%``. Method names are never broken inside a word: when ``width`` (terminal
    columns) is given and the methods do not fit beside each other, they are spread over several tables
    (titles ``... (continued)``) with the task and single-task columns repeated."""
    tasks = list(results["tasks"])
    out = []
    for init in init_names(results):
        recs = [r for r in merged_records(results) if r["init"] == init]
        single = results["single_task"][init]
        lead = [["task"] + tasks + ["average"],
                ["single"] + [fmt(single.get(t, {}).get("test")) for t in tasks]
                + [fmt(mean([single.get(t, {}).get("test") for t in tasks]))]]
        cols = [[f"{r['method']}\nλ={fmt_lambda(r.get('lambda'))}{EDGE_MARK if lambda_edge(r) else ''}"]
                + [_score_pct(r.get("test", {}).get(t), (r.get("normalised_test") or {}).get(t)) for t in tasks]
                + [_score_pct(r.get("avg_test"), r.get("avg_normalised_test"))] for r in recs]
        chunks: list[list[list[str]]] = [[]]
        used = sum(_column_width(c) for c in lead)
        for col in cols:
            w = _column_width(col)
            if width is not None and chunks[-1] and used + w > width:
                chunks.append([])
                used = sum(_column_width(c) for c in lead)
            chunks[-1].append(col)
            used += w
        for k, chunk in enumerate(chunks):
            table_cols = lead + chunk
            header = [c[0] for c in table_cols]
            rows = [[c[i] for c in table_cols] for i in range(1, len(tasks) + 2)]
            out.append((init_label(results, init) + (" (continued)" if k else ""), header, rows))
    return out


def print_results(results: Mapping[str, Any]) -> None:
    """Print the results to the terminal (rich): one compact table per init, tasks as rows, each method's
    cell ``merged test (normalised %)``, the single-task test score beside them."""
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    console.print(f"[bold]{results.get('name', 'run')}[/bold]: test scores; cells = merged score and % of single-task",
                  highlight=False)
    console.print(seed_note(results), style="dim", highlight=False)
    console.print(f"{SELECTION_RULE}; single = each task's own adapter", style="dim", highlight=False)
    if any(lambda_edge(r) for r in merged_records(results)):
        console.print(EDGE_FOOTNOTE, style="yellow", highlight=False)
    for title, header, rows in terminal_tables(results, console.width):
        table = RichTable(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        for k, h in enumerate(header):
            table.add_column(h, justify="left" if k == 0 else "right", overflow="ellipsis", no_wrap=k > 0)
        for k, r in enumerate(rows):
            table.add_row(*r, end_section=k == len(rows) - 2)
        console.print(table)
    for line in verdict_lines(results):
        console.print(line, highlight=False)
