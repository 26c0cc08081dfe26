"""Batched evaluation of low-rank merges (MergedEvaluator.evaluate_many, sweep(batched=True)) against
today's fold-in-turn evaluation on tiny models: the same logits (1e-5 relative, float32), the same
predictions and argmax-based scores, the same sweep and the same sweep.json from the merge stage."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodels import KEYWORD_TASKS, trained_keyword_adapters

import osrm_lora.evaluate as evaluate_lib
import osrm_lora.merged_eval as merged_eval
from osrm_lora.adapters import LoraModule
from osrm_lora.merge import merge
from osrm_lora.merged_eval import MergedEvaluator, low_rank_modules, sweep

LAMBDAS = [0.0, 0.3, 0.7, 1.0, 1.6]


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return trained_keyword_adapters(tiny_bert, tmp_path_factory.mktemp("batched-eval"), KEYWORD_TASKS)


class Logits:
    """Every logits tensor scored, per path: the fold path scores through osrm_lora.evaluate.score,
    the batched path through osrm_lora.merged_eval.score."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.fold: list[torch.Tensor] = []
        self.batched: list[torch.Tensor] = []
        for module, into in ((evaluate_lib, self.fold), (merged_eval, self.batched)):
            original = module.score

            def spy(task: Any, logits: torch.Tensor, labels: torch.Tensor, _o: Any = original,
                    _into: list[torch.Tensor] = into) -> float:
                _into.append(logits.clone())
                return float(_o(task, logits, labels))

            mp.setattr(module, "score", spy)


@pytest.fixture()
def logits(monkeypatch: pytest.MonkeyPatch) -> Logits:
    return Logits(monkeypatch)


def _fold_each(ev: MergedEvaluator, results: list[Any], split: str) -> list[dict[str, float]]:
    out = []
    for r in results:
        if r is None:
            out.append(ev.evaluate(None, split))
        else:
            out.append(ev.evaluate(r.deltas_for, split, per_task=bool(getattr(r, "per_task_deltas", None))))
    return out


def _assert_logits_match(batched: list[torch.Tensor], fold: list[torch.Tensor], problem: str = "classification") -> None:
    assert len(batched) == len(fold) and batched
    for b, f in zip(batched, fold):
        assert b.shape == f.shape and b.dtype == f.dtype == torch.float32
        scale = float(f.abs().max()) if f.numel() else 1.0
        torch.testing.assert_close(b, f, rtol=1e-5, atol=1e-5 * max(scale, 1e-6))
        if problem == "classification":
            assert torch.equal(b.argmax(-1), f.argmax(-1))


def _candidate_major(batched: list[torch.Tensor], k: int, n_tasks: int) -> list[torch.Tensor]:
    """The batched path scores task by task (all K candidates of a task per pass): reorder its logits
    candidate by candidate, as folding each candidate in turn scores them."""
    return [batched[t * k + c] for c in range(k) for t in range(n_tasks)]


def test_ta_lambda_sweep_gives_the_fold_paths_logits_and_scores(trained: dict[str, Any], logits: Logits) -> None:
    ev: MergedEvaluator = trained["evaluator"]
    results = [merge(trained["adapters"], "task_arithmetic", {"scaling": lam}) for lam in LAMBDAS]
    assert all(low_rank_modules(r) is not None for r in results)
    n_tasks, k = len(ev.slots), len(results)
    for split in ("validation", "test"):
        many = ev.evaluate_many(results, split)
        assert not logits.fold, "a low-rank candidate was folded"
        batched = _candidate_major(logits.batched, k, n_tasks)
        fold = _fold_each(ev, results, split)
        assert many == fold  # identical argmax-based metrics, task by task
        _assert_logits_match(batched, logits.fold)
        assert not torch.allclose(batched[0], batched[-n_tasks])  # lambda 0 (the base) vs 1.6: the update counts
        logits.fold.clear()
        logits.batched.clear()


