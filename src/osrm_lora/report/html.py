"""Self-contained HTML report: inline CSS, figures as base64 PNG data URIs, no scripts, no network.

:func:`render_html` is pure (results + pre-rendered figures in, one HTML string out). Every string that
comes from the results or the config is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from osrm_lora.report.tables import (
    SELECTION_RULE,
    Cell,
    Table,
    init_label,
    init_names,
    interference_scale,
    interference_table,
    manifest_tables,
    merge_cost_table,
    per_task_table,
    robustness_table,
    scale_text,
    search_table,
    seed_note,
    single_task_table,
    summary_table,
    verdict_lines,
)

SECTIONS = (
    ("summary", "Summary"),
    ("results", "Results per task"),
    ("normalised", "Normalised vs absolute"),
    ("robustness", "Robustness over λ"),
    ("interference", "Interference"),
    ("single-task", "Single-task comparison"),
    ("merge-cost", "Merge cost"),
    ("manifest", "Run manifest"),
    ("notes", "Notes"),
)

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --band:#f6f8fa; --best:#dafbe1; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,"DejaVu Sans",sans-serif; color:var(--fg);
       background:var(--bg); }
main { max-width:1240px; margin:0 auto; padding:24px 28px 48px; }
h1 { font-size:24px; margin:0 0 6px; }
h2 { font-size:19px; margin:34px 0 8px; padding-bottom:4px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:20px 0 6px; }
p, li { max-width:980px; }
.meta { color:var(--muted); margin:0 0 12px; }
.callout { background:var(--band); border-left:4px solid var(--accent); padding:8px 12px; margin:12px 0; }
.verdict { font-size:1.05em; border-left:4px solid var(--accent); padding:6px 12px; margin:12px 0; }
nav ol { columns:3; margin:8px 0 0; padding-left:20px; }
nav a { color:var(--accent); text-decoration:none; }
.tbl { min-width:0; max-width:100%; }
.table-wrap { overflow-x:auto; max-width:100%; margin:6px 0 14px;
              /* a shadow at an edge with more table behind it: wide tables scroll inside this box */
              background: linear-gradient(to right, #fff 30%, rgba(255,255,255,0)),
                          linear-gradient(to left, #fff 30%, rgba(255,255,255,0)) 100% 0,
                          radial-gradient(farthest-side at 0 50%, rgba(0,0,0,.16), rgba(0,0,0,0)),
                          radial-gradient(farthest-side at 100% 50%, rgba(0,0,0,.16), rgba(0,0,0,0)) 100% 0;
              background-repeat:no-repeat; background-size:36px 100%, 36px 100%, 12px 100%, 12px 100%;
              background-attachment:local, local, scroll, scroll; }
table { border-collapse:collapse; font-size:12.5px; font-variant-numeric:tabular-nums; }
.tbl h3 { margin:16px 0 2px; font-size:14px; }
p.cap { color:var(--muted); font-size:12.5px; margin:0 0 6px; }
.grid { display:flex; flex-wrap:wrap; gap:0 32px; align-items:flex-start; }
.grid .tbl { flex:0 1 auto; }
.grid p.cap { max-width:420px; }
th, td { border:1px solid var(--line); padding:3px 8px; white-space:nowrap; word-break:keep-all; overflow-wrap:normal;
         hyphens:none; }
th { background:var(--band); font-weight:600; text-align:center; }
td.num { text-align:right; }
tr.single td { background:#f3f6fb; color:#3d4a5c; font-style:italic; }
td.best { background:var(--best); font-weight:700; }
td.mark { outline:2px solid #bf8700; outline-offset:-2px; font-weight:700; }
td small { color:var(--muted); font-size:10.5px; margin-left:4px; }
figure { margin:10px 0 18px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); background:#fff; }
figcaption { color:var(--muted); font-size:12.5px; margin-top:4px; max-width:980px; }
img.raw { image-rendering:pixelated; width:240px; }
pre { background:var(--band); border:1px solid var(--line); padding:10px 12px; overflow-x:auto; font-size:12px; }
.empty { color:var(--muted); font-style:italic; }
footer { margin-top:40px; color:var(--muted); font-size:12px; }
"""


