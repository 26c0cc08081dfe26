"""Writing merge results: PEFT adapters (exact factors, or an SVD within a stated error) or full HF models.

Layout written by :func:`save_merge_result` (atomically):

- shared result, ``format="peft"``: ``out_dir`` is a PEFT adapter dir (+ ``merge_info.json``);
- shared result, ``format="full"``: ``out_dir`` is an HF model dir (``save_pretrained``,
  safetensors, tokenizer if the base has one) with the deltas folded in (+ ``merge_info.json``);
- per-task result (emr): ``out_dir/merge_info.json`` and one sub-directory per task
  ``out_dir/<index>_<task name>/`` in the chosen format.

**PEFT output of dense results.** A dense merged update (TIES, DARE, ...) is factorised by SVD
with, per module, the smallest rank whose relative Frobenius error ``||D - B A|| / ||D||`` is at
most ``max_error`` (default :data:`DEFAULT_MAX_ERROR`); ``merge_info.json`` records the rank and
the measured error of every module. The rank budget is the full rank ``min(m, n)`` (exact up to
float32 round-off), so the adapter can be larger than the dense update (a rank above
``m n / (m + n)``): that is warned and recorded (``svd_larger_than_dense``), and ``format="full"``
is then the smaller exact output. A bound that no rank up to the full rank meets (tighter than
float32 round-off) is refused, naming ``--format full``. ``svd_rank`` forces a rank: the error is
reported and checked only against an explicitly given ``max_error``.

**Non-LoRA tensors of the inputs** (:func:`~osrm_lora.adapters.extra_kind`):

- biases trained with PEFT ``bias="lora_only"``/``"all"`` are stored as full values ``b_t``; for
  a linear method (task_arithmetic: ``c_t = scaling * w_t``, cat: ``c_t = w_t``) they merge like
  the weight deltas, ``b = b0 + sum_t c_t (b_t - b0)`` with ``b0`` the base model's bias (read from
  the base model unless ``sum_t c_t = 1`` and every input has the bias); written under the inputs'
  names (PEFT output, ``bias`` set accordingly) or folded into the base (full output). Any other
  method refuses them (:func:`bias_coefficients`).
- heads (``modules_to_save`` copies, e.g. a SEQ_CLS classifier) cannot be merged into one unless
  they are identical: identical heads are kept in the PEFT adapter (``modules_to_save`` and the task
  type kept, so ``PeftModel.from_pretrained`` restores them); differing heads are written beside the
  merge as ``heads/<index>_<task>.safetensors`` (keys are module paths, e.g. ``classifier.weight``:
  ``model.load_state_dict(load_file(f), strict=False)`` installs one) and the adapter is written
  without heads, with ``modules_to_save=None`` and a head task type (SEQ_CLS, TOKEN_CLS,
  QUESTION_ANS) changed to ``FEATURE_EXTRACTION`` so it loads on the base model. A per-task (emr)
  PEFT output keeps each task's own head in that task's adapter. Full-model outputs always write
  the heads beside. ``merge_info.json["non_lora"]`` records what was done.
- tensors of LoRA variants this toolkit does not merge (DoRA, lora_bias are refused earlier;
  embedding LoRA factors) are not written; listed in ``non_lora.not_written`` and warned.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from osrm_lora.adapters import LoraAdapter, LoraModule, bias_module, write_adapter_files
from osrm_lora.backbone import is_default_model, resolve_model_path, resolve_module_key
from osrm_lora.errors import AdapterError, OsrmError
from osrm_lora.fsutil import atomic_dir, read_json, to_jsonable
from osrm_lora.merge import ops
from osrm_lora.merge.registry import MergeResult
from osrm_lora.model import keys

logger = logging.getLogger(__name__)

MERGE_INFO = "merge_info.json"
HEADS_DIR = "heads"
HEADS_KEPT = "kept in the adapter (identical in every input)"
HEADS_PER_TASK = "in each task's adapter"
HEADS_BESIDE = "beside"
DEFAULT_MAX_ERROR = 1e-3
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FULL_FIX = "write the exact dense merge with --format full (format='full' from Python)"


# ------------------------------------------------------------------------------------------------ rank choice


def tail_relative_errors(S: torch.Tensor) -> torch.Tensor:
    """``err[k]``: relative Frobenius error of the best rank-``k`` approximation, ``k = 0 .. len(S)``.

    ``err[k] = sqrt(sum_{i >= k} S_i^2 / sum_i S_i^2)`` in float64 (all zero for a zero matrix).
    """
    s2 = S.detach().double().cpu() ** 2
    total = s2.sum()
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]), torch.zeros(1, dtype=torch.float64)])
    if total == 0:
        return torch.zeros_like(tail)
    return torch.sqrt(tail.clamp(min=0) / total)


def smallest_rank(errors: torch.Tensor, max_error: float) -> int | None:
    """The smallest ``k >= 1`` with ``errors[k] <= max_error`` (``errors`` from :func:`tail_relative_errors`)."""
    ok = torch.nonzero(errors[1:] <= max_error).flatten()
    return int(ok[0]) + 1 if ok.numel() else None


def dense_rank_limit(m: int, n: int) -> int:
    """The largest rank at which a LoRA (``r (m + n)`` numbers) is no larger than the dense m x n matrix."""
    return (m * n) // (m + n)


def check_max_error(max_error: float | None) -> None:
    if max_error is None:
        return
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not math.isfinite(max_error) \
            or not 0 < max_error <= 1:
        raise OsrmError(f"max_error must be a number in (0, 1], got {max_error!r}; pass e.g. --max-error 1e-3")


def svd_factors(d: torch.Tensor, key: str, *, svd_rank: int | None = None,
                max_error: float | None = DEFAULT_MAX_ERROR) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, error)`` with ``B @ A ~ d`` (``B = U S``, ``A = V^T``, float32 on CPU).

    The rank is ``svd_rank`` (capped by ``min(m, n)``) or else the smallest one whose measured
    relative error is at most ``max_error``. OsrmError if the error exceeds ``max_error`` (when given).
    """
    d = d.detach().float()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    full = S.numel()
    if svd_rank is not None:
        k = max(1, min(int(svd_rank), full))
    else:
        assert max_error is not None
        k = smallest_rank(tail_relative_errors(S), max_error) or full
    while True:
        B, A = U[:, :k] * S[:k].unsqueeze(0), Vh[:k]
        err = ops.relative_error(d, B @ A)
        if svd_rank is not None or max_error is None or err <= max_error or k == full:
            break
        k = min(full, k + max(1, k // 8))  # float32 round-off: grow until the measured error meets the bound
    if max_error is not None and err > max_error:
        if svd_rank is not None:
            raise OsrmError(f"module {key} at --svd-rank {svd_rank} has relative error {err:.3g}, above --max-error "
                            f"{max_error:g}; raise --svd-rank, leave it out to choose the rank by the error, raise "
                            f"--max-error, or {FULL_FIX}")
        raise OsrmError(f"no rank up to the full rank {full} reproduces module {key} within relative error "
                        f"{max_error:g} (best {err:.3g}, float32 round-off); raise --max-error, or {FULL_FIX}")
    return B.contiguous().cpu(), A.contiguous().cpu(), err


def deltas_to_adapter(deltas: Mapping[str, torch.Tensor], config: dict[str, Any], *, svd_rank: int | None = None,
                      max_error: float | None = DEFAULT_MAX_ERROR,
                      name: str = "merged") -> tuple[LoraAdapter, dict[str, float]]:
    """SVD of each dense (out, in) delta into a LoRA with scaling 1 (:func:`svd_factors`).

    Returns the adapter and the measured relative Frobenius error per module.
    """
    mods, errors = {}, {}
    fifo = bool(config.get("fan_in_fan_out", False))
    for key, d in deltas.items():
        B, A, errors[key] = svd_factors(d, key, svd_rank=svd_rank, max_error=max_error)
        mods[key] = LoraModule(A, B, 1.0, fifo)
    return LoraAdapter(mods, copy.deepcopy(config), name=name), errors


def effective_max_error(svd_rank: int | None, max_error: float | None) -> float | None:
    """The bound the SVD output is held to: ``max_error``, default :data:`DEFAULT_MAX_ERROR` unless a rank is forced."""
    if max_error is not None:
        return float(max_error)
    return DEFAULT_MAX_ERROR if svd_rank is None else None


def peft_adapter_for(result: MergeResult, deltas: dict[str, torch.Tensor] | None, svd_rank: int | None,
                     max_error: float | None = None) -> tuple[LoraAdapter, dict[str, Any]]:
    """The PEFT adapter written for ``result`` and what to record about it in ``merge_info.json``.

    Factor-form results come back as they are (unless ``svd_rank``); dense ones (or ``deltas``, one
    task's deltas of a per-task result) are factorised by :func:`deltas_to_adapter` (rank by the
    error bound, see the module docstring).
    """
    config = result.config or {"peft_type": "LORA"}
    if result.adapter is not None and deltas is None and svd_rank is None:
        return result.adapter, {"output": "exact factors"}
    if deltas is None:
        deltas = result.deltas_for()
    bound = effective_max_error(svd_rank, max_error)
    adapter, errors = deltas_to_adapter(deltas, config, svd_rank=svd_rank, max_error=bound, name=result.method)
    larger = {k: m.rank for k, m in adapter.modules.items()
              if m.rank > dense_rank_limit(m.out_features, m.in_features)}
    return adapter, {"output": "truncated svd", "svd_rank": {k: m.rank for k, m in adapter.modules.items()},
                     "svd_relative_error": errors,
                     "svd_relative_error_max": max(errors.values()) if errors else 0.0,
                     "svd_max_error": bound, "svd_larger_than_dense": larger}


def finish_written(written: Mapping[str, Any]) -> dict[str, Any]:
    """The output fields of ``merge_info.json`` for one adapter (module maps sorted); warns when the
    SVD adapter is larger than the dense update."""
    out: dict[str, Any] = {"output": written.get("output", "exact factors")}
    if out["output"] == "exact factors":
        return out
    out["svd_rank"] = dict(sorted(written.get("svd_rank", {}).items()))
    errors = dict(sorted(written.get("svd_relative_error", {}).items()))
    out["svd_relative_error"] = errors
    out["svd_relative_error_max"] = max(errors.values()) if errors else 0.0
    out["svd_max_error"] = written.get("svd_max_error")
    larger = dict(sorted(written.get("svd_larger_than_dense", {}).items()))
    out["svd_larger_than_dense"] = larger
    if larger:
        key = next(iter(larger))
        logger.warning("%d of %d modules need an SVD rank above the size of the dense update (e.g. %s: rank %d); "
                       "the PEFT adapter is larger than the merged weights: --format full stores them exactly in "
                       "less space", len(larger), len(errors), key, larger[key])
    return out


# ------------------------------------------------------------------------------------------------ base model


def _header(path: Path, fix: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    if not path.exists():
        raise OsrmError(f"base model weights file {path} is missing; {fix}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several exception types for corrupt files
        raise OsrmError(f"{path} is corrupt or unreadable ({type(exc).__name__}: {exc}); {fix}") from exc


class BaseCheckpoint:
    """The safetensors weights of an HF model directory, read one tensor at a time.

    ``model.safetensors.index.json`` (sharded) or a single ``model.safetensors``; names and shapes
    come from the headers, tensors are loaded on demand with ``safetensors.safe_open``. Adapter
    module keys are mapped onto the checkpoint's names by :meth:`tensor_name`
    (:func:`osrm_lora.model.keys.param_name`, with the architecture's base prefix from
    ``config.json``): a bare checkpoint (``encoder.*``) serves adapters made on the task model
    (``bert.encoder.*``) and the other way round.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fix = "re-save the base model with save_pretrained(safe_serialization=True)"
        if (self.path / INDEX_NAME).exists():
            index = read_json(self.path / INDEX_NAME)
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise OsrmError(f"{self.path / INDEX_NAME} has no weight_map; {fix}")
            files = sorted({str(f) for f in wm.values()})
        elif (self.path / SINGLE_NAME).exists():
            wm, files = None, [SINGLE_NAME]
        else:
            raise OsrmError(f"base model {self.path} has no {SINGLE_NAME} or {INDEX_NAME}; {fix}")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            fpath = self.path / fname
            for name, shape in _header(fpath, fix).items():
                if wm is None or wm.get(name) == fname:
                    self.files[name], self.shapes[name] = fpath, shape
        if wm is not None:
            missing = sorted(set(wm) - set(self.files))
            if missing:
                raise OsrmError(f"{self.path / INDEX_NAME} lists {missing[0]} in {wm[missing[0]]} but that file has no "
                                f"such tensor; {fix}")
        config = {}
        if (self.path / "config.json").exists():
            with_cfg = read_json(self.path / "config.json")
            config = with_cfg if isinstance(with_cfg, dict) else {}
        self.prefix = keys.architecture_prefix(config)

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def tensor_name(self, key: str, param: str = "weight") -> str | None:
        """The checkpoint's name of parameter ``param`` of adapter module ``key`` (None if absent)."""
        return keys.param_name(key, self.shapes, self.prefix, param)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as fh:
            tensor: torch.Tensor = fh.get_tensor(name)
            return tensor

    def aux_files(self, skip: Sequence[str] = ()) -> list[Path]:
        """Top-level files other than weights (config, generation config, tokenizer, ...)."""
        weights = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
        not_copied = {INDEX_NAME, "pytorch_model.bin.index.json", "README.md", MERGE_INFO, *skip}
        return [p for p in sorted(self.path.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name not in not_copied
                and not p.name.endswith(weights)]


def resolve_base_model(path_or_id: str) -> Path:
    """A local model directory for ``path_or_id`` (the embedded default model's aliases, a directory,
    or a Hub id already in the local cache or downloadable: config, tokenizer and safetensors files only)."""
    if is_default_model(path_or_id):
        return Path(resolve_model_path(path_or_id))
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise OsrmError(f"base model {path_or_id} is a file; pass the HF model directory with --base-model")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                   "*.jinja", "tokenizer*"])
    except Exception as exc:
        raise OsrmError(f"base model {path_or_id!r} is not a local directory and cannot be fetched "
                        f"({type(exc).__name__}); pass --base-model (base_model_path= from Python) pointing to an HF "
                        "model directory") from exc
    return Path(local)


# ------------------------------------------------------------------------------------------------ non-LoRA tensors


class _HasExtra(Protocol):
    name: str
    config: dict[str, Any]

    def extra_names(self, kind: str) -> list[str]: ...


def bias_coefficients(method: str, params: Mapping[str, Any], n: int) -> list[float] | None:
    """``c_t`` with merged bias ``b0 + sum_t c_t (b_t - b0)`` for the methods that are linear in the task
    updates (task_arithmetic: ``scaling * w_t``; cat: ``w_t``); None for any other method."""
    w = [1.0] * n if params.get("weights") is None else [float(x) for x in params["weights"]]
    if method == "task_arithmetic":
        return [float(params.get("scaling", 1.0)) * x for x in w]
    if method == "cat":
        return w
    return None


def check_bias_merge(inputs: Sequence[_HasExtra], method: str, params: Mapping[str, Any]) -> list[float] | None:
    """The bias coefficients if any input trains biases (None if none); AdapterError if ``method`` cannot merge them."""
    trained = [a for a in inputs if a.extra_names("bias")]
    if not trained:
        return None
    coeffs = bias_coefficients(method, params, len(inputs))
    if coeffs is None:
        a = trained[0]
        raise AdapterError(f"{a.name or 'adapter'} trains biases (bias={a.config.get('bias')!r}, e.g. "
                           f"{a.extra_names('bias')[0]}) that merge method {method} cannot merge; merge with "
                           "task_arithmetic or cat (biases combine linearly like the weight deltas), or train the "
                           "adapters with bias='none'")
    return coeffs


def merged_bias(base: torch.Tensor | None, trained: Sequence[torch.Tensor | None], coeffs: Sequence[float],
                name: str = "bias") -> torch.Tensor:
    """``b0 + sum_t c_t (b_t - b0)`` in float64 (an input without the bias has ``b_t = b0``); the inputs' dtype.

    ``base`` may be None only when every input has the bias and ``sum_t c_t == 1``.
    """
    present = [b for b in trained if b is not None]
    dtype = present[0].dtype if present else (base.dtype if base is not None else torch.float32)
    if base is None:
        if len(present) != len(trained) or not math.isclose(sum(coeffs), 1.0, rel_tol=0.0, abs_tol=1e-12):
            raise OsrmError(f"merging the trained bias {name} needs the base model's bias; pass --base-model "
                            "(base_model_path= from Python)")
        out = sum(c * b.double() for c, b in zip(coeffs, present))
        assert isinstance(out, torch.Tensor)
        return out.to(dtype)
    b0 = base.detach().double().cpu()
    out = b0.clone()
    for b, c in zip(trained, coeffs):
        if b is not None:
            if tuple(b.shape) != tuple(b0.shape):
                raise OsrmError(f"trained bias {name} has shape {tuple(b.shape)} but the base model's is "
                                f"{tuple(b0.shape)}; use the base model the adapters were trained on")
            out += c * (b.detach().double().cpu() - b0)
    return out.to(dtype)


def needs_base_bias(names: Sequence[str], extras: Sequence[Mapping[str, Any]], coeffs: Sequence[float]) -> bool:
    """Whether :func:`merged_bias` needs the base model's biases for the bias tensors ``names``."""
    if not names:
        return False
    every = all(n in e for n in names for e in extras)
    return not (every and math.isclose(sum(coeffs), 1.0, rel_tol=0.0, abs_tol=1e-12))


def merge_biases(names: Sequence[str], extras: Sequence[Mapping[str, torch.Tensor]], coeffs: Sequence[float],
                 base_bias: Callable[[str], torch.Tensor | None] | None) -> dict[str, torch.Tensor]:
    """Merged value of every trained bias tensor ``names`` (adapter names); ``base_bias(module key)`` gives ``b0``."""
    use_base = needs_base_bias(names, extras, coeffs)
    if use_base and base_bias is None:
        raise OsrmError(f"merging the trained biases (e.g. {names[0]}) needs the base model's biases; pass "
                        "--base-model (base_model_path= from Python)")
    out = {}
    for n in names:
        base = base_bias(bias_module(n)) if use_base and base_bias is not None else None
        if use_base and base is None:
            raise OsrmError(f"the base model has no bias for {bias_module(n)} but the adapters train one; use the "
                            "base model the adapters were trained on")
        out[n] = merged_bias(base, [e.get(n) for e in extras], coeffs, n)
    return out


def checkpoint_bias(ckpt: BaseCheckpoint) -> Callable[[str], torch.Tensor | None]:
    """``module key -> base bias`` read from a checkpoint (keys resolved as for the weights)."""
    def get(key: str) -> torch.Tensor | None:
        name = ckpt.tensor_name(key, "bias")
        return None if name is None else ckpt.get(name)

    return get


def union_names(inputs: Sequence[_HasExtra], kind: str) -> list[str]:
    return sorted({n for a in inputs for n in a.extra_names(kind)})


@dataclass
class NonLora:
    """The inputs' non-LoRA tensors as the output holds them (see the module docstring)."""

    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter tensor name -> merged value
    coefficients: list[float] | None = None
    heads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per input: its head tensors
    modules_to_save: Any = None  # the first input's modules_to_save
    not_written: list[str] = field(default_factory=list)

    @property
    def heads_shared(self) -> bool:
        """Every input has the same head tensors (names and values)."""
        if not self.heads or not self.heads[0]:
            return False
        ref = self.heads[0]
        return all(set(h) == set(ref) and all(torch.equal(h[k], ref[k]) for k in ref) for h in self.heads[1:])

    @property
    def has_heads(self) -> bool:
        return any(self.heads)


def non_lora_from(inputs: Sequence[_HasExtra], extras: Sequence[Mapping[str, torch.Tensor]], method: str,
                  params: Mapping[str, Any], base_bias: Callable[[str], torch.Tensor | None] | None) -> NonLora:
    """Merge the biases and collect the heads of ``inputs`` (``extras[t]``: input ``t``'s loaded tensors;
    heads not loaded there are left out)."""
    coeffs = check_bias_merge(inputs, method, params)
    names = union_names(inputs, "bias")
    biases = merge_biases(names, extras, coeffs, base_bias) if coeffs is not None else {}
    heads = [{n: e[n] for n in a.extra_names("head") if n in e} for a, e in zip(inputs, extras)]
    other = union_names(inputs, "other")
    if other:
        logger.warning("not written: %d non-LoRA tensors of LoRA variants that cannot be merged (e.g. %s)",
                       len(other), other[0])
    mts = inputs[0].config.get("modules_to_save") if inputs else None
    return NonLora(biases, coeffs, heads, copy.deepcopy(mts), other)


def with_non_lora(adapter: LoraAdapter, non_lora: NonLora, heads: Mapping[str, torch.Tensor] | None) -> LoraAdapter:
    """``adapter`` with the merged biases and ``heads`` (kept heads or one task's) as its extra tensors; the
    config is made to match (:func:`osrm_lora.adapters.consistent_extra_config` on writing)."""
    config = copy.deepcopy(adapter.config)
    if heads:
        config["modules_to_save"] = copy.deepcopy(non_lora.modules_to_save)
    return LoraAdapter(adapter.modules, config, adapter.name, {**non_lora.biases, **dict(heads or {})})


def write_heads_beside(target: Path, task_dirs: Sequence[str], non_lora: NonLora) -> dict[str, str]:
    """Write each task's head as ``heads/<task dir>.safetensors`` under ``target``; task -> relative path."""
    from safetensors.torch import save_file

    out = {}
    for tdir, head in zip(task_dirs, non_lora.heads):
        if head:
            (target / HEADS_DIR).mkdir(parents=True, exist_ok=True)
            rel = f"{HEADS_DIR}/{tdir}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(target / rel),
                      metadata={"format": "pt"})
            out[tdir] = rel
    return out


def non_lora_meta(non_lora: NonLora, heads_written: str, head_files: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``merge_info.json["non_lora"]``: what happened to the biases, heads and other tensors."""
    meta: dict[str, Any] = {}
    if non_lora.biases:
        meta["biases"] = {"merged": sorted(non_lora.biases), "coefficients": non_lora.coefficients,
                          "rule": "b0 + sum_t c_t (b_t - b0)"}
    if non_lora.has_heads:
        meta["heads"] = {"written": heads_written, "files": dict(head_files or {}),
                         "modules_to_save": non_lora.modules_to_save}
    if non_lora.not_written:
        meta["not_written"] = non_lora.not_written
    return meta


def finish_non_lora(target: Path, task_dirs: Sequence[str], non_lora: NonLora, written: str) -> dict[str, Any]:
    """Write the heads beside the output if ``written`` says so; the ``merge_info.json["non_lora"]`` entry."""
    files: dict[str, str] = {}
    if written == HEADS_BESIDE and non_lora.has_heads:
        files = write_heads_beside(target, task_dirs, non_lora)
        logger.info("the inputs' task heads cannot be merged into one: written per task as %s/*.safetensors (keys "
                    "are module paths; model.load_state_dict(load_file(f), strict=False) installs one)", HEADS_DIR)
    return non_lora_meta(non_lora, written, files)


# ------------------------------------------------------------------------------------------------ writers


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def _write_peft(result: MergeResult, deltas: dict[str, torch.Tensor] | None, target: Path, svd_rank: int | None,
                max_error: float | None, info: dict[str, Any], non_lora: NonLora,
                heads: Mapping[str, torch.Tensor] | None) -> None:
    adapter, written = peft_adapter_for(result, deltas, svd_rank, max_error)
    write_adapter_files(with_non_lora(adapter, non_lora, heads), target)
    fields = finish_written(written)
    info.update(fields)
    if "svd_relative_error" in fields:
        result.info.setdefault("svd_relative_error", {}).update(fields["svd_relative_error"])


def _load_base(base_model_path: str) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(base_model_path)
    except (OSError, ValueError) as exc:
        raise OsrmError(f"cannot load the base model config from {base_model_path!r} ({exc}); "
                        "pass --base-model (base_model_path= from Python) pointing to an HF model directory") from exc
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


def _base_module(model: torch.nn.Module, key: str) -> torch.nn.Module:
    try:
        return model.get_submodule(resolve_module_key(model, key))
    except OsrmError as exc:
        raise OsrmError(f"base model has no module {key}; use the base model the adapters were trained on") from exc


def set_biases(model: torch.nn.Module, biases: Mapping[str, torch.Tensor]) -> None:
    """Set the merged biases (adapter tensor name -> value) into ``model`` in place."""
    for name, value in biases.items():
        key = bias_module(name)
        bias = getattr(_base_module(model, key), "bias", None)
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != tuple(value.shape):
            raise OsrmError(f"base model module {key} has no bias of shape {tuple(value.shape)}; use the base model the "
                            "adapters were trained on")
        with torch.no_grad():
            bias.copy_(value.to(device=bias.device, dtype=bias.dtype))


def model_bias(model: torch.nn.Module) -> Callable[[str], torch.Tensor | None]:
    """``module key -> base bias`` of a loaded model."""
    def get(key: str) -> torch.Tensor | None:
        bias = getattr(_base_module(model, key), "bias", None)
        return bias.detach().clone() if isinstance(bias, torch.Tensor) else None

    return get


def _write_full(result: MergeResult, deltas: dict[str, torch.Tensor], target: Path, base_model_path: str,
                info: dict[str, Any], biases: Mapping[str, torch.Tensor]) -> None:
    model, tok = _load_base(str(resolve_base_model(base_model_path)))
    keys.fold_deltas(dict(model.named_parameters(remove_duplicate=False)), deltas, prefix=keys.model_prefix(model),
                     fan_in_fan_out=bool((result.config or {}).get("fan_in_fan_out", False)))
    set_biases(model, biases)
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
                         inputs: list[str] | None, scores: dict[str, Any] | None, format: str,
                         svd_rank: int | None = None, max_error: float | None = None) -> None:
    """Write ``merge_info.json`` (``meta`` + ``result.info``) and the ``README.md`` card into ``target``."""
    from osrm_lora.cards import merge_card
    from osrm_lora.merge.registry import get_method

    meta["info"] = result.info
    (target / MERGE_INFO).write_text(json.dumps(to_jsonable(meta, strict=False), indent=2) + "\n", encoding="utf-8")
    info = get_method(result.method)
    card = merge_card(method=result.method, params=result.params,
                      base_model=base_model_path or (result.config or {}).get("base_model_name_or_path"),
                      inputs=inputs or [], task_names=result.task_names, paper=info.paper,
                      scores=scores, info=result.info, output_format=format, svd_rank=svd_rank,
                      max_error=max_error, stream="stream" in meta, seed=result.info.get("context_seed"),
                      needs=sorted(info.needs))
    (target / "README.md").write_text(card, encoding="utf-8")


def check_output_options(format: str, svd_rank: int | None, base_model_path: str | None,
                         config: dict[str, Any] | None, max_error: float | None = None) -> str | None:
    """Validate the output options; returns the base model path (default the adapters')."""
    if format not in ("peft", "full"):
        raise OsrmError(f"unknown output format {format!r}; use peft or full")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise OsrmError(f"svd_rank must be an integer >= 1, got {svd_rank!r}; pass e.g. --svd-rank 16")
    check_max_error(max_error)
    if format == "full" and (svd_rank is not None or max_error is not None):
        option = "--svd-rank" if svd_rank is not None else "--max-error"
        raise OsrmError(f"{option} applies to the PEFT output only; --format full folds the exact merge into the "
                        f"base weights: drop {option} or use --format peft")
    base_model_path = base_model_path or (config or {}).get("base_model_name_or_path")
    if format == "full" and not base_model_path:
        raise OsrmError("format=full needs the base model; pass --base-model (base_model_path= from Python)")
    return base_model_path


def _base_bias_source(result: MergeResult, format: str,
                      base_model_path: str | None) -> Callable[[str], torch.Tensor | None] | None:
    """``module key -> base bias``, opened on first use, when some input trains biases and a base is known:
    from the base checkpoint (PEFT output) or the loaded base model (full output, any weight format)."""
    if not base_model_path or not union_names(result.inputs, "bias"):
        return None
    opened: list[Callable[[str], torch.Tensor | None]] = []

    def get(key: str) -> torch.Tensor | None:
        if not opened:
            local = resolve_base_model(str(base_model_path))
            opened.append(checkpoint_bias(BaseCheckpoint(local)) if format == "peft"
                          else model_bias(_load_base(str(local))[0]))
        return opened[0](key)

    return get


def save_merge_result(result: MergeResult, out_dir: str | Path, *, base_model_path: str | None = None,
                      format: str = "peft", svd_rank: int | None = None, max_error: float | None = None,
                      inputs: list[str] | None = None, scores: dict[str, Any] | None = None) -> Path:
    """Write ``result`` to ``out_dir`` atomically (see the module docstring for layout and guarantees).

    ``format="peft"``: factor-form results are written exactly (or re-truncated to ``svd_rank`` if
    given); dense results are factorised by SVD with, per module, the smallest rank whose relative
    error is at most ``max_error`` (default :data:`DEFAULT_MAX_ERROR`), or with rank ``svd_rank``
    (its error then checked only against an explicit ``max_error``); the errors go to
    ``result.info["svd_relative_error"]`` and ``merge_info.json``, and a bound no rank meets is
    refused. ``format="full"``: the base model (``base_model_path``, default the adapters'
    ``base_model_name_or_path``) with the deltas folded in. Trained biases are merged (linear
    methods) or refused; task heads are kept or written beside (module docstring).
    """
    base_model_path = check_output_options(format, svd_rank, base_model_path, result.config, max_error)
    out_dir = Path(out_dir)
    meta = base_meta(result, format)
    non_lora = non_lora_from(result.inputs, [a.extra for a in result.inputs], result.method, result.params,
                             _base_bias_source(result, format, base_model_path))
    with atomic_dir(out_dir) as tmp:
        if result.per_task_deltas is not None:
            meta["per_task"] = []
            for t, deltas in enumerate(result.per_task_deltas):
                sub = tmp / task_dir_name(result, t)
                tinfo: dict[str, Any] = {"task": task_name(result, t), "dir": sub.name}
                if format == "peft":
                    own = non_lora.heads[t] if t < len(non_lora.heads) else None
                    _write_peft(result, deltas, sub, svd_rank, max_error, tinfo, non_lora, own)
                else:
                    _write_full(result, deltas, sub, str(base_model_path), tinfo, non_lora.biases)
                meta["per_task"].append(tinfo)
            heads_written = HEADS_PER_TASK if format == "peft" else HEADS_BESIDE
        elif format == "peft":
            shared = non_lora.heads[0] if non_lora.heads_shared else None
            _write_peft(result, None, tmp, svd_rank, max_error, meta, non_lora, shared)
            heads_written = HEADS_KEPT if shared else HEADS_BESIDE
        else:
            _write_full(result, result.deltas_for(), tmp, str(base_model_path), meta, non_lora.biases)
            heads_written = HEADS_BESIDE
        extra_meta = finish_non_lora(tmp, [task_dir_name(result, t) for t in range(len(non_lora.heads))], non_lora,
                                     heads_written)
        if extra_meta:
            meta["non_lora"] = extra_meta
        result.info.pop("dropped_extra", None)  # what was not written, now that biases and heads are handled
        if non_lora.not_written:
            result.info["dropped_extra"] = list(non_lora.not_written)
        write_merge_metadata(tmp, result, meta, base_model_path=base_model_path, inputs=inputs, scores=scores,
                             format=format, svd_rank=svd_rank, max_error=max_error)
    logger.debug("wrote %s result to %s", result.method, out_dir)
    return out_dir
