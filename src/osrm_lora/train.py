"""LoRA fine-tuning of one task: PEFT adapter + task head, best epoch kept on validation.

Output directory (written atomically)::

    adapter_config.json, adapter_model.safetensors   # plain PEFT adapter (no head inside)
    head.safetensors, head.json                      # the task head, kept outside the adapter
    metrics.json                                     # per-epoch validation, best epoch, test score, A drift
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from osrm_lora.backbone import (
    HeadInfo,
    default_target_modules,
    head_module_name,
    head_module_names,
    load_classifier,
    load_tokenizer,
    resolve_model_path,
    save_head,
)
from osrm_lora.config import LoraSettings, TrainSettings
from osrm_lora.data.task import Task
from osrm_lora.distributed import DistEnv, all_reduce_sum, barrier, get_env, rank_device
from osrm_lora.encoding import Encoded, collate, encode_split, train_batches
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import autocast_context, evaluate
from osrm_lora.fsutil import atomic_dir, write_json
from osrm_lora.logutil import Progress
from osrm_lora.model.keys import is_lora_tensor, lora_factor, lora_module_key, lora_pairs, peft_name, strip_peft_prefix
from osrm_lora.osrm import DEFAULT_OSRM_MODE, INIT_MODES, A_drift, apply_A_to_peft

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch; deterministic kernels where cheap."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What training one task produced."""

    task: str
    out_dir: Path
    best_epoch: int
    validation: float
    test: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0  # optimisation steps only (no loading, no evaluation)


def build_peft_model(model: nn.Module, lora: LoraSettings, model_type: str, train_pooler: bool = True) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter; the head (classifier, and the pooler where the
    architecture has one) stays outside the adapter but trainable."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules or default_target_modules(model_type)
    cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works (scaling = alpha / r)
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as exc:
        raise OsrmError(f"cannot add LoRA to this model: {str(exc).splitlines()[0]}; check target_modules") from exc
    inner = _inner_model(peft_model)
    for name in head_module_names(inner) if train_pooler else [head_module_name(inner)]:
        for p in inner.get_submodule(name).parameters():
            p.requires_grad_(True)
    return peft_model


def _inner_model(peft_model: nn.Module) -> nn.Module:
    """The wrapped transformers model of a PEFT model (``peft_model.base_model.model``)."""
    return cast(nn.Module, cast(nn.Module, peft_model.base_model).model)


