"""Merge engine: a registry of LoRA merge methods, their shared building blocks, output and CLI glue."""

from typing import Any

from osrm_lora.merge.registry import (
    MergeContext,
    MergeResult,
    MethodInfo,
    Param,
    get_method,
    list_methods,
    merge,
    register_method,
)

__all__ = [
    "MergeContext",
    "MergeResult",
    "MethodInfo",
    "Param",
    "format_method_list",
    "get_method",
    "list_methods",
    "merge",
    "register_method",
    "run_merge",
    "save_merge_result",
    "stream_merge",
]


def __getattr__(name: str) -> Any:  # lazy: io/cli import transformers only when used
    if name == "save_merge_result":
        from osrm_lora.merge.io import save_merge_result

        return save_merge_result
    if name == "stream_merge":
        from osrm_lora.merge.stream import stream_merge

        return stream_merge
    if name in ("run_merge", "format_method_list"):
        from osrm_lora.merge import cli

        return getattr(cli, name)
    raise AttributeError(name)
