"""Inputs of data-aware merge methods, built from our artifacts at the pipeline's edge.

- ``grams`` (RegMean): each task's input second moment per module, from the statistics store that
  OSRM already computed (no extra forward pass).
- ``fisher`` (Fisher merging): diagonal Fisher of each task's LoRA factors on its training data,
  E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2], estimated per example under its own adapter.
- ``entropy_fn`` (AdaMerging): mean prediction entropy of every task's head on unlabeled
  validation inputs, differentiable in the merged deltas.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from osrm_lora.backbone import set_head
from osrm_lora.data.task import Task
from osrm_lora.encoding import collate, encode_split
from osrm_lora.errors import OsrmError
from osrm_lora.model.keys import (
    lora_factor,
    lora_module_key,
    match_key,
    model_prefix,
    module_paths,
    oriented,
    param_of,
    transposed_modules,
)

logger = logging.getLogger(__name__)


def grams_from_store(stats_dir: Path, adapters: Sequence[Any], tasks: Sequence[Task]) -> list[dict[str, torch.Tensor]]:
    """Per task: module key -> second moment (n x n, float32) of that module's input."""
    from osrm_lora.stats import StatsStore

    store = StatsStore.load(stats_dir)
    missing = [t.name for t in tasks if t.name not in store.tasks]
    if missing:
        raise OsrmError(f"statistics store {stats_dir} has no data for tasks {missing}; profile those tasks first")
    out: list[dict[str, torch.Tensor]] = []
    for adapter, task in zip(adapters, tasks):
        out.append({key: store.second_moment(task.name, store.group_of(key)).float()
                    for key in adapter.modules})
    return out


def _peft_on(evaluator: Any, adapter_dir: Path, slot: Any) -> Any:  # a peft.PeftModel (peft is untyped)
    from peft import PeftModel

    evaluator.restore()
    set_head(evaluator.model, slot.head, slot.info.num_labels, slot.info.problem_type)
    return PeftModel.from_pretrained(evaluator.model, str(adapter_dir), is_trainable=True)


def fisher_diagonals(evaluator: Any, adapter_dirs: Sequence[Path], n_samples: int = 64, seed: int = 0,
                     max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Diagonal Fisher of each task's lora_A / lora_B on up to ``n_samples`` of its TRAIN inputs,
    truncated to ``max_length`` tokens (the pipeline passes ``train.max_length``)."""
    out: list[dict[str, torch.Tensor]] = []
    gen = torch.Generator().manual_seed(seed)
    for slot, adir in zip(evaluator.slots, adapter_dirs):
        task: Task = slot.task
        peft_model = _peft_on(evaluator, adir, slot)
        try:
            params = {n: p for n, p in peft_model.named_parameters() if lora_factor(n) is not None}
            acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            enc = encode_split(evaluator.tokenizer, task.train, max_length, task.problem_type == "regression")
            idx = torch.randperm(len(enc), generator=gen)[: n_samples].tolist()
            dev = next(peft_model.parameters()).device
            peft_model.eval()
            for i in idx:
                batch = {k: v.to(dev) for k, v in collate(evaluator.tokenizer, [enc.features[i]]).items()}
                logits = peft_model(**batch).logits.float()
                if task.problem_type == "regression":
                    logp = logits[0, 0]  # Fisher of a unit-variance Gaussian = (d mu / d theta)^2
                else:
                    probs = logits.softmax(-1)[0].detach().float().cpu()
                    y = int(torch.multinomial(probs, 1, generator=gen.manual_seed(seed + i)).item()) if probs.numel() > 1 else 0
                    logp = logits.log_softmax(-1)[0, y]
                peft_model.zero_grad(set_to_none=True)
                logp.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += p.grad.detach().float() ** 2
            fisher: dict[str, torch.Tensor] = {}
            for n, v in acc.items():
                fisher[f"{lora_module_key(n)}.{lora_factor(n)}"] = (v / max(len(idx), 1)).cpu()
            out.append(fisher)
        finally:
            peft_model.unload()
    return out


_Batch = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str, torch.Tensor]


def _validation_batches(evaluator: Any, n_per_task: int, seed: int,
                        only: Sequence[int] | None = None) -> list[_Batch]:
    """Per task (or the tasks ``only``): a random batch of ``n_per_task`` VALIDATION examples, its head,
    problem type and labels, on the evaluator's device (the same draw for the same seed)."""
    model = evaluator.model
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    out = []
    for i, slot in enumerate(evaluator.slots):
        enc = slot.encoded["validation"]
        idx = torch.randperm(len(enc), generator=gen)[:n_per_task].tolist()
        if only is not None and i not in only:
            continue
        batch = {k: v.to(dev) for k, v in collate(evaluator.tokenizer, [enc.features[j] for j in idx]).items()}
        head = {k: v.to(dev) for k, v in slot.head.items()}
        out.append((batch, head, slot.task.problem_type, enc.labels[idx].to(dev)))
    return out


def _merged_logits(evaluator: Any) -> Callable[[dict[str, torch.Tensor], _Batch], torch.Tensor]:
    """``logits(deltas, batch)``: the model with ``W0 + delta`` and the batch's head, differentiable in the deltas."""
    model = evaluator.model
    dev = next(model.parameters()).device
    base = {n: p.detach() for n, p in model.named_parameters()}
    paths, prefix, transposed = module_paths(base), model_prefix(model), transposed_modules(model)

    def weight_of(key: str) -> tuple[str, bool]:
        path = match_key(key, paths, prefix)
        if path is None:
            raise OsrmError(f"adapter module {key!r} does not exist in {type(model).__name__}; the adapter was made "
                            "for another base model")
        return param_of(path), path in transposed

    def logits(deltas: dict[str, torch.Tensor], item: _Batch) -> torch.Tensor:
        weights = {}
        for key, delta in deltas.items():
            name, fan_in_fan_out = weight_of(key)
            weights[name] = base[name] + oriented(delta, fan_in_fan_out).to(dev)
        batch, head = item[0], item[1]
        out: torch.Tensor = functional_call(model, {**base, **weights, **head}, args=(), kwargs=batch).logits.float()
        return out

    return logits


def _task_loss(logits: torch.Tensor, problem: str, labels: torch.Tensor) -> torch.Tensor:
    if problem == "regression":
        return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float())
    if problem == "multi_label_classification":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return torch.nn.functional.cross_entropy(logits, labels.long())


