"""LoRA adapters in memory: PEFT adapter directories in and out, dense deltas on demand.

A :class:`LoraAdapter` holds the factors ``A`` (r x n) and ``B`` (m x r) of every adapted Linear
module plus its scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA, honouring
``rank_pattern`` / ``alpha_pattern``). Module keys are the module paths of the PEFT state dict with
the ``base_model.model.`` prefix and the ``.lora_A.weight`` suffix removed, e.g.
``bert.encoder.layer.0.attention.self.query``.

Non-LoRA tensors found in the file are kept verbatim in ``LoraAdapter.extra`` (keys without the
``base_model.model.`` prefix) and written back by :func:`save_adapter`. :func:`extra_kind` sorts
them: ``"bias"`` (biases trained with PEFT's ``bias="lora_only"``/``"all"``, saved as full values,
e.g. ``<module>.base_layer.bias``), ``"head"`` (``modules_to_save`` copies such as a SEQ_CLS
classifier) and ``"other"`` (``lora_B.bias`` of ``lora_bias``, DoRA ``lora_magnitude_vector``,
embedding LoRA factors). The written ``adapter_config.json`` is made consistent with the tensors
written (:func:`adapter_config_for`).

:class:`AdapterReader` opens an adapter lazily: config and tensor shapes (safetensors header) up
front, the factors of chosen modules on demand (streamed merging of large models).

Orientation: ``LoraModule.delta()`` is always ``scaling * B @ A`` of shape (out, in). For
``fan_in_fan_out`` modules (GPT-2 ``Conv1D``) the stored weight is (in, out): use
:meth:`LoraModule.weight_delta` to get the delta in the weight's own layout.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from osrm_lora.errors import AdapterError
from osrm_lora.fsutil import atomic_dir
from osrm_lora.model.keys import (
    LORA_FACTORS,
    PEFT_PREFIX,
    in_modules,
    is_lora_tensor,
    lora_factor_name,
    peft_name,
    split_lora_factor,
    strip_peft_prefix,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = PEFT_PREFIX  # alias: the PEFT prefix is defined in osrm_lora.model.keys
_LORA_PEFT_TYPES = {"LORA"}
# PEFT task types that add the task head to modules_to_save implicitly (loading needs its weights)
HEAD_TASK_TYPES: dict[str, tuple[str, ...]] = {"SEQ_CLS": ("classifier", "score"),
                                               "TOKEN_CLS": ("classifier", "score"),
                                               "QUESTION_ANS": ("qa_outputs",)}
BACKBONE_TASK_TYPE = "FEATURE_EXTRACTION"
_BIAS_SUFFIXES = (".base_layer.bias", ".bias")


def saved_module_names(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The module names PEFT keeps whole copies of: ``modules_to_save`` plus the head of a head task type."""
    given = config.get("modules_to_save") or ()
    names = [given] if isinstance(given, str) else list(given)
    names += HEAD_TASK_TYPES.get(str(config.get("task_type") or "").upper(), ())
    return tuple(dict.fromkeys(str(n) for n in names))


def extra_kind(name: str, saved_modules: Sequence[str] = ()) -> str:
    """What the non-LoRA tensor ``name`` (prefix stripped) is: ``"bias"``, ``"head"`` or ``"other"``.

    ``"other"``: tensors of LoRA variants (``lora_B.bias``, DoRA magnitudes, embedding LoRA);
    ``"head"``: parameters of a module in ``saved_modules`` (:func:`saved_module_names`), or any other
    whole saved parameter; ``"bias"``: a ``.bias`` outside them (PEFT ``bias="lora_only"``/``"all"``).
    """
    if is_lora_tensor(name):
        return "other"
    if in_modules(name.rsplit(".", 1)[0], saved_modules):
        return "head"
    return "bias" if name.endswith(".bias") else "head"


def bias_module(name: str) -> str:
    """The module whose bias the tensor ``name`` is: ``<module>.base_layer.bias`` / ``<module>.bias`` -> ``<module>``."""
    for suffix in _BIAS_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise AdapterError(f"{name} is not a bias tensor; re-export the adapter")


