"""SVD-based methods computed from the LoRA factors: TSV-M, Iso-C, Iso-CTS, KnOTS, core-space merging.

All of them work on thin factorisations (QR of the factors, then an SVD of a small core), so no
m x n matrix is formed, and return a factor-form adapter (``delta = B @ A``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.merge import ops
from osrm_lora.merge.methods._common import (
    DENSITY,
    DROP_P,
    SCALING,
    SEED,
    SIGN,
    THRESHOLD,
    WEIGHTS,
    by_variant,
    device_of,
    factor_adapter,
    module_keys,
    seed_of,
    sparse_combine,
    task_weights,
)
from osrm_lora.merge.types import MergeContext, MergeResult, Param, register_method

VARIANT_SPARSE = {"ta": (None, "sum"), "ties": ("magnitude", "ties"), "dare_ties": ("dare", "ties")}


def _rank_info(ad: LoraAdapter) -> dict[str, int]:
    return {k: m.rank for k, m in ad.modules.items()}


# ------------------------------------------------------------------------------------------------ TSV-M


def tsv_factors(us: list[torch.Tensor], ss: list[torch.Tensor], vhs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M core: concatenate task singular triplets, replace U and V by their polar factors.

    Returns ``(B, A)`` with ``B @ A = polar([U_1..U_T]) diag(S) polar([V_1..V_T])^T``.
    """
    U = torch.cat(us, dim=1)
    S = torch.cat(ss)
    V = torch.cat([vh.T for vh in vhs], dim=1)
    return ops.polar(U) * S.unsqueeze(0), ops.polar(V).T


def _tsv_keep(rank_fraction: float | None, m: int, n: int, T: int) -> int:
    frac = (1.0 / T) if rank_fraction is None else rank_fraction
    return max(1, int(frac * min(m, n)))


