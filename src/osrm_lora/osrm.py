"""OSRM subspace initialisation of LoRA ``A`` and post-hoc projection of trained adapters.

Shapes: for a Linear module ``W0`` (m x n, input dim n) the LoRA update is ``dW = s * B @ A`` with
``A`` (r x n, PEFT ``lora_A.weight``), ``B`` (m x r, PEFT ``lora_B.weight``) and ``s`` the scaling
(``lora_alpha / r``). Every OSRM mode returns ``A`` with orthonormal rows (``A @ A.T = I_r``) whose
sign is fixed deterministically (largest-magnitude entry of each row positive).

Modes (see docs/METHOD.md):

* ``code``  -- reproduction of the reference code: stack the OTHER tasks' mean input vectors
  (k x n), full SVD, last r right singular vectors. Only k directions are data-determined; the rest
  of the null space is picked by the linear-algebra library.
* ``paper`` -- ``S_{-i} = sum_{j != i} S_j`` with ``S_j`` the token second moment of task j;
  ``A_i`` = the r eigenvectors of ``S_{-i}`` with the SMALLEST eigenvalues.
* ``own``   -- the project's extension: orthonormal basis of the span of the top-r generalised
  eigenvectors of ``(S_i, S_{-i} + eps I)``, ``eps = ridge * trace(S_{-i}) / n``: keeps the task's
  own input energy while avoiding the other tasks' directions.
* ``standard`` -- PEFT's default init (Kaiming-uniform ``A``, ``a = sqrt(5)``), for baselines.

Post-hoc projection: ``dW' = dW A_sub^T A_sub`` done in factor form (``A' = A A_sub^T A_sub``, ``B``
and ``s`` unchanged). The reference script rebuilt the factors from an SVD of ``dW`` (which already
contains ``s``) and stored them under the same scaling without dividing ``B`` by ``s``, i.e. it applied
``s * dW'``; ``reference_scaling_bug=True`` reproduces that for comparison only.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from torch import nn

from osrm_lora.errors import AdapterError, ConfigError, OsrmError
from osrm_lora.fsutil import atomic_dir, read_json, write_json
from osrm_lora.model.keys import match_key, strip_peft_prefix
from osrm_lora.stats import StatsStore

logger = logging.getLogger(__name__)

OsrmMode = Literal["code", "paper", "own"]
"""The OSRM modes (docs/METHOD.md): the one spelling of these names; the others derive from it."""
InitMode = Literal["standard", OsrmMode]
"""An init's mode: PEFT's standard init or an OSRM mode (``InitSettings.mode``)."""
OSRM_MODES: tuple[str, ...] = get_args(OsrmMode)
INIT_MODES: tuple[str, ...] = get_args(InitMode)
DEFAULT_OSRM_MODE: OsrmMode = "paper"
"""The mode of ``osrm-lora init`` / ``project`` (and ``write_initial_adapters``) when none is given."""
CODE_MEANS = ("task", "token")


# --------------------------------------------------------------------------------------------------
# pure math
# --------------------------------------------------------------------------------------------------
def fix_row_signs(A: torch.Tensor) -> torch.Tensor:
    """Flip each row (last dimension; ``A`` may be a stack ``(..., r, n)``) so that its
    largest-magnitude entry (first one on ties) is positive."""
    idx = A.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(A, -1, idx))
    sign[sign == 0] = 1
    return A * sign


def _check_rank(r: int, n: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or r > n:
        raise ConfigError(f"LoRA rank {r!r} must be an integer in 1..{n} (the module's input dimension); fix the rank")


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ConfigError(f"unknown eigensolver {solver!r}; choose one of {', '.join(SOLVERS)}")


def code_mode_A(other_means: torch.Tensor, r: int) -> torch.Tensor:
    """Reference-code OSRM: ``other_means`` (k x n) stacks the other tasks' mean input vectors; the
    last ``r`` right singular vectors of its FULL SVD (``full_matrices=True``, so k < n works) as rows
    (r x n, float64). When ``r > n - rank(X)`` some rows are not in the null space (logged).
    A stack ``(B, k, n)`` gives ``(B, r, n)`` (one LAPACK SVD per matrix, on the CPU)."""
    X = other_means.detach().to("cpu", torch.float64)
    if X.dim() not in (2, 3):
        raise ConfigError(f"code mode needs a (k, n) matrix of mean vectors, got shape {tuple(X.shape)}")
    n = X.shape[-1]
    _check_rank(r, n)
    _, S, Vh = torch.linalg.svd(X, full_matrices=True)
    for s in S.reshape(-1, S.shape[-1]) if S.dim() > 1 else [S]:
        tol = (s.max().item() if s.numel() else 0.0) * max(X.shape[-2:]) * torch.finfo(torch.float64).eps
        null_dim = n - int((s > tol).sum().item())
        if r > null_dim:
            logger.warning("code mode: rank %d exceeds the null-space dimension %d; some rows read other tasks' means",
                           r, null_dim)
    return fix_row_signs(Vh[..., n - r :, :].clone())


def paper_mode_A(S_other: torch.Tensor, r: int, *, solver: str = "eigh", subset_tol: float = 1e-6,
                 seed: int = 0) -> torch.Tensor:
    """Paper OSRM: the ``r`` eigenvectors of ``S_other`` (n x n, symmetric PSD) with the SMALLEST
    eigenvalues, as rows (r x n, float64; eigh in float64). A stack ``(B, n, n)`` is solved in one
    batched call and gives ``(B, r, n)``. ``solver="subset"``: see :func:`compute_osrm_A`."""
    _check_solver(solver)
    S = _sym64(S_other)
    _check_rank(r, S.shape[-1])
    n = S.shape[-1]
    S3 = S.reshape(-1, n, n)
    A, _ = _paper_batch(S3, r, solver, _seeded_blocks(solver, seed, S3.shape[0], n, r, S.device), subset_tol)
    return A.reshape(*S.shape[:-2], r, n)


def own_mode_A(S_own: torch.Tensor, S_other: torch.Tensor, r: int, ridge: float = 1e-3, *, solver: str = "eigh",
               subset_tol: float = 1e-6, seed: int = 0) -> torch.Tensor:
    """Own OSRM: orthonormal row basis (r x n, float64) of the span of the top-``r`` generalised
    eigenvectors of ``S_own v = lambda (S_other + eps I) v`` with ``eps = ridge * trace(S_other)/n``
    (``ridge`` itself if the trace is 0). Rows are Gram-Schmidt in descending-eigenvalue order.
    Stacks ``(B, n, n)`` are solved in one batched call (``(B, r, n)``); ``solver``: see
    :func:`compute_osrm_A`."""
    _check_solver(solver)
    Si, So = _sym64(S_own), _sym64(S_other)
    n = So.shape[-1]
    if Si.shape != So.shape:
        raise ConfigError(f"own mode needs S_own and S_other of equal shape, got {tuple(Si.shape)} and {tuple(So.shape)}")
    _check_rank(r, n)
    if ridge <= 0:
        raise ConfigError(f"ridge must be positive, got {ridge}; use e.g. 1e-3")
    Si3, So3 = Si.reshape(-1, n, n), So.reshape(-1, n, n)
    A, _ = _own_batch(Si3, So3, r, ridge, solver, _seeded_blocks(solver, seed, So3.shape[0], n, r, So.device),
                      subset_tol)
    return A.reshape(*So.shape[:-2], r, n)


def standard_A(r: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's default LoRA ``A`` (Kaiming-uniform with ``a = sqrt(5)``: U(-1/sqrt(n), 1/sqrt(n))), r x n."""
    _check_rank(r, n)
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(r, n, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _sym64(S: torch.Tensor) -> torch.Tensor:
    S = S.detach().to(dtype=torch.float64)  # stays on its device: eigensolves run on the GPU when S is there
    if S.dim() < 2 or S.shape[-1] != S.shape[-2]:
        raise ConfigError(f"expected a square second-moment matrix, got shape {tuple(S.shape)}")
    return (S + S.mT) / 2


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, descending) between the row spaces of ``A`` (.., r, n) and ``B``
    (.., s, n), in float64. Computed from the SINES, ``svdvals((I - P_A) Q_B)``, which resolve angles
    down to ~1e-16; ``arccos(svdvals(Q_A^T Q_B))`` cannot resolve angles below ~1.5e-8."""
    Qa = torch.linalg.qr(A.detach().double().mT)[0]
    Qb = torch.linalg.qr(B.detach().double().mT)[0]
    resid = Qb - Qa @ (Qa.mT @ Qb)
    angles: torch.Tensor = torch.linalg.svdvals(resid).clamp(max=1.0).asin()
    return angles


# ---- batched eigensolvers on (B, n, n) float64 stacks -----------------------------------------------
SOLVERS = ("eigh", "subset")
_SUBSET_DEGREE = 12     # Chebyshev degree between two Rayleigh-Ritz steps
_SUBSET_MAX_OUTER = 16  # filter + Rayleigh-Ritz rounds before a matrix falls back to eigh
_PAPER_SHIFT = 1e-10    # paper subset: S + shift * trace(S) I is inverted (condition <= 1e10: Cholesky is safe)


def _block_size(r: int) -> int:
    """Subset solver block: r wanted vectors plus r + 8 guard vectors (a lower filter cut-off)."""
    return 2 * r + 8


def _start_blocks(labels: Sequence[str], n: int, r: int, device: torch.device) -> torch.Tensor:
    """Seeded random start blocks ``(len(labels), n, b)`` for the subset solver, one generator per
    problem label (so the result of a problem does not depend on the batch it is solved in), made on
    the CPU (the same on every device)."""
    b = min(n, _block_size(r))
    out = torch.empty(len(labels), n, b, dtype=torch.float64)
    for i, lab in enumerate(labels):
        gen = torch.Generator().manual_seed(zlib.crc32(lab.encode()))
        out[i] = torch.randn(n, b, generator=gen, dtype=torch.float64)
    return out.to(device)


def _seeded_blocks(solver: str, seed: int, batch: int, n: int, r: int, device: torch.device) -> torch.Tensor:
    if not _use_subset(solver, n, r):
        return torch.empty(0)
    return _start_blocks([f"{seed}:{i}" for i in range(batch)], n, r, device)


def _use_subset(solver: str, n: int, r: int) -> bool:
    return solver == "subset" and 4 * _block_size(r) <= n


def _paper_eigh(S: torch.Tensor, r: int) -> torch.Tensor:
    _, vecs = torch.linalg.eigh(S)  # ascending
    return fix_row_signs(vecs[..., :r].mT.contiguous())


def _own_reduce(Si: torch.Tensor, So: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, C, eps)``: ``L L^T = S_other + eps I`` and ``C = L^-1 S_own L^-T`` (symmetrised), batched."""
    n = So.shape[-1]
    trs = [float(torch.trace(m)) for m in So]  # per matrix, as the per-module code summed it
    eps = torch.tensor([ridge * t / n if t > 0 else ridge for t in trs], dtype=torch.float64, device=So.device)
    M = So + eps[:, None, None] * torch.eye(n, dtype=torch.float64, device=So.device)
    L = torch.linalg.cholesky(M)
    # C = L^-1 S_own L^-T ; generalised eigenvectors v = L^-T y
    Linv_S = torch.linalg.solve_triangular(L, Si, upper=False)
    C = torch.linalg.solve_triangular(L, Linv_S.mT, upper=False)
    return L, (C + C.mT) / 2, eps


