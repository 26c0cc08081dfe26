"""Writing merge results: PEFT adapters (exact factors or truncated SVD) or full HF models.

Layout written by :func:`save_merge_result` (atomically):

- shared result, ``format="peft"``: ``out_dir`` is a PEFT adapter dir (+ ``merge_info.json``);
- shared result, ``format="full"``: ``out_dir`` is an HF model dir (``save_pretrained``,
  safetensors, tokenizer if the base has one) with the deltas folded in (+ ``merge_info.json``);
- per-task result (emr): ``out_dir/merge_info.json`` and one sub-directory per task
  ``out_dir/<index>_<task name>/`` in the chosen format.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter, LoraModule, write_adapter_files
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_dir
from osrm_lora.merge import ops
from osrm_lora.merge.registry import MergeResult

logger = logging.getLogger(__name__)

MERGE_INFO = "merge_info.json"


def deltas_to_adapter(deltas: dict[str, torch.Tensor], config: dict[str, Any], ranks: dict[str, int],
                      name: str = "merged") -> tuple[LoraAdapter, dict[str, float]]:
    """Truncated SVD of each dense delta into a LoRA (``B = U S``, ``A = V^T``, scaling 1).

    ``ranks[key]`` is the rank kept (capped by ``min(m, n)``; at least 1). Returns the adapter and the
    relative Frobenius reconstruction error per module.
    """
    mods, errors = {}, {}
    fifo = bool(config.get("fan_in_fan_out", False))
    for key, d in deltas.items():
        d = d.detach().float()
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        k = max(1, min(int(ranks.get(key, S.numel())), S.numel()))
        B, A = U[:, :k] * S[:k].unsqueeze(0), Vh[:k]
        mods[key] = LoraModule(A.contiguous().cpu(), B.contiguous().cpu(), 1.0, fifo)
        errors[key] = ops.relative_error(d, B @ A)
    return LoraAdapter(mods, copy.deepcopy(config), name=name), errors


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def peft_adapter_for(result: MergeResult, deltas: dict[str, torch.Tensor] | None,
                     svd_rank: int | None) -> tuple[LoraAdapter, dict[str, Any]]:
    """The PEFT adapter written for ``result`` and what to record about it in ``merge_info.json``.

    Factor-form results come back as they are (unless ``svd_rank``); dense ones (or ``deltas``, one
    task's deltas of a per-task result) are factorised by :func:`deltas_to_adapter` with rank
    ``svd_rank`` (default: the sum of the input ranks of the module).
    """
    config = result.config or {"peft_type": "LORA"}
    if result.adapter is not None and deltas is None and svd_rank is None:
        return result.adapter, {"output": "exact factors"}
    if deltas is None:
        deltas = result.deltas_for()
    ranks = {k: svd_rank if svd_rank is not None else result.source_ranks.get(k, min(d.shape))
             for k, d in deltas.items()}
    adapter, errors = deltas_to_adapter(deltas, config, ranks, name=result.method)
    return adapter, {"output": "truncated svd", "svd_rank": {k: m.rank for k, m in adapter.modules.items()},
                     "svd_relative_error": errors,
                     "svd_relative_error_max": max(errors.values()) if errors else 0.0}


def _write_peft(result: MergeResult, deltas: dict[str, torch.Tensor] | None, target: Path,
                svd_rank: int | None, info: dict[str, Any]) -> None:
    adapter, written = peft_adapter_for(result, deltas, svd_rank)
    write_adapter_files(adapter, target)
    info.update(written)
    if "svd_relative_error" in written:
        result.info.setdefault("svd_relative_error", {}).update(written["svd_relative_error"])


def _load_base(base_model_path: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    import transformers

    try:
        cfg = AutoConfig.from_pretrained(base_model_path)
    except (OSError, ValueError) as exc:
        raise OsrmError(f"cannot load the base model config from {base_model_path!r} ({exc}); "
                        "pass base_model_path pointing to an HF model directory") from exc
    archs = getattr(cfg, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(base_model_path)
    try:
        tok = AutoTokenizer.from_pretrained(base_model_path)
    except Exception:  # no tokenizer shipped with the base: write the model only
        tok = None
    return model, tok


def check_weight_shape(key: str, weight_shape: tuple[int, ...], delta_shape: tuple[int, ...],
                       fan_in_fan_out: bool = False) -> None:
    """OsrmError unless a (out, in) delta of ``delta_shape`` fits the weight of module ``key``."""
    want = tuple(reversed(delta_shape)) if fan_in_fan_out else tuple(delta_shape)
    if tuple(weight_shape) != want:
        raise OsrmError(f"module {key} has weight shape {tuple(weight_shape)} but the delta is {want}; "
                        "use the base model the adapters were trained on")


def fold_delta(weight: torch.Tensor, delta: torch.Tensor, key: str, fan_in_fan_out: bool = False) -> None:
    """``weight += delta`` in place (``delta`` is (out, in); transposed for fan_in_fan_out weights)."""
    check_weight_shape(key, tuple(weight.shape), tuple(delta.shape), fan_in_fan_out)
    d = delta.T if fan_in_fan_out else delta
    with torch.no_grad():
        weight += d.to(device=weight.device, dtype=weight.dtype)


def fold_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor], fan_in_fan_out: bool = False) -> None:
    """Add each (out, in) delta to ``model.get_submodule(key).weight`` in place."""
    for key, d in deltas.items():
        try:
            w = model.get_submodule(key).weight
        except AttributeError as exc:
            raise OsrmError(f"base model has no module {key}; use the base model the adapters were trained on") from exc
        fold_delta(w, d, key, fan_in_fan_out)


def _write_full(result: MergeResult, deltas: dict[str, torch.Tensor], target: Path, base_model_path: str,
                info: dict[str, Any]) -> None:
    model, tok = _load_base(base_model_path)
    fold_deltas(model, deltas, bool((result.config or {}).get("fan_in_fan_out", False)))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    if tok is not None:
        tok.save_pretrained(str(target))
    info["output"] = "full model"
    info["base_model_path"] = str(base_model_path)


def task_name(result: MergeResult, t: int) -> str:
    return result.task_names[t] if t < len(result.task_names) else f"task{t}"


def task_dir_name(result: MergeResult, t: int) -> str:
    """Sub-directory of task ``t`` of a per-task result: ``<index>_<task name>``."""
    return f"{t}_{_safe_name(task_name(result, t))}"


def base_meta(result: MergeResult, format: str) -> dict[str, Any]:
    return {"method": result.method, "params": result.params, "format": format, "tasks": result.task_names}


def write_merge_metadata(target: Path, result: MergeResult, meta: dict[str, Any], *, base_model_path: str | None,
                         inputs: list[str] | None, scores: dict[str, Any] | None, format: str) -> None:
    """Write ``merge_info.json`` (``meta`` + ``result.info``) and the ``README.md`` card into ``target``."""
    from osrm_lora.cards import merge_card
    from osrm_lora.merge.registry import get_method

    meta["info"] = result.info
    (target / MERGE_INFO).write_text(json.dumps(_jsonable(meta), indent=2) + "\n", encoding="utf-8")
    card = merge_card(method=result.method, params=result.params,
                      base_model=base_model_path or (result.config or {}).get("base_model_name_or_path"),
                      inputs=inputs or [], task_names=result.task_names, paper=get_method(result.method).paper,
                      scores=scores, info=result.info, output_format=format)
    (target / "README.md").write_text(card, encoding="utf-8")


def check_output_options(format: str, svd_rank: int | None, base_model_path: str | None,
                         config: dict[str, Any] | None) -> str | None:
    """Validate the output options; returns the base model path (format full: default the adapters')."""
    if format not in ("peft", "full"):
        raise OsrmError(f"unknown output format {format!r}; use peft or full")
    if svd_rank is not None and svd_rank < 1:
        raise OsrmError(f"svd_rank must be >= 1, got {svd_rank}")
    if format == "full":
        base_model_path = base_model_path or (config or {}).get("base_model_name_or_path")
        if not base_model_path:
            raise OsrmError("format=full needs the base model; pass base_model_path")
    return base_model_path


def save_merge_result(result: MergeResult, out_dir: str | Path, *, base_model_path: str | None = None,
                      format: str = "peft", svd_rank: int | None = None,
                      inputs: list[str] | None = None, scores: dict[str, Any] | None = None) -> Path:
    """Write ``result`` to ``out_dir`` atomically (see module docstring for the layout).

    ``format="peft"``: factor-form results are written exactly (or re-truncated to ``svd_rank`` if
    given); dense results are factorised by truncated SVD with rank ``svd_rank`` (default: the sum of
    the input ranks of the module), and the relative reconstruction error goes to
    ``result.info["svd_relative_error"]`` and ``merge_info.json``. ``format="full"``: the base model
    (``base_model_path``, default the adapters' ``base_model_name_or_path``) with the deltas folded in.
    """
    base_model_path = check_output_options(format, svd_rank, base_model_path, result.config)
    out_dir = Path(out_dir)
    meta = base_meta(result, format)
    with atomic_dir(out_dir) as tmp:
        if result.per_task_deltas is not None:
            meta["per_task"] = []
            for t, deltas in enumerate(result.per_task_deltas):
                sub = tmp / task_dir_name(result, t)
                tinfo: dict[str, Any] = {"task": task_name(result, t), "dir": sub.name}
                if format == "peft":
                    _write_peft(result, deltas, sub, svd_rank, tinfo)
                else:
                    _write_full(result, deltas, sub, str(base_model_path), tinfo)
                meta["per_task"].append(tinfo)
        elif format == "peft":
            _write_peft(result, None, tmp, svd_rank, meta)
        else:
            _write_full(result, result.deltas_for(), tmp, str(base_model_path), meta)
        write_merge_metadata(tmp, result, meta, base_model_path=base_model_path, inputs=inputs, scores=scores,
                             format=format)
    logger.debug("wrote %s result to %s", result.method, out_dir)
    return out_dir