@dataclass
class LoraModule:
    """One adapted Linear module: ``delta = scaling * B @ A``."""

    A: torch.Tensor  # (r, n) = PEFT lora_A.weight
    B: torch.Tensor  # (m, r) = PEFT lora_B.weight
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        """Dense update ``scaling * B @ A`` of shape (out_features, in_features), float32."""
        return float(self.scaling) * (self.B.float() @ self.A.float())

    def weight_delta(self) -> torch.Tensor:
        """The delta in the layout of the adapted module's ``weight`` (transposed for fan_in_fan_out)."""
        d = self.delta()
        return d.T.contiguous() if self.fan_in_fan_out else d

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraModule:
        return LoraModule(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype),
                          self.scaling, self.fan_in_fan_out)


@dataclass(frozen=True)
class ModuleShape:
    """Shape of one adapted module, known without loading its factors."""

    rank: int
    out_features: int
    in_features: int
    fan_in_fan_out: bool = False


class _AdapterFlags:
    """Properties read from the PEFT config and the names of the non-LoRA tensors (``extra``)."""

    config: dict[str, Any]
    extra: Mapping[str, Any]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def uses_dora(self) -> bool:
        return bool(self.config.get("use_dora")) or any(k.endswith("lora_magnitude_vector") for k in self.extra)

    @property
    def uses_lora_bias(self) -> bool:
        return bool(self.config.get("lora_bias")) or any(k.endswith(".lora_B.bias") for k in self.extra)

    @property
    def has_modules_to_save(self) -> bool:
        return bool(self.config.get("modules_to_save")) or bool(self.extra_names("head"))

    def extra_names(self, kind: str) -> list[str]:
        """The sorted names of the non-LoRA tensors of ``kind`` (see :func:`extra_kind`)."""
        saved = saved_module_names(self.config)
        return sorted(k for k in self.extra if extra_kind(k, saved) == kind)

    @property
    def trains_biases(self) -> bool:
        """Biases trained with PEFT ``bias="lora_only"``/``"all"`` are stored in the adapter."""
        return bool(self.extra_names("bias"))


@dataclass
class LoraAdapter(_AdapterFlags):
    """All LoRA modules of one adapter, its PEFT config and any non-LoRA tensors."""

    modules: dict[str, LoraModule]
    config: dict[str, Any]
    name: str = ""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def module_shapes(self) -> dict[str, ModuleShape]:
        return {k: ModuleShape(m.rank, m.out_features, m.in_features, m.fan_in_fan_out)
                for k, m in self.modules.items()}

    def deltas(self) -> dict[str, torch.Tensor]:
        """Dense deltas of every module (built one by one; memory m x n per module)."""
        return {k: m.delta() for k, m in self.modules.items()}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraAdapter:
        return LoraAdapter({k: m.to(device, dtype) for k, m in self.modules.items()}, copy.deepcopy(self.config),
                           self.name, {k: v.to(device=device) for k, v in self.extra.items()})


# ----------------------------------------------------------------------------------------------
# scaling from config


def _pattern_value(pattern: dict[str, Any] | None, key: str) -> Any | None:
    """PEFT's pattern lookup: a pattern key matches when the module path ends with it."""
    if not pattern:
        return None
    if key in pattern:
        return pattern[key]
    for pat, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({pat})$", key):
                return value
        except re.error:
            continue
    return None


def module_scaling(config: dict[str, Any], key: str, rank: int) -> float:
    """Scaling of module ``key`` from a PEFT LoRA config (rank_pattern/alpha_pattern/use_rslora)."""
    alpha = _pattern_value(config.get("alpha_pattern"), key)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


# ----------------------------------------------------------------------------------------------
# loading


def _corrupt(path: Path, exc: Exception) -> AdapterError:
    return AdapterError(f"{path} is corrupt or unreadable ({type(exc).__name__}: {exc}); re-export the adapter")