def lora_parameters(peft_model: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """``which`` in {"lora_A", "lora_B"}: the LoRA factor parameters of the default adapter."""
    return {n: p for n, p in peft_model.named_parameters() if lora_factor(n) == which}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; collective for a sharded one."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly FSDP-sharded) parameter, or the tensor itself."""
    local = getattr(t, "to_local", None)
    return local() if callable(local) else t


def current_A(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {lora_module_key(n): full_tensor(p.detach()).cpu().clone()
            for n, p in lora_parameters(peft_model, "lora_A").items()}


def shard_model(peft_model: nn.Module) -> None:
    """FSDP2 (``fully_shard``): one unit per transformer block (the model's ``_no_split_modules``),
    then the rest. Parameters become DTensors sharded over the process group."""
    from torch.distributed.fsdp import fully_shard

    inner = _inner_model(peft_model)
    block_types = set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in inner.modules() if type(m).__name__ in block_types and "Embedding" not in type(m).__name__]
    if not blocks:
        raise OsrmError(f"cannot find the transformer blocks of {type(inner).__name__} for FSDP; use strategy: ddp")
    for block in blocks:
        fully_shard(block)
    fully_shard(peft_model)


def _head_prefixes(peft_model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the task head (classifier, pooler) inside the PEFT model."""
    return tuple(peft_name(f"{h}.") for h in head_module_names(_inner_model(peft_model)))


def adapter_tensors(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU copies of every LoRA factor and head parameter, keyed by parameter name (collective
    when the model is FSDP-sharded: every rank must call it)."""
    heads = _head_prefixes(peft_model)
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in peft_model.named_parameters()
            if is_lora_tensor(n) or n.startswith(heads)}


def a_drift(A0: Mapping[str, torch.Tensor], A: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Relative drift ||A - A0||_F / ||A0||_F per module."""
    return {k: A_drift(A0[k], A[k]) for k in A0}


def _subspace_projectors(
    peft_model: nn.Module, subspaces: Mapping[str, torch.Tensor], device: torch.device
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(lora_A parameter, U (k x n)) pairs for the projected training of A."""
    A = {lora_module_key(name): param for name, param in lora_parameters(peft_model, "lora_A").items()}
    return subspace_projectors(A, subspaces, device)


def subspace_projectors(
    A: Mapping[str, nn.Parameter], subspaces: Mapping[str, torch.Tensor], device: torch.device
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(A parameter, U (k x n)) pairs for the projected training of A, ``A`` keyed by module key."""
    out = []
    for key, param in A.items():
        if key not in subspaces:
            raise OsrmError(f"no OSRM subspace for module {key}; the statistics were made for other target modules")
        U = subspaces[key].to(device, torch.float32)
        if U.shape[1] != param.shape[1] or U.shape[0] < param.shape[0]:
            raise OsrmError(f"OSRM subspace for {key} has shape {tuple(U.shape)}, incompatible with LoRA A "
                            f"{tuple(param.shape)}; subspace_dim must be >= rank")
        out.append((param, U))
    return out


def _project_A(projectors: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    # row-wise projection: applied to this process's rows when FSDP shards A
    with torch.no_grad():
        for param, U in projectors:
            rows = local_tensor(param)
            rows.copy_((rows @ U.T) @ U)


def _trainable_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return trainable_state(peft_model.named_parameters())


def _load_trainable_state(peft_model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    load_state(dict(peft_model.named_parameters()), state)


def trainable_state(named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require gradients, by name."""
    return {n: p.detach().clone() for n, p in named if p.requires_grad}


def load_state(params: Mapping[str, nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) back into ``params`` in place."""
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _optimizer(peft_model: nn.Module, cfg: TrainSettings) -> torch.optim.Optimizer:
    return optimizer_for(peft_model.named_parameters(), cfg)


def optimizer_for(named: Iterable[tuple[str, nn.Parameter]], cfg: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``named``: LoRA factors (names with ``.lora_``) at
    ``cfg.lr``, the head at ``cfg.head_lr`` (default ``cfg.lr``)."""
    lora: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for n, p in named:
        if not p.requires_grad:
            continue
        (lora if is_lora_tensor(n) else head).append(p)
    groups: list[dict[str, Any]] = [{"params": lora, "lr": cfg.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sparsity_masks(tensors: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """LoRI's masks: keep the ``1 - sparsity`` share of entries of largest magnitude over ALL tensors
    together (one global ranking across layers and projections); exactly ``ceil((1 - sparsity) N)``
    entries are kept, ties broken by position. Boolean masks of the tensors' shapes."""
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if not tensors:
        return {}
    flat = torch.cat([t.detach().abs().float().flatten().cpu() for t in tensors.values()])
    keep = max(1, math.ceil((1 - sparsity) * flat.numel() - 1e-9))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, t in tensors.items():
        masks[name] = chosen[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return masks


def output_energy(A: torch.Tensor, B: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``tr(B A S A^T B^T)`` = E ||B A h||^2 for inputs h of second moment ``S`` (n x n)."""
    return ((B @ (A @ S @ A.T)) * B).sum()


def interference_ratio(factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum_m tr(B A S_others A^T B^T) / sum_m tr(B A S_own A^T B^T)`` over ``(A, B, S_own, S_others)``
    per module: the output shift an adapter causes on the other tasks' inputs relative to its own
    (the LoRA scaling cancels). 0 while B = 0."""
    others = torch.stack([output_energy(A, B, Sx) for A, B, _, Sx in factors]).sum()
    own = torch.stack([output_energy(A, B, So) for A, B, So, _ in factors]).sum()
    positive = own > 0  # B = 0 gives 0 / 0: ratio 0 with finite gradients (no division by zero at all)
    return torch.where(positive, others / torch.where(positive, own, torch.ones_like(own)), torch.zeros_like(others))


GramLookup = Callable[[str], tuple[torch.Tensor, torch.Tensor]]
"""Module key -> (second moment of the task's own inputs, mean second moment of the other tasks')."""


def _penalty_fn(peft_model: nn.Module, grams: GramLookup, device: torch.device) -> Callable[[], torch.Tensor]:
    pairs = lora_pairs(lora_parameters(peft_model, "lora_A"), lora_parameters(peft_model, "lora_B"))
    return penalty_fn(pairs, grams, device)


def penalty_fn(pairs: Iterable[tuple[str, nn.Parameter, nn.Parameter]], grams: GramLookup,
               device: torch.device) -> Callable[[], torch.Tensor]:
    """The interference ratio of the ``(module key, A, B)`` factors as a closure (see
    :func:`interference_ratio`), with the second moments from ``grams``."""
    factors = []
    for key, a, b in pairs:
        own, others = grams(key)
        factors.append((a, b, own.to(device, torch.float32), others.to(device, torch.float32)))

    def penalty() -> torch.Tensor:
        return interference_ratio([(a.float(), b.float(), so, sx) for a, b, so, sx in factors])

    return penalty


@dataclass
class _Loop:
    """What one pass over the training data needs; ``masks`` keep B sparse (LoRI), ``penalty`` adds
    the weighted interference ratio to the loss."""

    forward: nn.Module
    tokenizer: Any
    enc: Any
    task: Task
    dev: torch.device
    env: DistEnv
    loss_fn: nn.Module
    batch_size: int
    max_grad_norm: float
    trainable: list[nn.Parameter]
    projectors: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    masks: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    penalty: Callable[[], torch.Tensor] | None = None
    penalty_weight: float = 0.0
    held_rows: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)


def freeze_rows(peft_model: nn.Module, rows: Mapping[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """A rank split: install ``rows`` (module key -> k x n, k < r) as the first k rows of each
    module's A, to be held fixed (:func:`_zero_row_grads`, :func:`_hold_rows`); the other r - k rows
    keep their initialisation and train. Returns (A parameter, the held rows)."""
    params = {lora_module_key(n): p for n, p in lora_parameters(peft_model, "lora_A").items()}
    missing = sorted(set(rows) - set(params))
    if missing:
        raise OsrmError(f"A_frozen_rows names modules the adapter does not have (e.g. {missing[0]}); "
                        "compute them for the same target_modules")
    held = []
    with torch.no_grad():
        for key, R in rows.items():
            p = params[key]
            k = int(R.shape[0])
            if not 0 < k < p.shape[0] or R.shape[1] != p.shape[1]:
                raise OsrmError(f"A_frozen_rows of {key} is {tuple(R.shape)} for an A of {tuple(p.shape)}; give "
                                f"k x {p.shape[1]} with 0 < k < rank")
            p[:k].copy_(R.to(p))
            held.append((p, p[:k].detach().clone()))
    return held


def _zero_row_grads(held: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """The held rows get no gradient (so neither gradient clipping nor the optimiser's moments see one)."""
    for param, rows in held:
        if param.grad is not None:
            param.grad[: rows.shape[0]] = 0


def _hold_rows(held: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Put the held rows back after a step (AdamW's decoupled weight decay moves them otherwise)."""
    with torch.no_grad():
        for param, rows in held:
            param[: rows.shape[0]].copy_(rows)


def _apply_masks(masks: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, mask in masks:
            param.mul_(mask)


def _train_epoch(loop: _Loop, optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator,
                 progress: Progress) -> tuple[float, float]:
    """One epoch of optimizer steps; returns (mean training loss, seconds)."""
    regression = loop.task.problem_type == "regression"
    running, seen, t0 = 0.0, 0, time.perf_counter()
    for idx in train_batches(loop.enc, loop.batch_size, generator):
        local, weight = local_share(idx, loop.env)
        batch = {k: v.to(loop.dev) for k, v in collate(loop.tokenizer, [loop.enc.features[i] for i in local]).items()}
        labels = loop.enc.labels[local].to(loop.dev)
        with autocast_context(loop.dev):
            logits = loop.forward(**batch).logits.float()
        loss = loop.loss_fn(logits[:, 0], labels) if regression else loop.loss_fn(logits, labels)
        batch_loss = _global_loss(loss, len(local) if weight else 0, loop.env)
        if not math.isfinite(batch_loss):
            raise OsrmError(f"training {loop.task.name} diverged (loss {batch_loss}); lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        total = loss * weight
        if loop.penalty is not None and loop.penalty_weight > 0:
            total = total + loop.penalty_weight * loop.penalty()
        total.backward()
        _zero_row_grads(loop.held_rows)
        torch.nn.utils.clip_grad_norm_(loop.trainable, loop.max_grad_norm)
        optimizer.step()
        scheduler.step()
        _project_A(loop.projectors)
        _apply_masks(loop.masks)
        _hold_rows(loop.held_rows)
        running += batch_loss * len(idx)
        seen += len(idx)
        progress.advance(loss=batch_loss, rate=seen / max(time.perf_counter() - t0, 1e-9))
    return running / max(seen, 1), time.perf_counter() - t0


def _calibrate_masks(loop: _Loop, peft_model: nn.Module, train: TrainSettings, epochs: int, sparsity: float,
                     seed: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """LoRI calibration: ``epochs`` of dense training, masks from the trained B, then every trainable
    parameter (adapter and head) back to its initial value."""
    initial = _trainable_state(peft_model)
    peft_model.train()
    total = math.ceil(len(loop.enc) / train.batch_size) * epochs
    optimizer = _optimizer(peft_model, train)
    scheduler = _linear_schedule(optimizer, int(round(train.warmup_ratio * total)), total)
    generator = torch.Generator().manual_seed(seed)
    progress = Progress(f"calibrate {loop.task.name}", total, {"loss": "loss {:.4f}", "rate": "{:.0f} ex/s"})
    try:
        for _ in range(epochs):
            _train_epoch(loop, optimizer, scheduler, generator, progress)
    finally:
        progress.close()
    masks = lori_masks(lora_parameters(peft_model, "lora_B"), sparsity, loop.task.name, epochs)
    _load_trainable_state(peft_model, initial)
    return masks


def lori_masks(B: Mapping[str, nn.Parameter], sparsity: float, task_name: str,
               epochs: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(B parameter, mask) pairs of LoRI's global masks (:func:`sparsity_masks`) for the current B."""
    masks = sparsity_masks(B, sparsity)
    kept = sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
    logger.info("%s: LoRI masks keep %.1f%% of B after %d calibration epoch(s)", task_name, 100 * kept, epochs)
    return [(B[n], m.to(B[n].device)) for n, m in masks.items()]


def check_train_options(
    train: TrainSettings,
    *,
    freeze_A: bool,
    freeze_B: bool,
    b_sparsity: float | None,
    interference_grams: GramLookup | None,
    interference_penalty: float,
    A_frozen_rows: Mapping[str, torch.Tensor] | None = None,
    A_subspace: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """The option combinations :func:`train_task` refuses (OsrmError with a one-line message)."""
    if freeze_A and freeze_B:
        raise OsrmError("freeze_A and freeze_B together leave nothing to train; unfreeze one")
    if A_frozen_rows and (freeze_A or A_subspace):
        raise OsrmError("A_frozen_rows (a rank split) freezes part of A: it cannot be combined with freeze_A "
                        "(all of A frozen) or A_subspace (all of A projected); drop one")
    if A_frozen_rows and train.strategy == "fsdp":
        raise OsrmError("A_frozen_rows (a rank split) is not supported with strategy: fsdp; use ddp")
    if (b_sparsity or interference_penalty) and train.strategy == "fsdp":
        raise OsrmError("b_sparsity and interference_penalty are not supported with strategy: fsdp; use ddp")
    if interference_penalty > 0 and interference_grams is None:
        raise OsrmError("interference_penalty needs the tasks' activation statistics (interference_grams)")


def initial_peft_model(model_path: str, num_labels: int, problem_type: str, lora: LoraSettings,
                       train: TrainSettings, seed: int, dev: torch.device, pad_token_id: int | None) -> nn.Module:
    """The classifier with its freshly initialised head and LoRA adapter, as :func:`train_task` starts
    from. Call it right after ``set_seed(seed)``: the load sees that random state, the adapter is then
    initialised from ``seed`` again (identically whatever loading consumed)."""
    base = load_classifier(model_path, num_labels, problem_type, device=dev, pad_token_id=pad_token_id)
    model_type = cast("PretrainedConfig", base.config).model_type
    set_seed(seed)  # head init is seeded identically whatever loading consumed
    return build_peft_model(base, lora, model_type, train_pooler=train.train_pooler)


def set_factors(peft_model: nn.Module, init_A: Mapping[str, torch.Tensor] | None, *, freeze_A: bool,
                freeze_B: bool) -> dict[str, torch.Tensor]:
    """Install ``init_A`` (module key -> r x n; None keeps PEFT's A), freeze A and/or B as asked and
    return the starting A per module key (for the drift)."""
    if init_A is not None:
        apply_A_to_peft(peft_model, init_A)
    A0 = current_A(peft_model)
    for p in lora_parameters(peft_model, "lora_A").values():
        p.requires_grad_(not freeze_A)
    for p in lora_parameters(peft_model, "lora_B").values():
        p.requires_grad_(not freeze_B)
    return A0


def encode_train_validation(tokenizer: Any, task: Task, train: TrainSettings) -> tuple[Encoded, Encoded]:
    """The encoded train and validation splits of ``task``; OsrmError when either is empty."""
    regression = task.problem_type == "regression"
    enc_train = encode_split(tokenizer, task.train, train.max_length, regression)
    enc_val = encode_split(tokenizer, task.validation, train.max_length, regression)
    if len(enc_train) == 0 or len(enc_val) == 0:
        raise OsrmError(f"task {task.name} has an empty train or validation split; provide more data")
    return enc_train, enc_val


def train_task(
    task: Task,
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    lora: LoraSettings = LoraSettings(),
    train: TrainSettings = TrainSettings(),
    seed: int = 0,
    device: str | None = None,
    init_A: Mapping[str, torch.Tensor] | None = None,
    freeze_A: bool = False,
    freeze_B: bool = False,
    init_name: str = "standard",
    evaluate_test: bool = True,
    A_subspace: Mapping[str, torch.Tensor] | None = None,
    data_parallel: bool | None = None,
    b_sparsity: float | None = None,
    calibration_epochs: int = 1,
    interference_grams: GramLookup | None = None,
    interference_penalty: float = 0.0,
    A_frozen_rows: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Fine-tune one LoRA adapter + head on ``task``; keep the best epoch by validation score.

    ``init_A`` (module key -> r x n) replaces PEFT's standard A initialisation (OSRM); B starts at 0.
    ``A_subspace`` (module key -> k x n, orthonormal rows) constrains A to that row space: after every
    optimizer step A <- A U^T U.
    The test split is scored once, with the selected checkpoint, as the single-task reference.

    ``data_parallel`` (default: whenever the process is one of several, see :mod:`osrm_lora.distributed`)
    trains with DistributedDataParallel: ``train.batch_size`` stays the GLOBAL batch, every rank
    takes its round-robin share of each batch and the loss is weighted so that the gradient equals
    the single-process gradient of the same global batch; validation and test are scored with the
    examples split over the ranks. Rank 0 writes the output. ``data_parallel=False`` trains in this
    process alone (one task per process, as the pipeline does for many tasks).

    ``b_sparsity`` trains B under LoRI's sparse mask (see :func:`sparsity_masks`), found by
    ``calibration_epochs`` of dense training from the same start. ``interference_grams`` (module key
    -> own and other tasks' input second moments) adds ``interference_penalty`` x
    :func:`interference_ratio` to the loss and records the ratio per epoch. ``A_frozen_rows`` (module
    key -> k x n, 0 < k < r): a rank split, the first k rows of A set to these (e.g. the best OSRM
    directions) and held fixed, the other r - k rows trained from PEFT's initialisation.
    """
    check_train_options(train, freeze_A=freeze_A, freeze_B=freeze_B, b_sparsity=b_sparsity,
                        interference_grams=interference_grams, interference_penalty=interference_penalty,
                        A_frozen_rows=A_frozen_rows, A_subspace=A_subspace)
    start = time.perf_counter()
    env = get_env()
    ddp = env.active if data_parallel is None else (data_parallel and env.active)
    if not ddp:
        env = DistEnv()  # this process works alone
    model_path = resolve_model_path(model)
    dev = rank_device(device)
    set_seed(seed)
    tokenizer = load_tokenizer(model_path)
    peft_model = initial_peft_model(model_path, task.num_labels, task.problem_type, lora, train, seed, dev,
                                    tokenizer.pad_token_id)
    A0 = set_factors(peft_model, init_A, freeze_A=freeze_A, freeze_B=freeze_B)
    held = freeze_rows(peft_model, A_frozen_rows) if A_frozen_rows else []
    if held:
        A0 = current_A(peft_model)

    regression = task.problem_type == "regression"
    enc_train, enc_val = encode_train_validation(tokenizer, task, train)

    if env.active and train.strategy == "fsdp":
        # every rank built the same seeded model, so the shards agree; sharding comes before the
        # optimizer and the subspace projectors, which must hold the sharded parameters
        shard_model(peft_model)
    steps_per_epoch = math.ceil(len(enc_train) / train.batch_size)
    total = steps_per_epoch * train.epochs
    optimizer = _optimizer(peft_model, train)
    scheduler = _linear_schedule(optimizer, int(round(train.warmup_ratio * total)), total)
    generator = torch.Generator().manual_seed(seed)
    loss_fn: nn.Module = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    projectors = _subspace_projectors(peft_model, A_subspace, dev) if A_subspace and not freeze_A else []
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    logger.info("training %s (%s): %d examples x %d epochs, %d trainable parameters%s", task.name, init_name,
                len(enc_train), train.epochs, n_trainable,
                f", data parallel over {env.world_size} processes" if env.active else "")
    forward: nn.Module = peft_model
    if env.active and train.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters, so every rank starts from the same head and A
        forward = DistributedDataParallel(peft_model, device_ids=[dev.index] if dev.type == "cuda" else None)

    loop = _Loop(forward, tokenizer, enc_train, task, dev, env, loss_fn, train.batch_size, train.max_grad_norm,
                 trainable, projectors)
    loop.held_rows = held
    if interference_grams is not None:
        loop.penalty = _penalty_fn(peft_model, interference_grams, dev)
        loop.penalty_weight = interference_penalty
    if b_sparsity:
        loop.masks = _calibrate_masks(loop, peft_model, train, calibration_epochs, b_sparsity, seed)
        _apply_masks(loop.masks)

    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    progress = Progress(f"train {task.name} [{init_name}]", total,
                        {"loss": "loss {:.4f}", "rate": "{:.0f} ex/s"})
    try:
        for epoch in range(1, train.epochs + 1):
            peft_model.train()
            train_loss, epoch_seconds = _train_epoch(loop, optimizer, scheduler, generator, progress)
            train_seconds += epoch_seconds
            val = evaluate(peft_model, tokenizer, task, enc_val, train.eval_batch_size, distributed=env.active)
            history.append({"epoch": epoch, "train_loss": train_loss, "validation": val})
            if loop.penalty is not None:
                with torch.no_grad():
                    history[-1]["interference_ratio"] = float(loop.penalty())
            logger.info("%s [%s] epoch %d: loss %.4f, validation %s %.2f", task.name, init_name, epoch, train_loss,
                        task.metric, val)
            if best is None or val > best[0]:
                best = (val, epoch, _trainable_state(peft_model))
    finally:
        progress.close()
    assert best is not None
    _load_trainable_state(peft_model, best[2])
    test_score = None
    if evaluate_test:
        enc_test = encode_split(tokenizer, task.test, train.max_length, regression)
        test_score = evaluate(peft_model, tokenizer, task, enc_test, train.eval_batch_size, distributed=env.active)
    drift = a_drift(A0, current_A(peft_model))
    seconds = time.perf_counter() - start
    result = TrainResult(task.name, Path(out_dir), best[1], best[0], test_score, history, drift, seconds,
                         train_seconds)
    tensors = adapter_tensors(peft_model)  # collective under FSDP
    if env.is_main:
        extra = {"b_sparsity": b_sparsity, "calibration_epochs": calibration_epochs if b_sparsity else None,
                 "interference_penalty": interference_penalty,
                 "frozen_rows": max((int(r.shape[0]) for _, r in held), default=0)}
        _save(peft_model, tensors, task, model_path, result, init_name, lora, train, seed, freeze_A, freeze_B,
              world_size=env.world_size, extra=extra)
    barrier_if(env)
    return result


def local_share(idx: list[int], env: DistEnv) -> tuple[list[int], float]:
    """This rank's examples of a global batch and the weight of its mean loss.

    Rank ``r`` takes ``idx[r::W]``; weighting its mean loss by ``len(local) * W / len(idx)`` makes the
    DDP-averaged gradient equal the gradient of the mean loss over the whole global batch. A rank
    left without examples (a last batch smaller than W) runs one example with weight 0, because
    every DDP rank must take part in each backward pass.
    """
    if not env.active:
        return list(idx), 1.0
    local = list(idx[env.rank :: env.world_size])
    if not local:
        return [idx[0]], 0.0
    return local, len(local) * env.world_size / len(idx)


def _global_loss(loss: torch.Tensor, n_local: int, env: DistEnv) -> float:
    """Mean loss over the global batch (one small all-reduce with several processes)."""
    if not env.active:
        return float(loss.item())
    both = torch.stack([loss.detach().float() * n_local, torch.tensor(float(n_local), device=loss.device)])
    total = all_reduce_sum(both)
    return float(total[0] / total[1].clamp_min(1))


def barrier_if(env: DistEnv) -> None:
    if env.active:
        barrier()


def _save(
    peft_model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    task: Task,
    model_path: str,
    result: TrainResult,
    init_name: str,
    lora: LoraSettings,
    train: TrainSettings,
    seed: int,
    freeze_A: bool,
    freeze_B: bool,
    world_size: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> None:
    inner = _inner_model(peft_model)
    info = HeadInfo(
        task=task.name,
        problem_type=task.problem_type,
        metric=task.metric,
        label_names=task.label_names,
        num_labels=task.num_labels,
        head_module=head_module_name(inner),
        base_model=model_path,
    )
    drift_values = list(result.drift.values())
    metrics = {
        "task": task.name,
        "init": init_name,
        "metric": task.metric,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "validation": result.validation,
        "test": result.test,
        "history": result.history,
        "a_drift_mean": float(np.mean(drift_values)) if drift_values else 0.0,
        "a_drift": result.drift,
        "freeze_A": freeze_A,
        "freeze_B": freeze_B,
        "lora": lora.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "n_train": len(task.train),
        "n_validation": len(task.validation),
        "n_test": len(task.test),
        "task_spec": task.meta.get("spec"),  # how `evaluate` / `predict` rebuild the task and its splits
        "seconds": result.seconds,
        "world_size": world_size,
        **(extra or {}),
    }
    with atomic_dir(result.out_dir) as tmp:
        write_peft_adapter(peft_model, tensors, tmp)
        heads = _head_prefixes(peft_model)
        save_head(tmp, {strip_peft_prefix(n): v for n, v in tensors.items() if n.startswith(heads)}, info)
        write_json(tmp / "metrics.json", metrics)


def write_peft_adapter(peft_model: nn.Module, tensors: Mapping[str, torch.Tensor], directory: Path) -> None:
    """A plain PEFT adapter directory (what ``save_pretrained`` writes) from whole parameter tensors,
    so a sharded (FSDP) model is saved the same way as a local one."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model, state_dict=dict(tensors))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    peft_config = cast("dict[str, LoraConfig]", peft_model.peft_config)
    config = copy.deepcopy(peft_config["default"])
    config.inference_mode = True
    if isinstance(config.target_modules, (set, frozenset)):  # PEFT keeps a set: write a stable, sorted list
        config.target_modules = sorted(config.target_modules)
    config.save_pretrained(str(directory))


def load_init_A(init_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The A matrices of an initial adapter written by :func:`write_initial_adapters` (module key -> r x n)."""
    from osrm_lora.adapters import load_adapter

    adapter = load_adapter(init_dir)
    return {key: m.A.clone() for key, m in adapter.modules.items()}


def write_initial_adapters(
    stats_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = DEFAULT_OSRM_MODE,
    model: str | None = None,
    lora: LoraSettings = LoraSettings(),
    ridge: float = 1e-3,
    seed: int = 0,
) -> list[Path]:
    """One initial PEFT adapter per task of the statistics store: OSRM A (or standard), B = 0."""
    from osrm_lora.osrm import compute_osrm_A
    from osrm_lora.stats import StatsStore

    if mode not in INIT_MODES:
        raise OsrmError(f"unknown init mode {mode!r}; choose {', '.join(INIT_MODES[:-1])} or {INIT_MODES[-1]}")
    store = StatsStore.load(stats_dir)
    tasks = list(store.tasks)
    model_path = resolve_model_path(model)
    from osrm_lora.stats import model_fingerprint

    store.check_matches(model_fingerprint(load_classifier(model_path, 2, device="cpu")))  # before writing anything
    subspaces = compute_osrm_A(store, tasks, lora.rank, mode, ridge=ridge) if mode != "standard" else {}
    paths: list[Path] = []
    for name in tasks:
        set_seed(seed)
        base = load_classifier(model_path, 2, device="cpu")
        peft_model = build_peft_model(base, lora, cast("PretrainedConfig", base.config).model_type)
        if subspaces:
            apply_A_to_peft(peft_model, subspaces[name])
        target = Path(out_dir) / name
        with atomic_dir(target) as tmp:
            peft_config = cast("dict[str, LoraConfig]", peft_model.peft_config)
            if isinstance(peft_config["default"].target_modules, (set, frozenset)):  # stable file
                peft_config["default"].target_modules = sorted(peft_config["default"].target_modules)
            cast("PeftModel", peft_model).save_pretrained(str(tmp))
            write_json(tmp / "init.json", {"task": name, "mode": mode, "rank": lora.rank, "ridge": ridge, "seed": seed,
                                           "stats": str(stats_dir)})
        paths.append(target)
    return paths