def entropy_function(evaluator: Any, n_per_task: int = 32,
                     seed: int = 0) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """AdaMerging objective: mean over tasks of the mean prediction entropy on unlabeled VALIDATION inputs."""
    batches = _validation_batches(evaluator, n_per_task, seed)
    logits_of = _merged_logits(evaluator)
    dev = next(evaluator.model.parameters()).device

    def entropy_fn(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        evaluator.restore()
        evaluator.model.eval()
        total = torch.zeros((), device=dev)
        count = 0
        for item in batches:
            if item[2] == "regression":
                continue
            logits = logits_of(deltas, item)
            p = logits.softmax(-1)
            total = total + (-(p * logits.log_softmax(-1)).sum(-1)).mean()
            count += 1
        if count == 0:
            raise OsrmError("adamerging needs at least one classification task (entropy is undefined for regression)")
        return total / count

    return entropy_fn


def constraint_function(evaluator: Any, own_deltas: Sequence[dict[str, torch.Tensor]], tasks: Sequence[int],
                        n_per_task: int = 32, seed: int = 0) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Penalty of constraint-aware AdaMerging: over the constraint ``tasks`` (indices), the mean rise of
    the task loss on a labeled VALIDATION batch of the merged model above its own adapter's,
    ``mean_c relu(loss_c(merged) - loss_c(own))`` (0 while every constraint task is served as well as
    by its own adapter). The loss (cross-entropy, BCE or MSE by problem type) stands in for the score,
    which has no gradient; the score floors themselves are checked on the selected merge."""
    if not tasks:
        raise OsrmError("constraint_function needs at least one constraint task")
    batches = _validation_batches(evaluator, n_per_task, seed + 1, only=tasks)
    logits_of = _merged_logits(evaluator)
    evaluator.restore()
    evaluator.model.eval()
    with torch.no_grad():
        own = [_task_loss(logits_of(own_deltas[t], item), item[2], item[3]) for t, item in zip(sorted(tasks), batches)]

    def constraint_fn(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        evaluator.restore()
        evaluator.model.eval()
        rises = [torch.relu(_task_loss(logits_of(deltas, item), item[2], item[3]) - ref)
                 for item, ref in zip(batches, own)]
        return torch.stack(rises).mean()

    return constraint_fn


def build_merge_context(
    needs: Iterable[str],
    adapters: Sequence[Any],
    tasks: Sequence[Task],
    adapter_dirs: Sequence[Path],
    evaluator: Any,
    *,
    stats_dir: Path | None,
    seed: int,
    max_length: int = 128,
    constraint_tasks: Sequence[int] = (),
) -> Any:
    """A :class:`MergeContext` with whatever the method needs; with ``constraint_tasks`` (indices) a
    method that optimises on data (AdaMerging) also gets the constraint penalty."""
    from osrm_lora.merge import MergeContext

    needs = set(needs)
    ctx = MergeContext(seed=seed)
    if "grams" in needs:
        if stats_dir is None:
            raise OsrmError("this merge method needs activation statistics; run `osrm-lora profile` first")
        ctx.grams = grams_from_store(stats_dir, adapters, tasks)
    if "fisher" in needs:
        ctx.fisher = fisher_diagonals(evaluator, adapter_dirs, seed=seed, max_length=max_length)
    if "entropy_fn" in needs or "adamerging_eval" in needs:
        ctx.entropy_fn = entropy_function(evaluator, seed=seed)
        if constraint_tasks:
            own = [{k: m.delta() for k, m in ad.modules.items()} for ad in adapters]
            ctx.constraint_fn = constraint_function(evaluator, own, constraint_tasks, seed=seed)
    return ctx
