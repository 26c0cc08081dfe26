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
    out: torch.Tensor = P @ Qh
    return out


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||_F / ||ref||_F`` (0 when ref is zero)."""
    n = torch.linalg.norm(ref.float())
    return 0.0 if n == 0 else float(torch.linalg.norm(ref.float() - approx.float()) / n)


# ---------------------------------------------------------------------------------------------
# sparsifiers


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``int(density * numel)`` largest-magnitude entries (PEFT's per-matrix rule).

    The same set as ``torch.topk`` (PEFT's ``magnitude_based_pruning``), found faster: ``|x| >=``
    :func:`matrix_threshold`; where entries tie at the threshold, ``torch.topk`` picks the k.
    """
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)
    thr = matrix_threshold(t, density)
    if thr is not None:
        return t.abs() >= thr
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if k > 0:
        mask[torch.topk(t.detach().abs().reshape(-1), k=k, largest=True).indices] = True
    return mask.reshape(t.shape)


def matrix_threshold(t: torch.Tensor, density: float) -> float | None:
    """The value ``v`` for which ``|t| >= v`` keeps exactly the ``k = int(density * numel)`` largest
    magnitudes (the exact k-th largest, :func:`kth_largest`), or ``None`` when no value does:
    ``k = 0``, or entries tying at the k-th value (or NaN) would let more than ``k`` pass (then only
    ``torch.topk`` says which k are kept)."""
    k = int(density * t.numel())
    if k <= 0 or k > t.numel():
        return None
    a = t.detach().abs().reshape(-1)
    v = kth_largest(a, k)
    return float(v) if int(torch.count_nonzero(a >= v)) == k else None


SAMPLE = 1 << 16  # entries sampled by kth_largest to bracket the k-th value
_SAMPLE_SEED = 20250601


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry (``1 <= k <= a.numel()``) of the flat tensor ``a``, exactly, as a
    0-dim tensor on ``a``'s device.

    Floyd-Rivest style selection: take a fixed-seed random sample of :data:`SAMPLE` entries, its
    values around quantile ``1 - k/n`` with a margin of about 8 standard errors as a bracket
    ``[lo, hi]``, count the entries above ``hi`` and select the rank that is left among the entries
    inside the bracket (about 3% of them). Two comparison passes and one small ``kthvalue`` instead
    of a top-k of ``k`` entries (6x faster than ``torch.topk`` on CPU at 16 M entries). If the
    bracket misses the k-th value (a sample that badly misrepresents ``a``; the result stays
    exact) it falls back to ``torch.kthvalue`` over everything.
    """
    n = a.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} entries")
    if n <= 4 * SAMPLE:
        return torch.kthvalue(a, n - k + 1).values
    gen = torch.Generator().manual_seed(_SAMPLE_SEED)
    idx = torch.randint(0, n, (SAMPLE,), generator=gen).to(a.device)
    sample = a[idx]
    q = 1.0 - k / n
    margin = 4.0 / SAMPLE ** 0.5 + 1.0 / SAMPLE  # >= 8 standard errors of a sample quantile
    lo = torch.kthvalue(sample, max(1, int((q - margin) * SAMPLE))).values
    hi = torch.kthvalue(sample, min(SAMPLE, int((q + margin) * SAMPLE) + 1)).values
    above = int(torch.count_nonzero(a > hi))
    if above < k:
        inside = a[(a >= lo) & (a <= hi)]
        rank = k - above  # the k-th largest of a is the rank-th largest inside the bracket
        if rank <= inside.numel():
            return torch.kthvalue(inside, inside.numel() - rank + 1).values
    return torch.kthvalue(a, n - k + 1).values


# Radix selection on float32 bit patterns: |x| >= 0, and non-negative floats order like their int32
# patterns, which have 31 significant bits. Two counting passes find the exact k-th largest value:
# a histogram over the top 16 bits, then one over the low 15 bits inside the selected bucket.
HI_BITS, LO_BITS = 16, 15


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns (int32, flat) of ``|x|`` as float32."""
    return x.detach().abs().float().contiguous().view(torch.int32).reshape(-1)


def high_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of ``|x|`` per top-16-bit bucket (``2**16`` int64 counts, on ``x``'s device)."""
    return torch.bincount(abs_bits(x) >> LO_BITS, minlength=1 << HI_BITS)


def low_histogram(x: torch.Tensor, high: int) -> torch.Tensor:
    """Counts of the low 15 bits of the entries of ``|x|`` that lie in top-16-bit bucket ``high``."""
    bits = abs_bits(x)
    inside = bits[(bits >> LO_BITS) == high] & ((1 << LO_BITS) - 1)
    return torch.bincount(inside, minlength=1 << LO_BITS)


def select_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """For counts over ordered buckets: the bucket holding the ``k``-th largest item (``k >= 1``) and
    that item's rank inside the bucket (``k`` minus the items in higher buckets)."""
    from_top = torch.flip(hist.cpu(), [0]).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype))[0])
    above = int(from_top[i - 1]) if i > 0 else 0
    return hist.numel() - 1 - i, k - above