def _load_bin(binf: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(binf), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise AdapterError(
            f"{binf} cannot be loaded safely (weights_only=True failed: {type(exc).__name__}); "
            f"convert it to {SAFETENSORS_NAME}"
        ) from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterError(f"{binf} is not a flat tensor state dict; convert it to {SAFETENSORS_NAME}")
    return sd


def _no_weights(path: Path) -> AdapterError:
    return AdapterError(f"no {SAFETENSORS_NAME} in {path}; point to a PEFT adapter directory saved with "
                        "save_pretrained")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    st = path / SAFETENSORS_NAME
    if st.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu")
        except Exception as exc:  # safetensors raises several exception types for corrupt files
            raise _corrupt(st, exc) from exc
    binf = path / BIN_NAME
    if binf.exists():
        return _load_bin(binf)
    raise _no_weights(path)


def _check_peft_type(config: dict[str, Any], source: str | Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in _LORA_PEFT_TYPES:
        raise AdapterError(f"{source} has peft_type={peft_type}, not LORA; only LoRA adapters can be loaded")


def _lora_layout(shapes: Mapping[str, Sequence[int]], config: dict[str, Any], source: str) -> dict[str, ModuleShape]:
    """Validate the LoRA layout from tensor names (prefix stripped) and shapes alone: lora_A/lora_B
    pairs, 2-D factors, equal ranks. Returns the modules' shapes in sorted key order."""
    factors = [f for f in map(split_lora_factor, shapes) if f is not None]
    a_keys = {m for m, factor in factors if factor == "lora_A"}
    b_keys = {m for m, factor in factors if factor == "lora_B"}
    if a_keys != b_keys:
        odd = sorted(a_keys ^ b_keys)[0]
        raise AdapterError(f"{source}: module {odd} has only one of lora_A/lora_B; re-export the adapter")
    fifo = bool(config.get("fan_in_fan_out", False))
    layout: dict[str, ModuleShape] = {}
    for key in sorted(a_keys):
        a, b = tuple(shapes[lora_factor_name(key, "lora_A")]), tuple(shapes[lora_factor_name(key, "lora_B")])
        if len(a) != 2 or len(b) != 2:
            raise AdapterError(
                f"{source}: module {key} is not a Linear LoRA (lora_A has shape {a}); "
                "only Linear/Conv1D LoRA modules are supported"
            )
        if a[0] != b[1]:
            raise AdapterError(
                f"{source}: module {key} has lora_A {a} and lora_B {b} with different ranks; re-export the adapter"
            )
        r_cfg = _pattern_value(config.get("rank_pattern"), key)
        if r_cfg is None:
            r_cfg = config.get("r", a[0])
        if int(r_cfg) != a[0]:
            logger.warning("%s: %s has rank %d but the config says %s; using the weight shape", source, key, a[0],
                           r_cfg)
        layout[key] = ModuleShape(int(a[0]), int(b[0]), int(a[1]), fifo)
    return layout


def _lora_module(key: str, A: torch.Tensor, B: torch.Tensor, config: dict[str, Any], source: str) -> LoraModule:
    for t, part in ((A, "lora_A"), (B, "lora_B")):
        if not torch.isfinite(t).all():
            raise AdapterError(f"{source}: {key}.{part} contains NaN/Inf; retrain or pick an earlier checkpoint")
    return LoraModule(A, B, module_scaling(config, key, int(A.shape[0])), bool(config.get("fan_in_fan_out", False)))


def adapter_from_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any], name: str = "",
                            source: str = "adapter") -> LoraAdapter:
    """Build a :class:`LoraAdapter` from a PEFT adapter state dict and config; validates shapes and values."""
    _check_peft_type(config, source)
    tensors = {strip_peft_prefix(k): v for k, v in state.items()}
    layout = _lora_layout({k: tuple(v.shape) for k, v in tensors.items()}, config, source)
    modules = {key: _lora_module(key, tensors[lora_factor_name(key, "lora_A")], tensors[lora_factor_name(key, "lora_B")],
                                 config, source)
               for key in layout}
    extra = {k: v for k, v in tensors.items() if split_lora_factor(k) is None}
    for k, v in extra.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise AdapterError(f"{source}: {k} contains NaN/Inf; retrain or pick an earlier checkpoint")
    if not modules:
        raise AdapterError(f"{source} contains no lora_A/lora_B weights; point to a LoRA adapter")
    return LoraAdapter(modules=modules, config=dict(config), name=name, extra=extra)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT LoRA adapter directory, checked (exists, JSON object, LoRA)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter directory {path} does not exist; check the path")
    if not path.is_dir():
        raise AdapterError(f"{path} is a file; pass the PEFT adapter directory that contains {CONFIG_NAME}")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise AdapterError(f"no {CONFIG_NAME} in {path}; point to a PEFT adapter directory saved with save_pretrained")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON ({exc}); re-export the adapter") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path} is not a JSON object; re-export the adapter")
    _check_peft_type(config, path)
    return config


