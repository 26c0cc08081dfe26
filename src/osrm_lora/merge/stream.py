"""Streamed, multi-process merging of large models: a few modules in memory at a time.

:func:`stream_merge` merges PEFT LoRA adapters without ever holding a whole model's worth of
factors, dense deltas or base weights. The sorted module keys are split round robin across the
processes (:func:`osrm_lora.distributed.shard`; one process is the same code with world size 1), and
each process works through its share ``modules_per_step`` modules at a time on
:func:`~osrm_lora.distributed.rank_device`: read those modules' factors lazily
(:class:`~osrm_lora.adapters.AdapterReader`), merge them with the registered method through
:func:`~osrm_lora.merge.registry.merge`, hand the result (moved to CPU) to the writer, free it. Peak
memory is about ``modules_per_step`` modules' dense deltas times the number of tasks (plus, for
``format="full"``, one output shard of at most ``max_shard_bytes``).

Output, written atomically (rank 0 creates the temporary directory next to ``out`` and renames it
once every rank has written its part; on any rank's failure every rank raises and no output remains):

- ``format="peft"``: a PEFT adapter directory (``adapter_config.json`` with ``rank_pattern`` where
  ranks differ, ``adapter_model.safetensors``) + ``merge_info.json`` + ``README.md``, exactly as
  :func:`~osrm_lora.merge.io.save_merge_result` writes it. Dense results are factorised by SVD on
  the rank that merged the module, at the smallest rank within ``max_error`` (or ``svd_rank``), as in
  :mod:`osrm_lora.merge.io`. Per-task results (emr) get one sub-directory per task. Trained biases
  and task heads are handled as there (biases merged by linear methods, heads kept or beside).
- ``format="full"``: an HF model directory in the sharded safetensors layout
  (``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``): every base tensor is
  read lazily from the base model's safetensors (one file or sharded with an index), the merged
  modules' weights get their delta folded in (adapter keys mapped onto the checkpoint's names with
  or without the base prefix, :meth:`~osrm_lora.merge.io.BaseCheckpoint.tensor_name`), merged
  biases replace the base ones, all other tensors are copied through; ``config.json`` and tokenizer
  files are copied. Every rank writes its own shards; rank 0 writes the index.

Methods that couple modules get their task-wide statistics from a collective pre-pass (each rank
over its modules, sums all-reduced), handed to the per-step merges through
:class:`~osrm_lora.merge.registry.MergeContext`. Every registered method, in streaming mode:

- ``task_arithmetic``, ``cat``: per module (exact factor concatenation); same output as in memory.
- ``tsv_m``, ``iso_c``, ``iso_cts``: per module (SVDs from the factors); same output.
- ``opcm``: per module (one running matrix per module); same output.
- ``ties``, ``magnitude_prune``: ``threshold="matrix"`` is per module. ``threshold="task"`` with
  ``density < 1`` needs each task's k-th largest ``|tau|`` over ALL modules: computed exactly by a
  distributed bisection on the float32 bit patterns of ``|tau|``, many bits per round: two counting
  passes (the top 16 bits, then the low 15 inside the selected bucket; per task a count histogram,
  all-reduced), passed as ``context.task_thresholds``. Same output.
- ``do_merging``: ``base="ta"`` per module; ``base="ties"`` with ``threshold="task"`` gets the
  thresholds of the row directions from the same pre-pass. Same output.
- ``knots``, ``core_space``, ``ctm``: the decomposition is per module; ``variant="ties"`` with
  ``threshold="task"`` gets the thresholds of the task coordinates / cores from the pre-pass;
  ``variant="dare_ties"`` uses per-module DARE seeds (below); ``ta``/``tsv`` are per module.
- ``dare_linear``, ``dare_ties`` (and the DARE variants above): in memory the masks come from one
  generator run over all modules in sorted order (PEFT parity), which depends on every module
  before. Streamed, module ``key`` draws from a generator seeded with
  ``module_seed(seed, key) = (seed << 32) + crc32(key)`` (``context.per_module_seed``), so the
  output does not depend on the number of processes or ``modules_per_step``. It equals the
  in-memory merge with ``MergeContext(per_module_seed=True)``, not the default one; recorded in
  ``merge_info.json["stream"]["dare_seeding"]``. Masks are drawn on the compute device, so CPU and
  GPU runs differ.
- ``emr``: per-task output (one sub-directory per task). ``rescale="matrix"`` is per module;
  ``rescale="task"`` needs per-task sums over all modules (``sum|tau_t|``, ``sum|M_t * unified|``):
  a pre-pass all-reduces them and passes ``context.task_rescalers``. Same output.
- ``fisher``, ``regmean``: per module, given their statistics (``context=MergeContext(grams=...)``
  or ``fisher=...``; any Mapping, read per module, so a lazy store works). Refused without them
  (the CLI has no way to pass them).
- ``adamerging``: refused; it optimises coefficients with the model in the loop over all modules
  at once. Merge it in memory (:func:`osrm_lora.merge.merge`).

A method that needs a task-wide statistic the streamed merge did not provide raises (the context's
``streaming`` flag) instead of silently computing it over a subset of the modules.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from osrm_lora import distributed as D
from osrm_lora.adapters import (
    AdapterReader,
    LoraAdapter,
    LoraModule,
    ModuleShape,
    bias_module,
    write_adapter_files,
)
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_dir, to_jsonable
from osrm_lora.merge import io, ops
from osrm_lora.merge import registry as R
from osrm_lora.merge.io import BaseCheckpoint, resolve_base_model
from osrm_lora.merge.methods._common import merged_config
from osrm_lora.merge.methods.sparse import emr_rescalers
from osrm_lora.model.keys import check_weight_shape, fold_delta

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SHARD_BYTES = 1 << 30
INDEX_NAME = io.INDEX_NAME
SINGLE_NAME = io.SINGLE_NAME
_PARTS = ".stream-parts"

def stream_requirements(method: str, params: Mapping[str, Any]) -> frozenset[str]:
    """What a streamed merge of ``method`` with resolved ``params`` needs besides per-module work, as
    the method declares it in the registry (:attr:`~osrm_lora.merge.types.MethodInfo.task_wide`):
    ``"task_thresholds"`` (task-wide magnitude trim), ``"task_rescalers"`` (emr rescale=task) and
    ``"per_module_seed"`` (DARE masks)."""
    return frozenset(R.get_method(method).task_wide(params))


def check_streamable(method: str, context: R.MergeContext | None = None) -> R.MethodInfo:
    """The method's info if it can be streamed with ``context``; OsrmError naming the fix otherwise."""
    info = R.get_method(method)
    if "adamerging_eval" in info.needs:
        raise OsrmError(f"method {method} optimises its coefficients with the model in the loop over all modules "
                        "at once and cannot be streamed; merge it in memory with osrm_lora.merge.merge")
    for need in sorted(info.needs):
        if getattr(context, need, None) is None:
            raise OsrmError(f"method {method} needs {need} computed from task data; pass "
                            f"context=MergeContext({need}=...) to stream_merge from Python, or run it through the "
                            "pipeline")
    return info