@register_method(
    "tsv_m",
    linear_in_scaling=True,
    params=[SCALING, Param("rank_fraction", "float", None, "fraction of min(m,n) singular triplets kept per task "
                           "(default 1/T)", low=0.0, high=1.0, low_open=True)],
    description="keep each task's top singular triplets, orthogonalise U and V (polar), recombine",
    paper="https://arxiv.org/abs/2412.00081",
    exact_in_factor_space=True,
)
def tsv_m(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025, https://arxiv.org/abs/2412.00081).

    Per module and task: SVD of ``s_t B_t A_t`` from the factors, keep the top
    ``rank_fraction * min(m, n)`` triplets (default ``1/T``; a LoRA has at most r), concatenate,
    replace the stacked U and V by their orthogonal polar factors, recombine, times lambda.
    """
    T, lam = len(adapters), float(params["scaling"])
    factors = {}
    for key in module_keys(adapters):
        us, ss, vhs = [], [], []
        for ad in adapters:
            mod = ad.modules[key]
            U, S, Vh = ops.truncate(*ops.factor_svd(*ops.scaled_factors(ad, key)),
                                    _tsv_keep(params["rank_fraction"], mod.out_features, mod.in_features, T))
            us.append(U)
            ss.append(S)
            vhs.append(Vh)
        B, A = tsv_factors(us, ss, vhs)
        factors[key] = (lam * B, A)
    ad = factor_adapter(adapters, factors, "tsv_m")
    return MergeResult("tsv_m", params, adapter=ad, info={"rank": _rank_info(ad)})


# ------------------------------------------------------------------------------------------------ Iso-C / CTS


def _ta_factors(adapters: list[LoraAdapter], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.concat_factors([ops.scaled_factors(ad, key) for ad in adapters])


@register_method(
    "iso_c",
    linear_in_scaling=True,
    params=[SCALING],
    description="SVD of the task-arithmetic sum with all singular values replaced by their mean",
    paper="https://arxiv.org/abs/2502.04959",
    exact_in_factor_space=True,
)
def iso_c(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Iso-C (Marczak et al., 2025, https://arxiv.org/abs/2502.04959).

    ``Delta = sum_t tau_t = U S V^T``; result ``lambda * mean(S) * U V^T``. For LoRA the spectrum is
    taken over the numerical rank of the sum (at most ``sum_t r_t``), not the whole ``min(m, n)``.
    """
    lam = float(params["scaling"])
    factors = {}
    for key in module_keys(adapters):
        U, S, Vh = ops.factor_svd(*_ta_factors(adapters, key))
        sbar = S.mean() if S.numel() else torch.tensor(0.0)
        factors[key] = (lam * sbar * U, Vh)
    ad = factor_adapter(adapters, factors, "iso_c")
    return MergeResult("iso_c", params, adapter=ad, info={"rank": _rank_info(ad)})


@register_method(
    "iso_cts",
    linear_in_scaling=True,
    params=[SCALING, Param("common_fraction", "float", 0.8, "fraction of the rank budget given to the common "
                           "subspace", low=0.0, high=1.0, low_open=True)],
    description="Iso-C plus task-specific directions orthogonal to the common subspace, flattened spectrum",
    paper="https://arxiv.org/abs/2502.04959",
    exact_in_factor_space=True,
)
def iso_cts(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Iso-CTS (Marczak et al., 2025, https://arxiv.org/abs/2502.04959).

    Rank budget ``R = min(sum_t r_t, m, n)``; common subspace = top ``k = max(1, int(common_fraction*R))``
    triplets of the TA sum; each task adds the top ``s = (R - k) // T`` triplets of
    ``(I - U_c U_c^T) tau_t``; the stacked U and V are replaced by their polar factors and every
    singular value by the mean of the selected ones: ``lambda * mean(S) * polar(U) polar(V)^T``.
    """
    T, lam = len(adapters), float(params["scaling"])
    factors = {}
    for key in module_keys(adapters):
        mods = [ad.modules[key] for ad in adapters]
        R = min(sum(m.rank for m in mods), mods[0].out_features, mods[0].in_features)
        U, S, Vh = ops.factor_svd(*_ta_factors(adapters, key))
        k = min(max(1, int(params["common_fraction"] * R)), S.numel())
        Uc, Sc, Vhc = ops.truncate(U, S, Vh, k)
        s = (R - k) // T
        us, ss, vhs = [Uc], [Sc], [Vhc]
        if s > 0:
            for ad in adapters:
                B, A = ops.scaled_factors(ad, key)
                Bp = B - Uc @ (Uc.T @ B)
                Ut, St, Vht = ops.truncate(*ops.factor_svd(Bp, A), s)
                us.append(Ut)
                ss.append(St)
                vhs.append(Vht)
        Sall = torch.cat(ss)
        sbar = Sall.mean() if Sall.numel() else torch.tensor(0.0)
        Bm, Am = tsv_factors(us, [torch.ones_like(x) for x in ss], vhs)
        factors[key] = (lam * sbar * Bm, Am)
    ad = factor_adapter(adapters, factors, "iso_cts")
    return MergeResult("iso_cts", params, adapter=ad, info={"rank": _rank_info(ad)})


# ------------------------------------------------------------------------------------------------ KnOTS


def knots_decompose(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """SVD of the column concatenation ``[B_1 A_1, ..., B_T A_T]`` (m x T n) from the factors.

    Returns ``U`` (m x k), ``S`` (k) and the per-task blocks ``Vh_t`` (k x n) of ``Vh``.
    """
    Qb, Rb = torch.linalg.qr(torch.cat([b for b, _ in factors], dim=1))
    qs, rs = zip(*[torch.linalg.qr(a.T) for _, a in factors])
    core = Rb @ torch.block_diag(*[r.T for r in rs])  # type: ignore[no-untyped-call]  # torch leaves block_diag unannotated
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = int((s > 1e-6 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    blocks, off = [], 0
    for q in qs:
        r = q.shape[1]
        blocks.append(vh[:, off:off + r] @ q.T)
        off += r
    return Qb @ u, s, blocks


def knots_coordinates(U: torch.Tensor, S: torch.Tensor, blocks: list[torch.Tensor],
                      s_on_v: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Basis and per-task coordinates to merge: ``(U, [S V_t^T])`` with ``s_on_v`` (official KnOTS),
    ``(U S, [V_t^T])`` without; either way ``basis @ coordinates_t = tau_t``."""
    if s_on_v:
        return U, [S.unsqueeze(1) * b for b in blocks]
    return U * S.unsqueeze(0), blocks


@register_method(
    "knots",
    linear_in_scaling=True,
    task_wide=by_variant,
    params=[SCALING, Param("variant", "str", "ties", "merge rule for the per-task coordinates",
                           choices=tuple(VARIANT_SPARSE)),
            Param("s_on_v", "bool", True, "trim/merge the S-scaled coordinates S V_t^T (true: official KnOTS, "
                  "s_on_V) or the unscaled V_t^T (false: a variant)"),
            DENSITY, DROP_P, THRESHOLD, SIGN, SEED, WEIGHTS],
    description="one SVD of the concatenated task updates; merge the per-task coordinates S V_t^T (official; "
                "s_on_v=false: unscaled V_t^T) with TA/TIES/DARE-TIES",
    paper="https://arxiv.org/abs/2410.19735",
    exact_in_factor_space=True,
)
def knots(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """KnOTS (Stoica et al., 2024, https://arxiv.org/abs/2410.19735).

    ``[tau_1 .. tau_T] = U S [V_1^T .. V_T^T]`` (computed from the factors). With ``s_on_v=True``
    (default, the official implementation github.com/gstoica27/KnOTS: ``diag(s) @ V`` before the
    masking) the task coordinates ``S V_t^T`` (k x n) are merged with TA (sum), TIES or DARE-TIES
    (per-task thresholds over all modules) and the result is ``lambda * U (S V^T)_merged``. With
    ``s_on_v=False`` the unscaled ``V_t^T`` are merged and the result is ``lambda * U S V_merged^T``;
    a variant whose only difference is TIES's magnitude trim, which then ignores the singular
    values (``S`` scales a whole row of every task alike, so TA, DARE's random drop, the sign
    election and the disjoint mean come out the same). ``variant="ta"`` equals task arithmetic.
    """
    keys, T = module_keys(adapters), len(adapters)
    US: dict[str, torch.Tensor] = {}
    V: dict[str, list[torch.Tensor]] = {}
    for key in keys:
        U, S, blocks = knots_decompose([ops.scaled_factors(ad, key) for ad in adapters])
        US[key], V[key] = knots_coordinates(U, S, blocks, bool(params["s_on_v"]))
    sparsify, consensus = VARIANT_SPARSE[params["variant"]]
    dev = device_of(adapters)
    merged = sparse_combine(keys, lambda t, k: V[k][t], T, sparsify=sparsify, consensus=consensus,
                            weights=task_weights(params, T, dev), density=params["density"], p=params["p"],
                            threshold=params["threshold"], sign_method=params["sign_method"],
                            generator=ops.make_generator(seed_of(params, ctx), dev) if sparsify == "dare" else None,
                            ctx=ctx)
    lam = float(params["scaling"])
    ad = factor_adapter(adapters, {k: (lam * US[k], merged[k]) for k in keys}, "knots")
    return MergeResult("knots", params, adapter=ad, info={"rank": _rank_info(ad)})


# ------------------------------------------------------------------------------------------------ Core space


def core_basis(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference bases of the core space: left singular vectors of ``[B_1 .. B_T]`` (m x R) and right
    singular vectors of ``[A_1; ..; A_T]`` (n x R)."""
    Ub, _, _ = torch.linalg.svd(torch.cat([b for b, _ in factors], dim=1), full_matrices=False)
    _, _, Vha = torch.linalg.svd(torch.cat([a for _, a in factors], dim=0), full_matrices=False)
    return Ub, Vha.T


@register_method(
    "core_space",
    linear_in_scaling=True,
    task_wide=by_variant,
    params=[SCALING, Param("variant", "str", "ta", "merge rule inside the core space",
                           choices=("ta", "ties", "dare_ties", "tsv")), DENSITY, DROP_P, THRESHOLD, SIGN, SEED,
            WEIGHTS],
    description="project LoRA factors onto a shared T*r core basis, merge there (TA/TIES/TSV), map back",
    paper="https://arxiv.org/abs/2509.17786",
    exact_in_factor_space=True,
)
def core_space(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Core-space merging (Panariello et al., NeurIPS 2025, https://arxiv.org/abs/2509.17786).

    Bases ``U_B`` (from the stacked B's) and ``V_A`` (from the stacked A's) span every task update,
    so ``tau_t = U_B M_t V_A^T`` exactly with the core ``M_t = (U_B^T s_t B_t)(A_t V_A)`` (R x R,
    R = sum of ranks). Cores are merged with TA (lossless: equals task arithmetic), TIES, DARE-TIES
    or TSV-M; the result ``lambda * U_B M V_A^T`` is returned as a LoRA of rank R.
    """
    keys, T = module_keys(adapters), len(adapters)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    cores: dict[str, list[torch.Tensor]] = {}
    for key in keys:
        f = [ops.scaled_factors(ad, key) for ad in adapters]
        Ub, Va = core_basis(f)
        bases[key] = (Ub, Va)
        cores[key] = [(Ub.T @ b) @ (a @ Va) for b, a in f]
    variant, dev = params["variant"], device_of(adapters)
    w = task_weights(params, T, dev)
    if variant == "tsv":
        merged = {}
        for key in keys:
            us, ss, vhs = [], [], []
            for t, M in enumerate(cores[key]):
                U, S, Vh = ops.truncate(*ops.dense_svd(w[t] * M), _tsv_keep(None, M.shape[0], M.shape[1], T))
                us.append(U)
                ss.append(S)
                vhs.append(Vh)
            B, A = tsv_factors(us, ss, vhs)
            merged[key] = B @ A
    else:
        sparsify, consensus = VARIANT_SPARSE[variant]
        merged = sparse_combine(keys, lambda t, k: cores[k][t], T, sparsify=sparsify, consensus=consensus, weights=w,
                                density=params["density"], p=params["p"], threshold=params["threshold"],
                                sign_method=params["sign_method"],
                                generator=ops.make_generator(seed_of(params, ctx), dev) if sparsify == "dare" else None,
                                ctx=ctx)
    lam = float(params["scaling"])
    ad = factor_adapter(adapters, {k: (lam * bases[k][0] @ merged[k], bases[k][1].T) for k in keys}, "core_space")
    return MergeResult("core_space", params, adapter=ad, info={"rank": _rank_info(ad)})


# ------------------------------------------------------------------------------------------------ Compress-then-Merge


def shared_core_subspaces(cores: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank``-dimensional left and right subspaces shared by the task cores (R x R each): the
    top left singular vectors of ``[M_1 .. M_T]`` and the top right singular vectors of
    ``[M_1; ..; M_T]``, i.e. the subspaces that keep the most of ``sum_t ||tau_t||_F^2`` (R x rank each)."""
    P, _, _ = torch.linalg.svd(torch.cat(cores, dim=1), full_matrices=False)
    _, _, Qh = torch.linalg.svd(torch.cat(cores, dim=0), full_matrices=False)
    return P[:, :rank], Qh[:rank].T


@register_method(
    "ctm",
    linear_in_scaling=True,
    task_wide=by_variant,
    params=[SCALING, Param("rank", "int", 0, "rank of the merged adapter (0 = the largest input rank)", low=0),
            Param("variant", "str", "ta", "merge rule inside the rank x rank coordinates",
                  choices=("ta", "ties", "dare_ties")), DENSITY, DROP_P, THRESHOLD, SIGN, SEED, WEIGHTS],
    description="Compress-then-Merge: project every adapter onto shared rank-r subspaces, merge the r x r "
                "coordinates (TA/TIES/DARE-TIES): a rank-r LoRA by construction, its error reported",
    paper="https://arxiv.org/abs/2606.03723",
    exact_in_factor_space=True,
)
def ctm(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """Compress-then-Merge (He et al., ICML 2026, https://arxiv.org/abs/2606.03723), as we read it.

    In the core space of every module (:func:`core_basis`, ``tau_t = U_B M_t V_A^T`` exactly) the
    shared subspaces are the top-``rank`` left/right singular subspaces ``P``, ``Q`` of all task
    cores together (:func:`shared_core_subspaces`, computed from the LoRA weights only); each task
    becomes ``C_t = P^T M_t Q`` (rank x rank), the cores are merged with the ``variant`` rule, and
    the result ``lambda * (U_B P) C (V_A Q)^T`` is a LoRA of rank ``rank`` by construction.
    ``info`` reports per module ``relative_error``: the distance of the result from the same rule
    applied without compression (core-space merging, :func:`core_space`), relative to the latter
    (TA: exact; TIES and DARE: their masks are drawn on the compressed coordinates; a task-wide
    TIES threshold of the reference is taken over the modules merged in the same call), and
    ``kept_energy``: the share of ``sum_t ||tau_t||^2`` the subspaces keep.
    """
    keys, T = module_keys(adapters), len(adapters)
    rank = int(params["rank"]) or max(ad.modules[k].rank for ad in adapters for k in keys)
    variant, dev = params["variant"], device_of(adapters)
    w = task_weights(params, T, dev)
    sparsify, consensus = VARIANT_SPARSE[variant]
    seed = seed_of(params, ctx)

    def combine(getter: Any, what: list[str], c: MergeContext) -> dict[str, torch.Tensor]:
        return sparse_combine(what, getter, T, sparsify=sparsify, consensus=consensus, weights=w,
                              density=params["density"], p=params["p"], threshold=params["threshold"],
                              sign_method=params["sign_method"],
                              generator=ops.make_generator(seed, dev) if sparsify == "dare" else None, ctx=c)

    bases, cores, small = {}, {}, {}
    kept: dict[str, float] = {}
    for key in keys:
        f = [ops.scaled_factors(ad, key) for ad in adapters]
        Ub, Va = core_basis(f)
        M = [(Ub.T @ b) @ (a @ Va) for b, a in f]
        P, Q = shared_core_subspaces(M, min(rank, M[0].shape[0]))
        bases[key], cores[key] = (Ub @ P, Va @ Q, P, Q), M
        small[key] = [P.T @ m @ Q for m in M]
        total = sum(float(m.double().square().sum()) for m in M)
        kept[key] = sum(float(c.double().square().sum()) for c in small[key]) / total if total > 0 else 1.0
    merged = combine(lambda t, k: small[k][t], keys, ctx)
    if ctx.magnitude_probe is not None:  # a streamed threshold pre-pass: it collects, nothing is merged
        return MergeResult("ctm", params, adapter=factor_adapter(adapters, {}, "ctm"))
    # the reference: the same rule on the uncompressed cores, its thresholds over the modules at hand
    full = combine(lambda t, k: cores[k][t], keys,
                   dataclasses.replace(ctx, task_thresholds=None, magnitude_probe=None, streaming=False))
    errors = {}
    for key in keys:
        _, _, P, Q = bases[key]
        ref = full[key]
        diff = float(torch.linalg.matrix_norm(P @ merged[key] @ Q.T - ref))
        norm = float(torch.linalg.matrix_norm(ref))
        errors[key] = diff / norm if norm > 0 else 0.0
    lam = float(params["scaling"])
    ad = factor_adapter(adapters, {k: (lam * bases[k][0] @ merged[k], bases[k][1].T) for k in keys}, "ctm")
    info = {"rank": _rank_info(ad), "relative_error": errors, "max_relative_error": max(errors.values(), default=0.0),
            "kept_energy": kept}
    return MergeResult("ctm", params, adapter=ad, info=info)