def _own_back(L: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Rows of ``A`` from the top-r eigenvectors ``Y`` (descending) of ``C``: ``V = L^-T Y``, QR, signs."""
    V = torch.linalg.solve_triangular(L.mT, Y, upper=True)
    Q, _ = torch.linalg.qr(V)
    return fix_row_signs(Q.mT.contiguous())


def _own_eigh(L: torch.Tensor, C: torch.Tensor, r: int) -> torch.Tensor:
    _, Y = torch.linalg.eigh(C)
    return _own_back(L, Y[..., -r:].flip(-1))  # top r, descending


def _rayleigh_ritz_top(X: torch.Tensor, KX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = X.mT @ KX
    th, W = torch.linalg.eigh((T + T.mT) / 2)
    th, W = th.flip(-1), W.flip(-1)  # descending
    return th, X @ W, KX @ W


def _chebyshev(K: torch.Tensor, X: torch.Tensor, degree: int, lo: torch.Tensor, cut: torch.Tensor,
               hi: torch.Tensor) -> torch.Tensor:
    """``p(K) X`` with ``p = T_degree`` mapped so that ``[lo, cut]`` goes to ``[-1, 1]``, scaled by
    its value at ``hi`` (Zhou & Saad's three-term recurrence, no overflow): damps the unwanted part of
    the spectrum and keeps the eigenvalues above ``cut``."""
    c = ((cut + lo) / 2)[:, None, None]
    e = ((cut - lo) / 2)[:, None, None]
    t_hi = (hi[:, None, None] - c) / e
    s = 1 / t_hi
    Y0, Y1 = X, (K @ X - c * X) * (s / e)
    for _ in range(degree - 1):
        s_new = 1 / (2 * t_hi - s)
        Y0, Y1 = Y1, (K @ Y1 - c * Y1) * (2 * s_new / e) - (s * s_new) * Y0
        s = s_new
    return Y1


def _subset_top(K: torch.Tensor, X0: torch.Tensor, aux: dict[str, torch.Tensor],
                check: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]],
                                tuple[torch.Tensor, torch.Tensor]],
                tol: float) -> tuple[list[torch.Tensor | None], torch.Tensor, torch.Tensor]:
    """Chebyshev-filtered subspace iteration with a block of ``b`` vectors for the top eigenvectors of
    the symmetric PSD stack ``K`` (B, n, n): ``degree`` filtered products, QR, Rayleigh-Ritz, then
    ``check`` gives each matrix's error bound and candidate ``A``. A matrix stops when its bound is
    ``<= tol`` (accepted), when a finite bound stops halving from one round to the next (from round 4
    on: a near-degenerate gap or the rounding floor) or after ``_SUBSET_MAX_OUTER`` rounds (not
    accepted: its entry stays None). Finished matrices leave the batch (``aux``, the
    check's extra per-matrix tensors, shrinks with it). Returns (A per matrix or None, bound, rounds)."""
    B = K.shape[0]
    result: list[torch.Tensor | None] = [None] * B
    bound = torch.full((B,), math.inf, dtype=torch.float64)
    rounds = torch.zeros(B, dtype=torch.int64)
    idx = torch.arange(B)
    X = torch.linalg.qr(X0)[0]
    th, X, KX = _rayleigh_ritz_top(X, K @ X)
    prev = torch.full((B,), math.inf, dtype=torch.float64, device=K.device)
    for it in range(1, _SUBSET_MAX_OUTER + 1):
        hi, lo = th[:, 0], torch.zeros_like(th[:, 0])
        cut = torch.maximum(th[:, -1], lo + 1e-3 * (hi - lo))
        X = torch.linalg.qr(_chebyshev(K, X, _SUBSET_DEGREE, lo, cut, hi))[0]
        th, X, KX = _rayleigh_ritz_top(X, K @ X)
        bnd, A = check(th, X, KX, aux)
        ok = bnd <= tol
        stalled = (it >= 4) & torch.isfinite(bnd) & torch.isfinite(prev) & ~(bnd < 0.5 * prev)
        done = ok | stalled | (it == _SUBSET_MAX_OUTER)
        bnd_cpu, ok_cpu, done_cpu = bnd.cpu(), ok.cpu(), done.cpu()
        for j in torch.nonzero(done_cpu).flatten().tolist():
            k = int(idx[j])
            bound[k], rounds[k] = bnd_cpu[j], it
            if ok_cpu[j]:
                result[k] = A[j]
        if bool(done_cpu.all()):
            break
        if bool(done_cpu.any()):
            keep = torch.nonzero(~done_cpu).flatten()
            kd = keep.to(K.device)
            K, X, KX, th, prev = K[kd], X[kd], KX[kd], th[kd], bnd[kd]
            aux = {k2: v[kd] for k2, v in aux.items()}
            idx = idx[keep]
        else:
            prev = bnd
    return result, bound, rounds


def _ritz_gap(delta: torch.Tensor, res_next: torch.Tensor) -> torch.Tensor:
    """Gap estimate between the r wanted Ritz values and the rest: the Ritz gap ``delta`` less the
    possible error ``res_next^2 / delta`` of the first unwanted Ritz value (Kato-Temple: Ritz values
    are off by about their residual squared over the gap); ``nan`` (-> bound inf) when not positive."""
    gap = delta - res_next**2 / delta
    return torch.where(gap > 0, gap, torch.full_like(gap, math.nan))


def _nan_to_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, math.inf), x)


def _paper_batch(S: torch.Tensor, r: int, solver: str, X0: torch.Tensor, tol: float
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Paper mode on a symmetrised stack ``S`` (B, n, n). ``subset``: Chebyshev-filtered subspace
    iteration on ``K = (S + shift I)^-1 = L^-T L^-1`` (Cholesky, triangular inverse, Gram product),
    then Rayleigh-Ritz with ``S`` itself in the block (ascending Ritz pairs ``theta``, ``Z``); bound =
    ``||S Z_r - Z_r Theta_r||_F / gap`` (Davis-Kahan sin-theta), gap = :func:`_ritz_gap` of
    ``theta_{r+1} - theta_r``. Matrices whose bound exceeds ``tol`` (or whose Cholesky fails) are
    solved with eigh."""
    B, n, _ = S.shape
    info = _info(B, solver, n, r)
    if not _use_subset(solver, n, r):
        return _paper_eigh(S, r), info
    tr = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)
    shift = _PAPER_SHIFT * torch.clamp(tr, min=torch.finfo(torch.float64).tiny)
    eye = torch.eye(n, dtype=torch.float64, device=S.device)
    L, fail = torch.linalg.cholesky_ex(S + shift[:, None, None] * eye)
    good = torch.nonzero(fail.cpu() == 0).flatten()
    A = torch.empty(B, r, n, dtype=torch.float64, device=S.device)
    accepted = torch.zeros(B, dtype=torch.bool)
    if good.numel():
        gd = good.to(S.device)
        all_good = good.numel() == B
        Linv = torch.linalg.solve_triangular(L if all_good else L[gd], eye.expand(good.numel(), n, n), upper=False)
        del L
        K = Linv.mT @ Linv  # (S + shift I)^-1 as a Gram matrix: symmetric PSD by construction
        del Linv

        def check(th: torch.Tensor, X: torch.Tensor, KX: torch.Tensor, aux: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
            SX = aux["S"] @ X
            G = X.mT @ SX
            w, U = torch.linalg.eigh((G + G.mT) / 2)  # ascending: the smallest of S in the block
            Z, SZ = X @ U, SX @ U
            R = SZ[..., :r] - Z[..., :r] * w[:, None, :r]
            res_next = torch.linalg.vector_norm(SZ[..., r] - Z[..., r] * w[:, r:r + 1], dim=-1)
            bnd = torch.linalg.matrix_norm(R) / _ritz_gap(w[:, r] - w[:, r - 1], res_next)
            return _nan_to_inf(bnd), fix_row_signs(Z[..., :r].mT.contiguous())

        res, bnd, rounds = _subset_top(K, X0 if all_good else X0[gd], {"S": S if all_good else S[gd]}, check, tol)
        del K
        for j, k in enumerate(good.tolist()):
            info["bound"][k], info["rounds"][k] = float(bnd[j]), int(rounds[j])
            res_j = res[j]
            if res_j is not None:
                A[k] = res_j
                accepted[k] = True
    rest = torch.nonzero(~accepted).flatten()
    if rest.numel():
        A[rest.to(S.device)] = _paper_eigh(S[rest.to(S.device)], r)
    info["fallback"] = (~accepted).tolist()
    return A, info


def _own_batch(Si: torch.Tensor, So: torch.Tensor, r: int, ridge: float, solver: str, X0: torch.Tensor,
               tol: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Own mode on symmetrised stacks: batched Cholesky ``L L^T = S_other + eps I``, ``C = L^-1 S_own
    L^-T``, then eigh of C (or, ``subset``, Chebyshev-filtered subspace iteration on C with bound
    ``||C Y_r - Y_r Theta_r||_F / gap`` (gap = :func:`_ritz_gap` of ``theta_r - theta_{r+1}``, Ritz
    values descending) times the input-space amplification ``(1/sqrt(eps)) / sigma_min(L^-T Y_r)``
    >= ``||L^-T|| / sigma_min(L^-T Y_r)``), back substitution ``V = L^-T Y`` and QR."""
    B, n, _ = So.shape
    info = _info(B, solver, n, r)
    L, C, eps = _own_reduce(Si, So, ridge)
    if not _use_subset(solver, n, r):
        return _own_eigh(L, C, r), info

    def check(th: torch.Tensor, X: torch.Tensor, KX: torch.Tensor, aux: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        R = KX[..., :r] - X[..., :r] * th[:, None, :r]
        res_next = torch.linalg.vector_norm(KX[..., r] - X[..., r] * th[:, r:r + 1], dim=-1)
        V = torch.linalg.solve_triangular(aux["L"].mT, X[..., :r], upper=True)
        amp = aux["inv_sqrt_eps"] / torch.linalg.svdvals(V)[..., -1]
        bnd = torch.linalg.matrix_norm(R) / _ritz_gap(th[:, r - 1] - th[:, r], res_next) * amp
        Q, _ = torch.linalg.qr(V)
        return _nan_to_inf(bnd), fix_row_signs(Q.mT.contiguous())

    res, bnd, rounds = _subset_top(C, X0, {"L": L, "inv_sqrt_eps": eps.rsqrt()}, check, tol)
    A = torch.empty(B, r, n, dtype=torch.float64, device=So.device)
    accepted = torch.zeros(B, dtype=torch.bool)
    for k in range(B):
        info["bound"][k], info["rounds"][k] = float(bnd[k]), int(rounds[k])
        res_k = res[k]
        if res_k is not None:
            A[k] = res_k
            accepted[k] = True
    rest = torch.nonzero(~accepted).flatten()
    if rest.numel():
        rd = rest.to(So.device)
        A[rd] = _own_eigh(L[rd], C[rd], r)
    info["fallback"] = (~accepted).tolist()
    return A, info


def _info(B: int, solver: str, n: int, r: int) -> dict[str, Any]:
    sub = _use_subset(solver, n, r)
    return {"solver": "subset" if sub else "eigh", "bound": [math.nan] * B, "rounds": [0] * B,
            "fallback": [False] * B}


def A_drift(A0: torch.Tensor, A: torch.Tensor) -> float:
    """Relative change ``||A - A0||_F / ||A0||_F`` of a LoRA ``A`` during training."""
    A0d, Ad = A0.detach().double().cpu(), A.detach().double().cpu()
    if A0d.shape != Ad.shape:
        raise OsrmError(f"cannot compare A of shapes {tuple(A0d.shape)} and {tuple(Ad.shape)}; use adapters of one run")
    den = float(torch.linalg.norm(A0d))
    return float(torch.linalg.norm(Ad - A0d)) / den if den > 0 else float("nan")


def adapter_A_drift(initial: Any, trained: Any) -> dict[str, float]:
    """Per-module A drift between two :class:`~osrm_lora.adapters.LoraAdapter` (same modules), plus
    ``"mean"`` over modules."""
    missing = sorted(set(initial.modules) ^ set(trained.modules))
    if missing:
        raise AdapterError(f"adapters differ in modules (e.g. {missing[0]}); compare an adapter with its own initialisation")
    out = {k: A_drift(initial.modules[k].A, trained.modules[k].A) for k in sorted(initial.modules)}
    out["mean"] = sum(out.values()) / max(len(out), 1)
    return out


# --------------------------------------------------------------------------------------------------
# from statistics to A per task and module
# --------------------------------------------------------------------------------------------------
_WORK_MATRICES = 6  # n x n float64 work matrices per eigenproblem (S_other, M/L, C, eigh's output and workspace)


def _second_moments(store: StatsStore, tasks: Sequence[str], group: str, device: torch.device) -> torch.Tensor:
    """``(T, n, n)`` float64 stack of ``Gram_j / count_j`` on ``device``, bitwise equal to
    :meth:`StatsStore.second_moment` (the float32 Gram travels, the cast and an IEEE division by a
    device tensor happen there)."""
    if device.type == "cpu":
        return torch.stack([store.second_moment(t, group) for t in tasks])
    out = []
    for t in tasks:
        count = store.count(t, group)
        if count == 0:
            raise OsrmError(f"task {t!r} has no tokens in the statistics; recompute with non-empty texts")
        gram = store.gram(t, group).to(device, non_blocking=False).double()
        out.append(gram / torch.tensor(float(count), dtype=torch.float64, device=device))
    return torch.stack(out)


def _others(S: torch.Tensor, i: int, total: torch.Tensor | None) -> torch.Tensor:
    """``S_{-i} = sum_{j != i} S_j`` of a ``(T, n, n)`` stack: ``total - S_i`` (``total`` summed once
    for all i). The subtraction adds an absolute error of at most about ``T * u * (|S_i| + |S_{-i}|)``
    entrywise (u = 2^-53) to the ``(T-2) * u * |S_{-i}|`` of the direct sum; when ``S_i`` outweighs
    the others (``trace(S_i) > trace(total - S_i)``) the direct sum is used, so the extra error stays
    within a small factor of eigh's own backward error ``~u ||S_{-i}||``. Two tasks need no sum."""
    T = S.shape[0]
    if T == 2:
        return S[1 - i]
    assert total is not None
    diff = total - S[i]
    if float(torch.trace(S[i])) > float(torch.trace(diff)):
        direct = S[0 if i != 0 else 1].clone()
        for j in range(T):
            if j != i and j != (0 if i != 0 else 1):
                direct += S[j]
        return direct
    return diff


def _budget(device: torch.device, max_batch_bytes: int | None) -> int:
    if max_batch_bytes is not None:
        return max(1, int(max_batch_bytes))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    return 2 << 30


def compute_osrm_bases(
    store: StatsStore,
    tasks: Sequence[str],
    rank: int,
    mode: str,
    *,
    ridge: float = 1e-3,
    code_means: str = "task",
    groups: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    solver: str = "eigh",
    subset_tol: float = 1e-6,
    seed: int = 0,
    max_batch_bytes: int | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``({task: {group: A (rank x n, float64, CPU)}}, report)`` for the OSRM modes ``code``,
    ``paper`` and ``own`` (see :func:`compute_osrm_A`, which maps groups onto module keys).

    The eigenproblems of all groups of one input size and of all tasks are stacked and solved with
    batched calls (at most ``max_batch_bytes`` of float64 work matrices at a time; default half the
    free GPU memory, 2 GiB on the CPU). ``report`` counts the problems, which solver each one used,
    the subset solver's error bounds and fallbacks."""
    if mode not in OSRM_MODES:
        raise ConfigError(f"unknown OSRM mode {mode!r}; choose one of {', '.join(OSRM_MODES)}")
    _check_solver(solver)
    if not (subset_tol > 0):
        raise ConfigError(f"subset_tol must be positive, got {subset_tol}; use e.g. 1e-6")
    if mode == "own" and ridge <= 0:
        raise ConfigError(f"ridge must be positive, got {ridge}; use e.g. 1e-3")
    tasks = list(dict.fromkeys(tasks))
    missing = [t for t in tasks if t not in store.tasks]
    if missing:
        raise OsrmError(f"tasks {missing} are not in the statistics store (has {store.tasks}); recompute statistics including them")
    if len(tasks) < 2:
        raise ConfigError(f"OSRM mode {mode!r} needs at least two tasks (the other tasks define the subspace); pass more tasks")
    groups = list(dict.fromkeys(groups)) if groups is not None else store.groups
    unknown = [g for g in groups if g not in store.groups]
    if unknown:
        raise OsrmError(f"input group {unknown[0]!r} is not in the statistics store; pass groups of store.groups")
    dev = torch.device(device) if device is not None and mode != "code" else torch.device("cpu")
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    report: dict[str, Any] = {"mode": mode, "solver": solver, "subset_tol": subset_tol, "device": str(dev),
                              "problems": 0, "by_subset": 0, "by_eigh": 0, "fallback": [], "max_bound": None,
                              "batches": 0}
    by_n: dict[int, list[str]] = {}
    for g in groups:
        by_n.setdefault(int(store.meta["group_dims"][g]), []).append(g)
    T = len(tasks)
    budget = _budget(dev, max_batch_bytes)
    bounds: list[float] = []
    for n, gs in by_n.items():
        _check_rank(rank, n)
        mat = n * n * 8
        per_group = (T + 1) * mat + T * _WORK_MATRICES * mat
        g_chunk = max(1, budget // per_group)
        per_batch = T * g_chunk if budget >= per_group else max(1, (budget - (T + 1) * mat) // (_WORK_MATRICES * mat))
        for c0 in range(0, len(gs), g_chunk):
            chunk = gs[c0:c0 + g_chunk]
            problems = [(g, i) for g in chunk for i in range(T)]
            if mode == "code":
                mean_fn = store.task_mean if code_means == "task" else store.token_mean
                for b0 in range(0, len(problems), per_batch):
                    part = problems[b0:b0 + per_batch]
                    means = {g: [mean_fn(t, g) for t in tasks] for g in dict.fromkeys(g for g, _ in part)}
                    X = torch.stack([torch.stack([means[g][j] for j in range(T) if j != i]) for g, i in part])
                    A = code_mode_A(X, rank)
                    for (g, i), a in zip(part, A):
                        out[tasks[i]][g] = a
                    report["batches"] += 1
                report["problems"] += len(problems)
                report["by_eigh"] += len(problems)  # an SVD, counted with the exact solves
                continue
            S = {g: _second_moments(store, tasks, g, dev) for g in chunk}
            totals: dict[str, torch.Tensor | None] = {}
            for g in chunk:
                if T == 2:
                    totals[g] = None
                    continue
                tot = S[g][0].clone()
                for j in range(1, T):
                    tot += S[g][j]
                totals[g] = tot
            for b0 in range(0, len(problems), per_batch):
                part = problems[b0:b0 + per_batch]
                So = _sym64(torch.stack([_others(S[g], i, totals[g]) for g, i in part]))
                X0 = (_start_blocks([f"{seed}:{g}:{tasks[i]}" for g, i in part], n, rank, dev)
                      if _use_subset(solver, n, rank) else torch.empty(0))
                if mode == "paper":
                    A, info = _paper_batch(So, rank, solver, X0, subset_tol)
                else:
                    Si = _sym64(torch.stack([S[g][i] for g, i in part]))
                    A, info = _own_batch(Si, So, rank, ridge, solver, X0, subset_tol)
                    del Si
                del So, X0
                A = A.cpu()
                for k, (g, i) in enumerate(part):
                    out[tasks[i]][g] = A[k]
                    if info["solver"] == "subset" and not info["fallback"][k]:
                        report["by_subset"] += 1
                        bounds.append(info["bound"][k])
                    else:
                        report["by_eigh"] += 1
                    if info["solver"] == "subset" and info["fallback"][k]:
                        report["fallback"].append({"task": tasks[i], "group": g, "bound": info["bound"][k],
                                                   "rounds": info["rounds"][k]})
                report["problems"] += len(part)
                report["batches"] += 1
            del S, totals
    report["max_bound"] = max(bounds) if bounds else None
    if report["fallback"]:
        logger.info("OSRM %s: %d of %d subset eigensolves missed the bound %.0e and were redone with eigh",
                    mode, len(report["fallback"]), report["problems"], subset_tol)
    logger.debug("OSRM %s bases: %s", mode, {k: v for k, v in report.items() if k != "fallback"})
    return out, report


def interference_grams(store: StatsStore, task: str, tasks: Sequence[str]
                       ) -> Callable[[str], tuple[torch.Tensor, torch.Tensor]]:
    """Module key -> (``S_own``, ``S_others``) in float32 for the training penalty of ``task``:
    its own input second moment and the MEAN of the other tasks' (so that an adapter that treats
    every task's inputs alike has ratio about 1). Keys resolve as the store resolves them; each
    input group is computed once."""
    others = [t for t in dict.fromkeys(tasks) if t != task]
    if task not in store.tasks or not others or any(t not in store.tasks for t in others):
        raise OsrmError(f"the interference penalty of {task!r} needs statistics of it and of at least one other "
                        f"task; the store has {store.tasks}")
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = store.group_of(store.resolve_module(key))
        if group not in cache:
            S_others = sum(store.second_moment(j, group) for j in others) / len(others)
            assert isinstance(S_others, torch.Tensor)
            cache[group] = (store.second_moment(task, group).float(), S_others.float())
        return cache[group]

    return lookup


def compute_osrm_A(
    store: StatsStore,
    tasks: Sequence[str],
    rank: int,
    mode: str,
    *,
    ridge: float = 1e-3,
    code_means: str = "task",
    modules: Sequence[str] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    solver: str = "eigh",
    subset_tol: float = 1e-6,
    max_batch_bytes: int | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: {module_key: A (rank x n, float32, CPU)}}`` for every task in ``tasks``.

    ``device`` (e.g. ``"cuda"``) runs the float64 eigensolves of ``paper``/``own`` there.

    For task i the OTHER tasks of ``tasks`` define the subspace: ``paper``/``own`` use
    ``S_{-i} = sum_{j != i} Gram_j / count_j`` (computed as ``total - S_i``); ``code`` stacks the
    other tasks' mean vectors (``code_means="task"``: mean of the per-sample token means, as the
    reference; ``"token"``: mean over all tokens). Modules of one input group get the same A (one
    tensor). ``modules`` defaults to all modules of the store. ``standard`` gives PEFT-style random A
    (seeded by ``seed``, independent per module).

    The eigenproblems of all tasks and of all input groups of one size are solved in batched calls
    (``max_batch_bytes``: see :func:`compute_osrm_bases`). ``solver="eigh"`` (default) is the exact
    full eigendecomposition. ``solver="subset"`` computes only the needed eigenvectors by
    Chebyshev-filtered subspace iteration (``paper``: on ``(S_{-i} + shift I)^-1``; ``own``: on the
    Cholesky-reduced ``C = L^-1 S_i L^-T``) and accepts a matrix's result only when its residual
    bound on the principal angle to the exact subspace is ``<= subset_tol`` radians; otherwise that
    matrix is solved with eigh (see docs/METHOD.md). It needs ``n >= 4 (2 rank + 8)``;
    smaller groups use eigh. ``code`` ignores ``solver`` (it is an SVD of the means); ``seed`` also
    seeds the subset solver's start blocks.
    """
    if mode not in INIT_MODES:
        raise ConfigError(f"unknown init mode {mode!r}; choose one of {', '.join(INIT_MODES)}")
    if code_means not in CODE_MEANS:
        raise ConfigError(f"unknown code_means {code_means!r}; choose 'task' or 'token'")
    _check_solver(solver)
    tasks = list(dict.fromkeys(tasks))
    missing = [t for t in tasks if t not in store.tasks]
    if missing:
        raise OsrmError(f"tasks {missing} are not in the statistics store (has {store.tasks}); recompute statistics including them")
    if mode in OSRM_MODES and len(tasks) < 2:
        raise ConfigError(f"OSRM mode {mode!r} needs at least two tasks (the other tasks define the subspace); pass more tasks")
    keys = [store.resolve_module(m) for m in modules] if modules is not None else store.modules
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    if mode == "standard":
        gen = torch.Generator().manual_seed(int(seed))
        for t in tasks:
            for key in keys:
                n = int(store.meta["group_dims"][store.group_of(key)])
                out[t][key] = standard_A(rank, n, gen).float()
        return out
    groups = list(dict.fromkeys(store.group_of(k) for k in keys))
    bases, _ = compute_osrm_bases(store, tasks, rank, mode, ridge=ridge, code_means=code_means, groups=groups,
                                  device=device, solver=solver, subset_tol=subset_tol, seed=seed,
                                  max_batch_bytes=max_batch_bytes)
    for t in tasks:
        as32 = {g: A.float() for g, A in bases[t].items()}
        for key in keys:
            out[t][key] = as32[store.group_of(key)]
    return out


def apply_A_to_peft(
    peft_model: nn.Module,
    A_by_module: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    freeze_A: bool = False,
) -> list[str]:
    """Copy ``A`` (r x n) into the ``lora_A`` weights of a PEFT model whose ``lora_B`` is still zero.

    Keys of ``A_by_module`` are module paths of the un-wrapped model (PEFT wraps them as
    ``base_model.model.<key>``; a missing/extra base prefix such as ``bert.`` is tolerated). With
    ``freeze_A`` the A weights stop requiring gradients. Returns the PEFT module names set.
    """
    lora_layers: dict[str, nn.Module] = {}
    for name, mod in peft_model.named_modules():
        lora_A = getattr(mod, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict) and adapter_name in lora_A:
            lora_layers[strip_peft_prefix(name)] = mod
    if not lora_layers:
        raise AdapterError(f"model has no LoRA layers for adapter {adapter_name!r}; wrap it with PEFT first")

    matched: dict[str, torch.Tensor] = {}
    for k, A in A_by_module.items():
        hit = match_key(k, lora_layers)
        if hit is None:
            raise AdapterError(f"module {k!r} has no (unique) LoRA layer in the PEFT model; use the same target modules")
        matched[hit] = A
    unset = sorted(set(lora_layers) - set(matched))
    if unset:
        raise AdapterError(f"no A given for LoRA module {unset[0]}; compute A for every target module")
    done = []
    with torch.no_grad():
        for key, A in matched.items():
            layer = lora_layers[key]
            # PEFT LoRA layers: lora_A / lora_B are ModuleDicts of Linear modules (checked for lora_A above)
            wA = cast(torch.Tensor, cast(nn.ModuleDict, layer.lora_A)[adapter_name].weight)
            wB = cast(torch.Tensor, cast(nn.ModuleDict, layer.lora_B)[adapter_name].weight)
            if tuple(wA.shape) != tuple(A.shape):
                raise AdapterError(f"A for {key} has shape {tuple(A.shape)} but lora_A is {tuple(wA.shape)}; use the same rank")
            if bool(wB.detach().abs().sum() != 0):
                raise AdapterError(f"lora_B of {key} is not zero; apply OSRM A before training (init_lora_weights=True)")
            wA.copy_(A.to(wA.device, wA.dtype))
            if freeze_A:
                wA.requires_grad_(False)
            done.append(key)
    logger.info("set OSRM A for %d LoRA modules%s", len(done), " (frozen)" if freeze_A else "")
    return done


# --------------------------------------------------------------------------------------------------
# post-hoc projection
# --------------------------------------------------------------------------------------------------
def project_lora(module: Any, A_sub: torch.Tensor, *, reference_scaling_bug: bool = False) -> Any:
    """Project a trained LoRA module's update onto ``span(A_sub)`` on the input side:
    ``dW' = dW A_sub^T A_sub`` with ``A' = A @ A_sub^T @ A_sub``; ``B`` and the scaling unchanged.

    ``A_sub`` (r' x n) must have orthonormal rows. ``reference_scaling_bug`` multiplies ``B`` by the
    scaling, reproducing the reference script's missing division (its update ends up ``s * dW'``).
    """
    from osrm_lora.adapters import LoraModule

    A0 = module.A
    if A_sub.dim() != 2 or A_sub.shape[1] != A0.shape[1]:
        raise OsrmError(f"projection basis has shape {tuple(A_sub.shape)} but the module's input dim is {A0.shape[1]}; "
                        "use statistics of the same base model")
    P = A_sub.double().cpu()
    A_new = (A0.double().cpu() @ P.T) @ P
    B = module.B
    if reference_scaling_bug:
        B = B * float(module.scaling)
    return LoraModule(A_new.to(A0.dtype).to(A0.device), B.clone(), module.scaling,
                      getattr(module, "fan_in_fan_out", False))


def lora_energy(module: Any) -> float:
    """``||s B A||_F^2`` in factor form: ``s^2 tr((B^T B)(A A^T))``."""
    A, B = module.A.double().cpu(), module.B.double().cpu()
    return float(module.scaling) ** 2 * float(((B.T @ B) * (A @ A.T)).sum())


def project_adapter(adapter: Any, A_by_module: Mapping[str, torch.Tensor], *,
                    reference_scaling_bug: bool = False) -> tuple[Any, dict[str, Any]]:
    """Project every module of a :class:`~osrm_lora.adapters.LoraAdapter`; returns the projected
    adapter and a report ``{"modules": {key: energy kept}, "energy_kept": total kept fraction}`` with
    energy = ``||dW||_F^2``."""
    from osrm_lora.adapters import LoraAdapter

    modules, report = {}, {}
    tot_before = tot_after = 0.0
    for key, mod in adapter.modules.items():
        hit = match_key(key, A_by_module)
        if hit is None:
            raise OsrmError(f"no projection basis for module {key!r}; compute statistics for the adapter's target modules")
        new = project_lora(mod, A_by_module[hit], reference_scaling_bug=reference_scaling_bug)
        before, after = lora_energy(mod), lora_energy(new)
        tot_before += before
        tot_after += after
        report[key] = after / before if before > 0 else float("nan")
        modules[key] = new
    import copy

    projected = LoraAdapter(modules=modules, config=copy.deepcopy(adapter.config), name=adapter.name,
                            extra=dict(adapter.extra))
    return projected, {"modules": report, "energy_kept": tot_after / tot_before if tot_before > 0 else float("nan")}


def adapter_task_name(path: str | os.PathLike[str], adapter: Any, tasks: Sequence[str]) -> str:
    """Which of ``tasks`` an adapter directory belongs to: its directory name, the adapter's name, or
    the ``task`` recorded in ``head.json`` next to it."""
    path = Path(path)
    cands = [path.name, getattr(adapter, "name", "")]
    head = path / "head.json"
    if head.exists():
        info = read_json(head)
        if isinstance(info, dict) and info.get("task"):
            cands.insert(0, str(info["task"]))
    for c in cands:
        if c in tasks:
            return c
    raise OsrmError(
        f"cannot tell which task adapter {path} belongs to ({path.name!r} is not one of {list(tasks)}); "
        "name the adapter directory after its task"
    )


def load_tasks_adapters(adapter_dirs: Sequence[str | os.PathLike[str]], store: StatsStore) -> dict[str, tuple[Path, Any]]:
    """Load adapters and map them to the store's task names (one adapter per task)."""
    from osrm_lora.adapters import load_adapter

    out: dict[str, tuple[Path, Any]] = {}
    for d in adapter_dirs:
        ad = load_adapter(d)
        task = adapter_task_name(d, ad, store.tasks)
        if task in out:
            raise OsrmError(f"two adapters ({out[task][0]} and {d}) belong to task {task!r}; pass one adapter per task")
        out[task] = (Path(d), ad)
    return out


def run_project(adapter_dirs: Sequence[str], stats_path: str, out_dir: str, rank: int, mode: str, *,
                ridge: float = 1e-3, reference_scaling_bug: bool = False) -> dict[str, Any]:
    """CLI-facing post-hoc OSRM: project each task's trained adapter onto the rank-``rank`` OSRM
    subspace computed from the OTHER given tasks' statistics. Writes ``out_dir/<adapter dir name>/``
    (adapter + every other file next to it, e.g. the task head) and ``out_dir/projection.json``;
    returns the report."""
    if mode not in OSRM_MODES:
        raise ConfigError(f"projection mode must be one of {', '.join(OSRM_MODES)}, not {mode!r}")
    store = StatsStore.load(stats_path)
    loaded = load_tasks_adapters(adapter_dirs, store)
    if len(loaded) < 2:
        raise ConfigError("post-hoc projection needs adapters of at least two tasks; pass more adapter directories")
    tasks = list(loaded)
    first = next(iter(loaded.values()))[1]
    keys = [store.resolve_module(k) for k in first.modules]
    A_all = compute_osrm_A(store, tasks, rank, mode, ridge=ridge, modules=keys)
    out = Path(out_dir)
    report: dict[str, Any] = {"mode": mode, "rank": rank, "ridge": ridge, "stats": str(stats_path),
                              "reference_scaling_bug": reference_scaling_bug, "tasks": {}}
    for task, (src, adapter) in loaded.items():
        A_map = {k: A_all[task][store.resolve_module(k)] for k in adapter.modules}
        projected, rep = project_adapter(adapter, A_map, reference_scaling_bug=reference_scaling_bug)
        target = out / src.name
        _write_projected(projected, src, target)
        report["tasks"][task] = {"source": str(src), "output": str(target), **rep}
        logger.info("projected %s (%s, rank %d): %.1f%% of the update energy kept", task, mode, rank,
                    100 * rep["energy_kept"])
    write_json(out / "projection.json", report)
    return report


def _write_projected(adapter: Any, src: Path, target: Path) -> None:
    from osrm_lora.adapters import save_adapter

    with atomic_dir(target) as tmp:
        save_adapter(adapter, tmp)
        for item in src.iterdir():
            dest = tmp / item.name
            if dest.exists() or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, dest)
            else:
                shutil.copy2(item, dest)


__all__ = [
    "A_drift", "CODE_MEANS", "DEFAULT_OSRM_MODE", "INIT_MODES", "OSRM_MODES", "InitMode", "OsrmMode", "SOLVERS", "adapter_A_drift", "adapter_task_name", "apply_A_to_peft",
    "code_mode_A", "compute_osrm_A", "compute_osrm_bases", "fix_row_signs", "interference_grams", "lora_energy", "own_mode_A", "paper_mode_A", "principal_angles", "project_adapter",
    "project_lora", "run_project", "standard_A",
]
