"""bench/pipeline_speed.py's pure parts: presets as valid pipeline configs, the examples/s arithmetic,
manifests -> table rows, the Targets status logic. No timing is asserted and nothing is trained."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from tinymodels import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ps() -> Any:
    return load_script(ROOT / "bench" / "pipeline_speed.py", "bench_pipeline_speed")


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu", "gpu-all-linear"])
def test_presets_resolve_to_valid_pipeline_configs(ps: Any, preset: str) -> None:
    per = ps.preset_config(preset, "per-adapter")
    batched = ps.preset_config(preset, "batched")
    peft = ps.preset_config(preset, "peft")
    assert per.train.batched is False and peft.train.batched is False and batched.train.batched is True
    # the three paths share everything but the batched flag (and the run name)
    def strip(c: Any) -> dict[str, Any]:
        return {**c.model_dump(mode="json"), "name": None, "train": {**c.train.model_dump(), "batched": None}}

    assert strip(per) == strip(batched) == strip(peft)
    assert len(per.tasks) >= 2 and len(per.inits) >= 2


def test_gpu_presets_follow_quality_and_the_issue(ps: Any) -> None:
    import quality

    gpu = ps.preset_config("gpu", "batched")
    qgpu = quality.PRESETS["gpu"]["config"]
    assert [t.name for t in gpu.tasks] == [t["name"] for t in qgpu["tasks"]]
    assert all(t.max_train == 1000 for t in gpu.tasks)
    assert gpu.train.epochs == qgpu["train"]["epochs"] and gpu.train.max_length == qgpu["train"]["max_length"]
    assert len(gpu.tasks) == 6 and len(gpu.inits) == 4 and len(gpu.merge.methods) == 4  # 6 tasks x 4 inits x 4 methods
    assert {"standard", "osrm-own-frozenA"} <= {i.name for i in gpu.inits}
    assert {"task_arithmetic", "ties", "emr"} <= set(gpu.merge.methods)
    lin = ps.preset_config("gpu-all-linear", "per-adapter")
    assert lin.lora.rank == 16 and lin.lora.target_modules == list(quality.ALL_LINEAR)
    assert gpu.lora.target_modules is None and gpu.lora.rank == 8
    cpu = ps.preset_config("cpu", "per-adapter")
    assert cpu.device == "cpu" and len(cpu.tasks) == 2 and "REDUCED" in ps.PRESETS["cpu"]["description"]


def test_parse_paths(ps: Any) -> None:
    assert ps.parse_paths("batched,per-adapter,batched") == ["batched", "per-adapter"]
    with pytest.raises(ValueError):
        ps.parse_paths("batched,trainer")
    with pytest.raises(KeyError):
        ps.preset_raw("cpu", "nope")


def test_examples_arithmetic(ps: Any) -> None:
    n_train = {"a": 100, "b": 50}
    inits = [{"name": "standard"}, {"name": "lori", "b_sparsity": 0.9, "calibration_epochs": 2}]
    assert ps.adapter_epochs(inits[0], 3) == 3 and ps.adapter_epochs(inits[1], 3) == 5
    assert ps.train_examples(n_train, inits, 3) == 150 * 3 + 150 * 5
    tasks = {"a": {"n_validation": 10, "n_test": 20}, "b": {"n_validation": 5, "n_test": 5}}
    merged = [{"n_points": 8}, {"curve": [{}, {}]}]
    assert ps.merge_eval_examples(merged, tasks) == (8 + 2) * 40
    assert ps.rate(1000, 4.0) == 250.0
    assert ps.rate(1000, 0.0) is None and ps.rate(None, 1.0) is None
    assert ps.stage_groups({"profile": 1.0, "train/s/a": 2.0, "train/s/b": 3.0, "merge/s/ta": 4.0}) == {
        "profile": 1.0, "train": 5.0, "merge": 4.0}


def test_util_stats_windows(ps: Any) -> None:
    samples = [[0.0, 10.0], [1.0, 80.0], [2.0, 60.0], [3.0, 5.0]]
    inside = ps.util_stats(samples, [[0.5, 2.5]])
    assert inside == {"mean": 70.0, "median": 70.0, "max": 80.0, "n": 2}
    assert ps.util_stats(samples)["n"] == 4
    assert ps.util_stats(None) is None  # CPU: null, not 0
    assert ps.util_stats(samples, [[10.0, 11.0]])["mean"] is None


def _manifest(n_train: int = 100) -> dict[str, Any]:
    return {"stage_seconds": {"profile": 1.0, "train/standard/a": 4.0, "train/standard/b": 4.0,
                              "merge/standard/task_arithmetic": 2.0},
            "wall_seconds": 12.5, "stages_cached": [],
            "tasks": {"a": {"n_train": n_train, "n_validation": 10, "n_test": 10},
                      "b": {"n_train": n_train, "n_validation": 10, "n_test": 10}}}


def _measure(path: str, tests: tuple[float, float], wall: float = 12.0, train_wall: float | None = 8.5,
             samples: list | None = None) -> dict[str, Any]:
    return {"path": path, "wall_s": wall, "train_wall_s": train_wall, "train_window": [1.0, 9.5],
            "util_samples": samples, "manifest": _manifest(), "inits": [{"name": "standard"}], "epochs": 2,
            "single_task": {"standard": {"a": {"validation": 0, "test": tests[0]},
                                         "b": {"validation": 0, "test": tests[1]}}},
            "merged": [{"init": "standard", "method": "task_arithmetic", "n_points": 3}]}


def test_manifest_to_row(ps: Any) -> None:
    row = ps.pipeline_row(_measure("batched", (80.0, 90.0), samples=[[0.5, 99.0], [2.0, 60.0], [9.0, 40.0]]))
    assert row["stages_s"] == {"profile": 1.0, "train": 8.0, "merge": 2.0}
    assert row["train_examples"] == 2 * 100 * 2
    assert row["train_examples_per_s"] == pytest.approx(400 / 8.5)  # the measured train-stage wall
    assert row["merge_eval_examples"] == 3 * 40 and row["merge_eval_examples_per_s"] == pytest.approx(60.0)
    assert row["util_train"]["mean"] == 50.0 and row["util_train"]["n"] == 2  # samples outside training left out
    assert row["other_s"] == pytest.approx(1.0) and row["single_task_test_avg"] == 85.0
    # without the wrapper's measurement the manifest's train stage sum is used
    assert ps.pipeline_row(_measure("batched", (1, 1), train_wall=None))["train_examples_per_s"] == pytest.approx(50.0)
    peft = ps.peft_row({"tasks": [{"n_train": 100, "epochs": 2, "train_s": 4.0, "load_s": 1.0},
                                  {"n_train": 50, "epochs": 2, "train_s": 1.0, "load_s": 1.0}],
                        "windows": [[0, 4], [5, 6]], "util_samples": None})
    assert peft["train_examples"] == 300 and peft["train_examples_per_s"] == 60.0 and peft["util_train"] is None


def test_parity(ps: Any) -> None:
    a = {"standard": {"x": {"test": 80.0}, "y": {"test": 90.0}}, "own": {"x": {"test": 70.0}, "y": {"test": 70.0}}}
    b = {"standard": {"x": {"test": 80.5}, "y": {"test": 89.9}}, "own": {"x": {"test": 70.0}, "y": {"test": 70.4}}}
    p = ps.parity(a, b)
    assert p["per_init"]["standard"]["diff"] == pytest.approx(0.2)
    assert p["per_init"]["own"]["diff"] == pytest.approx(0.2)
    assert p["overall"]["diff"] == pytest.approx(0.2)
    assert p["max_abs_diff"] == pytest.approx(0.2) and p["max_abs_adapter_diff"] == pytest.approx(0.5)


def _rows(ps: Any, *, e2e: float, rate: float, peft_rate: float | None, util: float | None) -> dict[str, Any]:
    rows = {"per-adapter": {"end_to_end_s": e2e * 2, "train_examples_per_s": rate / 3, "util_train": None},
            "batched": {"end_to_end_s": e2e, "train_examples_per_s": rate,
                        "util_train": None if util is None else {"mean": util, "median": util, "max": util, "n": 9}}}
    if peft_rate is not None:
        rows["peft"] = {"train_examples_per_s": peft_rate}
    return rows


def test_targets_on_cpu_mark_gpu_targets_not_measured(ps: Any) -> None:
    rows = _rows(ps, e2e=100.0, rate=50.0, peft_rate=40.0, util=None)
    t = ps.compute_targets("cpu", "cpu", "x86_64", rows, {"max_abs_diff": 0.1})
    status = [x["status"] for x in t]
    assert status[:4] == ["not measured (CPU)"] * 4
    assert status[4] == "met" and t[4]["margin"] == pytest.approx(0.2)
    assert t[2]["value"] == pytest.approx(1.25)  # the CPU ratio is kept for information
    md = ps.targets_table(t)
    assert md.splitlines()[0].startswith("| target | value | status | margin")


def test_targets_on_an_h200(ps: Any) -> None:
    rows = _rows(ps, e2e=45.0, rate=6000.0, peft_rate=1500.0, util=40.0)
    t = {x["target"].split(" ")[0] + str(i): x for i, x in enumerate(
        ps.compute_targets("gpu", "cuda", "NVIDIA H200", rows, {"max_abs_diff": 0.5}))}
    e2e, rate, ratio, util, par = t.values()
    assert e2e["status"] == "met" and e2e["margin"] == pytest.approx(15.0)
    assert rate["status"] == "met" and rate["margin"] == pytest.approx(1000.0)
    assert ratio["status"] == "missed" and ratio["value"] == pytest.approx(4.0) and ratio["margin"] == pytest.approx(-1.0)
    assert util["status"] == "missed" and util["margin"] == pytest.approx(-10.0)
    assert par["status"] == "missed" and par["margin"] == pytest.approx(-0.2)
    assert "(batched)" in e2e["shown"]  # the speed targets are read on the batched path
    # the end-to-end target is the gpu preset's on one H200
    other = ps.compute_targets("gpu-all-linear", "cuda", "NVIDIA H200", rows, None)
    assert other[0]["status"].startswith("not measured") and other[0]["value"] == 45.0
    assert ps.compute_targets("gpu", "cuda", "NVIDIA H100", rows, None)[0]["status"].startswith("not measured")
    # without the peft path (or the pair for parity) those rows are not measured, never met
    rows.pop("peft")
    t2 = ps.compute_targets("gpu", "cuda", "NVIDIA H200", rows, None)
    assert t2[2]["status"] == "not measured (peft path not run)"
    assert t2[4]["status"].startswith("not measured")
    # only the per-adapter path: the speed targets fall back to it
    only = {"per-adapter": rows["per-adapter"]}
    assert "(per-adapter)" in ps.compute_targets("gpu", "cuda", "NVIDIA H200", only, None)[0]["shown"]
    assert not math.isnan(ps.compute_targets("gpu", "cuda", "NVIDIA H200", only, None)[0]["value"])


def test_summary_has_paths_and_targets(ps: Any) -> None:
    ms = {"per-adapter": _measure("per-adapter", (80.0, 90.0)), "batched": _measure("batched", (80.2, 90.0))}
    rows = {p: ps.pipeline_row(m) for p, m in ms.items()}
    rows["peft"] = ps.peft_row({"tasks": [{"n_train": 100, "epochs": 2, "train_s": 4.0, "load_s": 1.0}],
                                "windows": [[0, 4]], "util_samples": None})
    par = ps.parity(ms["per-adapter"]["single_task"], ms["batched"]["single_task"])
    targets = ps.compute_targets("cpu", "cpu", None, rows, par)
    md = ps.summary("cpu", rows, par, targets)
    assert "REDUCED" in md and "Targets:" in md and "null (CPU)" in md
    assert "(c) plain PEFT + Trainer" in md and "| all | 85.00 | 85.10 | +0.10 |" in md
    assert md.rstrip().splitlines()[-1].startswith("| batched single-task scores within 0.3 points")
