"""Helpers shared by the method modules: common parameters, weights, the sparsify-then-combine driver."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter, LoraModule
from osrm_lora.errors import OsrmError
from osrm_lora.merge import ops
from osrm_lora.merge.types import MergeContext, Param

# --- common parameters -------------------------------------------------------------------------
SCALING = Param("scaling", "float", 1.0, "lambda: global coefficient of the merged update", low=0.0)
WEIGHTS = Param("weights", "floats", None, "per-adapter weights (default all 1)")
DENSITY = Param("density", "float", 0.2, "fraction of entries kept per task", low=0.0, high=1.0, low_open=True)
DROP_P = Param("p", "float", 0.5, "DARE drop probability", low=0.0, high=1.0, high_open=True)
THRESHOLD = Param("threshold", "str", "task", "top-k over all of a task's modules (task, paper) or per matrix (PEFT)",
                  choices=("task", "matrix"))
SIGN = Param("sign_method", "str", "total", "sign election: sum of values (total) or majority count (frequency)",
             choices=("total", "frequency"))
SEED = Param("seed", "int", None, "random seed (default: MergeContext.seed)", low=0)

TensorGetter = Callable[[int, str], torch.Tensor]


def task_trim(params: Mapping[str, Any]) -> frozenset[str]:
    """``task_wide`` of a magnitude trim: a task-wide threshold when ``threshold="task"`` keeps less than all."""
    return frozenset({"task_thresholds"}) if (params.get("threshold") == "task"
                                              and float(params.get("density", 1.0)) < 1) else frozenset()


def random_drop(params: Mapping[str, Any]) -> frozenset[str]:
    """``task_wide`` of a DARE drop: random masks, one seed per module when streamed."""
    return frozenset({"per_module_seed"})


def by_variant(params: Mapping[str, Any], key: str = "variant") -> frozenset[str]:
    """``task_wide`` of a method whose ``variant`` (or ``key``) picks TA, TIES or DARE-TIES inside it."""
    variants: dict[object, Callable[[Mapping[str, Any]], frozenset[str]]] = {"ties": task_trim, "dare_ties": random_drop}
    return variants.get(params.get(key), _no_task_wide)(params)


def _no_task_wide(_p: Mapping[str, Any]) -> frozenset[str]:
    return frozenset()


def task_weights(params: dict[str, Any], n: int, device: torch.device | None = None) -> torch.Tensor:
    w = params.get("weights")
    return torch.tensor([1.0] * n if w is None else list(w), dtype=torch.float32, device=device)


def module_keys(adapters: Sequence[LoraAdapter]) -> list[str]:
    return sorted(adapters[0].modules)


def device_of(adapters: Sequence[LoraAdapter]) -> torch.device:
    mod = next(iter(adapters[0].modules.values()))
    return mod.A.device


def seed_of(params: dict[str, Any], ctx: MergeContext) -> int:
    return int(params["seed"]) if params.get("seed") is not None else int(ctx.seed)


def merged_config(adapters: Sequence[LoraAdapter]) -> dict[str, Any]:
    """Config of a merged adapter: the first adapter's, with plain LoRA scaling and no extras."""
    cfg = copy.deepcopy(adapters[0].config)
    cfg.update({"use_rslora": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "peft_type": "LORA"})
    return cfg


def factor_adapter(adapters: Sequence[LoraAdapter], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   name: str) -> LoraAdapter:
    """A merged :class:`LoraAdapter` from ``key -> (B, A)`` with scaling 1 (delta = B @ A)."""
    fifo = {k: m.fan_in_fan_out for k, m in adapters[0].modules.items()}
    mods = {k: LoraModule(A.contiguous(), B.contiguous(), 1.0, fifo.get(k, False)) for k, (B, A) in factors.items()}
    return LoraAdapter(mods, merged_config(adapters), name=name)


def dense_getter(adapters: Sequence[LoraAdapter]) -> TensorGetter:
    return lambda t, key: adapters[t].modules[key].delta()


