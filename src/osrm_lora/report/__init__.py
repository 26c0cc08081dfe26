"""Reports: results tables (text/Markdown), figures and the self-contained HTML run report."""

from __future__ import annotations

from osrm_lora.report.summary import markdown_table, print_results, results_rows
from osrm_lora.report.writer import write_report

__all__ = ["markdown_table", "print_results", "results_rows", "write_report"]
