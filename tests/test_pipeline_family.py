"""RMM and the multi-fidelity merge search inside the pipeline's merge stage (merge.rmm, merge.search):
their results records, validation-only searching, resuming and --force, and config errors, on a tiny
BERT with three keyword tasks."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tinymodels import KEYWORD_TASKS, write_keyword_tasks

import osrm_lora.rmm as rmm_lib
import osrm_lora.search as search_lib
from osrm_lora.adapters import load_adapter
from osrm_lora.config import config_to_dict, parse_config
from osrm_lora.data import load_task
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.fsutil import read_json
from osrm_lora.merged_eval import MergedEvaluator
from osrm_lora.pipeline import run_pipeline

SWEEP_KEYS = {"init", "method", "params", "seed", "selected_on", "lambda", "lambda_source", "lambda_at_edge",
              "validation", "test", "avg_validation", "avg_test", "normalised_test", "avg_normalised_test",
              "merge_seconds", "merge_peak_mb", "curve", "inputs"}


def _raw(root: Path, model: Path) -> dict[str, Any]:
    return {
        "name": "family",
        "model": str(model),
        "tasks": write_keyword_tasks(root, KEYWORD_TASKS, n=60),
        "lora": {"rank": 2, "alpha": 4},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.05, "max_length": 12},
        "inits": ["standard"],
        "diagnose": False,
        "merge": {
            "methods": ["task_arithmetic"], "lambdas": [0.5, 1.0], "constraints": ["colours>=single-100"],
            "rmm": {"methods": ["ties"], "episodes": 10, "budget": 8, "subset_size": 6, "rescore": 2,
                    "ppo": {"epochs": 2}},
            "search": {"methods": ["task_arithmetic", "ties"], "n_groups": 2, "rungs": 2, "eta": 2,
                       "min_examples": 4, "budget": {"trials": 4}},
        },
    }


class SplitSpy:
    """Which splits every MergedEvaluator scores, and whether it is inside RMM or the search then."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, str | None]] = []  # (evaluator id, split, search running or None)
        self.searched: dict[str, list[int]] = {"rmm": [], "search": []}
        self.test_encoded: list[str] = []  # searches that found a test split on their evaluator
        self.inside: str | None = None

    def install(self, mp: pytest.MonkeyPatch) -> None:
        evaluate = MergedEvaluator.evaluate

        def spy_evaluate(ev: MergedEvaluator, deltas_for: Any, split: str, per_task: bool = False) -> dict[str, float]:
            self.calls.append((id(ev), split, self.inside))
            return evaluate(ev, deltas_for, split, per_task)

        mp.setattr(MergedEvaluator, "evaluate", spy_evaluate)
        for kind, module, name in (("rmm", rmm_lib, "rmm_search"), ("search", search_lib, "search_merge")):
            mp.setattr(module, name, self._wrap(kind, getattr(module, name)))

    def _wrap(self, kind: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            ev = kwargs["evaluator"]
            self.searched[kind].append(id(ev))
            self.inside = kind
            try:
                if any("test" in slot.encoded for slot in ev.slots):
                    self.test_encoded.append(kind)
                out = fn(*args, **kwargs)
                if any("test" in slot.encoded for slot in ev.slots):
                    self.test_encoded.append(kind)
                return out
            finally:
                self.inside = None
        return wrapped


@pytest.fixture(scope="module")
def family(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("family")
    mp = pytest.MonkeyPatch()
    mp.setenv("OSRM_LORA_CACHE", str(root / "cache"))
    raw = _raw(root, tiny_bert)
    spy = SplitSpy()
    with pytest.MonkeyPatch.context() as spying:
        spy.install(spying)
        results = run_pipeline(parse_config(raw), root / "run")
    try:
        yield {"root": root, "run": root / "run", "raw": raw, "results": results, "spy": spy}
    finally:
        mp.undo()


def _record(results: dict[str, Any], method: str) -> dict[str, Any]:
    recs = [r for r in results["merged"] if r["method"] == method]
    assert len(recs) == 1, [r["method"] for r in results["merged"]]
    return recs[0]


def test_results_hold_rmm_and_search_records_in_the_merge_schema(family: dict[str, Any]) -> None:
    results, run = family["results"], family["run"]
    assert [r["method"] for r in results["merged"]] == ["task_arithmetic", "rmm", "search"]
    ta = _record(results, "task_arithmetic")
    assert SWEEP_KEYS <= ta.keys()
    tasks = [t for t, _, _ in KEYWORD_TASKS]
    for method, budget_limit in (("rmm", 8), ("search", None)):
        rec = _record(results, method)
        assert SWEEP_KEYS <= rec.keys(), SWEEP_KEYS - rec.keys()
        assert rec["init"] == "standard" and rec["seed"] == 0 and rec["selected_on"] == "validation"
        assert sorted(rec["validation"]) == sorted(rec["test"]) == sorted(tasks)
        assert rec["lambda"] is None and rec["curve"] == []
        single = results["single_task"]["standard"]
        for t in tasks:  # normalised against the single-task test scores of the same init
            assert rec["normalised_test"][t] == pytest.approx(100 * rec["test"][t] / single[t]["test"])
        assert rec["merge_seconds"] > 0 and rec["search_seconds"] >= rec["merge_seconds"]
        assert 0 < rec["evaluations_used"] and (budget_limit is None or rec["evaluations_used"] <= budget_limit)
        assert rec["constraints"][0]["constraint"] == "colours>=single-100" and rec["constraints_met"]
        out = run / "merges" / "standard" / method
        assert read_json(out / "sweep.json") == rec
        assert (out / rec["record"]).is_file() and (out / "merged" / "adapter_config.json").is_file()
        assert read_json(out / "merged" / "merge_info.json")["method"] == method
    rmm = _record(results, "rmm")
    assert set(rmm["best"]["architecture"]) == {"g0", "g1"}  # two layers of the tiny BERT
    assert rmm["budget"]["evaluations"] == 8 and rmm["settings"]["ppo"]["epochs"] == 2
    search = _record(results, "search")
    assert [g["group"] for g in search["best"]["config"]["groups"]] == ["g0", "g1"]
    assert search["budget"]["used"]["trials"] == 4
    report = (run / "report.md").read_text()
    assert "### Merge searches" in report and "| standard | rmm |" in report
    assert any("rmm / search" in n for n in results["notes"])


def test_the_searches_see_validation_data_only_and_test_is_scored_once_after(family: dict[str, Any]) -> None:
    spy: SplitSpy = family["spy"]
    assert spy.test_encoded == [], "a search's evaluator held the test split"
    for kind in ("rmm", "search"):
        (ev,) = spy.searched[kind]
        inside = [split for e, split, where in spy.calls if e == ev and where == kind]
        after = [split for e, split, where in spy.calls if e == ev and where is None]
        assert inside and all(s.startswith("validation") for s in inside), inside
        assert after == ["test"], after
    # the lambda sweep's evaluator is another one (it scores its test curve)
    others = {e for e, _, _ in spy.calls} - {e for ids in spy.searched.values() for e in ids}
    assert others


def test_the_test_scores_are_those_of_the_chosen_merge(family: dict[str, Any], tiny_bert: Path) -> None:
    run, results = family["run"], family["results"]
    specs = family["raw"]["tasks"]
    tasks = [load_task(s) for s in specs]
    dirs = [run / "adapters" / "standard" / t.name for t in tasks]
    adapters = [load_adapter(d, name=t.name) for d, t in zip(dirs, tasks)]
    ev = MergedEvaluator(str(tiny_bert), tasks, dirs, max_length=12, splits=("validation", "test"))
    for kind, lib in (("rmm", rmm_lib), ("search", search_lib)):
        rec = _record(results, kind)
        deltas = lib.best_deltas(read_json(run / "merges" / "standard" / kind / rec["record"]), adapters)
        assert ev.evaluate(lambda i, d=deltas: d, "validation") == pytest.approx(rec["validation"])
        assert ev.evaluate(lambda i, d=deltas: d, "test") == pytest.approx(rec["test"])


def test_rerun_does_not_redo_them_and_force_merge_does(family: dict[str, Any]) -> None:
    run, raw, results = family["run"], family["raw"], family["results"]
    files = [run / "merges" / "standard" / k / f for k, f in (("rmm", "rmm.json"), ("search", "search.json"),
                                                              ("rmm", "sweep.json"), ("search", "sweep.json"))]
    stamp = {p: p.stat().st_mtime_ns for p in files}
    again = run_pipeline(parse_config(raw), run)
    assert {p: p.stat().st_mtime_ns for p in files} == stamp, "a finished merge search was redone"
    assert {"merge/standard/rmm", "merge/standard/search"} <= set(again["manifest"]["stages_cached"])
    assert again["merged"] == results["merged"]
    forced = run_pipeline(parse_config(raw), run, force=("merge",))
    assert all(p.stat().st_mtime_ns != stamp[p] for p in files)
    for kind in ("rmm", "search"):  # redone from scratch, with the same seed: the same choice
        assert _record(forced, kind)["best"] == _record(results, kind)["best"]
        assert _record(forced, kind)["validation"] == _record(results, kind)["validation"]
    assert read_json(run / "merges" / "standard" / "search" / "search.json")["budget"]["used"]["trials"] == 4


@pytest.mark.parametrize("section, fragment", [
    ({"rmm": {"episodes": 0}}, "merge.rmm.episodes"),
    ({"rmm": {"budget": 3, "rescore": 3}}, "must exceed the 3 final re-scoring"),
    ({"rmm": {"methods": ["emr"]}}, "method emr cannot be searched"),
    ({"rmm": {"ppo": {"clip": 2}}}, "merge.rmm.ppo: PPO setting clip must lie in (0, 1)"),
    ({"rmm": {"ppo": {"epoch": 2}}}, "merge.rmm.ppo.epoch: unknown key"),
    ({"rmm": {"methods": ["ties"], "params": {"dare_ties": {"p": 0.1}}}}, "not a candidate method"),
    ({"search": {"objective": "multi"}}, "merge.search.objective"),
    ({"search": {"budget": {"evaluations": None}}}, "the search needs a budget"),
    ({"search": {"scaling_range": [1.0, 0.5]}}, "0 <= low < high"),
    ({"search": {"trials": 5}}, "merge.search.trials: unknown key"),
])
def test_bad_sections_give_one_line_errors(section: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"tasks": ["mr", "bbc"], "merge": section})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_absent_sections_leave_the_config_as_before() -> None:
    cfg = parse_config({"tasks": ["mr", "bbc"]})
    assert cfg.merge.rmm is None and cfg.merge.search is None
    assert {"rmm", "search"}.isdisjoint(config_to_dict(cfg)["merge"])  # the config hash is unchanged
    both = parse_config({"tasks": ["mr", "bbc"], "merge": {"rmm": {}, "search": {"budget": {"trials": 3}}}})
    assert both.merge.search is not None and both.merge.search.budget.evaluations is None  # as the command
    assert parse_config(config_to_dict(both)) == both


def test_infeasible_constraints_stop_the_run_naming_the_config_keys(family: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(family["run"], run)  # the trained adapters are reused (same inputs)
    raw = copy.deepcopy(family["raw"])
    raw["merge"]["constraints"] = ["colours>=101"]  # no merge reaches it
    with pytest.raises(OsrmError) as err:
        run_pipeline(parse_config(raw), run)
    msg = str(err.value)
    assert msg.startswith("merge.rmm of init standard: no re-scored architecture met the constraints")
    assert "raise merge.rmm.budget or merge.rmm.episodes, or loosen merge.constraints" in msg and "\n" not in msg
    assert not (run / "merges" / "standard" / "rmm" / "sweep.json").exists()  # not recorded as finished
    assert not any((run / "adapters").rglob(".*.tmp-*"))


@pytest.mark.parametrize("kind,message,expected", [
    ("rmm", "no episode built a complete architecture in 3 episodes; raise --episodes",
     "no episode built a complete architecture in 3 episodes; raise merge.rmm.episodes"),
    ("rmm", "raise --subset-size or --budget", "raise merge.rmm.subset_size or merge.rmm.budget"),
    ("search", "the number of fidelities (--rungs) must be >= 1; raise --budget, --seconds or --trials",
     "the number of fidelities (merge.search.rungs) must be >= 1; raise merge.search.budget.evaluations, "
     "merge.search.budget.seconds or merge.search.budget.trials"),
    # the command's own ways out are no settings of the pipeline: said in the pipeline's words
    ("search", "out/ holds a search with other settings (eta differ); rerun with the same settings to resume it, "
     "pass --overwrite to start anew, or choose another --out",
     "out/ holds a search with other settings (eta differ); rerun with the same settings to resume it, "
     "run with --force merge to start anew"),
    ("rmm", "see --model and --force", "see --model and --force"),  # not settings of merge.rmm: unchanged
])
def test_search_errors_name_the_config_keys(kind: str, message: str, expected: str) -> None:
    from osrm_lora.pipeline.merging import _config_hint

    assert _config_hint(message, kind) == expected
