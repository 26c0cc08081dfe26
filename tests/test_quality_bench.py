"""bench/quality.py's aggregation: per-init learning-rate choice on validation, lambda = 1 headline,
the where-merging-hurts targets, EMR kept out of the shared-model recommendation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from tinymodels import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality() -> Any:
    return load_script(ROOT / "bench" / "quality.py", "bench_quality")


def _single(val: float, test: float) -> dict[str, dict[str, float]]:
    return {"a": {"validation": val, "test": test}, "b": {"validation": val, "test": test}}


def _merged(init: str, method: str, val: float, test: float, norm: float, curve: list[tuple[float, float]]) -> dict:
    return {"init": init, "method": method, "avg_validation": val, "avg_test": test, "avg_normalised_test": norm,
            "lambda": 0.7, "curve": [{"lambda": lam, "avg_normalised_test": n} for lam, n in curve]}


def _results(seed: int, inits: dict[str, tuple[float, float]], merged: list[dict]) -> dict[str, Any]:
    return {"seed": seed, "single_task": {i: _single(v, t) for i, (v, t) in inits.items()}, "merged": merged}


def test_learning_rate_is_chosen_per_init_on_validation(quality: Any) -> None:
    parts = []
    for seed in (0, 1):
        # standard: lr 1e-3 wins on validation although its TEST score is lower
        parts.append({"seed": seed, "lr": 1e-3, "results": _results(seed, {"standard": (80.0, 70.0)}, [
            _merged("standard", "task_arithmetic", 75, 65, 92, [(0.5, 90), (1.0, 92)])])})
        parts.append({"seed": seed, "lr": 5e-4, "results": _results(seed, {"standard": (79.0, 90.0)}, [
            _merged("standard", "task_arithmetic", 74, 85, 94, [(0.5, 93), (1.0, 94)])])})
        parts.append({"seed": seed, "lr": 1e-3, "results": _results(seed, {"own": (78.0, 78.0)}, [
            _merged("own", "task_arithmetic", 77, 77, 99, [(0.5, 97), (1.0, 99)])])})
    runs, chosen = quality.select_lr(parts)
    assert chosen["standard"]["lr"] == 1e-3 and chosen["own"]["lr"] == 1e-3
    assert chosen["standard"]["seeds_by_lr"] == {"0.0005": 2, "0.001": 2}
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        assert r["single_task"]["standard"]["a"]["test"] == 70.0, "only the chosen rate's runs remain"
        assert sorted(m["init"] for m in r["merged"]) == ["own", "standard"]
    agg = quality.aggregate(runs, chosen)
    assert agg["configs"]["standard|task_arithmetic"]["lr"] == 1e-3
    assert agg["configs"]["own|task_arithmetic"]["norm_at_1"]["mean"] == 99


def test_curve_at_reads_the_plain_sum(quality: Any) -> None:
    curve = [{"lambda": 0.1, "avg_normalised_test": 50.0}, {"lambda": 1.0, "avg_normalised_test": 97.5}]
    assert quality.curve_at(curve, 1.0) == 97.5
    assert math.isnan(quality.curve_at(curve[:1], 1.0))


def test_targets_and_the_shared_model_recommendation(quality: Any) -> None:
    runs = [_results(s, {"standard": (84.0, 84.0), "own": (83.0, 83.8)}, [
        _merged("standard", "task_arithmetic", 79, 80, 95, [(1.0, 92)]),
        _merged("standard", "emr", 90, 84, 100, [(1.0, 99)]),  # best on validation, but per-task models
        _merged("own", "task_arithmetic", 83, 83, 99, [(1.0, 96)]),
    ]) for s in (0, 1, 2)]
    agg = quality.aggregate(runs)
    targets = quality.check_targets(agg)
    assert targets["recommended_on_validation"] == "own|task_arithmetic"
    t = targets["per_config"]["own|task_arithmetic"]
    assert t["standard_loses"] == pytest.approx(4.0)
    assert t["recovered_pct"] == pytest.approx(75.0)
    assert t["single_minus_standard"] == pytest.approx(-0.2)
    assert t["merged_minus_standard_emr"] == pytest.approx(-1.0)
    assert t["met"] == {name: ok for name, ok in zip(
        [n for n, *_ in quality.TARGETS], [True, True, True, True, False])}
    table = quality.targets_table(t)
    assert "| merged >= standard LoRA + EMR (per-task models) | -1.0 pts | missed | -1.0 pts |" in table
    md = quality.summary(agg, targets, "test setting", [0, 1, 2])
    assert "loses 4.0 points" in md and "emr (per-task models)" in md


def test_every_preset_plans_runs_that_cover_its_inits(quality: Any) -> None:
    for name, preset in quality.PRESETS.items():
        planned = {i for _, _, inits in quality.planned_runs(name, [0]) for i in inits}
        assert planned == {i["name"] for i in preset["config"]["inits"]}
        jobs = quality.planned_jobs(name, [0, 1])
        assert all(len(inits) == 1 for _, _, inits in jobs)
        assert len(jobs) == 2 * sum(len(preset.get("lr_grid", {}).get(i["name"], [0])) for i in preset["config"]["inits"])
        quality._config(name, 0)  # every preset is a valid pipeline config


def test_report_verdict_names_the_gain_per_method_and_the_noise() -> None:
    from osrm_lora.report.tables import verdict_lines

    results = {
        "seed": 3, "tasks": ["a", "b"], "subsampled": True,
        "inits": [{"name": "standard", "mode": "standard"}, {"name": "osrm-own", "mode": "own", "freeze_A": True},
                  {"name": "osrm-code", "mode": "code"}],
        "single_task": {i: {"a": {"test": 80.0, "n_test": 200}, "b": {"test": 70.0, "n_test": 50}}
                        for i in ("standard", "osrm-own", "osrm-code")},
        "merged": [
            {"init": "standard", "method": "ties", "avg_test": 70.0, "avg_validation": 71.0},
            {"init": "osrm-own", "method": "ties", "avg_test": 72.5, "avg_validation": 75.0},
            {"init": "osrm-code", "method": "ties", "avg_test": 74.0, "avg_validation": 73.0},  # better test, not chosen
        ],
    }
    lines = verdict_lines(results)
    assert lines[0].startswith("ties: OSRM osrm-own (own, A frozen) (best OSRM init on validation) merges to 72.5 "
                               "against 70.0 for standard LoRA (+2.5 points")
    assert "50 examples" in lines[1] and "2.0 points" in lines[1] and "subsampled" in lines[1]
    assert verdict_lines({**results, "inits": results["inits"][:1],
                          "merged": results["merged"][:1]}) == []


def test_gpu_family_preset_is_gpu_hard_with_two_inits_and_the_merge_searches(quality: Any) -> None:
    family, hard = quality.PRESETS["gpu-family"], quality.PRESETS["gpu-hard"]
    assert "ISSUE-15 FAMILY COMPARISON" in family["description"]
    assert family["seeds"] == [0, 1, 2]
    for key in ("model", "tasks", "lora", "train", "diagnose"):
        assert family["config"][key] == hard["config"][key], key
    assert family["config"]["merge"]["lambdas"] == hard["config"]["merge"]["lambdas"]
    assert quality.planned_jobs("gpu-family", [0, 1, 2]) == [
        (s, 1e-3, [i]) for i in ("standard", "own-frozenA") for s in (0, 1, 2)]
    cfg = quality._config("gpu-family", 1, ["own-frozenA"], 1e-3)
    assert [i.name for i in cfg.inits] == ["own-frozenA"] and cfg.inits[0].freeze_A and cfg.train.lr == 1e-3
    assert cfg.merge.methods == ["task_arithmetic", "ties", "ctm", "doge", "emr"]
    assert cfg.merge.rmm is not None and cfg.merge.search is not None
    assert cfg.merge.rmm.seed is None and cfg.merge.search.seed is None  # each part searches with its run's seed
    assert cfg.merge.search.rungs >= 2  # low fidelities on validation subsets
    assert cfg.merge.rmm.subset_size < 400


def test_plan_jobs_of_gpu_family(quality: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--preset", "gpu-family", "--plan-jobs"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{s} 0.001 {i}" for i in ("standard", "own-frozenA") for s in (0, 1, 2)]


def _searched(init: str, method: str, val: float, test: float, norm: float, used: float, secs: float) -> dict:
    """A results record of a merge search as the pipeline writes it: no lambda, no curve."""
    return {"init": init, "method": method, "avg_validation": val, "avg_test": test, "avg_normalised_test": norm,
            "lambda": None, "lambda_source": None, "curve": [], "evaluations_used": used, "search_seconds": secs}


def test_aggregation_includes_the_merge_searches(quality: Any) -> None:
    runs = [_results(s, {"standard": (84.0, 84.0)}, [
        _merged("standard", "task_arithmetic", 79, 80, 95, [(0.5, 94), (1.0, 92)]),
        _merged("standard", "emr", 83, 84, 100, [(1.0, 99)]),
        _searched("standard", "rmm", 82 + s, 81, 96.4, 200, 40.0 + s),
        _searched("standard", "search", 81, 80.5, 95.8, 24.2 - s / 10, 60.0),
    ]) for s in (0, 1, 2)]
    agg = quality.aggregate(runs)
    rmm = agg["configs"]["standard|rmm"]
    assert rmm["n_seeds"] == 3 and rmm["merged_val"]["mean"] == pytest.approx(83.0)
    assert rmm["evaluations_used"]["mean"] == 200 and rmm["search_seconds"]["mean"] == pytest.approx(41.0)
    assert math.isnan(rmm["norm_at_1"]["mean"]) and math.isnan(rmm["lambda"]["mean"])  # no lambda, no curve
    assert agg["configs"]["standard|search"]["evaluations_used"]["mean"] == pytest.approx(24.1)
    assert "evaluations_used" not in agg["configs"]["standard|task_arithmetic"]
    targets = quality.check_targets(agg)
    assert targets["recommended_on_validation"] == "standard|rmm"  # a shared model, chosen on validation
    assert not targets["per_config"]["standard|rmm"]["met"]["normalised at lambda = 1 >= 95%"]  # not measured
    md = quality.summary(agg, targets, "test setting", [0, 1, 2])
    assert "| standard | rmm (merge search) | 3 |" in md
    assert "| standard | search | 3 | 24.1 ± 0.1 | 60.0 ± 0.0 | 81.0 ± 0.0 | 80.5 ± 0.0 | 95.8 ± 0.0 |" in md


def _record(quality: Any, runs: list[dict[str, Any]], lrs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What main() writes into bench/results/quality_<preset>.json, for the fields --with-record reads."""
    return {"date": "2026-12-03 15:23 UTC", "command": "python bench/quality.py --preset cpu --aggregate-only",
            "results": {"aggregate": quality.aggregate(runs, lrs), "per_seed": runs}}


