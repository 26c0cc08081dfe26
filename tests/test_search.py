"""Multi-fidelity merge search and the leave-one-out diagnostic, on a tiny BERT with three keyword tasks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodels import KEYWORD_TASKS, trained_keyword_adapters

from osrm_lora.adapters import LoraAdapter, load_adapter
from osrm_lora.cli import main
from osrm_lora.diagnose import interference_ranking, leave_one_out
from osrm_lora.errors import OsrmError
from osrm_lora.merged_eval import MergedEvaluator
from osrm_lora.search import (
    Constraint,
    SearchBudget,
    config_deltas,
    fidelity_fractions,
    layer_groups,
    pareto_front,
    search_merge,
    sha_promotable,
)

TASKS = KEYWORD_TASKS


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three adapters (rank 2) trained on local keyword tasks; a MergedEvaluator over them."""
    return trained_keyword_adapters(tiny_bert, tmp_path_factory.mktemp("search"), TASKS)


@pytest.fixture()
def calls(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every split the evaluator scores, in order."""
    ev: MergedEvaluator = trained["evaluator"]
    seen: list[str] = []
    original = MergedEvaluator.evaluate

    def spy(deltas_for: Any, split: str, per_task: bool = False) -> dict[str, float]:
        seen.append(split)
        return original(ev, deltas_for, split, per_task)

    monkeypatch.setattr(ev, "evaluate", spy)
    yield seen


def _search(trained: dict[str, Any], out: Path, trials: int, **kw: Any) -> dict[str, Any]:
    return search_merge(trained["dirs"], out, evaluator=trained["evaluator"], model_path=trained["model"],
                        budget=SearchBudget(evaluations=None, trials=trials), seed=0, **kw)


@pytest.fixture(scope="module")
def searched(trained: dict[str, Any]) -> dict[str, Any]:
    """An unconstrained search of 10 trials (all within TPE's random start-up, so a constrained
    search with the same seed draws the same configurations), with the splits it scored."""
    ev: MergedEvaluator = trained["evaluator"]
    seen: list[str] = []
    original = MergedEvaluator.evaluate

    def spy(deltas_for: Any, split: str, per_task: bool = False) -> dict[str, float]:
        seen.append(split)
        return original(ev, deltas_for, split, per_task)

    mp = pytest.MonkeyPatch()
    mp.setattr(ev, "evaluate", spy)
    try:
        out = trained["root"] / "search-main"
        record = _search(trained, out, 10)
    finally:
        mp.undo()
    return {"out": out, "record": record, "calls": seen}


# ---------------------------------------------------------------------------------------------- units
def test_layer_groups_split_contiguous_layers_and_keep_the_rest_apart() -> None:
    keys = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(5) for m in ("query", "value")] + ["bert.pooler.dense"]
    groups = layer_groups(keys, 2)
    assert [g.layers for g in groups] == [("bert.encoder.layer.0", "bert.encoder.layer.1"),
                                          ("bert.encoder.layer.2", "bert.encoder.layer.3", "bert.encoder.layer.4"), ()]
    assert groups[-1].modules == ("bert.pooler.dense",)
    assert sorted(k for g in groups for k in g.modules) == sorted(keys)
    assert len(layer_groups(keys, None)) == 6 and len(layer_groups(keys, 99)) == 6
    t5 = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.0.SelfAttention.q",
          "decoder.block.0.layer.0.SelfAttention.q"]
    assert [g.layers for g in layer_groups(t5, None)] == [("encoder.block.0",), ("encoder.block.1",), ("decoder.block.0",)]
    with pytest.raises(OsrmError, match="layer groups"):
        layer_groups(keys, 0)


def test_constraint_parsing() -> None:
    assert Constraint.parse("mr>=80") == Constraint("mr", floor=80.0)
    assert Constraint.parse("glue/cola >= single-2.5") == Constraint("glue/cola", tolerance=2.5)
    assert Constraint.parse("mr>=single").resolve({"mr": 70.0}) == 70.0
    assert Constraint.parse("mr>=single-2").resolve({"mr": 70.0}) == 68.0
    for bad in ("mr", "mr>=x", "mr>=single+2", ">=3"):
        with pytest.raises(OsrmError, match="not valid"):
            Constraint.parse(bad)


def test_fidelities_halving_and_pareto_front() -> None:
    assert fidelity_fractions(3, 3) == pytest.approx([1 / 9, 1 / 3, 1.0])
    assert fidelity_fractions(1, 2) == [1.0]
    assert sha_promotable(5.0, [5.0], 3) and not sha_promotable(4.0, [5.0, 4.0], 3)
    assert sha_promotable(6.0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3) and not sha_promotable(4.0, [1, 2, 3, 4, 5, 6], 3)
    assert sorted(pareto_front({0: [1, 2], 1: [2, 1], 2: [1, 1], 3: [2, 2]})) == [3]
    assert sorted(pareto_front({0: [1, 2], 1: [2, 1], 2: [1, 1]})) == [0, 1]


# ---------------------------------------------------------------------------------------------- search
def test_search_prunes_at_low_fidelity_and_writes_the_best_merge(trained: dict[str, Any],
                                                                 searched: dict[str, Any]) -> None:
    record, out = searched["record"], searched["out"]
    states = [t["state"] for t in record["trials"]]
    assert len(states) == 10 and "pruned" in states and "complete" in states
    for t in record["trials"]:  # a pruned trial stopped before the whole validation split
        assert len(t["fidelities"]) == (3 if t["state"] == "complete" else len(t["fidelities"]))
        if t["state"] == "pruned":
            assert len(t["fidelities"]) < 3 and t["validation"] is None
    assert record["fidelities"][0]["examples"]["colours"] < record["fidelities"][-1]["examples"]["colours"]
    best = record["best"]
    complete = [t for t in record["trials"] if t["state"] == "complete"]
    assert best["avg_validation"] == max(t["avg_validation"] for t in complete)
    assert set(best["test"]) == set(trained["tasks"])
    assert record["budget"]["used"]["trials"] == 10
    assert record["budget"]["used"]["evaluations"] == pytest.approx(sum(t["cost"] for t in record["trials"]))
    assert json.loads((out / "search.json").read_text())["best"]["trial"] == best["trial"]
    assert (out / "search.db").exists()
    info = json.loads((out / "merged" / "merge_info.json").read_text())
    assert info["method"] == "search" and info["params"]["groups"] == best["config"]["groups"]
    assert "osrm-lora search" in (out / "merged" / "README.md").read_text()
    saved = load_adapter(out / "merged").deltas()
    want = config_deltas(trained["adapters"], layer_groups(list(trained["adapters"][0].modules), 4), best["config"])
    for key, d in want.items():
        assert torch.linalg.norm(saved[key] - d) <= 1e-3 * max(float(torch.linalg.norm(d)), 1e-12) + 1e-6


def test_search_never_scores_test_before_the_end(searched: dict[str, Any]) -> None:
    seen = searched["calls"]
    assert seen.count("test") == 1 and seen[-1] == "test"
    assert all(s.startswith("validation") for s in seen[:-1])
    assert "validation@0" in seen


def test_search_resumes_from_its_storage_without_redoing_trials(trained: dict[str, Any], calls: list[str],
                                                                tmp_path: Path) -> None:
    first = _search(trained, tmp_path / "s", 4)
    n_first = calls.count("validation@0")
    assert n_first == 4
    second = _search(trained, tmp_path / "s", 7)
    assert calls.count("validation@0") - n_first == 3  # only the 3 new trials were evaluated
    assert len(second["trials"]) == 7
    for a, b in zip(first["trials"], second["trials"][:4]):
        assert a["params"] == b["params"] and a["fidelities"] == b["fidelities"] and a["state"] == b["state"]
    again = _search(trained, tmp_path / "s", 7)  # budget spent: no new trial, the same choice
    assert calls.count("validation@0") - n_first == 3 and again["best"]["trial"] == second["best"]["trial"]
    with pytest.raises(OsrmError, match="other settings .*methods"):
        _search(trained, tmp_path / "s", 8, methods=["ties"])
    fresh = _search(trained, tmp_path / "s", 2, methods=["ties"], overwrite=True)
    assert len(fresh["trials"]) == 2


def test_an_infeasible_region_is_never_chosen(trained: dict[str, Any], searched: dict[str, Any], tmp_path: Path) -> None:
    free = searched["record"]
    best = free["best"]
    complete = [t for t in free["trials"] if t["state"] == "complete"]
    # a floor on one task that the unconstrained choice misses and another configuration meets
    task, other = next((task, t) for task in trained["tasks"] for t in complete
                       if t["validation"][task] > best["validation"][task])
    floor = (best["validation"][task] + other["validation"][task]) / 2
    record = _search(trained, tmp_path / "c", 10, constraints=[f"{task}>={floor}"])
    chosen = record["best"]
    assert chosen["validation"][task] >= floor
    trials = {t["trial"]: t for t in record["trials"]}
    assert trials[chosen["trial"]]["feasible"]
    assert trials[best["trial"]]["params"] == best["params"] and not trials[best["trial"]]["feasible"]
    assert trials[best["trial"]]["avg_validation"] > chosen["avg_validation"]  # the better one was infeasible
    assert trials[best["trial"]]["objective"] == [pytest.approx(best["avg_validation"])]  # TPE: not penalised
    assert all(t["feasible"] == (t["constraint_violation"][0] <= 0) for t in record["trials"])
    assert record["constraints"] == [{"constraint": f"{task}>={floor:g}", "floor": pytest.approx(floor)}]


def test_evaluation_budget_stops_the_search(trained: dict[str, Any], tmp_path: Path) -> None:
    record = search_merge(trained["dirs"], tmp_path / "b", evaluator=trained["evaluator"], model_path=trained["model"],
                          budget=SearchBudget(evaluations=3.0), seed=0)
    used = record["budget"]["used"]["evaluations"]
    last = record["trials"][-1]["cost"]
    assert used >= 3.0 and used - last < 3.0  # stopped by the trial that spent the budget


def test_random_sampler_penalises_infeasible_trials(trained: dict[str, Any], searched: dict[str, Any],
                                                    tmp_path: Path) -> None:
    complete = [t for t in searched["record"]["trials"] if t["state"] == "complete"]
    task = trained["tasks"][1]
    floor = sorted(t["validation"][task] for t in complete)[len(complete) // 2]
    record = _search(trained, tmp_path / "r", 6, sampler="random", pruner="none", constraints=[f"{task}>={floor}"])
    assert record["best"]["validation"][task] >= floor
    for t in record["trials"]:  # the objective of an infeasible trial is its mean minus the violation
        mean_val = sum(t["validation"].values()) / len(t["validation"])
        penalty = max(0.0, t["constraint_violation"][0])
        assert t["fidelities"][-1] == t["validation"]
        assert penalty == pytest.approx(max(0.0, floor - t["validation"][task]))
        assert (penalty > 0) == (not t["feasible"]) and mean_val == pytest.approx(t["avg_validation"])
        assert t["objective"] == [pytest.approx(mean_val - penalty)]
    assert any(not t["feasible"] for t in record["trials"])


def test_no_feasible_trial_is_a_one_line_error(trained: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(OsrmError, match="no trial met the constraints") as err:
        _search(trained, tmp_path / "x", 3, constraints=[Constraint("polar", floor=101.0)], pruner="none")
    assert "\n" not in str(err.value)
    record = json.loads((tmp_path / "x" / "search.json").read_text())
    assert record["best"] is None and record["feasible_trials"] == 0 and not (tmp_path / "x" / "merged").exists()


def test_pareto_search_reports_a_front(trained: dict[str, Any], tmp_path: Path) -> None:
    record = _search(trained, tmp_path / "p", 8, objective="pareto", sampler="nsga2", constraints=["nato>=single-100"])
    front = {p["trial"] for p in record["pareto_front"]}
    assert record["best"]["trial"] in front
    scores = {t["trial"]: [t["validation"][k] for k in record["tasks"]] for t in record["trials"] if t["validation"]}
    for i in front:
        assert not any(all(x >= y for x, y in zip(q, scores[i])) and q != scores[i] for q in scores.values())
    assert "pruned" in [t["state"] for t in record["trials"]]


# ---------------------------------------------------------------------------------------------- CLI
def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_search_writes_outputs(trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = main(["-q", "search", *map(str, trained["dirs"]), "--out", str(out), "--trials", "4", "--methods",
               "task_arithmetic,ties", "--groups", "0", "--constraint", "polar>=single-100"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("best trial ") and "written to" in captured.out
    record = json.loads((out / "search.json").read_text())
    assert record["budget"]["used"]["trials"] == 4 and len(record["search_space"]["groups"]) == 2
    assert (out / "merged" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--methods", "emr"], "method emr cannot be searched"),
    (["--methods", "nope"], "unknown merge method"),
    (["--constraint", "colours"], "constraint 'colours' is not valid"),
    (["--constraint", "nothere>=3"], "constraint task 'nothere' is not one of"),
    (["--objective", "best"], "unknown objective"),
    (["--scaling-range", "1"], "--scaling-range"),
])
def test_cli_search_bad_input_is_one_line(trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          args: list[str], message: str) -> None:
    out = tmp_path / "bad"
    rc = main(["-q", "search", *map(str, trained["dirs"]), "--out", str(out), "--trials", "2", *args])
    assert rc == 2
    assert message in _error_line(capsys.readouterr().err)
    assert not out.exists()  # nothing left behind


# ---------------------------------------------------------------------------------------------- leave one out
def test_leave_one_out_matches_merging_without_each_adapter_by_hand(trained: dict[str, Any]) -> None:
    ev: MergedEvaluator = trained["evaluator"]
    adapters: list[LoraAdapter] = trained["adapters"]
    tasks, lam = trained["tasks"], 0.7
    result = leave_one_out(ev, adapters, scaling=lam)

    def by_hand(members: list[LoraAdapter]) -> dict[str, float]:
        deltas = {k: lam * sum(a.modules[k].delta() for a in members) for k in adapters[0].modules}
        return ev.evaluate(lambda _: deltas, "validation")

    full = by_hand(adapters)
    assert result["all"] == pytest.approx(full)
    for i in range(len(tasks)):
        without = by_hand([a for k, a in enumerate(adapters) if k != i])
        for j, t in enumerate(tasks):
            if i == j:
                assert result["drag"][i][j] is None
            else:
                assert result["drag"][i][j] == pytest.approx(without[t] - full[t])
    mean_drag = {t: sum(v for v in result["drag"][i] if v is not None) / 2 for i, t in enumerate(tasks)}
    assert result["mean_drag"] == pytest.approx(mean_drag)
    assert result["worst"] == max(tasks, key=lambda t: mean_drag[t]) and result["worst"] in result["summary"]


def test_interference_ranking_orders_adapters_by_their_off_diagonal_rows() -> None:
    ranked = interference_ranking({"tasks": ["a", "b", "c"],
                                   "ratio": [[1.0, 0.1, 0.3], [2.0, 1.0, 4.0], [0.5, float("nan"), 1.0]]})
    assert ranked["rank"] == ["b", "c", "a"]
    assert ranked["mean_offdiag_ratio"] == pytest.approx({"a": 0.2, "b": 3.0, "c": 0.5})


def test_cli_diagnose_leave_one_out(trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loo"
    rc = main(["-q", "diagnose", *map(str, trained["dirs"]), "--leave-one-out", "--scaling", "0.7", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    saved = json.loads((out / "leave_one_out.json").read_text())
    assert saved["summary"] in captured.out and saved["worst"] in saved["summary"]
    assert len(saved["drag"]) == 3 and saved["split"] == "validation"
    rc = main(["diagnose", *map(str, trained["dirs"]), "--out", str(tmp_path / "none")])
    assert rc == 2 and "--leave-one-out" in _error_line(capsys.readouterr().err)
