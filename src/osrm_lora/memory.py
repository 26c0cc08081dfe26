"""Peak memory of one call (CUDA allocator or sampled resident set size) and the device helpers it
needs; used by the merged-evaluation sweep to record each merge's cost, and by the benchmarks."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage and release cached CUDA blocks."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def _rss_sampler(interval: float) -> Iterator[dict[str, int]]:
    box = {"peak": _rss_bytes()}
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            box["peak"] = max(box["peak"], _rss_bytes())
            stop.wait(interval)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield box
    finally:
        stop.set()
        th.join()
        box["peak"] = max(box["peak"], _rss_bytes())


@dataclass
class PeakMemory:
    """Peak memory of one call above what was allocated before it."""

    bytes: int
    method: str

    def to_json(self) -> dict[str, Any]:
        return {"peak_bytes": self.bytes, "peak_gib": self.bytes / 2**30, "method": self.method}


def measure_peak(fn: Callable[[], Any], *, device: torch.device | str | None = None,
                 interval: float = 0.005) -> tuple[PeakMemory, Any]:
    """Run ``fn`` once and return its peak memory above the level before the call, and its result.

    GPU: ``torch.cuda.max_memory_allocated`` minus the allocation at the start (exact, includes the
    result). CPU: the resident set size sampled every ``interval`` seconds by a thread (torch's CPU
    allocator is invisible to ``tracemalloc``), minus the RSS at the start; allocations shorter than
    the interval may be missed and freed pages returned lazily may inflate it slightly.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    free_memory(dev)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        result = fn()
        sync(dev)
        return PeakMemory(int(torch.cuda.max_memory_allocated(dev) - base), "torch.cuda.max_memory_allocated"), result
    base = _rss_bytes()
    with _rss_sampler(interval) as box:
        result = fn()
    return PeakMemory(max(0, int(box["peak"] - base)), f"RSS sampled every {interval * 1000:g} ms"), result


__all__ = ["PeakMemory", "free_memory", "measure_peak", "sync"]
