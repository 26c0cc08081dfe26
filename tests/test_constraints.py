"""Constraint-aware merging: tasks whose validation score must not drop.

The floors select each method's lambda on validation, AdaMerging optimises a penalty on the
constraint tasks' validation loss, and every merge record says whether its constraints hold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from osrm_lora import search
from osrm_lora.adapters import LoraAdapter, LoraModule
from osrm_lora.config import parse_config
from osrm_lora.constraints import Constraint, check_constraint_tasks, shortfalls
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.merge import MergeContext, merge
from osrm_lora.merged_eval import sweep
from osrm_lora.pipeline import check_run, run_pipeline

# ------------------------------------------------------------------------------------------ pure parts


def test_one_constraint_type_shared_by_search_rmm_and_the_pipeline() -> None:
    assert search.Constraint is Constraint
    floors = {c.text(): c.resolve({"a": 80.0, "b": 60.0}) for c in (Constraint.parse("a>=single-2"),
                                                                      Constraint.parse("b>=65"))}
    assert floors == {"a>=single-2": 78.0, "b>=65": 65.0}
    parsed = [Constraint.parse("a>=single-2"), Constraint.parse("b>=65")]
    assert shortfalls(parsed, floors, {"a": 79.0, "b": 61.0}) == [-1.0, 4.0]
    with pytest.raises(OsrmError, match="'c' is not one of the merged tasks"):
        check_constraint_tasks([Constraint.parse("c>=1")], ["a", "b"])


class _Slot:
    def __init__(self, name: str) -> None:
        self.task = type("T", (), {"name": name})()


class _Evaluator:
    """Scores per lambda, as a real evaluator would give them for the merge at that lambda."""

    def __init__(self, scores: dict[float, dict[str, float]]) -> None:
        self.slots = [_Slot("a"), _Slot("b")]
        self.scores = scores

    def evaluate(self, deltas_for: Any, split: str, per_task: bool = False) -> dict[str, float]:
        return dict(self.scores[deltas_for.lam])


class _Result:
    def __init__(self, lam: float) -> None:
        self.lam = lam
        self.deltas_for = self  # the stub evaluator reads the lambda back from it
        self.per_task_deltas = None


def test_sweep_keeps_the_best_feasible_lambda_and_falls_back_to_the_best() -> None:
    scores = {0.5: {"a": 70.0, "b": 70.0}, 1.0: {"a": 90.0, "b": 60.0}, 1.5: {"a": 70.0, "b": 75.0}}
    ev = _Evaluator(scores)
    _, _, plain = sweep(ev, _Result, [0.5, 1.0, 1.5])  # type: ignore[arg-type]
    assert plain.lam == 1.0  # best average
    _, _, kept = sweep(ev, _Result, [0.5, 1.0, 1.5], feasible=lambda s: s["b"] >= 65)  # type: ignore[arg-type]
    assert kept.lam == 1.5  # 1.0 is best on average but drops b below its floor
    _, _, none = sweep(ev, _Result, [0.5, 1.0, 1.5], feasible=lambda s: s["b"] >= 99)  # type: ignore[arg-type]
    assert none.lam == 1.0  # no lambda is feasible: the best overall


# ------------------------------------------------------------------------------------- AdaMerging


def _adapters() -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(5)
    return [LoraAdapter({"m": LoraModule(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.0)},
                        {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, name=f"t{i}") for i in range(2)]


def test_adamerging_constraint_penalty_keeps_the_constrained_task() -> None:
    ads = _adapters()
    target = ads[1].modules["m"].delta()

    def entropy(deltas: dict[str, torch.Tensor]) -> torch.Tensor:  # pulls every coefficient to 0
        return deltas["m"].square().sum()

    def penalty(deltas: dict[str, torch.Tensor]) -> torch.Tensor:  # task 1 served as by its own adapter
        return torch.relu((deltas["m"] - target).square().sum() - 1e-6)

    params = {"mode": "task", "steps": 300, "lr": 0.05, "init": 0.5}
    free = merge(ads, "adamerging", params, context=MergeContext(entropy_fn=entropy))
    held = merge(ads, "adamerging", {**params, "constraint_weight": 10.0},
                 context=MergeContext(entropy_fn=entropy, constraint_fn=penalty))
    off = merge(ads, "adamerging", {**params, "constraint_weight": 0.0},
                context=MergeContext(entropy_fn=entropy, constraint_fn=penalty))
    assert max(free.info["coefficients"][1]) < 0.05  # entropy alone drops task 1
    assert held.info["coefficients"][1][0] > 0.8  # the penalty keeps it
    assert held.info["constraint_penalty_last"] < held.info["constraint_penalty_first"]
    assert off.info["coefficients"] == free.info["coefficients"] and "constraint_penalty_last" not in off.info


# ------------------------------------------------------------------------------------ through the pipeline


def _raw(tiny_bert: Path, root: Path, constraints: list[str]) -> dict[str, Any]:
    from tinymodels import write_keyword_tasks

    tasks = write_keyword_tasks(root, [("colours", ["red", "green", "blue"], 1), ("polar", ["good", "bad"], 2)], n=40)
    return {"name": "constrained", "model": str(tiny_bert), "tasks": tasks, "seed": 0, "device": "cpu",
            "lora": {"rank": 2, "alpha": 4}, "inits": ["standard"], "diagnose": False,
            "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "max_length": 12, "eval_batch_size": 64},
            "profile": {"n_samples": 8, "batch_size": 8},
            "merge": {"methods": ["task_arithmetic", "adamerging"], "lambdas": [0.5, 1.0],
                      "params": {"adamerging": {"steps": 2}}, "constraints": constraints}}


def test_pipeline_records_constraints_and_warns_when_none_is_met(tiny_bert: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    raw = _raw(tiny_bert, tmp_path, ["colours>=single-100", "polar>=101"])
    with caplog.at_level(logging.WARNING, logger="osrm_lora.pipeline"):
        results = run_pipeline(parse_config(raw), tmp_path / "run")
    for rec in results["merged"]:
        by = {c["constraint"]: c for c in rec["constraints"]}
        assert set(by) == {"colours>=single-100", "polar>=101"}
        assert by["colours>=single-100"]["met_on_validation"] and not by["polar>=101"]["met_on_validation"]
        assert rec["constraints_met"] is False
        assert by["polar>=101"]["validation"] == rec["validation"]["polar"]
        single = results["single_task"]["standard"]["colours"]["validation"]
        assert by["colours>=single-100"]["floor"] == pytest.approx(single - 100)
    assert any("no lambda meets the constraints" in r.getMessage() for r in caplog.records)
    ada = next(r for r in results["merged"] if r["method"] == "adamerging")
    info = (tmp_path / "run" / "merges" / "standard" / "adamerging" / "merge_info.json").read_text()
    assert "constraint_penalty_last" in info, ada


def test_bad_constraints_are_config_errors(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid"):
        parse_config(_raw(tiny_bert, tmp_path, ["colours=>80"]))
    cfg = parse_config(_raw(tiny_bert, tmp_path, ["nosuchtask>=50"]))
    with pytest.raises(ConfigError, match="'nosuchtask' is not one of the merged tasks"):
        check_run(cfg)
    with pytest.raises(ConfigError, match="fix merge.constraints"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "adapters").exists()  # refused before training
