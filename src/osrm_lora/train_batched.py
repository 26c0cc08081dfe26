"""Many adapters in one pass: train K LoRA adapters (tasks and/or inits) on one shared frozen base.

The base model is loaded once. Every adapted ``nn.Linear`` computes its base output once for the
whole batch, which concatenates the examples of several adapters; each example then goes through
its own adapter's LoRA factors (the factors of the adapters in the batch are stacked to
``(G, r, n)`` / ``(G, m, r)`` and applied with ``bmm`` per contiguous group of rows) and its own
task head. The loss is the SUM of the per-adapter mean losses, so each adapter's gradient is its
gradient alone; every adapter keeps its own AdamW, schedule, gradient clipping (by its own norm),
data order (its own seeded generator: the batches it would see alone), best-epoch selection,
A projection, LoRI mask and interference penalty. An adapter whose epoch is over adds no examples
to the remaining steps of that epoch (no gradient, no optimizer step: its Adam state does not
advance).

Each adapter is written exactly as :func:`osrm_lora.train.train_task` writes it (same directory
layout, ``metrics.json`` keys, head files), as soon as its last epoch is done.

Not bit-identical to training one at a time: padding to the longest example of the combined batch
and the batched matmuls change float rounding (agreement ~1e-6 per step in float32), and dropout
(the base model's and LoRA's) draws other random masks, so with dropout > 0 runs agree in
distribution only.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from osrm_lora.backbone import head_module_names, load_tokenizer, resolve_model_path
from osrm_lora.config import LoraSettings, TrainSettings
from osrm_lora.data.task import Task
from osrm_lora.distributed import rank_device
from osrm_lora.encoding import Encoded, collate, encode_split, train_batches
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import autocast_context, evaluate
from osrm_lora.logutil import Progress
from osrm_lora.model.keys import (
    is_lora_tensor,
    lora_factor,
    lora_factor_name,
    lora_module_key,
    lora_pairs,
    peft_name,
    strip_peft_prefix,
)
from osrm_lora.train import (
    GramLookup,
    TrainResult,
    _apply_masks,
    _inner_model,
    _linear_schedule,
    _project_A,
    _save,
    a_drift,
    check_train_options,
    encode_train_validation,
    initial_peft_model,
    load_state,
    lori_masks,
    optimizer_for,
    penalty_fn,
    set_factors,
    set_seed,
    subspace_projectors,
    trainable_state,
)

logger = logging.getLogger(__name__)

__all__ = ["AdapterJob", "BatchingUnsupported", "MultiAdapterModel", "Router", "grouped_lora_delta",
           "train_tasks_batched"]


class BatchingUnsupported(OsrmError):
    """A combination the batched path cannot train together; train those adapters one at a time
    (:func:`osrm_lora.train.train_task`). Raised before anything is trained or written."""


@dataclass
class AdapterJob:
    """One adapter of a batched pass: what :func:`osrm_lora.train.train_task` takes for it.

    ``train`` / ``lora`` of None use the pass's settings. The LoRA shape must be the same for every
    adapter of a pass; the training settings (epochs, batch size, learning rates, max length, ...)
    may differ per adapter.
    """

    task: Task
    out_dir: str | os.PathLike[str]
    seed: int = 0
    train: TrainSettings | None = None
    lora: LoraSettings | None = None
    init_A: Mapping[str, torch.Tensor] | None = None
    freeze_A: bool = False
    freeze_B: bool = False
    init_name: str = "standard"
    evaluate_test: bool = True
    A_subspace: Mapping[str, torch.Tensor] | None = None
    b_sparsity: float | None = None
    calibration_epochs: int = 1
    interference_grams: GramLookup | None = None
    interference_penalty: float = 0.0
    A_frozen_rows: Mapping[str, torch.Tensor] | None = None


# --------------------------------------------------------------------------- routing
class _Router:
    """Which rows of the current batch belong to which adapter slot: contiguous groups, in order."""

    def __init__(self) -> None:
        self.slots: list[int] = [0]
        self.sizes: list[int] | None = None  # None: every row belongs to slots[0]
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None

    def route_all(self, slot: int) -> None:
        """Every row of the following forwards goes to ``slot`` (evaluation)."""
        self.slots, self.sizes, self._index = [slot], None, None

    def route(self, slots: Sequence[int], sizes: Sequence[int], device: torch.device) -> None:
        """The next forward's rows: ``sizes[i]`` rows of ``slots[i]``, one group after the other."""
        self.slots, self.sizes = list(slots), list(sizes)
        self._index = None
        if len(set(self.sizes)) > 1:  # unequal groups: padded into (G, max size) by these indices
            group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(self.sizes))
            pos = torch.cat([torch.arange(s) for s in self.sizes])
            self._index = (group.to(device), pos.to(device))

    def spans(self, n_rows: int) -> list[tuple[int, int, int]]:
        """``(slot, start, end)`` row ranges of a batch of ``n_rows``."""
        if self.sizes is None:
            return [(self.slots[0], 0, n_rows)]
        if sum(self.sizes) != n_rows:
            raise RuntimeError(f"batch of {n_rows} rows routed as {self.sizes}")
        out, start = [], 0
        for slot, size in zip(self.slots, self.sizes):
            out.append((slot, start, start + size))
            start += size
        return out

    def to_groups(self, h: torch.Tensor) -> torch.Tensor:
        """(N, L, n) rows -> (G, S * L, n), S the largest group (smaller groups padded with zeros)."""
        assert self.sizes is not None
        n_groups, width = len(self.sizes), max(self.sizes)
        if self._index is None:
            return h.reshape(n_groups, width * h.shape[1], h.shape[2])
        padded = h.new_zeros(n_groups, width, h.shape[1], h.shape[2]).index_put(self._index, h)
        return padded.reshape(n_groups, width * h.shape[1], h.shape[2])

    def from_groups(self, d: torch.Tensor, length: int) -> torch.Tensor:
        """Inverse of :meth:`to_groups`: (G, S * L, m) -> (N, L, m)."""
        assert self.sizes is not None
        if self._index is None:
            return d.reshape(sum(self.sizes), length, d.shape[2])
        return d.reshape(len(self.sizes), max(self.sizes), length, d.shape[2])[self._index]


