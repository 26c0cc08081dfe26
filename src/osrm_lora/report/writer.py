"""Write ``report.md`` and ``report.html`` for a run directory from its ``results.json``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from osrm_lora.diagnose import write_interference_png
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_file, read_json
from osrm_lora.pipeline.layout import RunLayout
from osrm_lora.report.html import render_html
from osrm_lora.report.summary import markdown_table, results_rows, table_markdown
from osrm_lora.report.tables import (
    SELECTION_RULE,
    init_names,
    interference_scale,
    interference_table,
    manifest_tables,
    merge_cost_table,
    ratio_matrices,
    robustness_table,
    search_table,
    seed_note,
    single_task_table,
    summary_table,
    validate_results,
    verdict_lines,
)

logger = logging.getLogger(__name__)

REPORT_MODE = 0o644  # reports are meant to be shared (temporary files are created 0600)


def markdown_report(results: Mapping[str, Any]) -> str:
    """The Markdown summary (tables only; the figures are in ``report.html``)."""
    header, rows = results_rows(results)
    metrics = results.get("metrics", {})
    tasks = ", ".join(f"{t} ({metrics[t]})" if t in metrics else t for t in results["tasks"])
    parts = [
        f"# osrm-lora report: {results.get('name', 'run')}",
        "",
        f"Model: `{results.get('model')}`, seed {results.get('seed')}. Tasks: {tasks}.",
        "",
        *(["**What OSRM changed.** " + " ".join(verdict_lines(results)), ""] if verdict_lines(results) else []),
        f"All scores 0..100, test split unless stated; {SELECTION_RULE}. Normalised = merged / single-task test "
        "score of the same init (%). Figures: `report.html` (self-contained).",
        "",
        table_markdown(summary_table(results)),
        "### Merged vs single-task per task",
        "",
        f"{seed_note(results)}. Test split. Each cell: merged / single-task (normalised %).",
        "",
        markdown_table(header, rows),
        "",
        table_markdown(robustness_table(results)),
        table_markdown(single_task_table(results)),
    ]
    inter = interference_table(results)
    if inter.rows:
        parts.append(table_markdown(inter))
    parts.append(table_markdown(merge_cost_table(results)))
    searches = search_table(results)
    if searches.rows:
        parts.append(table_markdown(searches))
    parts += ["## Run manifest", ""] + [table_markdown(t) for t in manifest_tables(results)]
    parts += ["## Notes", ""] + [f"- {n}" for n in results.get("notes", [])]
    return "\n".join(parts) + "\n"


def render_figures(results: Mapping[str, Any]) -> dict[str, bytes | None]:
    """Every figure of :data:`osrm_lora.report.plots.FIGURES` as PNG bytes (None when nothing to plot
    or when plotting failed, which is logged)."""
    from osrm_lora.report.plots import FIGURES

    out: dict[str, bytes | None] = {}
    for key, fn in FIGURES.items():
        try:
            out[key] = fn(results)
        except Exception:  # a broken figure must not lose the rest of the report
            logger.warning("could not draw the %s figure", key, exc_info=True)
            out[key] = None
    return out


def diagnostic_pngs(run_dir: Path, results: Mapping[str, Any]) -> dict[str, bytes]:
    """Heatmaps written by the diagnose stage for inits whose results carry no ratio matrix."""
    out: dict[str, bytes] = {}
    inter = results.get("interference") or {}
    for init in init_names(results):
        if (inter.get(init) or {}).get("ratio"):
            continue
        png = RunLayout(run_dir).interference_png(init)
        if png.is_file():
            out[init] = png.read_bytes()
    return out


def rescale_diagnostic_pngs(run_dir: Path, results: Mapping[str, Any]) -> list[Path]:
    """Redraw ``diagnostics/<init>/interference.png`` of every init whose results carry the ratio
    matrix on ONE colour scale shared by all inits of the run (the diagnose stage draws each init alone,
    on its own range), so the standalone heatmaps compare; returns the files written."""
    scale = interference_scale(results)
    written: list[Path] = []
    if scale is None:
        return written
    layout = RunLayout(run_dir)
    for init, diag in ratio_matrices(results):
        if not layout.diagnostics(init).is_dir():
            continue
        written.append(write_interference_png(diag, layout.interference_png(init), str(diag.get("label") or init), scale))
    return written


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read and check ``run_dir/results.json`` (one-line :class:`OsrmError` when absent or malformed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OsrmError(f"{run_dir} is not a run directory; pass the directory given to `osrm-lora run`")
    path = RunLayout(run_dir).results
    if not path.is_file():
        raise OsrmError(f"{run_dir} has no results.json; run `osrm-lora run` or `osrm-lora demo` first")
    results: dict[str, Any] = read_json(path)
    validate_results(results, str(path))
    return results


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and the self-contained ``report.html`` (next to it) into ``run_dir``; return
    the path of ``report.md``.

    Both files are rendered completely before either is written, then each is written to a temporary
    file and renamed, so a failure leaves the previous report (or none) and no partial file. Afterwards
    the standalone interference heatmaps are redrawn on one colour scale (:func:`rescale_diagnostic_pngs`).
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    layout = RunLayout(run_dir)
    cfg = layout.config
    config_text = cfg.read_text(encoding="utf-8", errors="replace") if cfg.is_file() else None
    md = markdown_report(results)
    page = render_html(results, render_figures(results), config_text=config_text,
                       diagnostic_pngs=diagnostic_pngs(run_dir, results))
    html_path = layout.report_html
    md_path = layout.report_md
    with atomic_file(md_path, "wb") as fh_md, atomic_file(html_path, "wb") as fh_html:
        for fh, text in ((fh_md, md), (fh_html, page)):
            fh.write(text.encode("utf-8"))
            os.fchmod(fh.fileno(), REPORT_MODE)
    logger.info("report written: %s, %s", md_path, html_path)
    try:
        pngs = rescale_diagnostic_pngs(run_dir, results)
    except Exception:  # the report is written; a heatmap that cannot be redrawn keeps its own scale
        logger.warning("could not redraw the interference heatmaps on one colour scale", exc_info=True)
    else:
        if pngs:
            logger.info("interference heatmaps redrawn on one colour scale: %s", ", ".join(str(p) for p in pngs))
    return md_path
