"""Interference diagnostics from stored activation statistics (no forward pass needed).

For adapters ``i`` and task data ``j`` the mean squared output shift that adapter i causes on task j's
inputs of a module is ``E||dW_i h_j||^2 = tr(dW_i S_j dW_i^T)`` with ``S_j`` the token second moment
of task j (Gram / count). In factor form, ``dW = s B A``:
``s^2 tr((B^T B)(A S_j A^T))`` -- only r x r and r x n products, never an m x n matrix.

``interference_matrix`` returns ``raw[i][j] = sum over modules of E||dW_i h_j||^2`` and
``ratio[i][j] = raw[i][j] / raw[j][j]``: how strongly adapter i disturbs task j relative to task j's
own adapter (diagonal 1). Rows are adapters, columns are task data.

``leave_one_out`` measures the same question on the merged model itself (after "One Bad Model Spoils
the Bunch", arXiv 2406.14563): for each adapter i, every other task j is scored on its validation
split with the Task Arithmetic merge of all adapters and of all adapters but i;
``drag[i][j] = score_j(without i) - score_j(all)`` is how many points task j loses when adapter i
joins the merge (negative: it gains).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.colors import LogNorm, Normalize

from osrm_lora.adapters import LoraAdapter, load_adapter
from osrm_lora.backbone import load_head
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import mean
from osrm_lora.fsutil import atomic_file, write_json
from osrm_lora.inference import base_model_for, check_adapter_dir, run_max_length, task_for_adapter
from osrm_lora.merge.registry import merge
from osrm_lora.merged_eval import MergedEvaluator
from osrm_lora.osrm import load_tasks_adapters
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


def save_interference(result: Mapping[str, Any], out_dir: str | os.PathLike[str], title: str | None = None,
                      scale: tuple[float, float, bool] | None = None) -> Path:
    """Atomically write ``out_dir/interference.json`` and ``out_dir/interference.png`` (annotated
    heatmap of the aggregated ratio matrix; ``title`` should name the init/mode; ``scale`` see
    :func:`write_interference_png`)."""
    out = Path(out_dir)
    label = title or str(result.get("label") or "adapters")
    write_json(out / "interference.json", {**result, "label": label})
    write_interference_png(result, out / "interference.png", label, scale)
    return out


def write_interference_png(result: Mapping[str, Any], path: str | os.PathLike[str], label: str,
                           scale: tuple[float, float, bool] | None = None) -> Path:
    """Atomically write the annotated heatmap of ``result["ratio"]`` to ``path``. ``scale`` =
    ``(vmin, vmax, log)`` is a colour scale shared by the inits of a run (the report passes one, so the
    heatmaps of a run compare); without it the colours span this matrix's own range. The title and the
    PNG's ``Description`` say which."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    ratio = torch.tensor(result["ratio"], dtype=torch.float64).numpy()
    T = len(tasks)
    if scale is None:
        norm: Normalize | None = None
        note = "colour scale: this matrix's own range (not comparable across inits)"
    else:
        vmin, vmax, log = scale
        norm = LogNorm(vmin=vmin, vmax=vmax) if log else Normalize(vmin=vmin, vmax=vmax)
        note = f"{'log' if log else 'linear'} colour scale {vmin:.3g} to {vmax:.3g}, shared by the inits of the run"
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * T, 1.2 + 0.8 * T))
    try:
        im = ax.imshow(ratio, cmap="viridis", norm=norm)
        ax.set_xticks(range(T), labels=tasks, rotation=45, ha="right")
        ax.set_yticks(range(T), labels=tasks)
        ax.set_xlabel("task data j")
        ax.set_ylabel("adapter i")
        finite = ratio[~(ratio != ratio)]
        mid = float(finite.max() + finite.min()) / 2 if finite.size else 0.0
        for i in range(T):
            for j in range(T):
                v = ratio[i, j]
                light = v == v and (v > mid if norm is None else v > 0 and float(norm(v)) > 0.6)
                ax.text(j, i, "nan" if v != v else f"{v:.2g}", ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
        ax.set_title(f"Interference E||dW_i h_j||² / E||dW_j h_j||² — {label}\n{note}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        with atomic_file(Path(path), "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, metadata={"Description": note})
    finally:
        plt.close(fig)
    return Path(path)


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


# --------------------------------------------------------------------------------------------- leave one out
def merged_evaluator_for(adapter_dirs: Sequence[str | os.PathLike[str]], *, model: str | None = None,
                         max_length: int | None = None, batch_size: int = 128, device: str | None = None,
                         splits: Sequence[str] = ("validation",)) -> tuple[MergedEvaluator, str]:
    """A :class:`MergedEvaluator` over the adapters' tasks, with the data, splits and token limit of the
    runs that trained them (as ``osrm-lora evaluate``), and the base model path it loaded."""
    if not adapter_dirs:
        raise OsrmError("no adapter directories given; pass the adapters (each with its task head)")
    dirs = [check_adapter_dir(d) for d in adapter_dirs]
    infos = [load_head(d)[1] for d in dirs]
    names = [i.task for i in infos]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise OsrmError(f"two adapters are of task {dup[0]!r}; pass one adapter per task")
    model_path = base_model_for(model, infos[0], dirs[0])
    tasks = [task_for_adapter(d, info) for d, info in zip(dirs, infos)]
    evaluator = MergedEvaluator(model_path, tasks, dirs, max_length=run_max_length(dirs[0], max_length),
                                batch_size=batch_size, device=device, splits=tuple(splits))
    return evaluator, model_path


def task_arithmetic_deltas(adapters: Sequence[LoraAdapter], scaling: float) -> dict[str, torch.Tensor]:
    """Dense updates of the Task Arithmetic merge ``scaling * sum_t tau_t`` of ``adapters``."""
    return merge(list(adapters), "task_arithmetic", {"scaling": float(scaling)}, ignore_extra=True).deltas_for()


def leave_one_out(evaluator: MergedEvaluator, adapters: Sequence[LoraAdapter], scaling: float = 1.0,
                  split: str = "validation") -> dict[str, Any]:
    """How much each adapter drags the other tasks down when it joins a Task Arithmetic merge.

    ``adapters[i]`` is task ``i`` of ``evaluator``. Returns ``{"tasks", "scaling", "split", "all"
    (task -> score with every adapter), "without" (row i: task -> score without adapter i, task i
    itself None), "drag" (row i, column j: without[i][j] - all[j]; None on the diagonal),
    "mean_drag" (adapter -> mean over the other tasks), "worst", "summary"}``.
    """
    tasks = evaluator.task_names
    if len(adapters) != len(tasks):
        raise OsrmError(f"{len(adapters)} adapters for {len(tasks)} tasks; pass one adapter per task")
    if len(tasks) < 2:
        raise OsrmError("leave-one-out needs at least two adapters; pass the adapters of all merged tasks")
    if not math.isfinite(scaling) or scaling < 0:
        raise OsrmError(f"the Task Arithmetic scaling must be a number >= 0, got {scaling!r}")
    full_deltas = task_arithmetic_deltas(adapters, scaling)
    full = evaluator.evaluate(lambda _: full_deltas, split)
    without: list[dict[str, float | None]] = []
    drag: list[list[float | None]] = []
    for i in range(len(tasks)):
        rest = task_arithmetic_deltas([a for k, a in enumerate(adapters) if k != i], scaling)

        def deltas_without(_: int, rest: dict[str, torch.Tensor] = rest) -> dict[str, torch.Tensor]:
            return rest

        scores = evaluator.evaluate(deltas_without, split)
        without.append({t: (None if j == i else scores[t]) for j, t in enumerate(tasks)})
        drag.append([None if j == i else scores[t] - full[t] for j, t in enumerate(tasks)])
    mean_drag = {tasks[i]: mean(v for v in row if v is not None) for i, row in enumerate(drag)}
    worst = max(tasks, key=lambda t: (mean_drag[t], -tasks.index(t)))
    wi = tasks.index(worst)
    hit = max((j for j in range(len(tasks)) if j != wi), key=lambda j: drag[wi][j] or 0.0)
    if mean_drag[worst] > 0:
        summary = (f"worst adapter: {worst} (joining the merge lowers the other tasks by {mean_drag[worst]:.2f} "
                   f"points on average, {tasks[hit]} most: {drag[wi][hit]:.2f}; task arithmetic scaling "
                   f"{scaling:g}, {split})")
    else:
        summary = (f"no adapter drags the other tasks down on average; the least helpful is {worst} "
                   f"(mean change {-mean_drag[worst]:+.2f} points on the others; task arithmetic scaling "
                   f"{scaling:g}, {split})")
    return {"tasks": tasks, "scaling": float(scaling), "split": split, "all": full, "without": without,
            "drag": drag, "mean_drag": mean_drag, "worst": worst, "summary": summary}


def interference_ranking(result: Mapping[str, Any]) -> dict[str, Any]:
    """Adapters ranked by how strongly they shift the OTHER tasks' outputs: the mean off-diagonal
    entry of their row of the interference ratio matrix (:func:`interference_matrix`)."""
    tasks = list(result["tasks"])
    ratio = result["ratio"]
    score = {}
    for i, t in enumerate(tasks):
        vals = [ratio[i][j] for j in range(len(tasks)) if j != i and not math.isnan(ratio[i][j])]
        score[t] = sum(vals) / len(vals) if vals else float("nan")
    order = sorted(tasks, key=lambda t: (-score[t] if not math.isnan(score[t]) else math.inf, tasks.index(t)))
    return {"mean_offdiag_ratio": score, "rank": order}


def format_leave_one_out(result: Mapping[str, Any]) -> list[str]:
    """The drag matrix as text rows (adapter i x task j, points lost by j when i joins) + the summary."""
    tasks = list(result["tasks"])
    width = max(12, *(len(t) for t in tasks))
    corner = "adapter i / task j"
    lines = [f"{corner:<{width + 6}}" + "".join(f"{t:>{width + 2}}" for t in tasks) + f"{'mean':>{width + 2}}"]
    for i, t in enumerate(tasks):
        cells = "".join(f"{'-':>{width + 2}}" if v is None else f"{v:>{width + 2}.2f}" for v in result["drag"][i])
        lines.append(f"{t:<{width + 6}}{cells}{result['mean_drag'][t]:>{width + 2}.2f}")
    ranking = result.get("interference")
    if ranking:
        lines.append("interference ranking (mean off-diagonal ratio): "
                     + ", ".join(f"{t} {ranking['mean_offdiag_ratio'][t]:.3g}" for t in ranking["rank"]))
    lines.append(str(result["summary"]))
    return lines


def run_leave_one_out(adapter_dirs: Sequence[str], out_dir: str, *, scaling: float = 1.0, stats_path: str | None = None,
                      model: str | None = None, max_length: int | None = None, batch_size: int = 128,
                      device: str | None = None) -> dict[str, Any]:
    """CLI-facing: the leave-one-out drag matrix on validation (and, with ``stats_path``, the adapters
    ranked by the interference statistics); writes ``out_dir/leave_one_out.json`` and returns it."""
    evaluator, model_path = merged_evaluator_for(adapter_dirs, model=model, max_length=max_length,
                                                 batch_size=batch_size, device=device, splits=("validation",))
    adapters = [load_adapter(d, name=t) for d, t in zip(adapter_dirs, evaluator.task_names)]
    result = leave_one_out(evaluator, adapters, scaling)
    result["adapters"] = {t: str(d) for t, d in zip(evaluator.task_names, adapter_dirs)}
    result["model"] = model_path
    if stats_path is not None:
        store = StatsStore.load(stats_path)
        loaded = load_tasks_adapters([str(d) for d in adapter_dirs], store)
        result["interference"] = interference_ranking(interference_matrix({t: ad for t, (_, ad) in loaded.items()}, store))
    write_json(Path(out_dir) / "leave_one_out.json", result)
    logger.debug("%s", result["summary"])
    return result