Router = _Router  # public name: the row routing of :func:`grouped_lora_delta` (batched evaluation uses it)


class MultiLoraLinear(nn.Module):
    """A frozen base layer plus one LoRA pair (A: r x n, B: m x r) per adapter slot; each row of the
    input gets its own slot's update. The base output is computed once for all rows."""

    def __init__(self, base_layer: nn.Module, A: Sequence[nn.Parameter], B: Sequence[nn.Parameter], scaling: float,
                 dropout: nn.Module, router: _Router) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterList(A)
        self.lora_B = nn.ParameterList(B)
        self.lora_dropout = dropout
        self.scaling = scaling
        self._router = router

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        router = self._router
        if router.sizes is None:  # one adapter for every row: exactly PEFT's LoRA forward
            k = router.slots[0]
            h = self.lora_dropout(x.to(self.lora_A[k].dtype))
            result = result + F.linear(F.linear(h, self.lora_A[k]), self.lora_B[k]) * self.scaling
            return result.to(out_dtype)
        A = torch.stack([self.lora_A[k] for k in router.slots])  # (G, r, n)
        B = torch.stack([self.lora_B[k] for k in router.slots])  # (G, m, r)
        delta = grouped_lora_delta(self.lora_dropout(x.to(A.dtype)), A, B, router)
        return (result + delta * self.scaling).to(out_dtype)


def grouped_lora_delta(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, router: _Router) -> torch.Tensor:
    """The stacked multi-adapter LoRA operator: rows of ``h`` (N, ..., n) grouped as ``router``
    routes them, group g through ``B[g] @ A[g]`` (``A``: (G, r, n), ``B``: (G, m, r), one pair per
    routed group, in the router's order) with two batched matmuls; returns (N, ..., m), no scaling.
    Shared by batched training (:class:`MultiLoraLinear`) and the batched evaluation of low-rank
    merges (:mod:`osrm_lora.merged_eval`)."""
    n_rows, lead = h.shape[0], h.shape[1:-1]
    h = h.reshape(n_rows, -1, h.shape[-1])  # (N, L, n)
    grouped = torch.bmm(torch.bmm(router.to_groups(h), A.transpose(1, 2)), B.transpose(1, 2))
    return router.from_groups(grouped, h.shape[1]).reshape(n_rows, *lead, B.shape[1])