# ------------------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class _Plan:
    method: str
    params: dict[str, Any]
    readers: list[AdapterReader]
    keys: list[str]
    shapes: dict[str, ModuleShape]
    groups: list[int | None]
    stub: R.MergeResult  # method, params, config and task names of the result (no payload)
    format: str
    svd_rank: int | None
    max_error: float | None
    base_model_path: str | None
    base: BaseCheckpoint | None
    weight_names: dict[str, str]  # module key -> the base checkpoint's weight name (format full)
    non_lora: io.NonLora  # merged biases (heads are read by rank 0 when writing)
    needs: frozenset[str]
    seed: int
    user_context: R.MergeContext | None
    inputs: list[str]


def _make_plan(adapter_dirs: Sequence[str | Path], method: str, params: Mapping[str, Any] | None,
               weights: Sequence[float] | None, *, format: str, svd_rank: int | None, max_error: float | None,
               base_model_path: str | None, base_dir: str | None, modules_per_step: int, max_shard_bytes: int,
               seed: int, context: R.MergeContext | None, ignore_extra: bool) -> _Plan:
    info = check_streamable(method, context)
    if isinstance(modules_per_step, bool) or not isinstance(modules_per_step, int) or modules_per_step < 1:
        raise OsrmError(f"modules_per_step must be a positive integer, got {modules_per_step!r}; pass e.g. 1")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise OsrmError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    given = dict(params or {})
    if weights is not None:
        info.param("weights")  # raises if the method has no weights
        given["weights"] = list(weights)
    if not adapter_dirs:
        raise OsrmError("no adapter directories given; pass at least one PEFT adapter directory")
    readers = [AdapterReader(d) for d in adapter_dirs]
    resolved = R.check_inputs(readers, info, given, context, ignore_extra=ignore_extra)
    config = merged_config([LoraAdapter({}, readers[0].config)])
    base_model_path = io.check_output_options(format, svd_rank, base_model_path, config, max_error)
    io.check_bias_merge(readers, method, resolved)
    shapes = readers[0].module_shapes()
    keys = sorted(shapes)
    bias_names = io.union_names(readers, "bias")
    extras = [r.read_extra([n for n in bias_names if n in r.extra]) for r in readers]
    coeffs = io.bias_coefficients(method, resolved, len(readers)) or []
    use_base = format == "full" or io.needs_base_bias(bias_names, extras, coeffs)
    base = BaseCheckpoint(base_dir) if base_dir and use_base else None
    weight_names: dict[str, str] = {}
    if format == "full":
        assert base is not None
        for key in keys:
            name = base.tensor_name(key, "weight")
            if name is None:
                raise OsrmError(f"base model {base_model_path} has no tensor {key}.weight; use the base model the "
                                "adapters were trained on")
            s = shapes[key]
            check_weight_shape(key, base.shapes[name], (s.out_features, s.in_features), s.fan_in_fan_out)
            weight_names[key] = name
    non_lora = io.non_lora_from(readers, extras, method, resolved, io.checkpoint_bias(base) if base else None)
    names = [r.name or f"task{i}" for i, r in enumerate(readers)]
    stub = R.MergeResult(method, resolved, config=config, task_names=names)
    eff_seed = int(resolved["seed"]) if resolved.get("seed") is not None else int(seed)
    return _Plan(method, resolved, readers, keys, shapes, list(range(len(readers))) if info.per_task else [None],
                 stub, format, svd_rank, max_error, base_model_path, base, weight_names, non_lora,
                 stream_requirements(method, resolved), eff_seed, context, [str(d) for d in adapter_dirs])