def module_seed(seed: int, key: str) -> int:
    """Seed of module ``key``'s DARE generator with per-module seeding: ``(seed << 32) + crc32(key)``
    (mod 2^63), stable across processes, runs and Python versions."""
    return ((int(seed) << 32) + zlib.crc32(key.encode("utf-8"))) % (1 << 63)


def _task_thresholds(keys: Sequence[str], get: TensorGetter, n_tasks: int, density: float,
                     ctx: MergeContext) -> list[float]:
    if ctx.task_thresholds is not None:
        if len(ctx.task_thresholds) != n_tasks:
            raise OsrmError(f"context.task_thresholds has {len(ctx.task_thresholds)} values for {n_tasks} adapters; "
                            "give one per adapter in the same order")
        return [float(x) for x in ctx.task_thresholds]
    if ctx.streaming:
        raise OsrmError("a task-wide magnitude threshold is needed but the merge sees only some modules; "
                        "compute context.task_thresholds over all modules first (merge.stream does)")
    out = []
    for t in range(n_tasks):
        total = sum(get(t, k).numel() for k in keys)

        def tensors(t: int = t) -> Iterator[torch.Tensor]:
            return (get(t, k) for k in keys)

        out.append(ops.kth_largest_abs(tensors, int(density * total)))
    return out


def sparse_combine(keys: Sequence[str], get: TensorGetter, n_tasks: int, *, sparsify: str | None,
                   consensus: str, weights: torch.Tensor, density: float = 1.0, p: float = 0.0,
                   threshold: str = "task", sign_method: str = "total",
                   generator: torch.Generator | None = None,
                   ctx: MergeContext | None = None) -> dict[str, torch.Tensor]:
    """Sparsify each task's tensors, then combine them per key (one key at a time).

    ``sparsify``: None, "magnitude" (top-``density`` by ``|x|``; threshold per task over all keys
    together or per matrix) or "dare" (random drop with probability ``p``, rescaled).
    ``consensus``: "sum" (weighted sum) or "ties" (sign election + disjoint mean of weighted values).
    DARE masks are drawn key by key (sorted order as given), task by task, from ``generator``; with
    ``ctx.per_module_seed`` the generator is re-seeded per key with ``module_seed(initial seed, key)``.
    ``ctx.task_thresholds`` / ``ctx.magnitude_probe`` replace the task-wide thresholds (see
    :class:`~osrm_lora.merge.registry.MergeContext`).
    """
    ctx = ctx or MergeContext()
    thresholds: list[float | None] = [None] * n_tasks
    if sparsify == "magnitude" and threshold == "task" and density < 1:
        if ctx.magnitude_probe is not None:
            zeros = {}
            for key in keys:
                for t in range(n_tasks):
                    x = get(t, key)
                    ctx.magnitude_probe(t, x)
                zeros[key] = torch.zeros_like(x)
            return zeros
        thresholds = list(_task_thresholds(keys, get, n_tasks, density, ctx))
    reseed = sparsify == "dare" and generator is not None and ctx.per_module_seed
    if sparsify == "dare" and ctx.streaming and not reseed:
        raise OsrmError("DARE over a subset of the modules needs per-module seeding; set context.per_module_seed")
    base_seed = generator.initial_seed() if reseed and generator is not None else 0
    if consensus not in ops.CONSENSUS:
        raise ValueError(consensus)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if reseed and generator is not None:
            generator.manual_seed(module_seed(base_seed, key))
        tensors, trim = [], list(thresholds)
        for t in range(n_tasks):
            x = get(t, key)
            if sparsify == "magnitude" and threshold != "task" and density < 1:
                trim[t] = ops.matrix_threshold(x, density)
                if trim[t] is None:  # ties at the per-matrix threshold: topk picks the entries
                    x = ops.magnitude_keep(x, density, None)
            elif sparsify == "dare":
                x = ops.dare_drop(x, p, generator)
            elif sparsify not in (None, "magnitude"):
                raise ValueError(sparsify)
            tensors.append(x)
        out[key] = ops.combine(tensors, weights, consensus, thresholds=trim if sparsify == "magnitude" else None,
                               sign_method=sign_method)
    return out