def load_adapter(path: str | os.PathLike[str], name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``adapter_model.bin`` is accepted only if ``torch.load(weights_only=True)`` can read it. To read
    only some modules, or shapes without tensors, use :class:`AdapterReader`.
    """
    path = Path(path)
    config = read_adapter_config(path)
    state = _read_tensors(path)
    return adapter_from_state_dict(state, config, name=name if name is not None else path.name, source=str(path))


class AdapterReader(_AdapterFlags):
    """A PEFT LoRA adapter directory opened lazily.

    The constructor reads the config and the tensor names and shapes (the safetensors header; an
    ``adapter_model.bin`` is memory-mapped) and validates the LoRA layout like :func:`load_adapter`,
    without loading any factor. :meth:`read` loads the factors of the requested modules only.
    ``extra`` maps the non-LoRA tensor names (prefix stripped) to their shapes; they are never loaded.
    ``last_read`` / ``tensors_read`` record what the latest / all calls of :meth:`read` loaded.
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.config = read_adapter_config(self.path)
        self.name = name if name is not None else self.path.name
        self._bin: dict[str, torch.Tensor] | None = None
        st = self.path / SAFETENSORS_NAME
        if st.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(st), framework="pt") as fh:
                    raw = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            except Exception as exc:
                raise _corrupt(st, exc) from exc
            self._file: Path | None = st
        elif (self.path / BIN_NAME).exists():
            self._bin = _load_bin(self.path / BIN_NAME, mmap=True)
            raw = {k: tuple(v.shape) for k, v in self._bin.items()}
            self._file = None
        else:
            raise _no_weights(self.path)
        self._names = {strip_peft_prefix(k): k for k in raw}
        self._shapes = _lora_layout({strip_peft_prefix(k): v for k, v in raw.items()}, self.config, str(self.path))
        if not self._shapes:
            raise AdapterError(f"{self.path} contains no lora_A/lora_B weights; point to a LoRA adapter")
        self.extra: dict[str, tuple[int, ...]] = {strip_peft_prefix(k): v for k, v in raw.items()
                                                  if split_lora_factor(strip_peft_prefix(k)) is None}
        self.last_read: tuple[str, ...] = ()
        self.tensors_read = 0

    @property
    def module_keys(self) -> list[str]:
        """The adapted modules, sorted."""
        return list(self._shapes)

    def module_shapes(self) -> dict[str, ModuleShape]:
        return dict(self._shapes)

    def read(self, keys: Iterable[str], device: torch.device | str | None = None) -> LoraAdapter:
        """A :class:`LoraAdapter` holding only the modules ``keys`` (no extras), factors on ``device``."""
        keys = list(keys)
        missing = [k for k in keys if k not in self._shapes]
        if missing:
            raise AdapterError(f"{self.path} has no LoRA module {missing[0]}; train all adapters with the same "
                               "target_modules")
        names = [self._names[lora_factor_name(k, factor)] for k in keys for factor in LORA_FACTORS]
        tensors: dict[str, torch.Tensor] = {}
        if self._file is not None:
            from safetensors import safe_open

            try:
                with safe_open(str(self._file), framework="pt") as fh:
                    for n in names:
                        tensors[n] = fh.get_tensor(n)
            except Exception as exc:
                raise _corrupt(self._file, exc) from exc
        else:
            assert self._bin is not None
            tensors = {n: self._bin[n].clone() for n in names}
        self.last_read = tuple(names)
        self.tensors_read += len(names)
        src = str(self.path)
        modules = {}
        for k in keys:
            A = tensors.pop(self._names[lora_factor_name(k, "lora_A")]).to(device)
            B = tensors.pop(self._names[lora_factor_name(k, "lora_B")]).to(device)
            modules[k] = _lora_module(k, A, B, self.config, src)
        return LoraAdapter(modules, dict(self.config), name=self.name)

    def read_extra(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The non-LoRA tensors ``names`` (prefix stripped; default all of :attr:`extra`), on CPU."""
        names = sorted(self.extra) if names is None else list(names)
        missing = [n for n in names if n not in self.extra]
        if missing:
            raise AdapterError(f"{self.path} has no tensor {missing[0]}; re-export the adapter")
        if self._file is None:
            assert self._bin is not None
            out = {n: self._bin[self._names[n]].clone() for n in names}
        else:
            from safetensors import safe_open

            try:
                with safe_open(str(self._file), framework="pt") as fh:
                    out = {n: fh.get_tensor(self._names[n]) for n in names}
            except Exception as exc:
                raise _corrupt(self._file, exc) from exc
        for n, v in out.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise AdapterError(f"{self.path}: {n} contains NaN/Inf; retrain or pick an earlier checkpoint")
        return out


# ----------------------------------------------------------------------------------------------
# saving

_DROP_CONFIG_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")


def adapter_config_for(adapter: LoraAdapter) -> dict[str, Any]:
    """The PEFT config that reproduces ``adapter``'s ranks and scalings exactly.

    The most common (rank, scaling) pair sets ``r``/``lora_alpha``; other modules get entries in
    ``rank_pattern``/``alpha_pattern`` keyed by their full module path. ``target_modules`` lists the
    full paths of the adapted modules, so exactly those modules are adapted on load.

    The config says what the file holds (:func:`consistent_extra_config`): ``bias`` is ``"none"``
    unless bias tensors are written; without head tensors ``modules_to_save`` is None and a head
    task type (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, whose loading needs the head's weights) becomes
    ``FEATURE_EXTRACTION``, so ``PeftModel.from_pretrained`` loads the file.
    """
    cfg = copy.deepcopy(adapter.config)
    cfg.setdefault("peft_type", "LORA")
    cfg["peft_type"] = "LORA"
    rslora = bool(cfg.get("use_rslora", False))

    def alpha_of(mod: LoraModule) -> float:
        a = mod.scaling * (math.sqrt(mod.rank) if rslora else mod.rank)
        return float(round(a)) if abs(a - round(a)) < 1e-9 * max(1.0, abs(a)) else float(a)

    pairs = Counter((m.rank, alpha_of(m)) for m in adapter.modules.values())
    (r0, a0), _ = pairs.most_common(1)[0]
    cfg["r"] = int(r0)
    cfg["lora_alpha"] = int(a0) if float(a0).is_integer() else a0
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for key, mod in adapter.modules.items():
        a = alpha_of(mod)
        if mod.rank != r0:
            rank_pattern[key] = mod.rank
        if a != a0:
            alpha_pattern[key] = int(a) if float(a).is_integer() else a
    cfg["rank_pattern"] = rank_pattern
    cfg["alpha_pattern"] = alpha_pattern
    cfg["target_modules"] = sorted(adapter.modules)
    for k in _DROP_CONFIG_KEYS:
        if k in cfg:
            cfg[k] = None
    cfg.setdefault("lora_dropout", 0.0)
    cfg["inference_mode"] = True
    return consistent_extra_config(cfg, adapter.extra, adapter.modules)


def consistent_extra_config(config: dict[str, Any], extra: Mapping[str, Any], modules: Iterable[str]) -> dict[str, Any]:
    """``config`` with ``bias``, ``modules_to_save`` and ``task_type`` matching the non-LoRA tensors ``extra``."""
    cfg = dict(config)
    saved = saved_module_names(cfg)
    kinds = {k: extra_kind(k, saved) for k in extra}
    bias_modules = {bias_module(k) for k, kind in kinds.items() if kind == "bias"}
    if not bias_modules:
        cfg["bias"] = "none"
    elif cfg.get("bias") != "all":
        cfg["bias"] = "lora_only" if bias_modules <= set(modules) else "all"
    if "head" not in kinds.values():
        cfg["modules_to_save"] = None
        if str(cfg.get("task_type") or "").upper() in HEAD_TASK_TYPES:
            cfg["task_type"] = BACKBONE_TASK_TYPE
    return cfg


def adapter_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The PEFT state dict (keys with the ``base_model.model.`` prefix) of ``adapter``."""
    sd: dict[str, torch.Tensor] = {}
    for key, mod in adapter.modules.items():
        sd[peft_name(lora_factor_name(key, "lora_A"))] = mod.A.detach().cpu().contiguous()
        sd[peft_name(lora_factor_name(key, "lora_B"))] = mod.B.detach().cpu().contiguous()
    for key, t in adapter.extra.items():
        sd[peft_name(key)] = t.detach().cpu().contiguous()
    return sd


def write_adapter_files(adapter: LoraAdapter, directory: str | Path) -> None:
    """Write the PEFT files of ``adapter`` into an existing ``directory`` (not atomic; see :func:`save_adapter`)."""
    from safetensors.torch import save_file

    if not adapter.modules:
        raise AdapterError("cannot save an adapter without LoRA modules; merge or load one first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config_for(adapter)
    save_file(adapter_state_dict(adapter), str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(adapter: LoraAdapter, path: str | Path) -> None:
    """Atomically write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads."""
    if not adapter.modules:
        raise AdapterError("cannot save an adapter without LoRA modules; merge or load one first")
    with atomic_dir(path) as tmp:
        write_adapter_files(adapter, tmp)


# ----------------------------------------------------------------------------------------------
# compatibility


def check_compatible(adapters: Sequence[LoraAdapter | AdapterReader]) -> None:
    """Check adapters can be merged: same base model, same module set, same shapes, finite weights.

    Ranks may differ. Works on loaded adapters and on :class:`AdapterReader` headers (shapes only;
    their factors are checked when read). Raises :class:`AdapterError` with a one-line message otherwise.
    """
    if not adapters:
        raise AdapterError("no adapters given; pass at least one adapter directory")
    ref = adapters[0]
    ref_name = ref.name or "adapter 0"
    ref_shapes = ref.module_shapes()
    for i, ad in enumerate(adapters):
        nm = ad.name or f"adapter {i}"
        shapes = ad.module_shapes()
        if not shapes:
            raise AdapterError(f"{nm} has no LoRA modules; pass a LoRA adapter")
        if isinstance(ad, LoraAdapter):
            for key, mod in ad.modules.items():
                if mod.A.shape[0] != mod.B.shape[1]:
                    raise AdapterError(f"{nm}: module {key} has mismatched lora_A/lora_B ranks; re-export the adapter")
                if not (torch.isfinite(mod.A).all() and torch.isfinite(mod.B).all()):
                    raise AdapterError(f"{nm}: module {key} contains NaN/Inf; retrain or pick an earlier checkpoint")
        if i == 0:
            continue
        if (ad.base_model or None) != (ref.base_model or None) and ad.base_model and ref.base_model:
            raise AdapterError(
                f"{nm} was trained on base model {ad.base_model!r} but {ref_name} on {ref.base_model!r}; "
                "merge only adapters of the same base model"
            )
        if set(shapes) != set(ref_shapes):
            diff = sorted(set(shapes) ^ set(ref_shapes))
            raise AdapterError(
                f"{nm} and {ref_name} adapt different modules (e.g. {diff[0]}, {len(diff)} differ); "
                "train all adapters with the same target_modules"
            )
        for key, shape in shapes.items():
            r = ref_shapes[key]
            if (shape.out_features, shape.in_features) != (r.out_features, r.in_features):
                raise AdapterError(
                    f"{nm}: module {key} has shape {(shape.out_features, shape.in_features)} but {ref_name} has "
                    f"{(r.out_features, r.in_features)}; merge only adapters of the same base model"
                )
            if shape.fan_in_fan_out != r.fan_in_fan_out:
                raise AdapterError(f"{nm}: module {key} differs in fan_in_fan_out from {ref_name}; re-export one of them")