def esc(value: Any) -> str:
    """Escape any value for HTML text or attribute context."""
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG header; (0, 0) when the bytes are not a PNG."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def render_figure(key: str, png: bytes | None, alt: str, caption: str, css_class: str = "") -> str:
    """A ``<figure>`` with the PNG inlined, or a note when there is nothing to plot."""
    if not png:
        return f'<p class="empty" id="fig-{esc(key)}-missing">No data for this figure in this run.</p>'
    w, h = png_size(png)
    size = f' width="{w}" height="{h}"' if w and h and not css_class else ""
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return (f'<figure id="fig-{esc(key)}"><img{cls} src="{data_uri(png)}" alt="{esc(alt)}"{size}>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _cell(c: Cell) -> str:
    classes = []
    if c.numeric:
        classes.append("num")
    if c.best:
        classes.append("best")
    if c.mark:
        classes.append("mark")
    attr = f' class="{" ".join(classes)}"' if classes else ""
    title = ' title="best in column"' if c.best else (' title="selected on validation"' if c.mark else "")
    note = f"<small>{esc(c.note)}</small>" if c.note else ""
    return f"<td{attr}{title}>{esc(c.text)}{note}</td>"


def render_table(table: Table) -> str:
    """A ``<table>`` (with caption, optional grouped header) inside a horizontal scroll wrapper."""
    parts = [f'<div class="tbl"><h3>{esc(table.title)}</h3><p class="cap">{esc(table.caption)}</p>',
             f'<div class="table-wrap"><table id="{esc(table.key)}" aria-label="{esc(table.title)}"><thead>']
    if table.groups:
        parts.append("<tr>" + "".join(f'<th colspan="{int(span)}">{esc(label)}</th>' for label, span in table.groups)
                     + "</tr>")
    parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.header) + "</tr></thead><tbody>")
    for k, row in enumerate(table.rows):
        cls = table.row_classes[k] if k < len(table.row_classes) else ""
        parts.append((f'<tr class="{esc(cls)}">' if cls else "<tr>") + "".join(_cell(c) for c in row) + "</tr>")
    if not table.rows:
        parts.append(f'<tr><td class="empty" colspan="{len(table.header)}">no rows</td></tr>')
    parts.append("</tbody></table></div></div>")
    return "".join(parts)


def _section(key: str, title: str, body: Sequence[str]) -> str:
    return f'<section id="{esc(key)}"><h2>{esc(title)}</h2>' + "\n".join(body) + "</section>"