def test_a_written_record_joins_new_inits_without_its_runs(quality: Any) -> None:
    lr = {"lr": 1e-3, "validation_by_lr": {"0.001": 84.0}, "seeds_by_lr": {"0.001": 2}}
    old_runs = [_results(s, {"standard": (84.0, 84.0), "own": (80.0, 80.0)}, [
        _merged("standard", "task_arithmetic", 79, 80, 95, [(1.0, 92)]),
        _merged("own", "task_arithmetic", 70, 70, 90, [(1.0, 90)])]) for s in (0, 1)]
    record = _record(quality, old_runs, {"standard": lr, "own": lr})
    new_runs = [{**_results(s, {"own": (83.0, 83.8)}, [_merged("own", "task_arithmetic", 83, 83, 99, [(1.0, 96)])]),
                 "manifest": {"device": "cuda"}} for s in (0, 1)]
    old, old_lrs = quality.recorded_runs(record, {"own"})
    assert sorted(old_lrs) == ["standard"], "an init with new runs is never taken from the record"
    assert all(set(r["single_task"]) == {"standard"} for r in old)
    assert all(m["init"] == "standard" for r in old for m in r["merged"])
    runs = quality.combine_runs(new_runs, old)
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        assert set(r["single_task"]) == {"standard", "own"}
        assert r["single_task"]["own"]["a"]["test"] == 83.8, "the new run replaces the recorded one"
        assert sorted(m["init"] for m in r["merged"]) == ["own", "standard"]
        assert r["manifest"] == {"device": "cuda"}
    agg = quality.aggregate(runs, {**old_lrs, "own": lr})
    assert agg["configs"]["standard|task_arithmetic"]["merged_test"]["mean"] == 80
    assert agg["configs"]["own|task_arithmetic"]["merged_test"]["mean"] == 83
    assert quality.check_targets(agg)["per_config"]["own|task_arithmetic"]["standard_loses"] == pytest.approx(4.0)


