"""CLI-facing merge functions (the lead wires them into the typer app)."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from osrm_lora.adapters import load_adapter
from osrm_lora.errors import OsrmError
from osrm_lora.merge.io import MERGE_INFO, check_bias_merge, check_output_options, save_merge_result
from osrm_lora.merge.registry import MergeResult, get_method, list_methods, merge

logger = logging.getLogger(__name__)


def parse_params(method: str, params: list[str] | None) -> dict[str, object]:
    """Parse ``["key=value", ...]`` against ``method``'s parameter schema (types and ranges checked later)."""
    info = get_method(method)
    out: dict[str, object] = {}
    for item in params or []:
        if "=" not in item:
            raise OsrmError(f"parameter {item!r} is not key=value; pass e.g. {info.params[0].name}="
                            f"{info.params[0].default}" if info.params else f"method {method} takes no parameters")
        key, value = item.split("=", 1)
        out[key.strip()] = info.param(key.strip()).parse(value)
    return out


def _cli_params(method: str, params: list[str] | None, weights: list[float] | None) -> dict[str, object]:
    """Parsed ``key=value`` parameters (+ ``weights``) of a method the CLI can run (no data-aware inputs)."""
    info = get_method(method)
    if info.needs:
        raise OsrmError(f"method {method} needs {', '.join(sorted(info.needs))} computed from task data; "
                        "run it through the pipeline (osrm_lora.merge.merge with a MergeContext)")
    parsed = parse_params(method, params)
    if weights is not None:
        info.param("weights")  # raises if the method has no weights
        parsed["weights"] = list(weights)
    return parsed


def run_merge(adapter_dirs: list[str], method: str, params: list[str] | None, out: str, format: str = "peft",
              weights: list[float] | None = None, *, base_model_path: str | None = None,
              svd_rank: int | None = None, max_error: float | None = None, ignore_extra: bool = True) -> MergeResult:
    """Load PEFT adapters, merge them with ``method`` and ``params`` ("key=value"), write ``out``.

    ``weights`` (one per adapter) is passed as the method's ``weights`` parameter. ``svd_rank`` and
    ``max_error`` bound the PEFT output of dense methods (:func:`~osrm_lora.merge.io.save_merge_result`).
    Non-LoRA tensors are handled by the writer (trained biases merged by linear methods, refused
    otherwise; heads kept when identical, else written beside) unless ``ignore_extra=False`` refuses
    them. Data-aware methods (regmean, fisher, adamerging) need statistics and are run from Python/pipeline.
    """
    parsed = _cli_params(method, params, weights)
    if not adapter_dirs:
        raise OsrmError("no adapter directories given; pass at least one PEFT adapter directory")
    adapters = [load_adapter(d) for d in adapter_dirs]
    check_output_options(format, svd_rank, base_model_path, adapters[0].config, max_error)  # before merging
    check_bias_merge(adapters, method, parsed)
    result = merge(adapters, method, parsed, ignore_extra=ignore_extra)
    save_merge_result(result, out, base_model_path=base_model_path, format=format, svd_rank=svd_rank,
                      max_error=max_error, inputs=[str(d) for d in adapter_dirs])
    return result