# ------------------------------------------------------------------------------------------------ steps


def _context_slice(ctx: R.MergeContext | None, keys: Sequence[str]) -> dict[str, Any]:
    """grams / fisher of the modules ``keys`` only (Mappings are read per module)."""
    out: dict[str, Any] = {}
    if ctx is None:
        return out
    if ctx.grams is not None:
        out["grams"] = [{k: g[k] for k in keys if k in g} for g in ctx.grams]
    if ctx.fisher is not None:
        out["fisher"] = [{n: f[n] for k in keys for n in (k, k + ".lora_A", k + ".lora_B") if n in f}
                         for f in ctx.fisher]
    return out


def _merge_step(plan: _Plan, keys: Sequence[str], device: torch.device, ctx: R.MergeContext) -> R.MergeResult:
    subs = [r.read(keys, device) for r in plan.readers]
    step_ctx = dataclasses.replace(ctx, **_context_slice(plan.user_context, keys))
    return R.merge(subs, plan.method, plan.params, context=step_ctx, ignore_extra=True)


_SUMMED = ("rescaler_num", "rescaler_den")


def _accumulate_info(acc: dict[str, Any], new: Mapping[str, Any]) -> None:
    """Fold one step's ``result.info`` into ``acc``: per-module dicts are joined, times and the EMR
    rescaler sums are added, anything else keeps its first value."""
    for k, v in new.items():
        if isinstance(v, dict):
            acc.setdefault(k, {}).update(v)
        elif k == "seconds":
            acc[k] = acc.get(k, 0.0) + float(v)
        elif k in _SUMMED:
            prev = acc.get(k)
            acc[k] = list(v) if prev is None else [a + b for a, b in zip(prev, v)]
        else:
            acc.setdefault(k, v)


