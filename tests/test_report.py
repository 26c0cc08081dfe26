"""Report: tables, figures, the self-contained HTML page, report.md and the terminal view.

Uses the hand-built run directory under tests/fixtures/report/run (regenerate it with
tests/fixtures/report/make_fixture.py).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tinymodels import load_script

from osrm_lora.errors import OsrmError
from osrm_lora.report import markdown_table, plots, print_results, results_rows, write_report
from osrm_lora.report.html import SECTIONS, render_html
from osrm_lora.report.tables import per_task_table, summary_table
from osrm_lora.report.writer import render_figures

FIXTURE = Path(__file__).parent / "fixtures" / "report"
RUN = FIXTURE / "run"
TABLE_IDS = ["summary", "results", "robustness-table", "interference-table", "single-task-table", "merge-cost-table",
             "manifest-run", "manifest-versions", "manifest-data", "manifest-inits", "manifest-stages"]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return json.loads((RUN / "results.json").read_text())


@pytest.fixture(scope="module")
def figures(results: dict[str, Any]) -> dict[str, bytes | None]:
    return render_figures(results)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(RUN, dst)
    return dst


@pytest.fixture
def cached_figures(figures: dict[str, bytes | None], monkeypatch: pytest.MonkeyPatch) -> None:
    """write_report with the figures drawn once per module (drawing is the slow part)."""
    monkeypatch.setattr("osrm_lora.report.writer.render_figures", lambda _r: figures)


class PageParser(HTMLParser):
    """Collects ids, images, scripts, links and every table's cells (text, class)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[dict[str, str | None]] = []
        self.tags: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str]]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._cls = ""
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        for key in ("src", "href"):
            v = a.get(key)
            if v and not (v.startswith("data:image/png;base64,") or v.startswith("#")):
                self.external.append(v)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self._table = str(a.get("id"))
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell, self._cls = [], str(a.get("class") or "")

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append(("".join(self._cell), self._cls))
            self._cell = None
        elif tag == "table":
            self._table = None


def parse(page: str) -> PageParser:
    p = PageParser()
    p.feed(page)
    return p