def test_with_record_from_the_command_line(quality: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lr = {"lr": 2e-3, "validation_by_lr": {"0.002": 84.0}, "seeds_by_lr": {"0.002": 1}}
    old_runs = [_results(0, {"standard": (84.0, 84.0)}, [_merged("standard", "task_arithmetic", 79, 80, 95,
                                                                  [(1.0, 92)])])]
    out = tmp_path / "results"
    out.mkdir()
    (out / "quality_cpu.json").write_text(json.dumps(_record(quality, old_runs, {"standard": lr})))
    run = tmp_path / "runs" / "quality-cpu" / "seed0-lr0.002-own"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  lr: 0.002\n")
    (run / "results.json").write_text(json.dumps(_results(0, {"own": (83.0, 83.8)}, [
        _merged("own", "task_arithmetic", 83, 83, 99, [(1.0, 96)])])))
    argv = ["--preset", "cpu", "--seeds", "0", "--runs", str(tmp_path / "runs"), "--out", str(out), "--aggregate-only",
            "--no-write"]
    assert quality.main(argv + ["--with-record"]) == 0
    md = capsys.readouterr().out
    assert "| own | task_arithmetic |" in md and "| standard | task_arithmetic |" in md
    assert "Standard LoRA + Task Arithmetic loses 4.0 points" in md
    assert quality.main(argv) == 0
    assert "| standard | task_arithmetic |" not in capsys.readouterr().out, "without the flag only runs on disk count"
    (out / "quality_cpu.json").unlink()
    assert quality.main(argv + ["--with-record"]) == 1
