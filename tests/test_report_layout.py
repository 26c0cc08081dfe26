"""Report layout: the seed beside every number, the absolute panel of the normalised-bars figure (zoomed
axis, labels clear of the single-task marker), one colour scale for the interference heatmaps of a run,
the training-time column only when comparable, and tables that stay readable in a narrow window.

Uses the hand-built run directory under tests/fixtures/report/run (see tests/test_report.py).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from PIL import Image

from osrm_lora.diagnose import save_interference
from osrm_lora.report import plots, print_results, write_report
from osrm_lora.report.html import CSS, render_html
from osrm_lora.report.summary import terminal_tables
from osrm_lora.report.tables import (
    interference_table,
    manifest_tables,
    merge_cost_table,
    per_task_table,
    robustness_table,
    single_avg,
    single_task_table,
    summary_table,
)
from osrm_lora.report.writer import markdown_report

RUN = Path(__file__).parent / "fixtures" / "report" / "run"
TRAIN_COL = "train s (all tasks)"


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return json.loads((RUN / "results.json").read_text())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(RUN, dst)
    return dst


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """write_report without drawing the report's own figures (the standalone heatmaps are still drawn)."""
    monkeypatch.setattr("osrm_lora.report.writer.render_figures", lambda _r: {})


def result_tables(results: dict[str, Any]) -> list[Any]:
    stages = [t for t in manifest_tables(results) if t.key == "manifest-stages"]
    return [summary_table(results), per_task_table(results), robustness_table(results), single_task_table(results),
            interference_table(results), merge_cost_table(results), *stages]