def png_image(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------- fixture
def test_fixture_matches_its_generator(results: dict[str, Any]) -> None:
    mod = load_script(FIXTURE / "make_fixture.py", "make_fixture")
    assert json.loads(json.dumps(mod.build())) == results
    for rec in results["merged"]:  # selection really is on validation
        best = max(p["avg_validation"] for p in rec["curve"])
        assert rec["avg_validation"] == best and rec["selected_on"] == "validation"


# --------------------------------------------------------------------------- figures
@pytest.mark.parametrize("key", list(plots.FIGURES))
def test_each_plot_is_a_sensible_png(key: str, results: dict[str, Any]) -> None:
    data = plots.FIGURES[key](results)
    assert data is not None
    img = png_image(data)
    h, w, _ = img.shape
    assert 300 <= w <= 2500 and 150 <= h <= 3000, (w, h)
    assert img.std() > 10  # not a blank canvas
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20


def test_plots_return_none_without_data(results: dict[str, Any]) -> None:
    bare = {**results, "merged": [], "interference": {}}
    assert plots.normalised_bars_png(bare) is None
    assert plots.lambda_curves_png(bare) is None
    assert plots.interference_png(bare) is None
    assert plots.merge_cost_png(bare) is None
    assert plots.single_task_png(bare) is not None


def test_interference_plot_handles_nan_and_zero(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    r["interference"]["standard"]["ratio"][0][1] = float("nan")
    r["interference"]["standard"]["ratio"][1][0] = 0.0
    r["interference"]["standard"]["mean_offdiag_ratio"] = None
    assert png_image(plots.interference_png(r) or b"").std() > 10


# --------------------------------------------------------------------------- tables
def test_best_marks_match_an_independent_max(results: dict[str, Any]) -> None:
    table = per_task_table(results)
    merged_rows = [k for k, c in enumerate(table.row_classes) if c == "merged"]
    assert len(merged_rows) == len(results["merged"])
    for j, task in enumerate(results["tasks"]):
        col = 3 + 2 * j
        best = max(r["test"][task] for r in results["merged"])
        marked = [float(table.rows[k][col].text) for k in range(len(table.rows)) if table.rows[k][col].best]
        assert marked and all(math.isclose(v, best, abs_tol=0.05) for v in marked)
        assert not any(table.rows[k][col].best for k, c in enumerate(table.row_classes) if c == "single")
    summ = summary_table(results)
    fastest = min(r["merge_seconds"] for r in results["merged"])
    assert [c[-1].text for c in summ.rows if c[-1].best] == [f"{fastest:.2f}"]


def test_results_rows_and_markdown(results: dict[str, Any]) -> None:
    header, rows = results_rows(results)
    assert header[:3] == ["init", "method", "lambda"] and header[3:6] == results["tasks"]
    assert len(rows) == len(results["merged"]) and all(len(r) == len(header) for r in rows)
    rec = results["merged"][0]
    t = results["tasks"][0]
    single = results["single_task"][rec["init"]][t]["test"]
    assert rows[0][3] == f"{rec['test'][t]:.1f} / {single:.1f} ({rec['normalised_test'][t]:.1f}%)"
    md = markdown_table(["a|b", "c"], [["1", "x|y"]])
    assert md.splitlines() == ["| a\\|b | c |", "|---|---|", "| 1 | x\\|y |"]


def test_print_results_fits_80_columns(results: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    print_results(results)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    for rec in results["merged"]:
        assert f"{rec['avg_test']:.1f} {rec['avg_normalised_test']:.0f}%" in out
        assert f"λ={rec['lambda']:g}" in out
    for init in results["single_task"]:
        assert init in out


# --------------------------------------------------------------------------- HTML
def test_html_has_every_section_table_and_number(results: dict[str, Any], figures: dict[str, bytes | None]) -> None:
    page = render_html(results, figures, config_text=(RUN / "config.yaml").read_text())
    p = parse(page)
    assert {k for k, _ in SECTIONS} <= p.ids
    assert {f"fig-{k}" for k in plots.FIGURES} <= p.ids
    assert set(TABLE_IDS) <= set(p.tables)
    assert len(p.imgs) == len(plots.FIGURES)
    for img in p.imgs:
        png = base64.b64decode(str(img["src"]).split(",", 1)[1])
        assert png_image(png).shape[1] == int(str(img["width"]))
        assert img.get("alt")
    assert "script" not in p.tags and not p.external  # self-contained, no JS needed

    def cells(table: str) -> list[str]:
        return [t for row in p.tables[table] for t, _ in row]

    summary, per_task, robust = cells("summary"), cells("results"), cells("robustness-table")
    for rec in results["merged"]:
        assert f"{rec['avg_test']:.1f}" in summary and f"{rec['avg_normalised_test']:.1f}" in summary
        assert f"{rec['avg_validation']:.1f}" in summary and f"{rec['merge_seconds']:.2f}" in summary
        assert f"{rec['lambda']:g}" in summary
        assert f"{min(q['avg_normalised_test'] for q in rec['curve']):.1f}" in summary
        for t in results["tasks"]:
            assert f"{rec['test'][t]:.1f}" in per_task and f"{rec['normalised_test'][t]:.1f}" in per_task
        assert any(c.startswith(f"{rec['avg_normalised_test']:.1f} ◆") for c in robust)
    for init, per in results["single_task"].items():
        for t in results["tasks"]:
            assert f"{per[t]['test']:.1f}" in cells("single-task-table")
        drift = sum(per[t]["a_drift_mean"] for t in results["tasks"]) / len(results["tasks"])
        assert f"{drift:.3f}" in cells("single-task-table")
        assert f"{results['interference'][init]['mean_offdiag_ratio']:.3g}" in cells("interference-table")
    man = results["manifest"]
    for v in man["versions"].values():
        assert v in cells("manifest-versions")
    assert man["config_hash"] in cells("manifest-run") and man["device_name"] in cells("manifest-run")
    assert len(p.tables["manifest-stages"]) == len(man["stage_seconds"]) + 2  # header + total
    assert "methods: [task_arithmetic, ties]" in page
    # every number is labelled with its split and the selection rule
    assert page.count("chosen on the average") >= 3 and "test split" in page.lower()
    # the selected-on-validation cells are marked
    marked = [t for row in p.tables["robustness-table"] for t, cls in row if "mark" in cls]
    assert len(marked) == len(results["merged"])


def test_html_escapes_strings_from_results(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    evil = '<img src=x onerror="alert(1)">'
    r["name"] = evil
    r["notes"] = ["a & b <script>alert(2)</script>"]
    r["manifest"]["platform"] = "</table><h1>pwn</h1>"
    page = render_html(r, {}, config_text="name: '<b>x</b>'")
    assert evil not in page and "<script>" not in page and "<h1>pwn" not in page and "<b>x</b>" not in page
    assert html_escaped(evil) in page and "a &amp; b &lt;script&gt;" in page
    assert "No data for this figure" in page  # missing figures are said, not silently dropped


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_html_survives_nan_and_missing_fields(results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    r["merged"][0]["avg_test"] = float("nan")
    r["merged"][0]["lambda"] = None
    for q in r["merged"][1]["curve"]:
        q["test"], q["avg_test"], q["avg_normalised_test"] = {}, float("nan"), float("nan")
    del r["manifest"]
    r["interference"] = {}
    figs = render_figures(r)
    assert all(figs[k] for k in ("normalised", "robustness", "single-task", "merge-cost"))
    assert figs["interference"] is None
    page = render_html(r, figs)
    assert "n/a" in page and "No interference diagnostics" in page


# --------------------------------------------------------------------------- write_report
def test_write_report_writes_both_files(run_dir: Path, results: dict[str, Any]) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    md = path.read_text(encoding="utf-8")
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for rec in results["merged"]:
        assert f"{rec['avg_test']:.1f}" in md and f"{rec['avg_test']:.1f}" in page
    assert md.startswith(f"# osrm-lora report: {results['name']}") and "λ chosen on the average validation" in md
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert sorted(x.name for x in run_dir.iterdir()) == ["config.yaml", "diagnostics", "report.html", "report.md",
                                                         "results.json"]


@pytest.mark.usefixtures("cached_figures")
def test_write_report_inlines_diagnostic_png_without_ratio(run_dir: Path, results: dict[str, Any]) -> None:
    r = copy.deepcopy(results)
    r["interference"] = {}
    (run_dir / "results.json").write_text(json.dumps(r))
    write_report(run_dir)
    page = (run_dir / "report.html").read_text()
    for init in results["single_task"]:
        png = (run_dir / "diagnostics" / init / "interference.png").read_bytes()
        assert "data:image/png;base64," + base64.b64encode(png).decode() in page
        assert f'id="fig-diagnostic-{init}"' in page


@pytest.mark.usefixtures("cached_figures")
def test_write_report_is_atomic(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (run_dir / "report.md").write_text("OLD md")
    (run_dir / "report.html").write_text("OLD html")

    def boom(*_a: Any, **_k: Any) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr("osrm_lora.report.writer.render_html", boom)
    with pytest.raises(RuntimeError):
        write_report(run_dir)
    assert (run_dir / "report.md").read_text() == "OLD md"
    assert (run_dir / "report.html").read_text() == "OLD html"

    # a failure while writing the second file (the HTML) keeps both old files and leaves no temporary file
    import osrm_lora.report.writer as writer

    real_html = render_html
    monkeypatch.setattr(writer, "render_html", lambda *a, **k: real_html(*a, **k) + "\udcff")  # unencodable
    with pytest.raises(UnicodeEncodeError):
        write_report(run_dir)
    assert (run_dir / "report.md").read_text() == "OLD md"
    assert (run_dir / "report.html").read_text() == "OLD html"
    assert not [x.name for x in run_dir.iterdir() if ".tmp" in x.name]


def test_write_report_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(OsrmError) as err:
        write_report(tmp_path)
    msg = str(err.value)
    assert "results.json" in msg and "osrm-lora run" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OsrmError, match="not a run directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "results.json").write_text(json.dumps({"name": "x", "tasks": ["a"]}))
    with pytest.raises(OsrmError, match="lacks single_task, merged") as err:
        write_report(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(OsrmError, match="not valid JSON"):
        write_report(tmp_path)
