"""Reports: results tables (text/Markdown) and the run report written at the end of a run."""

from __future__ import annotations

from osrm_lora.report.summary import markdown_table, print_results, results_rows
from osrm_lora.report.writer import write_report

__all__ = ["markdown_table", "print_results", "results_rows", "write_report"]