def run_stream_merge(adapter_dirs: list[str], method: str, params: list[str] | None, out: str,
                     format: str = "peft", weights: list[float] | None = None, *, base_model_path: str | None = None,
                     svd_rank: int | None = None, max_error: float | None = None, ignore_extra: bool = True,
                     modules_per_step: int = 1, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Streamed merge (:func:`osrm_lora.merge.stream.stream_merge`): a few modules in memory at a time.

    Same inputs as :func:`run_merge` plus ``modules_per_step``, ``device`` and ``seed``. Started by a
    launcher (``torchrun --nproc_per_node N -m osrm_lora ...``), it joins the process group
    (:func:`~osrm_lora.distributed.init_distributed`; NCCL on GPUs, gloo on CPU) and spreads the
    modules over the processes; the group stays up for the rest of the process. Returns the
    contents of ``merge_info.json``. Methods needing a model or task data (adamerging, regmean,
    fisher) are refused.
    """
    from osrm_lora import distributed
    from osrm_lora.merge.stream import check_streamable, stream_merge

    check_streamable(method)
    parsed = _cli_params(method, params, weights)
    if distributed.launched_distributed():
        distributed.init_distributed(device)
    return stream_merge(adapter_dirs, method, parsed, out, format=format, base_model_path=base_model_path,
                        svd_rank=svd_rank, max_error=max_error, modules_per_step=modules_per_step, device=device,
                        seed=seed, ignore_extra=ignore_extra)


def _output_text(entry: Mapping[str, Any]) -> tuple[str, float | None, list[int]]:
    """(kind of output, max relative error or None when exact, SVD ranks) of one written adapter/model."""
    kind = entry.get("output", "exact factors")
    if kind == "truncated svd":
        ranks = [int(r) for r in (entry.get("svd_rank") or {}).values()]
        return "svd", float(entry.get("svd_relative_error_max", 0.0)), ranks
    return str(kind), None, []


def result_line(out: str | Path, n_adapters: int, method: str) -> str:
    """The stdout line of ``osrm-lora merge``: what was written to ``out`` and how far from exact it is."""
    meta = json.loads((Path(out) / MERGE_INFO).read_text(encoding="utf-8"))
    entries = meta.get("per_task") or [meta]
    kinds, errors, ranks = set(), [], []
    for entry in entries:
        kind, err, rk = _output_text(entry)
        kinds.add(kind)
        ranks += rk
        if err is not None:
            errors.append(err)
    head = f"merged {n_adapters} adapters with {method} into {out}"
    per_task = f", one per task ({len(entries)})" if meta.get("per_task") else ""
    if kinds == {"full model"}:
        return f"{head}: full model{per_task}, exact (deltas folded into the base weights)"
    if errors:
        bound = next((e.get("svd_max_error") for e in entries if e.get("svd_max_error") is not None), None)
        within = f" <= --max-error {bound:g}" if bound is not None else " (forced --svd-rank, no bound)"
        return (f"{head}: PEFT adapter{per_task}, SVD rank {min(ranks)}-{max(ranks)}, relative error of the "
                f"update {max(errors):.2e}{within}")
    return f"{head}: PEFT adapter{per_task}, exact (LoRA factors)"


def _search_rows() -> list[tuple[str, str, str, str]]:
    """The merge searches (their own commands, ``merge.rmm`` / ``merge.search`` in a run) as rows of
    the method table: their settings with defaults, what they do, the paper."""
    import osrm_lora.rmm as rmm_lib
    import osrm_lora.search as search_lib
    from osrm_lora.config import RMMSettings, SearchSettings

    rows = []
    for name, settings, lib in (("rmm", RMMSettings, rmm_lib), ("search", SearchSettings, search_lib)):
        defaults = settings().model_dump(mode="json")
        ps = ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in ("params",))
        rows.append((name, ps, f"{lib.SUMMARY} [command: osrm-lora {name}; in a run: merge.{name}]", lib.PAPER))
    return rows


def format_method_list(width: int = 120) -> str:
    """Plain-text table of the merge methods (name, parameters with defaults, description, paper),
    then the merge searches, which have their own commands."""
    rows = []
    for m in list_methods():
        ps = ", ".join(f"{p.name}={p.default}" + (p.range_text() and f" {p.range_text()}") for p in m.params) or "-"
        flags = []
        if m.exact_in_factor_space:
            flags.append("exact-lora")
        if m.per_task:
            flags.append("per-task")
        if m.needs:
            flags.append("needs:" + "+".join(sorted(m.needs)))
        rows.append((m.name, ps, m.description + (f" [{', '.join(flags)}]" if flags else ""), m.paper))
    searches = _search_rows()
    name_w = max(len("method"), *(len(r[0]) for r in rows + searches))
    par_w = 44
    desc_w = max(30, width - name_w - par_w - 6)
    lines = [f"{'method':<{name_w}}  {'parameters (default [range])':<{par_w}}  description / paper"]
    rule = "-" * min(width, name_w + par_w + desc_w + 4)
    lines.append(rule)
    for name, ps, desc, paper in rows + [("", "", "", "")] + searches:
        if not name:
            lines += ["", "merge searches (validation splits only; their own commands)", rule]
            continue
        pl = textwrap.wrap(ps, par_w) or [""]
        dl = textwrap.wrap(desc, desc_w) + [paper]
        for i in range(max(len(pl), len(dl))):
            a = name if i == 0 else ""
            b = pl[i] if i < len(pl) else ""
            c = dl[i] if i < len(dl) else ""
            lines.append(f"{a:<{name_w}}  {b:<{par_w}}  {c}".rstrip())
    return "\n".join(lines)
