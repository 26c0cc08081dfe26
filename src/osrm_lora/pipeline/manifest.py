"""The run's manifest (seeds, versions, device, stage timings, output hashes) and what it records
of the weight files."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from osrm_lora.backbone import select_device
from osrm_lora.config import config_to_dict
from osrm_lora.distributed import get_env
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import read_json, sha256_file, sha256_json
from osrm_lora.pipeline.context import RunContext
from osrm_lora.pipeline.layout import RunLayout


def output_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every weight file the run produced (adapters, heads, merged results), by relative path."""
    files = [p for sub in RunLayout(run_dir).weight_dirs() for p in sorted(sub.rglob("*.safetensors"))
             if not any(part.startswith(".") for part in p.relative_to(run_dir).parts)]
    return {p.relative_to(run_dir).as_posix(): sha256_file(p) for p in files}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "osrm_lora": __import__("osrm_lora").__version__,
    }


def manifest(ctx: RunContext, started: float) -> dict[str, Any]:
    """The manifest of a finished run (``started``: its ``time.perf_counter()`` at the start)."""
    dev = select_device(ctx.cfg.device)
    return {
        "name": ctx.cfg.name,
        "seed": ctx.cfg.seed,
        "model": ctx.model_path,
        "tasks": {t.name: {"fingerprint": ctx.fingerprints[t.name], "source": t.source, "n_train": len(t.train),
                           "n_validation": len(t.validation), "n_test": len(t.test)} for t in ctx.tasks},
        "config_hash": sha256_json(config_to_dict(ctx.cfg)),
        "versions": _versions(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1) if dev.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processes": get_env().world_size,
        "output_hashes": output_hashes(ctx.run_dir),
        "stage_seconds": ctx.stage_seconds,
        "stages_cached": ctx.stages_cached,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def previous_stage_seconds(run_dir: Path) -> dict[str, float]:
    """``stage_seconds`` of the run directory's last manifest (empty when there is none or it is unreadable)."""
    path = RunLayout(run_dir).manifest
    if not path.is_file():
        return {}
    try:
        seconds = read_json(path).get("stage_seconds") or {}
    except (OsrmError, AttributeError):
        return {}
    return {str(k): float(v) for k, v in seconds.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)} if isinstance(seconds, dict) else {}
