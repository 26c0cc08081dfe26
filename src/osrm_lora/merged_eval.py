"""Evaluate merged adapters: fold the merged update into one base model, swap each task's head in.

A lambda sweep re-merges for every lambda (cheap for LoRA) and scores every task on validation
(selection) and on test (reported once for the selected lambda; the whole test curve is kept only as
the robustness report, never for selection).

Two evaluation paths give the same scores:

- **fold in turn** (:meth:`MergedEvaluator.evaluate`): the dense update of one model is added to the
  base weights, every task is scored, the weights are put back. Used for dense merges (TIES, DARE,
  EMR's per-task deltas, ...).
- **low-rank, many models per forward** (:meth:`MergedEvaluator.evaluate_many`): K candidates whose
  update is ``B @ A`` per module (a merge result that keeps LoRA factors, e.g. Task Arithmetic at K
  lambdas) are scored together. Every batch of a task's examples is repeated K times; copy k goes
  through the base weights plus its own low-rank update (the stacked multi-adapter LoRA operator of
  batched training, :func:`osrm_lora.train_batched.grouped_lora_delta`: two batched matmuls, nothing
  folded), with the task's head. Candidates are taken at most :meth:`MergedEvaluator.models_per_pass`
  at a time (``batched_rows`` caps candidates x batch size). Logits agree with the fold path to float
  rounding (~1e-6 relative in float32; on CUDA both run under bf16 autocast and agree to bf16
  rounding); the batches, their padding and the heads are the fold path's.

:func:`sweep` uses the low-rank path for every lambda whose merge keeps factors and folds the others
in turn (``batched``: by default on an accelerator only; on the CPU folding is as fast or faster).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from osrm_lora.adapters import LoraModule
from osrm_lora.backbone import (
    HeadInfo,
    apply_deltas,
    head_module_names,
    load_classifier,
    load_head,
    load_tokenizer,
    select_device,
    set_head,
)
from osrm_lora.data.task import Task
from osrm_lora.encoding import Encoded, collate, encode_split, sorted_batches
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import autocast_context, evaluate, mean, score
from osrm_lora.model.keys import (
    check_weight_shape,
    is_transposed_module,
    key_candidates,
    model_prefix,
    module_paths,
)

logger = logging.getLogger(__name__)

DeltasFn = Callable[[int], Mapping[str, torch.Tensor]]

#: default cap on the rows of one batched forward of :meth:`MergedEvaluator.evaluate_many`
#: (candidates x ``batch_size``): 8 candidates per forward at the default batch size of 128
DEFAULT_BATCHED_ROWS = 1024


def low_rank_modules(candidate: Any) -> dict[str, LoraModule] | None:
    """The per-module LoRA factors of ``candidate`` when its update is low-rank and the same for every
    task, else None (a dense or per-task result: fold it).

    ``candidate``: a merge result (:class:`osrm_lora.merge.types.MergeResult`: low-rank when it keeps
    its ``adapter`` and has neither ``deltas`` nor ``per_task_deltas``) or a mapping of module key ->
    :class:`~osrm_lora.adapters.LoraModule`.
    """
    if candidate is None:
        return None
    if isinstance(candidate, Mapping):
        return dict(candidate) if all(isinstance(m, LoraModule) for m in candidate.values()) else None
    if getattr(candidate, "per_task_deltas", None) is not None or getattr(candidate, "deltas", None) is not None:
        return None
    modules = getattr(getattr(candidate, "adapter", None), "modules", None)
    if not isinstance(modules, dict) or not all(isinstance(m, LoraModule) for m in modules.values()):
        return None
    return dict(modules)


class _LowRankLinear(nn.Module):
    """A base linear (or GPT-2 ``Conv1D``) layer plus one low-rank update per routed group of rows:
    ``base(x) + x A_g^T B_g^T`` (``A``: (K, r, n); ``B``: (K, m, r), scaling folded in)."""

    def __init__(self, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor, router: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.A, self.B = A, B
        self._router = router

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        from osrm_lora.train_batched import grouped_lora_delta

        result = self.base_layer(x, *args, **kwargs)
        delta = grouped_lora_delta(x.to(self.A.dtype), self.A, self.B, self._router)
        out: torch.Tensor = (result + delta).to(result.dtype)
        return out


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@dataclass
class TaskSlot:
    """One task prepared for repeated evaluation: encoded splits and its head."""

    task: Task
    head: dict[str, torch.Tensor]
    info: HeadInfo
    encoded: dict[str, Encoded] = field(default_factory=dict)


def _task_head(task: Task, head_dir: str | Path) -> tuple[dict[str, torch.Tensor], HeadInfo]:
    """The head saved beside an adapter, checked to belong to ``task``."""
    state, info = load_head(head_dir)
    if info.task != task.name:
        raise OsrmError(f"head in {head_dir} belongs to task {info.task!r}, not {task.name!r}; pass the matching adapter")
    if info.num_labels != task.num_labels:
        raise OsrmError(f"head of {task.name} has {info.num_labels} outputs but the task has {task.num_labels} labels")
    return state, info


class MergedEvaluator:
    """One base model in memory; evaluates any set of per-task dense updates on any split
    (:meth:`evaluate`), or many low-rank candidates together (:meth:`evaluate_many`).

    ``batched_rows``: at most this many rows (candidates x ``batch_size``) in one forward of
    :meth:`evaluate_many` (at least one candidate per forward whatever the cap)."""

    def __init__(
        self,
        model_path: str,
        tasks: Sequence[Task],
        head_dirs: Sequence[str | Path],
        *,
        max_length: int = 128,
        batch_size: int = 128,
        device: str | None = None,
        splits: Sequence[str] = ("validation", "test"),
        batched_rows: int = DEFAULT_BATCHED_ROWS,
    ) -> None:
        if len(tasks) != len(head_dirs):
            raise OsrmError("need one head directory per task")
        self.device = select_device(device)
        self.tokenizer = load_tokenizer(model_path)
        first_state, first_info = load_head(head_dirs[0])
        self.model: nn.Module = load_classifier(
            model_path, first_info.num_labels, first_info.problem_type, device=self.device, pad_token_id=self.tokenizer.pad_token_id
        )
        self.model.eval()
        self.batch_size = batch_size
        self.slots: list[TaskSlot] = [TaskSlot(task, *_task_head(task, hdir)) for task, hdir in zip(tasks, head_dirs)]
        self.max_length = max_length
        for split in splits:
            self.add_split(split)
        self._originals: dict[str, torch.Tensor] = {}
        if batched_rows < 1:
            raise OsrmError(f"batched_rows must be >= 1, got {batched_rows}")
        self.batched_rows = batched_rows
        self._module_index: tuple[set[str], str, dict[str, int], tuple[str, ...]] | None = None

    def use_heads(self, head_dirs: Sequence[str | Path]) -> None:
        """Evaluate with the heads of ``head_dirs`` (one per task, in the evaluator's task order, e.g.
        another init's adapters of the same tasks) from now on; the base model, the tokenizer and the
        encoded splits are kept, so one evaluator serves every merge of a run."""
        if len(head_dirs) != len(self.slots):
            raise OsrmError(f"need one head directory per task ({len(self.slots)}), got {len(head_dirs)}")
        self.restore()
        heads = [_task_head(slot.task, hdir) for slot, hdir in zip(self.slots, head_dirs)]
        for slot, (state, info) in zip(self.slots, heads):
            slot.head, slot.info = state, info
        self._module_index = None  # it records the heads' module names

    def add_split(self, split: str) -> None:
        """Encode ``split`` of every task, e.g. ``test`` after a search that was given validation only."""
        for slot in self.slots:
            slot.encoded[split] = encode_split(self.tokenizer, slot.task.split(split), self.max_length,
                                               slot.task.problem_type == "regression")

    @property
    def task_names(self) -> list[str]:
        return [s.task.name for s in self.slots]

    def _apply(self, deltas: Mapping[str, torch.Tensor]) -> None:
        self.restore()
        self._originals = apply_deltas(self.model, deltas)

    def restore(self) -> None:
        """Put back the base weights that the last evaluation changed (a no-op when none is folded in)."""
        with torch.no_grad():
            for path, original in self._originals.items():
                cast(torch.Tensor, self.model.get_submodule(path).weight).copy_(original)
        self._originals = {}

    def evaluate(self, deltas_for: DeltasFn | None, split: str, per_task: bool = False) -> dict[str, float]:
        """Scores per task on ``split`` with ``deltas_for(task_index)`` folded in (None = base model)."""
        scores: dict[str, float] = {}
        applied_shared = False
        try:
            for i, slot in enumerate(self.slots):
                if deltas_for is not None and (per_task or not applied_shared):
                    self._apply(deltas_for(i))
                    applied_shared = True
                set_head(self.model, slot.head, slot.info.num_labels, slot.info.problem_type)
                scores[slot.task.name] = evaluate(self.model, self.tokenizer, slot.task, slot.encoded[split], self.batch_size)
        finally:
            self.restore()
        return scores

    # ------------------------------------------------------------------ many low-rank models per forward
    def models_per_pass(self, batched_rows: int | None = None) -> int:
        """Candidates scored together by one forward of :meth:`evaluate_many`:
        ``batched_rows // batch_size`` (the evaluator's cap unless given), at least 1."""
        rows = self.batched_rows if batched_rows is None else batched_rows
        return max(1, int(rows) // max(1, self.batch_size))

    def evaluate_many(self, candidates: Sequence[Any], split: str, *,
                      batched_rows: int | None = None) -> list[dict[str, float]]:
        """Scores per task on ``split`` of every candidate, in order: what :meth:`evaluate` gives for
        each one in turn (to float rounding of the logits; see the module docstring).

        A candidate is a merge result (anything with ``deltas_for``, e.g.
        :class:`~osrm_lora.merge.types.MergeResult`), a mapping of module key ->
        :class:`~osrm_lora.adapters.LoraModule`, or None (the base model). The low-rank ones
        (:func:`low_rank_modules`) are scored :meth:`models_per_pass` at a time, all of them in one
        forward per batch; the others (dense or per-task deltas, updates of modules the batched
        forward does not handle: not a linear layer, a tied weight, part of the task head) are
        folded in turn with :meth:`evaluate`, which also raises the usual errors for a candidate
        that does not fit the model."""
        out: list[dict[str, float] | None] = [None] * len(candidates)
        low: list[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        for i, cand in enumerate(candidates):
            modules = low_rank_modules(cand)
            plan = self._factor_plan(modules) if modules is not None else None
            if plan is None:
                deltas_for, per_task = self._fold_args(cand)
                out[i] = self.evaluate(deltas_for, split, per_task=per_task)
            else:
                low.append((i, plan))
        per_pass = self.models_per_pass(batched_rows)
        for start in range(0, len(low), per_pass):
            chunk = low[start : start + per_pass]
            for (i, _), scores in zip(chunk, self._evaluate_low_rank([plan for _, plan in chunk], split)):
                out[i] = scores
        return [s if s is not None else {} for s in out]

    @staticmethod
    def _fold_args(candidate: Any) -> tuple[DeltasFn | None, bool]:
        """(deltas_for, per_task) with which :meth:`evaluate` scores ``candidate`` by folding."""
        if candidate is None:
            return None, False
        if isinstance(candidate, Mapping):
            deltas = {k: m.delta() if isinstance(m, LoraModule) else m for k, m in candidate.items()}
            return (lambda _i: deltas), False
        return candidate.deltas_for, bool(getattr(candidate, "per_task_deltas", None))

    def _index(self) -> tuple[set[str], str, dict[str, int], tuple[str, ...]]:
        """Module paths with a weight, the base prefix, how many names each parameter has (tied
        weights), and the prefixes of the head's modules and parameters (computed once)."""
        if self._module_index is None:
            named = list(self.model.named_parameters(remove_duplicate=False))
            counts: dict[int, int] = {}
            for _, p in named:
                counts[id(p)] = counts.get(id(p), 0) + 1
            heads = set(head_module_names(self.model))
            for slot in self.slots:
                heads.update(k.rsplit(".", 1)[0] for k in slot.head)
            self._module_index = (module_paths(n for n, _ in named), model_prefix(self.model),
                                  {n: counts[id(p)] for n, p in named}, tuple(sorted(heads)))
        return self._module_index

    def _factor_plan(self, modules: Mapping[str, LoraModule]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Module path -> (A (r, n), scaling * B (m, r)), float32 on the evaluator's device, or None
        when any module cannot take the low-rank route (then the candidate is folded)."""
        paths, prefix, names, heads = self._index()
        plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, mod in modules.items():
            found = key_candidates(key, paths, prefix)
            if len(found) != 1:
                return None
            path = found[0]
            module = self.model.get_submodule(path)
            transposed = is_transposed_module(module)
            if not (type(module) is nn.Linear or transposed) or path in plan:
                return None
            if names.get(f"{path}.weight", 0) != 1 or any(path == h or path.startswith(h + ".") or h.startswith(path + ".")
                                                           for h in heads):
                return None
            try:
                check_weight_shape(key, tuple(cast(torch.Tensor, module.weight).shape), (mod.out_features, mod.in_features), transposed)
            except OsrmError:
                return None
            A = mod.A.to(self.device, torch.float32)
            B = (float(mod.scaling) * mod.B.to(self.device, torch.float32))
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                return None
            plan[path] = (A, B)
        return plan

    def _evaluate_low_rank(self, plans: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                           split: str) -> list[dict[str, float]]:
        """Every task's scores for each plan (:meth:`_factor_plan`), all plans in one forward per batch."""
        from osrm_lora.train_batched import Router

        K = len(plans)
        router = Router()
        wrapped: dict[str, nn.Module] = {}
        self.restore()
        try:
            for path in sorted({p for plan in plans for p in plan}):
                first = next(plan[path] for plan in plans if path in plan)
                m, n = first[1].shape[0], first[0].shape[1]
                r = max(plan[path][0].shape[0] for plan in plans if path in plan)
                A = torch.zeros(K, r, n, device=self.device)
                B = torch.zeros(K, m, r, device=self.device)
                for k, plan in enumerate(plans):  # ranks padded with zeros, absent modules all zero: exact
                    if path in plan:
                        a, b = plan[path]
                        A[k, : a.shape[0]] = a
                        B[k, :, : b.shape[1]] = b
                base = self.model.get_submodule(path)
                wrapped[path] = base
                _set_submodule(self.model, path, _LowRankLinear(base, A, B, router))
            scores: list[dict[str, float]] = [{} for _ in range(K)]
            for slot in self.slots:
                set_head(self.model, slot.head, slot.info.num_labels, slot.info.problem_type)
                encoded = slot.encoded[split]
                logits = self._predict_many(encoded, K, router)
                for k in range(K):
                    scores[k][slot.task.name] = score(slot.task, logits[k], encoded.labels)
        finally:
            for path, base in wrapped.items():
                _set_submodule(self.model, path, base)
        return scores

    @torch.no_grad()
    def _predict_many(self, encoded: Encoded, K: int, router: Any) -> torch.Tensor:
        """(K, N, C) logits: :func:`osrm_lora.evaluate.predict_logits` for K models at once (the same
        batches, each repeated K times, copy k routed through update k)."""
        model = self.model
        was_training = model.training
        model.eval()
        out: torch.Tensor | None = None
        try:
            for idx in sorted_batches(encoded, self.batch_size):
                batch = {key: v.to(self.device).repeat(K, *([1] * (v.dim() - 1)))
                         for key, v in collate(self.tokenizer, [encoded.features[i] for i in idx]).items()}
                router.route(list(range(K)), [len(idx)] * K, self.device)
                with autocast_context(self.device):
                    logits = model(**batch).logits.float().cpu()
                if out is None:
                    out = torch.empty((K, len(encoded), logits.shape[-1]), dtype=torch.float32)
                out[:, idx] = logits.reshape(K, len(idx), -1)
        finally:
            router.route_all(0)
            model.train(was_training)
        if out is None:
            return torch.empty((K, 0, 1))
        return out


@dataclass
class SweepPoint:
    lam: float
    validation: dict[str, float]
    test: dict[str, float]
    merge_seconds: float
    merge_peak_mb: float | None = None  # peak memory of the merge above the level before it

    @property
    def avg_validation(self) -> float:
        return mean(self.validation.values())


def sweep(
    evaluator: MergedEvaluator,
    merge_fn: Callable[[float], Any],
    lambdas: Sequence[float],
    *,
    with_test_curve: bool = True,
    merge_device: str = "cpu",
    feasible: Callable[[dict[str, float]], bool] | None = None,
    batched: bool | None = None,
) -> tuple[list[SweepPoint], Any, SweepPoint]:
    """Merge at each lambda, score on validation (and test, for the robustness curve only).

    Returns the curve, the merge result at the selected lambda and the selected point. Selection
    uses the average VALIDATION score only; ties go to the smaller lambda (the earlier one in
    ``lambdas``). With ``feasible`` (a test on the validation scores, e.g. constraint floors) the best
    feasible lambda is kept, and the best overall only when none is feasible. Each point records the
    merge's time and peak memory (:func:`osrm_lora.memory.measure_peak` on ``merge_device``: exact
    on CUDA; sampled resident memory on CPU, where memory freed by an earlier merge is reused, so the
    first point shows the peak best).

    ``batched=True``: the lambdas whose merge keeps LoRA factors (:func:`low_rank_modules`, e.g. Task
    Arithmetic) are scored together with :meth:`MergedEvaluator.evaluate_many`, up to
    :meth:`MergedEvaluator.models_per_pass` merges per forward (their results are kept until then:
    factors only); dense merges are scored as soon as they are made, folded in turn, and only the
    best one is kept. ``False``: every lambda folded in turn (the path before batching). ``None``
    (default): batched when the evaluator runs on an accelerator, folded on the CPU, where one
    forward over K x the rows costs what K forwards cost and the batched path measured ~15% slower
    (``python bench/pipeline_speed.py --preset cpu --sweep-eval``). Both give the same curve to float
    rounding. An evaluator without ``evaluate_many`` is always folded.
    """
    from osrm_lora.logutil import Progress
    from osrm_lora.memory import measure_peak

    if batched is None:
        batched = getattr(getattr(evaluator, "device", None), "type", "cpu") != "cpu"
    use_many = batched and hasattr(evaluator, "evaluate_many")
    per_pass = evaluator.models_per_pass() if use_many else 1
    points: list[SweepPoint | None] = [None] * len(lambdas)
    seconds_of: dict[int, tuple[float, float]] = {}
    # ((feasible, avg validation), -position): the largest wins; ties go to the earlier lambda
    best: tuple[tuple[tuple[bool, float], int], Any, SweepPoint] | None = None
    pending: list[tuple[int, Any]] = []
    progress = Progress(f"merge + evaluate ({len(evaluator.slots)} tasks)", len(lambdas), {"lam": "λ={:g}"})

    def finish(j: int, result: Any, val: dict[str, float], test: dict[str, float]) -> None:
        nonlocal best
        lam = lambdas[j]
        seconds, peak_mb = seconds_of.pop(j)
        point = SweepPoint(lam, val, test, seconds, peak_mb)
        points[j] = point
        logger.debug("lambda %.2f: validation avg %.2f", lam, point.avg_validation)
        key = ((feasible is None or feasible(val), point.avg_validation), -j)
        if best is None or key > best[0]:
            best = (key, result, point)
        progress.advance(1, lam=lam)

    def flush() -> None:
        results = [r for _, r in pending]
        vals = evaluator.evaluate_many(results, "validation")
        tests = evaluator.evaluate_many(results, "test") if with_test_curve else [{} for _ in results]
        for (j, result), val, test in zip(pending, vals, tests):
            finish(j, result, val, test)
        pending.clear()

    for j, lam in enumerate(lambdas):
        progress.advance(0, lam=lam)
        def timed(lam: float = lam) -> tuple[Any, float]:  # the merge alone, not measure_peak's clean-up
            t0 = time.perf_counter()
            return merge_fn(lam), time.perf_counter() - t0

        peak, (result, seconds) = measure_peak(timed, device=merge_device)
        seconds_of[j] = (seconds, peak.bytes / 2**20)
        if use_many and low_rank_modules(result) is not None:
            pending.append((j, result))
            if len(pending) >= per_pass:
                flush()
            continue
        per_task = bool(getattr(result, "per_task_deltas", None))
        val = evaluator.evaluate(result.deltas_for, "validation", per_task=per_task)
        test = evaluator.evaluate(result.deltas_for, "test", per_task=per_task) if with_test_curve else {}
        finish(j, result, val, test)
        del result
    if pending:
        flush()
    progress.close()
    assert best is not None
    curve = [p for p in points if p is not None]
    selected, best_result = best[2], best[1]
    if not with_test_curve:
        per_task = bool(getattr(best_result, "per_task_deltas", None))
        selected.test = evaluator.evaluate(best_result.deltas_for, "test", per_task=per_task)
    return curve, best_result, selected
