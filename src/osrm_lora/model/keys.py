"""THE module-key rules: which modules LoRA targets, how a module key is found in a model or a
checkpoint, how PEFT names map onto module keys, and how a dense update is folded into a weight.

A **module key** is the dotted path of an adapted module in the un-wrapped model, e.g.
``bert.encoder.layer.0.attention.self.query``. The same module is spelled differently in different
places, and every module of the package resolves those spellings through this one:

- **PEFT names** wrap it: ``base_model.model.<key>.lora_A.weight`` in an adapter file,
  ``base_model.model.<key>.lora_A.default.weight`` as a parameter of a live ``PeftModel``
  (:func:`lora_module_key`, :func:`strip_peft_prefix`, :func:`lora_factor_name`).
- **The base prefix** (the architecture's ``base_model_prefix``, ``bert``, ``roberta``, ``model``)
  is there on a task model (``BertForSequenceClassification``: ``bert.encoder...``) and absent on
  the bare model and its checkpoints (``BertModel``, the embedded all-MiniLM-L6-v2:
  ``encoder...``). :func:`key_candidates` / :func:`match_key` accept either spelling.
- **Target names** (``query``, ``output.dense``) select modules by PEFT's rule: a module whose
  dotted name equals the target or ends with ``"." + target`` (:func:`matches_target`); one string
  is a regular expression that must match the whole name, as in PEFT.
- **Folding** ``W += delta`` (``delta`` always (out, in)) transposes the update for weights stored
  (in, out) (PEFT's ``fan_in_fan_out``, GPT-2 ``Conv1D``); :func:`fold_deltas` resolves the keys
  against a state dict (with or without the base prefix) and checks every shape and value before it
  changes anything.

Pure functions on names, shapes and tensors: nothing here loads a model or a file.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from osrm_lora.errors import ConfigError, OsrmError

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module key in its parameter and state-dict names."""
LORA_FACTORS = ("lora_A", "lora_B")
_FACTOR_SPLIT = re.compile(r"\.lora_[AB]\.")

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# target-module matching (PEFT's rule)
# --------------------------------------------------------------------------------------------------


