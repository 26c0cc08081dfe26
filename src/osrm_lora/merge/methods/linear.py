"""Methods exact in LoRA factor space: task arithmetic and concatenation."""

from __future__ import annotations

from typing import Any

from osrm_lora.adapters import LoraAdapter
from osrm_lora.merge import ops
from osrm_lora.merge.methods._common import SCALING, WEIGHTS, factor_adapter, module_keys, task_weights
from osrm_lora.merge.types import MergeContext, MergeResult, register_method


def concat_merge(adapters: list[LoraAdapter], coeffs: list[float], name: str) -> LoraAdapter:
    """``sum_t coeffs[t] * s_t B_t A_t`` as one LoRA of rank ``sum_t r_t`` (exact, no m x n matrix)."""
    factors = {
        key: ops.concat_factors([ops.scaled_factors(ad, key, c) for ad, c in zip(adapters, coeffs)])
        for key in module_keys(adapters)
    }
    return factor_adapter(adapters, factors, name)


@register_method(
    "task_arithmetic",
    linear_in_scaling=True,
    params=[SCALING, WEIGHTS],
    description="lambda * sum_t w_t tau_t, exact in factor space (rank = sum of ranks)",
    paper="https://arxiv.org/abs/2212.04089",
    exact_in_factor_space=True,
)
def task_arithmetic(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Task Arithmetic (Ilharco et al., 2023, https://arxiv.org/abs/2212.04089).

    ``W = W0 + lambda * sum_t w_t s_t B_t A_t`` realised by concatenating the scaled ``B_t`` and the
    ``A_t``: never forms a dense m x n matrix.
    """
    w = task_weights(params, len(adapters)).tolist()
    lam = float(params["scaling"])
    ad = concat_merge(adapters, [lam * x for x in w], "task_arithmetic")
    return MergeResult("task_arithmetic", params, adapter=ad, info={"rank": {k: m.rank for k, m in ad.modules.items()}})


@register_method(
    "cat",
    params=[WEIGHTS],
    description="exact concatenation of the LoRA factors, weighted per adapter (PEFT's 'cat')",
    paper="https://huggingface.co/docs/peft/developer_guides/model_merging",
    exact_in_factor_space=True,
)
def cat(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Concatenation (PEFT ``add_weighted_adapter(combination_type="cat")``,
    https://huggingface.co/docs/peft/developer_guides/model_merging): ``sum_t w_t s_t B_t A_t`` exactly."""
    ad = concat_merge(adapters, task_weights(params, len(adapters)).tolist(), "cat")
    return MergeResult("cat", params, adapter=ad, info={"rank": {k: m.rank for k, m in ad.modules.items()}})
