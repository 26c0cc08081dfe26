"""Dense sparsify-and-combine methods: TIES, DARE, magnitude pruning, EMR (one module at a time)."""

from __future__ import annotations

from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.errors import OsrmError
from osrm_lora.merge import ops
from osrm_lora.merge.methods._common import (
    DENSITY,
    DROP_P,
    SCALING,
    SEED,
    SIGN,
    THRESHOLD,
    WEIGHTS,
    dense_getter,
    device_of,
    module_keys,
    random_drop,
    seed_of,
    sparse_combine,
    task_trim,
    task_weights,
)
from osrm_lora.merge.types import MergeContext, MergeResult, Param, register_method


def _dense(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext, *, sparsify: str | None,
           consensus: str) -> dict[str, torch.Tensor]:
    dev = device_of(adapters)
    gen = ops.make_generator(seed_of(params, ctx), dev) if sparsify == "dare" else None
    merged = sparse_combine(
        module_keys(adapters), dense_getter(adapters), len(adapters), sparsify=sparsify, consensus=consensus,
        weights=task_weights(params, len(adapters), dev), density=params.get("density", 1.0),
        p=params.get("p", 0.0), threshold=params.get("threshold", "matrix"),
        sign_method=params.get("sign_method", "total"), generator=gen, ctx=ctx)
    lam = float(params["scaling"])
    return {k: lam * v for k, v in merged.items()}


@register_method(
    "ties",
    linear_in_scaling=True,
    task_wide=task_trim,
    params=[SCALING, DENSITY, THRESHOLD, SIGN, WEIGHTS],
    description="trim to top-density magnitudes, elect sign, disjoint mean, times lambda",
    paper="https://arxiv.org/abs/2306.01708",
)
def ties(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """TIES-Merging (Yadav et al., 2023, https://arxiv.org/abs/2306.01708).

    Per task keep the ``density`` fraction of largest-magnitude entries (threshold over all of the
    task's modules together, or per matrix with ``threshold="matrix"`` for parity with PEFT), elect
    the sign per entry, average the agreeing (weighted) entries, scale by lambda.
    """
    return MergeResult("ties", params, deltas=_dense(adapters, params, ctx, sparsify="magnitude", consensus="ties"))


@register_method(
    "dare_linear",
    linear_in_scaling=True,
    task_wide=random_drop,
    params=[SCALING, DROP_P, SEED, WEIGHTS],
    description="DARE random drop (p) with 1/(1-p) rescale, then weighted sum times lambda",
    paper="https://arxiv.org/abs/2311.03099",
)
def dare_linear(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """DARE + task arithmetic (Yu et al., 2024, https://arxiv.org/abs/2311.03099). Seeded; masks match
    PEFT's ``random_pruning`` for the same seed (per module in sorted key order, task by task)."""
    return MergeResult("dare_linear", params, deltas=_dense(adapters, params, ctx, sparsify="dare", consensus="sum"))


@register_method(
    "dare_ties",
    linear_in_scaling=True,
    task_wide=random_drop,
    params=[SCALING, DROP_P, SIGN, SEED, WEIGHTS],
    description="DARE random drop (p) with rescale, then TIES sign election and disjoint mean",
    paper="https://arxiv.org/abs/2311.03099",
)
def dare_ties(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """DARE + TIES consensus (Yu et al., 2024, https://arxiv.org/abs/2311.03099)."""
    return MergeResult("dare_ties", params, deltas=_dense(adapters, params, ctx, sparsify="dare", consensus="ties"))


@register_method(
    "magnitude_prune",
    linear_in_scaling=True,
    task_wide=task_trim,
    params=[SCALING, DENSITY, THRESHOLD, WEIGHTS],
    description="keep the top-density magnitudes per task, then weighted sum times lambda",
    paper="https://arxiv.org/abs/2306.01708",
)
def magnitude_prune(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Magnitude pruning + task arithmetic (the TIES paper's trim step alone,
    https://arxiv.org/abs/2306.01708; PEFT's ``magnitude_prune``)."""
    return MergeResult("magnitude_prune", params,
                       deltas=_dense(adapters, params, ctx, sparsify="magnitude", consensus="sum"))


def emr_rescalers(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """EMR's rescalers ``sum |tau_t| / sum |M_t * u|`` from those sums (per matrix, or summed over all
    of a task's modules: task-wide); 0 where the masked unified update is empty."""
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


@register_method(
    "emr",
    linear_in_scaling=True,
    task_wide=lambda p: frozenset({"task_rescalers"}) if p.get("rescale") == "task" else frozenset(),
    params=[SCALING, Param("rescale", "str", "task", "rescaler over all modules of a task (task) or per matrix",
                           choices=("task", "matrix"))],
    description="elect a unified update, deploy it per task with a binary mask and a rescaler",
    paper="https://arxiv.org/abs/2405.17461",
    per_task=True,
)
def emr(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """EMR-Merging (Huang et al., 2024, https://arxiv.org/abs/2405.17461).

    Unified update = elected sign (of ``sum_t tau_t``) times the largest magnitude among the entries
    that agree with it; task mask ``M_t = [sign(tau_t) == elected]``; rescaler
    ``l_t = sum|tau_t| / sum|M_t * unified|`` (over all of the task's modules, or per matrix).
    Task ``t`` is deployed as ``lambda * l_t * M_t * unified``: needs the task id at inference.
    ``info`` reports the task-wide rescalers and their numerators/denominators over the modules
    merged (``rescaler_num``/``rescaler_den``); ``context.task_rescalers`` replaces the task-wide
    rescalers (streamed merging computes them over all modules first).
    """
    keys, T = module_keys(adapters), len(adapters)
    unified: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    num = torch.zeros(T, dtype=torch.float64)
    den = torch.zeros(T, dtype=torch.float64)
    per_matrix: dict[str, torch.Tensor] = {}
    for key in keys:
        stack = torch.stack([ad.modules[key].delta() for ad in adapters])
        sign = ops.elect_sign(stack, "total")
        agree = ops.agree_mask(stack, sign)
        u = sign * (stack.abs() * agree).amax(0)
        n_t = stack.abs().flatten(1).sum(1).double().cpu()
        d_t = (agree * u.abs()).flatten(1).sum(1).double().cpu()
        unified[key], masks[key] = u, agree
        num += n_t
        den += d_t
        per_matrix[key] = emr_rescalers(n_t, d_t)
    glob = emr_rescalers(num, den)
    if params["rescale"] == "task" and ctx.task_rescalers is not None:
        if len(ctx.task_rescalers) != T:
            raise OsrmError(f"context.task_rescalers has {len(ctx.task_rescalers)} values for {T} adapters; "
                            "give one per adapter in the same order")
        glob = torch.tensor([float(x) for x in ctx.task_rescalers], dtype=torch.float64)
    elif params["rescale"] == "task" and ctx.streaming:
        raise OsrmError("emr rescale=task needs rescalers over all modules but the merge sees only some; "
                        "compute context.task_rescalers first (merge.stream does)")
    lam = float(params["scaling"])
    per_task: list[dict[str, torch.Tensor]] = []
    for t in range(T):
        d = {}
        for key in keys:
            r = float(glob[t] if params["rescale"] == "task" else per_matrix[key][t])
            d[key] = (lam * r) * masks[key][t] * unified[key]
        per_task.append(d)
    return MergeResult("emr", params, per_task_deltas=per_task,
                       info={"rescalers": glob.tolist(), "rescaler_num": num.tolist(), "rescaler_den": den.tolist()})
