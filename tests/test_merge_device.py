"""Merges on an accelerator: every method gives the CPU's result when its inputs live on the GPU.

The pipeline merges where its model is (``merge_and_sweep`` moves the adapters and the context to
the evaluator's device). The CUDA comparison runs only where a GPU is present; the device moves
themselves are checked everywhere (on the ``meta`` device, which needs no accelerator).
"""

from __future__ import annotations

import pytest
import torch

from osrm_lora.adapters import LoraAdapter, LoraModule
from osrm_lora.merge import MergeContext, MergeResult, list_methods, merge

SHAPES = {f"layer.{i}.{name}": shape for i in range(2)
          for name, shape in (("query", (24, 24)), ("intermediate", (40, 24)), ("output", (24, 40)))}
RANDOM_METHODS = {"dare_linear", "dare_ties"}  # masks drawn from the device's generator: not bit-equal
NEEDS_MODEL = {"adamerging"}  # needs an entropy function over a model; covered by the pipeline tests


def adapter(seed: int, rank: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {k: LoraModule(0.3 * torch.randn(rank, n, generator=g), 0.3 * torch.randn(m, rank, generator=g), 2.0)
            for k, (m, n) in SHAPES.items()}
    extra = {"classifier.weight": torch.randn(3, 24, generator=g)}
    return LoraAdapter(mods, {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}, name=f"t{seed}", extra=extra)


def context(adapters: list[LoraAdapter]) -> MergeContext:
    g = torch.Generator().manual_seed(7)
    grams, fisher = [], []
    for ad in adapters:
        xs = {k: torch.randn(50, m.in_features, generator=g) for k, m in ad.modules.items()}
        grams.append({k: x.T @ x for k, x in xs.items()})
        fisher.append({k: torch.rand(m.out_features, m.in_features, generator=g) for k, m in ad.modules.items()})
    return MergeContext(grams=grams, fisher=fisher, seed=3)


def all_tensors(result: MergeResult) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if result.adapter is not None:
        out += [t for m in result.adapter.modules.values() for t in (m.A, m.B)]
    out += list((result.deltas or {}).values())
    out += [t for d in result.per_task_deltas or [] for t in d.values()]
    out += [t for a in result.inputs for t in a.extra.values()]
    return out


def test_result_and_context_move_every_tensor() -> None:
    ads = [adapter(i) for i in range(3)]
    ctx = context(ads)
    for method in ("task_arithmetic", "ties", "emr"):
        moved = merge(ads, method, {}, context=ctx, ignore_extra=True).to("meta")
        tensors = all_tensors(moved)
        assert tensors and all(t.device.type == "meta" for t in tensors), method
    on_meta = ctx.to("meta")
    assert all(t.device.type == "meta" for g in on_meta.grams or [] for t in g.values())
    assert all(t.device.type == "meta" for f in on_meta.fisher or [] for t in f.values())
    assert all(t.device.type == "cpu" for g in ctx.grams or [] for t in g.values()), "the original was changed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(m.name for m in list_methods() if m.name not in NEEDS_MODEL))
def test_cuda_merge_matches_cpu(method: str) -> None:
    ads = [adapter(i) for i in range(3)]
    ctx = context(ads)
    cpu = merge(ads, method, {}, context=ctx, ignore_extra=True)
    gpu = merge([a.to("cuda") for a in ads], method, {}, context=ctx.to("cuda"), ignore_extra=True)
    assert all(t.device.type == "cuda" for t in all_tensors(gpu) if t.numel())
    back = gpu.to("cpu")
    per_task = cpu.per_task_deltas is not None
    for t in range(len(ads) if per_task else 1):
        want, got = cpu.deltas_for(t if per_task else None), back.deltas_for(t if per_task else None)
        assert list(want) == list(got)
        for k in want:
            assert torch.isfinite(got[k]).all()
            if method in RANDOM_METHODS:
                assert got[k].shape == want[k].shape
            else:
                scale = float(want[k].abs().max()) or 1.0
                torch.testing.assert_close(got[k], want[k], atol=2e-4 * scale, rtol=2e-4)
