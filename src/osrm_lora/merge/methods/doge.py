"""DOGE: multi-task merging as adaptive projective gradient descent, as FusionBench's DOGE-TA.

Per adapted matrix, with task updates ``tau_t`` (m x n, (out, in) orientation) and task-aware
coefficients ``lambda_t = coef / ||tau_t||_F``, a modification ``Delta`` shared by all tasks is
learned by Adam on the data-free surrogate of the gap between the merged and each task model

    L(Delta) = sum_j || rowsum( tau_j * (tau_j - sum_i lambda_i tau_i - (sum_i lambda_i) Delta) ) ||^2

(``*`` elementwise, the row sum over the input dimension), its gradient projected off a shared
subspace of the tasks' left singular vectors. The merged update is
``sum_t lambda_t (tau_t + Delta) * mask_t``, ``mask_t`` keeping the largest-magnitude entries of
``tau_t``. The gradient is computed from the LoRA factors (no stack of T dense matrices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.errors import OsrmError
from osrm_lora.merge import ops
from osrm_lora.merge.methods._common import (
    SCALING,
    THRESHOLD,
    _task_thresholds,
    dense_getter,
    module_keys,
    task_trim,
)
from osrm_lora.merge.types import MergeContext, MergeResult, Param, register_method

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, as FusionBench uses them
ADAM_EPS = 1e-8


def task_coefficients(norms: torch.Tensor, coef: float) -> torch.Tensor:
    """``lambda_t = coef / ||tau_t||_F``; 0 for a task whose update of this matrix is zero (it adds nothing)."""
    return torch.where(norms > 0, coef / norms.clamp(min=torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def per_task_directions(min_dim: int, n_tasks: int) -> int:
    """Left singular vectors each task contributes to the stacked basis: ``int(min(m, n) / T)``."""
    return int(min_dim / n_tasks)


def subspace_size(min_dim: int, subspace: float) -> int:
    """Directions of the shared subspace: ``int(min(m, n) / subspace)``."""
    return int(min_dim / subspace)


def shared_basis(us: Sequence[torch.Tensor], keep: int, size: int) -> torch.Tensor:
    """Orthonormal basis (m x c) of the shared subspace.

    ``us[t]`` holds task ``t``'s left singular vectors with a nonzero singular value, sorted by it.
    The top ``keep`` of each are stacked side by side; the basis is the top ``size`` left singular
    vectors of that stack, at most as many as its numerical rank. With one task the stack has
    orthonormal columns, all its singular values are 1 and its SVD prefers no direction (FusionBench
    then keeps an arbitrary subspace, set by rounding): the task's own top ``size`` vectors are kept.
    """
    stack = torch.cat([u[:, :keep] for u in us], dim=1)
    if stack.shape[1] == 0 or size <= 0:
        return stack[:, :0]
    if len(us) == 1:
        return stack[:, :size]
    U, S, _ = torch.linalg.svd(stack, full_matrices=False)
    rank = int((S > S[0] * max(stack.shape) * torch.finfo(stack.dtype).eps).sum())
    kept: torch.Tensor = U[:, :min(size, rank)]
    return kept


def row_products(B: torch.Tensor, A: torch.Tensor, task_of: torch.Tensor, n_tasks: int,
                 X: torch.Tensor) -> torch.Tensor:
    """``rowsum(tau_j * X)`` for every task (m x T) from the stacked factors ``tau_j = B_j A_j``
    (``B`` m x R, ``A`` R x n, ``task_of[k]`` = the task of factor column ``k``)."""
    prod = (X @ A.T) * B
    return torch.zeros(B.shape[0], n_tasks, dtype=X.dtype, device=X.device).index_add_(1, task_of, prod)


def surrogate_gradient(B: torch.Tensor, A: torch.Tensor, task_of: torch.Tensor, resid: torch.Tensor,
                       lam_total: float) -> torch.Tensor:
    """Gradient of ``L = ||resid||^2`` w.r.t. ``Delta``: ``-2 Lambda sum_j resid_j[:, None] * tau_j``."""
    return (-2.0 * lam_total) * ((B * resid[:, task_of]) @ A)


def project_off(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(I - Q Q^T) grad`` for an orthonormal basis ``Q`` (m x c)."""
    if basis.shape[1] == 0:
        return grad
    return grad - basis @ (basis.T @ grad)


def adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, lr: float, betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS) -> None:
    """One Adam step (in place), the arithmetic of ``torch.optim.Adam`` (no weight decay, no amsgrad)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def optimise_delta(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], taus: Sequence[torch.Tensor],
                   lams: torch.Tensor, basis: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """The modification ``Delta`` (m x n) after ``steps`` projected Adam steps from zero, and the
    surrogate loss before and after."""
    B = torch.cat([b for b, _ in factors], dim=1)
    A = torch.cat([a for _, a in factors], dim=0)
    task_of = torch.cat([torch.full((b.shape[1],), t, dtype=torch.long, device=B.device)
                         for t, (b, _) in enumerate(factors)])
    n_tasks = len(taus)
    merged_ta = sum(float(lams[t]) * taus[t] for t in range(n_tasks))
    const = torch.stack([(tau * (tau - merged_ta)).sum(dim=1) for tau in taus], dim=1)  # resid at Delta = 0
    lam_total = float(lams.sum())
    delta = torch.zeros_like(taus[0])
    first = float((const ** 2).sum())
    if steps == 0 or lam_total == 0:
        return delta, [first, first]
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    for step in range(1, steps + 1):
        resid = const - lam_total * row_products(B, A, task_of, n_tasks, delta)
        grad = project_off(surrogate_gradient(B, A, task_of, resid, lam_total), basis)
        adam_update(delta, grad, exp_avg, exp_avg_sq, step, lr)
    last = const - lam_total * row_products(B, A, task_of, n_tasks, delta)
    return delta, [first, float((last ** 2).sum())]


def task_masks(taus: Sequence[torch.Tensor], density: float, thresholds: Sequence[float] | None) -> list[torch.Tensor]:
    """Entries each task keeps: ``|tau_t| >= threshold_t`` (task-wide) or its per-matrix top-``density``."""
    if density >= 1:
        return [torch.ones_like(tau, dtype=torch.bool) for tau in taus]
    if thresholds is None:
        return [ops.topk_mask(tau, density) for tau in taus]
    return [tau.abs() >= thr for tau, thr in zip(taus, thresholds)]


def _module_basis(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], subspace: float) -> torch.Tensor:
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    us = [ops.factor_svd(B, A)[0] for B, A in factors]
    return shared_basis(us, per_task_directions(min(m, n), len(factors)), subspace_size(min(m, n), subspace))


@register_method(
    "doge",
    linear_in_scaling=True,
    task_wide=task_trim,
    params=[SCALING,
            Param("coef", "float", 0.07, "task-aware coefficients lambda_t = coef / ||tau_t||_F per module "
                  "(FusionBench lamda)", low=0.0, low_open=True),
            Param("subspace", "float", 6.0, "the shared subspace keeps int(min(m, n) / subspace) directions",
                  low=1.0),
            Param("density", "float", 0.3, "fraction of each task's entries kept by the final magnitude mask "
                  "(FusionBench K=30)", low=0.0, high=1.0, low_open=True),
            THRESHOLD,
            Param("steps", "int", 400, "Adam steps per module", low=0),
            Param("lr", "float", 1e-4, "Adam learning rate", low=0.0, low_open=True)],
    description="DOGE (Wei et al., ICML 2025, adaptive projective gradient descent) as FusionBench DOGE-TA: "
                "learn a shared modification by Adam on a data-free gap surrogate, gradients projected off the "
                "tasks' shared subspace; sum of lambda_t (tau_t + Delta) masked to each task's top entries",
    paper="https://arxiv.org/abs/2501.01230",
)
def doge(adapters: list[LoraAdapter], params: dict[str, Any], ctx: MergeContext) -> MergeResult:
    """DOGE, "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent" (Wei et al.,
    ICML 2025, https://arxiv.org/abs/2501.01230), as FusionBench 0.2.33 implements it
    (``fusion_bench.method.doge_ta``, DOGE-TA: Task Arithmetic with the learned modification).

    Per module, with ``tau_t = s_t B_t A_t`` and ``lambda_t = coef / ||tau_t||_F`` (0 if
    ``tau_t = 0``):

    1. shared subspace: each task's top ``int(min(m, n) / T)`` left singular vectors (from the
       factors; at most its rank) are stacked; the basis ``Q`` is the top
       ``int(min(m, n) / subspace)`` left singular vectors of the stack (at most its rank);
    2. ``Delta`` starts at zero and takes ``steps`` Adam steps (``lr``, betas (0.9, 0.999), eps 1e-8)
       on ``L(Delta) = sum_j ||r_j||^2``, ``r_j = rowsum(tau_j * (tau_j - sum_i lambda_i tau_i -
       Lambda Delta))``, ``Lambda = sum_i lambda_i``, each gradient replaced by ``(I - Q Q^T) grad``;
    3. result ``scaling * sum_t lambda_t (tau_t + Delta) * mask_t``, ``mask_t`` the entries with
       ``|tau_t|`` among task ``t``'s ``int(density * N_t)`` largest over all its modules
       (``threshold=task``, FusionBench; ``N_t`` entries in all of them) or per matrix.

    Where FusionBench's steps are undefined for low-rank updates (singular vectors beyond the rank,
    an arbitrary null-space basis) only the nonzero ones are used; with full-rank updates the two
    agree (``tests/test_merge_doge.py``). FusionBench keeps ``int(K N) + 1`` entries per task
    (its ``kthvalue`` cut with ``>=``); here ``int(density N)``, as in ``ties``. No randomness.
    """
    keys, T = module_keys(adapters), len(adapters)
    density, threshold = float(params["density"]), params["threshold"]
    task_wide = threshold == "task" and density < 1
    if ctx.magnitude_probe is not None and task_wide:  # streaming pre-pass: the mask sees tau_t only
        zeros = {}
        for key in keys:
            for t, ad in enumerate(adapters):
                ctx.magnitude_probe(t, ad.modules[key].delta())
            zeros[key] = torch.zeros_like(adapters[0].modules[key].delta())
        return MergeResult("doge", params, deltas=zeros)
    if task_wide and ctx.streaming and ctx.task_thresholds is None:
        raise OsrmError("doge threshold=task masks each task's entries with a threshold over all of its modules, "
                        "which this merge does not see at once; merge in memory or pass threshold=matrix")
    thresholds = _task_thresholds(keys, dense_getter(adapters), T, density, ctx) if task_wide else None
    lam_scale, steps, lr = float(params["scaling"]), int(params["steps"]), float(params["lr"])
    deltas: dict[str, torch.Tensor] = {}
    losses: dict[str, list[float]] = {}
    dims: dict[str, int] = {}
    for key in keys:
        factors = [ops.scaled_factors(ad, key) for ad in adapters]
        taus = [ad.modules[key].delta() for ad in adapters]
        lams = task_coefficients(torch.stack([torch.linalg.norm(tau) for tau in taus]), float(params["coef"]))
        basis = _module_basis(factors, float(params["subspace"]))
        delta, losses[key] = optimise_delta(factors, taus, lams, basis, steps, lr)
        masks = task_masks(taus, density, thresholds)
        deltas[key] = cast(torch.Tensor, lam_scale * sum(float(lams[t]) * ((taus[t] + delta) * masks[t]) for t in range(T)))
        dims[key] = int(basis.shape[1])
    return MergeResult("doge", params, deltas=deltas, info={"doge_loss": losses, "doge_subspace": dims})
