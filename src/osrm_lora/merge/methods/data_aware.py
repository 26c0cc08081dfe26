"""Methods that need statistics or data: Fisher merging, RegMean, AdaMerging."""

from __future__ import annotations

import logging
from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.errors import OsrmError
from osrm_lora.merge import ops
from osrm_lora.merge.methods._common import SCALING, factor_adapter, module_keys
from osrm_lora.merge.types import MergeContext, MergeResult, Param, register_method

logger = logging.getLogger(__name__)


def fisher_average(values: list[torch.Tensor], fishers: list[torch.Tensor], floor: float) -> torch.Tensor:
    """``sum_t F_t x_t / sum_t F_t`` with ``F_t + floor`` (uniform average where all Fisher values vanish)."""
    num = torch.zeros_like(values[0])
    den = torch.zeros_like(values[0])
    for x, f in zip(values, fishers):
        f = f.to(x).abs() + floor
        num += f * x
        den += f
    return num / den


@register_method(
    "fisher",
    params=[SCALING, Param("floor", "float", 1e-8, "added to every Fisher value", low=0.0, low_open=True)],
    description="Fisher-weighted average of the updates (dense) or of the LoRA factors",
    paper="https://arxiv.org/abs/2111.09832",
    needs=("fisher",),
)
def fisher(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Fisher merging (Matena & Raffel, 2022, https://arxiv.org/abs/2111.09832).

    Per module, if ``context.fisher[t]`` has ``"<module>"`` (m x n): ``delta = sum F_t tau_t / sum F_t``.
    Otherwise it needs ``"<module>.lora_A"``/``"<module>.lora_B"`` (equal ranks across tasks) and
    averages the factors ``s_t B_t`` and ``A_t`` separately, ``delta = B_avg @ A_avg``. Times lambda.
    """
    assert ctx.fisher is not None
    floor, lam = float(params["floor"]), float(params["scaling"])
    deltas, modes = {}, {}
    for key in module_keys(adapters):
        if all(key in f for f in ctx.fisher):
            taus = [ad.modules[key].delta() for ad in adapters]
            for f in ctx.fisher:
                if tuple(f[key].shape) != tuple(taus[0].shape):
                    raise OsrmError(f"fisher for {key} has shape {tuple(f[key].shape)}, expected {tuple(taus[0].shape)}; "
                                    "recompute the Fisher on the adapted weights")
            deltas[key] = lam * fisher_average(taus, [f[key] for f in ctx.fisher], floor)
            modes[key] = "dense"
            continue
        ka, kb = key + ".lora_A", key + ".lora_B"
        for t, f in enumerate(ctx.fisher):
            if ka not in f or kb not in f:
                raise OsrmError(f"context.fisher[{t}] has no entry for {key} (or {ka}/{kb}); "
                                "compute the Fisher for every adapted module")
        ranks = {ad.modules[key].rank for ad in adapters}
        if len(ranks) > 1:
            raise OsrmError(f"factor-space Fisher merging needs equal ranks, {key} has ranks {sorted(ranks)}; "
                            "give dense Fisher values under the module key instead")
        Bs, As = zip(*[ops.scaled_factors(ad, key) for ad in adapters])
        B = fisher_average(list(Bs), [f[kb] for f in ctx.fisher], floor)
        A = fisher_average(list(As), [f[ka] for f in ctx.fisher], floor)
        deltas[key] = lam * (B @ A)
        modes[key] = "factors"
    return MergeResult("fisher", params, deltas=deltas, info={"fisher_mode": modes})


def regmean_delta(taus: list[torch.Tensor], grams: list[torch.Tensor], alpha: float, ridge: float) -> torch.Tensor:
    """RegMean for one linear layer in (out, in) orientation.

    ``G~_t = alpha G_t + (1 - alpha) diag(G_t)``; ``delta = (sum_t tau_t G~_t) (sum_t G~_t)^-1`` (the
    base weight cancels because the same Grams weight it). ``ridge`` times the mean diagonal is added
    to the summed Gram before solving.
    """
    n = grams[0].shape[0]
    gsum = torch.zeros(n, n, dtype=torch.float64, device=taus[0].device)
    num = torch.zeros(taus[0].shape, dtype=torch.float64, device=taus[0].device)
    for tau, g in zip(taus, grams):
        g = g.to(device=tau.device, dtype=torch.float64)
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        gsum += g
        num += tau.double() @ g
    eye = torch.eye(n, dtype=torch.float64, device=gsum.device)
    gsum = gsum + ridge * torch.diagonal(gsum).mean().clamp(min=1e-30) * eye
    solved: torch.Tensor = torch.linalg.solve(gsum, num.T).T.to(torch.float32)
    return solved


@register_method(
    "regmean",
    params=[SCALING, Param("alpha", "float", 0.9, "off-diagonal scale of the Gram matrices", low=0.0, high=1.0),
            Param("ridge", "float", 1e-6, "relative ridge added to the summed Gram", low=0.0)],
    description="per layer least-squares merge (sum G_t)^-1 sum G_t W_t with input Gram matrices",
    paper="https://arxiv.org/abs/2212.09849",
    needs=("grams",),
)
def regmean(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """RegMean (Jin et al., ICLR 2023, https://arxiv.org/abs/2212.09849).

    Needs ``context.grams[t][module]`` = the n x n input Gram (or second moment) of task t at that
    module (same statistics as OSRM). Result ``lambda * regmean_delta(...)`` per module.
    """
    assert ctx.grams is not None
    deltas = {}
    for key in module_keys(adapters):
        grams = []
        n = adapters[0].modules[key].in_features
        for t, g in enumerate(ctx.grams):
            if key not in g:
                raise OsrmError(f"context.grams[{t}] has no Gram matrix for {key}; "
                                "collect activation statistics for every adapted module")
            if tuple(g[key].shape) != (n, n):
                raise OsrmError(f"Gram of {key} for task {t} has shape {tuple(g[key].shape)}, expected ({n}, {n}); "
                                "recompute the statistics for this base model")
            grams.append(g[key])
        taus = [ad.modules[key].delta() for ad in adapters]
        deltas[key] = float(params["scaling"]) * regmean_delta(taus, grams, float(params["alpha"]),
                                                               float(params["ridge"]))
    return MergeResult("regmean", params, deltas=deltas)


@register_method(
    "adamerging",
    params=[Param("mode", "str", "layer", "one coefficient per task (task) or per task and module (layer)",
                  choices=("task", "layer")),
            Param("steps", "int", 500, "Adam steps", low=1),
            Param("lr", "float", 1e-3, "Adam learning rate", low=0.0, low_open=True),
            Param("init", "float", 0.3, "initial coefficient", low=0.0, high=1.0),
            Param("constraint_weight", "float", 1.0,
                  "weight of the constraint penalty (context.constraint_fn, when constraints are given)", low=0.0)],
    description="learn task-/layer-wise TA coefficients by minimising prediction entropy on unlabeled data",
    paper="https://arxiv.org/abs/2310.02575",
    exact_in_factor_space=True,
    needs=("adamerging_eval",),
)
def adamerging(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575).

    Coefficients ``lambda[t]`` (task-wise) or ``lambda[t, module]`` (layer-wise), initialised to
    ``init`` and clamped to [0, 1] after each Adam step, minimise ``context.entropy_fn(deltas)``
    (plus ``constraint_weight * context.constraint_fn(deltas)`` when the context has constraints)
    where ``deltas[key] = sum_t lambda[t(, key)] s_t B_t A_t`` (see :class:`MergeContext` for the
    contract). The result is exact in factor space (concatenated, coefficient-scaled factors).
    """
    assert ctx.entropy_fn is not None
    keys, T = module_keys(adapters), len(adapters)
    layer = params["mode"] == "layer"
    dev = next(iter(adapters[0].modules.values())).A.device
    coeff = torch.full((T, len(keys) if layer else 1), float(params["init"]), device=dev, requires_grad=True)
    opt = torch.optim.Adam([coeff], lr=float(params["lr"]))
    factors = {k: [ops.scaled_factors(ad, k) for ad in adapters] for k in keys}
    history: list[float] = []
    penalties: list[float] = []
    weight = float(params["constraint_weight"])
    for step in range(int(params["steps"])):
        opt.zero_grad()
        deltas = {}
        for j, k in enumerate(keys):
            c = coeff[:, j if layer else 0]
            B = torch.cat([c[t] * b for t, (b, _) in enumerate(factors[k])], dim=1)
            A = torch.cat([a for _, a in factors[k]], dim=0)
            deltas[k] = B @ A
        loss = ctx.entropy_fn(deltas)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise OsrmError("context.entropy_fn must return a differentiable 0-dim tensor; do not detach the deltas")
        history.append(float(loss.detach()))
        if ctx.constraint_fn is not None and weight > 0:
            penalty = ctx.constraint_fn(deltas)
            penalties.append(float(penalty.detach()))
            loss = loss + weight * penalty
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        opt.step()
        with torch.no_grad():
            coeff.clamp_(0.0, 1.0)
        if step % 50 == 0:
            logger.debug("adamerging step %d entropy %.5f", step, history[-1])
    c = coeff.detach()
    merged = {}
    for j, k in enumerate(keys):
        col = c[:, j if layer else 0]
        merged[k] = ops.concat_factors([(float(col[t]) * b, a) for t, (b, a) in enumerate(factors[k])])
    ad = factor_adapter(adapters, merged, "adamerging")
    info = {"coefficients": c.cpu().tolist(), "modules": keys if layer else None,
            "entropy_first": history[0], "entropy_last": history[-1]}
    if penalties:
        info.update(constraint_penalty_first=penalties[0], constraint_penalty_last=penalties[-1])
    return MergeResult("adamerging", params, adapter=ad, info=info)
