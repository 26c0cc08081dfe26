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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osrm_lora.errors import AdapterError, ConfigError, OsrmError
from osrm_lora.fsutil import atomic_dir, read_json, write_json
from osrm_lora.stats import StatsStore

logger = logging.getLogger(__name__)

OSRM_MODES = ("code", "paper", "own")
INIT_MODES = ("standard", *OSRM_MODES)
CODE_MEANS = ("task", "token")


# --------------------------------------------------------------------------------------------------
# pure math
# --------------------------------------------------------------------------------------------------
def fix_row_signs(A: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry (first one on ties) is positive."""
    idx = A.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(A, 1, idx))
    sign[sign == 0] = 1
    return A * sign


def _check_rank(r: int, n: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or r > n:
        raise ConfigError(f"LoRA rank {r!r} must be an integer in 1..{n} (the module's input dimension); fix the rank")


def code_mode_A(other_means: torch.Tensor, r: int) -> torch.Tensor:
    """Reference-code OSRM: ``other_means`` (k x n) stacks the other tasks' mean input vectors; the
    last ``r`` right singular vectors of its FULL SVD (``full_matrices=True``, so k < n works) as rows
    (r x n, float64). When ``r > n - rank(X)`` some rows are not in the null space (logged)."""
    X = other_means.detach().to("cpu", torch.float64)
    if X.dim() != 2:
        raise ConfigError(f"code mode needs a (k, n) matrix of mean vectors, got shape {tuple(X.shape)}")
    n = X.shape[1]
    _check_rank(r, n)
    _, S, Vh = torch.linalg.svd(X, full_matrices=True)
    tol = (S.max().item() if S.numel() else 0.0) * max(X.shape) * torch.finfo(torch.float64).eps
    null_dim = n - int((S > tol).sum().item())
    if r > null_dim:
        logger.warning("code mode: rank %d exceeds the null-space dimension %d; some rows read other tasks' means",
                       r, null_dim)
    return fix_row_signs(Vh[n - r :].clone())


def paper_mode_A(S_other: torch.Tensor, r: int) -> torch.Tensor:
    """Paper OSRM: the ``r`` eigenvectors of ``S_other`` (n x n, symmetric PSD) with the SMALLEST
    eigenvalues, as rows (r x n, float64; eigh in float64)."""
    S = _sym64(S_other)
    _check_rank(r, S.shape[0])
    _, vecs = torch.linalg.eigh(S)  # ascending
    return fix_row_signs(vecs[:, :r].T.contiguous())


def own_mode_A(S_own: torch.Tensor, S_other: torch.Tensor, r: int, ridge: float = 1e-3) -> torch.Tensor:
    """Own OSRM: orthonormal row basis (r x n, float64) of the span of the top-``r`` generalised
    eigenvectors of ``S_own v = lambda (S_other + eps I) v`` with ``eps = ridge * trace(S_other)/n``
    (``ridge`` itself if the trace is 0). Rows are Gram-Schmidt in descending-eigenvalue order."""
    Si, So = _sym64(S_own), _sym64(S_other)
    n = So.shape[0]
    if Si.shape != So.shape:
        raise ConfigError(f"own mode needs S_own and S_other of equal shape, got {tuple(Si.shape)} and {tuple(So.shape)}")
    _check_rank(r, n)
    if ridge <= 0:
        raise ConfigError(f"ridge must be positive, got {ridge}; use e.g. 1e-3")
    tr = float(torch.trace(So))
    eps = ridge * tr / n if tr > 0 else ridge
    M = So + eps * torch.eye(n, dtype=torch.float64, device=So.device)
    L = torch.linalg.cholesky(M)
    # C = L^-1 S_own L^-T ; generalised eigenvectors v = L^-T y
    Linv_S = torch.linalg.solve_triangular(L, Si, upper=False)
    C = torch.linalg.solve_triangular(L, Linv_S.T, upper=False)
    C = (C + C.T) / 2
    _, Y = torch.linalg.eigh(C)
    Y = Y[:, -r:].flip(1)  # top r, descending
    V = torch.linalg.solve_triangular(L.T, Y, upper=True)
    Q, _ = torch.linalg.qr(V)
    return fix_row_signs(Q.T.contiguous())


def standard_A(r: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's default LoRA ``A`` (Kaiming-uniform with ``a = sqrt(5)``: U(-1/sqrt(n), 1/sqrt(n))), r x n."""
    _check_rank(r, n)
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(r, n, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _sym64(S: torch.Tensor) -> torch.Tensor:
    S = S.detach().to(dtype=torch.float64)  # stays on its device: eigensolves run on the GPU when S is there
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ConfigError(f"expected a square second-moment matrix, got shape {tuple(S.shape)}")
    return (S + S.T) / 2


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
def _group_A(store: StatsStore, task: str, others: Sequence[str], group: str, rank: int, mode: str,
             ridge: float, code_means: str, device: torch.device | None = None) -> torch.Tensor:
    if mode == "code":
        mean_fn = store.task_mean if code_means == "task" else store.token_mean
        X = torch.stack([mean_fn(j, group) for j in others])
        return code_mode_A(X, rank)
    S_other = sum(store.second_moment(j, group) for j in others)
    assert isinstance(S_other, torch.Tensor)
    if device is not None:
        S_other = S_other.to(device)
    if mode == "paper":
        return paper_mode_A(S_other, rank).cpu()
    S_own = store.second_moment(task, group)
    return own_mode_A(S_own.to(S_other.device), S_other, rank, ridge=ridge).cpu()


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
) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: {module_key: A (rank x n, float32, CPU)}}`` for every task in ``tasks``.

    ``device`` (e.g. ``"cuda"``) runs the float64 eigensolves of ``paper``/``own`` there.

    For task i the OTHER tasks of ``tasks`` define the subspace: ``paper``/``own`` use
    ``S_{-i} = sum_{j != i} Gram_j / count_j``; ``code`` stacks the other tasks' mean vectors
    (``code_means="task"``: mean of the per-sample token means, as the reference; ``"token"``: mean
    over all tokens). Modules of one input group get the same A. ``modules`` defaults to all modules
    of the store. ``standard`` gives PEFT-style random A (seeded by ``seed``, independent per module).
    """
    if mode not in INIT_MODES:
        raise ConfigError(f"unknown init mode {mode!r}; choose one of {', '.join(INIT_MODES)}")
    if code_means not in CODE_MEANS:
        raise ConfigError(f"unknown code_means {code_means!r}; choose 'task' or 'token'")
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
    for t in tasks:
        others = [j for j in tasks if j != t]
        cache: dict[str, torch.Tensor] = {}
        for key in keys:
            group = store.group_of(key)
            if group not in cache:
                cache[group] = _group_A(store, t, others, group, rank, mode, ridge, code_means,
                                        torch.device(device) if device is not None else None).float()
            out[t][key] = cache[group]
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
            key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            lora_layers[key] = mod
    if not lora_layers:
        raise AdapterError(f"model has no LoRA layers for adapter {adapter_name!r}; wrap it with PEFT first")

    def find(key: str) -> str:
        if key in lora_layers:
            return key
        cands = [k for k in lora_layers if k.endswith("." + key) or key.endswith("." + k)]
        if len(cands) != 1:
            raise AdapterError(f"module {key!r} has no (unique) LoRA layer in the PEFT model; use the same target modules")
        return cands[0]

    matched = {find(k): A for k, A in A_by_module.items()}
    unset = sorted(set(lora_layers) - set(matched))
    if unset:
        raise AdapterError(f"no A given for LoRA module {unset[0]}; compute A for every target module")
    done = []
    with torch.no_grad():
        for key, A in matched.items():
            layer = lora_layers[key]
            wA = layer.lora_A[adapter_name].weight
            wB = layer.lora_B[adapter_name].weight
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

    def find(key: str) -> torch.Tensor:
        if key in A_by_module:
            return A_by_module[key]
        cands = [k for k in A_by_module if k.endswith("." + key) or key.endswith("." + k)]
        if len(cands) != 1:
            raise OsrmError(f"no projection basis for module {key!r}; compute statistics for the adapter's target modules")
        return A_by_module[cands[0]]

    modules, report = {}, {}
    tot_before = tot_after = 0.0
    for key, mod in adapter.modules.items():
        new = project_lora(mod, find(key), reference_scaling_bug=reference_scaling_bug)
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
    "A_drift", "CODE_MEANS", "INIT_MODES", "OSRM_MODES", "adapter_A_drift", "adapter_task_name", "apply_A_to_peft",
    "code_mode_A", "compute_osrm_A", "fix_row_signs", "interference_grams", "lora_energy", "own_mode_A", "paper_mode_A", "project_adapter",
    "project_lora", "run_project", "standard_A",
]