def _rows(value: Any, start: int, end: int, n_rows: int) -> Any:
    """Rows ``start:end`` of a batch-first tensor argument; anything else as is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
        return value[start:end]
    return value


class RoutedHead(nn.Module):
    """One copy of a head module (classifier, pooler) per adapter slot; each row goes through its
    slot's copy. Outputs of different widths (tasks with different label counts) are padded with
    zeros on the last dimension: adapter k's logits are the first ``num_labels_k`` columns."""

    def __init__(self, heads: Sequence[nn.Module], router: _Router) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self._router = router

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        spans = self._router.spans(x.shape[0])
        if len(spans) == 1:
            out: torch.Tensor = self.heads[spans[0][0]](x, *args, **kwargs)
            return out
        n = x.shape[0]
        outs = [self.heads[k](x[s:e], *(_rows(a, s, e, n) for a in args),
                              **{key: _rows(v, s, e, n) for key, v in kwargs.items()}) for k, s, e in spans]
        width = max(o.shape[-1] for o in outs)
        return torch.cat([F.pad(o, (0, width - o.shape[-1])) for o in outs])


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# --------------------------------------------------------------------------- the shared model
@dataclass
class AdapterSlot:
    """One adapter inside a :class:`MultiAdapterModel`: its parameters (keyed by the parameter names
    of the PEFT model that :func:`~osrm_lora.train.train_task` builds, in that model's order) and its
    training pieces."""

    index: int
    job: AdapterJob
    train: TrainSettings
    params: dict[str, nn.Parameter]
    A0: dict[str, torch.Tensor]
    enc_train: Encoded
    enc_val: Encoded
    loss_fn: nn.Module
    projectors: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    masks: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    penalty: Callable[[], torch.Tensor] | None = None

    @property
    def task(self) -> Task:
        return self.job.task

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.params.values() if p.requires_grad]

    def factors(self, which: str) -> dict[str, nn.Parameter]:
        """``which`` in {"lora_A", "lora_B"}: the LoRA factors by PEFT parameter name."""
        return {n: p for n, p in self.params.items() if lora_factor(n) == which}

    def current_A(self) -> dict[str, torch.Tensor]:
        return {lora_module_key(n): p.detach().cpu().clone() for n, p in self.factors("lora_A").items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """CPU copies of every LoRA factor and head parameter (what ``adapter_tensors`` gives solo)."""
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}


def _is_lora_linear(module: object) -> bool:
    return type(module) is LoraLinear


