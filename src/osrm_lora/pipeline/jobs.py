"""Job distribution: independent jobs spread over the processes, and how training is shared."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from osrm_lora.config import PipelineConfig
from osrm_lora.distributed import barrier, raise_if_any_failed, shard


def run_jobs(jobs: Sequence[Any], fn: Callable[[Any], Any]) -> None:
    """Run independent jobs spread over the processes (round robin; all of them in one process),
    then wait for every process. A failure on any rank is raised on every rank."""
    error: BaseException | None = None
    for job in shard(jobs):
        try:
            fn(job)
        except Exception as exc:
            error = exc
            break
    raise_if_any_failed(error)
    barrier()


def parallel_mode(cfg: PipelineConfig, n_tasks: int, world_size: int) -> str:
    """How several processes share the training: ``tasks`` (one adapter per process at a time) or
    ``data`` (every adapter with all processes, DDP)."""
    if cfg.parallel != "auto":
        return cfg.parallel
    return "tasks" if n_tasks >= world_size else "data"


_parallel_mode = parallel_mode  # the name the tests and benchmarks have used