def render_html(
    results: Mapping[str, Any],
    figures: Mapping[str, bytes | None],
    *,
    config_text: str | None = None,
    diagnostic_pngs: Mapping[str, bytes] | None = None,
) -> str:
    """The whole report page.

    ``figures`` maps the keys of :data:`osrm_lora.report.plots.FIGURES` to PNG bytes (or None);
    ``diagnostic_pngs`` (init -> PNG) are the heatmaps written by the diagnose stage, shown when the
    results carry no ratio matrix for that init; ``config_text`` is the run's ``config.yaml``.
    """
    name = results.get("name", "run")
    tasks = list(results["tasks"])
    metrics = results.get("metrics", {})
    titles = dict(SECTIONS)
    seed = seed_note(results)
    task_text = ", ".join(f"{t} ({metrics[t]})" if t in metrics else t for t in tasks)
    head = [
        f"<h1>osrm-lora report: {esc(name)}</h1>",
        f'<p class="meta">Model <code>{esc(results.get("model", "?"))}</code> · seed {esc(results.get("seed", "?"))} · '
        f"tasks: {esc(task_text)} · inits: {esc(', '.join(init_label(results, i) for i in init_names(results)))}</p>",
        *([f'<p class="verdict"><b>What OSRM changed.</b> {esc(" ".join(verdict_lines(results)))}</p>']
          if verdict_lines(results) else []),
        '<div class="callout">All scores are on a 0..100 scale in each task\'s metric and on the <b>test</b> split '
        "unless a label says validation; the merge coefficient λ is chosen on the average <b>validation</b> score "
        "(never on test). "
        "Normalised = merged test score / single-task test score of the same init, in %. Normalised scores alone can "
        "flatter a weak single-task model, so absolute merged scores are always shown beside them.</div>",
        "<nav><b>Contents</b><ol>" + "".join(f'<li><a href="#{k}">{esc(t)}</a></li>' for k, t in SECTIONS)
        + "</ol></nav>",
    ]
    body: list[str] = []
    body.append(_section("summary", titles["summary"], [render_table(summary_table(results))]))
    body.append(_section("results", titles["results"], [render_table(per_task_table(results))]))
    body.append(_section("normalised", titles["normalised"], [render_figure(
        "normalised", figures.get("normalised"), "bar chart of normalised and absolute merged scores per method",
        f"{seed}. Left: average normalised test score (%) per method, one bar per init. Right: the absolute "
        "average merged test score, its y axis zoomed to the data (the strokes on the axis mark that it does not "
        "start at 0; the start is written under the panel); the black bar marks the single-task average of the "
        f"same init. Test split; {SELECTION_RULE}.")]))
    body.append(_section("robustness", titles["robustness"], [
        render_figure("robustness", figures.get("robustness"), "robustness curves over lambda",
                      f"{seed}. Average validation score, average test score and average normalised test score over "
                      "the λ grid; one line per init, one row per method; ◆ = λ selected on validation."),
        render_table(robustness_table(results))]))
    scale = interference_scale(results)
    scale_line = (f"Re-plotted from the ratio matrices in results.json on one {scale_text(scale)} shared by every init "
                  "of the run (the standalone diagnostics/<init>/interference.png are redrawn on the same scale), so "
                  "before and after compare" if scale else "No ratio matrices in results.json")
    inter = [render_figure("interference", figures.get("interference"), "interference heatmaps before and after OSRM",
                           f"{seed}. {scale_line}. Standard init = before OSRM; OSRM inits = after. Diagonal = 1 by "
                           "definition.")]
    itab = interference_table(results)
    if itab.rows:
        inter.append(render_table(itab))
    for init, png in (diagnostic_pngs or {}).items():
        inter.append(render_figure(f"diagnostic-{init}", png, f"interference heatmap of {init}",
                                   f"Heatmap written by the diagnose stage for {init_label(results, init)} "
                                   "(diagnostics/<init>/interference.png). results.json carries no ratio matrix for "
                                   "it, so it could not be redrawn on the run's shared scale: its colour scale is "
                                   "its own (see its title) and does not compare across inits.", css_class="raw"))
    if not itab.rows and not diagnostic_pngs:
        inter = ['<p class="empty">No interference diagnostics in this run (enable <code>diagnose</code>).</p>']
    body.append(_section("interference", titles["interference"], inter))
    body.append(_section("single-task", titles["single-task"], [
        render_figure("single-task", figures.get("single-task"), "single-task scores per init",
                      f"{seed}. Test scores of each task's own adapter (before merging), one bar per init, and the "
                      "mean drift of A during training."),
        render_table(single_task_table(results))]))
    searches = search_table(results)
    body.append(_section("merge-cost", titles["merge-cost"], [
        render_figure("merge-cost", figures.get("merge-cost"), "merge time per init and method",
                      f"{seed}. Wall time of one merge at the selected λ (and peak memory when recorded)."),
        render_table(merge_cost_table(results)), *([render_table(searches)] if searches.rows else [])]))
    man = ['<div class="grid">' + "".join(render_table(t) for t in manifest_tables(results)) + "</div>"]
    man.append("<h3>Resolved config (config.yaml)</h3>")
    man.append(f"<pre>{esc(config_text)}</pre>" if config_text else '<p class="empty">config.yaml not found.</p>')
    body.append(_section("manifest", titles["manifest"], man))
    notes = results.get("notes") or []
    body.append(_section("notes", titles["notes"], ["<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"
                                                    if notes else '<p class="empty">No notes.</p>']))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>osrm-lora report: {esc(name)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(head) + "\n" + "\n".join(body)
            + "\n<footer>Written by osrm-lora from results.json; self-contained (no scripts, no network).</footer>"
            + "\n</main></body></html>\n")
