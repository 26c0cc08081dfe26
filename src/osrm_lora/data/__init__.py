"""Tasks, their fixed splits, metrics and data sources (built-in packages, local files, HF datasets)."""

from __future__ import annotations

from osrm_lora.data.metrics import METRICS, compute_metric, higher_is_better
from osrm_lora.data.sources.builtin import BUILTIN_TASKS
from osrm_lora.data.spec import TaskSpec, load_task, load_tasks, resolve_specs
from osrm_lora.data.suites import SUITES, load_suite
from osrm_lora.data.task import SPLITS, Split, Task

__all__ = [
    "BUILTIN_TASKS",
    "METRICS",
    "SPLITS",
    "SUITES",
    "Split",
    "Task",
    "TaskSpec",
    "compute_metric",
    "higher_is_better",
    "load_suite",
    "load_task",
    "load_tasks",
    "resolve_specs",
]