def _base_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer outside the LoRA factors and the head."""
    heads = tuple(peft_name(f"{h}.") for h in head_module_names(_inner_model(peft_model)))
    named = list(peft_model.named_parameters()) + list(peft_model.named_buffers())
    return {n: t for n, t in named if not is_lora_tensor(n) and not n.startswith(heads)}


def _skeleton(peft_model: nn.Module) -> nn.Module:
    """A copy of ``peft_model`` whose parameters and buffers live on the meta device (no memory): its
    structure and PEFT config are what :func:`~osrm_lora.train.write_peft_adapter` needs."""
    memo: dict[int, Any] = {}
    for t in [*peft_model.parameters(), *peft_model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(peft_model, memo)


class MultiAdapterModel:
    """One frozen base model carrying K adapters (LoRA factors + head each), for batched training.

    ``peft_model`` is the PEFT model of the first adapter with its LoRA layers replaced by
    :class:`MultiLoraLinear` and its head modules by :class:`RoutedHead`; ``skeleton`` is that PEFT
    model as built (on the meta device), with which :func:`~osrm_lora.train._save` writes each slot
    as a plain PEFT adapter.
    """

    def __init__(self, peft_model: nn.Module, skeleton: nn.Module, router: _Router, slots: list[AdapterSlot],
                 tokenizer: Any, model_path: str, lora: LoraSettings, device: torch.device) -> None:
        self.peft_model = peft_model
        self.skeleton = skeleton
        self.inner = _inner_model(peft_model)
        self.router = router
        self.slots = slots
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.lora = lora
        self.device = device

    @classmethod
    def build(cls, jobs: Sequence[AdapterJob], *, model: str | None = None, lora: LoraSettings = LoraSettings(),
              train: TrainSettings = TrainSettings(), device: str | None = None) -> MultiAdapterModel:
        """Load the base once and give every job its starting adapter and head: exactly the ones
        :func:`~osrm_lora.train.train_task` starts from (same seeds, same ``init_A``, same freezing).

        Jobs sharing (seed, label count, problem type, pooler training) share one initialisation
        load; other combinations load their own initial model once, whose base weights must equal
        the shared base's (BatchingUnsupported otherwise)."""
        if not jobs:
            raise OsrmError("no adapters to train")
        loras = [job.lora or lora for job in jobs]
        if any(lr != loras[0] for lr in loras):
            shapes = sorted({f"rank {lr.rank}, alpha {lr.alpha:g}, dropout {lr.dropout:g}, targets {lr.target_modules}"
                             for lr in loras})
            raise BatchingUnsupported(f"batched training needs one LoRA shape for all adapters, got {'; '.join(shapes)}; "
                                      "train them in separate passes or one at a time")
        lora = loras[0]
        trains = [job.train or train for job in jobs]
        dirs = [Path(job.out_dir).resolve() for job in jobs]
        if len(set(dirs)) != len(dirs):
            dup = next(d for d in dirs if dirs.count(d) > 1)
            raise OsrmError(f"two adapters of one batched pass write to {dup}; give each its own directory")
        for job, tr in zip(jobs, trains):
            check_train_options(tr, freeze_A=job.freeze_A, freeze_B=job.freeze_B, b_sparsity=job.b_sparsity,
                                interference_grams=job.interference_grams,
                                interference_penalty=job.interference_penalty, A_frozen_rows=job.A_frozen_rows,
                                A_subspace=job.A_subspace)
            if job.A_frozen_rows:
                raise BatchingUnsupported(f"batched training does not hold part of A fixed (the rank split of "
                                          f"{job.init_name}); train those adapters one at a time")
        model_path = resolve_model_path(model)
        dev = rank_device(device)
        set_seed(jobs[0].seed)
        tokenizer = load_tokenizer(model_path)

        def key(i: int) -> tuple[int, int, str, bool]:
            t = jobs[i].task
            return jobs[i].seed, t.num_labels, t.problem_type, trains[i].train_pooler

        groups: dict[tuple[int, int, str, bool], list[int]] = {}
        for i in range(len(jobs)):
            groups.setdefault(key(i), []).append(i)
        shell: nn.Module | None = None
        shell_base: dict[str, torch.Tensor] = {}
        start: dict[int, tuple[list[tuple[str, torch.Tensor, bool]], dict[str, nn.Module], dict[str, torch.Tensor]]] = {}
        for (seed, num_labels, problem_type, _), members in groups.items():
            set_seed(seed)  # the random state train_task loads with
            peft_model = initial_peft_model(model_path, num_labels, problem_type, lora, trains[members[0]], seed, dev,
                                            tokenizer.pad_token_id)
            if shell is None:
                shell, shell_base = peft_model, _base_state(peft_model)
                _check_batchable(peft_model)
            else:
                other = _base_state(peft_model)
                if other.keys() != shell_base.keys() or any(not torch.equal(other[n], t) for n, t in shell_base.items()):
                    raise BatchingUnsupported(
                        "the base weights differ between adapters with other seeds or label counts (the checkpoint "
                        "lacks weights that are initialised at random); train them one at a time")
            inner = _inner_model(peft_model)
            heads = head_module_names(inner)
            prefixes = tuple(peft_name(f"{h}.") for h in heads)
            A_names = [n for n, _ in peft_model.named_parameters() if lora_factor(n) == "lora_A"]
            params = dict(peft_model.named_parameters())
            A_start = {n: params[n].detach().clone() for n in A_names}
            for i in members:
                with torch.no_grad():  # every job of the group starts from the freshly initialised A
                    for n in A_names:
                        params[n].copy_(A_start[n])
                A0 = set_factors(peft_model, jobs[i].init_A, freeze_A=jobs[i].freeze_A, freeze_B=jobs[i].freeze_B)
                values = [(n, p.detach().clone(), p.requires_grad) for n, p in peft_model.named_parameters()
                          if is_lora_tensor(n) or n.startswith(prefixes)]
                start[i] = (values, {h: copy.deepcopy(inner.get_submodule(h)) for h in heads}, A0)
            if peft_model is not shell:
                del peft_model, params, inner
        assert shell is not None
        skeleton = _skeleton(shell)
        router = _Router()
        inner = _inner_model(shell)
        heads = head_module_names(inner)

        # per slot: its LoRA parameters (by PEFT name) and its head modules
        slot_params: list[dict[str, nn.Parameter]] = [{} for _ in jobs]
        for i in range(len(jobs)):
            for n, value, grad in start[i][0]:
                if is_lora_tensor(n):
                    slot_params[i][n] = nn.Parameter(value, requires_grad=grad)
        layers = [(name, mod) for name, mod in shell.named_modules() if _is_lora_linear(mod)]
        for name, mod in layers:
            A = [slot_params[i][lora_factor_name(name, "lora_A", "default")] for i in range(len(jobs))]
            B = [slot_params[i][lora_factor_name(name, "lora_B", "default")] for i in range(len(jobs))]
            _set_submodule(shell, name, MultiLoraLinear(mod.base_layer, A, B, float(mod.scaling["default"]),
                                                        mod.lora_dropout["default"], router))
        for h in heads:
            _set_submodule(inner, h, RoutedHead([start[i][1][h] for i in range(len(jobs))], router))

        slots = []
        for i, job in enumerate(jobs):
            head_params = {peft_name(f"{h}.{n}"): p for h in heads for n, p in start[i][1][h].named_parameters()}
            ordered = {n: slot_params[i][n] if is_lora_tensor(n) else head_params[n] for n, _, _ in start[i][0]}
            for n, value, grad in start[i][0]:  # the head copies carry their initial values and flags already
                assert ordered[n].requires_grad == grad and torch.equal(ordered[n].detach(), value), n
            enc_train, enc_val = encode_train_validation(tokenizer, job.task, trains[i])
            slot = AdapterSlot(i, job, trains[i], ordered, start[i][2], enc_train, enc_val,
                               nn.MSELoss() if job.task.problem_type == "regression" else nn.CrossEntropyLoss())
            if job.A_subspace and not job.freeze_A:
                slot.projectors = subspace_projectors(
                    {lora_module_key(n): p for n, p in slot.factors("lora_A").items()}, job.A_subspace, dev)
            if job.interference_grams is not None:
                pairs = lora_pairs(slot.factors("lora_A"), slot.factors("lora_B"))
                slot.penalty = penalty_fn(pairs, job.interference_grams, dev)
            slots.append(slot)
        return cls(shell, skeleton, router, slots, tokenizer, model_path, lora, dev)

    def batch_losses(self, batches: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        """One forward over the concatenated training examples ``batches`` (``(slot, example
        indices)`` pairs, one per slot): each slot's mean loss on its examples, as the solo loop
        computes it (no penalty)."""
        feats: list[dict[str, list[int]]] = []
        labels: list[torch.Tensor] = []
        for k, idx in batches:
            enc = self.slots[k].enc_train
            feats.extend(enc.features[i] for i in idx)
            labels.append(enc.labels[list(idx)])
        batch = {key: v.to(self.device) for key, v in collate(self.tokenizer, feats).items()}
        self.router.route([k for k, _ in batches], [len(idx) for _, idx in batches], self.device)
        try:
            with autocast_context(self.device):
                logits = self.inner(**batch).logits.float()
        finally:
            self.router.route_all(batches[0][0])
        losses, start = [], 0
        for (k, idx), y in zip(batches, labels):
            slot = self.slots[k]
            part = logits[start : start + len(idx), : slot.task.num_labels]
            y = y.to(self.device)
            losses.append(slot.loss_fn(part[:, 0], y) if slot.task.problem_type == "regression"
                          else slot.loss_fn(part, y))
            start += len(idx)
        return losses

    def evaluate(self, k: int, encoded: Encoded, batch_size: int) -> float:
        """Slot ``k``'s score on an encoded split of its task (every row through slot ``k``)."""
        self.router.route_all(k)
        return evaluate(self.inner, self.tokenizer, self.slots[k].task, encoded, batch_size)


def _check_batchable(peft_model: nn.Module) -> None:
    """BatchingUnsupported for LoRA layers the batched forward does not handle."""
    inner_heads = tuple(peft_name(f"{h}.") for h in head_module_names(_inner_model(peft_model)))
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        short = strip_peft_prefix(name)
        if not _is_lora_linear(mod):
            raise BatchingUnsupported(f"batched training supports LoRA on linear layers only, not on {short} "
                                      f"({type(mod).__name__}); choose other target_modules or train one at a time")
        if f"{name}.".startswith(inner_heads):
            raise BatchingUnsupported(f"batched training cannot adapt {short}, which is part of the task head; "
                                      "narrow target_modules or train one at a time")
        if mod.use_dora.get("default") or getattr(mod, "lora_bias", {}).get("default"):
            raise BatchingUnsupported(f"batched training supports plain LoRA only ({short}); train one at a time")


# --------------------------------------------------------------------------- the training loop
@dataclass
class _Run:
    """Where one slot stands: its phase (LoRI calibration, then training), optimizer and data order."""

    slot: AdapterSlot
    phases: list[tuple[str, int]]
    phase: int = 0
    epoch: int = 0  # epochs done in the current phase
    optimizer: Any = None
    scheduler: Any = None
    generator: torch.Generator | None = None
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRI: the state to go back to
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds: float = 0.0
    running: float = 0.0
    seen: int = 0
    result: TrainResult | None = None

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of this slot (solo: ``ceil(n / batch_size)``)."""
        return math.ceil(len(self.slot.enc_train) / self.slot.train.batch_size)

    def start_phase(self) -> None:
        """A fresh optimizer, schedule and generator for the phase, as the solo path makes them."""
        name, epochs = self.phases[self.phase]
        cfg, slot = self.slot.train, self.slot
        total = self.steps_per_epoch() * epochs
        self.optimizer = optimizer_for(slot.params.items(), cfg)
        self.scheduler = _linear_schedule(self.optimizer, int(round(cfg.warmup_ratio * total)), total)
        self.generator = torch.Generator().manual_seed(slot.job.seed)
        if name == "calibrate":
            self.initial = trainable_state(slot.params.items())


def _total_steps(runs: Sequence[_Run]) -> int:
    """Steps of the whole pass: per round of epochs, the longest epoch among the runs still going."""
    lengths = [[r.steps_per_epoch()] * sum(e for _, e in r.phases) for r in runs]
    return sum(max(seq[i] for seq in lengths if len(seq) > i) for i in range(max(len(s) for s in lengths)))


def _step(model: MultiAdapterModel, work: list[tuple[_Run, list[int]]]) -> list[float]:
    """One optimizer step of every slot in ``work`` on its batch; returns their mean losses."""
    losses = model.batch_losses([(run.slot.index, idx) for run, idx in work])
    values = torch.stack([loss.detach() for loss in losses]).tolist()
    for (run, _), value in zip(work, values):
        if not math.isfinite(value):
            raise OsrmError(f"training {run.slot.task.name} diverged (loss {value}); lower the learning rate")
    total: torch.Tensor | None = None
    for (run, _), loss in zip(work, losses):
        run.optimizer.zero_grad(set_to_none=True)
        slot = run.slot
        term = loss * 1.0
        if slot.penalty is not None and slot.job.interference_penalty > 0:
            term = term + slot.job.interference_penalty * slot.penalty()
        total = term if total is None else total + term
    assert total is not None
    total.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    for run, _ in work:
        slot = run.slot
        torch.nn.utils.clip_grad_norm_(slot.trainable, slot.train.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        _project_A(slot.projectors)
        _apply_masks(slot.masks)
    return values


def _epoch_round(model: MultiAdapterModel, runs: list[_Run], progress: Progress) -> None:
    """One epoch of every run in ``runs`` together: each step takes the next batch of every run whose
    epoch still has batches."""
    model.inner.train()
    iters: list[tuple[_Run, Iterator[list[int]]]] = []
    for run in runs:
        assert run.generator is not None
        run.running, run.seen = 0.0, 0
        iters.append((run, iter(train_batches(run.slot.enc_train, run.slot.train.batch_size, run.generator))))
    t_start = time.perf_counter()
    while iters:
        work, alive = [], []
        for run, it in iters:
            idx = next(it, None)
            if idx is not None:
                work.append((run, idx))
                alive.append((run, it))
        iters = alive
        if not work:
            break
        t0 = time.perf_counter()
        values = _step(model, work)
        seconds = time.perf_counter() - t0
        n_rows = sum(len(idx) for _, idx in work)
        for (run, idx), value in zip(work, values):
            run.running += value * len(idx)
            run.seen += len(idx)
            run.train_seconds += seconds * len(idx) / n_rows  # the step's time, shared by examples
            run.seconds += seconds * len(idx) / n_rows
        progress.advance(loss=sum(v * len(i) for (_, i), v in zip(work, values)) / n_rows,
                         rate=sum(r.seen for r in runs) / max(time.perf_counter() - t_start, 1e-9))


def _end_epoch(model: MultiAdapterModel, run: _Run, on_result: Callable[[int, TrainResult], None] | None) -> None:
    """After an epoch of ``run``: LoRI masks at the end of calibration; validation, best epoch and,
    after the last epoch, the test score and the written adapter."""
    t0 = time.perf_counter()
    slot, job = run.slot, run.slot.job
    name, epochs = run.phases[run.phase]
    run.epoch += 1
    if name == "calibrate":
        if run.epoch == epochs:
            assert job.b_sparsity is not None
            slot.masks = lori_masks(slot.factors("lora_B"), job.b_sparsity, slot.task.name, epochs)
            load_state(slot.params, run.initial)
            _apply_masks(slot.masks)
            run.initial = {}
            run.phase, run.epoch = run.phase + 1, 0
            run.start_phase()
        run.seconds += time.perf_counter() - t0
        return
    train_loss = run.running / max(run.seen, 1)
    val = model.evaluate(slot.index, slot.enc_val, slot.train.eval_batch_size)
    run.history.append({"epoch": run.epoch, "train_loss": train_loss, "validation": val})
    if slot.penalty is not None:
        with torch.no_grad():
            run.history[-1]["interference_ratio"] = float(slot.penalty())
    logger.info("%s [%s] epoch %d: loss %.4f, validation %s %.2f", slot.task.name, job.init_name, run.epoch,
                train_loss, slot.task.metric, val)
    if run.best is None or val > run.best[0]:
        run.best = (val, run.epoch, trainable_state(slot.params.items()))
    if run.epoch == epochs:
        load_state(slot.params, run.best[2])
        run.optimizer = run.scheduler = None  # frees the Adam state
        for p in slot.params.values():
            p.grad = None
        test_score = None
        if job.evaluate_test:
            regression = slot.task.problem_type == "regression"
            enc_test = encode_split(model.tokenizer, slot.task.test, slot.train.max_length, regression)
            test_score = model.evaluate(slot.index, enc_test, slot.train.eval_batch_size)
        drift = a_drift(slot.A0, slot.current_A())
        run.seconds += time.perf_counter() - t0
        result = TrainResult(slot.task.name, Path(job.out_dir), run.best[1], run.best[0], test_score, run.history,
                             drift, run.seconds, run.train_seconds)
        extra = {"b_sparsity": job.b_sparsity, "calibration_epochs": job.calibration_epochs if job.b_sparsity else None,
                 "interference_penalty": job.interference_penalty, "frozen_rows": 0}  # a rank split is refused
        _save(model.skeleton, slot.tensors(), slot.task, model.model_path, result, job.init_name, model.lora, slot.train,
              job.seed, job.freeze_A, job.freeze_B, world_size=1, extra=extra)
        run.result, run.best = result, None
        run.phase += 1
        if on_result is not None:
            on_result(slot.index, result)
        return
    run.seconds += time.perf_counter() - t0


def train_tasks_batched(
    jobs: Sequence[AdapterJob],
    *,
    model: str | None = None,
    lora: LoraSettings = LoraSettings(),
    train: TrainSettings = TrainSettings(),
    device: str | None = None,
    max_adapters: int | None = None,
    on_result: Callable[[int, TrainResult], None] | None = None,
) -> list[TrainResult]:
    """Train every job's adapter + head together on one shared frozen base (see the module
    docstring); returns one :class:`~osrm_lora.train.TrainResult` per job, in order, and writes each
    adapter directory exactly as :func:`~osrm_lora.train.train_task` does.

    ``max_adapters`` trains at most that many adapters per pass (passes one after the other).
    ``on_result(index, result)`` is called as soon as job ``index``'s adapter is written (adapters with
    fewer epochs finish first). Training happens in this process alone (never data parallel).
    ``seconds`` / ``train_seconds`` of a result are its share of the pass: the set-up divided evenly,
    every step's time divided by the examples each adapter had in it, its own evaluations.

    Refuses (before training anything) what :func:`~osrm_lora.train.train_task` refuses, and, as
    :class:`BatchingUnsupported`, adapters of different LoRA shapes, LoRA on layers other than
    linear ones or inside the task head, and base models whose weights depend on the seed or the
    label count.
    """
    if max_adapters is not None and max_adapters < 1:
        raise OsrmError(f"max_adapters must be >= 1, got {max_adapters}")
    if max_adapters is not None and len(jobs) > max_adapters:
        results: list[TrainResult] = []
        for s in range(0, len(jobs), max_adapters):
            def shifted(i: int, r: TrainResult, offset: int = s) -> None:
                if on_result is not None:
                    on_result(offset + i, r)
            results += train_tasks_batched(jobs[s : s + max_adapters], model=model, lora=lora, train=train,
                                           device=device, on_result=shifted)
        return results
    start = time.perf_counter()
    multi = MultiAdapterModel.build(jobs, model=model, lora=lora, train=train, device=device)
    set_seed(jobs[0].seed)  # the global random state (dropout) starts as the first adapter's would
    runs = []
    for slot in multi.slots:
        phases = ([("calibrate", slot.job.calibration_epochs)] if slot.job.b_sparsity else [])
        run = _Run(slot, phases + [("train", slot.train.epochs)])
        run.start_phase()
        runs.append(run)
        n_trainable = sum(p.numel() for p in slot.trainable)
        logger.info("training %s (%s): %d examples x %d epochs, %d trainable parameters, batched", slot.task.name,
                    slot.job.init_name, len(slot.enc_train), slot.train.epochs, n_trainable)
    setup = (time.perf_counter() - start) / len(runs)
    for run in runs:
        run.seconds += setup
    logger.info("training %d adapters together on one %s base (%s)", len(runs), Path(multi.model_path).name, multi.device)
    progress = Progress(f"train {len(runs)} adapters batched", _total_steps(runs),
                        {"loss": "loss {:.4f}", "rate": "{:.0f} ex/s"})
    try:
        while True:
            active = [r for r in runs if r.phase < len(r.phases)]
            if not active:
                break
            _epoch_round(multi, active, progress)
            for run in active:
                _end_epoch(multi, run, on_result)
    finally:
        progress.close()
    out = []
    for run in runs:
        assert run.result is not None
        out.append(run.result)
    return out
