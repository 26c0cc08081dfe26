"""Tests of bench/benchlib.py: section rewriting, atomic result files, timing/memory helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import benchlib as bu
import pytest
import torch

from osrm_lora.errors import OsrmError


def _record(name: str = "merge_speed", preset: str = "cpu", value: float = 1.5) -> bu.BenchRecord:
    return bu.BenchRecord(name=name, preset=preset, command="python bench/x.py --preset cpu", seeds={"adapters": 7},
                          machine=bu.machine_info("cpu"), settings={"layers": 2}, results={"value": value},
                          summary_md=f"value = {value}", notes=["a note"])


def test_replace_section_keeps_other_sections() -> None:
    text = ("# Benchmarks\n\nintro by hand\n\n<!-- bench:a:cpu -->\nold A\n<!-- /bench:a:cpu -->\n\n"
            "between\n\n<!-- bench:b:cpu -->\nB stays\n<!-- /bench:b:cpu -->\ntail\n")
    new = bu.replace_section(text, "a:cpu", "new A\nline 2")
    assert bu.read_section(new, "a:cpu") == "new A\nline 2"
    assert bu.read_section(new, "b:cpu") == "B stays"
    # everything outside section a is byte-identical
    i, j = text.index("<!-- bench:a:cpu -->"), text.index("<!-- /bench:a:cpu -->") + len("<!-- /bench:a:cpu -->")
    k, m = new.index("<!-- bench:a:cpu -->"), new.index("<!-- /bench:a:cpu -->") + len("<!-- /bench:a:cpu -->")
    assert new[:k] == text[:i] and new[m:] == text[j:]
    # idempotent
    assert bu.replace_section(new, "a:cpu", "new A\nline 2") == new


def test_replace_section_appends_and_creates_header() -> None:
    first = bu.replace_section("", "x:cpu", "body x")
    assert first.startswith("# Benchmarks")
    both = bu.replace_section(first, "y:h100", "body y")
    assert bu.read_section(both, "x:cpu") == "body x"
    assert bu.read_section(both, "y:h100") == "body y"
    assert both.index("bench:x:cpu") < both.index("bench:y:h100")


def test_replace_section_prefix_keys_do_not_collide() -> None:
    text = bu.replace_section(bu.replace_section("", "merge_speed:cpu", "one"), "merge_speed:cpu2", "two")
    text = bu.replace_section(text, "merge_speed:cpu", "ONE")
    assert bu.read_section(text, "merge_speed:cpu") == "ONE"
    assert bu.read_section(text, "merge_speed:cpu2") == "two"


def test_replace_section_rejects_broken_markers_and_bad_keys() -> None:
    with pytest.raises(OsrmError, match="without"):
        bu.replace_section("<!-- bench:a:cpu -->\nno end\n", "a:cpu", "x")
    with pytest.raises(OsrmError, match="twice"):
        bu.replace_section("<!-- bench:a:cpu -->\n<!-- /bench:a:cpu -->\n<!-- bench:a:cpu -->\n", "a:cpu", "x")
    with pytest.raises(OsrmError, match="key"):
        bu.replace_section("", "bad key -->", "x")


def test_write_results_json_and_section(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- bench:quality:cpu -->\nquality table\n"
                  "<!-- /bench:quality:cpu -->\n", encoding="utf-8")
    out = tmp_path / "results"
    jpath, mpath = bu.write_results(_record(value=1.5), out, benchmarks_md=md)
    data = json.loads(jpath.read_text())
    assert jpath.name == "merge_speed_cpu.json" and data["results"] == {"value": 1.5} and data["key"] == "merge_speed:cpu"
    assert data["seeds"] == {"adapters": 7}
    text = mpath.read_text()
    assert "hand-written intro" in text and bu.read_section(text, "quality:cpu") == "quality table"
    body = bu.read_section(text, "merge_speed:cpu")
    assert body is not None
    assert "value = 1.5" in body and "python bench/x.py --preset cpu" in body and "adapters=7" in body
    assert "results/merge_speed_cpu.json" in body and "a note" in body
    # rewrite: section replaced, not duplicated; other section intact
    bu.write_results(_record(value=2.5), out, benchmarks_md=md)
    text = md.read_text()
    assert text.count("<!-- bench:merge_speed:cpu -->") == 1
    assert "value = 2.5" in text and "value = 1.5" not in text
    assert bu.read_section(text, "quality:cpu") == "quality table"
    assert json.loads(jpath.read_text())["results"] == {"value": 2.5}
    # no temporary files left behind
    assert not [p for p in tmp_path.rglob(".*tmp*")]


def test_write_results_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = tmp_path / "BENCHMARKS.md"
    out = tmp_path / "results"
    bu.write_results(_record(value=1.0), out, benchmarks_md=md)
    before_json = (out / "merge_speed_cpu.json").read_bytes()
    before_md = md.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OsrmError):
        bu.write_results(_record(value=9.0), out, benchmarks_md=md)
    assert (out / "merge_speed_cpu.json").read_bytes() == before_json
    assert md.read_bytes() == before_md
    assert sorted(p.name for p in out.iterdir()) == ["merge_speed_cpu.json"]


def test_unserialisable_results_touch_nothing(tmp_path: Path) -> None:
    rec = _record()
    rec.results = {"bad": object()}
    with pytest.raises(TypeError):
        bu.write_results(rec, tmp_path / "r", benchmarks_md=tmp_path / "B.md")
    assert not (tmp_path / "B.md").exists() and not (tmp_path / "r").exists()


def test_time_call_counts_calls_and_keeps_last_result() -> None:
    calls = []

    def fn() -> int:
        calls.append(1)
        return len(calls)

    timing, peak, res = bu.time_call(fn, warmup=2, repeats=3, keep_result=True)
    assert len(calls) == 6 and res == 6  # + one untimed call for the CPU peak memory
    assert len(timing.times) == 3 and timing.best <= timing.median
    assert peak is not None and peak.bytes >= 0
    _, _, res = bu.time_call(fn, warmup=0, repeats=1, measure_memory=False)
    assert res is None
    with pytest.raises(OsrmError):
        bu.time_call(fn, repeats=0)


def test_measure_peak_sees_a_large_cpu_allocation() -> None:
    torch.manual_seed(0)

    def alloc() -> float:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        s = float(x.sum())
        import time

        time.sleep(0.05)
        return s

    peak, res = bu.measure_peak(alloc)
    assert res == 64 * 2**20 // 4
    assert peak.bytes > 32 * 2**20


def test_markdown_table_and_formatting() -> None:
    table = bu.markdown_table(["a", "b"], [[1, "x|y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    assert bu.fmt_seconds(0.0123) == "12.30 ms" and bu.fmt_seconds(1.5) == "1.5 s" and bu.fmt_seconds(None) == "-"
    assert bu.fmt_bytes(3 * 2**30) == "3.00 GiB"


def test_machine_info_and_pick_device() -> None:
    info = bu.machine_info("cpu")
    assert info["torch"] == torch.__version__ and info["cpu_cores_usable"] >= 1
    assert "CPU" in bu.describe_machine(info)
    assert bu.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(OsrmError, match="GPU"):
            bu.pick_device("cuda")


def test_bandwidth_positive() -> None:
    bw = bu.measure_bandwidth("cpu", nbytes=1 << 22, repeats=2)
    assert bw["bytes_per_s"] > 0 and bw["copy_bytes"] == 1 << 22