def matches_target(name: str, targets: str | Iterable[str]) -> bool:
    """Whether module ``name`` is a LoRA target, by PEFT's rule (``check_target_module_exists``).

    A list of names matches a module whose dotted name equals one of them or ends with
    ``"." + name`` (``output.dense`` matches ``...attention.output.dense`` and ``...output.dense``,
    not ``...intermediate.dense``); one string is a regular expression matched against the whole
    name (``re.fullmatch``).
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(names: Iterable[str], targets: str | Iterable[str]) -> list[str]:
    """The entries of ``names`` (in their order) that :func:`matches_target` selects."""
    wanted: str | list[str] = targets if isinstance(targets, str) else [str(t) for t in targets]
    return [n for n in names if matches_target(n, wanted)]


def linear_targets(model: nn.Module, targets: str | Sequence[str]) -> dict[str, nn.Linear]:
    """``{module path: module}`` of the ``nn.Linear`` modules of ``model`` that ``targets`` select
    (:func:`matches_target`), in ``named_modules`` order; ConfigError when nothing is selected."""
    if not targets:
        raise ConfigError("no target modules given; pass LoRA target modules such as ['query', 'value']")
    linear = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    found = {name: linear[name] for name in select_targets(linear, targets)}
    if not found:
        shown = targets if isinstance(targets, str) else sorted(str(t) for t in targets)
        raise ConfigError(
            f"no linear module named {shown} in {type(model).__name__}; "
            "choose target modules that exist (see model.named_modules())"
        )
    return found


def in_modules(name: str, modules: Iterable[str]) -> bool:
    """Whether module ``name`` or one of its parents is selected by ``modules`` (PEFT's rule for
    ``modules_to_save``: ``classifier`` covers ``classifier.dense`` and ``bert.pooler`` covers
    ``bert.pooler.dense``)."""
    wanted = [str(m) for m in modules]
    parts = name.split(".")
    return any(matches_target(".".join(parts[:i]), wanted) for i in range(1, len(parts) + 1))


# --------------------------------------------------------------------------------------------------
# base-prefix resolution
# --------------------------------------------------------------------------------------------------


def key_candidates(key: str, names: Collection[str], prefix: str = "") -> list[str]:
    """The entries of ``names`` (module paths) that module ``key`` may denote, best rule first.

    1. ``key`` itself;
    2. with ``prefix`` (the architecture's base prefix, e.g. ``bert``) added, or removed;
    3. otherwise every entry that differs from ``key`` only by leading dotted components (an
       entry ending with ``"." + key``, or ``key`` ending with ``"." + entry``): the base prefix of
       an unknown architecture, or a wrapper such as ``base_model.model.``.

    The key denotes an entry when exactly one is returned (:func:`match_key`).
    """
    if key in names:
        return [key]
    if prefix:
        if f"{prefix}.{key}" in names:
            return [f"{prefix}.{key}"]
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
            return [key[len(prefix) + 1:]]
    return [n for n in names if n.endswith("." + key) or key.endswith("." + n)]


def match_key(key: str, names: Collection[str], prefix: str = "") -> str | None:
    """The one entry of ``names`` that module ``key`` denotes (:func:`key_candidates`), or None when
    there is none or more than one."""
    found = key_candidates(key, names, prefix)
    return found[0] if len(found) == 1 else None


def model_prefix(model: nn.Module) -> str:
    """The base prefix (``base_model_prefix``) of a transformers model; "" for other modules."""
    return str(getattr(model, "base_model_prefix", "") or "")


def architecture_prefix(config: Mapping[str, Any]) -> str:
    """``base_model_prefix`` of the architecture of an HF ``config.json`` (e.g. ``bert``); "" if unknown."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return ""
    try:
        from transformers import CONFIG_MAPPING, MODEL_MAPPING  # heavy: only when a config is read

        return str(getattr(MODEL_MAPPING[CONFIG_MAPPING[model_type]], "base_model_prefix", "") or "")
    except (KeyError, ValueError, ImportError):  # an architecture transformers does not know
        return ""


def param_of(path: str, param: str = "weight") -> str:
    """The state-dict name of parameter ``param`` of the module at ``path`` (``""`` = the root module)."""
    return f"{path}.{param}" if path else param


def module_paths(names: Iterable[str], param: str = "weight") -> set[str]:
    """Module paths of the state-dict ``names`` that hold a parameter ``param`` (``a.b.weight`` -> ``a.b``)."""
    return {"" if n == param else n[: -len(param) - 1] for n in names if n == param or n.endswith("." + param)}


def param_name(key: str, names: Iterable[str], prefix: str = "", param: str = "weight") -> str | None:
    """The state-dict name of parameter ``param`` of module ``key`` among ``names`` (resolved by
    :func:`match_key`), or None."""
    path = match_key(key, module_paths(names, param), prefix)
    return None if path is None else param_of(path, param)


# --------------------------------------------------------------------------------------------------
# PEFT names
# --------------------------------------------------------------------------------------------------


def strip_peft_prefix(name: str) -> str:
    """``base_model.model.<rest>`` -> ``<rest>`` (other names unchanged)."""
    return name.removeprefix(PEFT_PREFIX)


def peft_name(key: str) -> str:
    """The PEFT spelling of a module key or tensor name: ``base_model.model.<key>``."""
    return PEFT_PREFIX + key


def lora_factor_name(module: str, factor: str, adapter: str | None = None) -> str:
    """The name of a LoRA factor weight: ``<module>.lora_A.weight`` as saved in an adapter file,
    ``<module>.lora_A.<adapter>.weight`` as a parameter of a live ``PeftModel``."""
    if factor not in LORA_FACTORS:
        raise ValueError(f"unknown LoRA factor {factor!r}; expected one of {LORA_FACTORS}")
    return f"{module}.{factor}.{adapter}.weight" if adapter else f"{module}.{factor}.weight"


def is_lora_tensor(name: str) -> bool:
    """Whether ``name`` is a tensor of a LoRA layer (a component ``lora_*``: the factors, DoRA's
    ``lora_magnitude_vector``, embedding factors) rather than a base or head parameter."""
    return any(part.startswith("lora_") for part in name.split("."))


def lora_factor(name: str) -> str | None:
    """``"lora_A"`` / ``"lora_B"`` when ``name`` is (a parameter of) that LoRA factor, else None."""
    for factor in LORA_FACTORS:
        if f".{factor}." in name:
            return factor
    return None


def lora_module_key(name: str) -> str:
    """The module key of a LoRA factor name, saved or live:
    ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight`` ->
    ``bert.encoder.layer.0.attention.self.query``."""
    return strip_peft_prefix(_FACTOR_SPLIT.split(name)[0])


def split_lora_factor(name: str) -> tuple[str, str] | None:
    """``<module>.lora_A.weight`` -> ``(<module>, "lora_A")`` for a saved factor name (PEFT prefix
    already stripped); None for any other tensor name."""
    for factor in LORA_FACTORS:
        suffix = f".{factor}.weight"
        if name.endswith(suffix):
            return name[: -len(suffix)], factor
    return None


def lora_pairs(A: Mapping[str, T], B: Mapping[str, T]) -> list[tuple[str, T, T]]:
    """``(module key, A, B)`` for each ``lora_A`` entry of ``A`` (in its order) with its ``lora_B``
    partner in ``B``; both keyed by PEFT factor name."""
    return [(lora_module_key(name), a, B[name.replace(".lora_A.", ".lora_B.")]) for name, a in A.items()]


# --------------------------------------------------------------------------------------------------
# folding dense updates into weights
# --------------------------------------------------------------------------------------------------


def is_transposed_module(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` modules, whose weight is stored (in, out) (PEFT's fan_in_fan_out)."""
    return type(module).__name__ == "Conv1D"


def transposed_modules(model: nn.Module) -> set[str]:
    """Paths of the modules of ``model`` whose weight is stored (in, out) (:func:`is_transposed_module`)."""
    return {name for name, mod in model.named_modules() if is_transposed_module(mod)}


def oriented(delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """An (out, in) ``delta`` in the layout of its weight: transposed when that is stored (in, out)."""
    return delta.T if fan_in_fan_out else delta


def check_weight_shape(key: str, weight_shape: Sequence[int], delta_shape: Sequence[int],
                       fan_in_fan_out: bool = False) -> None:
    """OsrmError unless an (out, in) delta of ``delta_shape`` fits the weight of module ``key``."""
    want = tuple(reversed(tuple(delta_shape))) if fan_in_fan_out else tuple(delta_shape)
    if tuple(weight_shape) != want:
        raise OsrmError(f"module {key} has weight shape {tuple(weight_shape)} but the delta is {want}; "
                        "use the base model the adapters were trained on")


def fold_delta(weight: torch.Tensor, delta: torch.Tensor, key: str, fan_in_fan_out: bool = False) -> None:
    """``weight += delta`` in place, no grad (``delta`` is (out, in); transposed for an (in, out) weight)."""
    check_weight_shape(key, tuple(weight.shape), tuple(delta.shape), fan_in_fan_out)
    with torch.no_grad():
        weight.add_(oriented(delta, fan_in_fan_out).to(weight.device, weight.dtype))


@dataclass(frozen=True)
class Fold:
    """Where the update of adapter module ``key`` goes: the module path ``module`` and its weight's
    state-dict name ``name``, stored (in, out) when ``fan_in_fan_out``."""

    key: str
    module: str
    name: str
    fan_in_fan_out: bool


def plan_folds(shapes: Mapping[str, Sequence[int]], deltas: Mapping[str, torch.Tensor], *, prefix: str = "",
               fan_in_fan_out: bool | Collection[str] = False, where: str = "the base model") -> list[Fold]:
    """Resolve and check every update before anything is changed.

    ``shapes``: state-dict name -> shape (a model's parameters or a checkpoint's header); the keys of
    ``deltas`` are resolved against its module paths with :func:`match_key` (``prefix`` = the base
    prefix). ``fan_in_fan_out``: one flag for every module (the adapter config's), or the module paths
    whose weight is stored (in, out) (:func:`transposed_modules`). OsrmError, naming ``where``, for a
    module that is not there, a shape that does not fit or a non-finite update.
    """
    paths = module_paths(shapes)
    plan = []
    for key, delta in deltas.items():
        found = key_candidates(key, paths, prefix)
        if len(found) != 1:
            why = "matches several modules of" if found else "does not exist in"
            raise OsrmError(f"adapter module {key!r} {why} {where}; the adapter was made for another base model: "
                            "use the base model it was trained on")
        path = found[0]
        fifo = fan_in_fan_out if isinstance(fan_in_fan_out, bool) else path in fan_in_fan_out
        name = param_of(path)
        check_weight_shape(key, tuple(shapes[name]), tuple(delta.shape), fifo)
        if not torch.isfinite(delta).all():
            raise OsrmError(f"update for {key} contains NaN or Inf; check the input adapters")
        plan.append(Fold(key, path, name, fifo))
    return plan


def apply_folds(state: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor], plan: Iterable[Fold]) -> None:
    """Add each planned update (:func:`plan_folds`) to its tensor of ``state`` in place (no grad)."""
    with torch.no_grad():
        for fold in plan:
            weight = state[fold.name]
            weight.add_(oriented(deltas[fold.key], fold.fan_in_fan_out).to(weight.device, weight.dtype))


def fold_deltas(state: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor], *, prefix: str = "",
                fan_in_fan_out: bool | Collection[str] = False, where: str = "the base model") -> list[Fold]:
    """``W += delta`` for every (out, in) update of ``deltas`` (module key -> delta), into the tensors
    of ``state`` in place: a state dict, or ``dict(model.named_parameters())``. Keys are resolved with
    or without the base prefix, (in, out) weights get the transposed update, and everything is checked
    first (:func:`plan_folds`); returns the plan."""
    plan = plan_folds({n: tuple(t.shape) for n, t in state.items()}, deltas, prefix=prefix,
                      fan_in_fan_out=fan_in_fan_out, where=where)
    apply_folds(state, deltas, plan)
    return plan