def test_chunks_of_candidates_give_the_same_scores(trained: dict[str, Any], logits: Logits,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ev: MergedEvaluator = trained["evaluator"]
    results = [merge(trained["adapters"], "task_arithmetic", {"scaling": lam}) for lam in LAMBDAS]
    assert ev.models_per_pass() == max(1, merged_eval.DEFAULT_BATCHED_ROWS // ev.batch_size)
    assert ev.models_per_pass(2 * ev.batch_size) == 2 and ev.models_per_pass(1) == 1
    passes: list[int] = []
    original = MergedEvaluator._evaluate_low_rank

    def counted(self: MergedEvaluator, plans: Any, split: str) -> Any:
        passes.append(len(plans))
        return original(self, plans, split)

    monkeypatch.setattr(MergedEvaluator, "_evaluate_low_rank", counted)
    whole = ev.evaluate_many(results, "validation")
    chunked = ev.evaluate_many(results, "validation", batched_rows=2 * ev.batch_size)
    single = ev.evaluate_many(results, "validation", batched_rows=1)
    assert passes == [len(results), 2, 2, 1] + [1] * len(results)
    assert whole == chunked == single == _fold_each(ev, results, "validation")
    k, n_tasks = len(results), len(ev.slots)
    _assert_logits_match(_candidate_major(logits.batched[: k * n_tasks], k, n_tasks), logits.fold)


def test_a_mix_of_candidates(trained: dict[str, Any], logits: Logits, monkeypatch: pytest.MonkeyPatch) -> None:
    """Low-rank results of several methods and ranks, a bare factor mapping and the base model go
    through one pass; dense (TIES) and per-task (EMR) results are folded by evaluate, unchanged."""
    ev: MergedEvaluator = trained["evaluator"]
    adapters = trained["adapters"]
    one = {k: LoraModule(m.A, m.B, 0.8 * m.scaling) for k, m in adapters[1].modules.items()}  # rank 2 vs 6
    cands: list[Any] = [
        merge(adapters, "task_arithmetic", {"scaling": 0.9}),
        merge(adapters, "ties", {"scaling": 1.0}),
        merge(adapters, "cat", {}),
        None,
        one,
        merge(adapters, "emr", {}),
        merge(adapters, "tsv_m", {"scaling": 1.2}),
        merge(adapters[:2], "task_arithmetic", {"scaling": 1.3}),
    ]
    kinds = [low_rank_modules(c) is not None for c in cands]
    assert kinds == [True, False, True, False, True, False, True, True]
    folded: list[Any] = []
    original = MergedEvaluator.evaluate

    def spy(self: MergedEvaluator, deltas_for: Any, split: str, per_task: bool = False) -> dict[str, float]:
        folded.append(deltas_for)
        return original(self, deltas_for, split, per_task)

    for split in ("validation", "test"):
        monkeypatch.setattr(MergedEvaluator, "evaluate", spy)
        many = ev.evaluate_many(cands, split)
        monkeypatch.setattr(MergedEvaluator, "evaluate", original)
        assert len(folded) == kinds.count(False)  # ties, the base model and emr: folded in turn, as today
        folded.clear()
        fold_of_dense = list(logits.fold)
        batched = list(logits.batched)
        logits.fold.clear()
        logits.batched.clear()
        ref = [ev.evaluate(None, split) if c is None
               else ev.evaluate(lambda _i, d={k: m.delta() for k, m in c.items()}: d, split) if isinstance(c, dict)
               else ev.evaluate(c.deltas_for, split, per_task=bool(c.per_task_deltas)) for c in cands]
        assert many == ref
        n_tasks = len(ev.slots)
        per_cand = [logits.fold[j * n_tasks:(j + 1) * n_tasks] for j in range(len(cands))]
        low = [i for i, lr in enumerate(kinds) if lr]
        _assert_logits_match(_candidate_major(batched, len(low), n_tasks), [x for i in low for x in per_cand[i]])
        # the dense candidates went through the very same fold code: bitwise the same logits
        dense_ref = [x for i, lr in enumerate(kinds) if not lr for x in per_cand[i]]
        assert len(fold_of_dense) == len(dense_ref)
        assert all(torch.equal(a, b) for a, b in zip(fold_of_dense, dense_ref))
        logits.fold.clear()


def test_unbatchable_modules_fall_back_to_folding(trained: dict[str, Any]) -> None:
    ev: MergedEvaluator = trained["evaluator"]
    ta = merge(trained["adapters"], "task_arithmetic", {"scaling": 1.0})
    assert ev._factor_plan(ta.adapter.modules) is not None
    key, mod = next(iter(ta.adapter.modules.items()))
    assert ev._factor_plan({"no.such.module": mod}) is None
    bad = LoraModule(mod.A.clone(), mod.B.clone(), mod.scaling)
    bad.B[0, 0] = float("nan")
    assert ev._factor_plan({key: bad}) is None  # folding then refuses it with the usual error
    from osrm_lora.errors import OsrmError

    with pytest.raises(OsrmError, match="NaN or Inf"):
        ev.evaluate_many([{key: bad}], "validation")


def _sweep(ev: MergedEvaluator, adapters: list[Any], method: str, batched: bool | None, **kw: Any) -> Any:
    def merge_fn(lam: float) -> Any:
        return merge(adapters, method, {"scaling": lam})
    return sweep(ev, merge_fn, LAMBDAS, batched=batched, **kw)


@pytest.mark.parametrize("with_test_curve", [True, False])
def test_sweep_batched_equals_the_fold_sweep(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                             with_test_curve: bool) -> None:
    ev: MergedEvaluator = trained["evaluator"]
    calls = {"evaluate": 0, "many": 0}
    ev_orig, many_orig = MergedEvaluator.evaluate, MergedEvaluator.evaluate_many

    def ev_spy(self: MergedEvaluator, *a: Any, **k: Any) -> Any:
        calls["evaluate"] += 1
        return ev_orig(self, *a, **k)

    def many_spy(self: MergedEvaluator, *a: Any, **k: Any) -> Any:
        calls["many"] += 1
        return many_orig(self, *a, **k)

    monkeypatch.setattr(MergedEvaluator, "evaluate", ev_spy)
    monkeypatch.setattr(MergedEvaluator, "evaluate_many", many_spy)
    curve_b, best_b, sel_b = _sweep(ev, trained["adapters"], "task_arithmetic", True, with_test_curve=with_test_curve)
    assert calls == {"evaluate": 0 if with_test_curve else 1, "many": 2 if with_test_curve else 1}
    calls.update(evaluate=0, many=0)
    curve_f, best_f, sel_f = _sweep(ev, trained["adapters"], "task_arithmetic", False, with_test_curve=with_test_curve)
    assert calls["many"] == 0
    assert [(p.lam, p.validation, p.test) for p in curve_b] == [(p.lam, p.validation, p.test) for p in curve_f]
    assert (sel_b.lam, sel_b.validation, sel_b.test) == (sel_f.lam, sel_f.validation, sel_f.test)
    assert best_b.params == best_f.params
    # a dense method keeps the fold path, batched or not
    calls.update(evaluate=0, many=0)
    curve_t, _, sel_t = _sweep(ev, trained["adapters"], "ties", True, with_test_curve=with_test_curve)
    assert calls["many"] == 0 and calls["evaluate"] == len(LAMBDAS) * (2 if with_test_curve else 1) + (
        0 if with_test_curve else 1)
    curve_t2, _, sel_t2 = _sweep(ev, trained["adapters"], "ties", False, with_test_curve=with_test_curve)
    assert [(p.validation, p.test) for p in curve_t] == [(p.validation, p.test) for p in curve_t2]


def test_sweep_default_is_batched_on_an_accelerator_only(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    ev: MergedEvaluator = trained["evaluator"]
    used: list[bool] = []
    original = MergedEvaluator.evaluate_many
    monkeypatch.setattr(MergedEvaluator, "evaluate_many",
                        lambda self, *a, **k: used.append(True) or original(self, *a, **k))
    _sweep(ev, trained["adapters"], "task_arithmetic", None)
    assert not used  # CPU evaluator: folded
    monkeypatch.setattr(ev, "device", torch.device("meta"))  # any accelerator: only the type is read
    monkeypatch.setattr(MergedEvaluator, "evaluate_many", lambda self, cands, split, **k: used.append(True) or [
        {n: 0.0 for n in self.task_names} for _ in cands])
    _sweep(ev, trained["adapters"], "task_arithmetic", None)
    assert used


def test_sweep_ties_go_to_the_earlier_lambda_in_batched_mode(trained: dict[str, Any]) -> None:
    """Same selection rule as the fold sweep: with several chunks the first best lambda is kept."""
    ev: MergedEvaluator = trained["evaluator"]
    grid = [0.0, 0.0, 1.0, 1.0, 0.0]
    ev.batched_rows, kept = 2 * ev.batch_size, ev.batched_rows
    try:
        out_b = sweep(ev, lambda lam: merge(trained["adapters"], "task_arithmetic", {"scaling": lam}), grid,
                      batched=True)
    finally:
        ev.batched_rows = kept
    out_f = sweep(ev, lambda lam: merge(trained["adapters"], "task_arithmetic", {"scaling": lam}), grid, batched=False)
    assert [p.validation for p in out_b[0]] == [p.validation for p in out_f[0]]
    def position(out: Any) -> int:
        return next(i for i, p in enumerate(out[0]) if p is out[2])
    assert position(out_b) == position(out_f)


def test_merge_stage_writes_the_same_sweep_json(trained: dict[str, Any], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline.merge_and_sweep (the merge stage) with the automatic batched sweep vs the fold path."""
    from osrm_lora.data import load_task
    from osrm_lora.pipeline import merge_and_sweep

    root = trained["root"]
    monkeypatch.setenv("OSRM_LORA_CACHE", str(root / "cache"))
    tasks = [load_task({"name": n, "source": "local", "path": str(root / f"{n}.jsonl")}) for n in trained["tasks"]]
    records = {}
    used: list[bool] = []
    original = MergedEvaluator.evaluate_many

    def spy(self: MergedEvaluator, *a: Any, **k: Any) -> Any:
        used.append(True)
        return original(self, *a, **k)

    monkeypatch.setattr(MergedEvaluator, "evaluate_many", spy)
    for mode in ("batched", "fold"):
        with pytest.MonkeyPatch.context() as mp:  # the CPU default is fold: ask for each path explicitly
            mp.setattr(merged_eval, "sweep", functools.partial(merged_eval.sweep, batched=mode == "batched"))
            out = tmp_path / mode
            merge_and_sweep(trained["model"], tasks, [Path(d) for d in trained["dirs"]], "task_arithmetic", {},
                            LAMBDAS, out, max_length=12, batch_size=16, device="cpu", seed=0, merge_device="cpu")
            records[mode] = json.loads((out / "sweep.json").read_text())
        assert bool(used) == (mode == "batched")
        used.clear()
    timing = {"merge_seconds", "merge_peak_mb"}
    b, f = ({k: v for k, v in r.items() if k not in timing and k != "inputs"} for r in records.values())
    assert b == f
    assert len(b["curve"]) == len(LAMBDAS)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("doge", {"steps": 5})])
def test_merge_stage_merges_a_linear_method_once(trained: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, method: str,
                                                 params: dict[str, Any]) -> None:
    """A method linear in its scaling (TIES, DOGE) is merged once in the merge stage's sweep and scaled
    per lambda; the sweep.json equals the one of merging at every lambda (the declaration switched off)."""
    import dataclasses

    from osrm_lora.data import load_task
    from osrm_lora.merge.types import _REGISTRY
    from osrm_lora.pipeline import merge_and_sweep

    root = trained["root"]
    monkeypatch.setenv("OSRM_LORA_CACHE", str(root / "cache"))
    tasks = [load_task({"name": n, "source": "local", "path": str(root / f"{n}.jsonl")}) for n in trained["tasks"]]
    info = _REGISTRY[method]
    assert info.linear_in_scaling
    records, calls = {}, []

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(a[1]["scaling"])
        return info.fn(*a, **k)

    for mode, linear in (("once", True), ("each", False)):
        monkeypatch.setitem(_REGISTRY, method, dataclasses.replace(info, fn=counted, linear_in_scaling=linear))
        out = tmp_path / mode
        merge_and_sweep(trained["model"], tasks, [Path(d) for d in trained["dirs"]], method, params,
                        LAMBDAS, out, max_length=12, batch_size=16, device="cpu", seed=0, merge_device="cpu")
        records[mode] = json.loads((out / "sweep.json").read_text())
        assert calls == ([1.0] if linear else LAMBDAS)
        assert records[mode]["merged_once"] is linear
        calls.clear()
    drop = {"merge_seconds", "merge_peak_mb", "inputs", "merged_once"}
    once, each = ({k: v for k, v in r.items() if k not in drop} for r in records.values())
    assert once == each
    assert records["once"]["merge_seconds"] > 0


def test_use_heads_equals_a_fresh_evaluator(trained: dict[str, Any], tmp_path: Path) -> None:
    """The pipeline's one evaluator per run: switched to another set of heads (another init's adapters
    of the same tasks) it scores exactly as an evaluator built for those heads."""
    import shutil

    from safetensors.torch import load_file, save_file

    ev: MergedEvaluator = trained["evaluator"]
    tasks = [s.task for s in ev.slots]
    other = []
    for d in trained["dirs"]:  # the same adapters with every head weight negated: other predictions
        copy = tmp_path / Path(d).name
        shutil.copytree(d, copy)
        head = load_file(str(copy / "head.safetensors"))
        save_file({k: -v if v.ndim == 2 else v for k, v in head.items()}, str(copy / "head.safetensors"))
        other.append(copy)
    merged = merge(trained["adapters"], "task_arithmetic", {"scaling": 0.7})
    before = ev.evaluate(merged.deltas_for, "validation")
    fresh = MergedEvaluator(trained["model"], tasks, other, max_length=12, splits=("validation", "test"))
    try:
        ev.use_heads(other)
        for split in ("validation", "test"):
            assert ev.evaluate(None, split) == fresh.evaluate(None, split)
            assert ev.evaluate(merged.deltas_for, split) == fresh.evaluate(merged.deltas_for, split)
            assert ev.evaluate_many([merged], split) == fresh.evaluate_many([merged], split)
        assert ev.evaluate(merged.deltas_for, "validation") != before
    finally:
        ev.use_heads(trained["dirs"])
    assert ev.evaluate(merged.deltas_for, "validation") == before