class Page(HTMLParser):
    """Captions (table and figure), the parent element of every table, and every cell's text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []
        self.table_parents: list[tuple[str, str]] = []
        self.captions: list[str] = []
        self.figcaptions: list[str] = []
        self.cells: list[str] = []
        self._text: list[str] | None = None
        self._kind = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.table_parents.append(self.stack[-1] if self.stack else ("", ""))
        cls = str(a.get("class") or "")
        if (tag == "p" and "cap" in cls.split()) or tag in ("figcaption", "td", "th"):
            self._text, self._kind = [], tag
        if tag not in ("img", "meta", "br"):
            self.stack.append((tag, cls))

    def handle_endtag(self, tag: str) -> None:
        if self._text is not None and tag == ("p" if self._kind == "p" else self._kind):
            text = "".join(self._text)
            {"p": self.captions, "figcaption": self.figcaptions}.get(self._kind, self.cells).append(text)
            self._text = None
        if self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def parse(page: str) -> Page:
    p = Page()
    p.feed(page)
    return p


# --------------------------------------------------------------------------- 1. the seed beside every number
def test_every_results_table_states_the_seed(results: dict[str, Any]) -> None:
    tables = result_tables(results)
    assert len(tables) == 7
    for table in tables:
        assert table.caption.startswith("Seed 0 (one run, so no ± over seeds)."), (table.key, table.caption)


def test_markdown_and_html_state_the_seed_and_invent_no_spread(results: dict[str, Any]) -> None:
    md = markdown_report(results)
    sections = md.split("\n### ")[1:]
    result_sections = [s for s in sections if not s.startswith(("Run\n", "Library versions", "Data\n",
                                                                 "Initialisations"))]
    # the tables above (the per-task one as the merged-vs-single table of results_rows) and the stage timings
    assert len(result_sections) == 7
    for sec in result_sections:
        caption = sec.split("\n\n")[1]
        assert "Seed 0" in caption, sec[:80]
    assert not [line for line in md.splitlines() if line.startswith("|") and "±" in line]  # one seed: no ±

    page = parse(render_html(results, {k: b"\x89PNG\r\n\x1a\n" + b"\0" * 16 for k in plots.FIGURES}))
    assert page.figcaptions and all(c.startswith("Seed 0") for c in page.figcaptions)
    seeded = [c for c in page.captions if c.startswith("Seed 0")]
    assert len(seeded) == 7
    assert not [c for c in page.cells if "±" in c]


def test_spread_shown_only_where_results_carry_several_seeds(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    r["seeds"] = [0, 1, 2]
    r["merged"][0]["avg_test"] = {"mean": 57.73, "std": 0.41, "values": [57.3, 57.8, 58.1]}
    table = summary_table(r)
    assert table.caption.startswith("Seeds 0, 1, 2: a cell with ± reads mean ± standard deviation")
    cells = [c.text for row in table.rows for c in row]
    assert "57.7 ± 0.4" in cells
    assert sum("±" in c for c in cells) == 1  # the plain numbers keep no ±
    assert table.rows[0][4].value == pytest.approx(57.73)


# --------------------------------------------------------------------------- 2. the absolute panel
def _absolute_axes(fig: Figure) -> Any:
    (ax,) = [a for a in fig.axes if a.get_gid() == "absolute"]
    return ax


def _marker_boxes(fig: Figure, ax: Any) -> list[Bbox]:
    """Display boxes of the single-task markers ("_" of size sqrt(s) pt and the marker's line width)."""
    boxes = []
    px = fig.dpi / 72
    for coll in [c for c in ax.collections if c.get_gid() == "single-task-marker"]:
        half_w = math.sqrt(float(coll.get_sizes()[0])) / 2 * px
        half_h = float(coll.get_linewidths()[0]) / 2 * px
        for x, y in ax.transData.transform(np.ma.filled(coll.get_offsets(), np.nan)):
            if math.isfinite(y):
                boxes.append(Bbox([[x - half_w, y - half_h], [x + half_w, y + half_h]]))
    return boxes


def _check_absolute_panel(results: dict[str, Any]) -> tuple[Any, list[str]]:
    fig = plots.normalised_bars_figure(results)
    assert fig is not None
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = _absolute_axes(fig)
    labels = [t for t in ax.texts if t.get_gid() == "value-label"]
    boxes = [t.get_window_extent(renderer) for t in labels]
    markers = _marker_boxes(fig, ax)
    frame = ax.get_window_extent(renderer)
    assert markers
    for t, box in zip(labels, boxes):
        for m in markers:
            assert not box.overlaps(m), f"label {t.get_text()} lies on a single-task marker"
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two value labels overlap"
    return ax, [t.get_text() for t in labels]


def test_absolute_panel_is_zoomed_with_a_break_and_labels_clear_of_markers(results: dict[str, Any]) -> None:
    ax, texts = _check_absolute_panel(results)
    assert sorted(texts) == sorted(f"{r['avg_test']:.1f}" for r in results["merged"])
    data = [r["avg_test"] for r in results["merged"]] + [single_avg(results, i) for i in results["single_task"]]
    lo, hi = ax.get_ylim()
    assert 0 < lo <= min(data) and hi >= max(data)
    assert hi - lo < 3 * (max(data) - min(data))  # zoomed to the data, not 0..100
    assert [a for a in ax.lines if a.get_gid() == "axis-break"]
    assert f"starts at {lo:g}, not 0" in ax.get_xlabel()


def test_absolute_labels_move_above_a_marker_just_over_the_bar(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    for rec in r["merged"]:  # every merged score a hair under its single-task average: the old label spot
        rec["avg_test"] = single_avg(r, rec["init"]) - 0.15
    _check_absolute_panel(r)


def test_absolute_panel_with_many_bars_and_a_missing_reference(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    for k, m in enumerate(["dare_ties", "breadcrumbs_ties", "magnitude_prune", "regmean"]):
        for rec in results["merged"]:
            extra = copy.deepcopy(rec)
            extra["method"], extra["avg_test"] = m, rec["avg_test"] + 0.7 * k
            r["merged"].append(extra)
    _check_absolute_panel(r)  # 12 bars: stacked panels, narrow bars
    r["single_task"]["standard"]["cola"]["test"] = None  # no single-task average for one init
    _check_absolute_panel(r)


def test_absolute_axis_starts_at_zero_when_the_data_reach_down_to_it(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    r["merged"][0]["avg_test"] = 8.0
    fig = plots.normalised_bars_figure(r)
    assert fig is not None
    ax = _absolute_axes(fig)
    assert ax.get_ylim()[0] == 0
    assert not [a for a in ax.lines if a.get_gid() == "axis-break"] and not ax.get_xlabel()


# --------------------------------------------------------------------------- 3. one colour scale for the heatmaps
def _expected_scale(results: dict[str, Any]) -> tuple[float, float]:
    vals = [v for d in results["interference"].values() for row in d["ratio"] for v in row if v > 0]
    return min(vals), max(vals)


def test_report_heatmaps_share_one_colour_scale(results: dict[str, Any]) -> None:
    fig = plots.interference_figure(results)
    assert fig is not None
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == len(results["interference"])
    assert {(im.norm.vmin, im.norm.vmax) for im in images} == {_expected_scale(results)}
    page = render_html(results, {"interference": plots.figure_png(fig)})
    vmin, vmax = _expected_scale(results)
    (caption,) = [c for c in parse(page).figcaptions if "ratio matrices" in c]
    assert f"log colour scale {vmin:.3g} to {vmax:.3g} shared by every init" in caption


def _png_description(path: Path) -> str:
    with Image.open(path) as im:
        return str(im.info.get("Description", ""))


@pytest.mark.usefixtures("no_figures")
def test_standalone_heatmaps_are_redrawn_on_the_runs_scale(run_dir: Path, results: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import osrm_lora.report.writer as writer

    calls: list[tuple[str, Any]] = []
    real = writer.write_interference_png

    def spy(result: Any, path: Any, label: str, scale: Any = None) -> Path:
        calls.append((Path(path).parent.name, scale))
        return real(result, path, label, scale)

    monkeypatch.setattr(writer, "write_interference_png", spy)
    write_report(run_dir)
    vmin, vmax = _expected_scale(results)
    assert sorted(c[0] for c in calls) == sorted(results["interference"])
    assert {c[1] for c in calls} == {(vmin, vmax, True)}
    notes = {init: _png_description(run_dir / "diagnostics" / init / "interference.png")
             for init in results["interference"]}
    assert len(set(notes.values())) == 1
    assert f"log colour scale {vmin:.3g} to {vmax:.3g}, shared by the inits of the run" in notes["standard"]


def test_diagnose_heatmap_alone_says_its_scale_is_its_own(tmp_path: Path) -> None:
    result = {"tasks": ["a", "b"], "ratio": [[1.0, 0.2], [0.05, 1.0]], "label": "x"}
    save_interference(result, tmp_path)
    assert "own range (not comparable across inits)" in _png_description(tmp_path / "interference.png")
    save_interference(result, tmp_path, scale=(0.001, 1.0, True))
    assert "log colour scale 0.001 to 1, shared" in _png_description(tmp_path / "interference.png")


# --------------------------------------------------------------------------- 4. training times
def test_train_time_kept_and_explained_when_comparable(results: dict[str, Any]) -> None:
    table = single_task_table(results)
    assert table.header[-1] == TRAIN_COL
    assert "one adapter after another in one process on cpu" in table.caption
    assert "comparable across inits" in table.caption


@pytest.mark.parametrize("case, reason", [
    ("processes", "training ran in 2 processes at once"),
    ("cached", "2 of 6 training stages were cached in the last invocation"),
    ("wall", "more than this invocation's 100 s wall time"),
    ("devices", "trained on different devices (cpu, cuda:0)"),
])
def test_train_time_dropped_when_not_comparable(results: dict[str, Any], case: str, reason: str) -> None:
    r = copy.deepcopy(results)
    man = r["manifest"]
    if case == "processes":
        man["processes"] = 2
    elif case == "cached":
        man["stages_cached"] = ["train/standard/sst2", "train/standard/cola", "profile"]
    elif case == "wall":
        man["wall_seconds"] = 100.0
    else:
        r["single_task"]["standard"]["sst2"]["device"] = "cuda:0"
        r["single_task"]["standard"]["cola"]["device"] = "cpu"
    table = single_task_table(r)
    assert TRAIN_COL not in table.header and all(len(row) == len(table.header) for row in table.rows)
    assert "Training time left out, not comparable across inits" in table.caption and reason in table.caption
    assert TRAIN_COL not in markdown_report(r)


def test_cached_stages_are_marked_in_the_timing_tables(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    r["manifest"]["stages_cached"] = ["merge/standard/ties", "profile"]
    (stages,) = [t for t in manifest_tables(r) if t.key == "manifest-stages"]
    notes = {row[0].text: row[1].note for row in stages.rows}
    assert notes["profile"].startswith("cached") and notes["merge/standard/ties"].startswith("cached")
    assert notes["train/standard/sst2"] == ""
    cost = merge_cost_table(r)
    marked = [(row[0].text, row[1].text) for row in cost.rows if row[-1].note == "cached"]
    assert marked == [("standard", "ties (density=0.2)")]


# --------------------------------------------------------------------------- 5. narrow windows
def _css_rules() -> dict[str, str]:
    body = re.sub(r"/\*.*?\*/", "", CSS, flags=re.S)
    return {sel.strip(): decl for sel, decl in re.findall(r"([^{}]+)\{([^}]*)\}", body)}


def _decls(decl: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (d.split(":", 1) for d in decl.split(";") if ":" in d)}


def test_every_table_scrolls_inside_its_own_box(results: dict[str, Any]) -> None:
    page = parse(render_html(results, {}))
    assert len(page.table_parents) >= 11
    assert all(tag == "div" and "table-wrap" in cls.split() for tag, cls in page.table_parents)
    rules = _css_rules()
    wrap = _decls(rules[".table-wrap"])
    assert wrap["overflow-x"] == "auto" and wrap["max-width"] == "100%"
    assert _decls(rules[".tbl"])["min-width"] == "0"  # a flex item that may shrink below its table's width
    cells = _decls(rules["th, td"])
    assert cells["white-space"] == "nowrap" and cells["word-break"] == "keep-all"
    assert not re.search(r"break-all|overflow-wrap:\s*anywhere|break-word", CSS)


def test_method_names_are_never_broken(results: dict[str, Any]) -> None:
    page = render_html(results, {})
    cells = parse(page).cells
    assert "task_arithmetic" in cells and "ties (density=0.2)" in cells
    assert not re.search("[\u00ad\u200b]|<wbr", page)  # no soft hyphen, zero-width space or break hint


def _many_methods(results: dict[str, Any]) -> dict[str, Any]:
    r = copy.deepcopy(results)
    for m in ["dare_ties_long_name", "breadcrumbs_ties", "magnitude_prune_merge", "regmean_plus_plus"]:
        for rec in results["merged"]:
            extra = copy.deepcopy(rec)
            extra["method"] = m
            r["merged"].append(extra)
    return r


def _all_lines(tables: list[tuple[str, list[str], list[list[str]]]]) -> Iterator[str]:
    for _, header, _rows in tables:
        for h in header:
            yield from h.split("\n")


def test_terminal_keeps_method_names_whole(results: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    r = _many_methods(results)
    names = {rec["method"] for rec in r["merged"]}
    headers = set(_all_lines(terminal_tables(r, 80)))
    assert names <= headers  # each name is one header line, never cut at an underscore
    monkeypatch.setenv("COLUMNS", "80")
    print_results(r)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    lines = out.splitlines()
    for name in names:
        assert any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", line) for line in lines), name
    assert "(continued)" in out and "Seed 0" in out
