"""Evaluate merged adapters: fold the merged update into one base model, swap each task's head in.

A lambda sweep re-merges for every lambda (cheap for LoRA) and scores every task on validation
(selection) and on test (reported once for the selected lambda; the whole test curve is kept only as
the robustness report, never for selection).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osrm_lora.backbone import (
    HeadInfo,
    apply_deltas,
    load_classifier,
    load_head,
    load_tokenizer,
    select_device,
    set_head,
)
from osrm_lora.data.task import Task
from osrm_lora.encoding import Encoded, encode_split
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import evaluate, mean

logger = logging.getLogger(__name__)

DeltasFn = Callable[[int], Mapping[str, torch.Tensor]]


@dataclass
class TaskSlot:
    """One task prepared for repeated evaluation: encoded splits and its head."""

    task: Task
    head: dict[str, torch.Tensor]
    info: HeadInfo
    encoded: dict[str, Encoded] = field(default_factory=dict)


class MergedEvaluator:
    """One base model in memory; evaluates any set of per-task dense updates on any split."""

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
        self.slots: list[TaskSlot] = []
        for task, hdir in zip(tasks, head_dirs):
            state, info = load_head(hdir)
            if info.task != task.name:
                raise OsrmError(f"head in {hdir} belongs to task {info.task!r}, not {task.name!r}; pass the matching adapter")
            if info.num_labels != task.num_labels:
                raise OsrmError(f"head of {task.name} has {info.num_labels} outputs but the task has {task.num_labels} labels")
            self.slots.append(TaskSlot(task, state, info))
        self.max_length = max_length
        for split in splits:
            self.add_split(split)
        self._originals: dict[str, torch.Tensor] = {}

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
                self.model.get_submodule(path).weight.copy_(original)
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
) -> tuple[list[SweepPoint], Any, SweepPoint]:
    """Merge at each lambda, score on validation (and test, for the robustness curve only).

    Returns the curve, the merge result at the selected lambda and the selected point. Selection
    uses the average VALIDATION score only; ties go to the smaller lambda. With ``feasible`` (a test
    on the validation scores, e.g. constraint floors) the best feasible lambda is kept, and the best
    overall only when none is feasible. Each point records the
    merge's time and peak memory (:func:`osrm_lora.memory.measure_peak` on ``merge_device``: exact
    on CUDA; sampled resident memory on CPU, where memory freed by an earlier merge is reused, so the
    first point shows the peak best).
    """
    from osrm_lora.logutil import Progress
    from osrm_lora.memory import measure_peak

    curve: list[SweepPoint] = []
    best: tuple[tuple[bool, float], float, Any, SweepPoint] | None = None
    progress = Progress(f"merge + evaluate ({len(evaluator.slots)} tasks)", len(lambdas), {"lam": "λ={:g}"})
    for lam in lambdas:
        progress.advance(0, lam=lam)
        def timed(lam: float = lam) -> tuple[Any, float]:  # the merge alone, not measure_peak's clean-up
            t0 = time.perf_counter()
            return merge_fn(lam), time.perf_counter() - t0

        peak, (result, seconds) = measure_peak(timed, device=merge_device)
        per_task = bool(getattr(result, "per_task_deltas", None))
        val = evaluator.evaluate(result.deltas_for, "validation", per_task=per_task)
        test = evaluator.evaluate(result.deltas_for, "test", per_task=per_task) if with_test_curve else {}
        point = SweepPoint(lam, val, test, seconds, peak.bytes / 2**20)
        curve.append(point)
        logger.debug("lambda %.2f: validation avg %.2f", lam, point.avg_validation)
        key = (feasible is None or feasible(val), point.avg_validation)
        if best is None or key > best[0]:
            best = (key, lam, result, point)
        progress.advance(1, lam=lam)
    progress.close()
    assert best is not None
    selected = best[3]
    if not with_test_curve:
        per_task = bool(getattr(best[2], "per_task_deltas", None))
        selected.test = evaluator.evaluate(best[2].deltas_for, "test", per_task=per_task)
    return curve, best[2], selected