def bits_value(high: int, low: int) -> float:
    """The float32 value of the bit pattern ``high << 15 | low``."""
    return float(torch.tensor((high << LO_BITS) | low, dtype=torch.int32).view(torch.float32).item())


def kth_largest_abs(provider: Callable[[], Iterable[torch.Tensor]], k: int,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """The ``k``-th largest ``|x|`` over all tensors yielded by ``provider()`` (called more than once).

    Small inputs are concatenated (one :func:`kth_largest`); large ones use the exact two-pass radix selection
    above (memory of one tensor and two histograms at a time). ``reduce`` sums the histograms over
    processes (then ``k`` counts over all processes' tensors and every process gets the same
    value). Returns +inf for ``k <= 0``.
    """
    if k <= 0:
        return float("inf")
    if reduce is None:
        total = sum(t.numel() for t in provider())
        if total <= _EXACT_CONCAT_LIMIT:
            flat = torch.cat([t.detach().abs().float().reshape(-1) for t in provider()])
            return float(kth_largest(flat, min(k, total)))
    reduce = reduce or (lambda h: h)
    hist: torch.Tensor | None = None
    for t in provider():
        h = high_histogram(t)
        hist = h if hist is None else hist + h.to(hist.device)
    if hist is None:
        hist = torch.zeros(1 << HI_BITS, dtype=torch.int64)
    hist = reduce(hist)
    k = min(k, int(hist.sum()))
    if k <= 0:
        return float("inf")
    high, rank = select_bucket(hist, k)
    low_hist: torch.Tensor | None = None
    for t in provider():
        h = low_histogram(t, high)
        low_hist = h if low_hist is None else low_hist + h.to(low_hist.device)
    assert low_hist is not None
    low, _ = select_bucket(reduce(low_hist), rank)
    return bits_value(high, low)


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
    return (stack * mask).sum(0) / mask.sum(0, dtype=stack.dtype).clamp(min=1)


def ties_consensus(stack: torch.Tensor, weights: torch.Tensor, sign_method: str = "total") -> torch.Tensor:
    """TIES merge of already-trimmed tensors: sign of the unweighted stack, disjoint mean of the weighted one
    (PEFT's ``ties`` order of operations)."""
    mask = agree_mask(stack, elect_sign(stack, sign_method))
    w = weights.to(stack).reshape((-1,) + (1,) * (stack.dim() - 1))
    return disjoint_mean(stack * w, mask)


CONSENSUS = ("sum", "ties")


def chunk_entries(device: torch.device) -> int:
    """Entries per chunk of :func:`combine`: a stack of a few tasks' chunks fits a CPU core's cache;
    on a GPU, chunks large enough to keep it busy."""
    return 1 << 16 if device.type == "cpu" else 1 << 24


def combine(tensors: Sequence[torch.Tensor], weights: torch.Tensor, consensus: str, *,
            thresholds: Sequence[float | None] | None = None, sign_method: str = "total",
            chunk: int | None = None) -> torch.Tensor:
    """Trim task ``t``'s tensor to ``|x| >= thresholds[t]`` (``None``: kept as given), then combine the
    tasks by ``consensus``: ``"sum"`` (:func:`weighted_sum`) or ``"ties"`` (:func:`ties_consensus`).

    Works through the entries ``chunk`` at a time (default :func:`chunk_entries`), so the stacked
    and trimmed temporaries stay small and in cache instead of ``len(tensors)`` full copies. Every
    operation is elementwise or a sum over tasks in task order, so the values equal those of
    stacking and trimming the whole tensors (tested bitwise on CPU).
    """
    if consensus not in CONSENSUS:
        raise ValueError(f"unknown consensus {consensus}")
    flats = [x.reshape(-1) for x in tensors]
    n = flats[0].numel()
    step = chunk or chunk_entries(flats[0].device)
    out = torch.empty(n, dtype=flats[0].dtype, device=flats[0].device)
    thr = None
    if thresholds is not None and any(v is not None for v in thresholds):
        thr = torch.tensor([-1.0 if v is None else float(v) for v in thresholds], device=out.device).unsqueeze(1)
    for start in range(0, n, step):
        stack = torch.stack([f[start:start + step] for f in flats])
        if thr is not None:
            stack = stack * (stack.abs() >= thr.to(stack.dtype))
        out[start:start + step] = (weighted_sum(stack, weights) if consensus == "sum"
                                   else ties_consensus(stack, weights, sign_method))
    return out.reshape(tensors[0].shape)
