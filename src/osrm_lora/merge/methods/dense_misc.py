"""Dense per-module methods that are neither sparse nor spectral-in-factors: DO-Merging, OPCM."""

from __future__ import annotations

from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.merge import ops
from osrm_lora.merge.methods._common import (
    DENSITY,
    SCALING,
    SIGN,
    THRESHOLD,
    WEIGHTS,
    device_of,
    module_keys,
    sparse_combine,
    task_weights,
)
from osrm_lora.merge.registry import MergeContext, MergeResult, Param, register_method


def magnitude_direction(tau: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``tau`` (m x n) into per-output-row norms ``mag`` (m) and unit-row directions ``tau / mag``."""
    mag = torch.linalg.norm(tau, dim=1)
    return mag, tau / mag.clamp(min=eps).unsqueeze(1)


@register_method(
    "do_merging",
    params=[SCALING, Param("base", "str", "ta", "merge rule for the directions", choices=("ta", "ties")), DENSITY,
            THRESHOLD, SIGN, WEIGHTS],
    description="merge per-row directions with a base method and magnitudes by weighted mean, recombine",
    paper="https://arxiv.org/abs/2505.15875",
)
def do_merging(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """DO-Merging, decoupled magnitude/direction (2025, https://arxiv.org/abs/2505.15875).

    Each update is split into per-output-row magnitudes ``m_t = ||tau_t[i, :]||`` and unit-row
    directions ``D_t``. Directions are merged with TA (weighted sum) or TIES, then renormalised per
    row; magnitudes are merged by their weighted mean; result ``lambda * m * D / ||D||_row``.
    One identical adapter is reproduced exactly. The paper's optional data-free orthogonalisation
    of the factors is not implemented.
    """
    keys, T, dev = module_keys(adapters), len(adapters), device_of(adapters)
    w = task_weights(params, T, dev)
    mags: dict[str, torch.Tensor] = {}
    dirs: dict[str, list[torch.Tensor]] = {}
    for key in keys:
        parts = [magnitude_direction(ad.modules[key].delta()) for ad in adapters]
        mags[key] = ops.weighted_sum(torch.stack([m for m, _ in parts]), w) / w.sum().clamp(min=1e-12)
        dirs[key] = [d for _, d in parts]
    sparsify, consensus = (None, "sum") if params["base"] == "ta" else ("magnitude", "ties")
    merged = sparse_combine(keys, lambda t, k: dirs[k][t], T, sparsify=sparsify, consensus=consensus, weights=w,
                            density=params["density"], threshold=params["threshold"],
                            sign_method=params["sign_method"], ctx=ctx)
    lam = float(params["scaling"])
    deltas = {}
    for key in keys:
        _, d = magnitude_direction(merged[key])
        deltas[key] = lam * mags[key].unsqueeze(1) * d
    return MergeResult("do_merging", params, deltas=deltas)


def principal_rank(S: torch.Tensor, alpha: float) -> int:
    """Smallest k whose top-k singular values carry at least ``alpha`` of their sum."""
    if S.numel() == 0 or S.sum() <= 0:
        return 0
    frac = torch.cumsum(S, 0) / S.sum()
    return int((frac < alpha - 1e-12).sum()) + 1


def opcm_step(running: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Project ``tau`` out of the principal subspace of ``running``: ``tau - U_k U_k^T tau V_k V_k^T``."""
    U, S, Vh = ops.dense_svd(running)
    k = principal_rank(S, alpha)
    Uk, Vhk = U[:, :k], Vh[:k]
    return tau - Uk @ (Uk.T @ tau @ Vhk.T) @ Vhk


@register_method(
    "opcm",
    params=[SCALING, Param("alpha", "float", 0.5, "energy fraction defining the principal subspace", low=0.0,
                           high=1.0, low_open=True)],
    description="continual merging: project each new update off the merged principal subspace, renormalise",
    paper="https://arxiv.org/abs/2501.09522",
    min_adapters=1,
)
def opcm(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """OPCM, orthogonal projection-based continual merging (Tang et al., 2025, https://arxiv.org/abs/2501.09522).

    Adapters arrive in the given order (order matters). Per module: ``D_1 = tau_1``;
    ``D_t = D_{t-1} + P_t(tau_t)`` with ``P_t`` removing the block ``U_k U_k^T tau V_k V_k^T`` of the
    top-k singular subspace of ``D_{t-1}`` (k: smallest with ``alpha`` of the singular-value mass);
    merged ``= lambda * D_T * mean_t ||tau_t|| / ||D_T||``. Memory: one running matrix per module.
    """
    alpha, lam = float(params["alpha"]), float(params["scaling"])
    deltas = {}
    for key in module_keys(adapters):
        running = adapters[0].modules[key].delta()
        norm_sum = float(torch.linalg.norm(running))
        for t in range(1, len(adapters)):
            tau = adapters[t].modules[key].delta()
            norm_sum += float(torch.linalg.norm(tau))
            running = running + opcm_step(running, tau, alpha)
        rn = torch.linalg.norm(running)
        mean_norm = norm_sum / len(adapters)
        deltas[key] = lam * running * (mean_norm / rn) if rn > 0 else lam * running
    return MergeResult("opcm", params, deltas=deltas)
