"""Dense per-module methods that are neither sparse nor spectral-in-factors: DO-Merging, OPCM."""

from __future__ import annotations

import math
from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.errors import OsrmError
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
    task_trim,
    task_weights,
)
from osrm_lora.merge.types import MergeContext, MergeResult, Param, register_method


def magnitude_direction(tau: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``tau`` (m x n) into per-output-row norms ``mag`` (m) and unit-row directions ``tau / mag``."""
    mag = torch.linalg.norm(tau, dim=1)
    return mag, tau / mag.clamp(min=eps).unsqueeze(1)


@register_method(
    "do_merging",
    linear_in_scaling=True,
    task_wide=lambda p: task_trim(p) if p.get("base") == "ties" else frozenset(),
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
    """FusionBench's split rank: the number of leading singular values whose cumulative fraction of
    the singular-value sum is at most ``alpha`` (the 0-based index of the first one above it)."""
    if S.numel() == 0 or S.sum() <= 0:
        return 0
    frac = torch.cumsum(S, 0) / S.sum()
    return int((frac <= alpha).sum())


def nonzero_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``M`` (dtype kept) without its numerically-zero singular values, the tolerance of
    ``torch.linalg.matrix_rank``: ``s > s_max * max(m, n) * eps``."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if S.numel() == 0 or S[0] <= 0:
        return U[:, :0], S[:0], Vh[:0]
    keep = int((S > S[0] * max(M.shape) * torch.finfo(M.dtype).eps).sum())
    return U[:, :keep], S[:keep], Vh[:keep]


def opcm_step(running: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """OPCM's cleaned task vector ``U P V^T``: ``P = U^T tau V`` with its diagonal and its top-left
    ``k x k`` block zeroed, ``running = U S V^T``, ``k = principal_rank(S, alpha)``.

    Computed from the thin SVD as ``tau - U_k (U_k^T tau V_k) V_k^T - sum_{i >= k} (u_i^T tau v_i) u_i v_i^T``.
    The diagonal runs over the singular triplets with a nonzero singular value. FusionBench zeroes
    it over all ``min(m, n)`` of them; that equals this where ``running`` has full rank (fully
    fine-tuned weights, the authors' setting), but where it is rank deficient (any sum of LoRA
    updates) the extra singular vectors are an arbitrary basis of the null spaces, set by rounding
    noise: FusionBench's result then changes by 7-25% with the (irrelevant) base weights alone.
    Here that undefined part is left out, so the result depends on the task vectors only.
    """
    U, S, Vh = nonzero_svd(running)
    k = principal_rank(S, alpha)
    diag = ((U.T @ tau) * Vh).sum(1)  # u_i^T tau v_i
    diag[:k] = 0.0  # those lie in the block, removed below with it
    Uk, Vhk = U[:, :k], Vh[:k]
    return tau - Uk @ (Uk.T @ tau @ Vhk.T) @ Vhk - (U * diag) @ Vh


def opcm_running(taus: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Unnormalised continual sum ``R_1 = tau_1``, ``R_t = R_{t-1} + opcm_step(R_{t-1}, tau_t)``.

    FusionBench rescales the merged model after every step but projects with the SVD of the
    rescaled running sum and adds ``lambda_{t-1}`` times it back, which is this same ``R_t`` (the
    split rank and the singular vectors do not change under a positive scale)."""
    running = taus[0]
    for tau in taus[1:]:
        running = running + opcm_step(running, tau, alpha)
    return running


def sq_norm(t: torch.Tensor) -> float:
    """Squared Frobenius norm, accumulated in float64."""
    return float(torch.linalg.norm(t.double())) ** 2


def opcm_rescale(task_sq_norms: list[float], merged_sq_norm: float) -> float:
    """``mean_t ||tau_t|| / ||R_T||`` from squared norms (1 when ``R_T`` is zero)."""
    mean_norm = sum(math.sqrt(x) for x in task_sq_norms) / len(task_sq_norms)
    return mean_norm / math.sqrt(merged_sq_norm) if merged_sq_norm > 0 else 1.0


OPCM_NORMS = ("model", "module")


@register_method(
    "opcm",
    linear_in_scaling=True,
    params=[SCALING,
            Param("alpha", "float", 0.5, "energy fraction of the merged update's singular values whose block is "
                  "projected out", low=0.0, high=1.0, low_open=True, high_open=True),
            Param("norm", "str", "model", "rescale to the mean task-vector norm over the whole model (model, "
                  "FusionBench) or per module (module: a variant, streamable)", choices=OPCM_NORMS)],
    description="continual merging: remove each new update's part in the merged update's principal block and "
                "singular-vector diagonal, rescale to the mean task norm over the model (FusionBench opcm)",
    paper="https://arxiv.org/abs/2501.09522",
    min_adapters=1,
)
def opcm(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """OPCM, orthogonal projection-based continual merging (Tang et al., 2025, https://arxiv.org/abs/2501.09522),
    as the authors implement it (FusionBench ``OPCMForCLIP``, ``fusion_bench.method.opcm``).

    Adapters arrive in the given order (order matters). Per module: ``R_1 = tau_1``;
    ``R_t = R_{t-1} + U P V^T`` where ``R_{t-1} = U S V^T`` and ``P = U^T tau_t V`` with its diagonal
    and its top-left ``k x k`` block zeroed, ``k`` the number of leading singular values whose
    cumulative share of ``sum(S)`` is at most ``alpha`` (:func:`opcm_step`; the diagonal is taken over
    the nonzero singular values only, see there: FusionBench's extra null-space terms are undefined
    for rank-deficient sums such as LoRA's). The result is
    ``lambda * R_T * mean_t ||tau_t|| / ||R_T||`` with norms over all modules together
    (``norm="model"``, FusionBench's whole-model task-vector norm; LoRA leaves every other tensor
    unchanged, so this is the same norm). ``norm="module"`` uses each module's own norms instead, a
    deliberate variant whose modules are independent (a streamed merge needs it).
    Memory: one running matrix per module.
    """
    alpha, lam, norm = float(params["alpha"]), float(params["scaling"]), params["norm"]
    if norm == "model" and ctx.streaming:
        raise OsrmError("opcm norm=model rescales with norms over all modules but the merge sees only some; "
                        "merge in memory or pass norm=module")
    keys, T = module_keys(adapters), len(adapters)
    merged: dict[str, torch.Tensor] = {}
    task_sq: dict[str, list[float]] = {}
    for key in keys:
        taus = [ad.modules[key].delta() for ad in adapters]
        task_sq[key] = [sq_norm(t) for t in taus]
        merged[key] = opcm_running(taus, alpha)
    merged_sq = {key: sq_norm(merged[key]) for key in keys}
    if norm == "model":
        c = opcm_rescale([sum(task_sq[k][t] for k in keys) for t in range(T)], sum(merged_sq.values()))
        scale = {key: c for key in keys}
    else:
        scale = {key: opcm_rescale(task_sq[key], merged_sq[key]) for key in keys}
    deltas = {key: lam * scale[key] * merged[key] for key in keys}
    return MergeResult("opcm", params, deltas=deltas, info={"opcm_scale": scale})
