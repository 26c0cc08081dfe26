"""Interference diagnostics from stored activation statistics (no forward pass needed).

For adapters ``i`` and task data ``j`` the mean squared output shift that adapter i causes on task j's
inputs of a module is ``E||dW_i h_j||^2 = tr(dW_i S_j dW_i^T)`` with ``S_j`` the token second moment
of task j (Gram / count). In factor form, ``dW = s B A``:
``s^2 tr((B^T B)(A S_j A^T))`` -- only r x r and r x n products, never an m x n matrix.

``interference_matrix`` returns ``raw[i][j] = sum over modules of E||dW_i h_j||^2`` and
``ratio[i][j] = raw[i][j] / raw[j][j]``: how strongly adapter i disturbs task j relative to task j's
own adapter (diagonal 1). Rows are adapters, columns are task data.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_file, write_json
from osrm_lora.stats import StatsStore

logger = logging.getLogger(__name__)


def shift_energy(module: Any, S: torch.Tensor) -> float:
    """``E||dW h||^2 = s^2 tr((B^T B)(A S A^T))`` for a LoRA module and second moment ``S`` (n x n)."""
    A = module.A.detach().to("cpu", torch.float64)
    B = module.B.detach().to("cpu", torch.float64)
    S64 = S.detach().to("cpu", torch.float64)
    if S64.shape != (A.shape[1], A.shape[1]):
        raise OsrmError(f"second moment of shape {tuple(S64.shape)} does not fit a LoRA input dim {A.shape[1]}; "
                        "use statistics of the adapters' base model")
    ASA = A @ S64 @ A.T
    return float(module.scaling) ** 2 * float(((B.T @ B) * ASA).sum())


def _safe_ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def interference_matrix(adapters: Mapping[str, Any], store: StatsStore) -> dict[str, Any]:
    """Interference of every adapter on every task's data (tasks = keys of ``adapters``, which must be
    tasks of ``store``).

    Returns ``{"tasks", "modules", "raw", "ratio", "per_module": {module: {"raw", "ratio"}},
    "mean_offdiag_ratio"}``; matrices are lists of rows (row i = adapter of task i, column j = data of
    task j).
    """
    tasks = list(adapters)
    if not tasks:
        raise OsrmError("no adapters given for diagnostics; pass one adapter per task")
    missing = [t for t in tasks if t not in store.tasks]
    if missing:
        raise OsrmError(f"tasks {missing} are not in the statistics store (has {store.tasks}); recompute statistics including them")
    module_keys = sorted({k for ad in adapters.values() for k in ad.modules})
    resolved = {k: store.resolve_module(k) for k in module_keys}
    moments: dict[tuple[str, str], torch.Tensor] = {}

    def moment(task: str, group: str) -> torch.Tensor:
        if (task, group) not in moments:
            moments[(task, group)] = store.second_moment(task, group)
        return moments[(task, group)]

    T = len(tasks)
    raw = [[0.0] * T for _ in range(T)]
    per_module: dict[str, dict[str, list[list[float]]]] = {}
    for key in module_keys:
        group = store.group_of(resolved[key])
        m_raw = [[0.0] * T for _ in range(T)]
        for i, ti in enumerate(tasks):
            mod = adapters[ti].modules.get(key)
            if mod is None:
                continue
            for j, tj in enumerate(tasks):
                e = shift_energy(mod, moment(tj, group))
                m_raw[i][j] = e
                raw[i][j] += e
        m_ratio = [[_safe_ratio(m_raw[i][j], m_raw[j][j]) for j in range(T)] for i in range(T)]
        per_module[key] = {"raw": m_raw, "ratio": m_ratio}
    ratio = [[_safe_ratio(raw[i][j], raw[j][j]) for j in range(T)] for i in range(T)]
    off = [ratio[i][j] for i in range(T) for j in range(T) if i != j and not math.isnan(ratio[i][j])]
    return {
        "tasks": tasks,
        "modules": module_keys,
        "raw": raw,
        "ratio": ratio,
        "mean_offdiag_ratio": sum(off) / len(off) if off else float("nan"),
        "per_module": per_module,
        "stats": {"model_fingerprint": store.fingerprint, **store.settings()},
    }


def save_interference(result: Mapping[str, Any], out_dir: str | os.PathLike[str], title: str | None = None) -> Path:
    """Atomically write ``out_dir/interference.json`` and ``out_dir/interference.png`` (annotated
    heatmap of the aggregated ratio matrix; ``title`` should name the init/mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    tasks = list(result["tasks"])
    ratio = torch.tensor(result["ratio"], dtype=torch.float64).numpy()
    label = title or str(result.get("label") or "adapters")
    write_json(out / "interference.json", {**result, "label": label})
    T = len(tasks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * T, 1.0 + 0.8 * T))
    try:
        im = ax.imshow(ratio, cmap="viridis")
        ax.set_xticks(range(T), labels=tasks, rotation=45, ha="right")
        ax.set_yticks(range(T), labels=tasks)
        ax.set_xlabel("task data j")
        ax.set_ylabel("adapter i")
        finite = ratio[~(ratio != ratio)]
        mid = float(finite.max() + finite.min()) / 2 if finite.size else 0.0
        for i in range(T):
            for j in range(T):
                v = ratio[i, j]
                ax.text(j, i, "nan" if v != v else f"{v:.2g}", ha="center", va="center", fontsize=8,
                        color="black" if v == v and v > mid else "white")
        ax.set_title(f"Interference E||dW_i h_j||² / E||dW_j h_j||² — {label}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        with atomic_file(out / "interference.png", "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)
    finally:
        plt.close(fig)
    return out


def run_diagnose(adapter_dirs: Sequence[str], stats_path: str, out_dir: str, title: str | None = None) -> dict[str, Any]:
    """CLI-facing: load the adapters (one per task, matched to the store's tasks by directory name,
    adapter name or ``head.json``), compute the interference matrix, write JSON + PNG, return it."""
    from osrm_lora.osrm import load_tasks_adapters

    store = StatsStore.load(stats_path)
    loaded = load_tasks_adapters(adapter_dirs, store)
    result = interference_matrix({t: ad for t, (_, ad) in loaded.items()}, store)
    result["adapters"] = {t: str(p) for t, (p, _) in loaded.items()}
    label = title or ", ".join(sorted({Path(p).parent.name for p, _ in loaded.values()})) or "adapters"
    result["label"] = label
    save_interference(result, out_dir, title=label)
    logger.info("interference (%s): mean off-diagonal ratio %.3g", label, result["mean_offdiag_ratio"])
    return result
