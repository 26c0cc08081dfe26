"""Merge-method registry: methods are typed functions registered by a decorator.

A method is ``fn(adapters, params, ctx) -> MergeResult`` registered with :func:`register_method`,
which records its name, typed parameters (defaults and valid ranges), a one-line description, the
paper link and flags. :func:`merge` validates the inputs and parameters and dispatches by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from osrm_lora.adapters import AdapterReader, LoraAdapter, check_compatible
from osrm_lora.errors import AdapterError, OsrmError
from osrm_lora.merge.methods._common import merged_config
from osrm_lora.merge.types import (
    _REGISTRY,
    PARAM_TYPES,
    MergeContext,
    MergeResult,
    MethodFn,
    MethodInfo,
    Param,
    register_method,
)

logger = logging.getLogger(__name__)

def _ensure_loaded() -> None:
    # importing the method modules runs their decorators
    from osrm_lora.merge import methods  # noqa: F401


def list_methods() -> list[MethodInfo]:
    """All registered merge methods, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_method(name: str) -> MethodInfo:
    """The method registered under ``name``; OsrmError listing valid names otherwise."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise OsrmError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def resolve_params(info: MethodInfo, params: Mapping[str, Any] | None, n_adapters: int) -> dict[str, Any]:
    """Defaults overlaid with ``params``, each validated against the method's schema."""
    given = dict(params or {})
    for k in given:
        info.param(k)  # unknown names raise, listing the valid ones
    out: dict[str, Any] = {}
    for p in info.params:
        value = given.get(p.name, p.default)
        out[p.name] = None if value is None else p.validate(value, info.name, n_adapters)
    return out


def check_extras(adapters: Sequence[LoraAdapter | AdapterReader], method: str, ignore_extra: bool) -> None:
    """AdapterError for inputs ``method`` cannot honour: DoRA, lora_bias, and non-LoRA tensors
    (modules_to_save) unless ``ignore_extra`` (then they are dropped)."""
    for i, ad in enumerate(adapters):
        nm = ad.name or f"adapter {i}"
        if ad.uses_dora:
            raise AdapterError(f"{nm} uses DoRA (magnitude vectors), which merge method {method} cannot honour; "
                               "train the adapters without use_dora")
        if ad.uses_lora_bias:
            raise AdapterError(f"{nm} uses lora_bias, which merge method {method} cannot honour; "
                               "train the adapters with lora_bias=False")
        if ad.extra and not ignore_extra:
            ex = sorted(ad.extra)[0]
            raise AdapterError(f"{nm} carries non-LoRA tensors (e.g. {ex}, modules_to_save) that merge method "
                               f"{method} cannot merge; pass ignore_extra=True to drop them (heads stay per task)")


_CONTEXT_INPUT = {"grams": "grams", "fisher": "fisher", "adamerging_eval": "entropy_fn"}


def check_inputs(adapters: Sequence[LoraAdapter | AdapterReader], info: MethodInfo, params: Mapping[str, Any] | None,
                 context: MergeContext | None, *, ignore_extra: bool = False) -> dict[str, Any]:
    """Everything both merge engines check before merging (compatible adapters, enough of them,
    inputs the method can honour, the context inputs it needs, one per adapter); returns the
    parameters resolved against the method's schema."""
    check_compatible(adapters)
    if len(adapters) < info.min_adapters:
        raise OsrmError(f"method {info.name} needs at least {info.min_adapters} adapters, got {len(adapters)}")
    check_extras(adapters, info.name, ignore_extra)
    resolved = resolve_params(info, params, len(adapters))
    for need in sorted(info.needs):
        attr = _CONTEXT_INPUT[need]
        val = getattr(context, attr, None)
        if val is None:
            raise OsrmError(f"method {info.name} needs {attr} in the MergeContext; compute them first (see docs)")
        if attr in ("grams", "fisher") and len(val) != len(adapters):
            raise OsrmError(f"method {info.name}: context.{attr} has {len(val)} entries for {len(adapters)} "
                            "adapters; give one per adapter in the same order")
    return resolved


def merge(adapters: list[LoraAdapter], method: str, params: dict[str, Any] | None = None, *,
          context: MergeContext | None = None, ignore_extra: bool = False) -> MergeResult:
    """Merge ``adapters`` with the registered ``method`` and ``params``.

    Validates compatibility (:func:`~osrm_lora.adapters.check_compatible`), the parameters against
    the method schema, and the context inputs the method needs (:func:`check_inputs`). DoRA and
    lora_bias adapters are refused; non-LoRA tensors (modules_to_save) are refused unless
    ``ignore_extra`` (then dropped).
    """
    info = get_method(method)
    resolved = check_inputs(adapters, info, params, context, ignore_extra=ignore_extra)
    ctx = context or MergeContext()
    t0 = time.perf_counter()
    result = info.fn(adapters, resolved, ctx)
    result.method = method
    result.params = resolved
    if result.config is None:
        result.config = merged_config(adapters)
    result.source_ranks = {k: sum(a.modules[k].rank for a in adapters) for k in adapters[0].modules}
    result.task_names = [a.name or f"task{i}" for i, a in enumerate(adapters)]
    result.inputs = [LoraAdapter({}, a.config, a.name, dict(a.extra)) for a in adapters]
    if resolved.get("seed", 0) is None:  # the seed the method drew from (recorded so the merge can be repeated)
        result.info.setdefault("context_seed", ctx.seed)
    result.info.setdefault("seconds", time.perf_counter() - t0)
    result.info.setdefault("adapters", [a.name for a in adapters])
    if ignore_extra and any(a.extra for a in adapters):
        result.info["dropped_extra"] = sorted({k for a in adapters for k in a.extra})
    logger.debug("merged %d adapters with %s in %.2fs", len(adapters), method, result.info["seconds"])
    return result


__all__ = ["PARAM_TYPES", "MergeContext", "MergeResult", "MethodFn", "MethodInfo", "Param", "check_extras",
           "check_inputs", "get_method", "list_methods", "merge", "register_method", "resolve_params"]