def _merge_pass(plan: _Plan, steps: list[list[str]], device: torch.device, ctx: R.MergeContext,
                writer: _PeftWriter | _FullWriter | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for i, keys in enumerate(steps):
        result = _merge_step(plan, keys, device, ctx)
        if writer is not None:
            writer.add(result)
        _accumulate_info(info, result.info)
        del result  # free this step's deltas before the next read
        logger.debug("rank %d: step %d/%d (%s)", D.get_env().rank, i + 1, len(steps), ", ".join(keys))
    return info


def _collectively(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it fails on any rank, every rank raises (nobody waits forever)."""
    err: Exception | None = None
    out: Any = None
    try:
        out = fn()
    except Exception as exc:
        err = exc
    D.raise_if_any_failed(err)
    return cast("T", out)  # set: had fn() failed, raise_if_any_failed raised


# ------------------------------------------------------------------------------------------------ pre-passes

def _task_thresholds(plan: _Plan, steps: list[list[str]], device: torch.device, ctx: R.MergeContext) -> list[float]:
    """Each task's ``int(density * N_t)``-th largest ``|x|`` over every tensor its magnitude trim sees
    (all modules, all ranks), exactly: a bisection on float32 bit patterns, 16 then 15 bits a round.

    Round 1 counts the values per top-16-bit bucket, round 2 per low-15-bit bucket inside the
    selected one; counts are all-reduced, so every rank gets the same thresholds. Equals
    :func:`osrm_lora.merge.ops.kth_largest_abs` over all modules.
    """
    n_tasks = len(plan.readers)
    hist = torch.zeros(n_tasks, 1 << ops.HI_BITS, dtype=torch.int64, device=device)

    def count_hi(t: int, x: torch.Tensor) -> None:
        hist[t] += ops.high_histogram(x).to(device)

    _collectively(lambda: _merge_pass(plan, steps, device, dataclasses.replace(ctx, magnitude_probe=count_hi)))
    hist_all = D.all_reduce_sum(hist).cpu()
    density = float(plan.params["density"])
    ks = [int(density * int(hist_all[t].sum())) for t in range(n_tasks)]
    hi_sel = [ops.select_bucket(hist_all[t], k) if k > 0 else None for t, k in enumerate(ks)]
    lo_hist = torch.zeros(n_tasks, 1 << ops.LO_BITS, dtype=torch.int64, device=device)

    def count_lo(t: int, x: torch.Tensor) -> None:
        sel = hi_sel[t]
        if sel is not None:
            lo_hist[t] += ops.low_histogram(x, sel[0]).to(device)

    if any(s is not None for s in hi_sel):
        _collectively(lambda: _merge_pass(plan, steps, device, dataclasses.replace(ctx, magnitude_probe=count_lo)))
    lo_all = D.all_reduce_sum(lo_hist).cpu()
    out = []
    for t, sel in enumerate(hi_sel):
        if sel is None:
            out.append(float("inf"))
            continue
        lo, _ = ops.select_bucket(lo_all[t], sel[1])
        out.append(ops.bits_value(sel[0], lo))
    return out


def _rescaler_sums(info: Mapping[str, Any], n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    zeros = [0.0] * n_tasks
    num = torch.tensor(info.get("rescaler_num", zeros), dtype=torch.float64)
    den = torch.tensor(info.get("rescaler_den", zeros), dtype=torch.float64)
    return num, den


def _rescalers(num: torch.Tensor, den: torch.Tensor) -> list[float]:
    """EMR's task-wide rescalers from the numerators/denominators summed over every module."""
    return emr_rescalers(num, den).tolist()


def _task_rescalers(plan: _Plan, steps: list[list[str]], device: torch.device, ctx: R.MergeContext) -> list[float]:
    n_tasks = len(plan.readers)
    dummy = dataclasses.replace(ctx, task_rescalers=[1.0] * n_tasks)
    info = _collectively(lambda: _merge_pass(plan, steps, device, dummy))
    num, den = _rescaler_sums(info, n_tasks)
    return _rescalers(D.all_reduce_sum(num), D.all_reduce_sum(den))


# ------------------------------------------------------------------------------------------------ writers


def _group_dir(plan: _Plan, tmp: Path, g: int | None) -> Path:
    return tmp if g is None else tmp / io.task_dir_name(plan.stub, g)


class _PeftWriter:
    """Collects this rank's merged factors (dense results: truncated SVD, on this rank) for a part file."""

    def __init__(self, plan: _Plan, parts_dir: Path, rank: int) -> None:
        self.plan, self.parts_dir, self.rank = plan, parts_dir, rank
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[int | None, dict[str, tuple[float, bool]]] = {g: {} for g in plan.groups}
        self.written: dict[int | None, dict[str, Any]] = {g: {} for g in plan.groups}

    def add(self, result: R.MergeResult) -> None:
        for g in self.plan.groups:
            deltas = None if g is None else result.deltas_for(g)
            adapter, written = io.peft_adapter_for(result, deltas, self.plan.svd_rank, self.plan.max_error)
            for key, mod in adapter.modules.items():
                self.tensors[f"{g}/{key}/A"] = mod.A.detach().to("cpu", copy=True).contiguous()
                self.tensors[f"{g}/{key}/B"] = mod.B.detach().to("cpu", copy=True).contiguous()
                self.modules[g][key] = (float(mod.scaling), bool(mod.fan_in_fan_out))
            _accumulate_info(self.written[g], written)

    def finish(self) -> dict[str, Any]:
        from safetensors.torch import save_file

        fname = None
        if self.tensors:
            fname = f"peft-r{self.rank:05d}.safetensors"
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            save_file(self.tensors, str(self.parts_dir / fname))
            self.tensors = {}
        return {"file": fname, "modules": self.modules, "written": self.written}


def _combine_peft(plan: _Plan, tmp: Path, parts: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    parts_dir = tmp / _PARTS
    tensors: dict[str, torch.Tensor] = {}
    for part in parts:
        if part["file"]:
            tensors.update(load_file(str(parts_dir / part["file"])))
    heads = _read_heads(plan)
    shared = heads.heads[0] if heads.heads_shared and plan.groups == [None] else None
    for g in plan.groups:
        written: dict[str, Any] = {}
        flags: dict[str, tuple[float, bool]] = {}
        for part in parts:
            flags.update(part["modules"][g])
            _accumulate_info(written, part["written"][g])
        mods = {k: LoraModule(tensors[f"{g}/{k}/A"], tensors[f"{g}/{k}/B"], *flags[k]) for k in plan.keys}
        own = shared if g is None else (heads.heads[g] if g < len(heads.heads) else None)
        adapter = LoraAdapter(mods, copy.deepcopy(plan.stub.config or {}), name=plan.method)
        write_adapter_files(io.with_non_lora(adapter, heads, own), _group_dir(plan, tmp, g))
        fields = io.finish_written(written)
        if "svd_relative_error" in fields:
            plan.stub.info.setdefault("svd_relative_error", {}).update(fields["svd_relative_error"])
        if g is None:
            meta.update(fields)
        else:
            meta.setdefault("per_task", []).append({"task": io.task_name(plan.stub, g),
                                                    "dir": _group_dir(plan, tmp, g).name, **fields})
    shutil.rmtree(parts_dir, ignore_errors=True)
    if plan.groups != [None]:
        _finish_non_lora(plan, tmp, heads, io.HEADS_PER_TASK, meta)
    else:
        _finish_non_lora(plan, tmp, heads, io.HEADS_KEPT if shared else io.HEADS_BESIDE, meta)


def _read_heads(plan: _Plan) -> io.NonLora:
    """The plan's non-LoRA outputs with every input's head tensors read (rank 0, while writing)."""
    heads = [r.read_extra(r.extra_names("head")) for r in plan.readers]
    return dataclasses.replace(plan.non_lora, heads=heads)


def _finish_non_lora(plan: _Plan, tmp: Path, non_lora: io.NonLora, written: str, meta: dict[str, Any]) -> None:
    extra_meta = io.finish_non_lora(tmp, [io.task_dir_name(plan.stub, t) for t in range(len(non_lora.heads))],
                                    non_lora, written)
    if extra_meta:
        meta["non_lora"] = extra_meta


class _FullWriter:
    """Writes this rank's tensors of the merged model(s) into shard files of at most ``max_bytes``."""

    def __init__(self, plan: _Plan, tmp: Path, rank: int, max_bytes: int) -> None:
        self.plan, self.tmp, self.rank, self.max_bytes = plan, tmp, rank, max_bytes
        self.buffers: dict[int | None, dict[str, torch.Tensor]] = {g: {} for g in plan.groups}
        self.sizes: dict[int | None, int] = {g: 0 for g in plan.groups}
        self.files: list[tuple[int | None, str, list[str], int]] = []

    def add(self, result: R.MergeResult) -> None:
        assert self.plan.base is not None
        for g in self.plan.groups:
            for key, d in result.deltas_for(g).items():
                name = self.plan.weight_names[key]
                w = self.plan.base.get(name)
                fold_delta(w, d.detach().cpu(), key, self.plan.shapes[key].fan_in_fan_out)
                self._put(g, name, w)

    def copy_through(self, names: Sequence[str]) -> None:
        assert self.plan.base is not None
        biases = _base_bias_values(self.plan)
        for name in names:
            t = self.plan.base.get(name)
            if name in biases:
                t = biases[name].to(t.dtype)
            for g in self.plan.groups:
                self._put(g, name, t)

    def _put(self, g: int | None, name: str, t: torch.Tensor) -> None:
        self.buffers[g][name] = t.contiguous()
        self.sizes[g] += t.numel() * t.element_size()
        if self.sizes[g] >= self.max_bytes:
            self._flush(g)

    def _flush(self, g: int | None) -> None:
        from safetensors.torch import save_file

        buf = self.buffers[g]
        if not buf:
            return
        fname = f".part-r{self.rank:05d}-{len(self.files):05d}.safetensors"
        target = _group_dir(self.plan, self.tmp, g)
        target.mkdir(parents=True, exist_ok=True)
        save_file(buf, str(target / fname), metadata={"format": "pt"})
        self.files.append((g, fname, sorted(buf), self.sizes[g]))
        self.buffers[g], self.sizes[g] = {}, 0

    def finish(self) -> dict[str, Any]:
        for g in self.plan.groups:
            self._flush(g)
        return {"files": self.files}


def _base_bias_values(plan: _Plan) -> dict[str, torch.Tensor]:
    """Merged biases by the base checkpoint's tensor name (format full)."""
    assert plan.base is not None
    out = {}
    for name, value in plan.non_lora.biases.items():
        base_name = plan.base.tensor_name(bias_module(name), "bias")
        if base_name is None or tuple(plan.base.shapes[base_name]) != tuple(value.shape):
            raise OsrmError(f"base model {plan.base_model_path} has no bias of shape {tuple(value.shape)} for "
                            f"{bias_module(name)}; use the base model the adapters were trained on")
        out[base_name] = value
    return out


def _combine_full(plan: _Plan, tmp: Path, parts: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    assert plan.base is not None
    files = [f for part in parts for f in part["files"]]  # rank order, then write order
    for g in plan.groups:
        target = _group_dir(plan, tmp, g)
        mine = [f for f in files if f[0] == g]
        n = len(mine)
        weight_map: dict[str, str] = {}
        total = 0
        for i, (_, fname, names, nbytes) in enumerate(mine, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(target / fname, target / final)
            weight_map.update({name: final for name in names})
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for aux in plan.base.aux_files():
            shutil.copyfile(aux, target / aux.name)
        fields = {"output": "full model", "base_model_path": str(plan.base_model_path), "shards": n}
        if g is None:
            meta.update(fields)
        else:
            meta.setdefault("per_task", []).append({"task": io.task_name(plan.stub, g), "dir": target.name, **fields})
    _finish_non_lora(plan, tmp, _read_heads(plan), io.HEADS_BESIDE, meta)


# ------------------------------------------------------------------------------------------------ driver


def _write_parts(plan: _Plan, steps: list[list[str]], device: torch.device, ctx: R.MergeContext, tmp: Path,
                 max_shard_bytes: int) -> dict[str, Any]:
    env = D.get_env()
    writer: _PeftWriter | _FullWriter
    if plan.format == "peft":
        writer = _PeftWriter(plan, tmp / _PARTS, env.rank)
    else:
        writer = _FullWriter(plan, tmp, env.rank, max_shard_bytes)
    info = _merge_pass(plan, steps, device, ctx, writer)
    if isinstance(writer, _FullWriter):
        assert plan.base is not None
        merged = set(plan.weight_names.values())
        writer.copy_through(D.shard([n for n in plan.base.names if n not in merged], env))
    return {"info": info, **writer.finish()}


def _combine(plan: _Plan, tmp: Path, parts: list[dict[str, Any]], stream_info: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for part in parts:
        _accumulate_info(info, part["info"])
    for k, v in list(info.items()):
        if isinstance(v, dict):
            info[k] = dict(sorted(v.items()))
    info["adapters"] = [r.name for r in plan.readers]
    if "rescaler_num" in info:
        num, den = _rescaler_sums(info, len(plan.readers))
        info["rescalers"] = stream_info.get("task_rescalers") or _rescalers(num, den)
    if plan.non_lora.not_written:
        info["dropped_extra"] = plan.non_lora.not_written
    plan.stub.info = info
    meta = io.base_meta(plan.stub, plan.format)
    if plan.format == "peft":
        _combine_peft(plan, tmp, parts, meta)
    else:
        _combine_full(plan, tmp, parts, meta)
    meta["stream"] = stream_info
    io.write_merge_metadata(tmp, plan.stub, meta, base_model_path=plan.base_model_path, inputs=plan.inputs,
                            scores=None, format=plan.format, svd_rank=plan.svd_rank, max_error=plan.max_error)
    jsonable: dict[str, Any] = to_jsonable(meta, strict=False)
    return jsonable


def _trains_biases(adapter_dirs: Sequence[str | Path]) -> bool:
    """Whether some input adapter stores trained biases (the base model's biases are then needed)."""
    found = False
    for d in adapter_dirs:
        with contextlib.suppress(OsrmError):
            found = found or AdapterReader(d).trains_biases
    return found


def stream_merge(adapter_dirs: Sequence[str | Path], method: str, params: Mapping[str, Any] | None,
                 out: str | Path, *, format: str = "peft", base_model_path: str | None = None,
                 svd_rank: int | None = None, max_error: float | None = None,
                 weights: Sequence[float] | None = None, modules_per_step: int = 1,
                 device: str | None = "auto", seed: int = 0, context: R.MergeContext | None = None,
                 ignore_extra: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """Merge the PEFT adapters in ``adapter_dirs`` with ``method`` a few modules at a time; write ``out``.

    Call it on every rank of a process group (or in a single process): each rank merges its round
    robin share of the sorted modules, ``modules_per_step`` at a time, on
    :func:`~osrm_lora.distributed.rank_device` (``device``). ``params`` are the method's parameters
    (validated as by :func:`~osrm_lora.merge.registry.merge`); ``weights`` (one per adapter) sets
    the ``weights`` parameter; ``seed`` is the default seed of DARE (per-module seeding, see the
    module docstring). ``context`` supplies grams / fisher for regmean / fisher (other fields are
    ignored). Non-LoRA tensors (biases, modules_to_save heads) are refused unless ``ignore_extra``; then
    trained biases are merged (linear methods) or refused and heads kept or written beside, as by
    :func:`~osrm_lora.merge.io.save_merge_result`.
    ``format``, ``svd_rank``, ``max_error`` and ``base_model_path`` are as in
    :func:`~osrm_lora.merge.io.save_merge_result`; ``format="full"`` writes shards of at most
    ``max_shard_bytes`` (a larger single tensor gets a shard of its own). With several nodes, ``out``
    and the inputs must be on a filesystem that every rank sees.

    Returns the contents of ``merge_info.json`` (the same on every rank). Bad input raises a
    one-line :class:`~osrm_lora.errors.OsrmError` on every rank and leaves nothing behind.
    """
    t0 = time.perf_counter()
    env = D.get_env()
    base_dir: str | None = None
    if format == "full" or _trains_biases(adapter_dirs):
        # rank 0 resolves (and maybe downloads) the base model, the others use its path
        def resolve() -> str | None:
            bmp = base_model_path
            if bmp is None and adapter_dirs:
                with contextlib.suppress(OsrmError):
                    bmp = AdapterReader(adapter_dirs[0]).base_model
            return str(resolve_base_model(bmp)) if (env.is_main and bmp) else None

        base_dir = D.broadcast_object(_collectively(resolve))
    plan = _collectively(lambda: _make_plan(
        adapter_dirs, method, params, weights, format=format, svd_rank=svd_rank, max_error=max_error,
        base_model_path=base_model_path, base_dir=base_dir, modules_per_step=modules_per_step, max_shard_bytes=max_shard_bytes, seed=seed,
        context=context, ignore_extra=ignore_extra))
    device_t = D.rank_device(device)
    mine = D.shard(plan.keys, env)
    steps = [mine[i:i + modules_per_step] for i in range(0, len(mine), modules_per_step)]
    ctx = R.MergeContext(seed=seed, per_module_seed=True, streaming=True)
    stream_info: dict[str, Any] = {"world_size": env.world_size, "modules_per_step": modules_per_step,
                                   "device": device_t.type, "modules": len(plan.keys)}
    if "per_module_seed" in plan.needs:
        stream_info["dare_seeding"] = "per module: generator seeded with (seed << 32) + crc32(module key)"
        stream_info["seed"] = plan.seed
    stack = contextlib.ExitStack()
    body_done = False
    rename_error: BaseException | None = None
    try:
        with stack:
            tmp_name = _collectively(lambda: str(stack.enter_context(atomic_dir(out))) if env.is_main else None)
            tmp = Path(cast(str, D.broadcast_object(tmp_name)))  # rank 0's name: never None
            if "task_thresholds" in plan.needs:
                ctx.task_thresholds = _task_thresholds(plan, steps, device_t, ctx)
                stream_info["task_thresholds"] = ctx.task_thresholds
            if "task_rescalers" in plan.needs:
                ctx.task_rescalers = _task_rescalers(plan, steps, device_t, ctx)
                stream_info["task_rescalers"] = ctx.task_rescalers
            part = _collectively(lambda: _write_parts(plan, steps, device_t, ctx, tmp, max_shard_bytes))
            parts = D.all_gather_objects(part)
            stream_info["seconds"] = time.perf_counter() - t0
            meta = _collectively(lambda: _combine(plan, tmp, parts, stream_info) if env.is_main else None)
            meta = D.broadcast_object(meta)
            body_done = True
    except BaseException as exc:
        if not body_done:
            raise
        rename_error = exc  # only rank 0 renames: tell the others
    D.raise_if_any_failed(rename_error)
    logger.info("streamed %s merge of %d modules on %d process(es) into %s", method, len(plan.keys),
                env.world_size, out)
    return cast("dict[str, Any]", meta)  # rank 0's metadata, broadcast to every rank: never None
