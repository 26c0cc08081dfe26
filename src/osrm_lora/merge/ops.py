"""Shared building blocks of merge methods (pure tensor functions).

Sparsifiers (magnitude top-k, DARE random drop), consensus rules (weighted sum, sign election +
disjoint mean), low-rank SVD of factor products, SVD truncation and the polar factor. Methods are
compositions of these; nothing here is method specific.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from osrm_lora.adapters import LoraAdapter

# ---------------------------------------------------------------------------------------------
# factors

_EXACT_CONCAT_LIMIT = 1 << 26  # entries; above this global thresholds use exact bisection instead


def scaled_factors(adapter: LoraAdapter, key: str, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * scaling * B, A)`` of module ``key`` as float32."""
    mod = adapter.modules[key]
    return (weight * mod.scaling) * mod.B.float(), mod.A.float()


def concat_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(B_t, A_t)`` pairs: ``B = [B_1 .. B_T]`` (m x sum r), ``A = [A_1; ..; A_T]``.

    ``B @ A == sum_t B_t @ A_t`` exactly, without forming any m x n matrix.
    """
    return torch.cat([b for b, _ in factors], dim=1), torch.cat([a for _, a in factors], dim=0)


def factor_svd(B: torch.Tensor, A: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of ``B @ A`` (m x k, k, k x n) computed from the factors by two QRs.

    Costs O((m + n) k^2) instead of O(m n min(m, n)); singular values below ``rtol * S[0]`` are dropped.
    """
    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().T)
    u, s, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    U, Vh = Qb @ u, vh @ Qa.T
    if s.numel() and s[0] > 0:
        keep = int((s > rtol * s[0]).sum())
    else:
        keep = 0
    return U[:, :keep], s[:keep], Vh[:keep]


def dense_svd(M: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense matrix with numerically-zero singular values dropped."""
    U, s, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return U[:, :keep], s[:keep], Vh[:keep]


def truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the top ``k`` singular triplets (inputs sorted descending)."""
    k = max(0, min(int(k), S.numel()))
    return U[:, :k], S[:k], Vh[:k]


def polar(X: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``X = P diag(s) Q^T``: the nearest matrix with orthonormal columns."""
    P, _, Qh = torch.linalg.svd(X.float(), full_matrices=False)
    return P @ Qh


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||_F / ||ref||_F`` (0 when ref is zero)."""
    n = torch.linalg.norm(ref.float())
    return 0.0 if n == 0 else float(torch.linalg.norm(ref.float() - approx.float()) / n)


# ---------------------------------------------------------------------------------------------
# sparsifiers


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``int(density * numel)`` largest-magnitude entries (PEFT's per-matrix rule)."""
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if k > 0:
        idx = torch.topk(t.abs().reshape(-1), k=k, largest=True).indices
        mask[idx] = True
    return mask.reshape(t.shape)


def kth_largest_abs(provider: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The ``k``-th largest ``|x|`` over all tensors yielded by ``provider()`` (called more than once).

    Small inputs are concatenated; large ones use an exact bisection on the float32 bit patterns
    (31 counting passes, memory of one tensor at a time). Returns +inf for ``k <= 0``.
    """
    if k <= 0:
        return float("inf")
    total = sum(t.numel() for t in provider())
    k = min(k, total)
    if total <= _EXACT_CONCAT_LIMIT:
        flat = torch.cat([t.detach().abs().float().reshape(-1).cpu() for t in provider()])
        return float(torch.topk(flat, k, largest=True).values[-1])
    # non-negative float32 values order like their int32 bit patterns
    lo, hi = 0, 0x7F800000  # [0, +inf]
    while lo < hi:  # smallest bit pattern b with count(|x| > value(b)) < k  ->  k-th largest
        mid = (lo + hi) // 2
        thr = torch.tensor(mid, dtype=torch.int32).view(torch.float32).item()
        count = sum(int((t.detach().abs().float() > thr).sum()) for t in provider())
        if count < k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32).item())


def magnitude_keep(t: torch.Tensor, density: float, threshold: float | None) -> torch.Tensor:
    """Magnitude sparsification: per matrix (``threshold is None``, PEFT-exact top-k) or ``|t| >= threshold``."""
    if density >= 1:
        return t
    if threshold is None:
        return t * topk_mask(t, density)
    return t * (t.abs() >= threshold)


def dare_drop(t: torch.Tensor, p: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    """DARE: drop each entry with probability ``p`` and rescale survivors by ``1 / (1 - p)``.

    The mask is ``torch.bernoulli(full_like(t, 1 - p))`` drawn from ``generator``, exactly PEFT's
    ``random_pruning`` with ``density = 1 - p`` (same stream for the same seed).
    """
    if p <= 0:
        return t
    density = 1.0 - p
    mask = torch.bernoulli(torch.full_like(t, fill_value=density), generator=generator)
    out = t * mask
    return out / density if rescale else out


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


# ---------------------------------------------------------------------------------------------
# consensus rules


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t * stack[t]``."""
    w = weights.to(stack).reshape((-1,) + (1,) * (stack.dim() - 1))
    return (w * stack).sum(0)


def elect_sign(stack: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Elected sign per entry (+1/-1): ``sign(sum_t x_t)`` ("total") or majority count ("frequency"); ties -> +1."""
    if method == "total":
        score = stack.sum(0)
    elif method == "frequency":
        score = stack.sign().sum(0)
    else:
        raise ValueError(f"unknown sign method {method}")
    return torch.where(score >= 0, 1.0, -1.0).to(stack.dtype)


def agree_mask(stack: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``stack[t].sign() == sign`` (zeros never agree since sign is +-1)."""
    return stack.sign() == sign.unsqueeze(0)


def disjoint_mean(stack: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the entries selected by ``mask`` (0 where none is selected)."""
    return (stack * mask).sum(0) / mask.sum(0).clamp(min=1)


def ties_consensus(stack: torch.Tensor, weights: torch.Tensor, sign_method: str = "total") -> torch.Tensor:
    """TIES merge of already-trimmed tensors: sign of the unweighted stack, disjoint mean of the weighted one
    (PEFT's ``ties`` order of operations)."""
    mask = agree_mask(stack, elect_sign(stack, sign_method))
    w = weights.to(stack).reshape((-1,) + (1,) * (stack.dim() - 1))
    return disjoint_mean(stack * w, mask)
